"""`python -m xdit_core demo`: the main job on the embedded default, with no GPU and no download."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .generate import GenerateOptions, generate
from .preview import latent_to_rgb, write_png
from .tiny import write_tiny


def run_demo(family: str, out_dir: Path, steps: int, size: int, seed: int) -> None:
    """Make a tiny model, generate twice (determinism check), print a table, write latent + PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / f"tiny-{family}"
    write_tiny(family, model_dir, seed=0)
    print(f"made a random-weight tiny {family} model in {model_dir}")
    opts = GenerateOptions(model=str(model_dir), height=size, width=size, steps=steps, seed=seed)
    samples, report = generate(opts)
    again, _ = generate(opts)
    cfg = report["config"]
    print(f"generated a {size}x{size} latent with {cfg['sampler']}/{cfg['scheduler']}, {steps} steps, "
          f"cfg {cfg['cfg']}, seed {seed}")
    rank = report["per_rank"][0]
    rows = [
        ("family / variant", f"{cfg['family']} / {cfg['variant']}"),
        ("latent shape", str(list(samples.shape))),
        ("world size", str(report["world_size"])),
        ("threads per rank", str(cfg["threads"])),
        ("load time", f"{report['load_s'] * 1000:.1f} ms"),
        ("mean step time", f"{sum(rank['step_s']) / len(rank['step_s']) * 1000:.1f} ms"),
        ("parameters", f"{rank['param_bytes'] / 1e6:.2f} MB"),
        ("peak RSS", f"{rank['peak_rss_bytes'] / 1e6:.0f} MB"),
        ("latent mean / std", f"{samples.mean():.4f} / {samples.std():.4f}"),
        ("same seed, same bits", "yes" if samples.equal(again) else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))
    save_file({"samples": samples.contiguous()}, str(out_dir / "latent.safetensors"))
    (out_dir / "REPORT.json").write_text(json.dumps(report, indent=2))
    png = write_png(out_dir / "preview.png", latent_to_rgb(samples[0]))
    print(f"wrote {out_dir / 'latent.safetensors'}, {out_dir / 'REPORT.json'} and the preview {png}")
