"""Wan single files: the original layout's names through diffusers' own converter, and a config from shapes.

Wan-AI's checkpoints and Comfy-Org's repackaged files (what ComfyUI's templates load) keep the original
names; diffusers' `convert_wan_transformer_to_diffusers` only renames them, so it runs here on the names
alone (no tensor is read) and its answer is what the loader follows.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from xdit_core.errors import XDiTModelError

ORIGINAL_MARKERS = ("head.modulation", "blocks.0.self_attn.q.weight")
DIFFUSERS_MARKERS = ("condition_embedder.time_proj.weight", "patch_embedding.weight")
# ComfyUI derives Wan's heads as width // 128 (every Wan model has 128-wide heads); the q/k norms span all
# heads, so the weights do not show them.
HEAD_DIM = 128


def diffusers_names(original: Sequence[str]) -> dict[str, str]:
    """{original name: diffusers name} as diffusers' single-file converter renames a Wan checkpoint."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({name: name for name in original})
    return {name: new for new, name in converted.items()}


def _count(shapes: Mapping[str, Any], block_list: str) -> int:
    pattern = re.compile(rf"^{re.escape(block_list)}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in shapes if (m := pattern.match(k))), default=-1)


def derive_config(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """The diffusers config of a Wan model from its diffusers tensor shapes, and the keys the shapes show."""
    hidden, in_channels, *patch = shapes["patch_embedding.weight"]
    if hidden % HEAD_DIM:
        raise XDiTModelError(f"cannot infer attention heads: width {hidden} is not a multiple of Wan's head size "
                             f"{HEAD_DIM}; put the model's config.json beside the file")
    image = shapes.get("condition_embedder.image_embedder.norm1.weight")
    config = dict(patch_size=list(patch), num_attention_heads=hidden // HEAD_DIM, attention_head_dim=HEAD_DIM,
                  in_channels=in_channels, out_channels=shapes["proj_out.weight"][0] // math.prod(patch),
                  text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
                  freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
                  ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=_count(shapes, "blocks"),
                  cross_attn_norm="blocks.0.norm2.weight" in shapes,
                  qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in shapes else None,
                  eps=1e-6, image_dim=image[0] if image else None,
                  added_kv_proj_dim=hidden if "blocks.0.attn2.add_k_proj.weight" in shapes else None,
                  rope_max_seq_len=1024)
    return config, set(config) - {"num_attention_heads", "attention_head_dim", "eps", "rope_max_seq_len"}
