"""Memory per rank per config, measured against the memory plan (xdit_core/runtime/memory_plan.py), and the
plan's table for real models on 24 GB GPUs (docs/memory.md).

`python -m bench memory`: every config in fresh processes (one per rank), loaded and run as the engine's ranks
do (RankJob: a PipeFusion stage reads only its share, shard_weights shards the blocks). Each rank first builds
the model on the meta device (the plan's step: every module the load imports is imported then) and joins its
mesh, then reads its RSS ("before loading"), loads, resets its peak RSS (/proc/self/clear_refs 5: the load's
peak holds the weight file's pages mapped while they are read, which are host page cache, not the tensors), runs
the request and reads its peak again. The plan's tensor bytes for the run are compared with
(peak RSS - RSS before loading); the load's peak of anonymous memory (sampled every 2 ms: the file's pages left
out) with the plan's load.

`python -m bench.memory table [--write]`: the plan's per-GPU table for FLUX.1-dev and Wan 2.2 (bf16 and fp8 kept),
Qwen-Image, Wan 2.2 A14B (both experts resident) and FLUX.2 dev on 2, 4 and 8 GPUs of 24 GiB, from their real
configs on the meta device; `--write` puts it into docs/memory.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import DOCS, ROOT, format_table, make_request, model_path, proc_status_kb
from bench.perfmodel import describe
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.runtime.launch import spawn_world
from xdit_core.runtime.memory_plan import (GIB, PCIE_BYTES_PER_S, MemoryPlan, describe_mesh, model_memory,
                                           plan_memory)
from xdit_core.runtime.pool import environment

CFG_SCALE = 3.5
TOLERANCE = 0.15  # the plan's run tensor bytes vs the measured peak RSS - RSS before loading
# The four configurations the plan is held to (the others are reported too).
CHECKED = ("serial", "ulysses 2", "cfg 2", "pipefusion 2")


def sharding_available() -> bool:
    """Whether the engine shards weights (parallel/sharding.py, used by RankJob for shard_weights)."""
    import importlib.util

    return importlib.util.find_spec("xdit_core.parallel.sharding") is not None


def configs() -> dict[str, ParallelConfig]:
    pc = ParallelConfig
    out = {
        "serial": pc(),
        "ulysses 2": pc(ulysses_degree=2),
        "ring 2": pc(ring_degree=2),
        "cfg 2": pc(use_cfg_parallel=True),
        "pipefusion 2": pc(pipefusion_parallel_degree=2),
        "pipefusion 4": pc(pipefusion_parallel_degree=4),
        "pipefusion 2 x ulysses 2": pc(pipefusion_parallel_degree=2, ulysses_degree=2),
        "ulysses 2, sharded": pc(ulysses_degree=2, shard_weights=True),
        "cfg 2, sharded": pc(use_cfg_parallel=True, shard_weights=True),
    }
    return out


def _plan(path: Path, cfg: ParallelConfig, request: Any) -> MemoryPlan:
    return plan_memory(path, "fp32", cfg, list(request.noise.shape), text_tokens=request.positive.text.shape[1],
                       with_negative=request.negative is not None)


class _AnonPeak:
    """The largest RssAnon (kB) seen while it runs, sampled every `interval` s by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_kb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "_AnonPeak":
        self.peak = proc_status_kb("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kb("RssAnon"))


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def plan_world(rank: int, device: torch.device, payload: tuple[str, ParallelConfig, Any]) -> dict[str, Any]:
    """One config's rank, measured as the module docstring says."""
    from xdit_core.parallel.context import RankContext
    from xdit_core.parallel.mesh import Mesh
    from xdit_core.runtime.job import ModelRef, RankJob

    path, config, request = payload
    model_memory(path)  # the plan's meta build, before the base reading
    ctx = RankContext(Mesh(config, list(range(config.world_size))), device) if config.world_size > 1 else None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base, anon_base = proc_status_kb("VmRSS"), proc_status_kb("RssAnon")
    with _AnonPeak() as load_peak:
        job = RankJob(rank, device, ModelRef(path), config, ctx=ctx)
    loaded, hwm_load = proc_status_kb("VmRSS"), proc_status_kb("VmHWM")
    reset = _reset_peak()
    out = job.run(request)
    hwm_run = proc_status_kb("VmHWM")
    report = out["report"]
    return {
        "rss_base_kb": base,
        "rss_loaded_kb": loaded,
        "anon_base_kb": anon_base,
        "anon_load_peak_kb": load_peak.peak,
        "hwm_load_kb": hwm_load,
        "hwm_run_kb": hwm_run if reset else None,
        "hwm_kb": max(hwm_load, hwm_run),
        "rss_end_kb": proc_status_kb("VmRSS"),
        "param_bytes": job.param_bytes,
        "steps": len(report["step_s"]),
        "shard_gather_bytes": report["comm_bytes"].get("shard_gather", 0),
    }


# Every allocation of 64 KiB or more its own mapping, unmapped when freed: RSS then follows the live tensors, as
# a GPU's allocated bytes do. With glibc's default (a threshold that rises as big blocks are freed) freed tensors
# stay in the heap and RSS keeps the high-water mark of fragmentation: the rows "..., glibc default" show it.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DEFAULT_ALLOCATOR = ("serial", "ulysses 2, sharded")


def _spawn(config: ParallelConfig, payload: Any, env: dict[str, str]) -> list[dict[str, Any]]:
    # the ranks inherit the environment at spawn (glibc reads MALLOC_* at process start)
    with environment(env, unset=tuple(MMAP_ENV)):
        return spawn_world(plan_world, config.world_size, payload, threads=1, timeout_s=1800)


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = model_path(tmp, "flux")
    _, spec = load_model(path)
    request = make_request(spec, opts.mem_size, opts.mem_steps, cfg=CFG_SCALE)
    runs = [(name, cfg, MMAP_ENV) for name, cfg in configs().items()]
    runs += [(f"{name}, glibc default", configs()[name], {}) for name in DEFAULT_ALLOCATOR]
    rows, skipped = {}, {}
    for name, cfg, env in runs:
        if cfg.shard_weights and not sharding_available():
            skipped[name] = "the engine does not shard weights yet (no xdit_core/parallel/sharding.py)"
            continue
        plan = _plan(path, cfg, request)
        t0 = time.perf_counter()
        ranks = _spawn(cfg, (str(path), cfg, request), env)
        rows[name] = {"parallel": describe(cfg), "ranks": ranks, "seconds": time.perf_counter() - t0,
                      "allocator": "glibc default" if not env else "mmap threshold 64 KiB",
                      "plan": [_plan_row(r) for r in plan.ranks],
                      "plan_gather_bytes_per_step": plan.gather_bytes_per_step}
    return {"size": opts.mem_size, "steps": opts.mem_steps, "cfg": CFG_SCALE, "rows": rows, "skipped": skipped,
            "text_tokens": int(request.positive.text.shape[1])}


def _plan_row(r: Any) -> dict[str, int]:
    return {"weights": r.weights, "run_tensor_bytes": r.run_tensor_bytes, "load_tensor_bytes": r.load_tensor_bytes,
            "gather_bytes_per_step": r.gather_bytes_per_step, **{k: v for k, v in r.terms().items()}}


def check(result: dict[str, Any]) -> list[str]:
    """The checked configurations whose run tensor bytes miss the measurement by more than TOLERANCE."""
    bad = []
    for name in CHECKED:
        row = result["rows"][name]
        for rank, (m, p) in enumerate(zip(row["ranks"], row["plan"])):
            measured = (m["hwm_run_kb"] - m["rss_base_kb"]) * 1024
            if abs(p["run_tensor_bytes"] / measured - 1) > TOLERANCE:
                bad.append(f"{name} rank {rank}: predicted {p['run_tensor_bytes'] / 2**20:.0f} MiB, measured "
                           f"{measured / 2**20:.0f} MiB")
    return bad


def report(result: dict[str, Any]) -> str:
    mib = 1 / 2 ** 20
    kb = 1 / 1024
    rows, plan_rows = [], []
    for name, row in result["rows"].items():
        for r, (m, p) in enumerate(zip(row["ranks"], row["plan"])):
            rows.append([name, r, f"{m['param_bytes'] * mib:.0f}", f"{m['rss_base_kb'] * kb:.0f}",
                         f"{m['rss_loaded_kb'] * kb:.0f}", f"{m['hwm_kb'] * kb:.0f}"])
            measured = (m["hwm_run_kb"] - m["rss_base_kb"]) * 1024 if m["hwm_run_kb"] is not None else None
            load = (m["anon_load_peak_kb"] - m["anon_base_kb"]) * 1024
            gather = m["shard_gather_bytes"] / max(m["steps"], 1)
            plan_rows.append([
                name, r, f"{p['weights'] * mib:.1f}", f"{m['param_bytes'] * mib:.1f}",
                f"{p['load_tensor_bytes'] * mib:.0f}", f"{load * mib:.0f}",
                f"{p['run_tensor_bytes'] * mib:.0f}", "-" if measured is None else f"{measured * mib:.0f}",
                "-" if measured is None else f"{(p['run_tensor_bytes'] / measured - 1) * 100:+.0f}%",
                f"{p['gather_bytes_per_step'] / 1e6:.0f} / {gather / 1e6:.0f}" if p["gather_bytes_per_step"] or gather
                else "-",
                "yes" if name in CHECKED else "",
            ])
    for name, why in result.get("skipped", {}).items():
        plan_rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"not run: {why}"])
    title = (f"Memory per rank: Flux medium (fp32), {result['size']}x{result['size']}, {result['steps']} steps, "
             f"cfg {result['cfg']:g}; fresh processes per config")
    old = format_table(title, ["config", "rank", "params held MiB", "RSS before loading MiB", "RSS after load MiB",
                               "peak RSS MiB"], rows)
    title = (f"Memory plan vs measured per rank: Flux medium (fp32), {result['size']}x{result['size']}, "
             f"{result['steps']} steps (PipeFusion: 1 warmup), cfg {result['cfg']:g}, {result['text_tokens']} text "
             f"tokens; run = peak RSS during the run - RSS before loading; load = peak anonymous RSS while loading - "
             f"before; checked within {TOLERANCE:.0%}: the rows marked; every row but \"glibc default\" with "
             f"MALLOC_MMAP_THRESHOLD_=65536 (RSS follows the live tensors)")
    plan = format_table(title, ["config", "rank", "params MiB plan", "params MiB held", "load MiB plan",
                                "load MiB measured", "run MiB plan", "run MiB measured", "run error",
                                "gather MB/step plan / measured", "checked"], plan_rows)
    bad = check(result) if all(n in result["rows"] for n in CHECKED) else ["not run"]
    verdict = ("every checked rank within the tolerance" if not bad else "outside the tolerance: " + "; ".join(bad))
    return f"{old}\n\n{plan}\n\n{verdict}"


