"""`python -m xdit_core demo`: the main job on the embedded default, with no GPU and no download.

It makes a tiny random-weight model, samples it serially in this process, then with a 4-rank hybrid
mesh through the Ray worker pool (CPU workers and gloo here, one GPU per rank where CUDA is present),
twice (cold, then warm), compares the results and prints a table.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from xdit_core import api
from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.cli.preview import latent_to_rgb, write_png
from xdit_core.cli.tiny import write_tiny


def demo_mesh(cfg: float) -> dict[str, int | bool]:
    """A 4-rank hybrid: CFG parallel x Ulysses when there is a negative branch, else Ulysses x Ring."""
    if math.isclose(cfg, 1.0):
        return {"ulysses_degree": 2, "ring_degree": 2}
    return {"ulysses_degree": 2, "use_cfg_parallel": True}


def run_demo(family: str, out_dir: Path, steps: int, size: int, seed: int) -> None:
    """Serial vs pool on a tiny model; writes latent, REPORT.json and a PNG preview into out_dir."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / f"tiny-{family}"
    write_tiny(family, model_dir, seed=0, force=True)  # the demo's own folder
    spec = api.describe_model(str(model_dir))
    print(f"made a random-weight tiny {family} model in {model_dir}")
    serial_opts = GenerateOptions(model=str(model_dir), height=size, width=size, steps=steps, seed=seed, threads=1,
                                  length=9 if spec.is_video else None)  # video: 3 latent frames
    serial, serial_report = generate(serial_opts)
    mesh = demo_mesh(spec.default_cfg)
    pool_opts = replace(serial_opts, backend="ray", **mesh)
    try:
        t0 = time.perf_counter()
        cold, report = generate(pool_opts)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm, _ = generate(pool_opts)
        warm_s = time.perf_counter() - t0
        stats = api.pool_stats(api.PoolKey(str(model_dir), "fp32", None, None, pool_opts.parallel, "auto", 1))
    finally:
        api.unload()
        ray.shutdown()

    cfg = serial_report["config"]
    print(f"sampled {size}x{size}, {steps} {cfg['sampler']}/{cfg['scheduler']} steps, cfg {cfg['cfg']}, seed {seed}: "
          f"serial in this process, then {pool_opts.parallel.describe()} on the Ray worker pool")
    err = float((cold - serial).abs().max() / serial.abs().max())
    rows = [
        ("mode", "ranks", "wall s", "mean step ms", "max|d|/max|ref|"),
        ("serial", "1", f"{serial_report['wall_s']:.2f}",
         f"{1000 * _mean(serial_report['per_rank'][0]['step_s']):.1f}", "reference"),
        ("pool, cold", str(report["world_size"]), f"{cold_s:.2f}",
         f"{1000 * _mean(report['per_rank'][0]['step_s']):.1f}", f"{err:.1e}"),
        ("pool, warm", str(report["world_size"]), f"{warm_s:.2f}", "",
         "bit-identical" if warm.equal(cold) else "DIFFERS"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"  pool cold start: Ray {stats.ray_start_s:.1f}s, actors {stats.actor_start_s:.1f}s, "
          f"rendezvous {stats.rendezvous_s:.1f}s, weights {stats.load_s:.2f}s")
    comm = report["per_rank"][0]["comm_bytes"]
    print("  rank 0 sent: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in comm.items() if v))
    save_file({"samples": cold.contiguous()}, str(out_dir / "latent.safetensors"))
    (out_dir / "REPORT.json").write_text(json.dumps(report, indent=2))
    png = write_png(out_dir / "preview.png", latent_to_rgb(cold[0]))
    print(f"wrote {out_dir / 'latent.safetensors'}, {out_dir / 'REPORT.json'} and the preview {png}")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
