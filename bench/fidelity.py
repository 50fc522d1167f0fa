"""Fidelity and communication, from one spawned world of 4 ranks.

Fidelity: per family (medium presets, cfg 4 so CFG parallel applies) and config, the final latent against
serial: max|d| / max|ref| and PSNR. Exact methods (Ulysses, Ring, hybrids, CFG parallel, PipeFusion with
every step a warmup step) and PipeFusion with 1 and 2 warmup steps (stale K/V afterwards). Random
weights at the usual init (std 0.02) mix tokens weakly, so PipeFusion's staleness is also shown on a
Flux whose weights are 5x larger (the tests' "sharp" model).

PipeFusion on a trained model: the tiny Flux trained on coloured shapes (xdit_core/assets, made by
tools/train_tiny_flux.py), 4 classes in one batch, 8 and 20 euler steps: PipeFusion 2 with warmup 1 and 2 and
M = 2 and 4 patches against serial, beside the exact references (Ulysses 2, Ring 2, PipeFusion with every step a
warmup step), the same rows on the same architecture with random weights, and the trained model's step-to-step
similarity (what bounds PipeFusion's stale-K/V error).

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
from xdit_core.cli.demo import TRAINED_FLUX, load_shapes_classes
from xdit_core.cli.tiny import randomize
from xdit_core.models.families import model_class
from xdit_core.sampling.preview import StepPreview

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

# The trained model: its classes sampled in one batch, at its training size, cfg 1 (trained without a negative).
TRAINED_STEPS = (8, 20)
TRAINED_LABELS = (0, 5, 10, 11)  # red circle, green square, blue triangle, yellow triangle
RANDOM_CONFIGS = ("ulysses 2", "pipefusion 2, warmup 1, M 2", "pipefusion 2, warmup 1, M 4")


def trained_configs(steps: int) -> dict[str, ParallelConfig]:
    """Exact references and PipeFusion 2 with warmup 1, 2 x M 2, 4 (num_pipeline_patch)."""
    pc = ParallelConfig
    table = {
        "ulysses 2": pc(ulysses_degree=2),
        "ring 2": pc(ring_degree=2),
        f"pipefusion 2, warmup {steps}, M 2 (exact)": pc(pipefusion_parallel_degree=2, warmup_steps=steps,
                                                         num_pipeline_patch=2),
    }
    for warmup in (1, 2):
        for m in (2, 4):
            table[f"pipefusion 2, warmup {warmup}, M {m}"] = pc(pipefusion_parallel_degree=2, warmup_steps=warmup,
                                                                num_pipeline_patch=m)
    return table


def step_similarity(adapter, request) -> dict[str, float]:
    """The serial euler run's step-to-step change: of the model's input latent x and of its output v (flow:
    v = (x - denoised) / sigma), ||a_i - a_(i-1)|| / ||a_i||, mean and max over the steps."""
    preview, denoised = StepPreview(), []
    run_request(adapter, request, on_step=lambda i, n: denoised.append(preview.latest.clone()), preview=preview)
    sigmas = request.sigmas.double()
    x = sigmas[0] * request.noise.double()
    xs, vs = [], []
    for i, d in enumerate(denoised):
        v = (x - d.double()) / sigmas[i]
        xs.append(x)
        vs.append(v)
        x = x + (sigmas[i + 1] - sigmas[i]) * v  # euler
    def change(seq):
        rel = [float((b - a).norm() / b.norm()) for a, b in zip(seq, seq[1:])]
        return {"mean": sum(rel) / len(rel), "max": max(rel)}
    return {"input": change(xs), "output": change(vs)}


def run(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Serial references in this process, every case in one spawned world."""
    table = configs(opts.fid_steps)
    models = {f: (model_path(tmp, f), f) for f in FAMILIES}
    models["flux sharp"] = (model_path(tmp, "flux", weight_std=SHARP_STD), "flux")
    requests, refs, model_shapes, cases = {}, {}, {}, []
    for key, (path, _) in models.items():
        adapter = make_adapter(*load_model(path))
        requests[key] = make_request(adapter.spec, opts.fid_size, opts.fid_steps, cfg=CFG_SCALE)
        refs[key] = run_request(adapter, requests[key])
        model_shapes[key] = model_shape(adapter, requests[key])
        names = SHARP_CONFIGS if key == "flux sharp" else table
        cases += [(f"{key}/{n}", str(path), table[n], "p2p", key) for n in names]
    trained_cases, trained = _trained_cases(tmp, requests, refs)
    world = max(c[2].world_size for c in cases)
    ranks = spawn_world(
        bench_world.fidelity_world, world, {"cases": cases + trained_cases, "requests": requests}, threads=1,
        timeout_s=3600,
    )
    trained["rows"] = _trained_rows(trained_cases, ranks, refs)
    rows = []
    for name, _, config, ring_impl, key in cases:
        out = ranks[0][name]["out"]
        w = shape_workload(model_shapes[key])
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
    return {"size": opts.fid_size, "steps": opts.fid_steps, "cfg": CFG_SCALE, "rows": rows, "shapes": model_shapes,
            "trained": trained}


