"""ComfyUI-exact sampling: schedulers, samplers, noise.

Every formula here follows ComfyUI's KSampler (`comfy/model_sampling.py`, `comfy/samplers.py`,
`comfy/k_diffusion/sampling.py`, `comfy/sample.py`) so that the same seed and settings give the same
latent; the tests compare against fixtures produced by ComfyUI's own code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Optional, Sequence

import numpy as np
import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.models.model_sampling import ModelSampling

SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
              "linear_quadratic", "kl_optimal")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "lcm", "ddim", "gradient_estimation")
GE_GAMMA = 2.0  # gradient_estimation's gamma, ComfyUI's default
MAX_STEPS = 10000  # KSampler's steps widget
# The longest schedule a partial denoise computes: KSampler's most steps at its smallest denoise step (0.01).
MAX_SCHEDULE = 100 * MAX_STEPS


# ---------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------
def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def _simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def _normal(ms: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def _beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    import scipy.stats  # only this scheduler needs scipy

    total = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total)
    sigs, last_t = [], -1
    for t in ts:
        if t != last_t:
            sigs.append(float(ms.sigmas[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def _ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Every stride-th sigma of the model's table from its second entry, descending, then zero (unless the
    table's second sigma already is zero: then one step more and no appended zero)."""
    ends_at_zero = math.isclose(float(ms.sigmas[1]), 0, abs_tol=0.00001)
    stride = max(len(ms.sigmas) // (steps + 1 if ends_at_zero else steps), 1)
    sigs = [float(ms.sigmas[i]) for i in range(1, len(ms.sigmas), stride)]
    return torch.FloatTensor(sigs[::-1] + ([] if ends_at_zero else [0.0]))


def _linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Noise levels rising linearly to `threshold_noise` over the first half of the steps, then along the
    quadratic that meets it with the same slope and ends at 1; as sigmas, 1 - level times sigma_max."""
    if steps == 1:
        levels = [1.0, 0.0]
    else:
        linear = steps // 2
        quadratic = steps - linear
        gap = linear - threshold_noise * steps
        a = gap / (linear * quadratic ** 2)
        b = threshold_noise / linear - 2 * gap / (quadratic ** 2)
        c = a * (linear ** 2)
        rising = [i * threshold_noise / linear for i in range(linear)]
        rising += [a * (i ** 2) + b * i + c for i in range(linear, steps)] + [1.0]
        levels = [1.0 - x for x in rising]
    return torch.FloatTensor(levels) * ms.sigma_max.cpu()


def _kl_optimal(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Sigmas evenly spaced in arctan(sigma) from sigma_max down to sigma_min, then zero."""
    if steps < 2:  # its spacing divides by steps - 1: ComfyUI's own returns NaN at one step
        raise XDiTConfigError("the kl_optimal scheduler needs at least 2 steps (it spaces sigma_max to sigma_min "
                              "over steps - 1 intervals); use 2 or more, or another scheduler")
    t = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    arctan_max, arctan_min = math.atan(float(ms.sigma_max)), math.atan(float(ms.sigma_min))
    return _append_zero((t * arctan_min + (1 - t) * arctan_max).tan_())


_SCHEDULER_FNS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": _simple,
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "beta": _beta,
    "ddim_uniform": _ddim_uniform,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


def validate_sampler_settings(sampler: str, scheduler: str, steps: int, denoise: float) -> None:
    """Raise XDiTConfigError for a setting KSampler would not accept."""
    if sampler not in SAMPLERS:
        raise XDiTConfigError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise XDiTConfigError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise XDiTConfigError(f"steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:
        raise XDiTConfigError(f"steps must be at most {MAX_STEPS} (KSampler's range), got {steps}")
    if not (0.0 < denoise <= 1.0):
        raise XDiTConfigError(f"denoise must be in (0, 1], got {denoise}")
    # A partial denoise computes the schedule at steps / denoise and keeps its tail.
    if denoise <= 0.9999 and steps / denoise > MAX_SCHEDULE:
        raise XDiTConfigError(f"denoise {denoise} with {steps} steps needs a {int(steps / denoise)}-step schedule; "
                              f"the most is {MAX_SCHEDULE}, so use denoise >= {steps / MAX_SCHEDULE:g}")


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """KSampler's sigmas: the scheduler at `steps`, or at steps/denoise truncated to steps+1 values."""
    if scheduler not in _SCHEDULER_FNS:
        raise XDiTConfigError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if denoise > 0.9999:
        return _SCHEDULER_FNS[scheduler](ms, steps)
    full = _SCHEDULER_FNS[scheduler](ms, int(steps / denoise))
    return full[-(steps + 1):]


def is_max_denoise(ms: ModelSampling, sigmas: torch.Tensor) -> bool:
    """ComfyUI's Sampler.max_denoise: does the schedule start at the model's largest sigma?"""
    max_sigma, sigma = float(ms.sigma_max), float(sigmas[0])
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------
def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The noise `comfy.sample.prepare_noise` makes: a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, generator=generator, device="cpu")
    unique, inverse = np.unique(np.asarray(batch_index), return_inverse=True)
    draws = []
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn([1] + list(latent.shape[1:]), dtype=latent.dtype, generator=generator, device="cpu")
        if i in unique:
            draws.append(noise)
    return torch.cat([draws[i] for i in inverse.reshape(-1)], dim=0)


def fix_empty_latent_channels(latent: torch.Tensor, channels: int) -> torch.Tensor:
    """An all-zero latent with the wrong channel count becomes the model's (ComfyUI semantics)."""
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        return torch.zeros(latent.shape[0], channels, *latent.shape[2:], dtype=latent.dtype)
    return latent


# ---------------------------------------------------------------------------------------------
# Samplers. `denoise(x, sigma) -> denoised` is the CFG-applied x0 prediction, sigma a 0-d tensor.
# ---------------------------------------------------------------------------------------------
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]


