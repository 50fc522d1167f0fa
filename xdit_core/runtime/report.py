"""What every rank reports about a request: timings, memory, bytes sent (REPORT.json's `per_rank`)."""
from __future__ import annotations

import resource
from typing import Any, Optional

from xdit_core.parallel.comm import COMM_KINDS, CommCounter
from xdit_core.parallel.mesh import ParallelConfig


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_report(rank: int, config: ParallelConfig, param_bytes: int, step_s: list[float],
                counter: Optional[CommCounter], effective_patches: int = 0,
                pipefusion: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One rank's entry of REPORT.json's `per_rank` (param_bytes: the parameters this rank holds; `pipefusion`:
    the stage split, its predicted imbalance and this rank's measured bubble)."""
    zero = {k: 0 for k in COMM_KINDS}
    return {
        "rank": rank,
        "coords": {d: config.coords(rank)[d] for d in ("cfg", "pipefusion", "ring", "ulysses")},
        "effective_num_pipeline_patch": effective_patches,
        "param_bytes": param_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "step_s": step_s,
        "comm_bytes": dict(counter.total) if counter else zero,
        "comm_bytes_per_step": list(counter.per_step) if counter else [dict(zero) for _ in step_s],
        **({"pipefusion": pipefusion} if pipefusion is not None else {}),
    }
