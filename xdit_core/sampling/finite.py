"""A model that computes NaN or inf (non-finite weights, fp16 overflow) fails at its first step, naming
the step and the rank, instead of running to the end and returning an all-NaN latent."""
from __future__ import annotations

import torch

from xdit_core.errors import XDiTNumericError


def check_first_prediction(denoised: torch.Tensor, step: int, steps: int, rank: int) -> None:
    """Raise XDiTNumericError if the prediction holds NaN or inf (one reduction, once per run)."""
    if not bool(torch.isfinite(denoised).all()):
        raise XDiTNumericError(
            f"the model's prediction at step {step} of {steps} on rank {rank} contains NaN or inf: the weights "
            "hold non-finite values or the dtype overflows (try bf16 or fp32 instead of fp16)")
