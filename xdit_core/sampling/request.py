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
from xdit_core.models.families import ModelSpec
from xdit_core.models.base import BranchCond
from xdit_core.models.conditioning import MAX_SEED, check_finite, prepare_branch
from xdit_core.sampling.samplers import MAX_STEPS, calculate_sigmas, fix_empty_latent_channels, prepare_noise, validate_sampler_settings
from xdit_core.sampling.inpaint import ddim_inpaint_noise, prepare_mask

# ComfyUI's own limits (nodes.MAX_RESOLUTION, EmptyLatentImage's batch_size, KSampler's cfg, the shift of the
# ModelSampling nodes, FluxGuidance; the seed's is MAX_SEED): a request ComfyUI could not make is refused here too.
MAX_RESOLUTION = 16384
MAX_BATCH = 4096
MAX_CFG = MAX_GUIDANCE = MAX_SHIFT = 100.0


MAX_LORA_STRENGTH = 100.0  # LoraLoaderModelOnly's range


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file applied at run time with a strength (the base weights stay as loaded)."""

    path: str
    strength: float


@dataclass
class SampleRequest:
    """One prompt's work; tensors in the model's latent space, float32, on CPU."""

    noise: torch.Tensor  # [B, C, h, w] ([B, C, frames, h, w] for video), comfy.sample.prepare_noise for the seed
    latent_image: torch.Tensor  # as noise, latent format applied (zeros for an empty latent)
    sigmas: torch.Tensor  # [steps + 1]
    positive: BranchCond
    negative: Optional[BranchCond]  # None when cfg == 1: ComfyUI evaluates no negative branch
    cfg: float
    sampler: str
    seed: int
    shift: Optional[float | str]  # model-sampling shift override; None = the family's default
    height: int  # pixels
    width: int
    noise_mask: Optional[torch.Tensor] = None  # as noise (prepare_mask): 1 where the latent is denoised
    inpaint_noise: Optional[torch.Tensor] = None  # what pins the unmasked region when it is not `noise` (ddim)
    unsampled: Optional[torch.Tensor] = None  # an empty step range: the LATENT ComfyUI returns as it is
    loras: tuple[LoraRef, ...] = ()  # applied in order on every rank, to the weights it holds
    preview: bool = False  # the host shows each step's prediction (ParallelConfig.preview_rank keeps it)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def guidance(self) -> Optional[float]:
        """The positive branch's Flux guidance (each branch carries its own)."""
        return self.positive.guidance

    def to(self, device: torch.device) -> "SampleRequest":
        """A copy with every tensor on `device`."""
        def move(c: Optional[BranchCond]) -> Optional[BranchCond]:
            return None if c is None else c.to(device)

        def opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return replace(self, noise=self.noise.to(device), latent_image=self.latent_image.to(device),
                       sigmas=self.sigmas.to(device), positive=move(self.positive), negative=move(self.negative),
                       noise_mask=opt(self.noise_mask), inpaint_noise=opt(self.inpaint_noise))


def validate_size(spec: ModelSpec, height: int, width: int) -> None:
    """Raise XDiTConfigError unless H and W are multiples of the family's pixel multiple in range."""
    multiple = spec.pixel_multiple
    for name, value in (("height", height), ("width", width)):
        if not multiple <= value <= MAX_RESOLUTION:
            raise XDiTConfigError(f"{name} {value} is out of range; use {multiple} to {MAX_RESOLUTION} "
                                  f"pixels (ComfyUI's MAX_RESOLUTION)")
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise XDiTConfigError(
                f"{name} {value} is not a multiple of {multiple} ({spec.family} latents are patched 2x2 "
                f"after the VAE's {spec.latent_format.spatial_scale}x); try {lower} or {lower + multiple}")


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
    if spec.family in ("pixart", "hunyuandit"):
        raise XDiTConfigError(f"shift {shift} has no effect on {spec.family} (ComfyUI's discrete eps/v sampling has no "
                              "shift); leave it unset")
    validate_number("shift", float(shift), 0.0, MAX_SHIFT, low_inclusive=False)


