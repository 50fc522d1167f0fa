"""Single files: which family a file holds, in which layout (original, or a diffusers transformer's weight
file), and its diffusers config.

The config is matched by shape to the configs of the real models shipped in `xdit_core/loading/configs/`;
a file that matches none (a test model, a pruned variant) gets a config derived from its shapes. A
diffusers-layout file takes the config beside it where there is one (`<file stem>.json`, else
`config.json`), checked against its shapes; without one it is inferred as for the same model in the
original layout.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from xdit_core.errors import XDiTModelError
from xdit_core.loading import wan_layout
from xdit_core.loading.key_mapping import diffusers_name, original_shapes
from xdit_core.loading.model_config import check_config, read_config_file
from xdit_core.models.families import CLASS_NAMES, size_conditioned
from xdit_core.models.flux import flux_rope_axes

log = logging.getLogger("xdit")
_WARNED: set[str] = set()  # files whose assumed PixArt resolution was reported

CONFIG_DIR = Path(__file__).parent / "configs"
# Checkpoint prefixes of the diffusion model: ComfyUI's all-in-one checkpoints, then a bare file.
MODEL_PREFIXES = ("model.diffusion_model.", "")
# Keys (all present) that identify a family's original layout.
MARKERS = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "vector_in.in_layer.weight"),
    "sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "y_embedder.mlp.0.weight"),
    "pixart": ("blocks.0.attn.qkv.weight", "t_block.1.weight"),
    "wan": wan_layout.ORIGINAL_MARKERS,
    # Qwen-Image's files use diffusers' names (ComfyUI's detection: txt_norm.weight); one layout serves both.
    "qwen": ("txt_norm.weight", "img_in.weight"),
    # diffusers' CHECKPOINT_KEY_NAMES: layers.0.adaLN_modulation.0 (Z-Image; Lumina 2's is .1), and the fused qkv
    "zimage": ("layers.0.adaLN_modulation.0.weight", "layers.0.attention.qkv.weight", "x_embedder.weight"),
    "flux2": ("single_stream_modulation.lin.weight", "double_blocks.0.img_attn.qkv.weight"),  # diffusers' key
    "hunyuandit": ("mlp_t5.0.weight", "blocks.0.attn1.Wqkv.weight"),  # ComfyUI's detection key: mlp_t5.0.weight
}
# Keys (all present) that identify a diffusers transformer's weight file (bare): its embedders.
DIFFUSERS_MARKERS = {
    "flux": ("x_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "sd3": ("pos_embed.proj.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "pixart": ("pos_embed.proj.weight", "adaln_single.linear.weight"),
    "wan": wan_layout.DIFFUSERS_MARKERS,
    "qwen": ("txt_norm.weight", "img_in.weight"),
    "zimage": ("layers.0.adaLN_modulation.0.weight", "all_x_embedder.2-1.weight"),
    "flux2": ("single_stream_modulation.linear.weight", "x_embedder.weight"),
    "hunyuandit": ("text_embedder.linear_1.weight", "time_extra_emb.pooler.positional_embedding"),
}
LAYOUT_NAMES = ("Flux.1 dev/schnell (BFL: double_blocks, single_blocks)",
                "SD3/SD3.5 medium/large (Stability MMDiT: joint_blocks)",
                "PixArt-alpha/Sigma (PixArt: blocks, t_block)",
                "Wan 2.1/2.2 (Wan-AI's and Comfy-Org's repackaged files: blocks, head.modulation)",
                "Qwen-Image and Qwen-Image-Edit (Qwen's and Comfy-Org's files: img_in, txt_norm, transformer_blocks)",
                "Z-Image(-Turbo) (Tongyi-MAI's and Comfy-Org's files: layers, noise_refiner, cap_embedder)",
                "FLUX.2 dev/klein (BFL's and Comfy-Org's files: double_blocks, single_stream_modulation)",
                "HunyuanDiT v1.0-1.2 (Tencent's and ComfyUI's files: blocks.N.attn1.Wqkv, mlp_t5, pooler)")
CLASS_OF = {family: class_name for class_name, family in CLASS_NAMES.items()}
FLUX_ROPE_AXES = [16, 56, 56]  # FLUX.1's rotary split of its 128-wide heads (time, rows, columns)
PIXART_HEAD_DIM = 72  # PixArt-XL: 1152 = 16 heads of 72
QWEN_PATCH = 2  # Qwen-Image's 2x2 patches (ComfyUI's model assumes them too): 16 latent channels in 64
# The empty tensor by which ComfyUI marks a Qwen-Image-Edit 2511 file (its model's default_ref_method
# "index_timestep_zero"): the reference tokens run at timestep 0, diffusers' zero_cond_t.
QWEN_ZERO_COND_MARKER = "__index_timestep_zero__"
ZIMAGE_PATCH = 2  # Z-Image's 2x2 patches of one frame (diffusers' "2-1" embedder)
ZIMAGE_AXES_LENS = (1536, 512, 512)  # Z-Image-Turbo's config.json (rotary table lengths: caption + frames, rows, columns)
HUNYUAN_G_MLP_RATIO = 4.3637  # HunyuanDiT's DiT-g/2 (1408 wide, 40 blocks): ComfyUI's detection, diffusers' config
# Config values diffusers takes when a config does not state them, where a shipped config may leave them out.
CONFIG_DEFAULTS = {"zero_cond_t": False}


def detect_layout(names: Sequence[str]) -> Optional[tuple[str, str]]:
    """(family, key prefix) of a single file's diffusion model, or None for an unknown layout."""
    present = set(names)
    for prefix in MODEL_PREFIXES:
        for family, markers in MARKERS.items():
            if all(prefix + m in present for m in markers):
                return family, prefix
    return None


