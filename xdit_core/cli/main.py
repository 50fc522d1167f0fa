"""`python -m xdit_core {generate,tiny,demo}`: the engine's command line.

Errors the engine raises on purpose print as one line (`error: ...`) with exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
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
    from xdit_core.api import SAMPLERS

    p = sub.add_parser("generate", help="sample one latent from a model")
    p.add_argument("--model", required=True, help="diffusers model folder, or one .safetensors file in the original "
                                                   "Flux/SD3/PixArt layout (bare or an all-in-one checkpoint)")
    p.add_argument("--family", help="flux | sd3 | pixart | wan (default: from config.json's _class_name)")
    p.add_argument("--variant", help="flux: dev | schnell; pixart: alpha | sigma; wan: t2v | i2v | ti2v "
                                     "(default: detected)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 up to 16384 (default: from --latent)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 up to 16384 (default: from --latent)")
    p.add_argument("--batch", type=int, default=1, help="images, 1..4096 and within the memory budget")
    p.add_argument("--length", type=int, help="video models: frames, as ComfyUI's length (1 + 4k; default 1)")
    p.add_argument("--steps", type=int, required=True, help="1..10000")
    p.add_argument("--seed", type=int, required=True, help="0..18446744073709551615 (ComfyUI's range)")
    p.add_argument("--cfg", type=float, help="CFG scale, 0..100 (default: Flux 1.0, SD3 and PixArt 4.5)")
    p.add_argument("--guidance", type=float, help="Flux guidance embedding, 0..100 (default 3.5, as FluxGuidance)")
    p.add_argument("--negative-guidance", type=float,
                   help="the negative branch's Flux guidance (default 3.5: ComfyUI's for a negative prompt without "
                        "FluxGuidance)")
    p.add_argument("--shift", help="model-sampling shift in (0, 100] (default: the family's), or 'auto' for Flux; "
                                   "not for PixArt")
    p.add_argument("--sampler", default="euler", help=f"{' | '.join(SAMPLERS)} (ComfyUI's names and math)")
    p.add_argument("--scheduler", default="simple", help="simple | normal | karras | exponential | sgm_uniform | "
                                                          "beta | ddim_uniform | linear_quadratic | kl_optimal")
    p.add_argument("--denoise", type=float, default=1.0)
    p.add_argument("--latent", help="ComfyUI LATENT safetensors (`samples`) to start from")
    p.add_argument("--cond", help="conditioning safetensors: positive[_pooled], negative[_pooled]; Wan I2V: "
                                  "clip_vision (2.1), concat_latent_image and concat_mask (the start image)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--fp8", default="keep", help="a file's fp8 weights: keep (fp8 on the device, upcast to --dtype "
                   "per layer as used; the same results) | upcast (to --dtype at load: twice the memory at bf16)")
    p.add_argument("--threads", type=int, help="torch threads per rank, at most the cores (default: cores / ranks)")
    p.add_argument("--backend", default="local",
                   help="local (processes spawned here) | ray (the worker pool) | env (a rank under torchrun)")
    p.add_argument("--ray_address", help="join this Ray cluster (default: $XDIT_RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", required=True, help="output LATENT safetensors (`samples`), replaced atomically")
    p.add_argument("--report", help="write REPORT.json here (atomically)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow more ranks than max(8, 4 x cores) on CPU or one per GPU, and more threads than cores; "
                        "the memory budget ($XDIT_MEMORY_BUDGET_GB, default: physical or GPU memory) still holds")
    par = p.add_argument_group("parallelism (xDiT's flags; world size = their product)")
    par.add_argument("--ulysses_degree", type=int, default=1, help="Ulysses sequence parallel degree")
    par.add_argument("--ring_degree", type=int, default=1, help="Ring attention sequence parallel degree")
    par.add_argument("--pipefusion_parallel_degree", type=int, default=1, help="PipeFusion stages")
    par.add_argument("--use_cfg_parallel", action="store_true", help="negative and positive on two ranks")
    par.add_argument("--num_pipeline_patch", type=int, help="PipeFusion patches (default: the stage count)")
    par.add_argument("--warmup_steps", type=int, default=1, help="PipeFusion synchronous warmup steps")
    par.add_argument("--shard_weights", action="store_true",
                     help="FSDP: each rank keeps 1/N of every block (N: the ulysses x ring x cfg ranks of a stage) "
                          "and gathers a block just before it runs")
    par.add_argument("--attention_backend", default="auto", help="auto | flash | sdpa")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny", help="write a random-weight diffusers model")
    p.add_argument("--family", required=True, help="flux | sd3 | pixart | wan")
    p.add_argument("--out", required=True, help="the model folder to write: new or empty (written aside, then "
                                                "renamed into place)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder (never a file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", help="tiny | medium")
    p.add_argument("--variant", help="flux: dev (guidance embedding, default) | schnell; "
                                     "pixart: alpha (default) | sigma")
    p.add_argument("--layers", type=int, help="transformer blocks (Flux: double-stream blocks), at least 1")
    p.add_argument("--heads", type=int, help="attention heads, at least 1")
    p.add_argument("--hidden-size", type=int, dest="hidden_size",
                   help="a multiple of --heads and of 4 (Flux: head size a multiple of 4, at least 8; PixArt-alpha: "
                        "of 12); the fp32 weights at most a third of the RAM and 16 GiB")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="make a tiny model, generate, print a table and write a PNG preview")
    p.add_argument("--family", default="flux", help="flux | sd3 | pixart | wan")
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
    from xdit_core.cli.generate import GenerateOptions, generate, write_outputs

    opts = GenerateOptions(**{k: v for k, v in vars(args).items() if k != "command"})
    samples, report = generate(opts)
    if samples is None:  # a non-zero rank under --backend env: rank 0 writes
        return
    write_outputs(samples, report, args.out, args.report)
    steps = report["per_rank"][0]["step_s"]
    print(f"wrote {args.out}: samples {list(samples.shape)}, {len(steps)} steps in {sum(steps):.3f}s "
          f"(load {report['load_s']:.3f}s)")


def cmd_tiny(args: argparse.Namespace) -> None:
    from xdit_core.cli.tiny import write_tiny

    try:
        out = write_tiny(args.family, args.out, seed=args.seed, preset=args.preset, layers=args.layers,
                         heads=args.heads, hidden_size=args.hidden_size, variant=args.variant, force=args.force)
    except OSError as e:  # e.g. --out under a file, or a read-only folder: the user's path, not a bug
        where = f" ({e.filename})" if e.filename else ""
        raise XDiTError(f"cannot write --out {args.out}: {e.strerror or e}{where}") from None
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
        if os.environ.get("XDIT_DEBUG") == "1" and getattr(e, "details", ""):
            print(e.details, file=sys.stderr)  # a rank's traceback, for a bug report
        return 2
    return 0
