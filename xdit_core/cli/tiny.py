"""Random-weight diffusers transformers built locally from small configs (tests, demo, benchmarks)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import VARIANTS, model_class
from xdit_core.models.flux import flux_rope_axes
from xdit_core.runtime.limits import physical_memory

PRESETS = ("tiny", "medium")
# The largest model built: its fp32 weights are held about twice while written (the model and safetensors'
# buffer), so they may take a third of this machine's memory, and never more than this.
MAX_WEIGHT_BYTES = 16 * 2**30

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
    "wan": {
        # Real Wan heads are 128 wide with rotary axes of 44/42/42; these keep every axis even and non-empty.
        "tiny": dict(layers=2, heads=4, head_dim=24, text_dim=32, ffn_dim=128, image_dim=32),
        "medium": dict(layers=8, heads=8, head_dim=64, text_dim=256, ffn_dim=1024, image_dim=128),
    },
    "hunyuandit": {  # HunyuanDiT v1.2: 40 blocks of 16 heads x 88, CLIP-BERT 1024 + mT5 2048 text states
        "tiny": dict(layers=6, heads=4, head_dim=16, text_dim=32, text2_dim=48),
        "medium": dict(layers=12, heads=8, head_dim=64, text_dim=256, text2_dim=256),
    },
    "flux2": {  # FLUX.2 dev: 8 double + 48 single blocks of 48 heads x 128 over 15360-wide text states
        "tiny": dict(layers=1, single_layers=2, heads=4, head_dim=16, text_dim=32),
        "medium": dict(layers=4, single_layers=8, heads=8, head_dim=64, text_dim=256),
    },
    "zimage": {  # Z-Image: 30 heads x 128 (only Ulysses degrees dividing 30); 6 keeps 2 and 3
        "tiny": dict(layers=2, refiner_layers=1, heads=6, head_dim=16, text_dim=32),
        "medium": dict(layers=12, refiner_layers=2, heads=6, head_dim=64, text_dim=256),
    },
    "qwen": {  # Qwen-Image: 60 blocks of 24 heads x 128 over 3584-wide Qwen2.5-VL states
        "tiny": dict(layers=2, heads=4, head_dim=16, text_dim=32),
        "medium": dict(layers=12, heads=8, head_dim=64, text_dim=256),
    },
}


def tiny_config(family: str, preset: str = "tiny", layers: Optional[int] = None, heads: Optional[int] = None,
                hidden_size: Optional[int] = None, variant: Optional[str] = None,
                clip_vision: bool = True) -> dict[str, Any]:
    """The diffusers config (init kwargs) of a small model of `family`; XDiTConfigError for a variant or size
    that would make a model the engine cannot run. `clip_vision`: a Wan I2V model with Wan 2.1's CLIP image
    embedder (False: a Wan 2.2 A14B I2V expert's layout)."""
    if family not in _BASE:
        raise XDiTConfigError(f"unknown family {family!r}; valid families: {', '.join(_BASE)}")
    if preset not in PRESETS:
        raise XDiTConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if variant is not None and variant not in VARIANTS[family]:
        raise XDiTConfigError(f"--variant {variant!r} is not a {family} variant; valid: {', '.join(VARIANTS[family])}")
    for flag, value in (("--layers", layers), ("--heads", heads), ("--hidden-size", hidden_size)):
        if value is not None and value < 1:
            raise XDiTConfigError(f"{flag} must be at least 1, got {value}")
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
        # flux_rope_axes gives the time axis head_dim // 4 rounded down to even: below 8 it would be empty.
        if head_dim % 4 or head_dim < 8:
            raise XDiTConfigError(f"Flux head size {head_dim} (hidden size / heads) must be a multiple of 4 and at "
                                  "least 8, for its three rotary axes (time, row, column)")
        axes = flux_rope_axes(head_dim)
        return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=p["layers"],
                    num_single_layers=p["single_layers"], attention_head_dim=head_dim,
                    num_attention_heads=heads, joint_attention_dim=p["text_dim"],
                    pooled_projection_dim=p["pooled_dim"], guidance_embeds=(variant or "dev") == "dev",
                    axes_dims_rope=axes)
    if family == "wan":
        # Wan's rotary table gives rows and columns 2 * (head_dim // 6) each and frames the rest.
        if head_dim % 2 or head_dim < 12:
            raise XDiTConfigError(f"Wan head size {head_dim} (hidden size / heads) must be even and at least 12, for "
                                  "its three rotary axes (frames, rows, columns)")
        variant = variant or "t2v"
        channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[variant]
        clip = variant == "i2v" and clip_vision
        return dict(patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=head_dim,
                    in_channels=channels[0], out_channels=channels[1], text_dim=p["text_dim"], freq_dim=32,
                    ffn_dim=p["ffn_dim"], num_layers=p["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                    eps=1e-6, image_dim=p["image_dim"] if clip else None,
                    added_kv_proj_dim=heads * head_dim if clip else None, rope_max_seq_len=1024)
    if family == "hunyuandit":
        if head_dim % 4 or p["layers"] % 2:
            raise XDiTConfigError(f"HunyuanDiT needs a head size divisible by 4 (its 2-D rotary halves) and an even "
                                  f"number of layers (its skips pair them), got {head_dim} and {p['layers']}")
        return dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, patch_size=2,
                    hidden_size=heads * head_dim, num_layers=p["layers"], mlp_ratio=4.0, learn_sigma=True,
                    cross_attention_dim=p["text_dim"], cross_attention_dim_t5=p["text2_dim"],
                    pooled_projection_dim=p["text_dim"], text_len=77, text_len_t5=256, sample_size=32,
                    use_style_cond_and_image_meta_size=(variant or "v1.2") == "v1.1")
    if family == "flux2":
        if head_dim % 8:
            raise XDiTConfigError(f"FLUX.2 head size {head_dim} must be a multiple of 8, for its four rotary axes")
        return dict(patch_size=1, in_channels=128, num_layers=p["layers"], num_single_layers=p["single_layers"],
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=p["text_dim"],
                    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[head_dim // 4] * 4,
                    rope_theta=2000, guidance_embeds=(variant or "dev") == "dev")
    if family == "zimage":
        axes = list(flux_rope_axes(head_dim))
        return dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=heads * head_dim,
                    n_layers=p["layers"], n_refiner_layers=p["refiner_layers"], n_heads=heads, n_kv_heads=heads,
                    cap_feat_dim=p["text_dim"], axes_dims=axes, axes_lens=[256, 64, 64])
    if family == "qwen":
        axes = flux_rope_axes(head_dim)
        return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=p["layers"], attention_head_dim=head_dim,
                    num_attention_heads=heads, joint_attention_dim=p["text_dim"], axes_dims_rope=axes,
                    zero_cond_t=variant == "edit_2511")
    if (heads * head_dim) % 4:
        raise XDiTConfigError(f"{family} hidden size {heads * head_dim} must be a multiple of 4 (its 2-D sin-cos "
                              "position embedding gives each axis half, as sin and cos)")
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


