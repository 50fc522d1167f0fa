"""SampleRequest: everything a rank needs for one prompt, as plain tensors and dataclasses.

The host (CLI or ComfyUI node) builds it exactly as KSampler prepares a run: fix the empty latent's
channels, draw the noise for the seed, compute the sigmas, apply the latent format. Ranks run the
whole denoising loop from it without a round trip to the host.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError, XDiTNumericError
from xdit_core.models.families import PIXEL_MULTIPLE, ModelSpec
from xdit_core.models.base import BranchCond
from xdit_core.models.conditioning import MAX_SEED, check_finite
from xdit_core.sampling.samplers import calculate_sigmas, fix_empty_latent_channels, prepare_noise, validate_sampler_settings

# ComfyUI's own limits (nodes.MAX_RESOLUTION, EmptyLatentImage's batch_size, KSampler's cfg, the shift of the
# ModelSampling nodes, FluxGuidance; the seed's is MAX_SEED): a request ComfyUI could not make is refused here too.
MAX_RESOLUTION = 16384
MAX_BATCH = 4096
MAX_CFG = MAX_GUIDANCE = MAX_SHIFT = 100.0


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
    """Raise XDiTConfigError unless H and W are multiples of the family's pixel multiple in 16..MAX_RESOLUTION."""
    for name, value in (("height", height), ("width", width)):
        if not PIXEL_MULTIPLE <= value <= MAX_RESOLUTION:
            raise XDiTConfigError(f"{name} {value} is out of range; use {PIXEL_MULTIPLE} to {MAX_RESOLUTION} "
                                  f"pixels (ComfyUI's MAX_RESOLUTION)")
        if value % PIXEL_MULTIPLE:
            lower = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            raise XDiTConfigError(
                f"{name} {value} is not a multiple of {PIXEL_MULTIPLE} ({spec.family} latents are patched 2x2 "
                f"after the VAE's 8x); try {lower} or {lower + PIXEL_MULTIPLE}")


def validate_seed(seed: int) -> None:
    """Raise XDiTConfigError unless `seed` is in ComfyUI's range (torch would alias a negative one)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise XDiTConfigError(f"seed must be an integer in 0..{MAX_SEED} (ComfyUI's range), got {seed!r}")


def validate_number(name: str, value: Optional[float], low: float, high: float, low_inclusive: bool = True) -> None:
    """Raise XDiTNumericError for NaN or inf, XDiTConfigError outside [low, high] ((low, high] if not
    `low_inclusive`); None means unset."""
    if value is None:
        return
    if not math.isfinite(value):
        raise XDiTNumericError(f"{name} must be a finite number, got {value}")
    if not ((value >= low if low_inclusive else value > low) and value <= high):
        bracket = "[" if low_inclusive else "("
        raise XDiTConfigError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")


def validate_shift(spec: ModelSpec, shift: Optional[float | str]) -> None:
    """A numeric shift override: in (0, 100] as ComfyUI's ModelSampling nodes, and only for flow models."""
    if shift is None or shift == "auto":  # "auto": the model sampling checks the family
        return
    if spec.family == "pixart":
        raise XDiTConfigError(f"shift {shift} has no effect on pixart (ComfyUI's eps sampling has no shift); "
                              "leave it unset")
    validate_number("shift", float(shift), 0.0, MAX_SHIFT, low_inclusive=False)


def validate_latent_shape(spec: ModelSpec, shape: Sequence[int], source: str = "latent") -> None:
    """Raise XDiTConfigError unless `shape` is a ComfyUI LATENT [B, C, H/8, W/8] with 1..MAX_BATCH images of a
    valid size (channels are checked after an empty latent's are fixed)."""
    if len(shape) != 4:
        raise XDiTConfigError(f"{source} has shape {list(shape)}, expected 4 dims [B, {spec.latent_channels}, "
                              f"H/8, W/8] for {spec.family}")
    if not 1 <= shape[0] <= MAX_BATCH:
        raise XDiTConfigError(f"{source} batch must be 1..{MAX_BATCH} (ComfyUI's batch limit), got {shape[0]}")
    validate_size(spec, shape[2] * 8, shape[3] * 8)


def validate_batch_index(batch_index: Sequence[int], batch: int) -> list[int]:
    """ComfyUI's LATENT batch_index: one index per image, each in 0..MAX_BATCH-1 (prepare_noise draws every
    latent up to the largest). Returns it as a list of Python ints."""
    indices = list(batch_index)
    if len(indices) != batch:
        raise XDiTConfigError(f"batch_index has {len(indices)} entries but the latent has {batch} images; "
                              "give one index per image")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < MAX_BATCH]
    if bad:
        raise XDiTConfigError(f"batch_index entries must be integers in 0..{MAX_BATCH - 1}, got {bad[:4]}")
    return [int(i) for i in indices]


def empty_latent(spec: ModelSpec, batch: int, height: int, width: int) -> torch.Tensor:
    """An empty LATENT of the family's channels, as EmptyLatentImage / EmptySD3LatentImage make it."""
    return torch.zeros(batch, spec.latent_channels, height // 8, width // 8)


def build_request(spec: ModelSpec, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
                  sampler: str, scheduler: str, denoise: float, positive: BranchCond,
                  negative: Optional[BranchCond], guidance: Optional[float] = None,
                  shift: Optional[float | str] = None, batch_index: Optional[Sequence[int]] = None) -> SampleRequest:
    """KSampler's preparation of one run, from a ComfyUI LATENT tensor [B, C, H/8, W/8].

    Every input is checked first (ranges, shapes, finite values), so bad input fails here, before any rank.
    """
    validate_sampler_settings(sampler, scheduler, steps, denoise)
    validate_seed(seed)
    validate_number("cfg", cfg, 0.0, MAX_CFG)
    validate_number("guidance", guidance, 0.0, MAX_GUIDANCE)
    validate_shift(spec, shift)
    validate_latent_shape(spec, latent.shape)
    check_finite("latent", latent)
    latent = fix_empty_latent_channels(latent.float(), spec.latent_channels)
    if latent.shape[1] != spec.latent_channels:
        raise XDiTConfigError(
            f"latent has shape {list(latent.shape)}, expected [B, {spec.latent_channels}, H/8, W/8] "
            f"for {spec.family}")
    height, width = latent.shape[2] * 8, latent.shape[3] * 8
    if batch_index is not None:
        batch_index = validate_batch_index(batch_index, latent.shape[0])
    with_negative = not math.isclose(cfg, 1.0)
    if with_negative and negative is None:
        raise XDiTConfigError(f"cfg {cfg} needs negative conditioning (or set cfg to 1.0)")
    for branch, cond in (("positive", positive), ("negative", negative if with_negative else None)):
        if cond is not None:
            check_finite(f"{branch} conditioning", cond.text)
            if cond.pooled is not None:
                check_finite(f"{branch} pooled conditioning", cond.pooled)
    ms = spec.model_sampling(shift, width=width, height=height)
    noise = prepare_noise(latent, seed, batch_index)
    latent_image = spec.latent_format.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
    return SampleRequest(
        noise=noise, latent_image=latent_image, sigmas=calculate_sigmas(ms, scheduler, steps, denoise),
        positive=positive, negative=negative if with_negative else None, cfg=float(cfg),
        guidance=None if spec.default_guidance is None else (spec.default_guidance if guidance is None else guidance),
         sampler=sampler, seed=seed,
        shift=shift, height=height, width=width)
