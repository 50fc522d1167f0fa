"""`python -m xdit_core demo`: the main job on the embedded default, with no GPU and no download.

For Flux (the default) it samples the tiny Flux shipped in xdit_core/assets, trained on coloured shapes by
tools/train_tiny_flux.py, for four classes: serially in this process, then with a 4-rank hybrid mesh through the
Ray worker pool (CPU workers and gloo here, one GPU per rank where CUDA is present), twice (cold, then warm), and
with PipeFusion (2 stages, warmup 1, 2 patches) on the pool; it compares the results, prints a table and writes
the images side by side. The other families get a tiny random-weight model, whose preview shows only structure.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xdit_core import api
from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.cli.preview import latent_to_rgb, write_png
from xdit_core.cli.tiny import write_tiny

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TRAINED_FLUX = ASSETS / "tiny_flux_shapes"  # a diffusers folder (config.json + safetensors), 5 MiB
TRAINED_FLUX_CLASSES = ASSETS / "tiny_flux_shapes_classes.safetensors"
DEMO_CLASSES = ("red circle", "green square", "blue triangle", "yellow square")
DEMO_PIPEFUSION = {"pipefusion_parallel_degree": 2, "warmup_steps": 1, "num_pipeline_patch": 2}


@dataclass(frozen=True)
class ShapesClasses:
    """How to prompt and look at the trained tiny Flux: per class its text states [L, 32] and pooled vector [32],
    the fixed RGB -> latent map of its training images (model space: latent = rgb_scale * rgb_basis @ (rgb - 0.5)
    per pixel) and each class's mean training image [3, s, s]."""

    names: tuple[str, ...]
    text: torch.Tensor
    pooled: torch.Tensor
    rgb_basis: torch.Tensor  # [16, 3], orthonormal columns
    rgb_scale: float
    latent_size: int  # the training size in latent rows and columns
    class_means: torch.Tensor  # [classes, 3, s, s], RGB in 0..1

    @property
    def pixels(self) -> int:
        """The training size in ComfyUI's pixels (the latent's 8x)."""
        return 8 * self.latent_size

    def labels(self, names: Sequence[str]) -> list[int]:
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise api.XDiTConfigError(f"unknown classes {unknown}; the model knows {', '.join(self.names)}")
        return [self.names.index(n) for n in names]

    def cond(self, labels: Sequence[int]) -> api.BranchCond:
        """One positive branch holding each label's prompt (a batch of len(labels))."""
        idx = torch.as_tensor(list(labels))
        return api.BranchCond(self.text[idx].clone(), self.pooled[idx].clone())

    def request(self, spec: api.ModelSpec, labels: Sequence[int], steps: int, seed: int = 0,
                sampler: str = "euler", scheduler: str = "simple") -> api.SampleRequest:
        """KSampler's preparation (cfg 1: the model was trained without a negative) of one image per label at the
        training size, from an empty latent."""
        latent = api.empty_latent(spec, len(labels), self.pixels, self.pixels)
        return api.build_request(spec, latent, seed=seed, steps=steps, cfg=1.0, sampler=sampler,
                                 scheduler=scheduler, denoise=1.0, positive=self.cond(labels), negative=None)

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """Model-space latent [..., 16, h, w] -> RGB [..., 3, h, w] in 0..1 (the map's pseudo-inverse)."""
        rgb = torch.einsum("ck,...chw->...khw", self.rgb_basis, latent.float()) / self.rgb_scale + 0.5
        return rgb.clamp(0, 1)


