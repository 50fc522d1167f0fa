"""Memory per rank per config: parameter bytes the rank holds, and resident memory (after imports, after
loading the model, peak over the run), each config in fresh processes so that the peak is its own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import bench_world
from bench.common import format_table, make_request, model_path
from bench.perfmodel import describe
from xdit_core.runtime.launch import spawn_world
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig

CFG_SCALE = 3.5


def configs() -> dict[str, ParallelConfig]:
    pc = ParallelConfig
    return {
        "serial": pc(),
        "ulysses 2": pc(ulysses_degree=2),
        "ring 2": pc(ring_degree=2),
        "cfg 2": pc(use_cfg_parallel=True),
        "pipefusion 2": pc(pipefusion_parallel_degree=2),
        "pipefusion 4": pc(pipefusion_parallel_degree=4),
        "pipefusion 2 x ulysses 2": pc(pipefusion_parallel_degree=2, ulysses_degree=2),
    }


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = model_path(tmp, "flux")
    _, spec = load_model(path)
    request = make_request(spec, opts.mem_size, 1, cfg=CFG_SCALE)
    rows = {}
    for name, cfg in configs().items():
        ranks = spawn_world(
            bench_world.memory_world, cfg.world_size, (str(path), cfg, request), threads=1, timeout_s=1800
        )
        rows[name] = {"parallel": describe(cfg), "ranks": ranks}
    return {"size": opts.mem_size, "cfg": CFG_SCALE, "rows": rows}


def report(result: dict[str, Any]) -> str:
    mb = 1 / 1024
    rows = [
        [
            name,
            r,
            f"{m['param_bytes'] / 2**20:.0f}",
            f"{m['rss_base_kb'] * mb:.0f}",
            f"{m['rss_loaded_kb'] * mb:.0f}",
            f"{m['hwm_kb'] * mb:.0f}",
        ]
        for name, row in result["rows"].items()
        for r, m in enumerate(row["ranks"])
    ]
    title = (
        f"Memory per rank: Flux medium (fp32), {result['size']}x{result['size']}, 1 step, cfg {result['cfg']:g}; "
        "fresh processes per config"
    )
    return format_table(
        title,
        ["config", "rank", "params held MiB", "RSS after imports MiB", "RSS after load MiB", "peak RSS MiB"],
        rows,
    )
