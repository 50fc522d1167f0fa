"""SD3 / SD3.5: joint text-image attention (MMDiT), pooled CLIP projections."""
from __future__ import annotations

from typing import Optional

import torch

from .base import BranchCond, ModelAdapter


class SD3Adapter(ModelAdapter):
    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        return self.model(
            hidden_states=x,
            encoder_hidden_states=cond.text.to(x.dtype),
            pooled_projections=cond.pooled.to(x.dtype),
            timestep=timestep,
            return_dict=False,
        )[0]
