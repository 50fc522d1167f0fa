"""What one GPU can measure: `python -m bench.gpu [--steps N] [--repeats R] [--sizes 512 768 1024]`.

On a CUDA machine, with a FLUX.1-dev-sized random-weight transformer (19 + 38 blocks, 24 x 128 heads,
512 text tokens) in bf16:
1. our engine at degree 1 vs a plain diffusers loop at 1024x1024 (ratio, interleaved repeats);
2. attention kernels on Flux's 1024px shapes: PyTorch SDPA, our LSE kernels (SDPA's efficient attention,
   flash-attn when installed);
3. per-block times (attention kernels apart) at several resolutions, fitted as the performance model's
   BlockCosts, and the model's predictions of xDiT's published 4xH100 table from them (NVLink preset).
Writes bench/results/gpu.json. On a machine without a CUDA GPU it says so and exits with status 0.
`--device cpu --small` runs the same code on a 1 + 2 block model (a smoke test; its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import RESULTS, format_table, median_spread

FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SMALL_CONFIG = {**FLUX_DEV_CONFIG, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                "num_attention_heads": 4, "joint_attention_dim": 64, "pooled_projection_dim": 32,
                "axes_dims_rope": (4, 6, 6)}
TEXT_TOKENS = 512


def random_flux(device: torch.device, config: dict[str, Any]) -> torch.nn.Module:
    """FluxTransformer2DModel with `config`, bf16, weights ~ N(0, 0.02) drawn on the device."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**config)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.pos_embed.to(device)  # rotary tables are computed, not parameters
    return model


def flux_request(spec: Any, size: int, steps: int) -> Any:
    from xdit_core.models.base import BranchCond
    from xdit_core.sampling.request import build_request, empty_latent

    gen = torch.Generator().manual_seed(1)
    cond = BranchCond(torch.randn(1, TEXT_TOKENS, spec.text_dim, generator=gen),
                      torch.randn(1, spec.pooled_dim, generator=gen))
    return build_request(
        spec,
        empty_latent(spec, 1, size, size),
        seed=0,
        steps=steps,
        cfg=1.0,
        sampler="euler",
        scheduler="simple",
        denoise=1.0,
        positive=cond,
        negative=None,
    )


def _timed(fn: Any) -> float:
    import time

    from bench.bench_world import _sync

    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def engine_vs_diffusers(model: torch.nn.Module, adapter: Any, size: int, steps: int, repeats: int) -> dict[str, Any]:
    from bench.overheads import plain_flux_loop
    from xdit_core.runtime.job import run_request

    request = flux_request(adapter.spec, size, steps)
    ours, plain = run_request(adapter, request), plain_flux_loop(model, request)
    ours_t, plain_t = [], []
    for rep in range(repeats):
        pair = [(ours_t, lambda: run_request(adapter, request)), (plain_t, lambda: plain_flux_loop(model, request))]
        for store, fn in pair if rep % 2 == 0 else pair[::-1]:
            store.append(_timed(fn))
    return {
        "size": size,
        "steps": steps,
        "engine": median_spread(ours_t),
        "diffusers": median_spread(plain_t),
        "ratio": median_spread(ours_t)["median"] / median_spread(plain_t)["median"],
        "max_rel_diff": float((ours.cpu() - plain.cpu()).abs().max() / plain.abs().max()),
    }


def attention_kernels(device: torch.device, shape: tuple[int, ...], repeats: int) -> dict[str, Optional[float]]:
    """Milliseconds per call on q, k, v of `shape` in bf16 (Flux at 1024px: [1, 24, 4096 + 512, 128])."""
    import torch.nn.functional as F

    from xdit_core.parallel.attention import _flash_attn_available, select_lse_kernel

    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    kernels = {
        "torch SDPA (no LSE)": lambda: F.scaled_dot_product_attention(q, k, v),
        "ours: sdpa (+ LSE)": lambda: select_lse_kernel(device, "sdpa", q.dtype)(q, k, v, None),
    }
    if device.type == "cuda" and _flash_attn_available():
        kernels["ours: flash-attn (+ LSE)"] = lambda: select_lse_kernel(device, "flash", q.dtype)(q, k, v, None)
    out: dict[str, Optional[float]] = {}
    for name, fn in kernels.items():
        fn()
        out[name] = 1e3 * median_spread([_timed(fn) for _ in range(repeats)])["median"]
    if "ours: flash-attn (+ LSE)" not in kernels:
        out["ours: flash-attn (+ LSE)"] = None
    return out


