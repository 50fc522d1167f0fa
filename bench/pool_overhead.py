"""Worker-pool costs: the cold start broken down, and the warm-request overhead (pool round trip minus
the same computation in-process), measured side by side in one run.

    python bench/pool_overhead.py [--family flux] [--size 256] [--steps 4] [--repeats 5]

Both sides run a 1-rank mesh with 1 thread, so the difference is the pool's own cost (Ray calls,
request transfer, progress polling), not parallelism.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xdit_core.conditioning import random_cond  # noqa: E402
from xdit_core.engine import run_request  # noqa: E402
from xdit_core.loading import load_model  # noqa: E402
from xdit_core.mesh import ParallelConfig  # noqa: E402
from xdit_core.models import make_adapter  # noqa: E402
from xdit_core.pool import PoolKey, WorkerPool  # noqa: E402
from xdit_core.request import build_request, empty_latent  # noqa: E402
from xdit_core.tiny import write_tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="flux")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import ray
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny(args.family, Path(tmp) / "m", seed=0, preset=args.preset)
        model, spec = load_model(path)
        adapter = make_adapter(model, spec)
        pos, _ = random_cond(spec, 1, 0, with_negative=False)
        request = build_request(spec, empty_latent(spec, 1, args.size, args.size), seed=0, steps=args.steps,
                                cfg=1.0, sampler="euler", scheduler="simple", denoise=1.0, positive=pos,
                                negative=None)
        pool = WorkerPool(PoolKey(str(path), "fp32", None, None, ParallelConfig(), "auto", 1))
        t0 = time.perf_counter()
        pool.start()
        cold_s = time.perf_counter() - t0
        first_s = _timed(lambda: pool.sample(request))
        local, remote = [], []
        for _ in range(args.repeats):
            local.append(_timed(lambda: run_request(adapter, request)))
            remote.append(_timed(lambda: pool.sample(request, on_progress=lambda i, n: None)))
        stats = pool.stats
        pool.shutdown()
        ray.shutdown()

    lm, rm = statistics.median(local), statistics.median(remote)
    print(f"pool cold start ({args.family} {args.preset}, 1 rank, 1 thread): total {cold_s:.2f}s")
    rows = [("Ray start", stats.ray_start_s), ("actor start (process + imports)", stats.actor_start_s),
            ("process-group rendezvous", stats.rendezvous_s), ("weight load", stats.load_s),
            ("first request", first_s)]
    for name, v in rows:
        print(f"  {name:<34} {v:>8.3f} s")
    print(f"warm request, {args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats (median, min-max):")
    print(f"  {'in-process run_request':<34} {lm:>8.3f} s  ({min(local):.3f}-{max(local):.3f})")
    print(f"  {'pool.sample':<34} {rm:>8.3f} s  ({min(remote):.3f}-{max(remote):.3f})")
    print(f"  {'overhead per request':<34} {rm - lm:>8.3f} s  ({(rm - lm) / args.steps * 1000:.1f} ms per step)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pool_overhead.json").write_text(json.dumps(
        {"args": vars(args), "cold_s": cold_s, "stats": {k: v for k, v in vars(stats).items() if k != "last_reports"},
         "first_request_s": first_s, "local_s": local, "pool_s": remote}, indent=2))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