# ---------------------------------------------------------------------------------------------------------
# The table of docs/memory.md: real configs on the meta device, 24 GiB GPUs
# ---------------------------------------------------------------------------------------------------------
CONFIGS = ROOT / "xdit_core" / "loading" / "configs"
# Qwen/Qwen-Image transformer/config.json (diffusers' QwenImageTransformer2DModel; the engine does not run it).
QWEN_IMAGE = {"_class_name": "QwenImageTransformer2DModel", "_name_or_path": "Qwen/Qwen-Image",
              "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
              "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
              "patch_size": 2}
# black-forest-labs/FLUX.2-dev transformer/config.json (diffusers' Flux2Transformer2DModel; not run by the engine).
FLUX2_DEV = {"_class_name": "Flux2Transformer2DModel", "_name_or_path": "black-forest-labs/FLUX.2-dev",
             "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-6, "guidance_embeds": True,
             "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0, "num_attention_heads": 48,
             "num_layers": 8, "num_single_layers": 48, "out_channels": None, "patch_size": 1, "rope_theta": 2000,
             "timestep_guidance_channels": 256}
BUDGET = 24 * GIB
TEXT_TOKENS = 512
GPUS = (2, 4, 8)


def _table_models() -> list[dict[str, Any]]:
    """Per model: its config, dtype and fp8, latent (1024x1024; Wan 1280x720, 81 frames), whether it runs a
    negative branch (true CFG), and the mesh for n GPUs (Ulysses, or CFG parallel x Ulysses)."""
    flux1 = json.loads((CONFIGS / "flux1-dev.json").read_text())
    wan = json.loads((CONFIGS / "wan2.2-i2v-a14b.json").read_text())
    ulysses = lambda n: ParallelConfig(ulysses_degree=n)  # noqa: E731
    cfg_ulysses = lambda n: ParallelConfig(ulysses_degree=n // 2, use_cfg_parallel=True)  # noqa: E731
    return [
        dict(name="FLUX.1-dev", config=flux1, weights="bf16", fp8=False, latent=[1, 16, 128, 128], negative=False,
             mesh=ulysses, note="1024², cfg 1 (guidance-distilled)"),
        dict(name="FLUX.1-dev", config=flux1, weights="fp8 kept", fp8=True, latent=[1, 16, 128, 128], negative=False,
             mesh=ulysses, note="1024², cfg 1"),
        dict(name="Qwen-Image", config=QWEN_IMAGE, weights="bf16", fp8=False, latent=[1, 16, 128, 128],
             negative=True, mesh=cfg_ulysses, note="1024², true CFG"),
        dict(name="Wan 2.2 I2V A14B, both experts", config=wan, weights="bf16", fp8=False,
             latent=[1, 16, 21, 90, 160], negative=True, mesh=cfg_ulysses, resident=1,
             note="1280x720, 81 frames, cfg 3.5"),
        dict(name="Wan 2.2 I2V A14B, both experts", config=wan, weights="fp8 kept", fp8=True,
             latent=[1, 16, 21, 90, 160], negative=True, mesh=cfg_ulysses, resident=1,
             note="the template's fp8_scaled files, kept fp8"),
        dict(name="FLUX.2 dev", config=FLUX2_DEV, weights="bf16", fp8=False, latent=[1, 32, 128, 128],
             negative=False, mesh=ulysses, note="1024², cfg 1 (guidance-distilled)"),
    ]


def memory_table() -> dict[str, Any]:
    """Every row of the docs' table, from the plan."""
    rows = []
    described: dict[str, Any] = {}
    for m in _table_models():
        key = m["name"].split(",")[0]
        if key not in described:
            described[key] = model_memory(m["config"], name=m["name"])
        mm = described[key]
        for gpus in GPUS:
            for sharded in (False, True):
                cfg = replace(m["mesh"](gpus), shard_weights=sharded)
                plan = plan_memory(mm, "bf16", cfg, m["latent"], fp8_kept=m["fp8"], text_tokens=TEXT_TOKENS,
                                   with_negative=m["negative"], resident=[mm] * m.get("resident", 0),
                                   shard_on_load=True)
                today = plan_memory(mm, "bf16", cfg, m["latent"], fp8_kept=m["fp8"], text_tokens=TEXT_TOKENS,
                                    with_negative=m["negative"], resident=[mm] * m.get("resident", 0),
                                    shard_on_load=False)
                r = plan.busiest
                term, size = r.biggest_term
                fits = plan.device_peak <= BUDGET
                near = None if fits else plan.nearest_fitting(BUDGET)
                rows.append({
                    "model": m["name"], "weights": m["weights"], "note": m["note"], "gpus": gpus,
                    "mesh": describe_mesh(cfg), "sharded": sharded, "held": r.held, "peak": plan.device_peak,
                    "load_today": today.busiest.tensor_bytes + today.busiest.process, "biggest": term,
                    "biggest_bytes": size, "fits": fits, "gather": plan.gather_bytes_per_step,
                    "gather_s": plan.gather_seconds_per_step,
                    "nearest": None if near is None else f"{near.mesh()} ({near.device_peak / GIB:.1f} GiB)",
                    "params": mm.parameter_count * (1 + m.get("resident", 0)),
                })
    return {"rows": rows, "budget": BUDGET, "link": PCIE_BYTES_PER_S, "fp8_source":
            described["FLUX.1-dev"].fp8_source}


def report_table(result: dict[str, Any]) -> str:
    lines = []
    for r in result["rows"]:
        gib = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        nearest = "" if r["fits"] else (r["nearest"] or "none of these GPUs")
        lines.append([
            f"{r['model']} ({r['params'] / 1e9:.1f} B)", r["weights"], r["gpus"], r["mesh"], gib(r["held"]),
            gib(r["peak"]), f"{r['biggest']} {gib(r['biggest_bytes'])}", "yes" if r["fits"] else "**no**",
            f"{r['gather'] / 1e9:.1f} GB, {r['gather_s']:.2f} s" if r["sharded"] else "-",
            gib(r["load_today"]) if r["sharded"] else "-", nearest,
        ])
    title = (f"Per-GPU memory from the plan: GPUs of {result['budget'] / GIB:.0f} GiB, batch 1, {TEXT_TOKENS} text "
             f"tokens; FLUX.1, Qwen-Image and FLUX.2 at 1024x1024, Wan at 1280x720, 81 frames; "
             f"gathers at {result['link'] / 1e9:g} GB/s (PCIe 4.0 x16)")
    return format_table(title, ["model (params)", "weights", "GPUs", "mesh", "held GiB", "peak GiB",
                                "biggest term GiB", "fits", "gather per step", "load peak today GiB",
                                "nearest mesh that fits"], lines)


START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"


def write_table(text: str, doc: Path = DOCS / "memory.md") -> None:
    """Replace the table between the markers of docs/memory.md."""
    body = doc.read_text()
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description="the memory plan's table (docs/memory.md)")
    ap.add_argument("what", choices=["table"])
    ap.add_argument("--write", action="store_true", help="put the table into docs/memory.md")
    opts = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = memory_table()
    text = report_table(result)
    print(text)
    print(f"\nfp8 kept: {result['fp8_source']}; {time.perf_counter() - t0:.0f} s")
    if opts.write:
        write_table(text)


if __name__ == "__main__":
    main(sys.argv[1:])
