"""Fidelity and communication, from one spawned world of 4 ranks.

Fidelity: per family (medium presets, cfg 4 so CFG parallel applies) and config, the final latent against
serial: max|d| / max|ref| and PSNR. Exact methods (Ulysses, Ring, hybrids, CFG parallel, PipeFusion with
every step a warmup step) and PipeFusion with 1 and 2 warmup steps (stale K/V afterwards). Random
weights at the usual init (std 0.02) mix tokens weakly, so PipeFusion's staleness is also shown on a
Flux whose weights are 5x larger (the tests' "sharp" model).

Communication: the bytes every rank sent per step, by kind, beside the performance model's message sizes
(which must equal them) and the PipeFusion paper's formula for the method, same model and resolution.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import bench_world
from bench.calibrate import model_shape, shape_workload
from bench.common import fidelity, format_table, make_request, model_path
from bench.perfmodel import message_bytes, method_of, paper_comm_elements
from xdit_core.runtime.job import run_request
from xdit_core.runtime.launch import spawn_world
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.models import make_adapter

FAMILIES = ("flux", "sd3", "pixart")
CFG_SCALE = 4.0
SHARP_STD = 0.1


def configs(steps: int) -> dict[str, ParallelConfig]:
    pc = ParallelConfig
    return {
        "ulysses 2": pc(ulysses_degree=2),
        "ring 2": pc(ring_degree=2),
        "ulysses 2 x ring 2": pc(ulysses_degree=2, ring_degree=2),
        "cfg 2": pc(use_cfg_parallel=True),
        "cfg 2 x ulysses 2": pc(ulysses_degree=2, use_cfg_parallel=True),
        f"pipefusion 2, warmup {steps} (exact)": pc(pipefusion_parallel_degree=2, warmup_steps=steps),
        "pipefusion 2, warmup 2": pc(pipefusion_parallel_degree=2, warmup_steps=2),
        "pipefusion 2, warmup 1": pc(pipefusion_parallel_degree=2, warmup_steps=1),
        "pipefusion 2 x ulysses 2, warmup 1": pc(pipefusion_parallel_degree=2, ulysses_degree=2, warmup_steps=1),
        "pipefusion 4, warmup 1": pc(pipefusion_parallel_degree=4, warmup_steps=1),
    }


SHARP_CONFIGS = ("ulysses 2", "pipefusion 2, warmup 2", "pipefusion 2, warmup 1")


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Serial references in this process, every case in one spawned world."""
    table = configs(opts.fid_steps)
    models = {f: (model_path(tmp, f), f) for f in FAMILIES}
    models["flux sharp"] = (model_path(tmp, "flux", weight_std=SHARP_STD), "flux")
    requests, refs, shapes, cases = {}, {}, {}, []
    for key, (path, _) in models.items():
        adapter = make_adapter(*load_model(path))
        requests[key] = make_request(adapter.spec, opts.fid_size, opts.fid_steps, cfg=CFG_SCALE)
        refs[key] = run_request(adapter, requests[key])
        shapes[key] = model_shape(adapter, requests[key])
        names = SHARP_CONFIGS if key == "flux sharp" else table
        cases += [(f"{key}/{n}", str(path), table[n], "p2p", key) for n in names]
    world = max(c[2].world_size for c in cases)
    ranks = spawn_world(
        bench_world.fidelity_world, world, {"cases": cases, "requests": requests}, threads=1, timeout_s=3600
    )
    rows = []
    for name, _, config, ring_impl, key in cases:
        out = ranks[0][name]["out"]
        w = shape_workload(shapes[key])
        per_rank = []
        for r in range(config.world_size):
            measured = ranks[r][name]["bytes"]
            model = message_bytes(w, config, r, opts.fid_steps, ring_impl)
            per_rank.append(
                {
                    "rank": r,
                    "coords": ranks[r][name]["coords"],
                    "bytes": measured,
                    "model_bytes": model,
                    "match": all(measured.get(k, 0) == v for k, v in model.items()),
                    "param_bytes": ranks[r][name]["param_bytes"],
                }
            )
        rows.append(
            {
                "model": key,
                "config": name.split("/", 1)[1],
                "parallel": asdict(config),
                "world": config.world_size,
                **fidelity(out, refs[key]),
                "effective_patches": ranks[0][name]["effective_patches"],
                "ranks": per_rank,
            }
        )
    return {"size": opts.fid_size, "steps": opts.fid_steps, "cfg": CFG_SCALE, "rows": rows, "shapes": shapes}


def report_fidelity(result: dict[str, Any]) -> str:
    title = (
        f"Fidelity: final latent vs serial, medium presets, {result['size']}x{result['size']}, "
        f"{result['steps']} euler steps, cfg {result['cfg']:g} (flux sharp: weights std {SHARP_STD})"
    )
    return format_table(
        title,
        ["model", "config", "ranks", "max abs diff / max abs ref", "PSNR dB"],
        [[r["model"], r["config"], r["world"], f"{r['max_rel']:.2e}", r["psnr_db"]] for r in result["rows"]],
    )


def report_communication(result: dict[str, Any], family: str = "flux") -> str:
    """Per config and rank: bytes sent per step, the model's, the paper's formula; TP and DistriFusion too."""
    steps = result["steps"]
    shape = result["shapes"][family]
    p = shape["img_tokens"] + (shape["txt_tokens"] if shape["joint_text"] else 0)
    hs, L = shape["heads"] * shape["head_dim"], len(shape["block_bytes"])
    elem = shape["act_bytes"]
    rows = []
    checked = matched = 0
    for r in result["rows"]:
        for rk in r["ranks"]:
            checked += 1
            matched += rk["match"]
        if r["model"] != family:
            continue
        cfg = ParallelConfig(**r["parallel"])
        method = method_of(cfg)
        evals = shape["branches"] // cfg.cfg_degree
        for rk in r["ranks"]:
            sent = sum(rk["bytes"].values()) / steps
            model = sum(rk["model_bytes"].values()) / steps
            kinds = ", ".join(f"{k} {v / steps / 1e3:.0f}" for k, v in rk["bytes"].items() if v)
            paper = (paper_comm_elements(method, p, hs, L, cfg.world_size) * evals * elem / 1e3) if method else None
            rows.append(
                [
                    r["config"],
                    rk["rank"],
                    f"{sent / 1e3:.0f}",
                    f"{model / 1e3:.0f}",
                    "yes" if rk["match"] else "NO",
                    "-" if paper is None else f"{paper:.0f}",
                    method or "-",
                    kinds or "-",
                ]
            )
    for method in ("tensor_parallel", "distrifusion"):
        paper = paper_comm_elements(method, p, hs, L, 2) * shape["branches"] * elem / 1e3
        rows.append([f"{method.replace('_', ' ')} 2 (formula only)", "-", "-", "-", "-", f"{paper:.0f}", method, "-"])
    title = (
        f"Communication: kB sent per step per rank, {family} medium {result['size']}x{result['size']} "
        f"(p = {p} tokens, hs = {hs}, L = {L}, fp32, {shape['branches']} CFG branches); model = counters in "
        f"{matched}/{checked} (case, rank) pairs over every family"
    )
    return format_table(
        title,
        [
            "config",
            "rank",
            "measured kB/step",
            "model kB/step",
            "equal",
            "paper kB/step",
            "paper method",
            "measured by kind (kB/step)",
        ],
        rows,
    )
