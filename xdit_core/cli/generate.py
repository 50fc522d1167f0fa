"""`generate`: the engine's main job end to end (load, prepare like KSampler, sample, report)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from xdit_core import api
from xdit_core.api import (ATTENTION_BACKENDS, BACKENDS, DTYPES, ModelRef, ParallelConfig, SampleRequest,
                           XDiTConfigError, build_request, empty_latent, load_cond_file, random_cond,
                           validate_parallel_config, validate_sampler_settings, validate_size)


@dataclass
class GenerateOptions:
    """The flags of `python -m xdit_core generate`; None means the family's default."""

    model: str
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 20
    seed: int = 0
    family: Optional[str] = None
    variant: Optional[str] = None
    batch: int = 1
    cfg: Optional[float] = None
    guidance: Optional[float] = None
    shift: Optional[str] = None  # a number or "auto"
    sampler: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    latent: Optional[str] = None
    cond: Optional[str] = None
    dtype: str = "fp32"
    threads: Optional[int] = None
    backend: str = "local"
    out: Optional[str] = None
    report: Optional[str] = None
    ray_address: Optional[str] = None
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_parallel_degree: int = 1
    use_cfg_parallel: bool = False
    num_pipeline_patch: Optional[int] = None
    warmup_steps: int = 1
    attention_backend: str = "auto"

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(str(self.model), self.dtype, self.family, self.variant)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.ulysses_degree, self.ring_degree, self.pipefusion_parallel_degree,
                              self.use_cfg_parallel, self.num_pipeline_patch, self.warmup_steps)


def default_threads(ranks: int) -> int:
    """Cores divided by ranks, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks))


def _parse_shift(shift: Optional[str]) -> Optional[float | str]:
    if shift is None or shift == "auto":
        return shift
    try:
        return float(shift)
    except ValueError:
        raise XDiTConfigError(f"--shift must be a number or 'auto', got {shift!r}") from None


def read_latent_file(path: str) -> tuple[torch.Tensor, Optional[list[int]]]:
    """A ComfyUI LATENT file: `samples` (or SaveLatent's `latent_tensor`), optional `batch_index`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise XDiTConfigError(f"--latent file not found: {p}")
    try:
        tensors = load_file(str(p))
    except Exception as e:  # safetensors raises several types for a bad header
        raise XDiTConfigError(f"--latent file {p} is not a readable safetensors file: {e}") from None
    key = "samples" if "samples" in tensors else "latent_tensor" if "latent_tensor" in tensors else None
    if key is None:
        raise XDiTConfigError(f"--latent file {p} has no 'samples' tensor (keys: {sorted(tensors)})")
    batch_index = tensors["batch_index"].tolist() if "batch_index" in tensors else None
    return tensors[key].float(), batch_index


def generate(opts: GenerateOptions) -> tuple[Optional[torch.Tensor], dict[str, Any]]:
    """Run one generation; returns (ComfyUI LATENT samples [B, C, H/8, W/8], REPORT dict).

    Under `--backend env` only rank 0 gets the samples; the other ranks get None.

    Everything is validated before a weight is read or a process started. With all degrees 1 the
    run is in-process; otherwise the local backend spawns one process per rank.
    """
    t_start = time.perf_counter()
    request, spec, cfg = prepare(opts)
    world_size = opts.parallel.world_size
    threads = opts.threads or default_threads(world_size)
    config = asdict(opts)
    config.update(family=spec.family, variant=spec.variant, cfg=cfg, guidance=request.guidance,
                  threads=threads, height=request.height, width=request.width, batch=request.noise.shape[0])

    result = api.run(opts.backend, opts.model_ref, opts.parallel, request, threads, opts.attention_backend,
                     opts.ray_address)
    samples = None if result.samples is None else spec.latent_format.process_out(result.samples)
    load_s, per_rank = result.load_s, result.reports
    report = {"config": config, "world_size": world_size, "wall_s": time.perf_counter() - t_start,
              "load_s": load_s, "effective_num_pipeline_patch": per_rank[0].get("effective_num_pipeline_patch", 0),
              "per_rank": per_rank}
    return samples, report


def prepare(opts: GenerateOptions) -> tuple[SampleRequest, Any, float]:
    """Validate every flag and build the SampleRequest as KSampler would; returns (request, spec, cfg)."""
    if opts.backend not in BACKENDS:
        raise XDiTConfigError(f"unknown backend {opts.backend!r}; valid: {', '.join(BACKENDS)}")
    if opts.dtype not in DTYPES:
        raise XDiTConfigError(f"unknown dtype {opts.dtype!r}; valid: {', '.join(DTYPES)}")
    if opts.attention_backend not in ATTENTION_BACKENDS:
        raise XDiTConfigError(f"unknown attention backend {opts.attention_backend!r}; "
                              f"valid: {', '.join(ATTENTION_BACKENDS)}")
    validate_sampler_settings(opts.sampler, opts.scheduler, opts.steps, opts.denoise)
    if opts.batch < 1:
        raise XDiTConfigError(f"batch must be at least 1, got {opts.batch}")
    if opts.threads is not None and opts.threads < 1:
        raise XDiTConfigError(f"threads must be at least 1, got {opts.threads}")
    shift = _parse_shift(opts.shift)
    validate_parallel_config(opts.parallel)
    spec = api.describe_model(opts.model, opts.family, opts.variant)

    batch_index = None
    if opts.latent is not None:
        latent, batch_index = read_latent_file(opts.latent)
        for name, given, actual in (("height", opts.height, latent.shape[2] * 8),
                                    ("width", opts.width, latent.shape[3] * 8)):
            if given is not None and given != actual:
                raise XDiTConfigError(f"--{name} {given} does not match the --latent file's {actual}")
    else:
        if opts.height is None or opts.width is None:
            raise XDiTConfigError("--height and --width are required without --latent")
        validate_size(spec, opts.height, opts.width)
        if opts.denoise < 1.0:
            raise XDiTConfigError(f"denoise {opts.denoise} < 1 needs a starting --latent")
        latent = empty_latent(spec, opts.batch, opts.height, opts.width)
    batch = latent.shape[0]
    cfg = spec.default_cfg if opts.cfg is None else opts.cfg
    validate_parallel_config(opts.parallel, num_heads=spec.num_heads, cfg=cfg, num_blocks=spec.num_blocks,
                             steps=opts.steps, latent_height=latent.shape[2])
    with_negative = not math.isclose(cfg, 1.0)
    if opts.cond is not None:
        positive, negative = load_cond_file(opts.cond, spec, batch, with_negative)
    else:
        positive, negative = random_cond(spec, batch, opts.seed, with_negative)
    request = build_request(spec, latent, seed=opts.seed, steps=opts.steps, cfg=cfg, sampler=opts.sampler,
                            scheduler=opts.scheduler, denoise=opts.denoise, positive=positive,
                            negative=negative, guidance=opts.guidance, shift=shift, batch_index=batch_index)
    return request, spec, cfg