class AncestralNoise:
    """ComfyUI's `default_noise_sampler`: one generator seeded with the sampling seed, one full-size draw
    per step that needs noise. Draws are cached by step so that patches of the same step share one draw."""

    def __init__(self, seed: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._draws: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> torch.Tensor:
        if step not in self._draws:
            self._draws = {step: torch.randn(self.shape, dtype=self.dtype, device=self.device,
                                             generator=self.generator)}
        return self._draws[step]


# A sampler step is a generator: it yields (x, sigma) for each model evaluation it needs, receives the
# denoised prediction, and returns the next x. The serial loop drives it directly; PipeFusion drives
# one per patch, so that multistep state and ancestral noise stay per patch.
StepGen = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


@dataclass
class Sampler:
    """One of k-diffusion's samplers as ComfyUI runs it, with its per-run state.

    `noise(step)` gives the ancestral noise for this sampler's part of the latent at a step; by default
    the whole latent's draw.
    """

    name: str
    ms: ModelSampling
    seed: int
    noise: Optional[Callable[[int], torch.Tensor]] = None

    def __post_init__(self) -> None:
        self.old_denoised: Optional[torch.Tensor] = None
        self.old_d: Optional[torch.Tensor] = None

    def evaluations(self, i: int, sigmas: torch.Tensor) -> int:
        """Model evaluations step i needs (heun: two, except when it ends at sigma 0)."""
        return 2 if self.name == "heun" and sigmas[i + 1] != 0 else 1

    def step(self, i: int, x: torch.Tensor, sigmas: torch.Tensor, denoise: Denoiser) -> torch.Tensor:
        """Advance x from sigmas[i] to sigmas[i+1], calling `denoise` for every evaluation."""
        gen = self.step_gen(i, x, sigmas)
        request = next(gen)
        while True:
            try:
                request = gen.send(denoise(*request))
            except StopIteration as done:
                return done.value

    def step_gen(self, i: int, x: torch.Tensor, sigmas: torch.Tensor) -> StepGen:
        return getattr(self, "_" + self.name)(i, x, sigmas)

    def _ancestral_noise(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            self.noise = AncestralNoise(self.seed, x.shape, x.dtype, x.device)
        return self.noise(i)

    def _euler(self, i, x, sigmas):
        sigma = sigmas[i]
        denoised = yield x, sigma
        d = (x - denoised) / sigma
        return x + d * (sigmas[i + 1] - sigma)

    def _ddim(self, i, x, sigmas):
        # ComfyUI's "ddim" is its euler sampler (with random inpainting noise, which masks would use).
        return (yield from self._euler(i, x, sigmas))

    def _lcm(self, i, x, sigmas):
        denoised = yield x, sigmas[i]
        if sigmas[i + 1] > 0:  # renoise the prediction to the next level with a fresh draw
            return self.ms.noise_scaling(sigmas[i + 1], self._ancestral_noise(i, x), denoised, False)
        return denoised

    def _gradient_estimation(self, i, x, sigmas):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = x + d * dt
            if self.old_d is not None:  # from the second step: correct by the change of the gradient
                x = x + (GE_GAMMA - 1) * (d - self.old_d) * dt
        self.old_d = d
        return x

    def _heun(self, i, x, sigmas):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            return x + d * dt
        x_2 = x + d * dt
        denoised_2 = yield x_2, sigma_next
        d_2 = (x_2 - denoised_2) / sigma_next
        return x + (d + d_2) / 2 * dt

    def _dpmpp_2m(self, i, x, sigmas):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        t, t_next = -sigma.log(), -sigma_next.log()
        h = t_next - t
        ratio = (-t_next).exp() / (-t).exp()
        if self.old_denoised is None or sigma_next == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            h_last = t + sigmas[i - 1].log()
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.old_denoised
            x = ratio * x - (-h).expm1() * denoised_d
        self.old_denoised = denoised
        return x

    def _euler_ancestral(self, i, x, sigmas):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        if self.ms.prediction == "const":  # ComfyUI switches to the rectified-flow variant (eta 1)
            if sigma_next == 0:
                return denoised
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1))
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            return (alpha_next / alpha_down) * x + self._ancestral_noise(i, x) * renoise
        sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        if sigma_down == 0:
            return denoised
        d = (x - denoised) / sigma
        return x + d * (sigma_down - sigma) + self._ancestral_noise(i, x) * sigma_up


def run_sampler(name: str, ms: ModelSampling, x: torch.Tensor, sigmas: torch.Tensor, denoise: Denoiser,
                seed: int, on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Run the whole loop; `on_step(i + 1, n)` after each step (for progress and cancel)."""
    sampler = Sampler(name, ms, seed)
    n = len(sigmas) - 1
    for i in range(n):
        x = sampler.step(i, x, sigmas, denoise)
        if on_step is not None:
            on_step(i + 1, n)
    return x