def param_count(family: str, config: dict[str, Any]) -> int:
    """The parameters of the model `config` describes, counted on the meta device (nothing allocated). The
    count is linear in each block count, so models of one and two blocks give it without building many."""
    blocks = [k for k in ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers") if k in config]

    def count(**sizes: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in model_class(family)(**{**config, **sizes}).parameters())

    ones = {k: 1 for k in blocks}
    base = count(**ones)
    return base + sum((config[k] - 1) * (count(**{**ones, k: 2}) - base) for k in blocks)


def check_fits(family: str, config: dict[str, Any]) -> None:
    """Raise XDiTConfigError if the model's fp32 weights exceed what `tiny` builds (see MAX_WEIGHT_BYTES)."""
    ram = physical_memory()
    limit = MAX_WEIGHT_BYTES if ram is None else min(MAX_WEIGHT_BYTES, ram // 3)
    n = param_count(family, config)
    if 4 * n > limit:
        raise XDiTConfigError(
            f"these sizes make a {family} model of {n:,} parameters, {_size(4 * n)} in fp32; tiny builds at most "
            f"{_size(limit)} here (a third of the RAM, at most {_size(MAX_WEIGHT_BYTES)}): lower --layers, --heads "
            "or --hidden-size")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def build_tiny(family: str, seed: int = 0, weight_std: float = 0.02, **kwargs: Any) -> torch.nn.Module:
    """A random-weight model, deterministic for `seed` (weights ~ N(0, weight_std), biases small).

    A larger `weight_std` makes tokens interact more strongly through attention (tests of PipeFusion's
    staleness use it); 0.02 is the usual transformer initialisation. Sizes are checked before building."""
    config = tiny_config(family, **kwargs)
    check_fits(family, config)
    return randomize(model_class(family)(**config), seed, weight_std)


def randomize(model: torch.nn.Module, seed: int, weight_std: float = 0.02) -> torch.nn.Module:
    """Every parameter of `model` drawn from a generator seeded with `seed` (see build_tiny); returns it in eval."""
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


def _is_model_folder(folder: Path) -> bool:
    """Holds only what save_pretrained writes (config.json, safetensors weights and their index)."""
    return all(p.is_file() and (p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")))
               for p in folder.iterdir())


def check_out(out: Path, force: bool) -> None:
    """`out` must be new or an empty folder; with `force`, a model folder to refresh (nothing else in it); a
    file never (tiny writes a folder, and a file there is someone's data)."""
    if os.path.lexists(out) and not out.is_dir():
        raise XDiTConfigError(f"--out {out} is a file, not a folder; tiny writes a model folder and never replaces a "
                              "file, even with --force: pick another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise XDiTConfigError(f"--out {out} is a folder that is not empty; tiny would replace all of it: pass "
                                  "--force to do so, or pick a new or empty folder")
        if not _is_model_folder(out):
            raise XDiTConfigError(f"--out {out} holds more than a model (config.json and .safetensors files); "
                                  "--force replaces only a model folder: pick a new or empty folder")


def write_tiny(family: str, out: str | Path, seed: int = 0, weight_std: float = 0.02, force: bool = False,
               **kwargs: Any) -> Path:
    """Build a random-weight model and `save_pretrained` it as the folder `out` (see check_out); returns it.

    It is written into a hidden sibling folder first and renamed into place, so a failure leaves `out` as it
    was; an existing `out` is set aside until the new one is in place."""
    out = Path(out)
    check_out(out, force)
    model = build_tiny(family, seed=seed, weight_std=weight_std, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()  # not mkdtemp: the model folder keeps the umask's permissions, mkdtemp's are owner-only
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`. An existing `out` (an empty folder, or any with --force) is renamed aside first,
    since a folder cannot be renamed onto a non-empty one (nor onto any on Windows), and put back on failure."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = tmp.with_suffix(".old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_symlink():  # --out was a link to a folder: drop the link, not what it points to
        old.unlink()
    else:
        shutil.rmtree(old)
