"""Flux.1 (dev, schnell): packed 2x2 tokens with rotary position ids, optional guidance embedding."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from xdit_core.models.latent_formats import (flux_image_ids, offset_placements, pack_flux, packed_tokens, pad_to_patches,
                                             tokens_of, unpack_flux)
from xdit_core.models.base import BranchCond, ModelAdapter, Tokens


def _run_block(block: torch.nn.Module, t: Tokens) -> Tokens:
    # Double- and single-stream blocks share this signature in diffusers and return (text, image).
    txt, img = block(hidden_states=t.img, encoder_hidden_states=t.txt, temb=t.extras["temb"],
                     image_rotary_emb=t.extras["rotary"])
    return t.with_(img=img, txt=txt)


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (time, row, column) summing to the head size, each even (FLUX.1-dev: 128 -> 16, 56, 56)."""
    a = (head_dim // 4) // 2 * 2
    b = (head_dim - a) // 2 // 2 * 2
    return a, b, head_dim - a - b


# ComfyUI's Flux ref_latents_method values; "offset" is its default (FLUX.1 Kontext's own placement).
REFERENCE_METHODS = ("offset", "index", "uxo")


def kontext_ids(shapes: Sequence[tuple[int, int]], method: str, image: tuple[int, int],
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Position ids of each reference latent's tokens (latent sizes, in latent rows and columns; an odd side is
    padded to a whole patch), as ComfyUI's Flux sets them: "offset" on axis 0 = 1, each reference beside (taller) or
    below the ones before; "index" reference k on axis 0 = k; "uxo" diagonally after the sampled image (`image`, its
    latent size) and the references before. Offsets are counted in latent rows, then turned into tokens."""
    offsets = offset_placements(shapes)
    out, h, w = [], 0, 0
    for k, (rows, cols) in enumerate(shapes):
        if method == "index":
            index, row0, col0 = k + 1, 0, 0
        elif method == "uxo":
            index, row0, col0 = 0, image[0] + h, image[1] + w
            h, w = h + rows, w + cols
        else:
            index, (row0, col0) = 1, offsets[k]
        ids = flux_image_ids(2 * tokens_of(rows), 2 * tokens_of(cols), dtype)
        ids[:, 0] = index
        ids[:, 1] += (row0 + 1) // 2
        ids[:, 2] += (col0 + 1) // 2
        out.append(ids)
    return out


class FluxAdapter(ModelAdapter):
    JOINT_ORDER = ("txt", "img")  # Flux puts the text tokens first

    def reference_tokens(self, cond: BranchCond, height: int, width: int) -> int:
        return packed_tokens(cond.references)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        dtype = x.dtype
        refs = [r.to(dtype).expand(b, -1, -1, -1) for r in cond.references]  # Kontext: after the image's tokens
        img = m.x_embedder(torch.cat([pack_flux(x)] + [pack_flux(pad_to_patches(r)) for r in refs], dim=1))
        t = timestep.to(dtype) * 1000
        if m.config.guidance_embeds:
            # ComfyUI's Flux uses guidance 3.5 when the conditioning carries none.
            g = torch.full((b,), 3.5 if guidance is None else guidance, dtype=dtype, device=x.device) * 1000
            temb = m.time_text_embed(t, g, cond.pooled.to(dtype))
        else:
            temb = m.time_text_embed(t, cond.pooled.to(dtype))
        txt = m.context_embedder(cond.text.to(dtype))
        ref_ids = kontext_ids([tuple(r.shape[-2:]) for r in refs], cond.reference_method or "offset", (h, w), dtype)
        ids = torch.cat([torch.zeros(cond.text.shape[1], 3, dtype=dtype), flux_image_ids(h, w, dtype), *ref_ids])
        n_ref = sum(len(r) for r in ref_ids)
        return Tokens(img, txt, h, w, {"temb": temb, "rotary": m.pos_embed(ids.to(x.device))}, n_ref=n_ref)

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return self.model.x_embedder(pack_flux(rows))  # row-major 2x2 patches; positions live in the rotary table

    def blocks(self):
        m = self.model
        return [(b, _run_block) for b in list(m.transformer_blocks) + list(m.single_transformer_blocks)]

    def head(self, tokens: Tokens) -> torch.Tensor:
        out = self.model.proj_out(self.model.norm_out(tokens.img, tokens.extras["temb"]))
        return unpack_flux(out, tokens.height, tokens.width)

    def attention_kinds(self):
        m = self.model
        return {b.attn: "joint" for b in list(m.transformer_blocks) + list(m.single_transformer_blocks)}

    def shard_extras(self, tokens, shard_txt, shard_img):
        n_txt = tokens.txt.shape[1]
        rotary = tuple(torch.cat([shard_txt(r[:n_txt], dim=0), shard_img(r[n_txt:], dim=0)])
                       for r in tokens.extras["rotary"])
        return {**tokens.extras, "rotary": rotary}
