"""PipeFusion's split of the model: contiguous runs of blocks balanced by parameter bytes, and the
patches (horizontal strips of the latent) that flow through them."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.parallel.mesh import ParallelConfig


def module_bytes(module: torch.nn.Module) -> int:
    """Parameter bytes of a module (meta tensors count by their shape)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def balance_stages(block_bytes: Sequence[int], stages: int) -> list[range]:
    """Split blocks into `stages` contiguous runs minimising the largest run's bytes (exact DP)."""
    n = len(block_bytes)
    if stages > n:
        raise XDiTConfigError(f"pipefusion_parallel_degree {stages} is larger than the model's {n} blocks; "
                              f"use at most {n} stages")
    prefix = [0]
    for b in block_bytes:
        prefix.append(prefix[-1] + b)
    # best[k][i]: smallest possible largest-stage bytes for the first i blocks in k stages.
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def stage_parts(config: dict, spec, stages: int, stage: int):
    """What PipeFusion stage `stage` of `stages` loads: its blocks, the embedders every stage runs
    (for the per-token tables and the conditioning), and the output head on the last stage only.

    The split is computed on a meta-device copy of the model, so nothing is read to decide it."""
    from xdit_core.loading.load import ModelParts
    from xdit_core.models import make_adapter
    from xdit_core.models.families import model_class

    with torch.device("meta"):
        model = model_class(spec.family).from_config(config)
    blocks = [b for b, _ in make_adapter(model, spec).blocks()]
    ranges = balance_stages([module_bytes(b) for b in blocks], stages)
    return ModelParts(ranges[stage], embed=True, head=stage == stages - 1)


def pipefusion_parts(model: str, family: Optional[str], variant: Optional[str], parallel: ParallelConfig,
                     rank: int):
    """The ModelParts mesh rank `rank` loads from the model at path `model`: its PipeFusion stage's
    share, or None (everything) without PipeFusion."""
    if parallel.pipefusion_parallel_degree == 1:
        return None
    from xdit_core.models.families import resolve_model_spec
    from xdit_core.loading.load import read_model_config

    config = read_model_config(model)
    return stage_parts(config, resolve_model_spec(config, family, variant), parallel.pipefusion_parallel_degree,
                       parallel.coords(rank)["pipefusion"])


def patch_rows(latent_height: int, patches: int, patch_size: int) -> list[tuple[int, int]]:
    """Latent row ranges of `patches` horizontal strips, each a whole number of patch rows (as even as
    possible). Fewer strips when the latent has fewer patch rows: the caller reports the effective M."""
    rows = latent_height // patch_size
    m = max(1, min(patches, rows))
    bounds = [round(i * rows / m) for i in range(m + 1)]
    return [(a * patch_size, b * patch_size) for a, b in zip(bounds, bounds[1:])]
