"""Every benchmark in one go: `python -m bench [NAME ...] [--quick] [--publish]`.

NAMEs (default: all, in this order): fidelity, communication, memory, cpu_scaling, pipefusion, video, families,
degree1, overheads, soak, model.
Prints one table (or a few) per benchmark, writes bench/results/<name>.json, bench/results/tables.md and
PNG plots into bench/results/. `--publish` also copies the plots into docs/ and writes the model's test
fixture (tests/fixtures/perf_cpu.json) from the cpu_scaling run. `--quick` shrinks every size for a
smoke run (about 4 minutes); the default sizes take about 9 minutes on 2 cores (video: about 1; families: about 4).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import common, plots

NAMES = ("fidelity", "communication", "memory", "cpu_scaling", "pipefusion", "video", "families", "degree1", "overheads",
         "soak", "model")
FIXTURE = common.ROOT / "tests" / "fixtures" / "perf_cpu.json"

SIZES = {  # option: (default, --quick)
    "fid_size": (256, 128),
    "fid_steps": (4, 3),
    "size": (384, 128),
    "steps": (6, 2),
    "repeats": (5, 2),
    "calibration_sizes": ((128, 256, 384, 512), (64, 128, 192)),
    "calibration_repeats": (3, 2),
    "pf_size": (768, 256),  # pipefusion: Flux medium at 768x768 = 2304 image tokens (+ 128 text)
    "pf_steps": (20, 4),
    "pf_warmup": (1, 1),
    "pf_repeats": (2, 1),
    "video_size": (256, 192),  # Wan medium: 256x256x17 frames = 1280 video tokens; --quick 192x192x9 = 432
    "video_length": (17, 9),
    "video_steps": (2, 2),
    "video_repeats": (3, 2),
    "fam_size": (768, 256),  # families: Qwen-Image medium at 768x768 = 2304 image tokens (+ 128 text)
    "fam_steps": (4, 2),
    "fam_repeats": (2, 1),
    "mem_size": (512, 256),  # memory: Flux medium at 512x512 (the plan predicts >= 300 MB per serial rank)
    "mem_steps": (2, 2),  # 2: PipeFusion runs a pipelined step after its warmup step
    "ovh_size": (256, 128),
    "ovh_steps": (4, 2),
    "route_size": (512, 256),
    "degree1_repeats": (11, 3),
    "pool_size": (256, 128),
    "soak_requests": (100, 20),
    "soak_size": (128, 64),
}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(NAMES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    ap.add_argument(
        "--publish", action="store_true", help="also write docs/perf_*.png and tests/fixtures/perf_cpu.json"
    )
    for name, (default, quick) in SIZES.items():
        ap.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            nargs="+" if isinstance(default, tuple) else None,
            help=f"default {default}, --quick {quick}",
        )
    opts = ap.parse_args(argv)
    unknown = [n for n in opts.names if n not in NAMES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    opts.names = [n for n in NAMES if n in opts.names] if opts.names else list(NAMES)
    for name, (default, quick) in SIZES.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else default)
    return opts


def main(argv: list[str]) -> None:
    opts = parse(argv)
    command = "python -m bench " + " ".join(argv)
    from bench import cpu_scaling, families, fidelity, memory, overheads, pipefusion, published, soak, video

    results: dict[str, Any] = {}
    reports: list[str] = []
    made: list[Path] = []
    started = time.perf_counter()

    def emit(text: str) -> None:
        print(text + "\n", flush=True)
        reports.append(text)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def fid() -> None:
            if "fidelity" not in results:
                results["fidelity"] = fidelity.run(opts, tmp)
                common.write_json("fidelity", results["fidelity"] | {"command": command})

        def do_fidelity() -> None:
            fid()
            emit(fidelity.report_fidelity(results["fidelity"]))
            made.append(plots.fidelity(results["fidelity"], common.RESULTS))

        def do_communication() -> None:
            fid()
            emit(fidelity.report_communication(results["fidelity"]))
            made.append(plots.communication(results["fidelity"], common.RESULTS))

        def do_memory() -> None:
            results["memory"] = memory.run(opts, tmp)
            common.write_json("memory", results["memory"] | {"command": command})
            emit(memory.report(results["memory"]))
            made.append(plots.memory(results["memory"], common.RESULTS))

        def do_scaling() -> None:
            results["cpu_scaling"] = cpu_scaling.run(opts, tmp)
            common.write_json("cpu_scaling", results["cpu_scaling"] | {"command": command})
            emit(cpu_scaling.report(results["cpu_scaling"]))
            made.append(plots.cpu_scaling(results["cpu_scaling"], common.RESULTS))

        def do_pipefusion() -> None:
            results["pipefusion"] = pipefusion.run(opts, tmp)
            common.write_json("pipefusion", results["pipefusion"] | {"command": command})
            emit(pipefusion.report(results["pipefusion"]))

        def do_video() -> None:
            results["video"] = video.run(opts, tmp)
            common.write_json("video", results["video"] | {"command": command})
            emit(video.report(results["video"]))

        def do_families() -> None:
            results["families"] = families.run(opts, tmp)
            common.write_json("families", results["families"] | {"command": command})
            emit(families.report(results["families"]))

        def do_degree1() -> None:
            results["degree1"] = overheads.run_degree1(opts, tmp)
            common.write_json("degree1", results["degree1"] | {"command": command})
            emit(overheads.report_degree1(results["degree1"]))

        def do_overheads() -> None:
            results["overheads"] = overheads.run(opts, tmp)
            common.write_json("overheads", results["overheads"] | {"command": command})
            emit(overheads.report(results["overheads"]))

        def do_soak() -> None:
            results["soak"] = soak.run(opts, tmp)
            common.write_json("soak", results["soak"] | {"command": command})
            emit(soak.report(results["soak"]))

        def do_model() -> None:
            results["model"] = published.run()
            common.write_json("model", results["model"] | {"command": command})
            emit(published.report(results["model"]))
            made.append(plots.published(results["model"], common.RESULTS))
            made.append(plots.scaling(results["model"], common.RESULTS))

        steps: dict[str, Callable[[], None]] = dict(
            fidelity=do_fidelity,
            communication=do_communication,
            memory=do_memory,
            cpu_scaling=do_scaling,
            pipefusion=do_pipefusion,
            video=do_video,
            families=do_families,
            degree1=do_degree1,
            overheads=do_overheads,
            soak=do_soak,
            model=do_model,
        )
        info = common.machine()
        print(
            f"{command}\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average "
            f"{' '.join(info['load_average'])}, git {info['git']}\n",
            flush=True,
        )
        for name in opts.names:
            t0 = time.perf_counter()
            steps[name]()
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]\n", flush=True)
    total = time.perf_counter() - started
    header = (
        f"`{command}` on {info['cpu']} ({info['cores']} cores, load average at start "
        f"{' '.join(info['load_average'])}), torch {info['torch']}, git {info['git']}; {total / 60:.1f} min\n\n"
    )
    (common.RESULTS / "tables.md").write_text(header + "\n\n".join(reports) + "\n")
    if opts.publish:
        for path in made:
            shutil.copy(path, common.DOCS / path.name)
        if "cpu_scaling" in results:
            write_fixture(results["cpu_scaling"], command, info)
    print(f"total {total / 60:.1f} min; results in {common.RESULTS}" + (" and docs/" if opts.publish else ""))


def write_fixture(result: dict[str, Any], command: str, info: dict[str, Any]) -> None:
    """The calibrated model inputs and the measured times and bytes of every CPU config (tests/test_perfmodel.py)."""
    import json
    import statistics

    keep = ("config", "ring_impl", "request", "baseline", "ranks", "measured", "bytes", "predicted_s")
    data = {
        "command": command,
        "machine": info,
        "size": result["size"],
        "steps": result["steps"],
        "link": result["link"],
        "contention": statistics.median(result["contention"]),
        "workloads": result["workloads"],
        "rows": {n: {k: r[k] for k in keep} for n, r in result["rows"].items()},
    }
    FIXTURE.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
