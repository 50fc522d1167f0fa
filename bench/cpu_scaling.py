"""CPU scaling: serial vs 2-rank configs of the `medium` Flux, one thread per rank, measured side by side in
one run (interleaved, repeated); then the performance model, calibrated in the same run, predicts every
config and its error is stated.

The calibration (same processes, after the timed runs): rank 0 times each block serially at several
resolutions (attention kernels apart from the rest), the embedder, head and sampler; ranks 0 and 1 time
point-to-point, all-to-all and all-gather transfers of several sizes and how much of an exchange
hides behind compute. Nothing of the timed config runs goes into the model.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import bench_world
from bench.calibrate import cpu_workload, link_from_samples, link_to_json, model_shape, workload_to_json
from bench.common import format_table, make_request, median_spread, model_path
from bench.perfmodel import Cluster, message_bytes, predict
from xdit_core.runtime.launch import spawn_world
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.models import make_adapter

CFG_SCALE = 3.5


def configs() -> dict[str, tuple[ParallelConfig, str, str, str]]:
    """name -> (ParallelConfig, ring_impl, request key, the serial config it is compared with)."""
    pc = ParallelConfig
    return {
        "serial": (pc(), "p2p", "cfg1", "serial"),
        "ulysses 2": (pc(ulysses_degree=2), "p2p", "cfg1", "serial"),
        "ring 2 (p2p)": (pc(ring_degree=2), "p2p", "cfg1", "serial"),
        "ring 2 (all-gather)": (pc(ring_degree=2), "allgather", "cfg1", "serial"),
        "pipefusion 2 (M 2, warmup 1)": (pc(pipefusion_parallel_degree=2, warmup_steps=1), "p2p", "cfg1", "serial"),
        f"serial, cfg {CFG_SCALE:g}": (pc(), "p2p", "cfg", f"serial, cfg {CFG_SCALE:g}"),
        "cfg parallel 2": (pc(use_cfg_parallel=True), "p2p", "cfg", f"serial, cfg {CFG_SCALE:g}"),
    }


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Measure, calibrate, predict. Returns everything the tables, plots and the test fixture need."""
    path = model_path(tmp, "flux")
    model, spec = load_model(path)
    adapter = make_adapter(model, spec)
    requests = {
        "cfg1": make_request(spec, opts.size, opts.steps),
        "cfg": make_request(spec, opts.size, opts.steps, cfg=CFG_SCALE),
    }
    cal_sizes = {s: make_request(spec, s, 2) for s in opts.calibration_sizes}
    table = configs()
    payload = {
        "path": str(path),
        "requests": requests,
        "repeats": opts.repeats,
        "configs": {n: (c, ring, key) for n, (c, ring, key, _) in table.items()},
        "calibration_sizes": cal_sizes,
        "calibration_repeats": opts.calibration_repeats,
    }
    ranks = spawn_world(bench_world.scaling_world, 2, payload, threads=1, timeout_s=3600)
    link = link_from_samples(ranks[0]["link"])
    contention = statistics.median(ranks[0]["contention"])
    cluster = Cluster("this CPU: gloo over loopback, 1 thread per rank", link, contention=contention)
    workloads = {
        key: cpu_workload(f"flux medium {opts.size}x{opts.size} ({key})", model_shape(adapter, req), ranks[0]["blocks"])
        for key, req in requests.items()
    }
    rows = {}
    for name, (cfg, ring, key, base) in table.items():
        measured = median_spread(ranks[0]["times"][name])
        pred = predict(workloads[key], cfg, cluster, opts.steps, ring_impl=ring)
        sent = {r: ranks[r]["bytes"].get(name, {}) for r in range(cfg.world_size)}
        model_sent = {r: message_bytes(workloads[key], cfg, r, opts.steps, ring) for r in range(cfg.world_size)}
        nonzero = lambda d: {k: v for k, v in d.items() if v}
        exact = all(nonzero(sent[r]) == nonzero(model_sent[r]) for r in range(cfg.world_size))
        rows[name] = {
            "config": asdict(cfg),
            "ring_impl": ring,
            "request": key,
            "baseline": base,
            "ranks": cfg.world_size,
            "measured": measured,
            "runs": ranks[0]["times"][name],
            "predicted_s": pred.total,
            "predicted_breakdown": pred.breakdown,
            "bytes": sent,
            "model_bytes": model_sent,
            "bytes_match": exact,
        }
    for row in rows.values():
        base = rows[row["baseline"]]["measured"]
        row["speedup"] = base["median"] / row["measured"]["median"]
        row["speedup_range"] = [base["min"] / row["measured"]["max"], base["max"] / row["measured"]["min"]]
        row["efficiency"] = row["speedup"] / row["ranks"]
        row["predicted_speedup"] = rows[row["baseline"]]["predicted_s"] / row["predicted_s"]
        row["error"] = row["predicted_s"] / row["measured"]["median"] - 1
    return {
        "size": opts.size,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "tokens": workloads["cfg1"].img_tokens,
        "txt_tokens": workloads["cfg1"].txt_tokens,
        "rows": rows,
        "link": link_to_json(link),
        "cluster": cluster.name,
        "contention": ranks[0]["contention"],
        "workloads": {k: workload_to_json(w) for k, w in workloads.items()},
        "blocks": ranks[0]["blocks"],
    }


def report(result: dict[str, Any]) -> str:
    """The scaling table and the model-vs-measured table."""
    rows = result["rows"]
    title = (
        f"CPU scaling: Flux medium, {result['size']}x{result['size']} ({result['tokens']} image + "
        f"{result['txt_tokens']} text tokens), {result['steps']} euler steps, 1 thread per rank, "
        f"{result['repeats']} repeats (median, min-max)"
    )
    scaling = format_table(
        title,
        ["config", "ranks", "median s", "min-max s", "speedup", "speedup range", "efficiency"],
        [
            [
                n,
                r["ranks"],
                r["measured"]["median"],
                f"{r['measured']['min']:.3f}-{r['measured']['max']:.3f}",
                f"{r['speedup']:.2f}x",
                f"{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}",
                f"{r['efficiency']:.2f}",
            ]
            for n, r in rows.items()
        ],
    )
    errors = [abs(r["error"]) for r in rows.values()]
    link = result["link"]
    model = format_table(
        "Performance model on this CPU: calibrated from per-block serial timings and a link microbenchmark in the "
        f"same run (gloo p2p {link['p2p']['bandwidth'] / 1e9:.2f} GB/s + {link['p2p']['latency'] * 1e6:.0f} us, "
        f"overlap {link['overlap']:.2f}; 2 ranks compute {statistics.median(result['contention']):.2f}x slower than "
        f"one alone); mean |error| {100 * sum(errors) / len(errors):.0f}%, "
        f"max {100 * max(errors):.0f}%",
        ["config", "measured s", "predicted s", "error", "measured speedup", "predicted speedup", "bytes = model"],
        [
            [
                n,
                r["measured"]["median"],
                r["predicted_s"],
                f"{100 * r['error']:+.0f}%",
                f"{r['speedup']:.2f}x",
                f"{r['predicted_speedup']:.2f}x",
                "yes" if r["bytes_match"] else "NO",
            ]
            for n, r in rows.items()
        ],
    )
    return scaling + "\n\n" + model
