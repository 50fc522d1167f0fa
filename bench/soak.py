"""Soak: many warm requests on one local pool; does anything grow (memory, open files, threads)?

The driver (this process) and every rank are sampled from /proc after the first request and after the
last. A leak per request (a kept tensor, an unclosed channel, a thread per job) shows as growth here.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench.common import format_table, make_request, model_path
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.runtime import pool as pool_mod

RSS_GROWTH_LIMIT = 0.05


def process_sample(pid: int) -> dict[str, int]:
    """RSS (kB), open file descriptors and threads of `pid` (Linux /proc)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kb": int(status["VmRSS"].split()[0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray

    path = model_path(tmp, "flux", preset="tiny")
    _, spec = load_model(path)
    request = make_request(spec, opts.soak_size, 2, cfg=2.0)
    saved = os.environ.pop("XDIT_RAY_ADDRESS", None)
    try:
        pool_mod.unload()
        ray.shutdown()
        key = pool_mod.PoolKey(str(path), "fp32", None, None, ParallelConfig(ulysses_degree=2, use_cfg_parallel=True),
                               "auto", 1)
        pool = pool_mod.get_pool(key)
        pids = {"driver": os.getpid(), **{f"rank {i['rank']}": i["pid"] for i in pool.infos}}
        progress: list[int] = []
        t0 = time.perf_counter()
        pool.sample(request, on_progress=lambda i, n: progress.append(i), cancel=lambda: False)
        first = {name: process_sample(pid) for name, pid in pids.items()}
        for _ in range(opts.soak_requests - 1):
            pool.sample(request, on_progress=lambda i, n: progress.append(i), cancel=lambda: False)
        wall = time.perf_counter() - t0
        last = {name: process_sample(pid) for name, pid in pids.items()}
        same_actors = [i["pid"] for i in pool.infos] == [pids[f"rank {r}"] for r in range(len(pool.infos))]
    finally:
        pool_mod.unload()
        ray.shutdown()
        if saved is not None:
            os.environ["XDIT_RAY_ADDRESS"] = saved
    return {"requests": opts.soak_requests, "size": opts.soak_size, "mesh": key.parallel.describe(),
            "wall_s": wall, "progress_events": len(progress), "same_actors": same_actors,
            "first": first, "last": last}


def report(result: dict[str, Any]) -> str:
    rows = []
    for name, a in result["first"].items():
        b = result["last"][name]
        growth = b["rss_kb"] / a["rss_kb"] - 1
        verdict = "ok" if growth <= RSS_GROWTH_LIMIT and b["fds"] <= a["fds"] and b["threads"] <= a["threads"] else "GROWS"
        rows.append([name, a["rss_kb"] / 1024, b["rss_kb"] / 1024, f"{growth * 100:+.1f}%", f"{a['fds']} → {b['fds']}",
                     f"{a['threads']} → {b['threads']}", verdict])
    title = (f"Soak: {result['requests']} warm requests on one pool ({result['mesh']}, tiny Flux {result['size']}², "
             f"2 steps, cfg 2) in {result['wall_s']:.1f} s; after request 1 vs after request {result['requests']}; "
             f"same actors throughout: {result['same_actors']}")
    return format_table(title, ["process", "RSS first (MiB)", "RSS last (MiB)", "RSS growth", "open fds", "threads",
                                f"≤{RSS_GROWTH_LIMIT:.0%}, no fd/thread growth"], rows)
