"""Train the tiny Flux transformer shipped in xdit_core/assets/tiny_flux_shapes on synthetic coloured shapes.

    PYTHONPATH=. python tools/train_tiny_flux.py [--minutes 12]      # trains, writes the model and class file
    PYTHONPATH=. python tools/train_tiny_flux.py --classes-only       # rewrites the class file only

CPU only, one thread, time-boxed; never run by the test suite. The data set is one shape (circle, square,
triangle) of one colour (red, green, blue, yellow) on a dark background per image, at a random position and
size; its class (shape, colour) is the "prompt": fixed text states [4, 32] and a pooled vector [32] per class.
Images live directly in the model's latent space: each pixel's RGB goes through a fixed linear map to the 16
latent channels, whose pseudo-inverse shows a sampled latent as RGB without a VAE.

The objective is rectified flow as our engine samples Flux schnell (ComfyUI's ModelSamplingDiscreteFlow, shift
1, CONST prediction): x_sigma = (1 - sigma) x0 + sigma noise; the model at timestep sigma predicts noise - x0,
and the sampler's denoised = x - sigma * output. The forward is the engine's own FluxAdapter.predict, so
training and sampling run the same code.

Writes (all deterministic but the weights, which depend on how many steps the time box allows):
- xdit_core/assets/tiny_flux_shapes/: config.json + diffusion_pytorch_model safetensors shards (fp32, EMA weights;
  shards under 3 MB, the repository's limit per file being 5 MB)
- xdit_core/assets/tiny_flux_shapes_classes.safetensors: per class the text states and pooled vector, the RGB
  -> latent map and each class's mean training image (metadata: class names, scale, training size), which the
  demo, the fidelity bench and the tests read (xdit_core.cli.demo.load_shapes_classes)
- xdit_core/assets/tiny_flux_shapes_training.json: the loss curve and settings

The shipped weights come from two runs of 12 CPU minutes each (the log keeps both):
    PYTHONPATH=. python tools/train_tiny_flux.py --minutes 12 --radius-min 0.22
    PYTHONPATH=. python tools/train_tiny_flux.py --minutes 12 --resume xdit_core/assets/tiny_flux_shapes --seed 1
(the first timed in wall time on a lightly loaded machine; shapes enlarged for the second, which made them
clearer). One run from scratch learns the colours and the triangles, but leaves circles and squares blobby.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from xdit_core.cli.tiny import tiny_config
from xdit_core.models import BranchCond, make_adapter
from xdit_core.models.families import model_class, resolve_model_spec

ASSETS = Path(__file__).resolve().parent.parent / "xdit_core" / "assets"
MODEL_DIR = ASSETS / "tiny_flux_shapes"
CLASSES_FILE = ASSETS / "tiny_flux_shapes_classes.safetensors"
TRAINING_LOG = ASSETS / "tiny_flux_shapes_training.json"
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.90, 0.15, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.10)}
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # "red circle", "green circle", ...
BACKGROUND = 0.12
LATENT_SIZE = 16  # latent rows and columns the model is trained at: 128 x 128 pixels in ComfyUI's units
PIXELS = 8 * LATENT_SIZE
TEXT_TOKENS = 4
TEXT_DIM = 32
POOLED_DIM = 32
LATENT_CHANNELS = 16
RGB_SCALE = 3.0  # latent = RGB_SCALE * A (rgb - 0.5): data of roughly unit scale beside unit noise
_SEED = 20240611


def _rgb_basis() -> torch.Tensor:
    """A [16, 3] matrix with orthonormal columns, fixed: the RGB -> latent channels map."""
    q, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, 3, generator=torch.Generator().manual_seed(_SEED)))
    return q


def rgb_to_latent(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3, h, w] in 0..1 -> [..., 16, h, w] model-space latent."""
    return RGB_SCALE * torch.einsum("ck,...khw->...chw", _rgb_basis(), rgb - 0.5)


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[..., 16, h, w] model-space latent -> [..., 3, h, w] in 0..1 (the pseudo-inverse of rgb_to_latent)."""
    return (torch.einsum("ck,...chw->...khw", _rgb_basis(), latent) / RGB_SCALE + 0.5).clamp(0, 1)


def _mask(shape: str, size: int, cx: float, cy: float, r: float, supersample: int = 4) -> torch.Tensor:
    """Coverage in 0..1 of a shape centred at (cx, cy) with "radius" r, in pixels of a size x size image."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    y, x = coords[:, None].expand(n, n), coords[None, :].expand(n, n)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        half = r * 0.85
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # an upward equilateral triangle inscribed in the circle of radius r * 1.15
        rr = r * 1.15
        top, base = cy - rr, cy + rr / 2
        half_w = (y - top) / (base - top) * rr * math.sqrt(3) / 2
        inside = (y >= top) & (y <= base) & (dx.abs() <= half_w)
    return inside.float().view(size, supersample, size, supersample).mean(dim=(1, 3))