def detect_diffusers_family(names: Sequence[str]) -> Optional[str]:
    """The family of a diffusers transformer's weight file (diffusers tensor names), or None."""
    present = set(names)
    return next((family for family, markers in DIFFUSERS_MARKERS.items() if all(m in present for m in markers)),
                None)


def unknown_layout_message(path: Path) -> str:
    """The error for a file in no known layout, listing the supported ones."""
    return (f"{path} holds no diffusion transformer in a known layout; supported single files: "
            f"{'; '.join(LAYOUT_NAMES)}, bare or under 'model.diffusion_model.' (all-in-one checkpoints); "
            "a diffusers transformer's weight file (Flux, SD3, PixArt, Wan, Qwen-Image, Z-Image, FLUX.2, HunyuanDiT), "
            "its config.json beside it "
            "or not; "
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
    MMDiT; PixArt: 72-wide heads as PixArt-XL, else one per block; Wan: 128-wide as ComfyUI's)."""
    if family == "wan":
        names = wan_layout.diffusers_names(list(shapes))
        return wan_layout.derive_config({names[k]: v for k, v in shapes.items()})
    if family in _DERIVE:
        return _DERIVE[family](shapes)
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


def _derive_qwen(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """Qwen-Image's config from its (diffusers-named) shapes: heads from the q norm (128 wide in every real model),
    2x2 patches as ComfyUI assumes, Edit 2511's timestep-0 references from ComfyUI's marker (the weights are
    Qwen-Image's: a 2511 file without the marker reads as 2509)."""
    if "time_text_embed.addition_t_embedding.weight" in shapes:
        raise XDiTModelError("this is a Qwen-Image-Layered model (time_text_embed.addition_t_embedding: layer "
                             "timesteps), which the engine does not run; Qwen-Image and Qwen-Image-Edit 2509/2511 are "
                             "supported")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    config = dict(patch_size=QWEN_PATCH, in_channels=in_channels,
                  out_channels=shapes["proj_out.weight"][0] // (QWEN_PATCH * QWEN_PATCH),
                  num_layers=_count(shapes, "transformer_blocks"), attention_head_dim=head_dim,
                  num_attention_heads=_heads(hidden, head_dim, "q/k norm"),
                  joint_attention_dim=shapes["txt_in.weight"][1], guidance_embeds=False,
                  axes_dims_rope=_flux_rope_axes(head_dim), zero_cond_t=QWEN_ZERO_COND_MARKER in shapes)
    return config, set(config) - {"patch_size", "guidance_embeds", "axes_dims_rope"}


def _derive_zimage(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """Z-Image's config from its original shapes: heads from the q norm, 2x2 patches of one frame (every Z-Image
    release, and diffusers' converter's "2-1" key); the rotary split, its table lengths, theta and the timestep scale
    as Z-Image-Turbo's (not visible in weights; the split for other head sizes as the test models')."""
    if "siglip_embedder.1.weight" in shapes:
        raise XDiTModelError("this is a Z-Image-Omni model (siglip_embedder: image conditioning), which the engine "
                             "does not run; Z-Image and Z-Image-Turbo are supported")
    dim, patch_in = shapes["x_embedder.weight"]
    head_dim = shapes["layers.0.attention.q_norm.weight"][0] if "layers.0.attention.q_norm.weight" in shapes else 128
    heads = _heads(dim, head_dim, "q/k norm")
    qkv = shapes["layers.0.attention.qkv.weight"][0] // head_dim
    config = dict(all_patch_size=[ZIMAGE_PATCH], all_f_patch_size=[1], in_channels=patch_in // ZIMAGE_PATCH ** 2,
                  dim=dim, n_layers=_count(shapes, "layers"), n_refiner_layers=_count(shapes, "noise_refiner"),
                  n_heads=heads, n_kv_heads=(qkv - heads) // 2, norm_eps=1e-5,
                  qk_norm="layers.0.attention.q_norm.weight" in shapes, cap_feat_dim=shapes["cap_embedder.0.weight"][0],
                  rope_theta=256.0, t_scale=1000.0, axes_dims=list(flux_rope_axes(head_dim)),
                  axes_lens=list(ZIMAGE_AXES_LENS))
    visible = {"in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "qk_norm",
               "cap_feat_dim"}
    return config, visible


def _derive_flux2(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """FLUX.2's config from BFL's shapes: heads from the q norm, one latent pixel per token (the VAE's 2x2 patches
    are packed into its 128 channels before the transformer), rotary axes a quarter of the head each, theta and
    eps as diffusers' (not visible in weights). dev has a guidance embedder, klein none."""
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    out = shapes["final_layer.linear.weight"][0]
    mlp_in = shapes["double_blocks.0.img_mlp.0.weight"][0]  # SwiGLU: gate and value, 2 x mlp_ratio x inner
    config = dict(patch_size=1, in_channels=in_channels, out_channels=None if out == in_channels else out,
                  num_layers=_count(shapes, "double_blocks"), num_single_layers=_count(shapes, "single_blocks"),
                  attention_head_dim=head_dim, num_attention_heads=_heads(inner, head_dim, "q/k norm"),
                  joint_attention_dim=shapes["txt_in.weight"][1],
                  timestep_guidance_channels=shapes["time_in.in_layer.weight"][1],
                  mlp_ratio=mlp_in / (2 * inner), axes_dims_rope=[head_dim // 4] * 4, rope_theta=2000, eps=1e-6,
                  guidance_embeds="guidance_in.in_layer.weight" in shapes)
    return config, set(config) - {"patch_size", "axes_dims_rope", "rope_theta", "eps"}


def _mlp_ratio(width: int, hidden: int) -> float:
    """The ratio diffusers' HunyuanDiT turns back into `hidden` (int(width * ratio)): ComfyUI's DiT-g/2 value (4.3637)
    or 4 where they fit, else the exact ratio (nudged up where float rounding would truncate it to hidden - 1)."""
    for ratio in (4.0, HUNYUAN_G_MLP_RATIO, hidden / width, (hidden + 0.5) / width):
        if int(width * ratio) == hidden:
            return ratio
    raise XDiTModelError(f"no mlp_ratio gives a {hidden}-wide MLP for width {width}")


def _derive_hunyuandit(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Any], set[str]]:
    """HunyuanDiT's config from Tencent's shapes: heads from the q norm (88 wide in DiT-g/2), the MLP's ratio from its
    width (ComfyUI's detection: 4.3637 for DiT-g/2), the text widths and lengths from mlp_t5, the pooler and the
    padding embedding, size and style conditioning (v1.0/1.1) from the style embedder. sample_size is unused by the
    model (no position table: HunyuanDiT's positions are rotary)."""
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    head_dim = shapes["blocks.0.attn1.q_norm.weight"][0]
    text_len_t5 = shapes["pooler.positional_embedding"][0] - 1
    out = shapes["final_layer.linear.weight"][0] // (patch * patch)
    config = dict(num_attention_heads=_heads(hidden, head_dim, "q/k norm"), attention_head_dim=head_dim,
                  in_channels=in_channels, patch_size=patch, activation_fn="gelu-approximate", sample_size=128,
                  hidden_size=hidden, num_layers=_count(shapes, "blocks"),
                  mlp_ratio=_mlp_ratio(hidden, shapes["blocks.0.mlp.fc1.weight"][0]), learn_sigma=out == 2 * in_channels,
                  cross_attention_dim=shapes["mlp_t5.2.weight"][0], norm_type="layer_norm",
                  cross_attention_dim_t5=shapes["mlp_t5.0.weight"][1],
                  pooled_projection_dim=shapes["pooler.c_proj.weight"][0],
                  text_len=shapes["text_embedding_padding"][0] - text_len_t5, text_len_t5=text_len_t5,
                  use_style_cond_and_image_meta_size="style_embedder.weight" in shapes)
    return config, set(config) - {"activation_fn", "sample_size", "norm_type"}


_DERIVE = {"qwen": _derive_qwen, "zimage": _derive_zimage, "flux2": _derive_flux2, "hunyuandit": _derive_hunyuandit}


@functools.cache
def shipped_configs() -> dict[str, dict[str, Any]]:
    """The diffusers configs of the real models the plugin supports, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def match_config(family: str, derived: dict[str, Any], visible: set[str]) -> dict[str, Any]:
    """The shipped config agreeing with every shape-visible value, else the derived one. Where several agree (Qwen-Image
    and Qwen-Image-Edit 2509 share one transformer), the base model's, the shortest name, is taken."""
    # PixArt's resolution variants (512, 1024, 2K) differ only in their sin-cos table: match without it,
    # then take the file's sample size and diffusers' interpolation rule for it.
    compared = visible - {"sample_size"} if family == "pixart" else visible
    for _, config in sorted(shipped_configs().items(), key=lambda item: (len(item[0]), item[0])):
        if config["_class_name"] != CLASS_OF[family]:
            continue
        if all(config.get(k, CONFIG_DEFAULTS.get(k)) == derived[k] for k in compared):
            matched = copy.deepcopy(config)  # the shipped configs are cached: hand out a copy
            if "sample_size" in visible and derived["sample_size"] != config["sample_size"]:
                matched.update(sample_size=derived["sample_size"], interpolation_scale=None)
            return matched
    return {"_class_name": CLASS_OF[family], **derived}


def _derive(family: str, shapes: Mapping[str, Sequence[int]], file: str,
            name_in_file: Callable[[str], str] = str) -> tuple[dict[str, Any], set[str]]:
    try:
        return derive_config(family, shapes)
    except KeyError as e:
        raise XDiTModelError(f"{file} lacks {name_in_file(e.args[0])!r}, which every {family} model has") from None


def config_from_shapes(family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The diffusers config (with `_class_name`) of an original-layout file of `family`."""
    return match_config(family, *_derive(family, shapes, f"the {family} file"))


def config_beside(path: Path) -> Optional[Path]:
    """The config of a diffusers-layout file: `<stem>.json` beside it (one model among others in a folder),
    else the folder's `config.json`; None without either."""
    return next((p for p in (path.with_suffix(".json"), path.parent / "config.json") if p.is_file()), None)


def _as_built(config: Mapping[str, Any], key: str) -> Any:
    """A config value as diffusers builds the model (out_channels null is in_channels, and so on)."""
    value = config.get(key)
    if key == "out_channels" and value is None:
        return config.get("in_channels")
    if key == "pos_embed_max_size" and value is None:  # SD3 without it: a table of the sample size
        return config.get("sample_size", 128) // config.get("patch_size", 2)
    if key == "use_additional_conditions":
        return size_conditioned(config)
    if key == "qk_norm":  # rms or layer norm: the weights show only that there is one (Z-Image's is a boolean)
        return value if isinstance(value, bool) else value is not None
    if value is None:
        return CONFIG_DEFAULTS.get(key)
    return value


def diffusers_file_config(path: Path, family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The checked diffusers config of a diffusers-layout single file of `family` (tensor shapes by name).

    With a config beside it (`config_beside`), that config, which must fit the shapes. Without one, inferred
    as for the same model in the original layout (our mapping gives its shapes), so both layouts infer alike:
    depth, widths, Flux dev/schnell (guidance embedder), PixArt's size conditioning (alpha-1024 vs Sigma),
    SD3.5's q/k norm and dual attention show in the shapes, and so do the heads where a q/k norm has the
    head size (Flux, SD3.5). Otherwise heads are assumed by the family's rule (SD3: one per block, 64 wide
    in every real model as MMDiT makes them; PixArt: 72 wide as PixArt-XL, else one per block). PixArt's
    sample size shows only in its sin-cos table, which diffusers does not save: 128 (the 1024 models) is
    assumed, and other sizes (512, 2K) need their config beside the file."""
    if family in ("wan", "qwen"):  # derived from the diffusers names directly
        derive = wan_layout.derive_config if family == "wan" else _derive_qwen
        try:
            derived, visible = derive(shapes)
        except KeyError as e:
            raise XDiTModelError(f"{path} lacks {e.args[0]!r}, which every {family} model has") from None
    else:
        derived, visible = _derive(family, original_shapes(family, shapes), str(path),
                                   lambda k: diffusers_name(family, k))
    if family == "qwen" and QWEN_ZERO_COND_MARKER not in shapes:  # diffusers' files have no marker: the config says
        visible = visible - {"zero_cond_t"}
    beside = config_beside(path)
    if beside is None:
        config = match_config(family, derived, visible)
        check_config(config, f"{path} (config inferred from its tensor shapes)")
        if family == "pixart" and str(path) not in _WARNED:  # the one guess that changes results: say it, once
            _WARNED.add(str(path))
            log.warning("xDiT: %s has no config beside it; PixArt's resolution does not show in its weights, "
                        "so the 1024 models' sample size is assumed: for a 512 or 2K model put its config.json "
                        "beside it (or name it %s.json)", path, path.stem)
        return config
    config = read_config_file(beside)
    check_config(config, str(beside))
    if config["_class_name"] != CLASS_OF[family]:
        raise XDiTModelError(f"{beside} names {config['_class_name']} but {path} holds a {CLASS_OF[family]} "
                             f"(diffusers layout); a weight file's config is read from {path.stem}.json beside it, "
                             "else from config.json")
    wrong = [f"{k} is {json.dumps(_as_built(config, k))} in the config, {json.dumps(_as_built(derived, k))} in "
             "the weights" for k in sorted(visible) if k in config and _as_built(config, k) != _as_built(derived, k)]
    if family != "zimage":  # Z-Image states its width (dim) and heads, compared above
        width = config["num_attention_heads"] * config["attention_head_dim"]
        shown = derived["num_attention_heads"] * derived["attention_head_dim"]
        if width != shown:
            wrong.append(f"the width (num_attention_heads × attention_head_dim) is {width} in the config, {shown} in "
                         "the weights")
    if wrong:
        raise XDiTModelError(f"{beside} does not fit the weights of {path}: {'; '.join(wrong)}")
    return config
