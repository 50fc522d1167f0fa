"""DEIS coefficients in 'tab' mode, as ComfyUI's `comfy/k_diffusion/deis.py` computes them.

The schedule's sigmas are mapped to VP times t (with EDM's default sigma range, whatever the model), and
each step's coefficients integrate the exponential integrator's kernel times the Lagrange basis
polynomials through the last `order` times, numerically over N points of [t_i, t_next].
"""
from __future__ import annotations

import numpy as np
import torch

N_POINTS = 10000  # ComfyUI's N
# edm2t's defaults (EDM's sigma range), used for every model.
EPSILON_S, EDM_SIGMA_MIN, EDM_SIGMA_MAX = 1e-3, 0.002, 80


def _vp_betas() -> tuple[torch.Tensor, torch.Tensor]:
    """(beta_d, beta_min) of the VP schedule that spans EDM's sigma range, with ComfyUI's dtypes: its
    sigma_max is the integer 80, so that log (numpy's) is float64 and so are the betas; the sigma_min term
    is float32. beta_min is a difference of two nearly equal terms: these roundings show in it."""
    log_min = torch.tensor(np.log((torch.tensor(EDM_SIGMA_MIN) ** 2 + 1).numpy()))
    log_max = torch.tensor(np.log(EDM_SIGMA_MAX ** 2 + 1))
    beta_d = 2 * (log_min / EPSILON_S - log_max) / (EPSILON_S - 1)
    return beta_d, log_max - 0.5 * beta_d


def _integrand(taus: torch.Tensor, beta_0: torch.Tensor, beta_1: torch.Tensor) -> torch.Tensor:
    """-1/2 d(log alpha)/dtau / sqrt(alpha (1 - alpha)), alpha = exp(-tau^2 (beta_1 - beta_0) / 2 - tau beta_0).

    The derivative comes from autograd, as ComfyUI's does: the closed form -tau (beta_1 - beta_0) - beta_0
    rounds differently in the last bit, and the coefficients' cancellation turns that into ~1e-6 in x."""
    with torch.inference_mode(False), torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        alpha.log().sum().backward()
    alpha = alpha.detach()
    return -0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))


def deis_coefficients(sigmas: torch.Tensor, max_order: int) -> list[list[torch.Tensor]]:
    """Per step i: [] for an Euler step (the first, and any step to sigma 0), else the weights of the
    current derivative and of the previous min(i, max_order - 1) ones, newest first."""
    beta_d, beta_min = _vp_betas()
    sig = sigmas.detach().cpu()
    ts = ((beta_min ** 2 + 2 * beta_d * (sig ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    coeffs = []
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sig[i + 1] <= 0:  # the sampler steps with Euler there: nothing to integrate
            coeffs.append([])
            continue
        t_cur, t_next = ts[i], ts[i + 1]
        taus = torch.linspace(t_cur, t_next, N_POINTS)
        dtau = (t_next - t_cur) / N_POINTS  # ComfyUI's: N points but a step of 1/N of the interval
        kernel = _integrand(taus, beta_min, beta_d + beta_min)
        prev = ts[[i - k for k in range(order)]]
        step = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev[k]) / (prev[j] - prev[k]))
            step.append((torch.sum(kernel * poly) * dtau).to(sigmas.device))
        coeffs.append(step)
    return coeffs
