"""SD3 / SD3.5: joint text-image attention (MMDiT, image tokens first), pooled CLIP projections."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.models.base import BranchCond, ModelAdapter, Tokens


def _run_block(block: torch.nn.Module, t: Tokens) -> Tokens:
    txt, img = block(hidden_states=t.img, encoder_hidden_states=t.txt, temb=t.extras["temb"])
    # The last block is context_pre_only: it returns no text states, and none are needed after it.
    return t.with_(img=img, txt=txt)


def unpatchify(tokens: torch.Tensor, h: int, w: int, patch: int, channels: int) -> torch.Tensor:
    """[B, (h/p)(w/p), p*p*C] -> [B, C, h, w], the layout of diffusers' DiT heads."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // patch, w // patch, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h, w)


def patch_embed_rows(embedder: torch.nn.Module, rows: torch.Tensor, top: int, h: int) -> torch.Tensor:
    """diffusers' PatchEmbed on latent rows top..top + r of a latent h rows high, given only those rows: their
    patch convolution plus their part of the whole latent's position table (cropped, interpolated or the stored
    one, as its forward chooses)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe, w = embedder, rows.shape[-1]
    r0, r1 = top, top + rows.shape[-2]
    tokens = pe.proj(rows).flatten(2).transpose(1, 2)
    if pe.layer_norm:
        tokens = pe.norm(tokens)
    if pe.pos_embed is None:
        return tokens
    p = pe.patch_size
    if pe.pos_embed_max_size:
        pos = pe.cropped_pos_embed(h, w)
    elif (pe.height, pe.width) != (h // p, w // p):
        pos = get_2d_sincos_pos_embed(embed_dim=pe.pos_embed.shape[-1], grid_size=(h // p, w // p),
                                      base_size=pe.base_size, interpolation_scale=pe.interpolation_scale,
                                      device=rows.device, output_type="pt").float().unsqueeze(0)
    else:
        pos = pe.pos_embed
    per_row = w // p
    return (tokens + pos[:, r0 // p * per_row:r1 // p * per_row]).to(tokens.dtype)


class SD3Adapter(ModelAdapter):
    JOINT_ORDER = ("img", "txt")  # SD3's joint processor puts the image tokens first

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        h, w = x.shape[-2:]
        temb = m.time_text_embed(timestep, cond.pooled.to(x.dtype))
        return Tokens(m.pos_embed(x), m.context_embedder(cond.text.to(x.dtype)), h, w, {"temb": temb})

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return patch_embed_rows(self.model.pos_embed, rows, top, height)

    def blocks(self):
        return [(b, _run_block) for b in self.model.transformer_blocks]

    def head(self, tokens: Tokens) -> torch.Tensor:
        m = self.model
        out = m.proj_out(m.norm_out(tokens.img, tokens.extras["temb"]))
        return unpatchify(out, tokens.height, tokens.width, m.config.patch_size, m.out_channels)

    def attention_kinds(self):
        kinds = {}
        for b in self.model.transformer_blocks:
            kinds[b.attn] = "joint"
            if getattr(b, "attn2", None) is not None:  # SD3.5's dual attention: image tokens only
                kinds[b.attn2] = "image"
        return kinds
