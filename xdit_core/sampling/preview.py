"""Live previews: each step's prediction, for the host's previewer (ComfyUI's latent2rgb or TAESD)."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.sampling.samplers import Denoiser


class StepPreview:
    """Each step's first prediction (the x0 ComfyUI's previews show), kept by reference: nothing is copied
    unless the host asks for it."""

    def __init__(self) -> None:
        self.latest: Optional[torch.Tensor] = None  # replaced, never written in place, once handed out
        self.step: Optional[int] = None  # PipeFusion: the step `latest` is being assembled for
        self._step_started = True

    def capture(self, denoise: Denoiser) -> Denoiser:
        def captured(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            out = denoise(x, sigma)
            if self._step_started:
                self.latest, self._step_started = out, False
            return out

        return captured

    def step_done(self) -> None:
        self._step_started = True
