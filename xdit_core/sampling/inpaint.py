"""ComfyUI's `noise_mask`: only where the mask is 1 is the latent denoised; elsewhere it is pinned to the input.

As ComfyUI's KSamplerX0Inpaint: before every model evaluation the sampler's x is replaced outside the mask
by the input latent noised to the evaluation's sigma (`scale_latent_inpaint`), and after it the prediction
is replaced outside the mask by the input latent. The sampler's own x is left as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from xdit_core.errors import XDiTConfigError
from xdit_core.models.conditioning import check_finite
from xdit_core.sampling.samplers import Denoiser, StepGen

# sigma, noise, latent -> the latent as the model expects it at sigma (the family's scale_latent_inpaint)
InpaintScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A LATENT's noise_mask as ComfyUI's prepare_mask (reshape_mask) makes it for a latent of `shape`: images
    ([H, W], [B, H, W] or [B, 1, H, W], any resolution) bilinearly resized; video ([B, 1, frames, H, W], or
    a stack of per-frame masks) trilinearly; then repeated over channels and to the batch."""
    video = len(shape) == 5
    if mask.ndim < 2 or mask.ndim > (5 if video else 4) or (mask.ndim >= 4 and mask.shape[1] != 1) or 0 in mask.shape:
        expected = "[H, W], [frames, H, W] or [B, 1, frames, H, W]" if video else "[H, W], [B, H, W] or [B, 1, H, W]"
        raise XDiTConfigError(f"noise_mask has shape {list(mask.shape)}; expected {expected}")
    check_finite("noise_mask", mask)
    b, c = shape[0], shape[1]
    mask = mask.float()
    if video:
        if mask.ndim < 5:
            mask = mask.reshape(1, 1, -1, mask.shape[-2], mask.shape[-1])
        mask = F.interpolate(mask, size=tuple(shape[2:]), mode="trilinear")
    else:
        mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=tuple(shape[2:]),
                             mode="bilinear")
    mask = mask.repeat(1, c, *[1] * (mask.ndim - 2))[:, :c]
    if mask.shape[0] < b:
        mask = mask.repeat(math.ceil(b / mask.shape[0]), *[1] * (mask.ndim - 1))
    return mask[:b].contiguous()


def ddim_inpaint_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise ComfyUI's "ddim" sampler pins masked-out regions with: a fresh draw seeded with seed + 1."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + 1))


@dataclass
class Inpaint:
    """One run's (or one patch's) mask, input latent and noise, all of x's shape."""

    mask: torch.Tensor
    latent: torch.Tensor
    noise: torch.Tensor
    scale: InpaintScaling

    def rows(self, r0: int, r1: int) -> "Inpaint":
        """This region's rows (a PipeFusion patch)."""
        return Inpaint(self.mask[:, :, r0:r1], self.latent[:, :, r0:r1], self.noise[:, :, r0:r1], self.scale)

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * self.mask + self.scale(sigma, self.noise, self.latent) * (1.0 - self.mask)

    def prediction(self, denoised: torch.Tensor) -> torch.Tensor:
        return denoised * self.mask + self.latent * (1.0 - self.mask)

    def denoiser(self, denoise: Denoiser) -> Denoiser:
        """`denoise` as ComfyUI's masked model wrapper calls it."""
        return lambda x, sigma: self.prediction(denoise(self.model_input(x, sigma), sigma))

    def steps(self, gen: StepGen) -> StepGen:
        """A sampler step generator (see samplers.StepGen) whose evaluations go through the mask."""
        request = next(gen)
        while True:
            x, sigma = request
            denoised = yield self.model_input(x, sigma), sigma
            try:
                request = gen.send(self.prediction(denoised))
            except StopIteration as done:
                return done.value
