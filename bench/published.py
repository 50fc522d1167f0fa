"""The performance model against published multi-GPU results, the predicted scaling of every method over
PCIe, NVLink and two nodes on 25 GbE, and whether xdit_core's `auto` mesh picks what the model would; the
predicted seconds per step of Wan2.1 T2V 14B at 720p on 1-8 GPUs per method.

Fitted numbers, each on one published row that is then marked as a calibration row, not a prediction:
- per table, the device's seconds per FLOP, so that the 1-GPU prediction equals the published 1-GPU time;
- on xDiT's torch.compile FLUX table, the device time of one attention kernel call beyond its FLOPs
  (`attn_call_s`: launch, LSE merge, p2p wait of a ring hop), from its Ring-2 row;
- on xDiT's eager FLUX table, how much faster the GPU machine's host dispatches than this CPU
  (`host_speed`), from its Ulysses-4 row (the most host-bound one).
Those two carry over to the other tables unchanged. Everything else comes from the architecture (FLOPs,
shapes), the link presets and, for eager PyTorch, host dispatch times measured on this machine's CPU
(diffusers' Flux blocks and one ring hop of ours at a negligible size, plus `LAUNCH_S` per ATen op).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from bench.common import format_table
from bench.perfmodel import calibrate_throughput
from xdit_core.parallel.auto_mesh import choose_mesh
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import LINKS, Cluster, Workload, predict
from xdit_core.parallel.perf_workloads import (FLUX_DEV, HUNYUAN_VIDEO, SD35_LARGE, WAN21_T2V_14B, Architecture,
                                               best_config, describe, flop_workload)
from xdit_core.runtime.topology import GpuPlace, Topology

LAUNCH_S = 5e-6  # seconds per CUDA kernel launch in eager PyTorch (assumed; not measured here)
ATTN_SLOWDOWN = 2.0  # attention kernels reach half the FLOP rate of GEMMs (assumed: FlashAttention-2 vs cuBLAS)
pc = ParallelConfig


@dataclass(frozen=True)
class PublishedTable:
    """One published set of latencies for one model, resolution and machine."""

    name: str
    source: str
    arch: Architecture
    height: int
    width: int
    steps: int
    cluster: Cluster
    entries: tuple[tuple[str, ParallelConfig, float], ...]  # (label, mesh, published seconds); first: 1 GPU
    frames: int = 1
    branches: int = 1  # evaluations per step (2: a negative branch, cfg != 1)
    note: str = ""
    fit: tuple[str, str] | None = None  # (parameter, label of the row it is fitted on)


def tables() -> list[PublishedTable]:
    """xDiT's, ParaAttention's and Wan's published numbers (seconds, as published)."""
    nvlink = LINKS["nvlink"]
    eager = Cluster("4x H100 SXM, NVLink, PyTorch eager", nvlink, host_bound=True)
    compiled = Cluster("4x H100 SXM, NVLink, torch.compile", nvlink)
    h100x8 = Cluster("8x H100, NVLink, PyTorch eager", nvlink, host_bound=True)
    l20 = Cluster("4x L20, PCIe, torch.compile", LINKS["pcie"])
    flux_entries = lambda t: tuple(
        zip(
            ("1 GPU", "Ulysses-2", "Ring-2", "Ulysses-2 x Ring-2", "Ulysses-4", "Ring-4"),
            (
                pc(),
                pc(ulysses_degree=2),
                pc(ring_degree=2),
                pc(ulysses_degree=2, ring_degree=2),
                pc(ulysses_degree=4),
                pc(ring_degree=4),
            ),
            t,
        )
    )
    xdit_flux = "xDiT docs/performance/flux.md (FLUX.1-dev, 1024px, 28 steps, 4xH100)"
    return [  # in fitting order: a table uses what the tables before it fitted
        PublishedTable(
            "xDiT FLUX.1-dev 1024px, torch.compile",
            xdit_flux,
            FLUX_DEV,
            1024,
            1024,
            28,
            compiled,
            flux_entries((4.30, 2.68, 2.60, 1.80, 1.63, 1.98)),
            fit=("attn_call_s", "Ring-2"),
        ),
        PublishedTable(
            "xDiT FLUX.1-dev 1024px, PyTorch",
            xdit_flux,
            FLUX_DEV,
            1024,
            1024,
            28,
            eager,
            flux_entries((6.71, 4.38, 5.31, 5.19, 4.24, 5.11)),
            fit=("host_speed", "Ulysses-4"),
        ),
        PublishedTable(
            "xDiT HunyuanVideo 1280x720x129, 50 steps",
            "xDiT docs/performance/hunyuanvideo.md (H100, Ulysses)",
            HUNYUAN_VIDEO,
            720,
            1280,
            50,
            h100x8,
            (
                ("1 GPU", pc(), 1904.08),
                ("Ulysses-2", pc(ulysses_degree=2), 925.04),
                ("Ulysses-4", pc(ulysses_degree=4), 514.08),
                ("Ulysses-8", pc(ulysses_degree=8), 337.58),
            ),
            frames=129,
        ),
        PublishedTable(
            "ParaAttention FLUX.1-dev 1024px on L20, context parallel part",
            "diffusers docs optimization/para_attn.md (ParaAttention, 28 steps, NVIDIA L20)",
            FLUX_DEV,
            1024,
            1024,
            28,
            l20,
            (
                ("1 GPU, FBCache + FP8 DQ + compile", pc(), 7.56),
                ("2 GPUs, + CP (ring 2)", pc(ring_degree=2), 4.92),
                ("4 GPUs, + CP (ulysses 2 x ring 2)", pc(ulysses_degree=2, ring_degree=2), 3.90),
            ),
            note="baseline 26.36 s (1 GPU, no optimisation) is published too; First Block Cache and "
            "FP8 are not our methods, so the model starts from their 1-GPU 7.56 s and predicts "
            "only the context-parallel step (ParaAttention's mesh: ring <= 2, rest Ulysses)",
        ),
        *wan_tables(),
    ]


