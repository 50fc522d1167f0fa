"""PixArt-alpha / Sigma: self-attention plus cross-attention to T5 states, learned-sigma output."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.models.base import BranchCond, ModelAdapter, Tokens
from .sd3 import patch_embed_rows, unpatchify


def _run_block(block: torch.nn.Module, t: Tokens) -> Tokens:
    img = block(t.img, attention_mask=None, encoder_hidden_states=t.txt, encoder_attention_mask=None,
                timestep=t.extras["t6"], cross_attention_kwargs=None, class_labels=None)
    return t.with_(img=img)


class PixArtAdapter(ModelAdapter):
    TEXT_IS_JOINT = False  # text only enters through cross-attention, replicated on every rank

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        added = {"resolution": None, "aspect_ratio": None}
        if m.config.use_additional_conditions:
            # As ComfyUI's PixArt: image size in pixels and aspect ratio height / width.
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]], dtype=x.dtype, device=x.device).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(b, 1)}
        img = m.pos_embed(x)
        t6, embedded_t = m.adaln_single(timestep, added, batch_size=b, hidden_dtype=x.dtype)
        # Unpadded T5 states without a mask, as ComfyUI passes them.
        txt = m.caption_projection(cond.text.to(x.dtype)).view(b, -1, img.shape[-1])
        return Tokens(img, txt, h, w, {"t6": t6, "embedded_t": embedded_t})

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return patch_embed_rows(self.model.pos_embed, rows, top, height)

    def blocks(self):
        return [(b, _run_block) for b in self.model.transformer_blocks]

    def head(self, tokens: Tokens) -> torch.Tensor:
        m = self.model
        shift, scale = (m.scale_shift_table[None] + tokens.extras["embedded_t"][:, None]).chunk(2, dim=1)
        x = m.norm_out(tokens.img) * (1 + scale) + shift
        out = unpatchify(m.proj_out(x), tokens.height, tokens.width, m.config.patch_size, m.out_channels)
        return out[:, : self.spec.latent_channels]  # learned sigma: ComfyUI keeps the first C channels

    def attention_kinds(self):
        kinds = {}
        for b in self.model.transformer_blocks:
            kinds[b.attn1] = "image"
            kinds[b.attn2] = "cross"
        return kinds
