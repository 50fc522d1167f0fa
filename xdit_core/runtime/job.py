"""One rank's job: load its share of a model once, then run the denoising loop of each request on it
(serially, sequence/CFG parallel, or as one PipeFusion stage)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from xdit_core.errors import XDiTCancelled, XDiTConfigError
from xdit_core.loading.load import DTYPES, load_model
from xdit_core.loading.lora import LoraWeights, load_lora
from xdit_core.models import make_adapter
from xdit_core.models.base import BranchCond, ModelAdapter
from xdit_core.models.families import ModelSpec
from xdit_core.models.lora import LoraHandle, apply_loras
from xdit_core.models.model_sampling import ModelSampling
from xdit_core.parallel.comm import CommCounter
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.mesh import Mesh, ParallelConfig
from xdit_core.parallel.pipefusion import PipeFusionRunner
from xdit_core.parallel.sequence_parallel import SequenceParallelRunner
from xdit_core.parallel.sharding import BlockSharder, local_param_bytes
from xdit_core.parallel.stages import stage_parts
from xdit_core.runtime.memory_plan import model_memory
from xdit_core.runtime.report import rank_report
from xdit_core.sampling.finite import check_first_prediction
from xdit_core.sampling.inpaint import Inpaint
from xdit_core.sampling.preview import StepPreview
from xdit_core.sampling.request import LoraRef, SampleRequest
from xdit_core.sampling.samplers import Denoiser, is_max_denoise, run_sampler

StepHook = Callable[[int, int], None]


BranchOutputs = Callable[[torch.Tensor, torch.Tensor, BranchCond, Optional[BranchCond]],
                         tuple[torch.Tensor, Optional[torch.Tensor]]]


def make_branch_outputs(adapter: ModelAdapter, ctx: Optional[RankContext] = None) -> BranchOutputs:
    """(xc, timestep, positive, negative or None) -> the raw model outputs of both branches, float32, on
    every rank: what ComfyUI's apply_model gives for a model input already scaled by the host's model sampling.

    The in-rank loop (`make_denoiser`) and host-driven evaluations (the host keeps ComfyUI's model sampling
    and CFG) use it: sequence parallel over the SP group; under CFG parallel cfg rank 0 evaluates the
    negative (the positive again when there is none), rank 1 the positive, gathered.
    """
    predict = adapter.predict
    cfg_comm = None
    if ctx is not None:
        if ctx.sp_degree > 1:
            predict = SequenceParallelRunner(adapter, ctx.sp_groups(adapter.dtype), ctx.comm("sp")).predict
        if ctx.cfg_degree > 1:
            cfg_comm = ctx.comm("cfg")

    def run(xc: torch.Tensor, timestep: torch.Tensor, cond: BranchCond) -> torch.Tensor:
        return predict(xc.to(adapter.dtype), timestep, cond, cond.guidance).float()

    def outputs(xc: torch.Tensor, timestep: torch.Tensor, positive: BranchCond,
                negative: Optional[BranchCond]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if cfg_comm is not None:
            mine = negative if cfg_comm.index == 0 and negative is not None else positive
            uncond, cond = cfg_comm.all_gather(run(xc, timestep, mine), "cfg_gather").unbind(0)
            return cond, uncond if negative is not None else None
        return run(xc, timestep, positive), None if negative is None else run(xc, timestep, negative)

    return outputs


def make_denoiser(adapter: ModelAdapter, ms: ModelSampling, request: SampleRequest,
                  ctx: Optional[RankContext] = None) -> Denoiser:
    """x, sigma -> CFG-combined x0 prediction, as ComfyUI's sampling_function computes it: both branches'
    outputs from `make_branch_outputs` (sequence and CFG parallel with a RankContext), then the CFG formula."""
    outputs = make_branch_outputs(adapter, ctx)
    checked = False

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x.device).expand(x.shape[0])
        timestep = adapter.spec.model_timestep(timestep, request.noise_mask)
        # cfg == 1: request.negative is None, and the negative branch is not evaluated at all
        cond, uncond = outputs(ms.calculate_input(sigma, x), timestep, request.positive, request.negative)
        out = ms.calculate_denoised(sigma, cond, x)
        if uncond is not None:
            uncond = ms.calculate_denoised(sigma, uncond, x)
            out = uncond + (out - uncond) * request.cfg
        if not checked:
            checked = True
            check_first_prediction(out, 1, request.steps, dist.get_rank() if ctx is not None else 0)
        return out

    return denoise


def inpaint_of(spec: ModelSpec, ms: ModelSampling, request: SampleRequest) -> Optional[Inpaint]:
    """The request's noise_mask with what pins the region outside it, or None without a mask."""
    if request.noise_mask is None:
        return None
    noise = request.noise if request.inpaint_noise is None else request.inpaint_noise
    return Inpaint(request.noise_mask, request.latent_image, noise, partial(spec.scale_latent_inpaint, ms))


