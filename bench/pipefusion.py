"""PipeFusion against serial, Ulysses 2, Ring 2 and diffusers' own context parallelism (Ulysses 2), side by side
in one 2-rank world on the `medium` Flux, one thread per rank: seconds per step and end to end over a whole
run, and PipeFusion's measured bubble and stage imbalance beside the schedule's formula and the split's
prediction.

Every config runs the same request (euler, `pf_steps` steps, cfg 1), interleaved and repeated (the order
reversed every other repeat), after one short untimed run each (first-call allocations). Per step: the mean
step time over the run as the rank that finishes steps last sees it (PipeFusion: its last stage; the steps
after the warmup step, the first of them carrying the pipeline's fill). End to end: the wall time of the run.
Diffusers' loop is the euler loop over FluxTransformer2DModel.forward with `enable_parallelism` (its
`_cp_plan`); its seconds per step are its run over the steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from bench.bench_world import _adapters
from bench.common import fidelity, format_table, make_request, median_spread, model_path
from bench.overheads import plain_flux_loop
from xdit_core.loading.load import load_model
from xdit_core.models.base import ModelAdapter
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.mesh import Mesh, ParallelConfig
from xdit_core.runtime.job import run_request
from xdit_core.runtime.launch import spawn_world
from xdit_core.sampling.request import SampleRequest

TEXT_TOKENS = 128


def configs(warmup: int) -> dict[str, ParallelConfig]:
    pc = ParallelConfig
    return {
        "serial": pc(),
        "ulysses 2": pc(ulysses_degree=2),
        "ring 2": pc(ring_degree=2),
        f"pipefusion 2, M 2, warmup {warmup}": pc(pipefusion_parallel_degree=2, num_pipeline_patch=2,
                                                   warmup_steps=warmup),
        f"pipefusion 2, M 4, warmup {warmup}": pc(pipefusion_parallel_degree=2, num_pipeline_patch=4,
                                                   warmup_steps=warmup),
    }


PEER = "diffusers ulysses 2"


def _engine_run(adapter: ModelAdapter, request: SampleRequest, mesh: Mesh, device: torch.device) -> dict[str, Any]:
    ctx = RankContext(mesh, device) if mesh.config.world_size > 1 else None
    step_s: list[float] = []
    out = run_request(adapter, request, step_seconds=step_s, ctx=ctx)
    stats = ctx.pipefusion_stats if ctx is not None else None
    return {"latent": out, "step_s": step_s, "pipefusion": stats}


def _diffusers_run(model: torch.nn.Module, request: SampleRequest) -> dict[str, Any]:
    return {"latent": plain_flux_loop(model, request), "step_s": None, "pipefusion": None}


def pipefusion_world(rank: int, device: torch.device, payload: dict[str, Any]) -> dict[str, Any]:
    """Every config (payload "configs") and diffusers' Ulysses 2 on payload "request", timed, interleaved and
    repeated; a rank outside a run waits at the barrier. Returns per run: wall seconds, this rank's step times,
    its PipeFusion statistics and (rank 0, first repeat) the final latent."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    path, request, warm = payload["path"], payload["request"], payload["warm_request"]
    meshes = {name: Mesh(cfg, list(range(cfg.world_size))) for name, cfg in payload["configs"].items()}
    adapters = _adapters(path, payload["configs"], meshes)
    runs: dict[str, Optional[Callable[[SampleRequest], dict[str, Any]]]] = {
        name: partial(_engine_run, adapters[name], mesh=mesh, device=device) if mesh.is_member else None
        for name, mesh in meshes.items()}
    peer = load_model(path)[0]  # a model of its own: enable_parallelism hooks every block of the model it is given
    peer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    runs[PEER] = partial(_diffusers_run, peer)
    out: dict[str, Any] = {"wall": {n: [] for n in runs}, "step_s": {n: [] for n in runs},
                           "pipefusion": {n: [] for n in runs}, "latents": {}}
    for rep in range(-1, payload["repeats"]):  # -1: short untimed runs
        for name in list(runs) if rep % 2 == 0 else list(reversed(runs)):
            dist.barrier()
            if runs[name] is not None:
                t0 = time.perf_counter()
                res = runs[name](warm if rep < 0 else request)
                wall = time.perf_counter() - t0
                if rep >= 0:
                    out["wall"][name].append(wall)
                    out["step_s"][name].append(res["step_s"])
                    out["pipefusion"][name].append(res["pipefusion"])
                    if rank == 0 and rep == 0:
                        out["latents"][name] = res["latent"]
            dist.barrier()
    return out


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = model_path(tmp, "flux")
    model, spec = load_model(path)
    request = make_request(spec, opts.pf_size, opts.pf_steps, text_len=TEXT_TOKENS)
    warm = make_request(spec, opts.pf_size, 2, text_len=TEXT_TOKENS)
    table = configs(opts.pf_warmup)
    payload = {"path": str(path), "request": request, "warm_request": warm, "configs": table,
               "repeats": opts.pf_repeats}
    t0 = time.perf_counter()
    ranks = spawn_world(pipefusion_world, 2, payload, threads=1, timeout_s=7200)
    seconds = time.perf_counter() - t0
    steps, warmup = opts.pf_steps, opts.pf_warmup
    rows: dict[str, Any] = {}
    for name in list(table) + [PEER]:
        cfg = table.get(name, ParallelConfig(ulysses_degree=2))
        pf = cfg.pipefusion_parallel_degree > 1
        # The rank that finishes steps last: PipeFusion's last stage (rank 1 at degree 2), else rank 0.
        reporter = ranks[1] if pf else ranks[0]
        wall = ranks[0]["wall"][name]  # rank 0 runs every config, and ends each with the result
        if name == PEER:
            per_step = [w / steps for w in wall]
        elif pf:
            per_step = [statistics.fmean(s[warmup:]) for s in reporter["step_s"][name]]
        else:
            per_step = [statistics.fmean(s) for s in reporter["step_s"][name]]
        row: dict[str, Any] = {"ranks": cfg.world_size, "per_step": median_spread(per_step),
                               "wall": median_spread(wall), "fidelity": fidelity(ranks[0]["latents"][name],
                                                                                 ranks[0]["latents"]["serial"])}
        if pf:
            stats = [ranks[r]["pipefusion"][name] for r in range(2)]  # per rank, per repeat
            busy = [statistics.median(s["run_s"] - s["wait_s"] for s in stats[r]) for r in range(2)]
            row["pipefusion"] = {
                "blocks": stats[0][0]["blocks"],
                "imbalance_predicted": stats[0][0]["imbalance"],
                "imbalance_measured": max(busy) / statistics.fmean(busy),
                "idle_measured": [statistics.median(s["idle_fraction"] for s in stats[r]) for r in range(2)],
                "idle_formula": stats[0][0]["idle_fraction_formula"],
                "per_step_drain_formula": stats[0][0]["per_step_drain_formula"],
                "warmup_step_s": statistics.median(s[0] for s in reporter["step_s"][name]),
            }
        rows[name] = row
    serial = rows["serial"]
    for row in rows.values():
        row["speedup_step"] = serial["per_step"]["median"] / row["per_step"]["median"]
        row["speedup_wall"] = serial["wall"]["median"] / row["wall"]["median"]
    rows["ulysses 2"]["vs_peer"] = rows[PEER]["per_step"]["median"] / rows["ulysses 2"]["per_step"]["median"]
    cfg = model.config
    return {
        "model": f"flux medium ({cfg.num_layers} double + {cfg.num_single_layers} single blocks, "
                 f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim})",
        "size": opts.pf_size, "tokens": (opts.pf_size // 16) ** 2, "txt_tokens": TEXT_TOKENS, "steps": steps,
        "warmup": warmup, "repeats": opts.pf_repeats, "seconds": seconds, "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    title = (f"PipeFusion on {result['model']}, {result['size']}x{result['size']} ({result['tokens']} image + "
             f"{result['txt_tokens']} text tokens), {result['steps']} euler steps, cfg 1, 1 thread per rank, "
             f"{result['repeats']} interleaved repeats (median, min-max); {result['seconds'] / 60:.1f} min")
    speed = format_table(
        title,
        ["config", "ranks", "s per step", "min-max", "speedup per step", "end to end s", "speedup end to end",
         "max rel err vs serial", "PSNR dB"],
        [[n, r["ranks"], r["per_step"]["median"], f"{r['per_step']['min']:.3f}-{r['per_step']['max']:.3f}",
          f"{r['speedup_step']:.2f}x", r["wall"]["median"], f"{r['speedup_wall']:.2f}x",
          f"{r['fidelity']['max_rel']:.2e}", r["fidelity"]["psnr_db"]] for n, r in rows.items()],
    )
    pf = [(n, r) for n, r in rows.items() if "pipefusion" in r]
    bubble = format_table(
        "PipeFusion's pipeline: blocks per stage and the split's predicted imbalance (slowest / mean stage FLOPs) "
        "beside the measured one (busy = run - time blocked on hand-offs); each stage's measured idle fraction "
        "beside the schedule's formula (one fill and drain per run, warmup steps one stage at a time) and "
        "beside what a drain at every step would cost",
        ["config", "blocks", "imbalance predicted", "imbalance measured", "idle stage 0 / 1 measured",
         "idle formula", "per-step drain formula", "warmup step s (serial step s)"],
        [[n, ", ".join(map(str, p["blocks"])), f"{p['imbalance_predicted']:.3f}", f"{p['imbalance_measured']:.3f}",
          " / ".join(f"{v:.3f}" for v in p["idle_measured"]), f"{p['idle_formula']:.3f}",
          f"{p['per_step_drain_formula']:.3f}",
          f"{p['warmup_step_s']:.3f} ({rows['serial']['per_step']['median']:.3f})"]
         for n, r in pf for p in [r["pipefusion"]]],
    )
    peer = (f"Ours vs diffusers' context parallelism (Ulysses 2, same model, tokens and loop): ours "
            f"{rows['ulysses 2']['vs_peer']:.2f}x faster per step.")
    return speed + "\n\n" + bubble + "\n\n" + peer
