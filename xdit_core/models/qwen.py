"""Qwen-Image and Qwen-Image-Edit (2509, 2511): a double-stream MMDiT over packed 2x2 tokens with complex rotary
positions laid out as ComfyUI's (centred image rows and columns, the text after the largest), Edit's reference
images appended as extra image tokens (ComfyUI's `reference_latents`), and an optional text key mask."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from xdit_core.models.base import BranchCond, ModelAdapter, Tokens
from xdit_core.models.latent_formats import (offset_placements, pack_flux, packed_tokens, pad_to_patches, tokens_of,
                                             unpack_flux)

REFERENCE_METHODS = ("index", "offset")  # ComfyUI's QwenImage ref_latents_method; "index" is its default


def _run_block(block: torch.nn.Module, t: Tokens) -> Tokens:
    txt, img = block(hidden_states=t.img, encoder_hidden_states=t.txt,
                     encoder_hidden_states_mask=t.extras["txt_mask"], temb=t.extras["temb"],
                     image_rotary_emb=t.extras["rotary"], modulate_index=t.extras["modulate_index"])
    return t.with_(img=img, txt=txt)


def grid_ids(rows: int, cols: int, index: float = 0, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """Positions [(rows*cols), 3] (frame, row, column) of a packed latent of rows x cols tokens, as ComfyUI's
    QwenImage.process_img sets them: centred on the latent (-(n // 2) .. n - 1 - n // 2, so an odd count is
    centred exactly, where diffusers' QwenEmbedRope puts the extra token first), shifted by the offsets."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = (torch.arange(rows) + row_offset - rows // 2)[:, None].float()
    ids[..., 2] = (torch.arange(cols) + col_offset - cols // 2)[None, :].float()
    return ids.reshape(-1, 3)


def reference_ids(shapes: Sequence[tuple[int, int]], method: str) -> list[torch.Tensor]:
    """Positions of each reference's tokens (latent sizes in latent rows and columns): "index" puts reference i on
    frame i + 1; "offset" puts all on frame 1, each beside the ones before, its offsets counted in latent rows and
    turned into tokens as ComfyUI's QwenImage._forward does."""
    if method == "index":
        return [grid_ids(tokens_of(rows), tokens_of(cols), i + 1) for i, (rows, cols) in enumerate(shapes)]
    return [grid_ids(tokens_of(rows), tokens_of(cols), 1, tokens_of(row0), tokens_of(col0))
            for (rows, cols), (row0, col0) in zip(shapes, offset_placements(shapes))]


def complex_rope(ids: torch.Tensor, axes: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """[S, sum(axes) / 2] complex rotary factors of positions `ids` [S, len(axes)], computed as diffusers'
    QwenEmbedRope.rope_params (the same float32 product per position, so equal positions give equal bits)."""
    parts = []
    for axis, dim in enumerate(axes):
        freqs = torch.outer(ids[:, axis], 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim)))
        parts.append(torch.polar(torch.ones_like(freqs), freqs))
    return torch.cat(parts, dim=1)


def text_mask(cond: BranchCond, batch: int) -> Optional[torch.Tensor]:
    """The branch's text key mask [B, L] (host, bool), None when every token is attended."""
    if cond.text_mask is None:
        return None
    mask = cond.text_mask.bool().cpu().expand(batch, -1)
    return None if bool(mask.all()) else mask


class QwenImageAdapter(ModelAdapter):
    JOINT_ORDER = ("txt", "img")  # diffusers' Qwen processor attends over [text, image]
    TEXT_EVERY_UNIT = True  # its processor's rotary cannot take zero text tokens

    def reference_tokens(self, cond: BranchCond, height: int, width: int) -> int:
        return packed_tokens(cond.references)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        dtype, device = x.dtype, x.device
        refs = [r.to(dtype).expand(b, -1, -1, -1) for r in cond.references]
        img = m.img_in(torch.cat([pack_flux(x)] + [pack_flux(pad_to_patches(r)) for r in refs], dim=1))
        n_ref = img.shape[1] - (h // 2) * (w // 2)
        ids = [grid_ids(h // 2, w // 2)]
        ids += reference_ids([tuple(r.shape[-2:]) for r in refs], cond.reference_method or "index")
        # ComfyUI: the text's positions start after the sampled latent's half extent (references not counted).
        txt_start = max(w // 2 // 2, h // 2 // 2)
        n_txt = cond.text.shape[1]
        axes = m.config.axes_dims_rope
        img_freqs = complex_rope(torch.cat(ids), axes).to(device)
        txt_freqs = complex_rope(torch.arange(txt_start, txt_start + n_txt).float()[:, None].expand(-1, 3), axes)
        t = timestep.to(dtype)  # ComfyUI's Qwen takes sigma (multiplier 1); the embedder scales by 1000
        modulate_index = None
        if m.config.zero_cond_t:  # Edit 2511: reference tokens modulated at timestep 0 (the second half of temb)
            t = torch.cat([t, t * 0])
            modulate_index = torch.tensor([[0] * (img.shape[1] - n_ref) + [1] * n_ref] * b, device=device,
                                          dtype=torch.int)
        temb = m.time_text_embed(t, img)
        txt = m.txt_in(m.txt_norm(cond.text.to(dtype)))
        mask = text_mask(cond, b)
        extras = {"temb": temb, "rotary": (img_freqs, txt_freqs.to(device)), "modulate_index": modulate_index,
                  "txt_mask": None if mask is None else mask.to(device)}
        return Tokens(img, txt, h, w, extras, txt_mask=mask, n_ref=n_ref)

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return self.model.img_in(pack_flux(rows))  # positions live in the rotary table

    def blocks(self):
        return [(b, _run_block) for b in self.model.transformer_blocks]

    def head(self, tokens: Tokens) -> torch.Tensor:
        m, temb = self.model, tokens.extras["temb"]
        if m.config.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return unpack_flux(m.proj_out(m.norm_out(tokens.img, temb)), tokens.height, tokens.width)

    def attention_kinds(self):
        return {b.attn: "joint" for b in self.model.transformer_blocks}

    def shard_extras(self, tokens, shard_txt, shard_img):
        img_freqs, txt_freqs = tokens.extras["rotary"]
        extras = {**tokens.extras, "rotary": (shard_img(img_freqs, dim=0), shard_txt(txt_freqs, dim=0))}
        if extras["txt_mask"] is not None:
            extras["txt_mask"] = shard_txt(extras["txt_mask"], dim=1)
        if extras["modulate_index"] is not None:
            extras["modulate_index"] = shard_img(extras["modulate_index"], dim=1)
        return extras