def denoise_latent(spec: ModelSpec, ms: ModelSampling, request: SampleRequest,
                   loop: Callable[[torch.Tensor, Optional[Inpaint]], torch.Tensor]) -> torch.Tensor:
    """What ComfyUI's KSAMPLER does around a sampler: noise the latent to the first sigma, run `loop(x,
    inpaint)`, undo the noise scaling at the last sigma. Returns float32 in the model's latent space."""
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
    x = loop(x, inpaint_of(spec, ms, request))
    return ms.inverse_noise_scaling(sigmas[-1], x).float()


def serial_loop(request: SampleRequest, ms: ModelSampling, denoise: Denoiser, on_step: Optional[StepHook] = None,
                preview: Optional[StepPreview] = None) -> Callable[[torch.Tensor, Optional[Inpaint]], torch.Tensor]:
    """The sampler's loop over `denoise` (the whole latent at once), through the noise_mask if any."""
    def loop(x: torch.Tensor, inpaint: Optional[Inpaint]) -> torch.Tensor:
        masked = denoise if inpaint is None else inpaint.denoiser(denoise)
        if preview is not None:
            masked = preview.capture(masked)
        return run_sampler(request.sampler, ms, x, request.sigmas, masked, request.seed, on_step)

    return loop


def stop_agreed(should_stop: Callable[[], bool], ctx: Optional[RankContext]) -> bool:
    """Rank 0's stop flag, on every rank (one broadcast: every rank leaves at the same step)."""
    flag = torch.tensor([1 if should_stop() else 0], device=ctx.device if ctx is not None else "cpu")
    if ctx is not None and ctx.mesh.config.world_size > 1:
        dist.broadcast(flag, src=ctx.mesh.ranks[0], group=ctx.mesh.group("mesh"))
    return bool(flag.item())


