"""Video: the `medium` Wan 2.1 T2V (random weights) on a short clip scaled down, serial vs Ulysses 2 vs Ring 2,
one thread per rank, measured side by side in one spawned world (interleaved, repeated): seconds per step,
speedup, and the bytes each rank sends per step from the engine's counters, checked against the performance
model's message sizes.

Beside them, diffusers' own context parallelism on the same model and request (`enable_parallelism` with
WanTransformer3DModel's `_cp_plan`, an euler loop over its forward), against the same loop on one rank. Only its
Ulysses runs here: diffusers' ring attention merges partial attentions by their log-sum-exp, which only its
flash, cuDNN and sage backends return (CUDA only); the native SDPA backend, the one a CPU has, refuses
`return_lse`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import bench_world
from bench.calibrate import model_shape, shape_workload
from bench.common import fidelity, format_table, make_request, median_spread, model_path
from bench.perfmodel import message_bytes
from xdit_core.loading.load import load_model
from xdit_core.models import make_adapter
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.runtime.launch import spawn_world
from xdit_core.sampling.request import video_frames

CONFIGS = {"serial": ParallelConfig(), "ulysses 2": ParallelConfig(ulysses_degree=2),
           "ring 2": ParallelConfig(ring_degree=2)}
PEERS = {"diffusers serial": 1, "diffusers ulysses 2": 2}  # name -> diffusers' Ulysses degree (1: one rank)


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Measure every run in one 2-rank world; per run: seconds per step, speedup against its serial baseline and
    against ours, bytes per rank (ours also from the model), and its final latent against our serial one."""
    path = model_path(tmp, "wan")
    model, spec = load_model(path)
    adapter = make_adapter(model, spec)
    frames = video_frames(spec, opts.video_length)
    request = make_request(spec, opts.video_size, opts.video_steps, frames=frames)
    payload = {"path": str(path), "request": request, "configs": CONFIGS, "peers": PEERS,
               "repeats": opts.video_repeats}
    ranks = spawn_world(bench_world.video_world, 2, payload, threads=1, timeout_s=3600)
    shapes = shape_workload(model_shape(adapter, request))
    steps = opts.video_steps
    latents = ranks[0]["latents"]
    rows: dict[str, Any] = {}
    for name, world in [(n, c.world_size) for n, c in CONFIGS.items()] + list(PEERS.items()):
        sent = {r: ranks[r]["bytes"][name] for r in range(world)}
        row = {
            "ranks": world,
            "baseline": "serial" if name in CONFIGS else "diffusers serial",
            "measured": median_spread([t / steps for t in ranks[0]["times"][name]]),
            "bytes": sent,
            "fidelity": fidelity(latents[name], latents["serial"]),
        }
        if name in CONFIGS:
            model_sent = {r: message_bytes(shapes, CONFIGS[name], r, steps) for r in range(world)}
            nonzero = lambda d: {k: v for k, v in d.items() if v}
            row["model_bytes"] = model_sent
            row["bytes_match"] = all(nonzero(model_sent[r]) == nonzero(sent[r]) for r in range(world))
        rows[name] = row
    for row in rows.values():
        base, own = rows[row["baseline"]]["measured"], row["measured"]
        row["speedup"] = base["median"] / own["median"]
        row["speedup_range"] = [base["min"] / own["max"], base["max"] / own["min"]]
        row["vs_our_serial"] = rows["serial"]["measured"]["median"] / own["median"]
    cfg = model.config
    return {
        "model": f"wan medium t2v ({cfg.num_layers} blocks, {cfg.num_attention_heads} heads x "
                 f"{cfg.attention_head_dim}, FFN {cfg.ffn_dim})",
        "size": opts.video_size,
        "length": opts.video_length,
        "latent_frames": frames,
        "tokens": shapes.img_tokens,
        "txt_tokens": shapes.txt_tokens,
        "steps": steps,
        "repeats": opts.video_repeats,
        "contention": ranks[0]["contention"],
        "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    """One table: time, speedup and bytes per run."""
    title = (
        f"Video: {result['model']}, random weights, {result['size']}x{result['size']}, {result['length']} frames "
        f"({result['latent_frames']} latent frames: {result['tokens']} video tokens; {result['txt_tokens']} text "
        f"tokens by cross-attention), {result['steps']} euler steps, 1 thread per rank, {result['repeats']} "
        "interleaved repeats (median, min-max); speedup against the serial run of the same code (ours: run_request; "
        "diffusers: its forward in a plain euler loop); 2 ranks compute "
        f"{statistics.median(result['contention']):.2f}x slower than one alone"
    )

    def kinds(sent: dict[str, int]) -> str:
        return ", ".join(f"{k} {v / result['steps'] / 1e3:.0f}" for k, v in sent.items() if v) or "-"

    rows = []
    for name, r in result["rows"].items():
        busiest = max(r["bytes"].values(), key=lambda d: sum(d.values()))
        rows.append([
            name,
            r["ranks"],
            r["measured"]["median"],
            f"{r['measured']['min']:.3f}-{r['measured']['max']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}",
            f"{r['vs_our_serial']:.2f}x",
            f"{sum(busiest.values()) / result['steps'] / 1e3:.0f}",
            kinds(busiest),
            ("yes" if r["bytes_match"] else "NO") if "bytes_match" in r else "-",
            f"{r['fidelity']['max_rel']:.1e}",
        ])
    return format_table(
        title,
        ["run", "ranks", "s/step", "min-max s/step", "speedup", "speedup range", "vs our serial",
         "kB sent/step (busiest rank)", "by kind (kB/step)", "bytes = model", "max rel diff vs our serial"],
        rows,
    )
