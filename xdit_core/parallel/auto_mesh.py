"""The `auto` mesh: with the links between the workers known, the mesh the performance model predicts fastest
among those that keep every Ulysses and Ring group inside one node; with the links unknown, xDiT's published
advice as a rule (Ulysses for Flux and whenever there is no negative branch; CFG parallel x PipeFusion for SD3
and PixArt)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import Cluster, Workload, predict
from xdit_core.parallel.perf_workloads import candidate_configs, describe

NOMINAL_STEPS = 28
APPROXIMATE = "PipeFusion is approximate after its 1 exact warmup step (warmup_steps = steps for exact)"


def _split_sp(ranks: int, heads: int) -> tuple[int, int]:
    """(ulysses, ring) for `ranks` sequence-parallel ranks: as much Ulysses as the heads allow."""
    ulysses = max(d for d in range(1, ranks + 1) if ranks % d == 0 and heads % d == 0)
    return ulysses, ranks // ulysses


def within_nodes(config: ParallelConfig, cluster: Cluster) -> bool:
    """Whether every Ulysses group and every Ring group of `config` stays on one node of `cluster`."""
    world = config.world_size
    return all(len({cluster.place(r, world)[0] for r in group}) == 1
               for dim in ("ulysses", "ring") for group in config.group_ranks(dim))


def choose_mesh(family: str, num_heads: int, ranks: int, cfg: float, num_blocks: int = 0, *,
                cluster: Optional[Cluster] = None, workload: Optional[Workload] = None,
                pipefusion: bool = True) -> tuple[ParallelConfig, str]:
    """A mesh for `ranks` workers and the reason, in one line. `cluster`: the workers' links (None: unknown);
    `workload`: the model at its nominal size (`perf_workloads.nominal_workload`); `pipefusion` False where
    PipeFusion cannot run (host-driven sampling). Video (family "wan") never runs PipeFusion."""
    if ranks <= 1:
        return ParallelConfig(), "1 rank: serial"
    negative = not math.isclose(cfg, 1.0)
    pipefusion = pipefusion and family != "wan"
    if cluster is None or workload is None:
        config, why = _rule(family, num_heads, ranks, cfg, num_blocks, negative, pipefusion)
        return config, f"links unknown, xDiT's advice: {why}"
    return _ranked(family, ranks, negative, cluster, replace(workload, branches=2 if negative else 1), pipefusion)


def _ranked(family: str, ranks: int, negative: bool, cluster: Cluster, w: Workload,
            pipefusion: bool) -> tuple[ParallelConfig, str]:
    """The model's fastest valid mesh, and a reason naming the links and the best two predictions."""
    # The most workers some valid mesh can use (without PipeFusion or CFG, sequence parallel cannot leave a node).
    for used in range(ranks, 0, -1):
        candidates = [c for c in candidate_configs(used, w.heads, len(w.blocks), w.branches, pipefusion)
                      if within_nodes(c, cluster)]
        if candidates:
            break
    serial = predict(w, ParallelConfig(), cluster, NOMINAL_STEPS).total
    times = {c: predict(w, c, cluster, NOMINAL_STEPS).total for c in candidates}
    ranked = sorted(candidates, key=times.get)
    best = ranked[0]
    why = f"{cluster.name}: {describe(best)} predicted {serial / times[best]:.2f}x over 1 GPU"
    if len(ranked) > 1:
        why += f", runner-up {describe(ranked[1])} {serial / times[ranked[1]]:.2f}x"
    if used < ranks:
        why += f"; {used} of the {ranks} workers (no mesh of all of them keeps Ulysses and Ring inside a node)"
    size = "Wan 480p clip" if family == "wan" else "1024x1024"
    why += f" ({w.branches} branch{'es' if w.branches > 1 else ''}, {size}, {NOMINAL_STEPS} steps)"
    if cluster.nodes > 1:
        why += "; Ulysses and Ring kept inside a node"
    if not pipefusion:
        why += "; without PipeFusion (" + ("video" if family == "wan" else "host-driven sampling") + ")"
    if best.pipefusion_parallel_degree > 1:
        why += f"; {APPROXIMATE}"
    return best, why


def _rule(family: str, num_heads: int, ranks: int, cfg: float, num_blocks: int, negative: bool,
          pipefusion: bool) -> tuple[ParallelConfig, str]:
    if family == "wan" or (negative and not pipefusion):  # CFG parallel with a negative, sequence parallel within
        cfg_ranks = 2 if negative and ranks % 2 == 0 else 1
        u, r = _split_sp(ranks // cfg_ranks, num_heads)
        what = "wan video" if family == "wan" else f"{family} without PipeFusion"
        return (ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=cfg_ranks == 2),
                f"{what}{f' with cfg {cfg:g}: CFG parallel 2 x' if cfg_ranks == 2 else ':'} Ulysses {u} x Ring "
                f"{r} (Ulysses as far as the {num_heads} heads divide)")
    if family != "flux" and negative and ranks % 2 == 0:
        stages = ranks // 2
        if stages == 1 or stages <= num_blocks:
            return (ParallelConfig(pipefusion_parallel_degree=stages, use_cfg_parallel=True),
                    f"{family} with cfg {cfg:g}: CFG parallel 2 x PipeFusion {stages}"
                    + (f"; {APPROXIMATE}" if stages > 1 else ""))
    u, r = _split_sp(ranks, num_heads)
    why = "Flux" if family == "flux" else f"{family} at cfg 1 (no negative branch)" if not negative else family
    return (ParallelConfig(ulysses_degree=u, ring_degree=r),
            f"{why}: Ulysses {u} x Ring {r} (Ulysses as far as the {num_heads} heads divide, within a node)")
