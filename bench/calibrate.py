"""Turn the calibration samples of a CPU run into the performance model's inputs: per-block costs fitted
by least squares, the gloo link's latency and bandwidth per transfer kind, and the workload of the
measured model; plus their JSON form (the test fixture stores them)."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Sequence

import numpy as np

from xdit_core.parallel.perf_model import BlockCost, Link, LinkCost, Workload

# Bytes on the wire per tensor byte for a 2-rank group (the calibration measures ranks 0 and 1).
_WIRE_2 = {"p2p": 1.0, "all_to_all": 0.5, "all_gather": 1.0}


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs; a negative coefficient is set to 0 and the other refitted."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(set(xs)) < 2:
        return float(np.median(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:
        return 0.0, float(max(0.0, (x @ y) / (x @ x)))
    if slope < 0:
        return float(np.mean(y)), 0.0
    return float(intercept), float(slope)


def block_costs(blocks: dict[str, Any]) -> tuple[BlockCost, ...]:
    """One BlockCost per block: rest ~ tokens and attention ~ queries x keys, fitted per block class (blocks
    of one class are the same computation, so their samples pool)."""
    kinds = blocks["kinds"]
    fits = {}
    for kind in set(kinds):
        mine = {i for i, k in enumerate(kinds) if k == kind}
        rest = [(n, t) for i, n, t in blocks["rest"] if i in mine]
        attn = [(q * k, t) for i, q, k, t in blocks["attention"] if i in mine]
        a, b = fit_line(*zip(*rest))
        c, d = fit_line(*zip(*attn)) if attn else (0.0, 0.0)
        fits[kind] = BlockCost(a, b, c, d)
    return tuple(fits[k] for k in kinds)


def link_from_samples(samples: dict[str, Any], name: str = "gloo, loopback") -> Link:
    """Latency and bandwidth per transfer kind from (tensor bytes, seconds) between two ranks: the latency
    is the time of the smallest transfer, the bandwidth the least-squares slope of the rest above it."""
    costs = {}
    for kind, wire in _WIRE_2.items():
        points = sorted(samples[kind])
        latency = points[0][1]
        xs = np.array([b * wire for b, _ in points[1:]])
        ys = np.array([max(0.0, t - latency) for _, t in points[1:]])
        per_byte = float(xs @ ys / (xs @ xs))
        costs[kind] = LinkCost(latency, 1.0 / per_byte if per_byte > 0 else float("inf"))
    return Link(name, costs["p2p"], costs["all_to_all"], costs["all_gather"], float(samples["overlap"]))


def cpu_workload(name: str, shape: dict[str, Any], blocks: dict[str, Any]) -> Workload:
    """The measured model at the measured request: `shape` from `model_shape`, costs from `time_blocks`."""
    embed = fit_line(*zip(*blocks["embed"]))
    head = fit_line(*zip(*blocks["head"]))
    # The sampler's own work per step: a whole step minus its evaluation, at the nearest calibrated size.
    nearest = min(blocks["step"], key=lambda s: abs(s[0] - shape["img_tokens"]))
    step_fixed = max(0.0, nearest[1] - nearest[2])
    return replace(shape_workload(shape), name=name, blocks=block_costs(blocks), embed=embed, head=head,
                   step_fixed=step_fixed, sp_overhead=fit_line(*zip(*blocks["sp_overhead"])))


def model_shape(adapter: Any, request: Any) -> dict[str, Any]:
    """What the model needs to know of a loaded model and a request (JSON-ready)."""
    from xdit_core.parallel.stages import block_flops

    model = adapter.model
    latent = tuple(request.noise.shape)
    if len(latent) == 5:  # video [B, C, frames, h, w]: frames stacked as rows, as the model's latent is 4-D
        latent = (latent[0], latent[1], latent[2] * latent[3], latent[4])
    return {
        "family": adapter.spec.family,
        "heads": adapter.spec.num_heads,
        "head_dim": int(model.config.attention_head_dim),
        "img_tokens": latent[2] // 2 * latent[3] // 2,
        "txt_tokens": int(request.positive.text.shape[1]),
        "joint_text": bool(adapter.TEXT_IS_JOINT),
        "cross_text": not adapter.TEXT_IS_JOINT,
        "text_every_unit": bool(adapter.TEXT_EVERY_UNIT),
        "latent": list(latent),
        "branches": 1 if request.negative is None else 2,
        "act_bytes": next(model.parameters()).element_size(),
        "split_costs": block_flops(model.config, adapter.spec),  # the engine's PipeFusion split weights
    }


def shape_workload(shape: dict[str, Any]) -> Workload:
    """A workload with only the shapes of `model_shape` (zero costs): enough for `message_bytes`."""
    blocks = tuple(BlockCost(0.0, 0.0, 0.0, 0.0) for _ in shape["split_costs"])
    return Workload(
        "shapes",
        blocks,
        tuple(shape["split_costs"]),
        shape["heads"],
        shape["head_dim"],
        shape["img_tokens"],
        shape["txt_tokens"],
        shape["joint_text"],
        tuple(shape["latent"]),
        branches=shape["branches"],
        act_bytes=shape["act_bytes"],
        cross_text=shape["cross_text"],
        text_every_unit=shape.get("text_every_unit", False),
    )


def workload_to_json(w: Workload) -> dict[str, Any]:
    return asdict(w)


def workload_from_json(d: dict[str, Any]) -> Workload:
    """Inverse of `workload_to_json`."""
    d = dict(d)
    d["blocks"] = tuple(BlockCost(**b) for b in d["blocks"])
    for key in ("split_costs", "latent", "embed", "head", "sp_overhead"):
        d[key] = tuple(d[key])
    return Workload(**d)


def link_to_json(link: Link) -> dict[str, Any]:
    return asdict(link)


def link_from_json(d: dict[str, Any]) -> Link:
    """Inverse of `link_to_json`."""
    return Link(d["name"], *(LinkCost(**d[k]) for k in ("p2p", "all_to_all", "all_gather")), d["overlap"])


def spread_ok(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two measured configs differ by more than their spread: their [min, max] ranges are disjoint."""
    return a["max"] < b["min"] or b["max"] < a["min"]