@torch.no_grad()
def run_request(adapter: ModelAdapter, request: SampleRequest, on_step: Optional[StepHook] = None,
                step_seconds: Optional[list[float]] = None, ctx: Optional[RankContext] = None,
                preview: Optional[StepPreview] = None, should_stop: Optional[Callable[[], bool]] = None,
                stage_ranges: Optional[list[range]] = None) -> torch.Tensor:
    """Sample one request; returns the final latent in the model's space, float32 [B, C, h, w].

    Without `ctx` the run is serial; with it, this rank runs its share on an initialised process
    group (every rank of the mesh calls this with the same request) and every rank ends with the result.
    `on_step(i, n)` is called on every rank when it has finished step i (PipeFusion's stages finish a step at
    different times). `preview`, when given, holds each step's prediction before `on_step` is called (on the
    ranks that see whole predictions; see ParallelConfig.preview_rank). `should_stop`, read on rank 0 at each
    step boundary, cancels: every rank raises XDiTCancelled before the same step (every rank must pass one,
    or none). `stage_ranges`: PipeFusion's split as the ranks loaded it (default: by compute, uncapped).
    """
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    request = request.to(ctx.device if ctx is not None else next(adapter.model.parameters()).device)
    last = [time.perf_counter()]

    def step_done(i: int, n: int) -> None:
        now = time.perf_counter()
        if step_seconds is not None:
            step_seconds.append(now - last[0])
        last[0] = now
        if ctx is not None:
            ctx.counter.end_step()
        if on_step is not None:
            on_step(i, n)
        if preview is not None:
            preview.step_done()

    def step_boundary(i: int, n: int) -> None:
        step_done(i, n)
        if should_stop is not None and i < n and stop_agreed(should_stop, ctx):
            raise XDiTCancelled(f"cancelled after step {i} of {n}")

    def pipefusion_loop(x: torch.Tensor, inpaint: Optional[Inpaint]) -> torch.Tensor:
        runner = PipeFusionRunner(adapter, ctx, stage_ranges)
        out = runner.run(request, ms, x, step_done, inpaint, preview, should_stop)  # its cancel is in-band
        ctx.effective_patches = runner.effective_patches
        return out

    if ctx is not None:
        ctx.begin_run()  # fresh point-to-point channels per run (emulated NCCL mode)
    try:
        if ctx is not None and ctx.mesh.config.pipefusion_parallel_degree > 1:
            loop = pipefusion_loop
        else:
            loop = serial_loop(request, ms, make_denoiser(adapter, ms, request, ctx), step_boundary, preview)
        return denoise_latent(adapter.spec, ms, request, loop)
    finally:
        if ctx is not None:
            ctx.end_run()


