"""The noise a stochastic sampler adds while it runs, as ComfyUI draws it (`comfy/k_diffusion/sampling.py`).

A source gives noise for the WHOLE latent, asked for by step and by the interval (sigma, sigma_next) it
spans: ancestral samplers draw once per step, the SDE samplers take a Brownian increment over the
interval. PipeFusion shares one source between its patches and gives each its rows (`rows`), so every
patch sees exactly the serial run's noise.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class NoiseSource:
    """Noise for the whole latent at a step of the schedule; `rows` views a horizontal band of it."""

    def __call__(self, step: int, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, r0: int, r1: int) -> "NoiseSource":
        return RowNoise(self, r0, r1)


class RowNoise(NoiseSource):
    """Latent rows r0:r1 of another source's noise (one PipeFusion patch)."""

    def __init__(self, source: NoiseSource, r0: int, r1: int):
        self.source, self.r0, self.r1 = source, r0, r1

    def __call__(self, step: int, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.source(step, sigma, sigma_next)[:, :, self.r0:self.r1]


class AncestralNoise(NoiseSource):
    """ComfyUI's `default_noise_sampler`: one generator seeded with the sampling seed, one full-size draw
    per step that needs noise. The latest step's draw is kept so that the patches of a step share it."""

    def __init__(self, seed: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._draws: dict[int, torch.Tensor] = {}

    def __call__(self, step: int, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if step not in self._draws:
            self._draws = {step: torch.randn(self.shape, dtype=self.dtype, device=self.device,
                                             generator=self.generator)}
        return self._draws[step]


class BrownianNoise(NoiseSource):
    """ComfyUI's `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True)`: a torchsde Brownian
    tree over [sigma_min, sigma_max] on the CPU, entropy the sampling seed; the noise for (sigma, sigma_next)
    is the tree's increment between them, signed by direction, over sqrt|sigma_next - sigma|.

    The tree's values do not depend on the order of the queries; the latest one is kept so that the
    patches of a step ask the tree once. The tree is built at the first query (a PipeFusion stage that
    runs no sampler never builds it): its cache holds ~100 latent-sized tensors of host memory."""

    def __init__(self, seed: int, shape: Sequence[int], sigma_min: torch.Tensor, sigma_max: torch.Tensor):
        self.seed, self.shape = seed, tuple(shape)
        self.t_min, self.t_max = sigma_min.detach().cpu(), sigma_max.detach().cpu()
        self.tree = None
        self._last: tuple[tuple, Optional[torch.Tensor]] = ((), None)

    def __call__(self, step: int, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        key = (step, float(sigma), float(sigma_next))
        if self._last[0] != key:
            if self.tree is None:
                import torchsde  # only the SDE samplers need it

                self.tree = torchsde.BrownianTree(self.t_min, torch.zeros(self.shape), self.t_max, entropy=self.seed)
            lo, hi, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
            w = self.tree(lo.detach().cpu().float(), hi.detach().cpu().float())
            w = w.to(device=sigma.device, dtype=sigma.dtype) * sign
            self._last = (key, w / (sigma_next - sigma).abs().sqrt())
        return self._last[1]