def load_shapes_classes(path: str | Path = TRAINED_FLUX_CLASSES) -> ShapesClasses:
    """Read the trained tiny Flux's class file (written by tools/train_tiny_flux.py)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return ShapesClasses(tuple(json.loads(meta["classes"])), t["text"], t["pooled"], t["rgb_basis"],
                         float(meta["rgb_scale"]), int(meta["latent_size"]), t["class_means"])


def demo_mesh(cfg: float) -> dict[str, int | bool]:
    """A 4-rank hybrid: CFG parallel x Ulysses when there is a negative branch, else Ulysses x Ring."""
    if math.isclose(cfg, 1.0):
        return {"ulysses_degree": 2, "ring_degree": 2}
    return {"ulysses_degree": 2, "use_cfg_parallel": True}


def run_demo(family: str, out_dir: Path, steps: int, size: int, seed: int) -> None:
    """Serial vs pool on a tiny model (Flux: the trained one, PipeFusion too); writes latent, REPORT.json and PNGs
    into out_dir."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    classes: Optional[ShapesClasses] = None
    if family == "flux":
        model_dir, classes = TRAINED_FLUX, load_shapes_classes()
        if size != classes.pixels:
            print(f"the trained tiny Flux samples at its training size, {classes.pixels}x{classes.pixels} "
                  f"(not --size {size})")
        size = classes.pixels
        cond = out_dir / "cond.safetensors"
        branch = classes.cond(classes.labels(DEMO_CLASSES))
        save_file({"positive": branch.text, "positive_pooled": branch.pooled}, str(cond))
        print(f"the tiny Flux trained on coloured shapes ({model_dir}), prompts: {', '.join(DEMO_CLASSES)}")
        extra = dict(batch=len(DEMO_CLASSES), cond=str(cond))
    else:
        model_dir = out_dir / f"tiny-{family}"
        write_tiny(family, model_dir, seed=0, force=True)  # the demo's own folder
        print(f"made a random-weight tiny {family} model in {model_dir}")
        extra = {}
    spec = api.describe_model(str(model_dir))
    serial_opts = GenerateOptions(model=str(model_dir), height=size, width=size, steps=steps, seed=seed, threads=1,
                                  length=9 if spec.is_video else None, **extra)  # video: 3 latent frames
    serial, serial_report = generate(serial_opts)
    mesh = demo_mesh(spec.default_cfg)
    pool_opts = replace(serial_opts, backend="ray", **mesh)
    pipefusion = None
    try:
        t0 = time.perf_counter()
        cold, report = generate(pool_opts)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm, _ = generate(pool_opts)
        warm_s = time.perf_counter() - t0
        stats = api.pool_stats(api.PoolKey(str(model_dir), "fp32", None, None, pool_opts.parallel, "auto", 1))
        if classes is not None:
            t0 = time.perf_counter()
            pipefusion, pf_report = generate(replace(serial_opts, backend="ray", **DEMO_PIPEFUSION))
            pf_s = time.perf_counter() - t0
    finally:
        api.unload()
        ray.shutdown()

    cfg = serial_report["config"]
    print(f"sampled {size}x{size}, {steps} {cfg['sampler']}/{cfg['scheduler']} steps, cfg {cfg['cfg']}, seed {seed}: "
          f"serial in this process, then {pool_opts.parallel.describe()} on the Ray worker pool")
    rows = [
        ("mode", "ranks", "wall s", "mean step ms", "max|d|/max|ref|", "PSNR dB"),
        ("serial", "1", f"{serial_report['wall_s']:.2f}",
         f"{1000 * _mean(serial_report['per_rank'][0]['step_s']):.1f}", "reference", ""),
        ("pool, cold", str(report["world_size"]), f"{cold_s:.2f}",
         f"{1000 * _mean(report['per_rank'][0]['step_s']):.1f}", *_fidelity(cold, serial)),
        ("pool, warm", str(report["world_size"]), f"{warm_s:.2f}", "",
         "bit-identical" if warm.equal(cold) else "DIFFERS", ""),
    ]
    if pipefusion is not None:
        rows.append(("PipeFusion 2, warmup 1, M 2 (pool)", "2", f"{pf_s:.2f}",
                     f"{1000 * _mean(pf_report['per_rank'][0]['step_s']):.1f}", *_fidelity(pipefusion, serial)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"  pool cold start: Ray {stats.ray_start_s:.1f}s, actors {stats.actor_start_s:.1f}s, "
          f"rendezvous {stats.rendezvous_s:.1f}s, weights {stats.load_s:.2f}s")
    comm = report["per_rank"][0]["comm_bytes"]
    print("  rank 0 sent: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in comm.items() if v))
    save_file({"samples": cold.contiguous()}, str(out_dir / "latent.safetensors"))
    (out_dir / "REPORT.json").write_text(json.dumps(report, indent=2))
    if classes is None:
        png = write_png(out_dir / "preview.png", latent_to_rgb(cold[0]))
    else:
        to_model = spec.latent_format.process_in  # generate returns ComfyUI LATENTs; the map is in model space
        png = write_png(out_dir / "preview.png", _to_uint8(classes.to_rgb(to_model(cold[0]))), scale=8)
        side = write_png(out_dir / "pipefusion.png", side_by_side(
            classes, [to_model(serial), to_model(cold), to_model(pipefusion)]), scale=6)
        print(f"wrote {side}: one class per row ({', '.join(DEMO_CLASSES)}); columns: serial, "
              f"{pool_opts.parallel.describe()}, PipeFusion 2 (warmup 1, M 2), 10 x |PipeFusion - serial|")
    print(f"wrote {out_dir / 'latent.safetensors'}, {out_dir / 'REPORT.json'} and the preview {png}")


def side_by_side(classes: ShapesClasses, latents: Sequence[torch.Tensor], diff_gain: float = 10.0) -> torch.Tensor:
    """uint8 [h, w, 3]: a row per batch item; a column per model-space latent [B, 16, s, s] (the first is the
    reference), then diff_gain x |last - first| in RGB; one-pixel white gaps."""
    rgbs = [classes.to_rgb(x) for x in latents]
    rgbs.append((diff_gain * (rgbs[-1] - rgbs[0]).abs()).clamp(0, 1))
    b, _, h, w = rgbs[0].shape
    gap = 1
    grid = torch.ones(3, b * (h + gap) - gap, len(rgbs) * (w + gap) - gap)
    for i in range(b):
        for j, rgb in enumerate(rgbs):
            grid[:, i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = rgb[i]
    return _to_uint8(grid)


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)


def _fidelity(out: torch.Tensor, ref: torch.Tensor) -> tuple[str, str]:
    """(max|d| / max|ref|, PSNR in dB with the reference's range as the peak)."""
    out, ref = out.double(), ref.double()
    rel = float((out - ref).abs().max() / ref.abs().max())
    mse = float(((out - ref) ** 2).mean())
    psnr = "inf" if mse == 0 else f"{10 * math.log10(float(ref.max() - ref.min()) ** 2 / mse):.1f}"
    return f"{rel:.1e}", psnr


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
