"""Single files in the original layouts: which family a file holds, and its diffusers config.

The config is matched by shape to the configs of the real models shipped in `xdit_core/loading/configs/`;
a file that matches none (a test model, a pruned variant) gets a config derived from its shapes.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from xdit_core.errors import XDiTModelError
from xdit_core.models.families import CLASS_NAMES
from xdit_core.models.flux import flux_rope_axes

CONFIG_DIR = Path(__file__).parent / "configs"
# Checkpoint prefixes of the diffusion model: ComfyUI's all-in-one checkpoints, then a bare file.
MODEL_PREFIXES = ("model.diffusion_model.", "")
# Keys (all present) that identify a family's original layout.
MARKERS = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "vector_in.in_layer.weight"),
    "sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "y_embedder.mlp.0.weight"),
    "pixart": ("blocks.0.attn.qkv.weight", "t_block.1.weight"),
}
LAYOUT_NAMES = ("Flux.1 dev/schnell (BFL: double_blocks, single_blocks)",
                "SD3/SD3.5 medium/large (Stability MMDiT: joint_blocks)",
                "PixArt-alpha/Sigma (PixArt: blocks, t_block)")
CLASS_OF = {family: class_name for class_name, family in CLASS_NAMES.items()}
FLUX_ROPE_AXES = [16, 56, 56]  # FLUX.1's rotary split of its 128-wide heads (time, rows, columns)
PIXART_HEAD_DIM = 72  # PixArt-XL: 1152 = 16 heads of 72


def detect_layout(names: Sequence[str]) -> Optional[tuple[str, str]]:
    """(family, key prefix) of a single file's diffusion model, or None for an unknown layout."""
    present = set(names)
    for prefix in MODEL_PREFIXES:
        for family, markers in MARKERS.items():
            if all(prefix + m in present for m in markers):
                return family, prefix
    return None


def unknown_layout_message(path: Path) -> str:
    """The error for a file in no known layout, listing the supported ones."""
    return (f"{path} holds no diffusion transformer in a known layout; supported single files: "
            f"{'; '.join(LAYOUT_NAMES)}, bare or under 'model.diffusion_model.' (all-in-one checkpoints); "
            "or a diffusers model folder (config.json + safetensors)")


def _count(shapes: Mapping[str, Any], block_list: str) -> int:
    pattern = re.compile(rf"^{re.escape(block_list)}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def _flux_rope_axes(head_dim: int) -> list[int]:
    if head_dim == 128:
        return list(FLUX_ROPE_AXES)
    # Other head sizes: the split the small test models use (models/flux.py).
    return list(flux_rope_axes(head_dim))


def _heads(hidden: int, head_dim: int, what: str) -> int:
    if head_dim <= 0 or hidden % head_dim:
        raise XDiTModelError(f"cannot infer attention heads: width {hidden} is not a multiple of the "
                             f"head size {head_dim} ({what})")
    return hidden // head_dim


def derive_config(family: str, shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """The diffusers config of an original-layout file from its shapes, and the keys the shapes show.

    Depth comes from the block counts and widths from tensor shapes; head counts from the q/k norm
    size where the layout has one, otherwise from the family's rule (SD3: one head per block as in
    MMDiT; PixArt: 72-wide heads as PixArt-XL, else one per block)."""
    if family == "flux":
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        out = shapes["final_layer.linear.weight"][0]
        config = dict(patch_size=1, in_channels=in_channels, out_channels=None if out == in_channels else out,
                      num_layers=_count(shapes, "double_blocks"), num_single_layers=_count(shapes, "single_blocks"),
                      attention_head_dim=head_dim, num_attention_heads=_heads(hidden, head_dim, "q/k norm"),
                      joint_attention_dim=shapes["txt_in.weight"][1],
                      pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
                      guidance_embeds="guidance_in.in_layer.weight" in shapes,
                      axes_dims_rope=_flux_rope_axes(head_dim))
        return config, set(config) - {"axes_dims_rope", "patch_size"}
    if family == "sd3":
        hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
        depth = _count(shapes, "joint_blocks")
        qk = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
        head_dim = qk[0] if qk else hidden // depth
        config = dict(sample_size=128, patch_size=patch, in_channels=in_channels, num_layers=depth,
                      attention_head_dim=head_dim,
                      num_attention_heads=_heads(hidden, head_dim, "q/k norm" if qk else "one head per block"),
                      joint_attention_dim=shapes["context_embedder.weight"][1], caption_projection_dim=hidden,
                      pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
                      out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
                      pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]),
                      dual_attention_layers=[i for i in range(depth)
                                             if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes],
                      qk_norm="rms_norm" if qk else None)
        hidden_keys = {"sample_size"} | (set() if qk else {"attention_head_dim", "num_attention_heads"})
        return config, set(config) - hidden_keys
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = _count(shapes, "blocks")
    head_dim = PIXART_HEAD_DIM if hidden % PIXART_HEAD_DIM == 0 else hidden // depth
    pos = shapes.get("pos_embed")
    config = dict(num_attention_heads=_heads(hidden, head_dim, "PixArt's head rule"), attention_head_dim=head_dim,
                  in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
                  num_layers=depth, cross_attention_dim=hidden,
                  caption_channels=shapes["y_embedder.y_proj.fc1.weight"][1],
                  sample_size=math.isqrt(pos[1]) * patch if pos else 128, patch_size=patch,
                  norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                  use_additional_conditions="csize_embedder.mlp.0.weight" in shapes, attention_bias=True,
                  norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
                  interpolation_scale=None)
    visible = {"in_channels", "out_channels", "num_layers", "cross_attention_dim", "caption_channels", "patch_size",
               "use_additional_conditions"} | ({"sample_size"} if pos else set())
    return config, visible


@functools.cache
def shipped_configs() -> dict[str, dict[str, Any]]:
    """The diffusers configs of the real models the plugin supports, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def match_config(family: str, derived: dict[str, Any], visible: set[str]) -> dict[str, Any]:
    """The shipped config agreeing with every shape-visible value, else the derived one."""
    # PixArt's resolution variants (512, 1024, 2K) differ only in their sin-cos table: match without it,
    # then take the file's sample size and diffusers' interpolation rule for it.
    compared = visible - {"sample_size"} if family == "pixart" else visible
    for config in shipped_configs().values():
        if config["_class_name"] != CLASS_OF[family]:
            continue
        if all(config.get(k) == derived[k] for k in compared):
            matched = copy.deepcopy(config)  # the shipped configs are cached: hand out a copy
            if "sample_size" in visible and derived["sample_size"] != config["sample_size"]:
                matched.update(sample_size=derived["sample_size"], interpolation_scale=None)
            return matched
    return {"_class_name": CLASS_OF[family], **derived}


def config_from_shapes(family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The diffusers config (with `_class_name`) of an original-layout file of `family`."""
    try:
        derived, visible = derive_config(family, shapes)
    except KeyError as e:
        raise XDiTModelError(f"the {family} file lacks {e.args[0]!r}, which every {family} model has") from None
    return match_config(family, derived, visible)
