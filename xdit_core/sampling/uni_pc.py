"""UniPC with B(h) = h (bh1) or e^h - 1 (bh2), multistep up to order 3, as ComfyUI's `sample_unipc` runs it
(`comfy/extra_samplers/uni_pc.py`: data prediction, lower order at the start and the end).

ComfyUI's UniPC works in a variance-preserving frame: x_vp = x / sqrt(1 + sigma^2), the model's x0
recovered from its noise prediction. Each step here evaluates the model once at its own sigma, on the
predictor's x, then corrects that prediction with the new x0 and predicts the next sigma (the last step:
the final predictor, without corrector). Between steps x stays in the VP frame, as ComfyUI keeps it; the
first step converts into it and the last out of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Optional, Union

import torch

MAX_ORDER = 3
FINAL_SIGMA = 0.001  # what ComfyUI's sample_unipc puts in place of a final sigma 0

StepGen = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1. - torch.exp(2. * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR log(alpha / std) of the VP frame."""
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))


def _weighted(weights: torch.Tensor, terms: list[torch.Tensor]) -> Union[torch.Tensor, int]:
    return sum((w * d for w, d in zip(weights, terms)), 0)


@dataclass
class _Corrector:
    """What an update's corrector needs once the model is evaluated at the predicted x."""

    base: torch.Tensor  # the first-order part of the update
    scale: torch.Tensor  # alpha_t * B(h)
    residual: Union[torch.Tensor, int]  # the history's part of the correction
    rho: torch.Tensor  # the new evaluation's weight
    model_0: torch.Tensor

    def __call__(self, model_t: torch.Tensor) -> torch.Tensor:
        return self.base - self.scale * (self.residual + self.rho * (model_t - self.model_0))


class UniPC:
    """One run's UniPC state: the last x0 predictions with their sigmas, and the pending corrector."""

    def __init__(self, variant: str):
        self.variant = variant
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x0 prediction, sigma), oldest first
        self.corrector: Optional[_Corrector] = None

    def step(self, i: int, x: torch.Tensor, sigmas: torch.Tensor) -> StepGen:
        """Evaluate at sigmas[i] on the predicted x, correct it, predict x at sigmas[i + 1]; the last step
        returns the final x out of the VP frame."""
        n = len(sigmas) - 1
        order = min(MAX_ORDER, n - 1)
        sigma = sigmas[i]
        if i == 0:
            x = x / torch.sqrt(1.0 + sigma ** 2.0)
        x_in = x * ((sigma ** 2 + 1.0) ** 0.5)
        denoised = yield x_in, sigma
        model = self._data_prediction(x, x_in, sigma, denoised)
        if i > 0:
            x = self.corrector(model)
        self.history = (self.history + [(model, sigma)])[-MAX_ORDER:]
        if i < n - 1:
            x, self.corrector = self._update(x, sigmas[i + 1], min(i + 1, order, n - i), correct=True)
            return x
        last = sigmas[-1] if sigmas[-1] != 0 else torch.full_like(sigmas[-1], FINAL_SIGMA)
        if order > 0:  # one step has no update at all: ComfyUI returns the scaled input
            x, _ = self._update(x, last, 1, correct=False)
        return x / _alpha(last)

    @staticmethod
    def _data_prediction(x: torch.Tensor, x_in: torch.Tensor, sigma: torch.Tensor,
                         denoised: torch.Tensor) -> torch.Tensor:
        """x0 in the VP frame from the model's noise prediction (its wrapper's float operations)."""
        eps = (x_in - denoised) / sigma
        return (x - _std(sigma) * eps) / _alpha(sigma)

    def _update(self, x: torch.Tensor, sigma_t: torch.Tensor, order: int,
                correct: bool) -> tuple[torch.Tensor, Optional[_Corrector]]:
        """Predict x at sigma_t from the newest `order` history points; the corrector if `correct`."""
        model_0, sigma_0 = self.history[-1]
        lambda_0 = _lambda(sigma_0)
        h = _lambda(sigma_t) - lambda_0
        rks, d1s = [], []
        for model_k, sigma_k in reversed(self.history[-order:-1]):  # newest first
            rk = (_lambda(sigma_k) - lambda_0) / h
            rks.append(rk)
            d1s.append((model_k - model_0) / rk)
        rks = torch.tensor(rks + [1.], device=x.device)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows, b, factorial = [], [], 1
        for k in range(1, order + 1):
            rows.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat, b = torch.stack(rows), torch.tensor(b, device=x.device)
        alpha_t = _alpha(sigma_t)
        base = (_std(sigma_t) / _std(sigma_0)) * x - (alpha_t * h_phi_1) * model_0
        scale = alpha_t * b_h
        x_t = base
        if d1s:  # at order 2 ComfyUI takes the simplified predictor weight 1/2
            rhos_p = (torch.tensor([0.5], device=x.device) if order == 2
                      else torch.linalg.solve(r_mat[:-1, :-1], b[:-1]))
            x_t = base - scale * _weighted(rhos_p, d1s)
        if not correct:
            return x_t, None
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b)
        return x_t, _Corrector(base, scale, _weighted(rhos_c[:-1], d1s), rhos_c[-1], model_0)