def block_costs(adapter: Any, sizes: list[int], repeats: int) -> dict[str, Any]:
    """Per-block samples at `sizes` (as the CPU calibration takes them) and the fitted BlockCosts."""
    from bench.bench_world import time_blocks
    from bench.calibrate import block_costs as fit

    samples = time_blocks(adapter, {s: flux_request(adapter.spec, s, 2) for s in sizes}, repeats)
    costs = fit(samples)
    return {"samples": samples, "double": costs[0].__dict__, "single": costs[-1].__dict__}


def predict_xdit(costs: dict[str, Any]) -> list[list[Any]]:
    """xDiT's 4xH100 FLUX.1-dev table predicted from the measured block costs (transformer only)."""
    from bench.perfmodel import FLUX_DEV, LINKS, BlockCost, Cluster, flop_workload, predict
    from bench.published import tables

    w = flop_workload(FLUX_DEV, 1024, 1024)
    double, single = BlockCost(**costs["double"]), BlockCost(**costs["single"])
    w = w.__class__(**{**w.__dict__, "blocks": (double,) * FLUX_DEV.double_blocks + (single,) * FLUX_DEV.single_blocks})
    cluster = Cluster("NVLink", LINKS["nvlink"])
    table = next(t for t in tables() if t.name.endswith("PyTorch"))
    return [[label, published, predict(w, cfg, cluster, table.steps).total] for label, cfg, published in table.entries]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="euler steps of the engine-vs-diffusers runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024, help="resolution of the engine-vs-diffusers runs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024], help="resolutions of the block timings")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small: a smoke test)")
    ap.add_argument("--small", action="store_true", help="a 1 + 2 block model instead of FLUX.1-dev's size")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="where the results go (JSON)")
    opts = ap.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was measured. "
            "Run `python -m bench.gpu` on a machine with an NVIDIA GPU (80 GB for the FLUX.1-dev-sized model)."
        )
        return 0
    from xdit_core.models.families import resolve_model_spec
    from xdit_core.models import make_adapter

    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = SMALL_CONFIG if opts.small else FLUX_DEV_CONFIG
    model = random_flux(device, config)
    adapter = make_adapter(model, resolve_model_spec({"_class_name": "FluxTransformer2DModel", **config}))
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    attn_shape = (1, heads, (opts.size // 16) ** 2 + TEXT_TOKENS, head_dim)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "small" if opts.small else "FLUX.1-dev size",
        "torch": torch.__version__,
        "engine_vs_diffusers": engine_vs_diffusers(model, adapter, opts.size, opts.steps, opts.repeats),
        "attention_ms": attention_kernels(device, attn_shape, opts.repeats * 5),
        "blocks": block_costs(adapter, opts.sizes, opts.repeats),
    }
    if not opts.small:
        result["xdit_prediction"] = predict_xdit(result["blocks"])
    e = result["engine_vs_diffusers"]
    print(
        format_table(
            f"{result['device']}: engine at degree 1 vs plain diffusers, {result['model']} bf16, {e['size']}px, "
            f"{e['steps']} steps (results differ by {e['max_rel_diff']:.1e})",
            ["loop", "median s", "ratio"],
            [
                ["xdit_core run_request", e["engine"]["median"], e["ratio"]],
                ["diffusers forward + euler", e["diffusers"]["median"], 1.0],
            ],
        )
    )
    print()
    print(
        format_table(
            f"Attention on {list(attn_shape)} bf16",
            ["kernel", "ms per call"],
            [[k, "not installed" if v is None else v] for k, v in result["attention_ms"].items()],
        )
    )
    if "xdit_prediction" in result:
        print()
        print(
            format_table(
                "xDiT 4xH100 FLUX.1-dev (PyTorch) predicted from these block times (transformer only, no host floor)",
                ["config", "published s", "predicted s"],
                result["xdit_prediction"],
            )
        )
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
