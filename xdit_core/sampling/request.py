"""SampleRequest: everything a rank needs for one prompt, as plain tensors and dataclasses.

The host (CLI or ComfyUI node) builds it exactly as KSampler prepares a run: fix the empty latent's
channels, draw the noise for the seed, compute the sigmas, apply the latent format. Ranks run the
whole denoising loop from it without a round trip to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import PIXEL_MULTIPLE, ModelSpec
from xdit_core.models.base import BranchCond
from xdit_core.sampling.samplers import calculate_sigmas, fix_empty_latent_channels, prepare_noise, validate_sampler_settings


@dataclass
class SampleRequest:
    """One prompt's work; tensors in the model's latent space, float32, on CPU."""

    noise: torch.Tensor  # [B, C, h, w], comfy.sample.prepare_noise for the seed
    latent_image: torch.Tensor  # [B, C, h, w], latent format applied (zeros for an empty latent)
    sigmas: torch.Tensor  # [steps + 1]
    positive: BranchCond
    negative: Optional[BranchCond]  # None when cfg == 1: ComfyUI evaluates no negative branch
    cfg: float
    guidance: Optional[float]
    sampler: str
    seed: int
    shift: Optional[float | str]  # model-sampling shift override; None = the family's default
    height: int  # pixels
    width: int

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to(self, device: torch.device) -> "SampleRequest":
        """A copy with every tensor on `device`."""
        def move(c: Optional[BranchCond]) -> Optional[BranchCond]:
            if c is None:
                return None
            return BranchCond(c.text.to(device), None if c.pooled is None else c.pooled.to(device))

        return replace(self, noise=self.noise.to(device), latent_image=self.latent_image.to(device),
                       sigmas=self.sigmas.to(device), positive=move(self.positive), negative=move(self.negative))


def validate_size(spec: ModelSpec, height: int, width: int) -> None:
    """Raise XDiTConfigError unless H and W are positive multiples of the family's pixel multiple."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % PIXEL_MULTIPLE:
            lower = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            raise XDiTConfigError(
                f"{name} {value} is not a multiple of {PIXEL_MULTIPLE} ({spec.family} latents are patched 2x2 "
                f"after the VAE's 8x); try {lower} or {lower + PIXEL_MULTIPLE}")


def empty_latent(spec: ModelSpec, batch: int, height: int, width: int) -> torch.Tensor:
    """An empty LATENT of the family's channels, as EmptyLatentImage / EmptySD3LatentImage make it."""
    return torch.zeros(batch, spec.latent_channels, height // 8, width // 8)


def build_request(spec: ModelSpec, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
                  sampler: str, scheduler: str, denoise: float, positive: BranchCond,
                  negative: Optional[BranchCond], guidance: Optional[float] = None,
                  shift: Optional[float | str] = None, batch_index: Optional[Sequence[int]] = None) -> SampleRequest:
    """KSampler's preparation of one run, from a ComfyUI LATENT tensor [B, C, H/8, W/8]."""
    validate_sampler_settings(sampler, scheduler, steps, denoise)
    latent = fix_empty_latent_channels(latent.float(), spec.latent_channels)
    if latent.ndim != 4 or latent.shape[1] != spec.latent_channels:
        raise XDiTConfigError(
            f"latent has shape {list(latent.shape)}, expected [B, {spec.latent_channels}, H/8, W/8] "
            f"for {spec.family}")
    height, width = latent.shape[2] * 8, latent.shape[3] * 8
    validate_size(spec, height, width)
    with_negative = not math.isclose(cfg, 1.0)
    if with_negative and negative is None:
        raise XDiTConfigError(f"cfg {cfg} needs negative conditioning (or set cfg to 1.0)")
    ms = spec.model_sampling(shift, width=width, height=height)
    noise = prepare_noise(latent, seed, batch_index)
    latent_image = spec.latent_format.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
    return SampleRequest(
        noise=noise, latent_image=latent_image, sigmas=calculate_sigmas(ms, scheduler, steps, denoise),
        positive=positive, negative=negative if with_negative else None, cfg=float(cfg),
        guidance=None if spec.default_guidance is None else (spec.default_guidance if guidance is None else guidance),
         sampler=sampler, seed=seed,
        shift=shift, height=height, width=width)
