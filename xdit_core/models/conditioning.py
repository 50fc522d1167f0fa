"""The conditioning file contract (`--cond`) and the seeded stand-in conditioning used without one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from xdit_core.errors import XDiTConditioningError, XDiTConfigError, XDiTNumericError
from xdit_core.models.families import ModelSpec
from xdit_core.models.base import BranchCond

RANDOM_TEXT_LENGTH = 32
MAX_SEED = 0xffffffffffffffff  # ComfyUI's seed range is 0..MAX_SEED, which is what torch's generators take


def required_keys(spec: ModelSpec, with_negative: bool) -> list[str]:
    """Keys a `--cond` file must hold for this model (negative only when CFG evaluates it)."""
    branches = ["positive"] + (["negative"] if with_negative else [])
    keys = []
    for branch in branches:
        keys.append(branch)
        if spec.pooled_dim is not None:
            keys.append(f"{branch}_pooled")
    return keys


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise unless `tensor` is floating point with no NaN or inf: such input would only surface, unexplained,
    as a non-finite prediction after the weights are loaded."""
    if not tensor.is_floating_point():
        raise XDiTConfigError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise XDiTNumericError(f"{name} holds {int((~finite).sum())} NaN or inf values of {tensor.numel()}; "
                               "every value must be finite")


def check_shape(name: str, tensor: torch.Tensor, batch: int, width: int, text: bool,
                source: str = "--cond") -> torch.Tensor:
    """`tensor` as [batch, L, width] (text, L >= 1) or [batch, width] (pooled), repeating a batch of 1; its
    values must be finite floats."""
    expected = f"[{batch}, L, {width}] with L >= 1" if text else f"[{batch}, {width}]"
    ndim = 3 if text else 2
    if tensor.ndim != ndim or tensor.shape[-1] != width or tensor.shape[0] not in (1, batch) or \
            (text and tensor.shape[1] < 1):
        raise XDiTConditioningError(
            f"{source} tensor {name!r} has shape {list(tensor.shape)}, expected {expected} (batch 1 is repeated)")
    check_finite(f"{source} tensor {name!r}", tensor)
    return tensor.float().expand(batch, *tensor.shape[1:]).contiguous()


def load_cond_file(path: str | Path, spec: ModelSpec, batch: int,
                   with_negative: bool) -> tuple[BranchCond, Optional[BranchCond]]:
    """Read and validate a conditioning safetensors file; returns (positive, negative or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if not path.is_file():
            raise XDiTConditioningError(f"--cond file not found: {path}")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise XDiTConditioningError(f"--cond file {path} is not a readable safetensors file: {e}") from None
    missing = [k for k in required_keys(spec, with_negative) if k not in tensors]
    if missing:
        raise XDiTConditioningError(
            f"--cond file {path} lacks keys {missing}; a {spec.family} model needs "
            f"{required_keys(spec, with_negative)}")
    branches = []
    for branch in ["positive", "negative"] if with_negative else ["positive"]:
        text = check_shape(branch, tensors[branch], batch, spec.text_dim, text=True)
        pooled = None
        if spec.pooled_dim is not None:
            pooled = check_shape(f"{branch}_pooled", tensors[f"{branch}_pooled"], batch, spec.pooled_dim, False)
        branches.append(BranchCond(text, pooled))
    return branches[0], (branches[1] if with_negative else None)


def random_cond(spec: ModelSpec, batch: int, seed: int,
                with_negative: bool) -> tuple[BranchCond, Optional[BranchCond]]:
    """Stand-in conditioning of the right shapes from a generator seeded with `seed + 1`.

    Its own generator keeps the noise exactly ComfyUI's for `seed`. Both branches are always drawn,
    so the positive branch does not depend on the CFG scale.
    """
    gen = torch.Generator().manual_seed((seed + 1) % (MAX_SEED + 1))  # seed MAX_SEED wraps to 0
    branches = []
    for _ in range(2):
        text = torch.randn(batch, RANDOM_TEXT_LENGTH, spec.text_dim, generator=gen)
        pooled = torch.randn(batch, spec.pooled_dim, generator=gen) if spec.pooled_dim is not None else None
        branches.append(BranchCond(text, pooled))
    return branches[0], (branches[1] if with_negative else None)
