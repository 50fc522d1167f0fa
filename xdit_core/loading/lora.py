"""LoRA files for our families: read a .safetensors LoRA in any common key layout and turn it into low-rank deltas
of the model's diffusers Linear layers.

Layouts (told apart per key by its prefix and the names it uses; suffixes lora_down/lora_up, lora_A/lora_B,
optional `.alpha`):
- diffusers / PEFT / ai-toolkit: diffusers module names, bare or under `transformer.` or `base_model.model.`;
- OneTrainer / SimpleTuner LyCORIS: the same names with `_` for `.`, under `lora_transformer_` or `lycoris_`;
- ComfyUI / BFL: the original single-file names (BFL's Flux, Stability's MMDiT, PixArt's own), bare or under
  `diffusion_model.`;
- kohya / sd-scripts: the original names with `_` for `.`, under `lora_unet_`.
An original fused tensor (q/k/v, Flux's linear1, PixArt's kv_linear, the final adaLN with its halves swapped)
shares one down-matrix among its parts; its up-matrix rows, and a full `.diff` or bias `.diff_b`, are split
by the same key_mapping Rule that splits the weight at load.

Names come from our own key_mapping rather than diffusers' private converters: they cover every family and
both namings (diffusers has converters for Flux only, which hard-code FLUX.1's widths and drop the keys they
do not know), and keys that match nothing are refused rather than skipped, since a partly applied LoRA changes
the result without a word.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.loading.key_mapping import Rule, layout_rules, split
from xdit_core.loading.model_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, open_safetensors, refuse_pickle
from xdit_core.loading.original_layout import CLASS_OF, shipped_configs
from xdit_core.models.families import FAMILIES, model_class
from xdit_core.models.lora import LoraDelta, LoraWeights

# Key endings and the role of the tensor they name. lora_B.bias is PEFT's `lora_bias` (and BFL's control
# LoRAs'): a bias term inside the scaled LoRA branch.
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_B.bias": "up_bias", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
# Adapters ComfyUI also reads that are not a low-rank product or a plain diff: refused by name.
UNSUPPORTED = {
    ".dora_scale": "DoRA", ".lora_mid.weight": "LoCon/Tucker (conv)", ".hada_": "LyCORIS LoHa",
    ".lokr_": "LyCORIS LoKr", ".oft_": "OFT/BOFT", ".a1.weight": "GLoRA", ".w_norm": "norm diffs",
    ".b_norm": "norm diffs", ".set_weight": "set weights (control LoRAs)", ".reshape_weight": "reshaped weights",
}
# Key prefixes and whether the names after them write `_` for `.`.
DOTTED_PREFIXES = ("", "transformer.", "base_model.model.", "unet.base_model.model.", "diffusion_model.")
UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
# Text encoders' keys in a combined file: the host's text-encoder LoRA handles them, the transformer ignores them.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
LAYOUT_NAMES = {
    (False, "diffusers"): "diffusers/PEFT (diffusers names)",
    (True, "diffusers"): "OneTrainer/LyCORIS (diffusers names with underscores)",
    (False, "original"): "ComfyUI/BFL (original single-file names)",
    (True, "original"): "kohya/sd-scripts (lora_unet_ + original names with underscores)",
}
SHOWN_KEYS = 3


@dataclass(frozen=True)
class _Target:
    """Where a LoRA's layer lands: the weight rule (diffusers parts of the named tensor), and the bias rule."""

    weight: Rule
    bias: Optional[Rule]
    namespace: str  # "diffusers", "original", or "both" where the two layouts share the name


def _shapes(model_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in model_shapes.items()}


def _targets(family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, _Target]:
    """Every name a LoRA may give a layer (diffusers module or original tensor stem, dotted) -> its target."""
    rules = {r.original: r for r in layout_rules(family, list(shapes), skip_unknown=True)}
    targets: dict[str, _Target] = {}
    for name in shapes:
        if name.endswith(".weight"):
            stem = name[: -len(".weight")]
            bias = f"{stem}.bias"
            targets[stem] = _Target(Rule(name, (name,)), Rule(bias, (bias,)) if bias in shapes else None, "diffusers")
    for original, rule in rules.items():
        if original.endswith(".weight"):
            stem = original[: -len(".weight")]
            if stem in targets:  # a name both layouts give the same tensor (SD3's context_embedder)
                targets[stem] = _Target(targets[stem].weight, targets[stem].bias, "both")
            else:
                targets[stem] = _Target(rule, rules.get(f"{stem}.bias"), "original")
    return targets


def _resolve(stem: str, dotted: Mapping[str, _Target],
             underscored: Mapping[str, _Target]) -> Optional[tuple[_Target, bool]]:
    """The target of a LoRA layer name and whether it was written with underscores; None if it names nothing."""
    for prefixes, table, under in ((DOTTED_PREFIXES, dotted, False), (UNDERSCORED_PREFIXES, underscored, True)):
        for prefix in prefixes:
            if stem.startswith(prefix) and stem[len(prefix):] in table:
                return table[stem[len(prefix):]], under
    return None


