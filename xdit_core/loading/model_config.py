"""Diffusers model configs: read from a JSON file, and checked that they can describe a model at all.

The checks look at the config alone (no weights read, no diffusers import), so describing a model stays
header-only; whether the weights fit the config is checked when they load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdit_core.errors import XDiTModelError
from xdit_core.models.families import family_of_class, size_conditioned

# Keys a config must state: the engine reads them (text widths), or they set the model's depth and width,
# where diffusers' defaults would quietly build another model than the file's.
REQUIRED = {
    "flux": ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
             "pooled_projection_dim"),
    "sd3": ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
            "caption_projection_dim", "pooled_projection_dim"),
    "pixart": ("num_layers", "num_attention_heads", "attention_head_dim", "caption_channels"),
    "wan": ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "ffn_dim", "text_dim"),
    "qwen": ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim"),
    "zimage": ("n_layers", "n_refiner_layers", "dim", "n_heads", "cap_feat_dim"),
    "flux2": ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim"),
    "hunyuandit": ("num_layers", "num_attention_heads", "attention_head_dim", "hidden_size", "cross_attention_dim",
                   "cross_attention_dim_t5"),
}
# Counts and sizes, each a positive integer where a config states it (null: diffusers derives it).
SIZES = ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers", "dim", "n_heads", "cap_feat_dim", "hidden_size", "cross_attention_dim_t5", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
         "pooled_projection_dim", "caption_projection_dim", "caption_channels", "cross_attention_dim",
         "in_channels", "out_channels", "patch_size", "sample_size", "pos_embed_max_size", "ffn_dim", "text_dim",
         "image_dim", "added_kv_proj_dim")
# Some 80 times FLUX.1 (12e9): no real model comes near, and a config beyond it is a typo, refused before
# anything is built. Every block of the three families holds at least 12 width² weights (attention 4,
# MLP 8; Flux's and SD3's joint blocks about 36, PixArt's 16); with the embedders' inputs and the position
# table (side² × width, built with the model) the estimate below stays under a model's real size.
MAX_PARAMETERS = 10**12
BLOCK_WEIGHTS_PER_WIDTH_SQUARED = 12
FLUX_DEFAULT_ROPE = [16, 56, 56]  # diffusers' default axes_dims_rope


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config.json as a dict (not yet checked); a file that is not a JSON object is a one-line error."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XDiTModelError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:  # no permission, say
        raise XDiTModelError(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise XDiTModelError(f"{path} is a JSON {_json_kind(config)}, not an object; a diffusers config is an object "
                             "such as {\"_class_name\": \"FluxTransformer2DModel\", \"num_layers\": 19, ...}")
    # PixArt-alpha's diffusers folders predate the PixArt class and name the generic one.
    if config.get("_class_name") == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        config = {**config, "_class_name": "PixArtTransformer2DModel"}
    return config


def check_config(config: dict[str, Any], where: str) -> None:
    """Pass a config that can describe a model; otherwise a one-line XDiTModelError that starts with `where`
    (the file, or how the config was made) and names the value, why and what would be valid."""
    try:
        family = family_of_class(config.get("_class_name"))
    except XDiTModelError as e:
        raise XDiTModelError(f"{where}: {e}") from None
    missing = [k for k in REQUIRED[family] if config.get(k) is None]
    if missing:
        raise XDiTModelError(f"{where} lacks {', '.join(missing)}, which a {config['_class_name']} config must state "
                             "(diffusers' defaults would build another model)")
    for key in SIZES:
        value = config.get(key)
        if key == "patch_size" and family == "wan":  # (frames, rows, columns)
            if value is not None and not (isinstance(value, list) and len(value) == 3 and
                                          all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise XDiTModelError(f"{where}: patch_size is {json.dumps(value)}; Wan's is three positive integers "
                                     "(frames, rows, columns), [1, 2, 2] in every released model")
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise XDiTModelError(f"{where}: {key} is {json.dumps(value)}; it must be a positive integer")
    if family == "zimage":  # Z-Image names its sizes differently
        heads, width = config["n_heads"], config["dim"]
        if width % heads or config.get("n_kv_heads", heads) != heads:
            raise XDiTModelError(f"{where}: dim {width} over n_heads {heads} (n_kv_heads "
                                 f"{config.get('n_kv_heads', heads)}): the engine needs equal query and key heads "
                                 "dividing the width, as every Z-Image release has (3840 / 30)")
        head_dim = width // heads
    else:
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    width = heads * head_dim
    # The text tokens enter the blocks at the transformer's width: a projection to another width fails there.
    projection = {"sd3": "caption_projection_dim", "pixart": "cross_attention_dim"}.get(family)
    if projection and config.get(projection) not in (None, width):
        raise XDiTModelError(f"{where}: {projection} is {config[projection]} but the transformer is "
                             f"num_attention_heads × attention_head_dim = {heads} × {head_dim} = {width} wide; "
                             "they must be equal")
    if family in ("flux", "qwen"):
        axes = config.get("axes_dims_rope", FLUX_DEFAULT_ROPE)
        if not (isinstance(axes, list) and len(axes) == 3 and all(isinstance(a, int) and a > 0 and a % 2 == 0
                                                                  for a in axes) and sum(axes) == head_dim):
            raise XDiTModelError(f"{where}: axes_dims_rope {json.dumps(axes)} must be three positive even sizes "
                                 f"summing to attention_head_dim {head_dim} ([16, 56, 56] for 128)")
    if family == "pixart" and size_conditioned(config) and width % 3:
        raise XDiTModelError(f"{where}: the width {width} (num_attention_heads × attention_head_dim) is not a "
                             "multiple of 3, which PixArt's size conditioning (use_additional_conditions) needs: "
                             "it gives height, width and aspect ratio a third each")
    blocks = (config.get("num_layers") or config.get("n_layers") or 0) + (config.get("num_single_layers") or 0)
    inputs = sum(config.get(k) or 0 for k in ("in_channels", "joint_attention_dim", "pooled_projection_dim",
                                               "caption_channels", "text_dim"))
    patch = 2 if family == "wan" else config.get("patch_size") or 2
    side = config.get("pos_embed_max_size") or (config.get("sample_size") or 0) // patch
    at_least = BLOCK_WEIGHTS_PER_WIDTH_SQUARED * width ** 2 * blocks + width * (inputs + side ** 2)
    if at_least > MAX_PARAMETERS:
        raise XDiTModelError(f"{where}: {blocks} blocks {width} wide make a model of at least {at_least:.2g} "
                             f"parameters, over the {MAX_PARAMETERS:.0e} this engine accepts; check num_layers, "
                             "num_attention_heads, attention_head_dim and the sizes")
