"""Overheads, each measured side by side in one run.

`degree1` (target: ours / diffusers <= TARGET), medium models, one thread, interleaved repeats:
- routing, Flux (dispatcher) and SD3 (SDPA): one forward through a degree-1 SequenceParallelRunner
  (attention routed per module to `usp_attention` over size-1 groups: all of the parallel path but
  communication) vs the model's own diffusers forward on the same inputs;
- end to end, Flux: our engine at degree 1 (`run_request`, no mesh) vs a plain diffusers loop (the
  transformer's own forward and an euler update) on the same request.
`overheads`: the worker pool: its cold start broken down (Ray start, actor start, rendezvous, weight
load, first request) and the warm-request overhead (pool round trip minus the same computation in-process);
then, on one warm 1-rank pool holding two models, interleaved:
- the xDiT Guider's path (ComfyUI's sampler on the host, one round trip per model evaluation) against the
  in-rank loop on the same request (tiny Flux: the per-evaluation overhead, with the latent's transfer);
- live previews (each step's prediction kept and sent at the polls) against none (medium Flux: the cost as
  a share of a step; target <= 2%).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.common import format_table, make_request, median_spread, model_path
from xdit_core.parallel.sequence_parallel import SequenceParallelRunner
from xdit_core.runtime.job import run_request
from xdit_core.models.latent_formats import flux_image_ids, pack_flux, unpack_flux
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.models import make_adapter
from xdit_core.models.base import ModelAdapter
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


TARGET = 1.02  # the most our degree-1 time may be over diffusers' (ratio of the medians)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def interleaved(ours: Callable[[], Any], ref: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """`repeats` timed (ours, ref) pairs, the order reversed every other pair: both times' medians and
    spreads, the ratio of the medians against TARGET and the spread of the per-pair ratios."""
    t_ours: list[float] = []
    t_ref: list[float] = []
    for rep in range(repeats):
        pair = [(t_ours, ours), (t_ref, ref)]
        for store, fn in pair if rep % 2 == 0 else pair[::-1]:
            store.append(_timed(fn))
    ratio = statistics.median(t_ours) / statistics.median(t_ref)
    return {
        "ours": median_spread(t_ours),
        "ref": median_spread(t_ref),
        "ratio": ratio,
        "pair_ratio": median_spread([o / r for o, r in zip(t_ours, t_ref)]),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
    }


@torch.no_grad()
def _diffusers_forward(adapter: ModelAdapter, x: torch.Tensor, t: torch.Tensor, cond) -> Callable[[], torch.Tensor]:
    """diffusers' own forward of the adapter's model on the inputs the adapter gets, as a latent [B, C, h, w]."""
    model, dtype = adapter.model, x.dtype
    h, w = x.shape[-2:]
    text, pooled = cond.text.to(dtype), cond.pooled.to(dtype)
    if adapter.spec.family == "sd3":  # the timestep goes in as the adapter gets it (ComfyUI's scale)
        return lambda: model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                             return_dict=False)[0]
    inputs = dict(
        hidden_states=pack_flux(x),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=t,
        img_ids=flux_image_ids(h, w),
        txt_ids=torch.zeros(text.shape[1], 3),
        guidance=torch.full((1,), 3.5) if model.config.guidance_embeds else None,  # the adapter's default
        return_dict=False,
    )
    return lambda: unpack_flux(model(**inputs)[0], h, w)


def routing_vs_forward(adapter: ModelAdapter, opts: argparse.Namespace) -> dict[str, Any]:
    """One forward at the request's first sigma, 1 thread: the degree-1 SequenceParallelRunner's `predict`
    vs diffusers' forward on the same inputs, checked equal to fp32 rounding before timing. Flux attends
    through diffusers' dispatcher, SD3 through F.scaled_dot_product_attention: one row each routing path."""
    model = adapter.model
    with _one_thread():
        request = make_request(adapter.spec, opts.route_size, 1)
        dtype = next(model.parameters()).dtype
        x, cond = request.noise.to(dtype), request.positive
        ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
        t = ms.timestep(request.sigmas[:1]).to(dtype)
        h, w = x.shape[-2:]
        runner = SequenceParallelRunner.single_rank(adapter)
        plain, routed = _diffusers_forward(adapter, x, t, cond), lambda: runner.predict(x, t, cond, None)
        diff = _rel_diff(routed(), plain())  # also the warm-up
        if diff > 1e-5:
            raise AssertionError(f"the routed forward differs from diffusers' by {diff:.1e}: not the same work")
        timing = interleaved(routed, plain, opts.degree1_repeats)
    return {"family": adapter.spec.family, "size": opts.route_size, "tokens": [h * w // 4, cond.text.shape[1]],
            "max_rel_diff": diff, **timing}


def engine_vs_diffusers(adapter: ModelAdapter, opts: argparse.Namespace) -> dict[str, Any]:
    """Both loops (interleaved, 1 thread) timed as in `interleaved`, and how far their results differ."""
    model = adapter.model
    with _one_thread():
        request = make_request(adapter.spec, opts.ovh_size, opts.ovh_steps)
        diff = _rel_diff(run_request(adapter, request), plain_flux_loop(model, request))  # also the warm-up
        timing = interleaved(
            lambda: run_request(adapter, request), lambda: plain_flux_loop(model, request), opts.degree1_repeats
        )
    return {"size": opts.ovh_size, "steps": opts.ovh_steps, "max_rel_diff": diff, **timing}


def pool(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Cold start of a 1-rank pool (1 thread) and warm requests against the same run in-process."""
    import ray

    from xdit_core.runtime.pool import PoolKey, WorkerPool

    with _one_thread():
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


def run_degree1(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    flux = make_adapter(*load_model(model_path(tmp, "flux")))
    sd3 = make_adapter(*load_model(model_path(tmp, "sd3")))
    return {"routing": [routing_vs_forward(flux, opts), routing_vs_forward(sd3, opts)],
            "engine": engine_vs_diffusers(flux, opts)}


def host_driven(pool_: Any, spec: Any, request: SampleRequest) -> torch.Tensor:
    """The request's euler loop on the host, each evaluation on the ranks (the xDiT Guider's path)."""
    from xdit_core.runtime.job import denoise_latent, serial_loop

    ms = spec.model_sampling(width=request.width, height=request.height)
    with pool_.evaluations(request.positive, request.negative) as evaluate:
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = ms.timestep(sigma.reshape(1)).float().expand(x.shape[0])
            cond, uncond = evaluate(ms.calculate_input(sigma, x), t, with_negative=request.negative is not None)
            cond = ms.calculate_denoised(sigma, cond, x)
            if uncond is None:
                return cond
            uncond = ms.calculate_denoised(sigma, uncond, x)
            return uncond + (cond - uncond) * request.cfg

        return denoise_latent(spec, ms, request, serial_loop(request, ms, denoise))


def sampling_paths(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The Guider's per-evaluation overhead (tiny Flux) and the previews' cost (medium Flux), one warm pool."""
    import ray
    from dataclasses import replace

    from xdit_core.runtime.pool import PoolKey, WorkerPool

    def key(path: Path) -> PoolKey:
        return PoolKey(str(path), "fp32", None, None, ParallelConfig(), "auto", 1)

    with _one_thread():
        tiny, medium = model_path(tmp, "flux", preset="tiny"), model_path(tmp, "flux")
        tiny_spec, medium_spec = load_model(tiny)[1], load_model(medium)[1]
        workers = WorkerPool(key(tiny))
        workers.start()
        request = make_request(tiny_spec, opts.pool_size, opts.ovh_steps, cfg=2.0)
        host_driven(workers, tiny_spec, request)  # warm both paths
        diff = _rel_diff(host_driven(workers, tiny_spec, request), workers.sample(request))
        guider = interleaved(lambda: host_driven(workers, tiny_spec, request), lambda: workers.sample(request),
                             opts.repeats)
        workers.use(key(medium))
        big = make_request(medium_spec, opts.ovh_size, opts.ovh_steps)
        taken: list[int] = []
        previews = interleaved(
            lambda: workers.sample(replace(big, preview=True), on_progress=lambda i, n: None,
                                   on_preview=lambda i, x0: taken.append(i)),
            lambda: workers.sample(big, on_progress=lambda i, n: None), opts.repeats)
        workers.shutdown()
        ray.shutdown()
    evaluations = request.steps  # euler: one evaluation per step (both branches in it)
    latent_kib = request.noise.numel() * 4 / 1024
    return {
        "guider": {**guider, "size": opts.pool_size, "steps": request.steps, "max_rel_diff": diff,
                   "per_evaluation_ms": 1000 * (guider["ours"]["median"] - guider["ref"]["median"]) / evaluations,
                   "latent_kib": latent_kib},
        "previews": {**previews, "size": opts.ovh_size, "steps": big.steps, "previews_taken": len(taken),
                     "share_of_step": previews["ours"]["median"] / previews["ref"]["median"] - 1},
    }


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    return {"pool": pool(opts, tmp), "paths": sampling_paths(opts, tmp)}


def report_degree1(result: dict[str, Any]) -> str:
    routing, e = result["routing"], result["engine"]

    def row(name: str, c: dict[str, Any]) -> list[Any]:
        o, f, q = c["ours"], c["ref"], c["pair_ratio"]
        return [
            name,
            f"{o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f})",
            f"{f['median']:.3f} ({f['min']:.3f}-{f['max']:.3f})",
            f"{c['ratio']:.3f}",
            f"{q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f})",
            "yes" if c["meets_target"] else "NO",
            f"{c['max_rel_diff']:.1e}",
        ]

    return format_table(
        f"Degree 1 vs diffusers: medium models, 1 thread, {e['ours']['n']} interleaved pairs each; "
        f"target ours / diffusers <= {TARGET} (ratio of the medians)",
        ["comparison", "ours: median s (min-max)", "diffusers: median s (min-max)", "ratio",
         "per-pair ratio: median (min-max)", "target met", "max abs diff / max abs ref"],
        [
            *(row(f"routing, {r['family']}: SP runner (size-1 groups) vs model forward; {r['size']}x{r['size']}, "
                  f"{r['tokens'][0]} image + {r['tokens'][1]} text tokens", r) for r in routing),
            row(f"end to end, flux: run_request vs diffusers forward + euler; {e['size']}x{e['size']}, "
                f"{e['steps']} steps", e),
        ],
    )


def report(result: dict[str, Any]) -> str:
    p = result["pool"]
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
    g, v = result["paths"]["guider"], result["paths"]["previews"]
    paths = format_table(
        "Sampling paths on one warm 1-rank pool, 1 thread, interleaved repeats (median s, min-max)",
        ["comparison", "with", "without", "difference"],
        [
            [f"xDiT Guider (host loop, {g['steps']} evaluations) vs in-rank loop; tiny Flux {g['size']}x{g['size']}, "
             f"cfg 2, latent {g['latent_kib']:.0f} KiB",
             f"{g['ours']['median']:.3f} ({g['ours']['min']:.3f}-{g['ours']['max']:.3f})",
             f"{g['ref']['median']:.3f} ({g['ref']['min']:.3f}-{g['ref']['max']:.3f})",
             f"{g['per_evaluation_ms']:.1f} ms per evaluation (max rel diff {g['max_rel_diff']:.0e})"],
            [f"previews vs none; medium Flux {v['size']}x{v['size']}, {v['steps']} steps "
             f"({v['previews_taken']} previews taken in all)",
             f"{v['ours']['median']:.3f} ({v['ours']['min']:.3f}-{v['ours']['max']:.3f})",
             f"{v['ref']['median']:.3f} ({v['ref']['min']:.3f}-{v['ref']['max']:.3f})",
             f"{100 * v['share_of_step']:+.1f}% of a step (target <= 2%)"],
        ],
    )
    return "\n\n".join([cold, warm, paths])
