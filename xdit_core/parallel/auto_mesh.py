"""The `auto` mesh: xDiT's published advice turned into a rule (Ulysses within a node for Flux and
whenever there is no negative branch; CFG parallel x PipeFusion for SD3 and PixArt)."""
from __future__ import annotations

import math

from xdit_core.parallel.mesh import ParallelConfig


def _split_sp(ranks: int, heads: int) -> tuple[int, int]:
    """(ulysses, ring) for `ranks` sequence-parallel ranks: as much Ulysses as the heads allow."""
    ulysses = max(d for d in range(1, ranks + 1) if ranks % d == 0 and heads % d == 0)
    return ulysses, ranks // ulysses


def choose_mesh(family: str, num_heads: int, ranks: int, cfg: float,
                num_blocks: int = 0) -> tuple[ParallelConfig, str]:
    """A mesh for `ranks` workers and the reason, in one line."""
    if ranks <= 1:
        return ParallelConfig(), "1 rank: serial"
    negative = not math.isclose(cfg, 1.0)
    if family == "wan":  # video: sequence parallel (PipeFusion splits image rows), CFG parallel with a negative
        cfg_ranks = 2 if negative and ranks % 2 == 0 else 1
        u, r = _split_sp(ranks // cfg_ranks, num_heads)
        return (ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=cfg_ranks == 2),
                f"wan video{f' with cfg {cfg:g}: CFG parallel 2 x' if cfg_ranks == 2 else ':'} Ulysses {u} x Ring "
                f"{r} (Ulysses as far as the {num_heads} heads divide; PipeFusion does not run video)")
    if family != "flux" and negative and ranks % 2 == 0:
        stages = ranks // 2
        if stages == 1 or stages <= num_blocks:
            return (ParallelConfig(pipefusion_parallel_degree=stages, use_cfg_parallel=True),
                    f"{family} with cfg {cfg:g}: CFG parallel 2 x PipeFusion {stages} (xDiT's advice; PipeFusion "
                    "after 1 exact warmup step is approximate, set warmup_steps = steps for exact)")
    u, r = _split_sp(ranks, num_heads)
    why = "Flux" if family == "flux" else f"{family} at cfg 1 (no negative branch)" if not negative else family
    return (ParallelConfig(ulysses_degree=u, ring_degree=r),
            f"{why}: Ulysses {u} x Ring {r} (Ulysses as far as the {num_heads} heads divide, within a node)")
