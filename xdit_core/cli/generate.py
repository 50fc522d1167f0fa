"""`generate`: the engine's main job end to end (load, prepare like KSampler, sample, report)."""
from __future__ import annotations

import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from xdit_core import api
from xdit_core.api import (ATTENTION_BACKENDS, BACKENDS, DTYPES, ModelRef, ParallelConfig, SampleRequest,
                           XDiTConfigError, XDiTError, build_request, empty_latent, latent_shape, load_cond_file,
                           random_cond, validate_parallel_config, validate_sampler_settings, validate_size,
                           video_frames)

FP8_MODES = ("keep", "upcast")


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
    length: Optional[int] = None  # video frames (ComfyUI's `length`); video models only
    cfg: Optional[float] = None
    guidance: Optional[float] = None
    negative_guidance: Optional[float] = None
    shift: Optional[str] = None  # a number or "auto"
    sampler: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    latent: Optional[str] = None
    cond: Optional[str] = None
    dtype: str = "fp32"
    fp8: str = "keep"  # the file's fp8 weights: "keep" them fp8 (upcast per layer when used) or "upcast" at load
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
    shard_weights: bool = False
    attention_backend: str = "auto"
    oversubscribe: bool = False  # lift the cap on ranks and threads per machine

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(str(self.model), self.dtype, self.family, self.variant, keep_fp8=self.fp8 == "keep")

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.ulysses_degree, self.ring_degree, self.pipefusion_parallel_degree,
                              self.use_cfg_parallel, self.num_pipeline_patch, self.warmup_steps, self.shard_weights)


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


def latent_file_shape(path: str) -> list[int]:
    """The shape of a ComfyUI LATENT file's `samples` (or SaveLatent's `latent_tensor`), from its header only."""
    from safetensors import safe_open

    p = Path(path)
    try:
        if not p.is_file():
            raise XDiTConfigError(f"--latent file not found: {p}")
        with safe_open(str(p), "pt") as f:
            keys = set(f.keys())
            key = "samples" if "samples" in keys else "latent_tensor" if "latent_tensor" in keys else None
            if key is None:
                raise XDiTConfigError(f"--latent file {p} has no 'samples' tensor (keys: {sorted(keys)})")
            return list(f.get_slice(key).get_shape())
    except XDiTConfigError:
        raise
    except Exception as e:  # safetensors raises several types for a bad header
        raise XDiTConfigError(f"--latent file {p} is not a readable safetensors file: {e}") from None


