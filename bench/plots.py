"""PNG plots of the benchmark results (matplotlib, Agg); each function writes one file and returns its path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def cpu_scaling(result: dict[str, Any], out: Path) -> Path:
    """Measured speedup (bar, min-max whiskers) and the model's prediction (marker) per config."""
    rows = result["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(names))
    speed = [rows[n]["speedup"] for n in names]
    lo = [rows[n]["speedup"] - rows[n]["speedup_range"][0] for n in names]
    hi = [rows[n]["speedup_range"][1] - rows[n]["speedup"] for n in names]
    ax.bar(x, speed, yerr=[lo, hi], capsize=3, color="#8fb4d9", label="measured (median, min-max)")
    ax.plot(x, [rows[n]["predicted_speedup"] for n in names], "o", color="#c0392b", label="model")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs serial")
    ax.set_title(f"CPU, Flux medium {result['size']}px, 1 thread per rank", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out / "perf_cpu_scaling.png")


def communication(result: dict[str, Any], out: Path, family: str = "flux") -> Path:
    """Measured bytes per step (busiest rank) per config, log scale."""
    rows = [r for r in result["rows"] if r["model"] == family]
    names = [r["config"] for r in rows]
    sent = [max(sum(rk["bytes"].values()) for rk in r["ranks"]) / result["steps"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(range(len(names)), [max(s, 1e-3) for s in sent], color="#8fb4d9")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per step (busiest rank)")
    ax.set_title(f"{family} medium {result['size']}px, fp32, cfg {result['cfg']:g}", fontsize=10)
    ax.invert_yaxis()
    return _save(fig, out / "perf_communication.png")


def fidelity(result: dict[str, Any], out: Path) -> Path:
    """max|d|/max|ref| per config, one series per model, log scale (exact methods sit at float32 round-off)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in result["rows"])):
        pts = [(configs.index(r["config"]), max(r["max_rel"], 1e-9)) for r in result["rows"] if r["model"] == model]
        ax.plot([p[1] for p in pts], [p[0] + 0.15 * (i - 1.5) for p in pts], "o", label=model, ms=5)
    ax.set_yticks(range(len(configs)), configs, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("max|parallel - serial| / max|serial|")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    return _save(fig, out / "perf_fidelity.png")


def memory(result: dict[str, Any], out: Path) -> Path:
    """Parameter MiB held and peak RSS MiB per config (the largest rank)."""
    names = list(result["rows"])
    params = [max(m["param_bytes"] for m in result["rows"][n]["ranks"]) / 2**20 for n in names]
    peak = [max(m["hwm_kb"] for m in result["rows"][n]["ranks"]) / 1024 for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], params, 0.4, label="parameters held", color="#8fb4d9")
    ax.bar([i + 0.2 for i in x], peak, 0.4, label="peak RSS", color="#e3a86b")
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MiB per rank (largest)")
    ax.legend(fontsize=8)
    return _save(fig, out / "perf_memory.png")


def published(result: dict[str, Any], out: Path) -> Path:
    """Predicted vs published seconds, log-log, one colour per table (calibration points hollow)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    values = []
    for c in result["comparison"]:
        pts = [(r["published_s"], r["predicted_s"], r["calibration"]) for r in c["rows"]]
        (line,) = ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o", label=c["name"], ms=5)
        ax.plot([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "o", mfc="none", color=line.get_color())
        values += [v for p in pts for v in p[:2]]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published s")
    ax.set_ylabel("predicted s")
    ax.legend(fontsize=7)
    return _save(fig, out / "perf_model_vs_published.png")


def scaling(result: dict[str, Any], out: Path) -> Path:
    """Predicted speedup vs GPUs per method: a row per model, a column per interconnect."""
    curves = result["scaling"]
    links = list(dict.fromkeys(c["link"] for c in curves))
    models = list(dict.fromkeys(c["model"] for c in curves))
    fig, axes = plt.subplots(len(models), len(links), figsize=(10, 6), sharey=True)
    for c in curves:
        ax = axes[models.index(c["model"])][links.index(c["link"])]
        for name, ys in c["curves"].items():
            pts = [(n, y) for n, y in zip(c["ranks"], ys) if y is not None and not math.isnan(y)]
            style = "k--" if name == "best hybrid" else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=3)
        ax.plot(c["ranks"], c["ranks"], color="grey", lw=0.6)
        ax.set_title(f"{c['model']}\n{c['link']}", fontsize=8)
        ax.set_xticks(c["ranks"])
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("GPUs", fontsize=8)
    for row in axes:
        row[0].set_ylabel("predicted speedup", fontsize=8)
        row[0].legend(fontsize=6)
    return _save(fig, out / "perf_model_scaling.png")
