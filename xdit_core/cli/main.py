"""`python -m xdit_core {generate,tiny,demo}`: the engine's command line.

Errors the engine raises on purpose print as one line (`error: ...`) with exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from xdit_core.errors import XDiTError

log = logging.getLogger("xdit")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like the engine's own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample one latent from a model")
    p.add_argument("--model", required=True, help="diffusers model folder, or one .safetensors file in the original "
                                                   "Flux/SD3/PixArt layout (bare or an all-in-one checkpoint)")
    p.add_argument("--family", help="flux | sd3 | pixart (default: from config.json's _class_name)")
    p.add_argument("--variant", help="flux: dev | schnell; pixart: alpha | sigma (default: detected)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: from --latent)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: from --latent)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--cfg", type=float, help="CFG scale (default: Flux 1.0, SD3 and PixArt 4.5)")
    p.add_argument("--guidance", type=float, help="Flux guidance embedding (default 3.5, as FluxGuidance)")
    p.add_argument("--shift", help="model-sampling shift (default: the family's), or 'auto' for Flux")
    p.add_argument("--sampler", default="euler", help="euler | euler_ancestral | heun | dpmpp_2m")
    p.add_argument("--scheduler", default="simple", help="simple | normal | karras | exponential | "
                                                          "sgm_uniform | beta")
    p.add_argument("--denoise", type=float, default=1.0)
    p.add_argument("--latent", help="ComfyUI LATENT safetensors (`samples`) to start from")
    p.add_argument("--cond", help="conditioning safetensors: positive[_pooled], negative[_pooled]")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--backend", default="local",
                   help="local (processes spawned here) | ray (the worker pool) | env (a rank under torchrun)")
    p.add_argument("--ray_address", help="join this Ray cluster (default: $XDIT_RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", required=True, help="output LATENT safetensors (`samples`)")
    p.add_argument("--report", help="write REPORT.json here")
    par = p.add_argument_group("parallelism (xDiT's flags; world size = their product)")
    par.add_argument("--ulysses_degree", type=int, default=1, help="Ulysses sequence parallel degree")
    par.add_argument("--ring_degree", type=int, default=1, help="Ring attention sequence parallel degree")
    par.add_argument("--pipefusion_parallel_degree", type=int, default=1, help="PipeFusion stages")
    par.add_argument("--use_cfg_parallel", action="store_true", help="negative and positive on two ranks")
    par.add_argument("--num_pipeline_patch", type=int, help="PipeFusion patches (default: the stage count)")
    par.add_argument("--warmup_steps", type=int, default=1, help="PipeFusion synchronous warmup steps")
    par.add_argument("--attention_backend", default="auto", help="auto | flash | sdpa")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny", help="write a random-weight diffusers model")
    p.add_argument("--family", required=True, help="flux | sd3 | pixart")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", help="tiny | medium")
    p.add_argument("--variant", help="flux: dev (guidance embedding, default) | schnell; "
                                     "pixart: alpha (default) | sigma")
    p.add_argument("--layers", type=int, help="transformer blocks (Flux: double-stream blocks)")
    p.add_argument("--heads", type=int)
    p.add_argument("--hidden-size", type=int, dest="hidden_size")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="make a tiny model, generate, print a table and write a PNG preview")
    p.add_argument("--family", default="flux", help="flux | sd3 | pixart")
    p.add_argument("--out-dir", default="xdit_demo_out", dest="out_dir")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="height and width in pixels")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m xdit_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_tiny(sub)
    _add_demo(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from xdit_core.cli.generate import GenerateOptions, generate

    opts = GenerateOptions(**{k: v for k, v in vars(args).items() if k != "command"})
    samples, report = generate(opts)
    if samples is None:  # a non-zero rank under --backend env: rank 0 writes
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.contiguous()}, args.out)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    steps = report["per_rank"][0]["step_s"]
    print(f"wrote {args.out}: samples {list(samples.shape)}, {len(steps)} steps in {sum(steps):.3f}s "
          f"(load {report['load_s']:.3f}s)")


def cmd_tiny(args: argparse.Namespace) -> None:
    from xdit_core.cli.tiny import write_tiny

    out = write_tiny(args.family, args.out, seed=args.seed, preset=args.preset, layers=args.layers,
                     heads=args.heads, hidden_size=args.hidden_size, variant=args.variant)
    print(f"wrote {args.family} ({args.preset}) model to {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help: return the status instead of exiting
        return int(e.code or 0)
    try:
        if args.command == "generate":
            cmd_generate(args)
        elif args.command == "tiny":
            cmd_tiny(args)
        else:
            from xdit_core.cli.demo import run_demo

            run_demo(args.family, Path(args.out_dir), args.steps, args.size, args.seed)
    except XDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
