"""New families: the `medium` Qwen-Image (random weights; diffusers' QwenImageTransformer2DModel, 12 double-stream
blocks of 8 heads x 64 over 256-wide text states) at `fam_size`² with 128 text tokens, serial vs Ulysses 2, Ring 2,
PipeFusion 2 (M 2, warmup 1) and CFG parallel 2, and diffusers' own context parallelism (Ulysses 2, through
QwenImageTransformer2DModel's `_cp_plan`) beside them, measured side by side in one 2-rank gloo world, one thread
per rank: seconds per step, speedup, and the bytes each rank sends per step from the engine's counters, checked
against the performance model's message sizes.

Every run is untimed once on a 2-step request (first-call allocations; diffusers' bytes are counted there, under the
dispatch mode that sees its collectives), then timed `fam_repeats` times on the `fam_steps`-step request,
interleaved (the order reversed every other repeat); a rank outside a run waits. Per step: the mean step time as
the rank that finishes steps last sees it (PipeFusion: its last stage, over the steps after its warmup step, the
first of them carrying the pipeline's fill); diffusers: its wall time over the steps. CFG parallel needs a
negative branch, so it runs at cfg 4 (Qwen-Image's true CFG) against a serial run at cfg 4; the rest at cfg 1.
Diffusers' Ring cannot run on a CPU (its ring attention needs the log-sum-exp of a CUDA backend).
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

from bench.bench_world import _adapters, _CollectiveBytes, _contention, _evaluation, _sent
from bench.calibrate import model_shape, shape_workload
from bench.common import fidelity, format_table, median_spread, model_path
from bench.perfmodel import message_bytes
from xdit_core.loading.load import load_model
from xdit_core.models.base import BranchCond, ModelAdapter
from xdit_core.models.latent_formats import pack_flux, unpack_flux
from xdit_core.models.model_sampling import ModelSampling
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.mesh import Mesh, ParallelConfig
from xdit_core.runtime.job import run_request
from xdit_core.runtime.launch import spawn_world
from xdit_core.sampling.request import SampleRequest, build_request, empty_latent
from xdit_core.sampling.samplers import is_max_denoise

TEXT_TOKENS = 128  # Qwen-Image prompts: ~100-200 Qwen2.5-VL tokens
CFG = 4.0  # Qwen-Image's true CFG scale (diffusers' default)
WARMUP = 1
PC = ParallelConfig
# name -> (config, request key, baseline)
CONFIGS: dict[str, tuple[ParallelConfig, str, str]] = {
    "serial": (PC(), "cfg1", "serial"),
    "ulysses 2": (PC(ulysses_degree=2), "cfg1", "serial"),
    "ring 2": (PC(ring_degree=2), "cfg1", "serial"),
    f"pipefusion 2, M 2, warmup {WARMUP}": (PC(pipefusion_parallel_degree=2, num_pipeline_patch=2,
                                               warmup_steps=WARMUP), "cfg1", "serial"),
    f"serial, cfg {CFG:g}": (PC(), "cfg", f"serial, cfg {CFG:g}"),
    f"cfg parallel 2, cfg {CFG:g}": (PC(use_cfg_parallel=True), "cfg", f"serial, cfg {CFG:g}"),
}
PEERS = {"diffusers serial": 1, "diffusers ulysses 2": 2}  # name -> diffusers' Ulysses degree (1: rank 0 alone)


def qwen_request(spec: Any, size: int, steps: int, cfg: float, seed: int = 0) -> SampleRequest:
    """A square euler/simple request with `TEXT_TOKENS` random text tokens per branch (a negative one when
    cfg != 1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    pos, neg = (BranchCond(torch.randn(1, TEXT_TOKENS, spec.text_dim, generator=gen)) for _ in range(2))
    return build_request(spec, empty_latent(spec, 1, size, size), seed=seed, steps=steps, cfg=cfg, sampler="euler",
                         scheduler="simple", denoise=1.0, positive=pos, negative=neg if cfg != 1.0 else None)


@torch.no_grad()
def plain_qwen_loop(model: torch.nn.Module, request: SampleRequest, ms: ModelSampling) -> torch.Tensor:
    """Euler sampling (cfg 1) with diffusers' QwenImageTransformer2DModel.forward and nothing of ours but the
    request's noise, sigmas and the family's timestep (sigma): x += v(x, sigma) * (sigma_next - sigma)."""
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
    b, _, h, w = x.shape
    text = request.positive.text
    shapes = [[(1, h // 2, w // 2)]] * b
    for i in range(len(sigmas) - 1):
        timestep = ms.timestep(sigmas[i]).reshape(1).expand(b)
        v = model(hidden_states=pack_flux(x), encoder_hidden_states=text, timestep=timestep, img_shapes=shapes,
                  return_dict=False)[0]
        x = x + unpack_flux(v.float(), h, w) * (sigmas[i + 1] - sigmas[i])
    return ms.inverse_noise_scaling(sigmas[-1], x)


def _engine_run(adapter: ModelAdapter, mesh: Mesh, device: torch.device, request: SampleRequest,
                count: bool) -> dict[str, Any]:
    ctx = RankContext(mesh, device) if mesh.config.world_size > 1 else None
    step_s: list[float] = []
    out = run_request(adapter, request, step_seconds=step_s, ctx=ctx)
    return {"latent": out, "step_s": step_s, "bytes": _sent(ctx)}


def _diffusers_run(model: torch.nn.Module, ms: ModelSampling, request: SampleRequest, count: bool) -> dict[str, Any]:
    if not count:
        return {"latent": plain_qwen_loop(model, request, ms), "step_s": None, "bytes": {}}
    with _CollectiveBytes() as counter:
        latent = plain_qwen_loop(model, request, ms)
    return {"latent": latent, "step_s": None, "bytes": counter.sent}


def families_world(rank: int, device: torch.device, payload: dict[str, Any]) -> dict[str, Any]:
    """Every config of ours and of diffusers on its request: once untimed on the short requests (diffusers' bytes
    counted there), a contention probe, then `repeats` timed runs interleaved. Returns this rank's wall seconds,
    step seconds and bytes (ours: the first timed repeat; diffusers: the untimed run) per run, and on rank 0 each
    run's final latent (first timed repeat)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models._modeling_parallel import ContextParallelConfig

    path, requests, warm = payload["path"], payload["requests"], payload["warm_requests"]
    configs = {name: c[0] for name, c in payload["configs"].items()}
    meshes = {name: Mesh(cfg, list(range(cfg.world_size))) for name, cfg in configs.items()}
    adapters = _adapters(path, configs, meshes)
    shared = next(a for n, a in adapters.items() if configs[n].pipefusion_parallel_degree == 1)
    ms = shared.spec.model_sampling(requests["cfg1"].shift, width=requests["cfg1"].width,
                                    height=requests["cfg1"].height)
    runs: dict[str, Optional[Callable[[SampleRequest, bool], dict[str, Any]]]] = {}
    keys: dict[str, str] = {}
    for name, (cfg, key, _) in payload["configs"].items():
        keys[name] = key
        runs[name] = partial(_engine_run, adapters[name], meshes[name], device) if meshes[name].is_member else None
    for name, degree in payload["peers"].items():
        keys[name] = "cfg1"
        if degree == 1 and rank != 0:
            runs[name] = None
            continue
        model = QwenImageTransformer2DModel.from_pretrained(path).eval()  # a model of its own: hooks are per model
        if degree > 1:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
        runs[name] = partial(_diffusers_run, model, ms)
    out: dict[str, Any] = {"wall": {n: [] for n in runs}, "step_s": {n: [] for n in runs}, "bytes": {},
                           "latents": {}, "contention": []}
    for rep in range(-1, payload["repeats"]):  # -1: untimed
        if rep == 0:
            out["contention"].append(_contention(rank, _evaluation(shared, requests["cfg1"])))
        for name in list(runs) if rep % 2 == 0 else list(reversed(runs)):
            dist.barrier()
            if runs[name] is not None:
                peer = name in payload["peers"]
                t0 = time.perf_counter()
                res = runs[name](warm[keys[name]] if rep < 0 else requests[keys[name]], rep < 0 and peer)
                wall = time.perf_counter() - t0
                if rep < 0 and peer:
                    out["bytes"][name] = {"steps": warm[keys[name]].steps, "sent": res["bytes"]}
                if rep >= 0:
                    out["wall"][name].append(wall)
                    out["step_s"][name].append(res["step_s"])
                if rep == 0:
                    if not peer:
                        out["bytes"][name] = {"steps": requests[keys[name]].steps, "sent": res["bytes"]}
                    if rank == 0:
                        out["latents"][name] = res["latent"]
            dist.barrier()
    return out


def _load_average() -> float:
    """The machine's 1-minute load average (other processes share its cores); 0 where there is no /proc."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = model_path(tmp, "qwen")
    model, spec = load_model(path)
    from xdit_core.models import make_adapter

    adapter = make_adapter(model, spec)
    configs = dict(CONFIGS)
    requests = {"cfg1": qwen_request(spec, opts.fam_size, opts.fam_steps, 1.0),
                "cfg": qwen_request(spec, opts.fam_size, opts.fam_steps, CFG)}
    warm = {"cfg1": qwen_request(spec, opts.fam_size, 2, 1.0), "cfg": qwen_request(spec, opts.fam_size, 2, CFG)}
    payload = {"path": str(path), "requests": requests, "warm_requests": warm, "configs": configs, "peers": PEERS,
               "repeats": opts.fam_repeats}
    t0, load_start = time.perf_counter(), _load_average()
    ranks = spawn_world(families_world, 2, payload, threads=1, timeout_s=3600)
    seconds, load_end = time.perf_counter() - t0, _load_average()
    steps = opts.fam_steps
    shapes = {k: shape_workload(model_shape(adapter, r)) for k, r in requests.items()}
    latents = ranks[0]["latents"]
    rows: dict[str, Any] = {}
    names = [(n, c.world_size, k, base) for n, (c, k, base) in configs.items()]
    names += [(n, d, "cfg1", "diffusers serial") for n, d in PEERS.items()]
    for name, world, key, base in names:
        cfg = configs[name][0] if name in configs else None
        pf = cfg is not None and cfg.pipefusion_parallel_degree > 1
        reporter = ranks[1] if pf else ranks[0]  # PipeFusion's last stage finishes steps last
        wall = ranks[0]["wall"][name]
        if cfg is None:
            per_step = [w / steps for w in wall]
        else:
            per_step = [statistics.fmean(s[WARMUP:] if pf else s) for s in reporter["step_s"][name]]
        sent = {r: ranks[r]["bytes"][name] for r in range(world)}
        row: dict[str, Any] = {
            "ranks": world, "cfg": CFG if key == "cfg" else 1.0, "baseline": base,
            "per_step": median_spread(per_step), "wall": median_spread(wall),
            "bytes_per_step": {r: {k: v / s["steps"] for k, v in s["sent"].items() if v} for r, s in sent.items()},
            "fidelity": fidelity(latents[name], latents[f"serial, cfg {CFG:g}" if key == "cfg" else "serial"]),
        }
        if cfg is not None:
            model_sent = {r: message_bytes(shapes[key], cfg, r, steps) for r in range(world)}
            nonzero = lambda d: {k: v for k, v in d.items() if v}
            row["bytes_match"] = all(nonzero(model_sent[r]) == nonzero(sent[r]["sent"]) for r in range(world))
            if pf:  # the pipelined steps alone (the warmup step sends the whole image once through the stages)
                warm_sent = {r: message_bytes(shapes[key], cfg, r, WARMUP) for r in range(world)}
                row["pipelined_bytes_per_step"] = {
                    r: {k: (model_sent[r][k] - warm_sent[r][k]) / (steps - WARMUP) for k in model_sent[r]
                        if model_sent[r][k] - warm_sent[r][k]} for r in range(world)}
        rows[name] = row
    for row in rows.values():
        base = rows[row["baseline"]]
        row["speedup_step"] = base["per_step"]["median"] / row["per_step"]["median"]
        row["speedup_range"] = [base["per_step"]["min"] / row["per_step"]["max"],
                                base["per_step"]["max"] / row["per_step"]["min"]]
        row["speedup_wall"] = base["wall"]["median"] / row["wall"]["median"]
    rows["ulysses 2"]["vs_peer"] = rows["diffusers ulysses 2"]["per_step"]["median"] / rows["ulysses 2"]["per_step"][
        "median"]
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"qwen-image medium ({cfg.num_layers} double-stream blocks, {cfg.num_attention_heads} heads x "
                 f"{cfg.attention_head_dim}, text {cfg.joint_attention_dim} wide; {params / 1e6:.0f} M parameters, "
                 "fp32)",
        "size": opts.fam_size, "tokens": shapes["cfg1"].img_tokens, "txt_tokens": TEXT_TOKENS, "steps": steps,
        "warmup": WARMUP, "cfg": CFG, "repeats": opts.fam_repeats, "seconds": seconds,
        "contention": ranks[0]["contention"], "load_average": [load_start, load_end], "rows": rows,
    }


def _kinds(sent: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 1e3:.0f}" for k, v in sent.items() if v) or "-"


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    title = (
        f"Qwen-Image medium: {result['model']}, random weights, {result['size']}x{result['size']} "
        f"({result['tokens']} image + {result['txt_tokens']} text tokens, joint attention), {result['steps']} euler "
        f"steps, 1 thread per rank on 2 cores, {result['repeats']} interleaved repeats (median, min-max); "
        + (f"PipeFusion per step over the {result['steps'] - result['warmup']} steps after its warmup step; "
           if any("pipelined_bytes_per_step" in r for r in rows.values()) else "")
        + "speedup against the baseline's median (ours: our serial run at the same cfg; diffusers: its own serial loop); 2 ranks compute "
        f"{statistics.median(result['contention']):.2f}x slower than one alone (probed once, before the timed runs); "
        "1-minute load average at start / end " + (" / ".join(f"{v:.1f}" for v in result.get("load_average", [])) or "?")
        + f"; {result['seconds'] / 60:.1f} min"
    )
    table = []
    for name, r in rows.items():
        busiest = max(r["bytes_per_step"].values(), key=lambda d: sum(d.values()))
        table.append([
            name, r["ranks"], f"{r['cfg']:g}", r["per_step"]["median"],
            f"{r['per_step']['min']:.3f}-{r['per_step']['max']:.3f}", f"{r['speedup_step']:.2f}x",
            f"{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}", r["wall"]["median"],
            f"{r['speedup_wall']:.2f}x", f"{sum(busiest.values()) / 1e3:.0f}", _kinds(busiest),
            ("yes" if r["bytes_match"] else "NO") if "bytes_match" in r else "-", f"{r['fidelity']['max_rel']:.1e}",
        ])
    out = format_table(title, ["run", "ranks", "cfg", "s/step", "min-max s/step", "speedup per step", "speedup range",
                               "end to end s", "speedup end to end", "kB sent/step (busiest rank)",
                               "by kind (kB/step)", "bytes = model", "max rel diff vs serial"], table)
    notes = []
    for name, r in rows.items():
        if "pipelined_bytes_per_step" in r:
            per = r["pipelined_bytes_per_step"]
            notes.append(f"{name}: per pipelined step (the model's count, equal to the counters over the run) rank 0 "
                         f"{_kinds(per[0])}, rank 1 {_kinds(per[1])} kB.")
    notes.append(f"Ours vs diffusers' context parallelism (Ulysses 2, same model, tokens and loop): ours "
                 f"{rows['ulysses 2']['vs_peer']:.2f}x faster per step.")
    return out + "\n\n" + "\n".join(notes)
