"""Random-weight diffusers transformers built locally from small configs (tests, demo, benchmarks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import model_class
from xdit_core.models.flux import flux_rope_axes

PRESETS = ("tiny", "medium")

# Defaults per (family, preset). Sizes keep heads and token counts divisible by 2 and 4.
_BASE: dict[str, dict[str, dict[str, Any]]] = {
    "flux": {
        "tiny": dict(layers=2, single_layers=4, heads=4, head_dim=16, text_dim=32, pooled_dim=32),
        "medium": dict(layers=4, single_layers=8, heads=8, head_dim=64, text_dim=256, pooled_dim=128),
    },
    "sd3": {
        "tiny": dict(layers=4, heads=4, head_dim=16, text_dim=32, pooled_dim=32),
        "medium": dict(layers=8, heads=8, head_dim=64, text_dim=256, pooled_dim=128),
    },
    "pixart": {
        # PixArt-alpha's size conditioning splits the width in thirds: keep it divisible by 3.
        "tiny": dict(layers=4, heads=4, head_dim=24, text_dim=32),
        "medium": dict(layers=14, heads=8, head_dim=72, text_dim=256),
    },
}


def tiny_config(family: str, preset: str = "tiny", layers: Optional[int] = None, heads: Optional[int] = None,
                hidden_size: Optional[int] = None, variant: Optional[str] = None) -> dict[str, Any]:
    """The diffusers config (init kwargs) of a small model of `family`."""
    if family not in _BASE:
        raise XDiTConfigError(f"unknown family {family!r}; valid families: {', '.join(_BASE)}")
    if preset not in PRESETS:
        raise XDiTConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    p = dict(_BASE[family][preset])
    if layers is not None:
        p["layers"] = layers
    if heads is not None:
        p["heads"] = heads
    if hidden_size is not None:
        if hidden_size % p["heads"]:
            raise XDiTConfigError(f"--hidden-size {hidden_size} must be a multiple of --heads {p['heads']}")
        p["head_dim"] = hidden_size // p["heads"]
    heads, head_dim = p["heads"], p["head_dim"]
    if family == "flux":
        if head_dim % 4:
            raise XDiTConfigError(f"Flux head size {head_dim} must be a multiple of 4 (rotary axes)")
        axes = flux_rope_axes(head_dim)
        return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=p["layers"],
                    num_single_layers=p["single_layers"], attention_head_dim=head_dim,
                    num_attention_heads=heads, joint_attention_dim=p["text_dim"],
                    pooled_projection_dim=p["pooled_dim"], guidance_embeds=(variant or "dev") == "dev",
                    axes_dims_rope=axes)
    if family == "sd3":
        return dict(sample_size=64, patch_size=2, in_channels=16, num_layers=p["layers"],
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=p["text_dim"],
                    caption_projection_dim=heads * head_dim, pooled_projection_dim=p["pooled_dim"],
                    out_channels=16, pos_embed_max_size=96)
    if (variant or "alpha") == "alpha" and (heads * head_dim) % 3:
        raise XDiTConfigError(f"PixArt-alpha hidden size {heads * head_dim} must be a multiple of 3 "
                              "(its size conditioning takes a third each for height/width and aspect)")
    return dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                num_layers=p["layers"], cross_attention_dim=heads * head_dim, caption_channels=p["text_dim"],
                sample_size=32, patch_size=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                use_additional_conditions=(variant or "alpha") == "alpha", attention_bias=True,
                norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate")


def build_tiny(family: str, seed: int = 0, weight_std: float = 0.02, **kwargs: Any) -> torch.nn.Module:
    """A random-weight model, deterministic for `seed` (weights ~ N(0, weight_std), biases small).

    A larger `weight_std` makes tokens interact more strongly through attention (tests of PipeFusion's
    staleness use it); 0.02 is the usual transformer initialisation."""
    model = model_class(family)(**tiny_config(family, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # diffusers zero-initialises output layers (every prediction would be 0): randomise all.
            # 1-D weights are norm scales: keep them near 1 so activations stay in range.
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1:
                param.copy_(noise * 0.01 + (1.0 if name.endswith(".weight") else 0.0))
            else:
                param.copy_(noise * weight_std)
    return model.eval()


def write_tiny(family: str, out: str | Path, seed: int = 0, weight_std: float = 0.02, **kwargs: Any) -> Path:
    """Build and `save_pretrained` a random-weight model into `out`; returns the folder."""
    out = Path(out)
    build_tiny(family, seed=seed, weight_std=weight_std, **kwargs).save_pretrained(out, safe_serialization=True)
    return out