def read_latent_file(path: str) -> tuple[torch.Tensor, Optional[list[int]]]:
    """A ComfyUI LATENT file's `samples` (or SaveLatent's `latent_tensor`) and optional 1-D integer `batch_index`;
    nothing else in the file is read. Check `latent_file_shape` first."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            samples = f.get_tensor("samples" if "samples" in keys else "latent_tensor")
            batch_index = f.get_tensor("batch_index") if "batch_index" in keys else None
    except Exception as e:  # safetensors raises several types for a bad file
        raise XDiTConfigError(f"--latent file {path} is not a readable safetensors file: {e}") from None
    if batch_index is not None and (batch_index.ndim != 1 or batch_index.is_floating_point()
                                    or batch_index.dtype == torch.bool):
        raise XDiTConfigError(f"--latent file {path}: batch_index must be a 1-D integer tensor, got "
                              f"{batch_index.dtype} of shape {list(batch_index.shape)}")
    return samples, None if batch_index is None else batch_index.tolist()


def _staging_path(folder: Path) -> Path:
    """A fresh hidden name in `folder` to write to before renaming over the destination (short: it must fit
    wherever the destination's name fits)."""
    return folder / f".xdit-{secrets.token_hex(6)}.tmp"


def check_output_path(flag: str, path: str) -> None:
    """Fail now, not after sampling, if `path` cannot be written: a folder, a device, under a file, not writable.

    The nearest existing folder gets a probe file (created and removed): only that catches a read-only file
    system, /proc or a root-squashed share, which os.access reports wrongly.
    """
    p = Path(path)
    try:
        if not path or p.is_dir():
            raise XDiTConfigError(f"{flag} {path!r} is a folder or empty; give a file path")
        if p.exists() and not p.is_file():  # renaming over /dev/null or a FIFO would replace it
            raise XDiTConfigError(f"{flag} {path} exists and is not a regular file; give a file path")
        folder = p.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise XDiTConfigError(f"{flag} {path}: {folder} is a file, not a folder")
    except OSError as e:  # a name too long, a folder without access
        raise XDiTConfigError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    probe = _staging_path(folder)
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:  # read-only, pseudo (/proc) or root-squashed file systems
        raise XDiTConfigError(f"{flag} {path} cannot be written: creating a file in {folder} fails "
                              f"({e.strerror or e}); choose a writable folder") from None


def _check_outputs(opts: GenerateOptions) -> None:
    """--out and --report: writable, distinct, and none of the run's inputs (they are replaced whole)."""
    outputs = {flag: path for flag, path in (("--out", opts.out), ("--report", opts.report)) if path is not None}
    for flag, path in outputs.items():
        check_output_path(flag, path)
    if len(outputs) == 2 and Path(opts.out).resolve() == Path(opts.report).resolve():
        raise XDiTConfigError(f"--out and --report are the same file {opts.out}; give two paths")
    model = Path(opts.model).resolve()
    inputs = {"--latent": opts.latent, "--cond": opts.cond}
    for flag, path in outputs.items():
        target = Path(path).resolve()
        if target == model or model in target.parents:
            raise XDiTConfigError(f"{flag} {path} would overwrite the model {opts.model}; write elsewhere")
        for name, given in inputs.items():
            if given is not None and target == Path(given).resolve():
                raise XDiTConfigError(f"{flag} {path} is the {name} file; write the result elsewhere")


def write_outputs(samples: torch.Tensor, report: dict[str, Any], out: str, report_path: Optional[str]) -> None:
    """Write the latent (and the report) atomically: each is written beside its destination, then renamed
    over it, so a failure leaves no partial file. Both are staged before either is renamed."""
    from safetensors.torch import save_file

    writers: list[tuple[str, str, Callable[[str], None]]] = [
        ("--out", out, lambda tmp: save_file({"samples": samples.contiguous()}, tmp))]
    if report_path:
        writers.append(("--report", report_path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2))))
    staged: list[str] = []  # temporaries not yet renamed into place
    done: list[str] = []
    current = ""
    try:
        for flag, dest, write in writers:
            current = f"{flag} {dest}"
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            staged.append(str(_staging_path(Path(dest).parent)))
            write(staged[-1])
        for (flag, dest, _), tmp in zip(writers, list(staged)):
            current = f"{flag} {dest}"
            os.replace(tmp, dest)
            staged.remove(tmp)
            done.append(dest)
    except OSError as e:
        wrote = f"wrote {', '.join(done)} but " if done else "nothing was written: "
        raise XDiTError(f"{wrote}could not write {current}: {e.strerror or e}") from None
    finally:
        for tmp in staged:
            Path(tmp).unlink(missing_ok=True)


