"""Our mapping between the original single-file layouts (BFL's Flux and FLUX.2, Stability's MMDiT, PixArt's own,
Wan's, Z-Image's, Tencent's HunyuanDiT) and the diffusers modules, in both directions. Qwen-Image's single files (Qwen's and ComfyUI's) already use the
diffusers names: its mapping is the identity, as in diffusers' single-file loader.

A `Rule` ties one tensor of the original layout to the diffusers tensors it holds, concatenated along
dim 0 (fused q/k/v, Flux's `linear1` = q, k, v and the MLP input, PixArt's cross-attention `kv_linear`).
Rules are made from the diffusers tensor names alone and split sizes come from the diffusers shapes, so
no width is written here: tiny and full-size models go through the same code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from xdit_core.errors import XDiTModelError

# Per family: diffusers block list -> (original block list, table of the block's tensors).
# Table entries map a diffusers module path (its .weight/.bias follow) or a full tensor name to the
# original name and the part index inside a fused original tensor.
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0), "attn.to_add_out": ("txt_attn.proj", 0),
    "norm1.linear": ("img_mod.lin", 0), "norm1_context.linear": ("txt_mod.lin", 0),
    "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0),
    "attn.norm_q.weight": ("img_attn.norm.query_norm.scale", 0),
    "attn.norm_k.weight": ("img_attn.norm.key_norm.scale", 0),
    "attn.norm_added_q.weight": ("txt_attn.norm.query_norm.scale", 0),
    "attn.norm_added_k.weight": ("txt_attn.norm.key_norm.scale", 0),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation.lin", 0),
    "attn.norm_q.weight": ("norm.query_norm.scale", 0), "attn.norm_k.weight": ("norm.key_norm.scale", 0),
}
_FLUX_GLOBAL = {
    "x_embedder": ("img_in", 0), "context_embedder": ("txt_in", 0),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0),
}
_SD3_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", 0), "attn.to_add_out": ("context_block.attn.proj", 0),
    "attn.norm_q": ("x_block.attn.ln_q", 0), "attn.norm_k": ("x_block.attn.ln_k", 0),
    "attn.norm_added_q": ("context_block.attn.ln_q", 0), "attn.norm_added_k": ("context_block.attn.ln_k", 0),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", 0),
    "attn2.norm_q": ("x_block.attn2.ln_q", 0), "attn2.norm_k": ("x_block.attn2.ln_k", 0),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0), "ff.net.2": ("x_block.mlp.fc2", 0),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0),
}
_SD3_GLOBAL = {
    "pos_embed.proj": ("x_embedder.proj", 0), "pos_embed.pos_embed": ("pos_embed", 0),
    "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
    "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", 0),
    "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", 0),
    "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", 0),
    "context_embedder": ("context_embedder", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0),
}
_PIXART_BLOCK = {
    "attn1.to_q": ("attn.qkv", 0), "attn1.to_k": ("attn.qkv", 1), "attn1.to_v": ("attn.qkv", 2),
    "attn1.to_out.0": ("attn.proj", 0),
    "attn2.to_q": ("cross_attn.q_linear", 0), "attn2.to_k": ("cross_attn.kv_linear", 0),
    "attn2.to_v": ("cross_attn.kv_linear", 1), "attn2.to_out.0": ("cross_attn.proj", 0),
    "ff.net.0.proj": ("mlp.fc1", 0), "ff.net.2": ("mlp.fc2", 0),
    "scale_shift_table": ("scale_shift_table", 0),
}
_PIXART_GLOBAL = {
    "pos_embed.proj": ("x_embedder.proj", 0), "pos_embed.pos_embed": ("pos_embed", 0),
    "caption_projection.linear_1": ("y_embedder.y_proj.fc1", 0),
    "caption_projection.linear_2": ("y_embedder.y_proj.fc2", 0),
    "adaln_single.emb.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
    "adaln_single.emb.timestep_embedder.linear_2": ("t_embedder.mlp.2", 0),
    "adaln_single.emb.resolution_embedder.linear_1": ("csize_embedder.mlp.0", 0),
    "adaln_single.emb.resolution_embedder.linear_2": ("csize_embedder.mlp.2", 0),
    "adaln_single.emb.aspect_ratio_embedder.linear_1": ("ar_embedder.mlp.0", 0),
    "adaln_single.emb.aspect_ratio_embedder.linear_2": ("ar_embedder.mlp.2", 0),
    "adaln_single.linear": ("t_block.1", 0),
    "proj_out": ("final_layer.linear", 0), "scale_shift_table": ("final_layer.scale_shift_table", 0),
}
# Wan's original layout (Wan-AI's, and Comfy-Org's repackaged files) renames only: loading uses diffusers' own
# converter (loading/wan_layout.py); this table is its inverse, for writing original files (tests, LoRA names),
# and a test checks the two agree.
_WAN_BLOCK = {
    **{f"attn{i}.{ours}": (f"{attn}.{theirs}", 0) for i, attn in ((1, "self_attn"), (2, "cross_attn"))
       for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                            ("norm_k", "norm_k"))},
    "attn2.add_k_proj": ("cross_attn.k_img", 0), "attn2.add_v_proj": ("cross_attn.v_img", 0),
    "attn2.norm_added_k": ("cross_attn.norm_k_img", 0),
    "norm2": ("norm3", 0),  # the cross-attention norm (the original calls its norms 1, 3, 2)
    "ffn.net.0.proj": ("ffn.0", 0), "ffn.net.2": ("ffn.2", 0), "scale_shift_table": ("modulation", 0),
}
_WAN_GLOBAL = {
    "patch_embedding": ("patch_embedding", 0),
    "condition_embedder.time_embedder.linear_1": ("time_embedding.0", 0),
    "condition_embedder.time_embedder.linear_2": ("time_embedding.2", 0),
    "condition_embedder.text_embedder.linear_1": ("text_embedding.0", 0),
    "condition_embedder.text_embedder.linear_2": ("text_embedding.2", 0),
    "condition_embedder.time_proj": ("time_projection.1", 0),
    "condition_embedder.image_embedder.norm1": ("img_emb.proj.0", 0),
    "condition_embedder.image_embedder.ff.net.0.proj": ("img_emb.proj.1", 0),
    "condition_embedder.image_embedder.ff.net.2": ("img_emb.proj.3", 0),
    "condition_embedder.image_embedder.norm2": ("img_emb.proj.4", 0),
    "scale_shift_table": ("head.modulation", 0), "proj_out": ("head.head", 0),
}
# Z-Image's original layout (Tongyi-MAI's, and Comfy-Org's z_image_turbo_*.safetensors): diffusers' own converter
# (convert_z_image_transformer_checkpoint_to_diffusers) only fuses q/k/v, renames the output projection and the q/k
# norms, and puts the embedder and the head under their patch size key ("2-1": 2x2 patches, 1 frame); a test checks
# this table against it. The refiners and the main layers share one block layout.
_ZIMAGE_BLOCK = {
    "attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
    "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", 0),
    "attention.norm_q": ("attention.q_norm", 0), "attention.norm_k": ("attention.k_norm", 0),
    **{name: (name, 0) for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm1",
                                    "attention_norm2", "ffn_norm1", "ffn_norm2", "adaLN_modulation.0")},
}
_ZIMAGE_GLOBAL = {
    "all_x_embedder.2-1": ("x_embedder", 0), "all_final_layer.2-1.linear": ("final_layer.linear", 0),
    "all_final_layer.2-1.adaLN_modulation.1": ("final_layer.adaLN_modulation.1", 0),  # scale only: nothing swapped
    **{name: (name, 0) for name in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.0", "cap_embedder.1",
                                    "x_pad_token", "cap_pad_token")},
}
# FLUX.2's original layout (BFL's, and Comfy-Org's flux2_dev_*.safetensors): as diffusers' converter
# (convert_flux2_transformer_checkpoint_to_diffusers), which a test checks this table against.
_FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0), "attn.to_add_out": ("txt_attn.proj", 0),
    "attn.norm_q.weight": ("img_attn.norm.query_norm.scale", 0),
    "attn.norm_k.weight": ("img_attn.norm.key_norm.scale", 0),
    "attn.norm_added_q.weight": ("txt_attn.norm.query_norm.scale", 0),
    "attn.norm_added_k.weight": ("txt_attn.norm.key_norm.scale", 0),
    "ff.linear_in": ("img_mlp.0", 0), "ff.linear_out": ("img_mlp.2", 0),
    "ff_context.linear_in": ("txt_mlp.0", 0), "ff_context.linear_out": ("txt_mlp.2", 0),
}
_FLUX2_SINGLE = {
    "attn.to_qkv_mlp_proj": ("linear1", 0), "attn.to_out": ("linear2", 0),
    "attn.norm_q.weight": ("norm.query_norm.scale", 0), "attn.norm_k.weight": ("norm.key_norm.scale", 0),
}
_FLUX2_GLOBAL = {
    "x_embedder": ("img_in", 0), "context_embedder": ("txt_in", 0),
    "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
    "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
    "time_guidance_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
    "time_guidance_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
    "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", 0),
    "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", 0),
    "single_stream_modulation.linear": ("single_stream_modulation.lin", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0),
}
# HunyuanDiT's original layout (Tencent's, and ComfyUI's hunyuan_dit_1.*.safetensors; diffusers has no single-file
# converter for it): names from ComfyUI's comfy/ldm/hydit. The self-attention's q/k/v are one Wqkv, the
# cross-attention's k/v one kv_proj (k first); the original calls the cross-attention's norm norm3 and the FFN's
# norm2, diffusers the other way round; its final adaLN is (shift, scale), diffusers' (scale, shift).
_HUNYUAN_BLOCK = {
    "norm1.linear": ("default_modulation.1", 0), "norm1.norm": ("norm1", 0),
    "attn1.to_q": ("attn1.Wqkv", 0), "attn1.to_k": ("attn1.Wqkv", 1), "attn1.to_v": ("attn1.Wqkv", 2),
    "attn1.norm_q": ("attn1.q_norm", 0), "attn1.norm_k": ("attn1.k_norm", 0),
    "attn1.to_out.0": ("attn1.out_proj", 0),
    "norm2": ("norm3", 0),
    "attn2.to_q": ("attn2.q_proj", 0), "attn2.to_k": ("attn2.kv_proj", 0), "attn2.to_v": ("attn2.kv_proj", 1),
    "attn2.norm_q": ("attn2.q_norm", 0), "attn2.norm_k": ("attn2.k_norm", 0),
    "attn2.to_out.0": ("attn2.out_proj", 0),
    "norm3": ("norm2", 0),
    "ff.net.0.proj": ("mlp.fc1", 0), "ff.net.2": ("mlp.fc2", 0),
    "skip_norm": ("skip_norm", 0), "skip_linear": ("skip_linear", 0),
}
_HUNYUAN_GLOBAL = {
    "text_embedder.linear_1": ("mlp_t5.0", 0), "text_embedder.linear_2": ("mlp_t5.2", 0),
    "text_embedding_padding": ("text_embedding_padding", 0),
    "pos_embed.proj": ("x_embedder.proj", 0),
    "time_extra_emb.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
    "time_extra_emb.timestep_embedder.linear_2": ("t_embedder.mlp.2", 0),
    **{f"time_extra_emb.pooler.{name}": (f"pooler.{name}", 0)
       for name in ("positional_embedding", "q_proj", "k_proj", "v_proj", "c_proj")},
    "time_extra_emb.extra_embedder.linear_1": ("extra_embedder.0", 0),
    "time_extra_emb.extra_embedder.linear_2": ("extra_embedder.2", 0),
    "time_extra_emb.style_embedder": ("style_embedder", 0),  # v1.0/1.1 only
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0),
}
_LAYOUTS: dict[str, tuple[dict[str, tuple[str, dict]], dict]] = {
    "flux": ({"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
              "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)}, _FLUX_GLOBAL),
    "sd3": ({"transformer_blocks": ("joint_blocks", _SD3_BLOCK)}, _SD3_GLOBAL),
    "pixart": ({"transformer_blocks": ("blocks", _PIXART_BLOCK)}, _PIXART_GLOBAL),
    "wan": ({"blocks": ("blocks", _WAN_BLOCK)}, _WAN_GLOBAL),
    "zimage": ({lst: (lst, _ZIMAGE_BLOCK) for lst in ("noise_refiner", "context_refiner", "layers")}, _ZIMAGE_GLOBAL),
    "flux2": ({"transformer_blocks": ("double_blocks", _FLUX2_DOUBLE),
               "single_transformer_blocks": ("single_blocks", _FLUX2_SINGLE)}, _FLUX2_GLOBAL),
    "hunyuandit": ({"blocks": ("blocks", _HUNYUAN_BLOCK)}, _HUNYUAN_GLOBAL),
}
# Families whose original single files name every tensor as diffusers does (Qwen-Image: diffusers' single-file
# loader maps its checkpoints by identity, and ComfyUI's model uses the same names).
IDENTITY_FAMILIES = ("qwen",)
# Original tensors that diffusers has no place for: PixArt's learned null caption (training's dropout); the empty
# marker by which ComfyUI's Qwen-Image-Edit 2511 files say their reference tokens run at timestep 0 (read by the
# config, see original_layout.QWEN_ZERO_COND_MARKER).
IGNORED_ORIGINAL = {"flux": (), "sd3": (), "pixart": ("y_embedder.y_embedding",), "wan": (),
                    "qwen": ("__index_timestep_zero__",),
                    # Lumina 2's final RMSNorm, unused by Z-Image (diffusers' converter drops it, ComfyUI builds none)
                    "zimage": ("norm_final.weight",), "flux2": (), "hunyuandit": ()}

# Tables a model computes when built, which no original file stores (Wan's rotary frequencies).
COMPUTED = {"wan": ("rope.freqs_cos", "rope.freqs_sin")}
_BLOCK_NAME = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Rule:
    """One original tensor = its diffusers `parts` concatenated along dim 0, halves swapped if `swap`."""

    original: str
    parts: tuple[str, ...]
    swap: bool = False  # final adaLN: the original layout is (shift, scale), diffusers' is (scale, shift)


def _lookup(table: Mapping[str, tuple[str, int]], local: str) -> Optional[tuple[str, int]]:
    if local in table:
        return table[local]
    module, _, param = local.rpartition(".")
    if module in table:
        name, part = table[module]
        return f"{name}.{param}", part
    return None


def _translate(family: str, name: str, last_block: dict[str, int]) -> Optional[tuple[str, int, bool]]:
    """A diffusers tensor name -> (original name, part index, swap halves); None for a name the mapping lacks."""
    blocks, global_table = _LAYOUTS[family]
    m = _BLOCK_NAME.match(name)
    if m and m.group(1) in blocks:
        block_list, index, local = m.group(1), int(m.group(2)), m.group(3)
        original_list, table = blocks[block_list]
        found = _lookup(table, local)
        # SD3's last block is "context pre-only": its text modulation is a final-layer style (scale, shift).
        swap = (family == "sd3" and local.startswith("norm1_context.linear.")
                and index == last_block[block_list])
        if found:
            return f"{original_list}.{index}.{found[0]}", found[1], swap
    else:
        found = _lookup(global_table, name)
        if found:
            return found[0], found[1], family != "wan" and name.startswith("norm_out.linear.")
    return None


def layout_rules(family: str, names: Sequence[str], skip_unknown: bool = False) -> list[Rule]:
    """The rules covering the diffusers tensors `names` of a `family` model, in the order of `names`; a name
    the mapping lacks is an error, or left out with `skip_unknown`."""
    if family in IDENTITY_FAMILIES:
        return identity_rules([n for n in names if n not in COMPUTED.get(family, ())])
    last_block: dict[str, int] = {}
    for name in names:
        m = _BLOCK_NAME.match(name)
        if m:
            last_block[m.group(1)] = max(last_block.get(m.group(1), -1), int(m.group(2)))
    grouped: dict[str, dict[int, str]] = {}
    swaps: dict[str, bool] = {}
    for name in names:
        if name in COMPUTED.get(family, ()):  # nothing to map: no file holds them
            continue
        found = _translate(family, name, last_block)
        if found is None:
            if skip_unknown:
                continue
            raise XDiTModelError(f"no original-layout name for the {family} tensor {name!r} "
                                 "(a diffusers version this mapping does not know?)")
        original, part, swap = found
        grouped.setdefault(original, {})[part] = name
        swaps[original] = swap
    return [Rule(original, tuple(parts[i] for i in sorted(parts)), swaps[original])
            for original, parts in grouped.items()]


def original_shapes(family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The original-layout shapes of diffusers tensors; names the mapping lacks are left out (a diffusers file's
    extra tensors are reported by the weight check at load, not here)."""
    return {r.original: original_shape(r, shapes) for r in layout_rules(family, list(shapes), skip_unknown=True)}


