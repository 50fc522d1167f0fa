"""The performance model for the benchmarks: the engine's model (xdit_core/parallel/perf_model.py, links,
clusters, workloads, message sizes, `predict`; perf_workloads.py, FLOP workloads and meshes) re-exported for
the benchmark modules, plus what only the benchmarks use: fitting a device's throughput to a published time,
and the PipeFusion paper's communication table.

`paper_comm_elements` is the PipeFusion paper's communication table (per device per diffusion step, in
elements) and `exact_comm_elements` the exact per-rank volume of each method under the same idealised
shapes; tests/test_perfmodel.py checks that the exact forms reduce to the paper's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional, Sequence

from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import (LINKS, BlockCost, Cluster, Link, LinkCost, Prediction, Workload,
                                           message_bytes, predict, transfer_time, uniform_link)
from xdit_core.parallel.perf_workloads import (FLUX_DEV, HUNYUAN_VIDEO, SD35_LARGE, WAN21_T2V_14B, Architecture,
                                               best_config, candidate_configs, describe, flop_workload)

__all__ = ["LINKS", "BlockCost", "Cluster", "Link", "LinkCost", "Prediction", "Workload", "message_bytes", "predict",
           "transfer_time", "uniform_link", "FLUX_DEV", "HUNYUAN_VIDEO", "SD35_LARGE", "WAN21_T2V_14B", "Architecture",
           "best_config", "candidate_configs", "describe", "flop_workload", "calibrate_throughput", "PAPER_METHODS",
           "paper_comm_elements", "exact_comm_elements", "method_of"]


def calibrate_throughput(make: Any, target_s: float, cluster: Cluster, steps: int) -> float:
    """The seconds-per-FLOP for which `make(s_per_flop)`'s serial prediction equals `target_s` (bisection
    on a log scale; the prediction grows monotonically with it)."""
    lo, hi = 1e-18, 1e-9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if predict(make(mid), ParallelConfig(), cluster, steps).total < target_s:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


# ---------------------------------------------------------------------------------------------------
# The PipeFusion paper's communication table
# ---------------------------------------------------------------------------------------------------
PAPER_METHODS = ("tensor_parallel", "distrifusion", "ring", "ulysses", "pipefusion")


def paper_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Communication per device per diffusion step in the PipeFusion paper (arXiv 2405.14430), in
    elements: p tokens, hs hidden size, L layers, N devices. Works on numbers and sympy symbols."""
    return {
        "tensor_parallel": 4 * p * hs * L,
        "distrifusion": 2 * p * hs * L,
        "ring": 2 * p * hs * L,
        "ulysses": 4 * p * hs * L / N,
        "pipefusion": 2 * p * hs,
    }[method]


def exact_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Exact elements one device sends per step under the paper's idealisation (p divisible by N,
    one branch): TP two ring all-reduces per layer; DistriFusion an all-gather of K and V per layer;
    Ring N-1 hops of the local K and V per layer; Ulysses two all-to-alls per layer (Q, K and V together, then the output);
    PipeFusion, a middle stage: the activations of every patch received and sent once per step."""
    return {
        "tensor_parallel": 2 * 2 * (N - 1) * p * hs * L / N,
        "distrifusion": 2 * (N - 1) * p * hs * L / N,
        "ring": 2 * (N - 1) * p * hs * L / N,
        "ulysses": 4 * (N - 1) * p * hs * L / N**2,
        "pipefusion": 2 * p * hs,
    }[method]


def method_of(config: ParallelConfig) -> Optional[str]:
    """The paper's method a single-method config is (None for hybrids and CFG)."""
    active = [k for k, v in config.degrees.items() if v > 1]
    if len(active) != 1:
        return None
    return {"ulysses": "ulysses", "ring": "ring", "pipefusion": "pipefusion"}.get(active[0])