def _underscored(table: Mapping[str, _Target]) -> dict[str, _Target]:
    return {name.replace(".", "_"): target for name, target in table.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise XDiTModelError(f"{path} is not a .safetensors file; LoRAs are read from .safetensors only")
    if not path.is_file():
        raise XDiTModelError(f"LoRA file not found: {path}")
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _group(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """LoRA layer name -> {role: tensor}, and the text encoders' keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        kind = next((name for marker, name in UNSUPPORTED.items() if marker in key), None)
        if kind is not None:
            raise XDiTModelError(f"{path}: {kind} tensors (e.g. {key}) are not supported; supported: LoRA "
                                 "(lora_down/lora_up or lora_A/lora_B, optional alpha) and full diffs (.diff, "
                                 ".diff_b) on Linear layers")
        ending = next((e for e in ROLES if key.endswith(e)), None)
        if ending is None:
            raise XDiTModelError(f"{path}: {key} is not a LoRA tensor (none of the endings "
                                 f"{', '.join(ROLES)}); a model file or another adapter type?")
        groups.setdefault(key[: -len(ending)], {})[ROLES[ending]] = tensor
    if not groups:
        raise XDiTModelError(f"{path} holds no LoRA tensors for the diffusion model"
                             + (" (only text-encoder keys)" if ignored else ""))
    return groups, ignored


def _layout(resolved: Sequence[tuple[_Target, bool]]) -> str:
    """The layout names of resolved layers; names both layouts share tell nothing unless they are all there is."""
    telling = [(t.namespace, under) for t, under in resolved if t.namespace != "both"]
    named = telling or [("diffusers", under) for _, under in resolved]
    return " + ".join(sorted({LAYOUT_NAMES[(under, namespace)] for namespace, under in named}))


def _layout_guess(stems: Sequence[str]) -> str:
    """The layout the names look like, for keys that matched nothing."""
    under = any(s.startswith(UNDERSCORED_PREFIXES) for s in stems)
    return "kohya/OneTrainer-style underscored names" if under else "dotted names (diffusers/PEFT or ComfyUI/BFL)"


@functools.cache
def _family_tables(family: str) -> tuple[dict[str, _Target], dict[str, _Target]]:
    """The names of every shipped model of a family (built on the meta device): to tell whose LoRA a file is."""
    dotted: dict[str, _Target] = {}
    for config in shipped_configs().values():
        if config["_class_name"] == CLASS_OF[family]:
            with torch.device("meta"):
                model = model_class(family).from_config(config)
            dotted.update(_targets(family, _shapes(model.state_dict())))
    return dotted, _underscored(dotted)


def _other_model(path: Path, family: str, stems: Sequence[str]) -> str:
    """Whose LoRA a file is whose keys this model lacks: another family's (an error), or a larger model's of the
    family (a hint for the message); judged by the names of the shipped models."""
    if all(_resolve(s, *_family_tables(family)) for s in stems):
        return (f"; its names exist in the full-size {family} models: a LoRA for another {family} model (more "
                "blocks, another variant)?")
    fits = {}
    for other in FAMILIES:
        if other != family:
            found = [_resolve(s, *_family_tables(other)) for s in stems]
            if all(found):
                fits[other] = found
    if fits:  # several only where the names alone cannot tell (a few of Flux's and SD3's diffusers blocks)
        raise XDiTModelError(f"{path} is a LoRA for {' or '.join(fits)} ({_layout(next(iter(fits.values())))}), "
                             f"not for this {family} model")
    return ""


def _unknown(path: Path, family: str, stems: Sequence[str], unknown: Sequence[str],
             resolved: Sequence[tuple[_Target, bool]]) -> XDiTModelError:
    hint = _other_model(path, family, stems)
    layout = _layout(resolved) if resolved else _layout_guess(unknown)
    shown = ", ".join(unknown[:SHOWN_KEYS]) + (", ..." if len(unknown) > SHOWN_KEYS else "")
    return XDiTModelError(
        f"{path}: {len(unknown)} of the LoRA's {len(stems)} layers match no layer of this {family} model "
        f"(layout detected: {layout}): {shown}{hint}; a LoRA is applied whole or not at all (ComfyUI would skip "
        "the keys it cannot place, 'lora key not loaded', which changes the result)")


def _scale(path: Path, stem: str, parts: Mapping[str, torch.Tensor]) -> float:
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None):
        raise XDiTModelError(f"{path}: {stem} has a LoRA {'down' if up is None else 'up'}-matrix without its "
                             f"{'up' if up is None else 'down'}-matrix")
    if down is None:
        if "alpha" in parts or "up_bias" in parts:
            raise XDiTModelError(f"{path}: {stem} has an alpha or lora_B.bias but no LoRA matrices")
        return 1.0
    if down.dim() != 2 or up.dim() != 2:
        raise XDiTModelError(f"{path}: {stem} has LoRA matrices of {down.dim()}-D and {up.dim()}-D "
                             f"({list(down.shape)}, {list(up.shape)}); only Linear layers (2-D) are supported")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise XDiTModelError(f"{path}: {stem} has a down-matrix of rank {rank} ({list(down.shape)}) and an "
                             f"up-matrix of rank {up.shape[1]} ({list(up.shape)})")
    return float(parts["alpha"].item()) / rank if "alpha" in parts else 1.0


def _deltas(path: Path, stem: str, parts: Mapping[str, torch.Tensor], target: _Target,
            shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LoraDelta]:
    """The per-module deltas of one LoRA layer: fused rows split by the target's rules."""
    weight_rule = target.weight
    out_rows = sum(shapes[p][0] for p in weight_rule.parts)
    in_width = shapes[weight_rule.parts[0]][1:]
    if len(in_width) != 1:
        raise XDiTModelError(f"{path}: {stem} targets {weight_rule.parts[0]} of shape "
                             f"{list(shapes[weight_rule.parts[0]])}, not a Linear layer; LoRAs apply to Linear "
                             "layers only (not convolutions or norms)")
    scale = _scale(path, stem, parts)
    expected = {"down": (None, in_width[0]), "up": (out_rows, None), "diff": (out_rows, in_width[0]),
                "diff_b": (out_rows,), "up_bias": (out_rows,)}
    for role, dims in expected.items():
        t = parts.get(role)
        if t is not None and (t.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, t.shape))):
            raise XDiTModelError(f"{path}: {stem} ({role}) has shape {list(t.shape)}, but the model's layer "
                                 f"{weight_rule.original} is {[out_rows, in_width[0]]}: a LoRA for another model "
                                 "(size or family)")
    split_rows = {role: split(weight_rule, parts[role], shapes) for role in ("up", "diff") if role in parts}
    bias = parts.get("diff_b")
    if "up_bias" in parts:
        lora_bias = parts["up_bias"] * scale
        bias = lora_bias if bias is None else bias + lora_bias
    if bias is not None and target.bias is None:
        raise XDiTModelError(f"{path}: {stem} has a bias delta but the model's layer {weight_rule.original} has no "
                             "bias")
    split_bias = split(target.bias, bias, shapes) if bias is not None else {}
    out = {}
    for part in weight_rule.parts:
        module = part[: -len(".weight")]
        out[module] = LoraDelta(down=parts.get("down"), up=split_rows.get("up", {}).get(part), scale=scale,
                                diff=split_rows.get("diff", {}).get(part),
                                bias=split_bias.get(f"{module}.bias"))
    return out