def diffusers_name(family: str, original: str) -> str:
    """The diffusers name of an original-layout tensor (its first part if fused), for messages about
    diffusers files; the name itself where the mapping has none."""
    if family in IDENTITY_FAMILIES:
        return original
    blocks, global_table = _LAYOUTS[family]
    m = _BLOCK_NAME.match(original)
    tables = [(f"{ours}.{m.group(2)}.", m.group(3), table)
              for ours, (theirs, table) in blocks.items() if m and theirs == m.group(1)]
    for prefix, local, table in tables + [("", original, global_table)]:
        for ours, (theirs, part) in table.items():
            if part == 0 and (local == theirs or local.startswith(theirs + ".")):
                return prefix + ours + local[len(theirs):]
    return original


def identity_rules(names: Sequence[str]) -> list[Rule]:
    """Rules of a diffusers checkpoint: every tensor under its own name."""
    return [Rule(name, (name,)) for name in names]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: the scale/shift order of the final adaLN modulation."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def join(rule: Rule, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The original tensor of `rule` from the diffusers tensors."""
    parts = [tensors[p] for p in rule.parts]
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return swap_halves(joined) if rule.swap else joined


def split(rule: Rule, tensor: torch.Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The diffusers tensors of `rule` from its original tensor; part sizes from the diffusers `shapes`."""
    if rule.swap:
        tensor = swap_halves(tensor)
    if len(rule.parts) == 1:
        return {rule.parts[0]: tensor}
    pieces = tensor.split([shapes[p][0] for p in rule.parts], dim=0)
    return dict(zip(rule.parts, pieces))


def original_shape(rule: Rule, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The shape the original tensor of `rule` has for diffusers tensors of `shapes`."""
    first = tuple(shapes[rule.parts[0]])
    return (sum(shapes[p][0] for p in rule.parts),) + first[1:]


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a model by name, non-persistent buffers included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def to_original(family: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict (or `model_tensors`) in the original single-file layout of `family`."""
    return {rule.original: join(rule, tensors) for rule in layout_rules(family, list(tensors))}
