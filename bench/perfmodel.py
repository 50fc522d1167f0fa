"""The performance model for the benchmarks: the engine's model (xdit_core/parallel/perf_model.py, links,
clusters, workloads, message sizes, `predict`; perf_workloads.py, FLOP workloads and meshes) re-exported for
the benchmark modules, plus what only the benchmarks use: fitting a device's throughput to a published time,
and the PipeFusion paper's communication table.

`paper_comm_elements` is the PipeFusion paper's communication table (per device per diffusion step, in
elements) and `exact_comm_elements` the exact per-rank volume of each method under the same idealised
shapes; tests/test_perfmodel.py checks that the exact forms reduce to the paper's.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import (LINKS, BlockCost, Cluster, Link, LinkCost, Prediction, Workload,
                                           message_bytes, predict, transfer_time, uniform_link)
from xdit_core.parallel.perf_workloads import (FLUX_DEV, HUNYUAN_VIDEO, SD35_LARGE, WAN21_T2V_14B, Architecture,
                                               best_config, candidate_configs, describe, flop_workload)

__all__ = ["LINKS", "BlockCost", "Cluster", "Link", "LinkCost", "Prediction", "Workload", "message_bytes", "predict",
           "transfer_time", "uniform_link", "FLUX_DEV", "HUNYUAN_VIDEO", "SD35_LARGE", "WAN21_T2V_14B", "Architecture",
           "best_config", "candidate_configs", "describe", "flop_workload", "calibrate_throughput", "PAPER_METHODS",
           "paper_comm_elements", "exact_comm_elements", "method_of"]


def calibrate_throughput(make: Any, target_s: float, cluster: Cluster, steps: int) -> float:
    """The seconds-per-FLOP for which `make(s_per_flop)`'s serial prediction equals `target_s` (bisection
    on a log scale; the prediction grows monotonically with it)."""
    lo, hi = 1e-18, 1e-9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if predict(make(mid), ParallelConfig(), cluster, steps).total < target_s:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


# ---------------------------------------------------------------------------------------------------
# The PipeFusion paper's communication table
# ---------------------------------------------------------------------------------------------------
PAPER_METHODS = ("tensor_parallel", "distrifusion", "ring", "ulysses", "pipefusion")


def paper_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Communication per device per diffusion step in the PipeFusion paper (arXiv 2405.14430), in
    elements: p tokens, hs hidden size, L layers, N devices. Works on numbers and sympy symbols."""
    return {
        "tensor_parallel": 4 * p * hs * L,
        "distrifusion": 2 * p * hs * L,
        "ring": 2 * p * hs * L,
        "ulysses": 4 * p * hs * L / N,
        "pipefusion": 2 * p * hs,
    }[method]


def exact_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Exact elements one device sends per step under the paper's idealisation (p divisible by N,
    one branch): TP two ring all-reduces per layer; DistriFusion an all-gather of K and V per layer;
    Ring N-1 hops of the local K and V per layer; Ulysses two all-to-alls per layer (Q, K and V together, then the output);
    PipeFusion, a middle stage: the activations of every patch received and sent once per step."""
    return {
        "tensor_parallel": 2 * 2 * (N - 1) * p * hs * L / N,
        "distrifusion": 2 * (N - 1) * p * hs * L / N,
        "ring": 2 * (N - 1) * p * hs * L / N,
        "ulysses": 4 * (N - 1) * p * hs * L / N**2,
        "pipefusion": 2 * p * hs,
    }[method]


def method_of(config: ParallelConfig) -> Optional[str]:
    """The paper's method a single-method config is (None for hybrids and CFG)."""
    active = [k for k, v in config.degrees.items() if v > 1]
    if len(active) != 1:
        return None
    return {"ulysses": "ulysses", "ring": "ring", "pipefusion": "pipefusion"}.get(active[0])