# The Wan team's table (Wan-Video/Wan2.1 README, "Computational Efficiency on Different GPUs", an image:
# assets/comp_effic.png): total seconds of generate.py for T2V-14B at 720P (1280x720, 81 frames, 50 steps,
# guide scale 5: two evaluations per step); on N GPUs `--dit_fsdp --t5_fsdp --ulysses_size N` (the README's
# multi-GPU command), on 1 GPU `--offload_model True`. The rows say "H800/H100" and "A800/A100": the model takes
# the export parts' slower NVLink (400 GB/s); H20 has H100's NVLink 4.
WAN_SOURCE = "Wan2.1 README, Computational Efficiency (assets/comp_effic.png), T2V-14B 720P"
WAN_PUBLISHED = (
    ("H800/H100", "nvlink400", (1837.9, 945.1, 497.0, 287.9)),
    ("A800/A100", "nvlink400", (3342.6, 1722.0, 886.1, 469.9)),
    ("H20", "nvlink", (6935.5, 3488.4, 1775.8, 980.5)),
)


def wan_tables() -> list[PublishedTable]:
    meshes = (("1 GPU", pc()), *((f"Ulysses-{n}", pc(ulysses_degree=n)) for n in (2, 4, 8)))
    return [
        PublishedTable(
            f"Wan2.1 T2V-14B 1280x720x81, 50 steps, cfg 5, {gpu}",
            WAN_SOURCE,
            WAN21_T2V_14B,
            720,
            1280,
            50,
            Cluster(f"8x {gpu}, {LINKS[link].name}, PyTorch eager", LINKS[link], host_bound=True),
            tuple((label, cfg, t) for (label, cfg), t in zip(meshes, times)),
            frames=81,
            branches=2,
            note="published: the whole generate.py run, with the umT5 encoder and the VAE decode (on one GPU "
            "whatever N) and FSDP's weight all-gathers; predicted: the transformer's 50 x 2 evaluations only",
        )
        for gpu, link, times in WAN_PUBLISHED
    ]


