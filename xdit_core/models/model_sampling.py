"""ComfyUI's model sampling per family: how sigma maps to the model's timestep, input scaling and the
prediction type (`comfy/model_sampling.py`)."""
from __future__ import annotations

import math

import torch


class ModelSampling:
    """A sigma table plus the prediction parametrisation (CONST = flow, EPS = noise)."""

    sigmas: torch.Tensor
    prediction: str  # "const" (flow matching), "eps" (noise) or "v" (velocity)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Input/output parametrisation (ComfyUI's CONST and EPS classes).
    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.prediction == "const":
            return x
        return x / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.prediction == "v":  # ComfyUI's V_PREDICTION (sigma_data 1)
            return x / (sigma ** 2 + 1.0) - model_output * sigma / (sigma ** 2 + 1.0) ** 0.5
        return x - model_output * sigma

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool) -> torch.Tensor:
        if self.prediction == "const":
            return sigma * noise + (1.0 - sigma) * latent
        if max_denoise:
            return noise * torch.sqrt(1.0 + sigma ** 2.0) + latent
        return noise * sigma + latent

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if self.prediction == "const":
            return latent / (1.0 - sigma)
        return latent


def _time_snr_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class DiscreteFlowSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscreteFlow (SD3 shift 3.0 x1000; Flux schnell shift 1.0 x1)."""

    prediction = "const"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        self.shift = shift
        self.multiplier = multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return _time_snr_shift(self.shift, timestep / self.multiplier)


class FluxSampling(ModelSampling):
    """ComfyUI's ModelSamplingFlux (Flux dev: constant shift 1.15; the node's `auto` shift)."""

    prediction = "const"

    def __init__(self, shift: float = 1.15, timesteps: int = 10000):
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / timestep - 1) ** 1.0)


class DiscreteEpsSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscrete + EPS (PixArt: sqrt_linear betas 1e-4..0.02, 1000 steps)."""

    prediction = "eps"
    beta_schedule = "sqrt_linear"  # ComfyUI's name: a plain linspace of the betas

    def __init__(self, linear_start: float = 1e-4, linear_end: float = 0.02, timesteps: int = 1000):
        # In float64, as ComfyUI's make_beta_schedule; its "linear" is the linspace of the square roots, squared.
        if self.beta_schedule == "linear":
            betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class DiscreteVSampling(DiscreteEpsSampling):
    """ComfyUI's ModelSamplingDiscrete + V_PREDICTION with its default "linear" betas (HunyuanDiT: 0.00085..0.018,
    0.03 for v1.0/1.1)."""

    prediction = "v"
    beta_schedule = "linear"


def flux_auto_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """The shift ComfyUI's ModelSamplingFlux node computes from the image size in pixels."""
    mm = (max_shift - base_shift) / (4096 - 256)
    b = base_shift - mm * 256
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


def flux2_mu(image_tokens: int, steps: int) -> float:
    """diffusers' Flux2Pipeline compute_empirical_mu: the exponential time shift for `image_tokens` at `steps`."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_tokens > 4300:
        return float(a2 * image_tokens + b2)
    m_200 = a2 * image_tokens + b2
    m_10 = a1 * image_tokens + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + m_200 - 200.0 * a)
