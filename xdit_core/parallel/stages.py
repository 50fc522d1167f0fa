"""PipeFusion's split of the model: contiguous runs of blocks balanced by compute (under an optional memory
cap), and the patches (horizontal strips of the latent) that flow through them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError

# The split is made once per model, before any request: block costs are counted at one nominal size (every
# family here is tuned for about 1024x1024, and a few hundred text tokens). Flux's double- and single-stream
# blocks cost the same per token although a double block holds 2.4x the bytes, so bytes are the wrong measure.
NOMINAL_PIXELS = 1024
NOMINAL_TEXT_TOKENS = 256


def balance_stages(costs: Sequence[float], stages: int, sizes: Optional[Sequence[int]] = None,
                   cap: Optional[int] = None) -> list[range]:
    """Split blocks into `stages` contiguous runs minimising the largest run's cost (exact DP), each run's
    total `sizes` (bytes) at most `cap` when given."""
    n = len(costs)
    if stages > n:
        raise XDiTConfigError(f"pipefusion_parallel_degree {stages} is larger than the model's {n} blocks; "
                              f"use at most {n} stages")
    prefix, size_prefix = [0.0], [0]
    for i, c in enumerate(costs):
        prefix.append(prefix[-1] + c)
        size_prefix.append(size_prefix[-1] + (sizes[i] if sizes is not None else 0))
    # best[k][i]: smallest possible largest-stage cost for the first i blocks in k stages.
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                if cap is not None and size_prefix[i] - size_prefix[j] > cap:
                    continue
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    if math.isinf(best[stages][n]):
        raise XDiTConfigError(f"no split of the model's {n} blocks into {stages} PipeFusion stages keeps every "
                              f"stage's weights under {cap / 2 ** 30:.2f} GiB; use more stages or more memory")
    bounds, i = [], n
    for k in range(stages, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


@lru_cache(maxsize=16)
def _block_flops(config_json: str, family: str, variant: str) -> tuple[float, ...]:
    from diffusers.models.attention_dispatch import attention_backend
    from torch.utils.flop_counter import FlopCounterMode

    from xdit_core.models import make_adapter
    from xdit_core.models.base import BranchCond
    from xdit_core.models.families import model_class, resolve_model_spec
    from xdit_core.models.hunyuandit import CLIP_TOKENS, T5_TOKENS

    config = json.loads(config_json)
    spec = resolve_model_spec(config, family, variant)
    # PyTorch's own attention (whatever diffusers' backend is set to) runs on the meta device and is counted.
    with torch.device("meta"), attention_backend("native"):
        adapter = make_adapter(model_class(family).from_config(config), spec)
        side = NOMINAL_PIXELS // spec.latent_format.spatial_scale
        x = torch.zeros(1, spec.latent_format.channels, side, side)
        pooled = None if spec.pooled_dim is None else torch.zeros(1, spec.pooled_dim)
        cond = BranchCond(torch.zeros(1, NOMINAL_TEXT_TOKENS, spec.text_dim), pooled, spec.default_guidance)
        if spec.text2_dim is not None:  # HunyuanDiT: its two encoders' padded lengths and masks
            cond = BranchCond(torch.zeros(1, CLIP_TOKENS, spec.text_dim), text_mask=torch.ones(1, CLIP_TOKENS),
                              text2=torch.zeros(1, T5_TOKENS, spec.text2_dim), text2_mask=torch.ones(1, T5_TOKENS))
        tokens = adapter.embed(x, torch.ones(1), cond, spec.default_guidance)
        flops = []
        for block, run in adapter.blocks():
            with FlopCounterMode(display=False) as counter:
                tokens = run(block, tokens)
            flops.append(float(counter.get_total_flops()))
    return tuple(flops)


def block_flops(config: dict, spec) -> list[float]:
    """FLOPs of each block (in PipeFusion's order) for one image at the nominal size, counted on the meta
    device: nothing is allocated or read."""
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return list(_block_flops(json.dumps(clean, sort_keys=True, default=str), spec.family, spec.variant))


@dataclass(frozen=True)
class StageSplit:
    """PipeFusion's blocks per stage and what the split predicts of their compute."""

    ranges: list[range]
    costs: list[float]  # per stage, FLOPs at the nominal size

    @property
    def imbalance(self) -> float:
        """Slowest stage over the mean: the pipeline runs at the slowest stage's pace."""
        return max(self.costs) / (sum(self.costs) / len(self.costs))


def split_stages(config: dict, spec, stages: int, ranges: Optional[Sequence[range]] = None) -> StageSplit:
    """PipeFusion's split: contiguous stages balanced by FLOPs, or the given `ranges` (a split the memory plan
    made under a per-GPU cap, runtime/memory_plan.py) with their FLOPs."""
    flops = block_flops(config, spec)
    ranges = balance_stages(flops, stages) if ranges is None else list(ranges)
    return StageSplit(ranges, [sum(flops[i] for i in r) for r in ranges])


def stage_parts(ranges: Sequence[range], stage: int):
    """What PipeFusion stage `stage` of the split `ranges` loads: its blocks, the embedders every stage runs (for
    the per-token tables and the conditioning), and the output head on the last stage only."""
    from xdit_core.loading.load import ModelParts

    return ModelParts(ranges[stage], embed=True, head=stage == len(ranges) - 1)


def patch_rows(latent_height: int, patches: int, patch_size: int) -> list[tuple[int, int]]:
    """Latent row ranges of `patches` horizontal strips, each a whole number of patch rows (as even as
    possible). Fewer strips when the latent has fewer patch rows: the caller reports the effective M."""
    rows = latent_height // patch_size
    m = max(1, min(patches, rows))
    bounds = [round(i * rows / m) for i in range(m + 1)]
    return [(a * patch_size, b * patch_size) for a, b in zip(bounds, bounds[1:])]