def measure_host_dispatch(repeats: int = 200) -> dict[str, dict[str, float]]:
    """Host time of one diffusers Flux block of each kind (24 heads, tiny head size, 2 + 2 tokens: the
    arithmetic is negligible, what is left is Python and ATen dispatch) and its ATen op count."""
    import diffusers
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    from xdit_core.parallel.attention import _merge, select_lse_kernel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=24,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    hidden = 24 * 16
    img, txt, temb = torch.randn(1, 2, hidden), torch.randn(1, 2, hidden), torch.randn(1, hidden)
    rotary = model.pos_embed(torch.zeros(4, 3))
    out = {}
    q, k, v = (torch.randn(1, 24, 2, 16) for _ in range(3))
    kernel = select_lse_kernel(torch.device("cpu"))
    acc = kernel(q, k, v, None)
    calls = {
        "double": lambda: model.transformer_blocks[0](
            hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary
        ),
        "single": lambda: model.single_transformer_blocks[0](
            hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary
        ),
        "ring hop": lambda: _merge(acc, *kernel(q, k, v, None)),
    }  # one more K/V block: kernel + merge
    with torch.no_grad():
        for kind, call in calls.items():
            for _ in range(20):
                call()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            counter = Count()
            with counter:
                call()
            dispatch = statistics.median(times)
            out[kind] = {"dispatch_s": dispatch, "aten_ops": counter.ops, "host_s": dispatch + counter.ops * LAUNCH_S}
    torch.set_num_threads(threads)
    return out