def render(label: int, gen: torch.Generator, size: int = LATENT_SIZE, radius_min: float = 0.27) -> torch.Tensor:
    """One image [3, size, size] in 0..1 of class `label`: position, size and a slight colour jitter drawn
    from `gen`."""
    colour_name = CLASSES[label].split()[0]
    shape = SHAPES[label // len(COLOURS)]
    u = torch.rand(5, generator=gen)
    r = size * (radius_min + 0.12 * float(u[0]))
    cx = size / 2 + (float(u[1]) - 0.5) * size * 0.25
    cy = size / 2 + (float(u[2]) - 0.5) * size * 0.25
    colour = torch.tensor(COLOURS[colour_name]) * (0.92 + 0.08 * float(u[3]))
    cover = _mask(shape, size, cx, cy, r)
    bg = BACKGROUND * (0.8 + 0.4 * float(u[4]))
    return (bg * (1 - cover) + colour[:, None, None] * cover).clamp(0, 1)


def dataset(n: int, seed: int = 0, size: int = LATENT_SIZE, labels: Optional[torch.Tensor] = None,
            radius_min: float = 0.27) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (latents [n, 16, size, size]) and their labels, deterministic for `seed`; labels cycle
    through the classes unless given."""
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.arange(n) % len(CLASSES)
    rgb = torch.stack([render(int(k), gen, size, radius_min) for k in labels])
    return rgb_to_latent(rgb), labels


def class_means(per_class: int = 64, seed: int = 1, size: int = LATENT_SIZE, radius_min: float = 0.27) -> torch.Tensor:
    """Each class's mean training image as RGB [classes, 3, size, size]."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    latents, _ = dataset(len(labels), seed, size, labels, radius_min)
    return latent_to_rgb(latents).view(len(CLASSES), per_class, 3, size, size).mean(dim=1)


def _tables() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(_SEED + 1)
    return {"shape": torch.randn(len(SHAPES), TEXT_DIM, generator=gen),
            "colour": torch.randn(len(COLOURS), TEXT_DIM, generator=gen),
            "template": torch.randn(TEXT_TOKENS - 2, TEXT_DIM, generator=gen),
            "pooled_shape": torch.randn(len(SHAPES), POOLED_DIM, generator=gen),
            "pooled_colour": torch.randn(len(COLOURS), POOLED_DIM, generator=gen)}


def class_cond(labels: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stand-in "prompt" of each class: text states [B, 4, 32] (a template token, the shape's and the
    colour's embedding, a template token) and a pooled vector [B, 32]; fixed per class."""
    labels = torch.as_tensor(labels).reshape(-1)
    t = _tables()
    shape_i, colour_i = labels // len(COLOURS), labels % len(COLOURS)
    template = t["template"].expand(len(labels), -1, -1)
    text = torch.cat([template[:, :1], t["shape"][shape_i, None], t["colour"][colour_i, None], template[:, 1:]], 1)
    pooled = (t["pooled_shape"][shape_i] + t["pooled_colour"][colour_i]) / math.sqrt(2)
    return text, pooled


def write_classes(path: Path = CLASSES_FILE, radius_min: float = 0.27) -> Path:
    """The class file the engine's demo, the bench and the tests sample the model with (see the docstring)."""
    text, pooled = class_cond(torch.arange(len(CLASSES)))
    tensors = {"text": text, "pooled": pooled, "rgb_basis": _rgb_basis().contiguous(),
               "class_means": class_means(radius_min=radius_min).contiguous()}
    meta = {"classes": json.dumps(list(CLASSES)), "rgb_scale": str(RGB_SCALE), "latent_size": str(LATENT_SIZE),
            "about": "tools/train_tiny_flux.py: latent = rgb_scale * rgb_basis @ (rgb - 0.5) per pixel"}
    save_file(tensors, str(path), metadata=meta)
    return path


HIDDEN = 96
HEADS = 4
DOUBLE_BLOCKS = 2
SINGLE_BLOCKS = 4


def model_config() -> dict:
    """Flux schnell layout (no guidance embedder): 2 double + 4 single blocks, 4 heads of 24, text 32 wide."""
    config = tiny_config("flux", layers=DOUBLE_BLOCKS, heads=HEADS, hidden_size=HIDDEN, variant="schnell")
    config["num_single_layers"] = SINGLE_BLOCKS
    return config


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Half uniform, half logit-normal (SD3's training density, which weights the middle of the schedule)."""
    uniform = torch.rand(n, generator=gen)
    logit = torch.sigmoid(torch.randn(n, generator=gen))
    return torch.where(torch.rand(n, generator=gen) < 0.5, uniform, logit).clamp(1e-3, 1.0)


def train(minutes: float, batch: int, lr: float, seed: int, data_size: int, log_every: int,
          resume: Optional[Path] = None, radius_min: float = 0.27) -> tuple:
    """Returns (EMA model, log dict). The time box counts this process's CPU time (one thread), so a busy
    machine slows the run down but does not shorten its training. `resume`: start from a saved model's weights."""
    torch.manual_seed(seed)
    config = model_config()
    if resume is not None:
        model = model_class("flux").from_pretrained(resume, low_cpu_mem_usage=False).train()
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    else:
        model = model_class("flux")(**config).train()
    spec = resolve_model_spec({"_class_name": "FluxTransformer2DModel", **config})
    adapter = make_adapter(model, spec)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters ({4 * params / 2**20:.1f} MiB fp32); data set {data_size} images "
          f"{LATENT_SIZE}x{LATENT_SIZE} latent, {len(CLASSES)} classes", flush=True)
    data, labels = dataset(data_size, seed=seed, radius_min=radius_min)
    text_all, pooled_all = class_cond(torch.arange(len(CLASSES)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed + 1)
    budget = minutes * 60
    warmup = 100
    t0 = time.process_time()
    step, losses, curve, running = 0, [], [], None
    while time.process_time() - t0 < budget:
        idx = torch.randint(0, data_size, (batch,), generator=gen)
        x0, y = data[idx], labels[idx]
        # Horizontal flips keep every class's shape (the triangle points up) and double the positions seen.
        flip = torch.rand(batch, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(batch, gen)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        cond = BranchCond(text_all[y], pooled_all[y])
        out = adapter.predict(xt, sigma, cond, None)
        loss = torch.nn.functional.mse_loss(out, noise - x0)
        # Linear warmup, then cosine decay over the time budget (progress measured in time, not steps).
        frac = (time.process_time() - t0) / budget
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        step += 1
        if step % log_every == 0:
            elapsed = time.process_time() - t0
            curve.append({"step": step, "cpu_seconds": round(elapsed, 1), "loss_ema": round(running, 4)})
            print(f"step {step:5d}  {elapsed:6.0f}s  loss {running:.4f}  lr {lr * scale:.2e}", flush=True)
    elapsed = time.process_time() - t0
    log = {"steps": step, "cpu_seconds": round(elapsed, 1), "resumed_from": None if resume is None else str(resume),
           "batch": batch, "lr": lr, "seed": seed, "radius_min": radius_min, "data_size": data_size, "parameters": params, "final_loss_ema": round(running, 4),
           "first_loss": round(losses[0], 4), "curve": curve, "config": config,
           "objective": "rectified flow: x = (1-sigma) x0 + sigma noise, target noise - x0, timestep sigma",
           "threads": torch.get_num_threads()}
    return ema, log


def save(model: torch.nn.Module, out: Path, log: dict, log_path: Path) -> None:
    """A diffusers folder (config.json + sharded diffusion_pytorch_model safetensors, fp32) and the training log."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="3MB")  # no file over the repo's 5 MB
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) and {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training time box")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-size", type=int, default=6000, dest="data_size")
    parser.add_argument("--log-every", type=int, default=50, dest="log_every")
    parser.add_argument("--classes-only", action="store_true", dest="classes_only",
                        help="only rewrite the class file (no training)")
    parser.add_argument("--radius-min", type=float, default=0.27, dest="radius_min",
                        help="smallest shape radius as a fraction of the image (the largest is 0.12 more)")
    parser.add_argument("--resume", type=Path, help="a model folder to start from (its training log is kept)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--log", type=Path, default=TRAINING_LOG)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wrote {write_classes(radius_min=args.radius_min)}")
    if args.classes_only:
        return 0
    previous = None
    if args.resume is not None:  # read now: --resume may be --out, which the new weights replace
        previous_log = args.resume.parent / TRAINING_LOG.name
        previous = json.loads(previous_log.read_text()) if previous_log.is_file() else None
    t0 = time.perf_counter()
    model, log = train(args.minutes, args.batch, args.lr, args.seed, args.data_size, args.log_every, args.resume,
                       args.radius_min)
    log["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log["previous"] = previous
    log["command"] = "PYTHONPATH=. python tools/train_tiny_flux.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save(model, args.out, log, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
