"""The denoising loop a rank runs for one SampleRequest (serial path)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .models.base import ModelAdapter
from .rank_context import RankContext
from .request import SampleRequest
from .sampling import ModelSampling, is_max_denoise, run_sampler

StepHook = Callable[[int, int], None]


def make_denoiser(adapter: ModelAdapter, ms: ModelSampling, request: SampleRequest,
                  ctx: Optional[RankContext] = None):
    """x, sigma -> CFG-combined x0 prediction, as ComfyUI's sampling_function computes it.

    With a RankContext: the model runs sequence-parallel over the SP group, and under CFG parallel
    cfg rank 0 evaluates the negative branch, rank 1 the positive, gathered before the formula.
    """
    dtype = adapter.dtype
    predict = adapter.predict
    cfg_comm = None
    if ctx is not None:
        if ctx.sp_degree > 1:
            from .sequence_parallel import SequenceParallelRunner

            predict = SequenceParallelRunner(adapter, ctx.sp_groups(), ctx.comm("sp")).predict
        if ctx.cfg_degree > 1:
            cfg_comm = ctx.comm("cfg")

    def predict_denoised(x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        xc = ms.calculate_input(sigma, x).to(dtype)
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x.device).expand(x.shape[0])
        out = predict(xc, timestep, cond, request.guidance).float()
        return ms.calculate_denoised(sigma, out, x)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if request.negative is None:  # cfg == 1: the negative branch is not evaluated at all
            return predict_denoised(x, sigma, request.positive)
        if cfg_comm is not None:
            mine = request.negative if cfg_comm.index == 0 else request.positive
            uncond, cond = cfg_comm.all_gather(predict_denoised(x, sigma, mine), "cfg_gather").unbind(0)
        else:
            cond = predict_denoised(x, sigma, request.positive)
            uncond = predict_denoised(x, sigma, request.negative)
        return uncond + (cond - uncond) * request.cfg

    return denoise


@torch.no_grad()
def run_request(adapter: ModelAdapter, request: SampleRequest, on_step: Optional[StepHook] = None,
                step_seconds: Optional[list[float]] = None, ctx: Optional[RankContext] = None) -> torch.Tensor:
    """Sample one request; returns the final latent in the model's space, float32 [B, C, h, w].

    Without `ctx` the run is serial; with it, this rank runs its share on an initialised process
    group (every rank of the mesh calls this with the same request) and every rank ends with the result.
    """
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    request = request.to(ctx.device if ctx is not None else next(adapter.model.parameters()).device)
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
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

    if ctx is not None and ctx.mesh.config.pipefusion_parallel_degree > 1:
        from .pipefusion import PipeFusionRunner

        runner = PipeFusionRunner(adapter, ctx)
        x = runner.run(request, ms, x, step_done)
        ctx.effective_patches = runner.effective_patches
    else:
        x = run_sampler(request.sampler, ms, x, sigmas, make_denoiser(adapter, ms, request, ctx),
                        request.seed, step_done)
    return ms.inverse_noise_scaling(sigmas[-1], x).float()