@dataclass
class Evaluations:
    """One prompt's host-driven model evaluations on a rank: the conditioning stays here between calls."""

    outputs: BranchOutputs
    positive: BranchCond
    negative: Optional[BranchCond]
    device: torch.device
    ctx: Optional[RankContext]
    loras: LoraHandle

    @torch.no_grad()
    def __call__(self, xc: torch.Tensor, timestep: torch.Tensor,
                 with_negative: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw outputs (positive, negative or None) for a scaled model input; float32 on the CPU."""
        if with_negative and self.negative is None:
            raise XDiTConfigError("this evaluation needs the negative branch, but no negative conditioning was given")
        cond, uncond = self.outputs(xc.to(self.device), timestep.float().to(self.device), self.positive,
                                    self.negative if with_negative else None)
        return cond.cpu(), None if uncond is None else uncond.cpu()

    def close(self) -> None:
        self.loras.remove()
        if self.ctx is not None:
            self.ctx.end_run()


def stage_split(model: "ModelRef", stages: int, device: torch.device) -> list[range]:
    """PipeFusion's blocks per stage, as the memory plan splits them (ModelMemory.stage_ranges): by compute, each
    stage's weights within a share of the mesh's smallest GPU (agreed by every rank: one all-reduce)."""
    device_bytes = None
    if device.type == "cuda":
        total = torch.tensor([torch.cuda.get_device_properties(device).total_memory], device=device)
        if dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.MIN)
        device_bytes = int(total.item())
    return model_memory(model.path, model.family, model.variant).stage_ranges(
        stages, DTYPES[model.dtype].itemsize, model.keep_fp8, device_bytes)


@dataclass(frozen=True)
class ModelRef:
    """Which weights a rank loads: a model file or folder and how to read it (None: detected)."""

    path: str
    dtype: str = "fp32"
    family: Optional[str] = None
    variant: Optional[str] = None
    keep_fp8: bool = True  # fp8 Linear weights stay fp8 on the device (False: upcast to `dtype` at load)


class RankJob:
    """One rank's share of one model on one mesh: loads its weights once, then runs requests.

    The same code runs every rank whatever launched it: the local backend's spawned processes,
    torchrun (`--backend env`) and the pool's Ray actors. A mesh of one rank runs serially, without
    a process group.
    """

    def __init__(self, rank: int, device: torch.device, model: ModelRef, parallel: ParallelConfig,
                 attention_backend: str = "auto", ctx: Optional[RankContext] = None):
        """`ctx`: the rank's context when it already has one (a worker holding several models shares it)."""
        if ctx is None and parallel.world_size > 1:
            ctx = RankContext(Mesh(parallel), device, attention_backend)
        self.ctx = ctx
        t0 = time.perf_counter()
        P = parallel.pipefusion_parallel_degree
        self.stage_ranges = stage_split(model, P, device) if P > 1 else None
        parts = None if self.stage_ranges is None else stage_parts(self.stage_ranges, parallel.coords(rank)["pipefusion"])
        # Sharded: each block is sharded as soon as it is read, so the load peaks at one whole block.
        sharder = BlockSharder(ctx) if parallel.shard_weights and ctx is not None else None
        net, self.spec = load_model(model.path, model.dtype, model.family, model.variant, device=device, parts=parts,
                                    keep_fp8=model.keep_fp8, on_block=sharder)
        self.load_s = time.perf_counter() - t0
        self.rank, self.parallel = rank, parallel
        self.adapter = make_adapter(net, self.spec)
        self.param_bytes = local_param_bytes(net)
        self._loras: dict[str, tuple[tuple[int, int], LoraWeights]] = {}  # path -> (mtime and size, weights)

    def loras(self, refs: Sequence[LoraRef]) -> LoraHandle:
        """Hook `refs` onto the layers this rank holds (remove the handle after the run). A LoRA file is read
        once while it is unchanged and in use; the base weights are never touched, so changing a LoRA or its
        strength reads nothing of the model."""
        kept = {}
        for ref in refs:
            stat = os.stat(ref.path)
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._loras.get(ref.path)
            if cached is None or cached[0] != key:
                cached = (key, load_lora(ref.path, self.spec.family, self.adapter.model.state_dict()))
            kept[ref.path] = cached
        self._loras = kept
        return apply_loras(self.adapter.model, [(kept[ref.path][1], ref.strength) for ref in refs])

    def evaluations(self, positive: BranchCond, negative: Optional[BranchCond],
                    loras: Sequence[LoraRef] = ()) -> "Evaluations":
        """Start host-driven evaluations of this model with a prompt's conditioning (kept on the device) and
        LoRAs (hooked until the session closes)."""
        if self.parallel.pipefusion_parallel_degree > 1:
            raise XDiTConfigError("PipeFusion runs the sampling loop inside the ranks; host-driven evaluations "
                                  "(the xDiT Guider) take a mesh of Ulysses, Ring and CFG degrees only")
        device = self.ctx.device if self.ctx is not None else next(self.adapter.model.parameters()).device

        def to_device(c: Optional[BranchCond]) -> Optional[BranchCond]:
            return None if c is None else c.to(device)

        handle = self.loras(loras)
        if self.ctx is not None:
            self.ctx.counter = CommCounter()
            self.ctx.begin_run()
        return Evaluations(make_branch_outputs(self.adapter, self.ctx), to_device(positive), to_device(negative),
                           device, self.ctx, handle)

    def run(self, request: SampleRequest, on_step: Optional[StepHook] = None,
            preview: Optional[StepPreview] = None, should_stop: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        """Sample `request`; returns rank 0's latent (model space, float32, CPU; None elsewhere) and the report.
        `should_stop` cancels at a step boundary (run_request)."""
        if self.ctx is not None:
            self.ctx.counter = CommCounter()
        step_s: list[float] = []
        with self.loras(request.loras):
            out = run_request(self.adapter, request, on_step=on_step, step_seconds=step_s, ctx=self.ctx,
                              preview=preview, should_stop=should_stop, stage_ranges=self.stage_ranges)
        counter = self.ctx.counter if self.ctx is not None else None
        patches = self.ctx.effective_patches if self.ctx is not None else 0
        stats = self.ctx.pipefusion_stats if self.ctx is not None else None
        return {"samples": out.cpu() if self.rank == 0 else None, "load_s": self.load_s,
                "report": rank_report(self.rank, self.parallel, self.param_bytes, step_s, counter, patches, stats)}