# ---------------------------------------------------------------------------------------------------
# Predictions for new families (Qwen-Image, FLUX.2 dev, Z-Image-Turbo): per method and GPU count, with the memory
# plan's peak per GPU; `python -m bench.perfmodel --workload NAME ...`
# ---------------------------------------------------------------------------------------------------
# Tongyi-MAI/Z-Image-Turbo's transformer config (diffusers' ZImageTransformer2DModel defaults).
Z_IMAGE_CONFIG = {"_class_name": "ZImageTransformer2DModel", "_name_or_path": "Tongyi-MAI/Z-Image-Turbo",
                  "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                  "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                  "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                  "axes_lens": [1024, 512, 512]}
GIB = 2**30


def family_workloads() -> dict[str, dict[str, Any]]:
    """name -> the architecture, image, branches (2: a negative branch), steps, and what the memory plan takes: the
    diffusers config."""
    from bench.memory import FLUX2_DEV as FLUX2_CONFIG, QWEN_IMAGE as QWEN_CONFIG
    from xdit_core.parallel.perf_workloads import FLUX2_DEV, QWEN_IMAGE, Z_IMAGE_TURBO

    return {
        "qwen-image": dict(arch=QWEN_IMAGE, size=1328, branches=2, cfg=4.0, steps=50, config=QWEN_CONFIG,
                           note="true CFG 4 (a negative branch: 2 evaluations per step), 50 steps (diffusers' "
                                "defaults)"),
        "flux2-dev": dict(arch=FLUX2_DEV, size=1024, branches=1, cfg=1.0, steps=50, config=FLUX2_CONFIG,
                          note="guidance-distilled (cfg 1: one evaluation per step), 50 steps (diffusers' default)"),
        "z-image": dict(arch=Z_IMAGE_TURBO, size=1024, branches=1, cfg=1.0, steps=8, config=Z_IMAGE_CONFIG,
                        gpus=(3, 6),  # 30 heads: Ulysses 2, 3, 5, 6
                        note="Turbo: 8 steps, cfg 1 (one evaluation per step)"),
    }


# The model's link profiles, each with the memory of the GPUs it usually joins.
FAMILY_CLUSTERS = {"PCIe, 24 GB": ("pcie", 24), "NVLink, 80 GB": ("nvlink", 80)}


def _methods(n: int, heads: int, branches: int) -> dict[str, Optional[ParallelConfig]]:
    """The single methods and the usual hybrids at `n` GPUs (None where the engine refuses the mesh)."""
    pc = ParallelConfig
    half = n // 2
    usp_u = max((u for u in range(2, n) if n % u == 0 and heads % u == 0 and n // u > 1), default=0)
    out: dict[str, Optional[ParallelConfig]] = {
        "Ulysses": pc(ulysses_degree=n) if heads % n == 0 else None,
        "Ring": pc(ring_degree=n),
        "USP (Ulysses x Ring)": pc(ulysses_degree=usp_u, ring_degree=n // usp_u) if usp_u else None,
        "PipeFusion (M = stages, warmup 1)": pc(pipefusion_parallel_degree=n),
        "PipeFusion x Ulysses": pc(pipefusion_parallel_degree=half, ulysses_degree=2) if n >= 4 and heads % 2 == 0
        else None,
    }
    if branches == 2:
        rest = _methods(half, heads, 1) if half > 1 else {}
        out["CFG"] = pc(use_cfg_parallel=True) if n == 2 else None
        out["CFG x Ulysses"] = replace(rest["Ulysses"], use_cfg_parallel=True) if rest.get("Ulysses") else None
        out["CFG x PipeFusion"] = (replace(rest["PipeFusion (M = stages, warmup 1)"], use_cfg_parallel=True)
                                   if rest else None)
    return out


def family_predictions(names: Sequence[str], gpus: Sequence[int] = (2, 4, 8)) -> dict[str, Any]:
    """Predicted seconds per image (and per step, communication per step) of every method at `gpus` GPUs on each
    cluster of FAMILY_CLUSTERS, at the nominal GPU `auto` assumes (perf_workloads.NOMINAL_FLOPS, attention at half
    of it, NOMINAL_ATTN_CALL_S per attention call), with the memory plan's peak per GPU (bf16, blocks sharded as
    they load when sharded) and the fastest mesh by the model and the fastest that fits the GPUs' memory
    (memory_plan.cheapest_fitting_mesh over every candidate mesh, unsharded and sharded; sharding's gathers added
    at the link's bandwidth)."""
    from dataclasses import replace as dc_replace

    from xdit_core.parallel.perf_workloads import (ATTN_SLOWDOWN, NOMINAL_ATTN_CALL_S, NOMINAL_FLOPS,
                                                   candidate_configs)
    from xdit_core.errors import XDiTConfigError
    from xdit_core.runtime.memory_plan import cheapest_fitting_mesh, model_memory, plan_memory

    out: dict[str, Any] = {}
    specs = family_workloads()
    for name in names:
        s = specs[name]
        arch = s["arch"]
        w = flop_workload(arch, s["size"], s["size"], 1, s["branches"], 1 / NOMINAL_FLOPS, ATTN_SLOWDOWN,
                          attn_call_s=NOMINAL_ATTN_CALL_S)
        mm = model_memory(s["config"], name=arch.name)
        if mm.hidden_size != arch.hidden:  # a config whose width the plan does not read (Z-Image's `dim`)
            mm = dc_replace(mm, hidden_size=arch.hidden)
        side = s["size"] // arch.vae_scale
        latent = [1, arch.latent_channels, side, side]
        plan_patch = getattr(mm, "patch_size", 2)
        if plan_patch != arch.patch:  # a plan that counts plan_patch^2 pieces: the same tokens and bytes
            f = plan_patch // arch.patch
            latent = [1, arch.latent_channels // f**2, side * f, side * f]
        plans: dict[ParallelConfig, Any] = {}

        def plan(c: ParallelConfig, link_bw: float) -> Any:
            key = (c, link_bw)
            if key not in plans:
                plans[key] = plan_memory(mm, "bf16", c, latent, text_tokens=arch.txt_tokens,
                                         with_negative=s["branches"] == 2, shard_on_load=True,
                                         link_bytes_per_s=link_bw)
            return plans[key]

        result: dict[str, Any] = {"model": arch.name, "size": s["size"], "tokens": w.img_tokens,
                                  "txt_tokens": arch.txt_tokens, "steps": s["steps"], "branches": s["branches"],
                                  "note": s["note"], "flops_per_s": NOMINAL_FLOPS, "clusters": {}}
        for cname, (link, gib) in FAMILY_CLUSTERS.items():
            cluster = Cluster(LINKS[link].name, LINKS[link])
            bw = LINKS[link].p2p.bandwidth
            budget = gib * GIB
            serial = predict(w, ParallelConfig(), cluster, s["steps"])
            rows = [{"gpus": 1, "method": "1 GPU", "mesh": "serial", "total": serial.total,
                     "per_step": serial.per_step, "comm": 0.0, "speedup": 1.0,
                     "peak_gib": plan(ParallelConfig(), bw).device_peak / GIB}]
            for n in sorted(set(gpus) | set(s.get("gpus", ()))):
                for method, cfg in _methods(n, arch.heads, s["branches"]).items():
                    if cfg is None:
                        continue
                    p = predict(w, cfg, cluster, s["steps"])
                    row = {"gpus": n, "method": method, "mesh": describe(cfg), "total": p.total,
                           "per_step": p.per_step, "comm": p.breakdown.get("comm"), "speedup": serial.total / p.total,
                           "peak_gib": plan(cfg, bw).device_peak / GIB, "steps": s["steps"]}
                    if cfg.world_size // cfg.pipefusion_parallel_degree > 1:  # ranks that hold the same blocks
                        sharded = plan(dc_replace(cfg, shard_weights=True), bw)
                        gathers = s["steps"] * sharded.gather_seconds_per_step
                        row.update(sharded_peak_gib=sharded.device_peak / GIB,
                                   sharded_gather_s=sharded.gather_seconds_per_step,
                                   sharded_speedup=serial.total / (p.total + gathers))
                    rows.append(row)
                cands = candidate_configs(n, arch.heads, len(w.blocks), s["branches"])
                best, t_best = best_config(w, n, cluster, s["steps"])
                rows.append({"gpus": n, "method": "model's fastest", "mesh": describe(best), "total": t_best,
                             "per_step": t_best / s["steps"], "speedup": serial.total / t_best,
                             "peak_gib": plan(best, bw).device_peak / GIB})
                every = list(cands) + [dc_replace(c, shard_weights=True) for c in cands
                                       if c.world_size // c.pipefusion_parallel_degree > 1]

                def step_s(c: ParallelConfig) -> float:
                    return predict(w, dc_replace(c, shard_weights=False), cluster, s["steps"]).per_step

                try:
                    fit, fplan = cheapest_fitting_mesh(every, lambda c: plan(c, bw), budget, step_seconds=step_s)
                    t_fit = s["steps"] * (step_s(fit) + fplan.gather_seconds_per_step)
                    mesh = describe(fit) + (" sharded" if fit.shard_weights else "")
                    rows.append({"gpus": n, "method": "fastest that fits", "mesh": mesh, "total": t_fit,
                                 "per_step": t_fit / s["steps"], "speedup": serial.total / t_fit,
                                 "peak_gib": fplan.device_peak / GIB,
                                 "gather_s": fplan.gather_seconds_per_step})
                except XDiTConfigError as e:  # the plan's refusal: no candidate fits
                    rows.append({"gpus": n, "method": "fastest that fits", "mesh": "none fits",
                                 "error": str(e).splitlines()[0]})
            result["clusters"][cname] = {"link": LINKS[link].name, "gib": gib, "rows": rows}
        out[name] = result
    return out


def _cell(x: dict[str, Any], gib: int, with_mesh: bool) -> str:
    """One cluster's cell: seconds per image (speedup); a mesh that does not fit the GPUs' memory unsharded is
    shown sharded (blocks gathered before they run, the gathers' seconds added) or as not fitting."""
    if "error" in x:
        return "none fits"
    head = f"{x['mesh']}, {x['peak_gib']:.1f} GiB: " if with_mesh else ""
    if x["peak_gib"] <= gib:
        return f"{head}{x['total']:.2f} s ({x['speedup']:.2f}x)"
    if x.get("sharded_peak_gib") is not None and x["sharded_peak_gib"] <= gib:
        return (f"no fit ({x['peak_gib']:.1f} GiB); sharded {x['sharded_peak_gib']:.1f} GiB, "
                f"+{x['sharded_gather_s']:.2f} s/step gathers: {x['total'] + x['steps'] * x['sharded_gather_s']:.2f} s "
                f"({x['sharded_speedup']:.2f}x)")
    extra = f", sharded {x['sharded_peak_gib']:.1f}" if x.get("sharded_peak_gib") is not None else ""
    mesh = f"{x['mesh']} " if with_mesh else ""
    return f"{mesh}no fit ({x['peak_gib']:.1f} GiB{extra}); {x['total']:.2f} s ({x['speedup']:.2f}x) if it fit"


def family_report(result: dict[str, Any]) -> str:
    """One table per model: a row per method and GPU count, a column per cluster."""
    from bench.common import format_table

    parts = []
    for r in result.values():
        clusters = list(r["clusters"].values())
        names = [f"{c['link']}, {c['gib']} GB GPUs: s/image (speedup)" for c in clusters]
        title = (f"PREDICTED by the performance model (not measured): {r['model']} {r['size']}x{r['size']} "
                 f"({r['tokens']} image + {r['txt_tokens']} text tokens), {r['note']}, bf16, on the nominal "
                 f"{r['flops_per_s'] / 1e12:.0f} TFLOP/s GPU `auto` assumes; peak memory per GPU from the memory plan")
        rows = []
        for xs in zip(*(c["rows"] for c in clusters)):
            x0 = xs[0]
            per_cluster = x0["method"] in ("model's fastest", "fastest that fits")
            rows.append([x0["gpus"], x0["method"],
                         "-" if per_cluster else x0["mesh"],
                         *(_cell(x, c["gib"], per_cluster) for x, c in zip(xs, clusters)),
                         "-" if per_cluster else f"{x0['peak_gib']:.1f}"])
        parts.append(format_table(title, ["GPUs", "method", "mesh", *names, "peak GiB/GPU"], rows))
    return "\n\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    names = tuple(family_workloads())
    ap = argparse.ArgumentParser(prog="python -m bench.perfmodel",
                                 description="The performance model's predictions for new families (no GPU needed).")
    ap.add_argument("--workload", nargs="+", choices=names + ("all",), default=["all"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    opts = ap.parse_args(argv)
    chosen = names if "all" in opts.workload else tuple(opts.workload)
    print(family_report(family_predictions(chosen, opts.gpus)))


if __name__ == "__main__":
    main()
