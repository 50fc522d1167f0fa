"""CPU scaling: serial (1 thread) vs 2-rank Ulysses, Ring and PipeFusion (1 thread each), in one run.

Ring runs twice: K/V hand-offs point to point (overlapped with compute) and one all-gather.
PipeFusion runs with 1 warmup step (approximate after it). PipeFusion 2 x Ulysses 2 uses 4 ranks on
this 2-core machine, so its efficiency is over 4 ranks sharing 2 cores.

    python bench/cpu_scaling.py [--family flux] [--size 256] [--steps 3] [--repeats 5]

Prints median and spread of the run time per config, speedup and efficiency against serial, and
writes bench/results/cpu_scaling.json. The model is the `medium` random-weight preset.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_world  # noqa: E402
from xdit_core.conditioning import random_cond  # noqa: E402
from xdit_core.launch import spawn_world  # noqa: E402
from xdit_core.loading import read_model_config  # noqa: E402
from xdit_core.families import resolve_model_spec  # noqa: E402
from xdit_core.mesh import ParallelConfig  # noqa: E402
from xdit_core.request import build_request, empty_latent  # noqa: E402
from xdit_core.tiny import write_tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="flux")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny(args.family, Path(tmp) / "medium", seed=0, preset="medium")
        spec = resolve_model_spec(read_model_config(path))
        pos, neg = random_cond(spec, 1, 0, with_negative=False)
        request = build_request(spec, empty_latent(spec, 1, args.size, args.size), seed=0, steps=args.steps,
                                cfg=1.0, sampler="euler", scheduler="simple", denoise=1.0, positive=pos,
                                negative=None)
        configs = {"serial": (ParallelConfig(), "p2p"), "ulysses 2": (ParallelConfig(ulysses_degree=2), "p2p"),
                   "ring 2 p2p": (ParallelConfig(ring_degree=2), "p2p"),
                   "ring 2 allgather": (ParallelConfig(ring_degree=2), "allgather"),
                   "pipefusion 2": (ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=1), "p2p"),
                   "pipefusion 2 x uly 2": (ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2,
                                                           warmup_steps=1), "p2p")}
        world = max(cfg.world_size for cfg, _ in configs.values())
        measured = spawn_world(bench_world.run, world, (str(path), request, configs, args.repeats), threads=1)[0]
        times = {name: m["times"] for name, m in measured.items()}

    base = statistics.median(times["serial"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        speedup = base / med
        ranks = configs[name][0].world_size
        rows.append({"config": name, "ranks": ranks, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "speedup": speedup, "efficiency": speedup / ranks, "runs": ts,
                     "kb_per_step_rank0": measured[name]["bytes_per_step"] / 1e3})
    tokens = (args.size // 16) ** 2
    print(f"CPU scaling: {args.family} medium, {args.size}x{args.size} ({tokens} image tokens + 32 text), "
          f"{args.steps} euler steps, 1 thread per rank, {args.repeats} repeats")
    print(f"{'config':<21} {'ranks':>5} {'median s':>9} {'spread s':>15} {'speedup':>8} {'efficiency':>10} "
          f"{'kB/step (rank 0)':>17}")
    for r in rows:
        print(f"{r['config']:<21} {r['ranks']:>5} {r['median_s']:>9.3f} {r['min_s']:>7.3f}-{r['max_s']:<7.3f} "
              f"{r['speedup']:>8.2f} {r['efficiency']:>10.2f} {r['kb_per_step_rank0']:>17.0f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