def load_lora(path: str | Path, family: str, model_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> LoraWeights:
    """Read a LoRA file for a `family` model whose diffusers tensors have `model_shapes` (a name -> shape mapping,
    or `model.state_dict()`, meta tensors included: a rank holding part of the model converts the whole LoRA).

    Every key must land on a Linear layer of the model (text-encoder keys are set aside in `ignored`); unknown
    keys, another family's LoRA, unsupported adapter types and shapes of another model are XDiTModelError."""
    if family not in FAMILIES:
        raise XDiTConfigError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    path = Path(path)
    shapes = _shapes(model_shapes)
    groups, ignored = _group(path, _read(path))
    dotted = _targets(family, shapes)
    underscored = _underscored(dotted)
    found = {stem: _resolve(stem, dotted, underscored) for stem in groups}
    unknown = [stem for stem, hit in found.items() if hit is None]
    resolved = [hit for hit in found.values() if hit is not None]
    if unknown:
        raise _unknown(path, family, list(groups), unknown, resolved)
    modules: dict[str, LoraDelta] = {}
    for stem, (target, _) in found.items():
        for module, delta in _deltas(path, stem, groups[stem], target, shapes).items():
            if module in modules:
                raise XDiTModelError(f"{path}: two of its layers ({stem} and another) land on the model's {module}")
            modules[module] = delta
    return LoraWeights(str(path), family, _layout(resolved), modules, tuple(ignored))


_CHECKED: dict[tuple, str] = {}  # (LoRA path, mtime, size, model path) -> its layout: checked once


def check_lora(path: str | Path, model_path: str | Path, family: Optional[str] = None,
               variant: Optional[str] = None) -> str:
    """Read a LoRA file against a model's shapes (its config alone, on meta) before any rank does; returns the
    layout. A file that would fail on the ranks fails here, so the worker pool stays warm."""
    from xdit_core.loading.load import model_shapes

    p = Path(path)
    if not p.is_file():
        raise XDiTModelError(f"LoRA file not found: {p}")
    stat = p.stat()
    key = (str(p), stat.st_mtime_ns, stat.st_size, str(model_path), family, variant)
    if key not in _CHECKED:
        shapes, spec = model_shapes(model_path, family, variant)
        _CHECKED[key] = load_lora(p, spec.family, shapes).layout
    return _CHECKED[key]


__all__ = ["LoraDelta", "LoraWeights", "check_lora", "load_lora"]