def latent_layout(spec: ModelSpec) -> str:
    """A LATENT's dims as the family's messages name them."""
    scale = spec.latent_format.spatial_scale
    frames = "frames, " if spec.is_video else "1, " if spec.one_frame else ""
    return f"[B, {spec.latent_channels}, {frames}H/{scale}, W/{scale}]"


def validate_latent_shape(spec: ModelSpec, shape: Sequence[int], source: str = "latent") -> None:
    """Raise XDiTConfigError unless `shape` is a ComfyUI LATENT [B, C, H/8, W/8] (video: [B, C, frames, H/8,
    W/8], or a 4-D image latent, taken as one frame) with 1..MAX_BATCH items of a valid size (channels are
    checked after an empty latent's are fixed)."""
    dims = (4, 5) if spec.latent_format.dims == 3 else (4,)
    if len(shape) not in dims:
        raise XDiTConfigError(f"{source} has shape {list(shape)}, expected {' or '.join(map(str, dims))} "
                              f"dims {latent_layout(spec)} for {spec.family}")
    if spec.one_frame and len(shape) == 5 and shape[2] != 1:
        raise XDiTConfigError(f"{source} has shape {list(shape)}: {shape[2]} frames, but {spec.family} makes images "
                              f"(one frame, {latent_layout(spec)})")
    if not 1 <= shape[0] <= MAX_BATCH:
        raise XDiTConfigError(f"{source} batch must be 1..{MAX_BATCH} (ComfyUI's batch limit), got {shape[0]}")
    if len(shape) == 5 and shape[2] < 1:
        raise XDiTConfigError(f"{source} has {shape[2]} frames; a video latent needs at least 1")
    validate_size(spec, *spec.pixel_size(shape))


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


