"""Flux.1 (dev, schnell): packed 2x2 tokens with rotary position ids, optional guidance embedding."""
from __future__ import annotations

from typing import Optional

import torch

from ..latent_formats import flux_image_ids, pack_flux, unpack_flux
from .base import BranchCond, ModelAdapter


class FluxAdapter(ModelAdapter):
    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = x.dtype
        g = None
        if self.model.config.guidance_embeds:
            # ComfyUI's Flux uses guidance 3.5 when the conditioning carries none.
            g = torch.full((b,), 3.5 if guidance is None else guidance, dtype=torch.float32)
        out = self.model(
            hidden_states=pack_flux(x),
            encoder_hidden_states=cond.text.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=timestep,
            img_ids=flux_image_ids(h, w, dtype),
            txt_ids=torch.zeros(cond.text.shape[1], 3, dtype=dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack_flux(out, h, w)
