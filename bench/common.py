"""What every benchmark shares: models and requests, statistics, tables, result files."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from xdit_core.models.conditioning import random_cond
from xdit_core.models.families import ModelSpec
from xdit_core.sampling.request import SampleRequest, build_request, empty_latent

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


def make_request(
    spec: ModelSpec, size: int, steps: int, cfg: float = 1.0, seed: int = 0, text_len: Optional[int] = None,
    frames: int = 1,
) -> SampleRequest:
    """A square euler/simple request with stand-in conditioning (a negative branch when cfg != 1); for a video
    model, `frames` latent frames."""
    negative = cfg != 1.0
    pos, neg = random_cond(spec, 1, seed, with_negative=negative)
    if text_len is not None:
        for c in (pos, neg) if negative else (pos,):
            c.text = c.text[:, :text_len]
    return build_request(
        spec,
        empty_latent(spec, 1, size, size, frames),
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler="euler",
        scheduler="simple",
        denoise=1.0,
        positive=pos,
        negative=neg if negative else None,
    )


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the spread (max - min) of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "spread": max(values) - min(values),
        "n": len(values),
    }


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max|d| / max|ref| and PSNR in dB (peak = max(ref) - min(ref); inf when identical)."""
    out, ref = out.double(), ref.double()
    rel = float((out - ref).abs().max() / ref.abs().max())
    mse = float(((out - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()
    return {"max_rel": rel, "psnr_db": psnr}


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable on a terminal) under a bold title."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    lines = [
        f"**{title}**",
        "",
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf" if v < 0 else "n/a"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def write_json(name: str, data: Any) -> Path:
    """bench/results/<name>.json"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_json_default))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and o != o:
        return None
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "cores": _cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load,
        "git": commit,
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM); 0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def model_path(tmp: Path, family: str, preset: str = "medium", weight_std: float = 0.02) -> Path:
    """A random-weight model folder under `tmp`, written once (seed 0)."""
    from xdit_core.cli.tiny import write_tiny

    path = tmp / f"{family}_{preset}_{weight_std:g}"
    if not (path / "config.json").exists():
        write_tiny(family, path, seed=0, preset=preset, weight_std=weight_std, force=True)  # a folder an older bench left without config.json
    return path