@dataclass(frozen=True)
class StepRange:
    """KSamplerAdvanced's part of the schedule: steps start_at_step..end_at_step, with or without fresh noise,
    ending at sigma 0 or at the step's own sigma (the leftover noise a next sampler continues from)."""

    add_noise: bool = True
    start_at_step: int = 0
    end_at_step: int = MAX_STEPS
    return_with_leftover_noise: bool = False

    def validate(self) -> None:
        for name in ("start_at_step", "end_at_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_STEPS:
                raise XDiTConfigError(f"{name} must be an integer in 0..{MAX_STEPS} (KSamplerAdvanced's range), "
                                      f"got {value!r}")

    def apply(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The schedule KSampler.sample runs: cut at end_at_step (its sigma set to 0 unless leftover noise is
        returned), then from start_at_step; a single sigma when nothing is left to sample."""
        if self.end_at_step < len(sigmas) - 1:
            sigmas = sigmas[:self.end_at_step + 1].clone()
            if not self.return_with_leftover_noise:
                sigmas[-1] = 0
        if self.start_at_step >= len(sigmas) - 1:
            return sigmas[-1:]
        return sigmas[self.start_at_step:]


def with_guidance(spec: ModelSpec, cond: Optional[BranchCond], value: Optional[float],
                  name: str = "guidance") -> Optional[BranchCond]:
    """A branch with its Flux dev guidance embedding (ComfyUI gives each branch its own): `value`, else the
    family's default (3.5); unchanged for a family without one. `value` must be in [0, 100] (FluxGuidance)."""
    validate_number(name, value, 0.0, MAX_GUIDANCE)
    if cond is None or spec.default_guidance is None:
        return cond
    return replace(cond, guidance=spec.default_guidance if value is None else float(value))


def video_frames(spec: ModelSpec, length: Optional[int]) -> int:
    """Latent frames for `length` video frames, as ComfyUI's Wan nodes count them ((length - 1) // 4 + 1: the
    VAE keeps the first frame and packs the others by 4); 1 for an image model (`length` must be unset or 1)."""
    if length is None:
        return 1
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or not 1 <= length <= MAX_RESOLUTION:
        raise XDiTConfigError(f"length must be a whole number of video frames in 1..{MAX_RESOLUTION}, got {length!r}")
    if not spec.is_video:
        if length != 1:
            raise XDiTConfigError(f"length {length}: a {spec.family} model makes images; leave the length unset")
        return 1
    return (length - 1) // 4 + 1


def latent_shape(spec: ModelSpec, batch: int, height: int, width: int, frames: int = 1) -> list[int]:
    """The LATENT shape of `batch` images (video: of `frames` latent frames) of height x width pixels."""
    scale = spec.latent_format.spatial_scale
    video = [frames] if spec.is_video else []
    return [batch, spec.latent_channels, *video, height // scale, width // scale]


def empty_latent(spec: ModelSpec, batch: int, height: int, width: int, frames: int = 1) -> torch.Tensor:
    """An empty LATENT of the family's channels, as EmptyLatentImage / EmptySD3LatentImage make it; for video
    `frames` latent frames, as EmptyHunyuanLatentVideo / Wan22ImageToVideoLatent make them."""
    return torch.zeros(latent_shape(spec, batch, height, width, frames))


def build_request(spec: ModelSpec, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
                  sampler: str, scheduler: str, denoise: float, positive: BranchCond,
                  negative: Optional[BranchCond], guidance: Optional[float] = None,
                  negative_guidance: Optional[float] = None,
                  shift: Optional[float | str] = None, batch_index: Optional[Sequence[int]] = None,
                  noise_mask: Optional[torch.Tensor] = None, steps_range: StepRange = StepRange(),
                  loras: Sequence[LoraRef] = ()) -> SampleRequest:
    """KSampler's (KSamplerAdvanced's, with `steps_range`) preparation of one run, from a ComfyUI LATENT tensor
    [B, C, H/8, W/8] and its optional noise_mask.

    Every input is checked first (ranges, shapes, finite values), so bad input fails here, before any rank.
    """
    validate_sampler_settings(sampler, scheduler, steps, denoise)
    steps_range.validate()
    for lora in loras:
        validate_number(f"strength of LoRA {lora.path}", lora.strength, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH)
    validate_seed(seed)
    validate_number("cfg", cfg, 0.0, MAX_CFG)
    positive = with_guidance(spec, positive, guidance)
    negative = with_guidance(spec, negative, negative_guidance, "negative guidance")
    validate_shift(spec, shift)
    validate_latent_shape(spec, latent.shape)
    check_finite("latent", latent)
    latent = fix_empty_latent_channels(latent.float(), spec.latent_channels)
    if spec.is_video and latent.ndim == 4:  # as ComfyUI: an image latent is one frame of a video model's
        latent = latent.unsqueeze(2)
    if spec.one_frame and latent.ndim == 5:  # sampled as an image; the caller restores the frame axis
        latent = latent[:, :, 0]
    if latent.shape[1] != spec.latent_channels:
        raise XDiTConfigError(
            f"latent has shape {list(latent.shape)}, expected {latent_layout(spec)} for {spec.family}")
    height, width = spec.pixel_size(latent.shape)
    if batch_index is not None:
        batch_index = validate_batch_index(batch_index, latent.shape[0])
    with_negative = not math.isclose(cfg, 1.0)
    if with_negative and negative is None:
        raise XDiTConfigError(f"cfg {cfg} needs negative conditioning (or set cfg to 1.0)")
    positive = prepare_branch(spec, positive, latent.shape, "positive")
    negative = prepare_branch(spec, negative if with_negative else None, latent.shape, "negative")
    mask = None if noise_mask is None else prepare_mask(noise_mask, latent.shape)
    shift = spec.resolve_shift(shift, width, height, steps)
    ms = spec.model_sampling(shift, width=width, height=height)
    sigmas = calculate_sigmas(ms, scheduler, steps, denoise, sampler)
    sigmas = steps_range.apply(sigmas)
    if steps_range.add_noise:
        noise = prepare_noise(latent, seed, batch_index)
    else:
        noise = torch.zeros_like(latent)
    latent_image = spec.latent_format.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
    return SampleRequest(
        noise=noise, latent_image=latent_image, sigmas=sigmas, positive=positive,
        negative=negative, cfg=float(cfg), sampler=sampler, seed=seed, shift=shift, height=height, width=width,
        noise_mask=mask,
        inpaint_noise=ddim_inpaint_noise(seed, latent.shape) if mask is not None and sampler == "ddim" else None,
        unsampled=latent if len(sigmas) < 2 else None, loras=tuple(lora for lora in loras if lora.strength != 0))