def generate(opts: GenerateOptions) -> tuple[Optional[torch.Tensor], dict[str, Any]]:
    """Run one generation; returns (ComfyUI LATENT samples [B, C, H/8, W/8], video and one-frame families
    [B, C, frames, H/8, W/8]; REPORT dict).

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
    if samples is not None and spec.one_frame and samples.ndim == 4:  # Qwen-Image: ComfyUI's [B, C, 1, h, w]
        samples = samples.unsqueeze(2)
    load_s, per_rank = result.load_s, result.reports
    report = {"config": config, "world_size": world_size, "wall_s": time.perf_counter() - t_start,
              "load_s": load_s, "effective_num_pipeline_patch": per_rank[0].get("effective_num_pipeline_patch", 0),
              "per_rank": per_rank}
    return samples, report


def prepare(opts: GenerateOptions) -> tuple[SampleRequest, Any, float]:
    """Validate every flag and build the SampleRequest as KSampler would; returns (request, spec, cfg).

    Every check runs before a tensor of the request's size is made, a weight is read or a process started:
    flags, the model's header, the outputs, the input files' headers, the mesh against the model, the
    machine's limits, the memory estimate; only then are the inputs read (build_request checks their values:
    seed, cfg, guidance, shift, NaN or inf).
    """
    if opts.backend not in BACKENDS:
        raise XDiTConfigError(f"unknown backend {opts.backend!r}; valid: {', '.join(BACKENDS)}")
    if opts.dtype not in DTYPES:
        raise XDiTConfigError(f"unknown dtype {opts.dtype!r}; valid: {', '.join(DTYPES)}")
    if opts.fp8 not in FP8_MODES:
        raise XDiTConfigError(f"unknown --fp8 mode {opts.fp8!r}; valid: {', '.join(FP8_MODES)}")
    if opts.attention_backend not in ATTENTION_BACKENDS:
        raise XDiTConfigError(f"unknown attention backend {opts.attention_backend!r}; "
                              f"valid: {', '.join(ATTENTION_BACKENDS)}")
    validate_sampler_settings(opts.sampler, opts.scheduler, opts.steps, opts.denoise)
    if opts.batch < 1:
        raise XDiTConfigError(f"batch must be at least 1, got {opts.batch}")
    shift = _parse_shift(opts.shift)
    api.validate_ray_address(opts.ray_address)
    validate_parallel_config(opts.parallel)
    spec = api.describe_model(opts.model, opts.family, opts.variant)
    _check_outputs(opts)  # after the model path is known good: an output may not land on it

    if opts.latent is not None:
        shape = latent_file_shape(opts.latent)
        api.validate_latent_shape(spec, shape, f"--latent file {opts.latent}: samples")
        height, width = spec.pixel_size(shape)
        for name, given, actual in (("height", opts.height, height), ("width", opts.width, width),
                                    ("batch", opts.batch if opts.batch != 1 else None, shape[0])):
            if given is not None and given != actual:
                raise XDiTConfigError(f"--{name} {given} does not match the --latent file's {actual}")
    else:
        if opts.height is None or opts.width is None:
            raise XDiTConfigError("--height and --width are required without --latent")
        validate_size(spec, opts.height, opts.width)
        if opts.denoise < 1.0:
            raise XDiTConfigError(f"denoise {opts.denoise} < 1 needs a starting --latent")
        shape = latent_shape(spec, opts.batch, opts.height, opts.width, video_frames(spec, opts.length))
        api.validate_latent_shape(spec, shape)
    if spec.is_video and len(shape) == 4:  # an image latent is one frame (ComfyUI's fix_empty_latent_channels)
        shape = shape[:2] + [1] + shape[2:]
    batch = shape[0]
    cfg = spec.default_cfg if opts.cfg is None else opts.cfg
    validate_parallel_config(opts.parallel, num_heads=spec.num_heads, cfg=cfg, num_blocks=spec.num_blocks,
                             steps=opts.steps, latent_height=shape[-2], video=spec.is_video)
    with_negative = not math.isclose(cfg, 1.0)

    api.check_request_fits(
        opts.model, [batch, spec.latent_channels, *shape[2:]], opts.parallel, backend=opts.backend,
        remote=opts.backend == "ray" and api.uses_cluster(opts.ray_address),
        dtype=DTYPES[opts.dtype], attention_backend=opts.attention_backend, num_blocks=spec.num_blocks,
        with_negative=with_negative, text_tokens=_cond_text_tokens(opts.cond), threads=opts.threads,
        oversubscribe=opts.oversubscribe, family=spec.family, variant=spec.variant, keep_fp8=opts.fp8 == "keep")

    batch_index = None
    if opts.latent is not None:
        latent, batch_index = read_latent_file(opts.latent)
    else:
        latent = empty_latent(spec, batch, opts.height, opts.width, video_frames(spec, opts.length))
    if opts.cond is not None:
        positive, negative = load_cond_file(opts.cond, spec, batch, with_negative, shape)
    else:
        positive, negative = random_cond(spec, batch, opts.seed, with_negative, shape)
    request = build_request(spec, latent, seed=opts.seed, steps=opts.steps, cfg=cfg, sampler=opts.sampler,
                            scheduler=opts.scheduler, denoise=opts.denoise, positive=positive,
                            negative=negative, guidance=opts.guidance,
                            negative_guidance=opts.negative_guidance, shift=shift, batch_index=batch_index)
    return request, spec, cfg


def _cond_text_tokens(path: Optional[str]) -> int:
    """The longest text of a --cond file, from its header (the stand-in's length without one). An unreadable
    file counts 0 here: load_cond_file reports it."""
    from safetensors import safe_open

    if path is None:
        return api.RANDOM_TEXT_LENGTH
    try:
        with safe_open(path, "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in ("positive", "negative") if k in f.keys()]
    except Exception:  # safetensors raises several types for a bad header
        return 0
    return max((shape[1] for shape in shapes if len(shape) == 3), default=0)