def run_trained(tmp: Path) -> dict[str, Any]:
    """The trained model's table alone, in a world of its own (2 ranks)."""
    requests, refs = {}, {}
    cases, trained = _trained_cases(tmp, requests, refs)
    world = max(c[2].world_size for c in cases)
    ranks = spawn_world(bench_world.fidelity_world, world, {"cases": cases, "requests": requests}, threads=1,
                        timeout_s=1800)
    trained["rows"] = _trained_rows(cases, ranks, refs)
    return trained


def _trained_rows(cases: list, ranks: list, refs: dict) -> list[dict[str, Any]]:
    return [
        {"model": key.rsplit(" ", 1)[0], "steps": int(key.rsplit(" ", 1)[1]), "config": name.split("/", 1)[1],
         "world": config.world_size, "patches": config.num_pipeline_patch,
         "effective_patches": ranks[0][name]["effective_patches"], **fidelity(ranks[0][name]["out"], refs[key])}
        for name, _, config, _, key in cases
    ]


def _trained_cases(tmp: Path, requests: dict, refs: dict) -> tuple[list, dict[str, Any]]:
    """The shipped trained model's cases (and the same architecture with random weights, std 0.02), their
    requests and serial references added to `requests` and `refs`; the trained model's step similarity."""
    import json

    classes = load_shapes_classes()
    random_dir = tmp / "flux-shapes-random"
    if not random_dir.exists():
        config = json.loads((TRAINED_FLUX / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        randomize(model_class("flux")(**config), seed=0).save_pretrained(random_dir, safe_serialization=True)
    cases, similarity = [], {}
    for key_base, path, names in (("trained", TRAINED_FLUX, None), ("random", random_dir, RANDOM_CONFIGS)):
        adapter = make_adapter(*load_model(path))
        for steps in TRAINED_STEPS:
            key = f"{key_base} {steps}"
            requests[key] = classes.request(adapter.spec, TRAINED_LABELS, steps)
            refs[key] = run_request(adapter, requests[key])
            if key_base == "trained":
                similarity[steps] = step_similarity(adapter, requests[key])
            table = trained_configs(steps)
            cases += [(f"{key}/{n}", str(path), table[n], "p2p", key) for n in (names or table)]
    log = json.loads((TRAINED_FLUX.parent / "tiny_flux_shapes_training.json").read_text())
    stages = [log] + ([log["previous"]] if log.get("previous") else [])  # a resumed run keeps the one before
    training = {"steps": sum(st["steps"] for st in stages), "stages": len(stages), "parameters": log["parameters"],
                "first_loss": stages[-1]["first_loss"], "final_loss_ema": log["final_loss_ema"],
                "batch": log["batch"]}
    return cases, {"labels": [classes.names[k] for k in TRAINED_LABELS], "size": classes.pixels,
                   "similarity": similarity, "training": training}


def report_fidelity(result: dict[str, Any]) -> str:
    """The random-weight table, then the trained model's (when the result has it)."""
    tables = [_report_random(result)]
    if "trained" in result:
        tables.append(report_trained(result["trained"]))
    return "\n\n".join(tables)


def report_trained(trained: dict[str, Any]) -> str:
    """PipeFusion's error on the trained tiny Flux (and on the same architecture with random weights)."""
    sim = trained["similarity"]
    t = trained["training"]
    notes = "; ".join(
        f"{steps} steps: step-to-step change of the input {s['input']['mean']:.3f} mean / {s['input']['max']:.3f} "
        f"max, of the output {s['output']['mean']:.3f} / {s['output']['max']:.3f}"
        for steps, s in sorted(sim.items(), key=lambda kv: int(kv[0])))
    title = (
        f"PipeFusion fidelity on a trained tiny Flux ({t['parameters']:,} parameters, {t['steps']} steps of "
        f"training in {t['stages']} runs, loss {t['first_loss']:.3f} -> {t['final_loss_ema']:.3f}): final latent vs serial, "
        f"{trained['size']}x{trained['size']}, euler, cfg 1, batch of {', '.join(trained['labels'])}"
    )
    rows = [[r["model"], r["steps"], r["config"], r["world"], r["effective_patches"] or "-", f"{r['max_rel']:.2e}",
             r["psnr_db"]] for r in trained["rows"]]
    return (format_table(title, ["weights", "steps", "config", "ranks", "patches run", "max abs diff / max abs ref",
                                 "PSNR dB"], rows)
            + f"\n\nTrained model, serial run ({notes}).")


def _report_random(result: dict[str, Any]) -> str:
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
    hs, L = shape["heads"] * shape["head_dim"], len(shape["split_costs"])
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


def main() -> None:
    """`python -m bench.fidelity`: the trained model's table only (seconds; `python -m bench fidelity` runs all)."""
    import tempfile

    import torch

    from bench.common import write_json

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trained = run_trained(Path(tmp))
    print(report_trained(trained))
    print(f"wrote {write_json('fidelity_trained', trained | {'command': 'python -m bench.fidelity'})}")


if __name__ == "__main__":
    main()
