"""The denoising loop a rank runs for one SampleRequest (serial path)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .models.base import ModelAdapter
from .request import SampleRequest
from .sampling import ModelSampling, is_max_denoise, run_sampler

StepHook = Callable[[int, int], None]


def make_denoiser(adapter: ModelAdapter, ms: ModelSampling, request: SampleRequest):
    """x, sigma -> CFG-combined x0 prediction, as ComfyUI's sampling_function computes it."""
    dtype = adapter.dtype

    def predict_denoised(x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        xc = ms.calculate_input(sigma, x).to(dtype)
        timestep = ms.timestep(sigma.reshape(1)).float().expand(x.shape[0])
        out = adapter.predict(xc, timestep, cond, request.guidance).float()
        return ms.calculate_denoised(sigma, out, x)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = predict_denoised(x, sigma, request.positive)
        if request.negative is None:  # cfg == 1: the negative branch is not evaluated at all
            return cond
        uncond = predict_denoised(x, sigma, request.negative)
        return uncond + (cond - uncond) * request.cfg

    return denoise


@torch.no_grad()
def run_request(adapter: ModelAdapter, request: SampleRequest, on_step: Optional[StepHook] = None,
                step_seconds: Optional[list[float]] = None) -> torch.Tensor:
    """Sample one request; returns the final latent in the model's space, float32 [B, C, h, w]."""
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
    last = [time.perf_counter()]

    def step_done(i: int, n: int) -> None:
        now = time.perf_counter()
        if step_seconds is not None:
            step_seconds.append(now - last[0])
        last[0] = now
        if on_step is not None:
            on_step(i, n)

    x = run_sampler(request.sampler, ms, x, sigmas, make_denoiser(adapter, ms, request), request.seed, step_done)
    return ms.inverse_noise_scaling(sigmas[-1], x).float()
