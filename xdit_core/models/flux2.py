"""FLUX.2 (dev, klein): double- then single-stream blocks whose modulation comes from shared modules outside the
blocks (computed once per evaluation with the embedding, so every PipeFusion stage has them), 128-channel latents
at 1/16 (the VAE's 2x2 patches and batch norm, so one token per latent pixel), 4-axis positions (T, row, column,
text index) and reference images on T = 10, 20, ... (diffusers' Flux2Pipeline)."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.models.base import BranchCond, Tokens
from xdit_core.models.flux import FluxAdapter

REFERENCE_T_STEP = 10  # Flux2Pipeline._prepare_image_ids(scale=10): reference i on T = 10 (i + 1)


def _run_double(block: torch.nn.Module, t: Tokens) -> Tokens:
    txt, img = block(hidden_states=t.img, encoder_hidden_states=t.txt, temb_mod_img=t.extras["mod_img"],
                     temb_mod_txt=t.extras["mod_txt"], image_rotary_emb=t.extras["rotary"])
    return t.with_(img=img, txt=txt)


def _run_single(block: torch.nn.Module, t: Tokens) -> Tokens:
    # The block joins [text, image] itself and splits them back: the same values as diffusers' one joined stream.
    txt, img = block(hidden_states=t.img, encoder_hidden_states=t.txt, temb_mod=t.extras["mod_single"],
                     image_rotary_emb=t.extras["rotary"], split_hidden_states=True)
    return t.with_(img=img, txt=txt)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]: one token per latent pixel, row major (patch size 1)."""
    return latent.flatten(2).transpose(1, 2)


def grid_ids(rows: int, cols: int, t: int = 0) -> torch.Tensor:
    """Positions [(rows*cols), 4] = (t, row, column, 0), rows and columns from 0."""
    ids = torch.zeros(rows, cols, 4, dtype=torch.long)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(-1, 4)


class Flux2Adapter(FluxAdapter):
    """FLUX.1's layout (double then single blocks, text first, the rotary table text first: its attention kinds and
    sharding) with FLUX.2's embedding, blocks and head."""

    def reference_tokens(self, cond: BranchCond, height: int, width: int) -> int:
        return sum(r.shape[-2] * r.shape[-1] for r in cond.references)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        dtype, device = x.dtype, x.device
        refs = [r.to(dtype).expand(b, -1, -1, -1) for r in cond.references]
        img = m.x_embedder(torch.cat([pack(x)] + [pack(r) for r in refs], dim=1))
        txt = m.context_embedder(cond.text.to(dtype))
        t = timestep.to(dtype) * 1000
        g = None
        if m.config.guidance_embeds:  # dev: the distilled guidance (Flux2Pipeline's default 4.0)
            g = torch.full((b,), 4.0 if guidance is None else guidance, dtype=dtype, device=device) * 1000
        temb = m.time_guidance_embed(t, g)
        ids = [grid_ids(h, w)] + [grid_ids(r.shape[-2], r.shape[-1], REFERENCE_T_STEP * (i + 1))
                                  for i, r in enumerate(refs)]
        txt_ids = torch.zeros(txt.shape[1], 4, dtype=torch.long)
        txt_ids[:, 3] = torch.arange(txt.shape[1])
        img_rot, txt_rot = m.pos_embed(torch.cat(ids).to(device)), m.pos_embed(txt_ids.to(device))
        rotary = tuple(torch.cat([tr, ir], dim=0) for tr, ir in zip(txt_rot, img_rot))
        extras = {"temb": temb, "rotary": rotary, "mod_img": m.double_stream_modulation_img(temb),
                  "mod_txt": m.double_stream_modulation_txt(temb), "mod_single": m.single_stream_modulation(temb)}
        return Tokens(img, txt, h, w, extras, n_ref=img.shape[1] - h * w)

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return self.model.x_embedder(pack(rows))

    def blocks(self):
        m = self.model
        return ([(b, _run_double) for b in m.transformer_blocks]
                + [(b, _run_single) for b in m.single_transformer_blocks])

    def head(self, tokens: Tokens) -> torch.Tensor:
        out = self.model.proj_out(self.model.norm_out(tokens.img, tokens.extras["temb"]))
        return out.transpose(1, 2).reshape(out.shape[0], -1, tokens.height, tokens.width)
