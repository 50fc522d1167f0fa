"""Load a diffusion transformer offline: a diffusers folder, a single original-layout safetensors file (bare
or inside an all-in-one checkpoint) or a diffusers transformer's weight file alone (its config beside it or
inferred), whole or only the parts one rank needs.

The model is built on the meta device and only the selected modules are materialised, tensor by tensor
from the file; the rest stay on meta. Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.loading import wan_layout
from xdit_core.models.families import ModelSpec, resolve_model_spec
from xdit_core.loading.key_mapping import IGNORED_ORIGINAL, Rule, identity_rules, layout_rules, original_shape, split
from xdit_core.loading.model_files import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, LoadStats, WeightFiles, folder_weight_files,
                          open_safetensors, refuse_pickle)
from xdit_core.loading.model_config import check_config, read_config_file
from xdit_core.loading.original_layout import (config_from_shapes, detect_diffusers_family, detect_layout,
                                               diffusers_file_config, unknown_layout_message)
from xdit_core.models.families import model_class
from xdit_core.models.fp8 import FP8_DTYPES, Fp8Weight

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The diffusers modules of each family by role. Block lists are in the adapters' flat order; whatever
# is neither a block, the input embedder nor the head is conditioning (time/text/guidance embedders),
# which every rank loads.
BLOCK_LISTS = {"flux": ("transformer_blocks", "single_transformer_blocks"), "sd3": ("transformer_blocks",),
               "pixart": ("transformer_blocks",), "wan": ("blocks",), "qwen": ("transformer_blocks",),
               "zimage": ("noise_refiner", "layers"), "flux2": ("transformer_blocks", "single_transformer_blocks"),
               "hunyuandit": ("blocks",)}
EMBED_MODULES = {"flux": ("x_embedder",), "sd3": ("pos_embed",), "pixart": ("pos_embed",), "wan": ("patch_embedding",),
                 "qwen": ("img_in",), "zimage": ("all_x_embedder",),
                 "flux2": ("x_embedder",), "hunyuandit": ("pos_embed",)}
HEAD_MODULES = {"flux": ("norm_out", "proj_out"), "sd3": ("norm_out", "proj_out"),
                "pixart": ("norm_out", "proj_out", "scale_shift_table"),
                "wan": ("norm_out", "proj_out", "scale_shift_table"), "qwen": ("norm_out", "proj_out"),
                "zimage": ("all_final_layer",), "flux2": ("norm_out", "proj_out"),
                "hunyuandit": ("norm_out", "proj_out")}

__all__ = ["DTYPES", "LoadStats", "ModelParts", "block_prefixes", "load_model", "read_model_config"]


@dataclass(frozen=True)
class ModelParts:
    """The modules one rank materialises: blocks by flat index (the adapter's order), and whether the
    input embedder and the output head come too. Conditioning embedders are always loaded."""

    blocks: frozenset[int]  # any iterable of ints is accepted (a range, a list)
    embed: bool = True
    head: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", frozenset(int(i) for i in self.blocks))


@dataclass
class _Source:
    config: dict[str, Any]
    files: WeightFiles
    layout: Optional[str]  # family of an original-layout file; None for diffusers tensor names


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise XDiTModelError(f"model path not found: {path}")
    return path


def _model_folder(path: Path) -> Path:
    # A whole diffusers pipeline (as downloaded from a hub) keeps its transformer in a subfolder.
    if not (path / "config.json").is_file() and (path / "model_index.json").is_file() \
            and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


def _read_folder_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise XDiTModelError(f"{folder} has no config.json; expected a diffusers model folder (config.json + "
                             "safetensors) or a single .safetensors file")
    config = read_config_file(config_file)
    check_config(config, str(config_file))
    return config


def _open_single_file(path: Path, stats: LoadStats) -> _Source:
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise XDiTModelError(f"{path} is not a .safetensors file; --model takes a diffusers model folder or a "
                             "single .safetensors file")
    with open_safetensors(path) as f:
        keys = list(f.keys())
    layout = detect_layout(keys)
    if layout is not None:
        family, prefix = layout
        files = WeightFiles({k[len(prefix):]: (path, k) for k in keys if k.startswith(prefix)}, stats)
        config = config_from_shapes(family, files.shapes)
        check_config(config, f"{path} (config inferred from its tensor shapes)")
        return _Source(config, files, family)
    family = detect_diffusers_family(keys)
    if family is None:
        raise XDiTModelError(unknown_layout_message(path))
    files = WeightFiles({k: (path, k) for k in keys}, stats)
    return _Source(diffusers_file_config(path, family, files.shapes), files, None)


def _open(path: str | Path, stats: LoadStats) -> _Source:
    path = _existing(path)
    if path.is_file():
        return _open_single_file(path, stats)
    folder = _model_folder(path)
    config = _read_folder_config(folder)
    locations = {name: (file, name) for name, file in folder_weight_files(folder).items()}
    return _Source(config, WeightFiles(locations, stats), None)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The checked diffusers config of a model path: a folder's config.json; a single file's config beside it
    (diffusers layout) or matched/inferred from its tensor shapes. Reads no tensor data."""
    return _open(path, LoadStats()).config


def model_shapes(path: str | Path, family: Optional[str] = None, variant: Optional[str] = None
                 ) -> tuple[dict[str, tuple[int, ...]], ModelSpec]:
    """(every parameter's shape, spec) of a model, from its config alone (built on the meta device)."""
    config = read_model_config(path)
    spec = resolve_model_spec(config, family, variant)
    meta = _build_on_meta(spec.family, config, torch.float32).state_dict()
    return {name: tuple(t.shape) for name, t in meta.items()}, spec


def parameter_count(path: str | Path) -> int:
    """How many weights a model file or folder holds, from its headers (no tensor data read)."""
    return sum(math.prod(shape) for shape in _open(path, LoadStats()).files.shapes.values())


def block_prefixes(model: torch.nn.Module, family: str) -> list[str]:
    """The name prefix of every transformer block, in the adapter's flat order (Flux: double, then single)."""
    return [f"{lst}.{i}." for lst in BLOCK_LISTS[family] for i in range(len(getattr(model, lst)))]


def _selector(model: torch.nn.Module, family: str, parts: Optional[ModelParts]) -> Callable[[str], bool]:
    """Whether a tensor name belongs to the selected parts."""
    if parts is None:
        return lambda name: True
    blocks = block_prefixes(model, family)
    outside = sorted(i for i in parts.blocks if not 0 <= i < len(blocks))
    if outside:
        raise XDiTConfigError(f"block indices {outside} are out of range: the model has {len(blocks)} blocks "
                              f"(0..{len(blocks) - 1})")
    every_block, chosen = tuple(blocks), tuple(blocks[i] for i in sorted(parts.blocks))

    def keep(name: str) -> bool:
        if name.startswith(every_block):
            return name.startswith(chosen)
        top = name.split(".", 1)[0]
        if top in EMBED_MODULES[family]:
            return parts.embed
        if top in HEAD_MODULES[family]:
            return parts.head
        return True

    return keep


def _build_on_meta(family: str, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    # As diffusers does: parameters take the default dtype, buffers keep the float32 they are made in.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return model_class(family).from_config(config)
    finally:
        torch.set_default_dtype(previous)


def _is_scale_key(name: str, weights: set[str]) -> bool:
    """ComfyUI's scaled-fp8 extras: the marker and per-weight scales (`scale_input` is unused here)."""
    if name == "scaled_fp8":
        return True
    stem, _, last = name.rpartition(".")
    return last in ("scale_weight", "scale_input") and f"{stem}.weight" in weights


def _check_weights(path: Path, family: str, files: WeightFiles, rules: list[Rule],
                   shapes: dict[str, tuple[int, ...]], ignored: set[str]) -> None:
    """Every tensor present with the shape the config gives, nothing unknown: checked before any read."""
    expected = {r.original: original_shape(r, shapes) for r in rules}
    missing = [k for k in expected if k not in files.shapes]
    wrong = [k for k in expected if k in files.shapes and files.shapes[k] != expected[k]]
    weights = set(expected)
    unexpected = [k for k in files.shapes if k not in expected and k not in ignored and not _is_scale_key(k, weights)]
    if not (missing or wrong or unexpected):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of another shape (e.g. {k}: {list(files.shapes[k])} in the file, "
                        f"{list(expected[k])} for the config)")
    raise XDiTModelError(f"{path}: the weights do not match the {family} model config: {'; '.join(problems)}")


def _read(files: WeightFiles, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A stored tensor as stored, and the float32 `scale_weight` of a scaled-fp8 weight (else None)."""
    tensor = files.read(name)
    scale = name[: -len("weight")] + "scale_weight" if name.endswith(".weight") else None
    if scale is not None and scale in files:
        return tensor, files.read(scale).to(torch.float32)
    return tensor, None


def _kept_fp8(tensor: torch.Tensor, scale: Optional[torch.Tensor], parts: tuple[str, ...],
              linear_weights: set[str]) -> bool:
    """Whether a stored tensor stays fp8 on the device: an fp8 weight of Linear layers only (other fp8 tensors, such
    as the patch embedders' convolutions, are tiny and upcast at load) with one scale for the whole tensor (a
    per-row scale would have to be split with a fused tensor's pieces)."""
    return (tensor.dtype in FP8_DTYPES and all(p in linear_weights for p in parts)
            and (scale is None or scale.numel() == 1))


def _rebuild_sincos_tables(model: torch.nn.Module, keep: Callable[[str], bool], device: torch.device) -> None:
    """Non-persistent buffers are not in any file: PixArt's sin-cos position table and Wan's rotary tables are
    computed again."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    persistent = set(model.state_dict())
    for name, buf in list(model.named_buffers()):
        if name in persistent or not keep(name):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, WanRotaryPosEmbed):
            fresh = WanRotaryPosEmbed(owner.attention_head_dim, owner.patch_size, owner.max_seq_len)
            setattr(owner, attr, getattr(fresh, attr).to(device))
            continue
        if not (isinstance(owner, PatchEmbed) and attr == "pos_embed"):
            raise XDiTModelError(f"cannot rebuild the buffer {name} of {type(owner).__name__} (not in weight files)")
        table = get_2d_sincos_pos_embed(buf.shape[-1], math.isqrt(buf.shape[1]), base_size=owner.base_size,
                                        interpolation_scale=owner.interpolation_scale, output_type="pt")
        owner.pos_embed = table.float().unsqueeze(0).to(device)


def load_model(path: str | Path, dtype: str = "fp32", family: Optional[str] = None, variant: Optional[str] = None,
               *, parts: Optional[ModelParts] = None, device: str | torch.device = "cpu",
               stats: Optional[LoadStats] = None, keep_fp8: bool = True,
               on_block: Optional[Callable[[torch.nn.Module], None]] = None) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a model in `dtype` onto `device`, whole or only `parts` (the rest stays on meta); returns
    (model, spec). `stats`, when given, counts what was read. `keep_fp8`: the file's fp8 Linear weights stay fp8 on
    the device, upcast to `dtype` per layer as they are used (models/fp8.py), with results equal to upcasting
    them at load, which False does. `on_block`: called with each transformer block as soon as its weights are
    in place, before the next block is read (weight sharding: so the load never holds more than one block
    whole)."""
    if dtype not in DTYPES:
        raise XDiTModelError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    stats = LoadStats() if stats is None else stats
    source = _open(path, stats)
    spec = resolve_model_spec(source.config, family, variant)
    model = _build_on_meta(spec.family, source.config, DTYPES[dtype])
    meta = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in meta.items()}
    if source.layout is None:
        rules, ignored = identity_rules(list(meta)), set()
    elif source.layout == "wan":  # renames only, as diffusers' own converter gives them
        original = {new: old for old, new in wan_layout.diffusers_names(list(source.files.shapes)).items()}
        rules, ignored = [Rule(original.get(name, name), (name,)) for name in meta], set()
    else:
        rules = layout_rules(spec.family, list(meta))
        tables = [n for n, _ in model.named_buffers() if n not in meta]  # rebuilt, so ignored in the file
        ignored = {r.original for r in layout_rules(spec.family, tables)} | set(IGNORED_ORIGINAL[spec.family])
    _check_weights(Path(path), spec.family, source.files, rules, shapes, ignored)
    keep = _selector(model, spec.family, parts)
    device = torch.device(device)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    prefixes = block_prefixes(model, spec.family)
    by_block: dict[Optional[int], list[Rule]] = {}  # None: outside the blocks, loaded first
    for rule in rules:
        if any(keep(p) for p in rule.parts):
            block = next((i for i, prefix in enumerate(prefixes) if rule.parts[0].startswith(prefix)), None)
            by_block.setdefault(block, []).append(rule)
    for block in sorted(by_block, key=lambda b: -1 if b is None else b):
        state = {}
        for rule in by_block[block]:
            tensor, scale = _read(source.files, rule.original)
            fp8 = keep_fp8 and _kept_fp8(tensor, scale, rule.parts, linear_weights)
            if fp8:
                scale = None if scale is None else scale.to(device)  # one scale shared by a fused tensor's pieces
            elif scale is not None:
                tensor = tensor.to(torch.float32) * scale
            for name, piece in split(rule, tensor, shapes).items():
                # A copy in its own allocation: tensors read from a file sit wherever the file's layout puts
                # them, and misaligned memory takes other CPU kernels (results would depend on the file).
                piece = piece.to(device=device, dtype=None if fp8 else meta[name].dtype, copy=True)
                state[name] = Fp8Weight(piece, scale, meta[name].dtype) if fp8 else piece
        model.load_state_dict(state, strict=False, assign=True)
        if block is not None and on_block is not None:
            on_block(model.get_submodule(prefixes[block].rstrip(".")))
    _rebuild_sincos_tables(model, keep, device)
    return model.eval().requires_grad_(False), spec