def _bisect(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target, for f increasing (the nearest bound when target is out of range)."""
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


class _Fitter:
    """Builds a table's workloads from the fitted parameters and fits them in table order."""

    def __init__(self, host: dict[str, dict[str, float]]) -> None:
        self.host = host
        self.fits = {"attn_call_s": 0.0, "host_speed": 1.0}

    def maker(self, t: PublishedTable, attn_call_s: float, host_speed: float) -> Callable[[float], Workload]:
        eager = t.cluster.host_bound
        per_block = tuple(self.host[k]["host_s"] / host_speed if eager else 0.0 for k in ("double", "single"))
        hop = self.host["ring hop"]["host_s"] / host_speed if eager else 0.0
        return lambda s: flop_workload(
            t.arch, t.height, t.width, t.frames, t.branches, s, ATTN_SLOWDOWN, per_block, attn_call_s, hop
        )

    def workload(self, t: PublishedTable, attn_call_s: float, host_speed: float) -> Workload:
        """The table's workload with the seconds per FLOP fitted on its 1-GPU row."""
        make = self.maker(t, attn_call_s, host_speed)
        return make(calibrate_throughput(make, t.entries[0][2], t.cluster, t.steps))

    def fit(self, t: PublishedTable) -> Workload:
        if t.fit is not None:
            name, label = t.fit
            _, config, published = next(e for e in t.entries if e[0] == label)
            if name == "attn_call_s":  # more per-call time, slower ring: increasing
                f = lambda x: predict(self.workload(t, x, self.fits["host_speed"]), config, t.cluster, t.steps).total
                hi = t.entries[0][2] / (t.steps * len(t.arch.block_param_bytes()))
            else:  # a faster host, a lower floor: decreasing in host_speed, so bisect on its inverse
                f = lambda x: (
                    predict(self.workload(t, self.fits["attn_call_s"], 1 / x), config, t.cluster, t.steps).total
                )
                hi = 10.0
            x = _bisect(f, published, 0.0 if name == "attn_call_s" else 0.1, hi)
            self.fits[name] = x if name == "attn_call_s" else 1 / x
        return self.workload(t, self.fits["attn_call_s"], self.fits["host_speed"])


def compare(host: dict[str, dict[str, float]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per published table: the fitted parameters and, per entry, published vs predicted."""
    fitter = _Fitter(host)
    out = []
    for t in tables():
        w = fitter.fit(t)
        fitted_on = {t.entries[0][0]} | ({t.fit[1]} if t.fit else set())
        rows = []
        for label, cfg, published in t.entries:
            p = predict(w, cfg, t.cluster, t.steps)
            rows.append(
                {
                    "label": label,
                    "mesh": describe(cfg),
                    "published_s": published,
                    "predicted_s": p.total,
                    "error": p.total / published - 1,
                    "calibration": label in fitted_on,
                    "breakdown": {k: v * t.steps for k, v in p.breakdown.items()},
                }
            )
        s_per_flop = w.blocks[-1].rest_per_token / t.arch.linear_flops_per_token()
        out.append(
            {
                "name": t.name,
                "source": t.source,
                "cluster": t.cluster.name,
                "steps": t.steps,
                "s_per_flop": s_per_flop,
                "tflops_effective": 1e-12 / s_per_flop,
                "fitted": {t.fit[0]: fitter.fits[t.fit[0]]} if t.fit else {},
                "tokens": w.img_tokens + w.txt_tokens,
                "note": t.note,
                "rows": rows,
            }
        )
    return out, fitter.fits


def scaling_curves(
    s_per_flop: float, attn_call_s: float, ranks: tuple[int, ...] = (1, 2, 4, 8)
) -> list[dict[str, Any]]:
    """Predicted speedup per method for Flux.1-dev (cfg 1) and SD3.5 Large (cfg 4.5) at 1024px, 28 steps,
    on one node with PCIe, one with NVLink, and two nodes on 25 GbE (PCIe inside, half the ranks each)."""
    clusters = {
        "PCIe": lambda n: Cluster("PCIe", LINKS["pcie"]),
        "NVLink": lambda n: Cluster("NVLink", LINKS["nvlink"]),
        "2 nodes, 25 GbE": lambda n: Cluster(
            "2 nodes 25GbE", LINKS["pcie"], nodes=2 if n > 1 else 1, inter=LINKS["eth25"]
        ),
    }
    out = []
    for arch, branches, cfg_scale in ((FLUX_DEV, 1, 1.0), (SD35_LARGE, 2, 4.5)):
        w = flop_workload(arch, 1024, 1024, 1, branches, s_per_flop, ATTN_SLOWDOWN, attn_call_s=attn_call_s)
        blocks = len(w.blocks)
        for link, make_cluster in clusters.items():
            serial = predict(w, pc(), make_cluster(1), 28).total
            curves: dict[str, list[Optional[float]]] = {}
            advice = []
            for n in ranks:
                cluster = make_cluster(n)
                methods = {
                    "Ulysses": pc(ulysses_degree=n) if arch.heads % n == 0 else None,
                    "Ring": pc(ring_degree=n),
                    "PipeFusion": pc(pipefusion_parallel_degree=n),
                    "CFG x PipeFusion": pc(use_cfg_parallel=True, pipefusion_parallel_degree=n // 2)
                    if branches == 2 and n % 2 == 0
                    else None,
                    "CFG x Ulysses": pc(use_cfg_parallel=True, ulysses_degree=n // 2)
                    if branches == 2 and n % 2 == 0 and arch.heads % (n // 2) == 0
                    else None,
                }
                for name, cfg in methods.items():
                    if name.startswith("CFG") and branches == 1:
                        continue
                    curves.setdefault(name, []).append(serial / predict(w, cfg, cluster, 28).total if cfg else None)
                best, t_best = best_config(w, n, cluster, 28, blocks)
                curves.setdefault("best hybrid", []).append(serial / t_best)
                auto, why = choose_mesh(arch.family, arch.heads, n, cfg_scale, blocks, cluster=cluster, workload=w)
                t_auto = predict(w, auto, cluster, 28).total
                advice.append(
                    {
                        "ranks": n,
                        "best": describe(best),
                        "best_speedup": serial / t_best,
                        "auto": describe(auto),
                        "auto_speedup": serial / t_auto,
                        "auto_vs_best": t_auto / t_best,
                    }
                )
            out.append(
                {
                    "model": f"{arch.name} 1024px" + (", cfg 4.5" if branches == 2 else ""),
                    "link": link,
                    "ranks": list(ranks),
                    "curves": curves,
                    "advice": advice,
                }
            )
    return out


def stage_balance(s_per_flop: float, attn_call_s: float) -> list[dict[str, Any]]:
    """FLUX.1-dev 1024px PipeFusion with stages split by compute (what xdit_core does: equal block counts, as a
    double-stream block costs what a single-stream one does per token) and by parameter bytes (what it did: a
    double block holds 2.4x the bytes), on PCIe: blocks per stage, imbalance, speedup; Ulysses and Ring beside."""
    w = flop_workload(FLUX_DEV, 1024, 1024, 1, 1, s_per_flop, ATTN_SLOWDOWN, attn_call_s=attn_call_s)
    by_bytes = replace(w, split_costs=FLUX_DEV.block_param_bytes())
    cluster = Cluster("pcie", LINKS["pcie"])
    serial = predict(w, pc(), cluster, 28).total
    out = []
    for n in (2, 4, 8):
        cfg = pc(pipefusion_parallel_degree=n)
        flops, nbytes = predict(w, cfg, cluster, 28), predict(by_bytes, cfg, cluster, 28)
        out.append({"stages": n, "blocks_per_stage": [len(r) for r in w.stages(n)],
                    "imbalance": flops.breakdown["imbalance"], "stage_ms": [1e3 * t for t in flops.stage_times],
                    "period_ms": 1e3 * flops.breakdown["period"], "compute_split": serial / flops.total,
                    "byte_split": serial / nbytes.total, "bytes_blocks": [len(r) for r in by_bytes.stages(n)],
                    "ulysses": serial / predict(w, pc(ulysses_degree=n), cluster, 28).total,
                    "ring": serial / predict(w, pc(ring_degree=n), cluster, 28).total})
    return out


def fake_topology(nodes: int, per_node: int, nvlink: bool) -> Topology:
    """`per_node` GPUs on each of `nodes` nodes, all NVLink inside a node or PCIe only."""
    gpus = tuple(GpuPlace(f"node{k}", i) for k in range(nodes) for i in range(per_node))
    pairs = frozenset((a, b) for a in range(len(gpus)) for b in range(a + 1, len(gpus))
                      if nvlink and gpus[a].node == gpus[b].node)
    return Topology(gpus, pairs, "fake")


AUTO_TOPOLOGIES = {"8x PCIe": (1, 8, False), "8x NVLink (NVSwitch)": (1, 8, True),
                   "2 nodes x 4 NVLink, 25 GbE": (2, 4, True), "4x PCIe": (1, 4, False)}


def auto_choices() -> list[dict[str, Any]]:
    """What `auto` picks on the tests' fake topologies (tests/test_auto_topology.py), for FLUX.1-dev at cfg 1 and
    SD3.5 Large at cfg 4.5 (and at cfg 1 on 4x PCIe), on the nominal workload it ranks with."""
    from xdit_core.parallel.perf_workloads import nominal_workload

    out = []
    for name, shape in AUTO_TOPOLOGIES.items():
        t = fake_topology(*shape)
        cases = [(FLUX_DEV, 1.0), (SD35_LARGE, 4.5)] + ([(SD35_LARGE, 1.0)] if name == "4x PCIe" else [])
        for arch, cfg in cases:
            chosen, why = choose_mesh(arch.family, arch.heads, len(t.gpus), cfg, arch.blocks, cluster=t.cluster(),
                                      workload=nominal_workload(arch, 1))
            out.append({"topology": name, "model": arch.name, "cfg": cfg, "mesh": describe(chosen), "why": why})
    return out


WAN_METHODS = ("Ulysses", "Ring", "Ulysses x Ring", "CFG x Ulysses", "auto")


def wan_scaling(s_per_flop: float, attn_call_s: float, ranks: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, Any]]:
    """Wan2.1 T2V 14B at 1280x720x81 (75,600 video tokens; 512 text tokens by cross-attention, replicated), cfg 5
    (two evaluations per step): predicted seconds per step per method on one node with PCIe and one with NVLink,
    and the mesh xdit_core's `auto` picks (PipeFusion is left out: the engine refuses it for video)."""
    w = flop_workload(WAN21_T2V_14B, 720, 1280, 81, 2, s_per_flop, ATTN_SLOWDOWN, attn_call_s=attn_call_s)
    out = []
    for link in ("pcie", "nvlink"):
        cluster = Cluster(LINKS[link].name, LINKS[link])
        serial = predict(w, pc(), cluster, 1)
        for n in ranks:
            half = n // 2
            methods = {
                "Ulysses": pc(ulysses_degree=n),
                "Ring": pc(ring_degree=n),
                "Ulysses x Ring": pc(ulysses_degree=half, ring_degree=2) if n >= 4 else None,
                "CFG x Ulysses": pc(use_cfg_parallel=True, ulysses_degree=half) if n >= 2 else None,
                "auto": choose_mesh(WAN21_T2V_14B.family, WAN21_T2V_14B.heads, n, 5.0, len(w.blocks), cluster=cluster,
                                    workload=w)[0],
            }
            cells = {}
            for name, cfg in methods.items():
                if cfg is None or (n == 1 and name != "Ulysses"):
                    continue
                p = predict(w, cfg, cluster, 1)
                cells[name] = {"mesh": describe(cfg), "per_step": p.per_step, "comm": p.breakdown["comm"],
                               "speedup": serial.per_step / p.per_step}
            out.append({"link": LINKS[link].name, "ranks": n, "methods": cells})
    return out


def run() -> dict[str, Any]:
    host = measure_host_dispatch()
    comparison, fits = compare(host)
    compiled = next(c for c in comparison if c["name"].endswith("torch.compile"))
    s = compiled["s_per_flop"]
    wan = next(c for c in comparison if c["name"].startswith("Wan2.1") and WAN_PUBLISHED[0][0] in c["name"])
    return {
        "host": host,
        "launch_s": LAUNCH_S,
        "attn_slowdown": ATTN_SLOWDOWN,
        "comparison": comparison,
        "fits": fits,
        "scaling": scaling_curves(s, fits["attn_call_s"]),
        "stage_balance": stage_balance(s, fits["attn_call_s"]),
        "auto": auto_choices(),
        "wan": {"fitted_on": wan["name"], "tflops_effective": wan["tflops_effective"],
                "rows": wan_scaling(wan["s_per_flop"], fits["attn_call_s"])},
        "links": {
            k: {"bandwidth": v.p2p.bandwidth, "latency": v.p2p.latency, "overlap": v.overlap} for k, v in LINKS.items()
        },
    }


_FIT_TEXT = {
    "attn_call_s": lambda v: f"{v * 1e6:.0f} us per attention call",
    "host_speed": lambda v: f"host dispatch {v:.2f}x this CPU's",
}


def report(result: dict[str, Any]) -> str:
    parts = []
    for c in result["comparison"]:
        errors = [abs(r["error"]) for r in c["rows"] if not r["calibration"]]
        fitted = "".join(f", {_FIT_TEXT[k](v)}" for k, v in c["fitted"].items())
        title = (
            f"Model vs published: {c['name']} ({c['cluster']}; source: {c['source']}); fitted: "
            f"{c['tflops_effective']:.0f} TFLOP/s{fitted}; mean |error| of the predictions "
            f"{100 * sum(errors) / len(errors):.0f}%"
        )
        rows = [
            [
                r["label"] + (" (calibration)" if r["calibration"] else ""),
                r["mesh"],
                r["published_s"],
                r["predicted_s"],
                "-" if r["calibration"] else f"{100 * r['error']:+.0f}%",
                f"{r['breakdown'].get('compute', 0):.2f} / {r['breakdown'].get('comm', 0):.2f} / "
                f"{r['breakdown'].get('host', 0):.2f}",
            ]
            for r in c["rows"]
        ]
        table = format_table(
            title,
            ["config", "mesh", "published s (reference)", "predicted s", "error", "compute / comm / host s"],
            rows,
        )
        parts.append(table + (f"\n\n{c['note']}" if c["note"] else ""))
    host = result["host"]
    parts.append(
        format_table(
            f"Host dispatch (eager) on this CPU: diffusers Flux blocks and one ring hop of ours (LSE attention + "
            f"merge) at a negligible size, + {result['launch_s'] * 1e6:.0f} us per ATen op for the CUDA launch",
            ["block", "dispatch ms", "ATen ops", "host ms per block"],
            [[k, v["dispatch_s"] * 1e3, v["aten_ops"], v["host_s"] * 1e3] for k, v in host.items()],
        )
    )
    rows = []
    for s in result["scaling"]:
        for a in s["advice"]:
            if a["ranks"] == 1:
                continue
            rows.append(
                [
                    s["model"],
                    s["link"],
                    a["ranks"],
                    a["best"],
                    f"{a['best_speedup']:.2f}x",
                    a["auto"],
                    f"{a['auto_speedup']:.2f}x",
                    "yes" if a["auto_vs_best"] < 1.05 else f"no ({a['auto_vs_best']:.2f}x slower)",
                ]
            )
    parts.append(
        format_table(
            "Advice: the model's fastest mesh vs xdit_core's auto mesh (28 steps, compiled-stack throughput)",
            ["model", "link", "GPUs", "model's best", "speedup", "auto mesh", "speedup", "auto within 5%"],
            rows,
        )
    )
    parts.append(
        format_table(
            "Predicted: FLUX.1-dev 1024px, 28 steps, 1 image, PCIe 4.0 x16 (compiled-H100 throughput of the first "
            "table), PipeFusion (M = stages, warmup 1) with stages split by compute (xdit_core) and by parameter "
            "bytes (before), Ulysses and Ring beside: speedup over 1 GPU",
            ["GPUs", "blocks per stage (compute)", "stage imbalance", "stage ms per step", "PipeFusion",
             "blocks per stage (bytes)", "PipeFusion by bytes", "Ulysses", "Ring"],
            [[b["stages"], ", ".join(map(str, b["blocks_per_stage"])), f"{b['imbalance']:.2f}",
              ", ".join(f"{t:.0f}" for t in b["stage_ms"]), f"{b['compute_split']:.2f}x",
              ", ".join(map(str, b["bytes_blocks"])), f"{b['byte_split']:.2f}x", f"{b['ulysses']:.2f}x",
              f"{b['ring']:.2f}x"] for b in result["stage_balance"]],
        )
    )
    parts.append(
        format_table(
            "How auto chooses: the fake topologies of tests/test_auto_topology.py, the nominal workload (1024px, "
            "28 steps, 400 TFLOP/s)",
            ["topology", "model", "cfg", "auto", "why"],
            [[a["topology"], a["model"], a["cfg"], a["mesh"], a["why"]] for a in result["auto"]],
        )
    )
    wan = result["wan"]

    def cell(m: Optional[dict[str, Any]]) -> str:
        return "-" if m is None else f"{m['per_step']:.2f} s ({m['speedup']:.2f}x; {m['comm']:.2f} s comm)"

    parts.append(
        format_table(
            "Predicted: Wan2.1 T2V 14B, 1280x720x81 (75,600 video tokens; 512 text tokens by cross-attention, "
            f"replicated), cfg 5: seconds per step (2 evaluations), speedup and communication, at the "
            f"{wan['tflops_effective']:.0f} TFLOP/s fitted on the 1-GPU row of {wan['fitted_on']}",
            ["link", "GPUs", *WAN_METHODS[:-1], "auto mesh", "auto"],
            [
                [r["link"], r["ranks"], *(cell(r["methods"].get(m)) for m in WAN_METHODS[:-1]),
                 r["methods"]["auto"]["mesh"] if "auto" in r["methods"] else "serial",
                 cell(r["methods"].get("auto"))]
                for r in wan["rows"]
            ],
        )
    )
    return "\n\n".join(parts)
