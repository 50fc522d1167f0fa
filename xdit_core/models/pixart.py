"""PixArt-alpha / Sigma: self-attention plus cross-attention to T5 states, learned-sigma output."""
from __future__ import annotations

from typing import Optional

import torch

from .base import BranchCond, ModelAdapter


class PixArtAdapter(ModelAdapter):
    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        b, c, h, w = x.shape
        added = {"resolution": None, "aspect_ratio": None}
        if self.model.config.use_additional_conditions:
            # As ComfyUI's PixArt: image size in pixels and aspect ratio height / width.
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]], dtype=x.dtype).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype).repeat(b, 1)}
        out = self.model(
            hidden_states=x,
            encoder_hidden_states=cond.text.to(x.dtype),  # unpadded T5 states, no mask (as ComfyUI)
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out[:, :c]  # learned-sigma models predict 2C channels; ComfyUI keeps the first C
