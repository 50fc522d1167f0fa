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
from xdit_core.sampling.deis import deis_coefficients
from xdit_core.sampling.noise import AncestralNoise, BrownianNoise, NoiseSource
from xdit_core.sampling.uni_pc import FINAL_SIGMA, UniPC

SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
              "linear_quadratic", "kl_optimal")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "lcm", "ddim", "gradient_estimation", "dpmpp_sde",
            "dpmpp_2m_sde", "deis", "res_multistep", "uni_pc", "uni_pc_bh2")
# KSampler computes one step more for these and drops the penultimate sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = ("uni_pc", "uni_pc_bh2")
GE_GAMMA = 2.0  # gradient_estimation's gamma, ComfyUI's default
DEIS_ORDER = 3  # deis's max_order, ComfyUI's default
SDE_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde")  # Brownian-tree noise, half-log-SNR steps
SDE_R = 0.5  # dpmpp_sde's r: its intermediate point at the middle of the step in half-log-SNR
# A flow schedule starting at sigma 1 has no half-log-SNR there: the SDE samplers move its first sigma to
# the model's sigma at this percent (ComfyUI's offset_first_sigma_for_snr).
SNR_PERCENT_OFFSET = 1e-4
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


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0,
                     sampler: Optional[str] = None) -> torch.Tensor:
    """KSampler's sigmas: the scheduler at `steps`, or at steps/denoise truncated to steps+1 values.

    For the samplers that discard the penultimate sigma, each schedule is computed one step longer
    and that sigma dropped (before a partial denoise keeps its tail)."""
    if scheduler not in _SCHEDULER_FNS:
        raise XDiTConfigError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")

    def schedule(n: int) -> torch.Tensor:
        if sampler not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            return _SCHEDULER_FNS[scheduler](ms, n)
        sigmas = _SCHEDULER_FNS[scheduler](ms, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    if denoise > 0.9999:
        return schedule(steps)
    return schedule(int(steps / denoise))[-(steps + 1):]


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


def make_noise(sampler: str, seed: int, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSource:
    """The noise `sampler` draws by default over the whole latent x (ComfyUI's default noise sampler):
    a Brownian tree over the schedule's range for the SDE samplers, else one draw per step."""
    if sampler in SDE_SAMPLERS:
        return BrownianNoise(seed, x.shape, sigmas[sigmas > 0].min(), sigmas.max())
    return AncestralNoise(seed, x.shape, x.dtype, x.device)


# A sampler step is a generator: it yields (x, sigma) for each model evaluation it needs, receives the
# denoised prediction, and returns the next x (uni_pc's in its own frame between steps, see uni_pc.py).
# The serial loop drives it directly; PipeFusion drives one per patch, so that multistep state and noise
# stay per patch.
StepGen = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


@dataclass
class Sampler:
    """One of k-diffusion's samplers as ComfyUI runs it, with its per-run state.

    `noise` gives the noise of this sampler's part of the latent (`NoiseSource.rows` for a PipeFusion
    patch); by default the sampler's own over the latent it is first given (`make_noise`).
    """

    name: str
    ms: ModelSampling
    seed: int
    noise: Optional[NoiseSource] = None

    def __post_init__(self) -> None:
        self.old_denoised: Optional[torch.Tensor] = None
        self.old_d: Optional[torch.Tensor] = None
        self.h_last: Optional[torch.Tensor] = None
        self.d_history: list[torch.Tensor] = []
        self.deis_coeffs: Optional[list[list[torch.Tensor]]] = None
        self.unipc: Optional[UniPC] = None

    def eval_sigmas(self, i: int, sigmas: torch.Tensor) -> list[torch.Tensor]:
        """The sigmas step i evaluates the model at, in order (PipeFusion schedules its rounds from them):
        heun and dpmpp_sde evaluate twice except on a step to sigma 0."""
        sigma_next = sigmas[i + 1]
        if self.name == "heun" and sigma_next != 0:
            return [sigmas[i], sigma_next]
        if self.name in SDE_SAMPLERS:
            sigma, sigma_next = self._sde_sigmas(i, sigmas)
            if self.name == "dpmpp_sde" and sigma_next != 0:
                return [sigma, self._sde_midpoint(sigma, sigma_next)[3]]
            return [sigma]
        return [sigmas[i]]

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

    def _noise(self, i: int, x: torch.Tensor, sigmas: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            self.noise = make_noise(self.name, self.seed, x, sigmas)
        return self.noise(i, sigma, sigma_next)

    # -- half-log-SNR, lambda = log(alpha / sigma): the SDE samplers' time, flow-aware (alpha = 1 - sigma) --
    def _half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.logit().neg() if self.ms.prediction == "const" else sigma.log().neg()

    def _sigma_of(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        return half_log_snr.neg().sigmoid() if self.ms.prediction == "const" else half_log_snr.neg().exp()

    def _sde_sigmas(self, i: int, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i's (sigma, sigma_next) as the SDE samplers take them: a flow schedule's first sigma 1 (no
        half-log-SNR there) moved to the model's sigma at SNR_PERCENT_OFFSET."""
        sigma = sigmas[i]
        if i == 0 and self.ms.prediction == "const" and sigma >= 1:
            # ComfyUI's percent_to_sigma of the flow samplings: the shifted sigma at time 1 - percent
            # (their timestep() scales a time to the model's units without shifting it).
            sigma = torch.full_like(sigma, float(self.ms.sigma(self.ms.timestep(1.0 - SNR_PERCENT_OFFSET))))
        return sigma, sigmas[i + 1]

    def _sde_midpoint(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dpmpp_sde's (lambda_s, lambda_t, lambda_mid, sigma_mid): its intermediate evaluation point."""
        lambda_s, lambda_t = self._half_log_snr(sigma), self._half_log_snr(sigma_next)
        lambda_mid = lambda_s + SDE_R * (lambda_t - lambda_s)
        return lambda_s, lambda_t, lambda_mid, self._sigma_of(lambda_mid)

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
            return self.ms.noise_scaling(sigmas[i + 1], self._noise(i, x, sigmas, sigmas[i], sigmas[i + 1]),
                                         denoised, False)
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
            return (alpha_next / alpha_down) * x + self._noise(i, x, sigmas, sigma, sigma_next) * renoise
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            return denoised
        d = (x - denoised) / sigma
        return x + d * (sigma_down - sigma) + self._noise(i, x, sigmas, sigma, sigma_next) * sigma_up

    # Stochastic samplers below run at ComfyUI's defaults eta 1 and s_noise 1 (factors of 1 left out).
    def _dpmpp_sde(self, i, x, sigmas):
        sigma, sigma_next = self._sde_sigmas(i, sigmas)
        denoised = yield x, sigma
        if sigma_next == 0:
            return denoised
        lambda_s, lambda_t, lambda_mid, sigma_mid = self._sde_midpoint(sigma, sigma_next)
        alpha_s, alpha_mid = sigma * lambda_s.exp(), sigma_mid * lambda_mid.exp()
        # An ancestral first-order step to the midpoint; then again from x to sigma_next with the midpoint's
        # prediction (at r = 1/2 it takes its whole weight).
        x_2 = self._sde_substep(x, denoised, lambda_s, lambda_mid, alpha_s, alpha_mid,
                                self._noise(i, x, sigmas, sigma, sigma_mid))
        denoised_2 = yield x_2, sigma_mid
        fac = 1 / (2 * SDE_R)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        return self._sde_substep(x, denoised_d, lambda_s, lambda_t, alpha_s, sigma_next * lambda_t.exp(),
                                 self._noise(i, x, sigmas, sigma, sigma_next))

    @staticmethod
    def _sde_substep(x, denoised, lambda_s, lambda_to, alpha_s, alpha_to, noise):
        """A first-order DPM-Solver++ step from lambda_s towards lambda_to, ancestral: to the reduced level,
        then the noise back up to it."""
        sigma_down, sigma_up = _ancestral_step(lambda_s.neg().exp(), lambda_to.neg().exp())
        h = sigma_down.log().neg() - lambda_s
        x = (alpha_to / alpha_s) * (-h).exp() * x - alpha_to * (-h).expm1() * denoised
        return x + alpha_to * noise * sigma_up

    def _dpmpp_2m_sde(self, i, x, sigmas):
        sigma, sigma_next = self._sde_sigmas(i, sigmas)
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = self._half_log_snr(sigma), self._half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * 2.0  # h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = sigma_next / sigma * (-h).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if self.old_denoised is not None:  # the midpoint solver's second-order correction
                r = self.h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - self.old_denoised)
            noise = self._noise(i, x, sigmas, sigma, sigma_next)
            x = x + noise * sigma_next * (-2 * h).expm1().neg().sqrt()
            self.h_last = h
        self.old_denoised = denoised
        return x

    def _res_multistep(self, i, x, sigmas):
        # ComfyUI's res_multistep: eta 0, so no noise, and steps to sigma_next itself.
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0 or self.old_denoised is None:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:  # second-order exponential multistep, in t = -log(sigma)
            t, t_next, t_prev = sigma.log().neg(), sigma_next.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * self.old_denoised)
        self.old_denoised = denoised
        return x

    def _deis(self, i, x, sigmas):
        if self.deis_coeffs is None:  # from the whole schedule, once per run
            self.deis_coeffs = deis_coefficients(sigmas, DEIS_ORDER)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        d = (x - denoised) / sigma
        coeffs = self.deis_coeffs[i]
        if not coeffs:  # Euler: the first step and any step to sigma 0
            x = x + (sigma_next - sigma) * d
        else:
            x = x + coeffs[0] * d
            for c, d_old in zip(coeffs[1:], reversed(self.d_history)):
                x = x + c * d_old
        self.d_history = (self.d_history + [d])[-(DEIS_ORDER - 1):]
        return x

    def _uni_pc(self, i, x, sigmas, variant="bh1"):
        if self.unipc is None:
            self.unipc = UniPC(variant)
        x = yield from self.unipc.step(i, x, sigmas)
        if i == len(sigmas) - 2 and sigmas[-1] == 0:
            # ComfyUI's sample_unipc writes its FINAL_SIGMA into the caller's schedule (a view), so KSampler
            # then undoes the noise scaling at that sigma, not at 0: for flow models a division by 0.999.
            x = self.ms.inverse_noise_scaling(torch.full_like(sigmas[-1], FINAL_SIGMA), x)
        return x

    def _uni_pc_bh2(self, i, x, sigmas):
        return (yield from self._uni_pc(i, x, sigmas, "bh2"))


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's get_ancestral_step at eta 1: (sigma_down, sigma_up)."""
    sigma_up = min(sigma_to, (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


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
