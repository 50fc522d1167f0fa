"""Overheads, each measured side by side in one run:
- our engine at degree 1 (`run_request`, no mesh) vs a plain diffusers loop (the transformer's own
  forward and an euler update) on the same Flux model and inputs, in one thread;
- the worker pool: its cold start broken down (Ray start, actor start, rendezvous, weight load, first
  request) and the warm-request overhead (pool round trip minus the same computation in-process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import format_table, make_request, median_spread, model_path
from xdit_core.runtime.job import run_request
from xdit_core.models.latent_formats import flux_image_ids, pack_flux, unpack_flux
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.models import make_adapter
from xdit_core.sampling.request import SampleRequest


@torch.no_grad()
def plain_flux_loop(model: torch.nn.Module, request: SampleRequest) -> torch.Tensor:
    """Euler sampling with diffusers' FluxTransformer2DModel.forward and nothing of ours but the request's
    noise and sigmas: x += v(x, sigma) * (sigma_next - sigma), starting from sigma_0 * noise."""
    p = next(model.parameters())
    request = request.to(p.device)
    sigmas = request.sigmas
    x = sigmas[0] * request.noise + (1.0 - sigmas[0]) * request.latent_image  # float32 sampler state
    b, _, h, w = x.shape
    text, pooled = request.positive.text.to(p.dtype), request.positive.pooled.to(p.dtype)
    img_ids = flux_image_ids(h, w).to(p.device)
    txt_ids = torch.zeros(text.shape[1], 3, device=p.device)
    guidance = (
        torch.full((b,), request.guidance if request.guidance is not None else 3.5, device=p.device)
        if model.config.guidance_embeds
        else None
    )
    for i in range(len(sigmas) - 1):
        v = model(
            hidden_states=pack_flux(x).to(p.dtype),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigmas[i].expand(b).to(p.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        x = x + unpack_flux(v.float(), h, w) * (sigmas[i + 1] - sigmas[i])
    return x


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def engine_vs_diffusers(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Median time of both loops (interleaved, `repeats` each, 1 thread) and how far their results differ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, spec = load_model(model_path(tmp, "flux"))
        adapter = make_adapter(model, spec)
        request = make_request(spec, opts.ovh_size, opts.ovh_steps)
        ours, plain = run_request(adapter, request), plain_flux_loop(model, request)  # also the warm-up
        diff = float((ours - plain).abs().max() / plain.abs().max())
        t_ours, t_plain = [], []
        for rep in range(opts.repeats):
            pair = [(t_ours, lambda: run_request(adapter, request)), (t_plain, lambda: plain_flux_loop(model, request))]
            for store, fn in pair if rep % 2 == 0 else pair[::-1]:
                store.append(_timed(fn))
    finally:
        torch.set_num_threads(threads)
    return {
        "size": opts.ovh_size,
        "steps": opts.ovh_steps,
        "engine": median_spread(t_ours),
        "diffusers": median_spread(t_plain),
        "ratio": median_spread(t_ours)["median"] / median_spread(t_plain)["median"],
        "max_rel_diff": diff,
    }


def pool(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Cold start of a 1-rank pool (1 thread) and warm requests against the same run in-process."""
    import ray

    from xdit_core.runtime.pool import PoolKey, WorkerPool

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = model_path(tmp, "flux", preset="tiny")
        model, spec = load_model(path)
        adapter = make_adapter(model, spec)
        request = make_request(spec, opts.pool_size, opts.ovh_steps)
        workers = WorkerPool(PoolKey(str(path), "fp32", None, None, ParallelConfig(), "auto", 1))
        t0 = time.perf_counter()
        workers.start()
        cold = time.perf_counter() - t0
        first = _timed(lambda: workers.sample(request))
        local, remote = [], []
        for _ in range(opts.repeats):
            local.append(_timed(lambda: run_request(adapter, request)))
            remote.append(_timed(lambda: workers.sample(request, on_progress=lambda i, n: None)))
        stats = workers.stats
        workers.shutdown()
        ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    lm, rm = median_spread(local), median_spread(remote)
    return {
        "size": opts.pool_size,
        "steps": opts.ovh_steps,
        "cold_s": cold,
        "breakdown": {
            "Ray start": stats.ray_start_s,
            "actor start (process + imports)": stats.actor_start_s,
            "process-group rendezvous": stats.rendezvous_s,
            "weight load": stats.load_s,
            "first request": first,
        },
        "local": lm,
        "pool": rm,
        "overhead_s": rm["median"] - lm["median"],
    }


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    return {"engine": engine_vs_diffusers(opts, tmp), "pool": pool(opts, tmp)}


def report(result: dict[str, Any]) -> str:
    e, p = result["engine"], result["pool"]
    engine = format_table(
        f"Engine at degree 1 vs a plain diffusers loop: Flux medium, {e['size']}x{e['size']}, {e['steps']} euler "
        f"steps, 1 thread, interleaved (results differ by max|d|/max|ref| = {e['max_rel_diff']:.1e})",
        ["loop", "median s", "min-max s", "ratio to diffusers"],
        [
            [
                "xdit_core run_request",
                e["engine"]["median"],
                f"{e['engine']['min']:.3f}-{e['engine']['max']:.3f}",
                f"{e['ratio']:.3f}",
            ],
            [
                "diffusers forward + euler",
                e["diffusers"]["median"],
                f"{e['diffusers']['min']:.3f}-{e['diffusers']['max']:.3f}",
                "1",
            ],
        ],
    )
    cold = format_table(
        f"Pool cold start (Flux tiny, 1 rank, 1 thread): {p['cold_s']:.2f} s before the first request",
        ["phase", "s"],
        [[k, v] for k, v in p["breakdown"].items()],
    )
    warm = format_table(
        f"Pool warm request: {p['size']}x{p['size']}, {p['steps']} steps (median, min-max)",
        ["path", "median s", "min-max s"],
        [
            ["in-process run_request", p["local"]["median"], f"{p['local']['min']:.3f}-{p['local']['max']:.3f}"],
            ["pool.sample", p["pool"]["median"], f"{p['pool']['min']:.3f}-{p['pool']['max']:.3f}"],
            ["overhead per request", p["overhead_s"], f"{1000 * p['overhead_s'] / p['steps']:.1f} ms per step"],
        ],
    )
    return "\n\n".join([engine, cold, warm])
