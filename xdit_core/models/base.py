"""What every model adapter offers the sampling loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..families import ModelSpec


@dataclass
class BranchCond:
    """One CFG branch's conditioning: text states [B, L, D] and, for Flux and SD3, pooled [B, P]."""

    text: torch.Tensor
    pooled: Optional[torch.Tensor] = None


class ModelAdapter:
    """Turns (model input, timestep, conditioning) into the model's raw output, in ComfyUI's latent layout."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        self.model = model
        self.spec = spec

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        """x: [B, C, h, w] in the model's dtype; timestep: [B] as the model expects it."""
        raise NotImplementedError
