"""Bad input gives one clear line naming the problem, exit status 2, and no traceback, before any weight is read
or process started: nothing is left behind (no child process, no file).

The cases come from trying the CLI as an attacker would: NaN and inf, out-of-range numbers, malformed input files,
meshes and sizes too big for the machine, outputs that cannot be written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import netprobe
import xdit_core.api
from xdit_core.cli.generate import write_outputs
from xdit_core.cli.main import main
from xdit_core.errors import XDiTError

OUT = "@out/x.safetensors"  # the case's output folder (tmp_path/out), filled in by the test
NAN, INF = math.nan, math.inf


def run_cli(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def gen_args(model, *extra, h="64", w="64"):
    return ["generate", "--model", str(model), "--height", h, "--width", w, "--steps", "2", "--seed", "0",
            "--out", OUT, *extra]


def latent_args(model, tmp_path, samples, *extra, **tensors):
    """generate from a --latent file holding `samples` (and e.g. batch_index); no --height/--width."""
    path = tmp_path / "latent.safetensors"
    save_file({"samples": samples, **tensors}, str(path))
    return ["generate", "--model", str(model), "--steps", "2", "--seed", "0", "--out", OUT, "--latent", str(path),
            *extra]


def child_pids() -> set[int]:
    """The processes below this one that are still running."""
    return netprobe.live_descendants()


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture()
def bad_folders(tmp_path, tiny_models):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({"w": torch.zeros(1)}, str(unknown / "diffusion_pytorch_model.safetensors"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_models["sd3"] / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    return {"no_config": no_config, "unknown": unknown, "pickled": pickled, "ckpt": ckpt}


def cond_file(tmp_path, **tensors):
    path = tmp_path / "cond.safetensors"
    save_file(tensors, str(path))
    return str(path)


def flux_cond(tmp_path, text=None, pooled=None):
    """A Flux --cond file (text width 32, pooled 32 for the tiny model), zeros unless given."""
    return cond_file(tmp_path, positive=torch.zeros(1, 4, 32) if text is None else text,
                     positive_pooled=torch.zeros(1, 32) if pooled is None else pooled)


def model_file(m):
    return str(m["flux"] / "diffusion_pytorch_model.safetensors")


def a_file(t):
    """A plain file in tmp_path (an obstacle where a folder is expected)."""
    path = t / "plain.txt"
    path.write_text("not a folder")
    return path


Z = torch.zeros(1, 16, 8, 8)  # a valid flux/sd3 latent of 64 x 64 px


CASES = {
    "missing model": (lambda m, b, t: gen_args(t / "nowhere"), "model path not found"),
    "no config.json": (lambda m, b, t: gen_args(b["no_config"]), "has no config.json"),
    "unknown class": (lambda m, b, t: gen_args(b["unknown"]), "unknown model class 'UNet2DConditionModel'"),
    "pickle in folder": (lambda m, b, t: gen_args(b["pickled"]), "is a pickle checkpoint; only safetensors"),
    "pickle file": (lambda m, b, t: gen_args(b["ckpt"]), "is a pickle checkpoint; only safetensors"),
    "height multiple": (lambda m, b, t: gen_args(m["sd3"], h="72"), "height 72 is not a multiple of 16"),
    "width multiple": (lambda m, b, t: gen_args(m["flux"], w="100"), "width 100 is not a multiple of 16"),
    "steps": (lambda m, b, t: gen_args(m["sd3"])[:-6] + ["--steps", "0", "--seed", "0", "--out", "x"],
              "steps must be at least 1, got 0"),
    "denoise zero": (lambda m, b, t: gen_args(m["sd3"], "--denoise", "0"), "denoise must be in (0, 1], got 0.0"),
    "denoise big": (lambda m, b, t: gen_args(m["sd3"], "--denoise", "1.5"), "denoise must be in (0, 1], got 1.5"),
    "sampler": (lambda m, b, t: gen_args(m["sd3"], "--sampler", "lms"),
                "unknown sampler 'lms'; valid samplers: euler, euler_ancestral, heun, dpmpp_2m"),
    "scheduler": (lambda m, b, t: gen_args(m["sd3"], "--scheduler", "ddim"),
                  "unknown scheduler 'ddim'; valid schedulers: simple, normal, karras, exponential"),
    "cond missing keys": (lambda m, b, t: gen_args(m["sd3"], "--cond", cond_file(t, positive=torch.zeros(1, 4, 32))),
                          "lacks keys ['positive_pooled', 'negative', 'negative_pooled']"),
    "cond wrong dims": (lambda m, b, t: gen_args(m["flux"], "--cond", cond_file(
        t, positive=torch.zeros(1, 4, 31), positive_pooled=torch.zeros(1, 32))),
        "'positive' has shape [1, 4, 31], expected [1, L, 32]"),
    "cond pooled dims": (lambda m, b, t: gen_args(m["flux"], "--cond", cond_file(
        t, positive=torch.zeros(1, 4, 32), positive_pooled=torch.zeros(1, 4, 32))),
        "'positive_pooled' has shape [1, 4, 32], expected [1, 32]"),
    "shift": (lambda m, b, t: gen_args(m["sd3"], "--shift", "auto"), "--shift auto is only defined for Flux"),
    "flag type": (lambda m, b, t: gen_args(m["sd3"], "--steps", "many"), "argument --steps: invalid int value"),
    # Numbers: finite, and in ComfyUI's ranges.
    "cfg nan": (lambda m, b, t: gen_args(m["flux"], "--cfg", "nan"), "cfg must be a finite number, got nan"),
    "cfg inf": (lambda m, b, t: gen_args(m["sd3"], "--cfg", "inf"), "cfg must be a finite number, got inf"),
    "cfg -inf": (lambda m, b, t: gen_args(m["sd3"], "--cfg=-inf"), "cfg must be a finite number, got -inf"),
    "cfg huge": (lambda m, b, t: gen_args(m["sd3"], "--cfg", "1e308"), "cfg must be in [0, 100], got 1e+308"),
    "cfg negative": (lambda m, b, t: gen_args(m["sd3"], "--cfg=-2"), "cfg must be in [0, 100], got -2.0"),
    "shift nan": (lambda m, b, t: gen_args(m["flux"], "--shift", "nan"), "shift must be a finite number, got nan"),
    "shift inf": (lambda m, b, t: gen_args(m["sd3"], "--shift", "inf"), "shift must be a finite number, got inf"),
    "shift zero": (lambda m, b, t: gen_args(m["sd3"], "--shift", "0"), "shift must be in (0, 100], got 0.0"),
    "shift negative": (lambda m, b, t: gen_args(m["flux"], "--shift=-1"), "shift must be in (0, 100], got -1.0"),
    "shift overflow": (lambda m, b, t: gen_args(m["flux"], "--shift", "1000"), "shift must be in (0, 100], got 1000"),
    "shift pixart": (lambda m, b, t: gen_args(m["pixart"], "--shift", "2"), "shift 2.0 has no effect on pixart"),
    "guidance nan": (lambda m, b, t: gen_args(m["flux"], "--guidance", "nan"), "guidance must be a finite number"),
    "guidance inf": (lambda m, b, t: gen_args(m["flux"], "--guidance", "inf"), "guidance must be a finite number"),
    "denoise nan": (lambda m, b, t: gen_args(m["sd3"], "--denoise", "nan"), "denoise must be in (0, 1], got nan"),
    "denoise inf": (lambda m, b, t: gen_args(m["sd3"], "--denoise", "inf"), "denoise must be in (0, 1], got inf"),
    "denoise tiny": (lambda m, b, t: latent_args(m["flux"], t, torch.randn(1, 16, 8, 8), "--denoise", "1e-9"),
                     "denoise 1e-09 with 2 steps needs a 1999999999-step schedule; the most is 1000000"),
    "seed negative": (lambda m, b, t: gen_args(m["flux"])[:-4] + ["--seed=-1", "--out", OUT],
                      "seed must be an integer in 0..18446744073709551615 (ComfyUI's range), got -1"),
    "seed 2^64": (lambda m, b, t: gen_args(m["flux"], "--seed", str(2 ** 64)), f"got {2 ** 64}"),
    "seed 10^30": (lambda m, b, t: gen_args(m["sd3"], "--seed", str(10 ** 30)), "seed must be an integer in 0.."),
    "steps 10001": (lambda m, b, t: gen_args(m["sd3"], "--steps", "10001"),
                    "steps must be at most 10000 (KSampler's range), got 10001"),
    "steps 10^9": (lambda m, b, t: gen_args(m["flux"], "--steps", "1000000000"), "steps must be at most 10000"),
    # Conditioning tensors (--cond).
    "cond nan": (lambda m, b, t: gen_args(m["flux"], "--cond", flux_cond(t, text=torch.full((1, 4, 32), NAN))),
                 "--cond tensor 'positive' holds 128 NaN or inf values of 128"),
    "cond pooled inf": (lambda m, b, t: gen_args(m["flux"], "--cond", flux_cond(t, pooled=torch.full((1, 32), INF))),
                        "--cond tensor 'positive_pooled' holds 32 NaN or inf values"),
    "cond negative nan": (lambda m, b, t: gen_args(m["sd3"], "--cond", cond_file(
        t, positive=torch.zeros(1, 4, 32), positive_pooled=torch.zeros(1, 32),
        negative=torch.full((1, 4, 32), NAN), negative_pooled=torch.zeros(1, 32))), "'negative' holds 128 NaN"),
    "cond no tokens": (lambda m, b, t: gen_args(m["flux"], "--cond", flux_cond(t, text=torch.zeros(1, 0, 32))),
                       "'positive' has shape [1, 0, 32], expected [1, L, 32] with L >= 1"),
    "cond integer": (lambda m, b, t: gen_args(m["flux"], "--cond", flux_cond(
        t, text=torch.zeros(1, 4, 32, dtype=torch.int64))),
        "'positive' must be a floating-point tensor, got torch.int64"),
    # Latents (--latent).
    "latent nan": (lambda m, b, t: latent_args(m["flux"], t, torch.full((1, 16, 8, 8), NAN)),
                   "latent holds 1024 NaN or inf values of 1024"),
    "latent inf": (lambda m, b, t: latent_args(m["sd3"], t, Z.clone().index_fill_(0, torch.tensor([0]), INF)),
                   "latent holds 1024 NaN or inf values"),
    "latent 2-d": (lambda m, b, t: latent_args(m["flux"], t, torch.randn(8, 8)),
                   "samples has shape [8, 8], expected 4 dims [B, 16, H/8, W/8] for flux"),
    "latent 3-d": (lambda m, b, t: latent_args(m["flux"], t, torch.randn(16, 8, 8)),
                   "has shape [16, 8, 8], expected 4"),
    "latent channels": (lambda m, b, t: latent_args(m["flux"], t, torch.randn(1, 4, 8, 8)),
                        "latent has shape [1, 4, 8, 8], expected [B, 16, H/8, W/8] for flux"),
    "latent batch 0": (lambda m, b, t: latent_args(m["flux"], t, torch.zeros(0, 16, 8, 8)),
                       "batch must be 1..4096 (ComfyUI's batch limit), got 0"),
    "latent batch 5000": (lambda m, b, t: latent_args(m["flux"], t, torch.zeros(5000, 16, 2, 2)), "got 5000"),
    "latent integer": (lambda m, b, t: latent_args(m["flux"], t, torch.ones(1, 16, 8, 8, dtype=torch.int32)),
                       "latent must be a floating-point tensor, got torch.int32"),
    "latent too tall": (lambda m, b, t: latent_args(m["flux"], t, torch.zeros(1, 16, 2050, 2)),
                        "height 16400 is out of range; use 16 to 16384"),
    "latent vs --batch": (lambda m, b, t: latent_args(m["flux"], t, Z, "--batch", "3"),
                          "--batch 3 does not match the --latent file's 1"),
    "batch_index negative": (lambda m, b, t: latent_args(m["flux"], t, Z, batch_index=torch.tensor([-1])),
                             "batch_index entries must be integers in 0..4095, got [-1]"),
    "batch_index huge": (lambda m, b, t: latent_args(m["flux"], t, Z, batch_index=torch.tensor([10 ** 9])),
                         "got [1000000000]"),
    "batch_index length": (lambda m, b, t: latent_args(m["flux"], t, torch.randn(2, 16, 8, 8),
                                                       batch_index=torch.tensor([0])),
                           "batch_index has 1 entries but the latent has 2 images"),
    "batch_index 2-d": (lambda m, b, t: latent_args(m["flux"], t, Z, batch_index=torch.tensor([[0]])),
                        "batch_index must be a 1-D integer tensor, got torch.int64 of shape [1, 1]"),
    "batch_index float": (lambda m, b, t: latent_args(m["flux"], t, Z, batch_index=torch.tensor([0.5])),
                          "batch_index must be a 1-D integer tensor, got torch.float32"),
    "batch_index empty": (lambda m, b, t: latent_args(m["flux"], t, Z, batch_index=torch.zeros(0, dtype=torch.int64)),
                          "batch_index has 0 entries but the latent has 1 images"),
    # Sizes, batch and the memory budget.
    "height 32768": (lambda m, b, t: gen_args(m["flux"], h="32768", w="32768"),
                     "height 32768 is out of range; use 16 to 16384 pixels (ComfyUI's MAX_RESOLUTION)"),
    "height negative": (lambda m, b, t: gen_args(m["flux"], h="-16"), "height -16 is out of range"),
    "width zero": (lambda m, b, t: gen_args(m["sd3"], w="0"), "width 0 is out of range"),
    "batch zero": (lambda m, b, t: gen_args(m["flux"], "--batch", "0"), "batch must be at least 1, got 0"),
    "batch huge": (lambda m, b, t: gen_args(m["flux"], "--batch", str(10 ** 12)),
                   "latent batch must be 1..4096 (ComfyUI's batch limit), got 1000000000000"),
    "over budget": (lambda m, b, t: gen_args(m["flux"], "--batch", "4096", h="4096", w="4096"),
                    "a latent of [4096, 16, 512, 512] needs about", {"XDIT_MEMORY_BUDGET_GB": "64"}),
    "over physical memory": (lambda m, b, t: gen_args(m["flux"], "--batch", "4096", h="16384", w="16384"),
                             "GiB (physical memory)"),
    "budget env": (lambda m, b, t: gen_args(m["flux"]), "$XDIT_MEMORY_BUDGET_GB must be a positive number of GiB, "
                   "got 'lots'", {"XDIT_MEMORY_BUDGET_GB": "lots"}),
    # Ranks, threads and the mesh.
    "ranks over cap": (lambda m, b, t: gen_args(m["flux"], "--ring_degree", "1000"),
                       "the mesh needs 1000 ranks but this machine runs at most"),
    "ranks oversubscribed": (lambda m, b, t: gen_args(m["flux"], "--ring_degree", "100000", "--oversubscribe"),
                             "100001 process(es) x"),
    "ranks 10^9": (lambda m, b, t: gen_args(m["flux"], "--ring_degree", "1000000000"),
                   "the mesh needs 1000000000 ranks"),
    "ulysses zero": (lambda m, b, t: gen_args(m["flux"], "--ulysses_degree", "0"),
                     "ulysses_degree must be an integer >= 1, got 0"),
    "threads zero": (lambda m, b, t: gen_args(m["flux"], "--threads", "0"), "threads must be in 1.."),
    "threads huge": (lambda m, b, t: gen_args(m["flux"], "--threads", "1000000"), "got 1000000 (more threads than"),
    "threads oversubscribed": (lambda m, b, t: gen_args(m["flux"], "--threads", str(10 ** 12), "--oversubscribe"),
                               "threads must be in 1..1024, got 1000000000000"),
    "patches negative": (lambda m, b, t: gen_args(m["flux"], "--num_pipeline_patch=-3"),
                         "num_pipeline_patch must be >= 1, got -3"),
    "patches huge": (lambda m, b, t: gen_args(m["flux"], "--num_pipeline_patch", "1000000000"),
                     "num_pipeline_patch must be at most 1024"),
    "warmup negative": (lambda m, b, t: gen_args(m["flux"], "--warmup_steps=-1"), "warmup_steps must be >= 0, got -1"),
    "warmup huge": (lambda m, b, t: gen_args(m["flux"], "--warmup_steps", "1000000000"),
                    "warmup_steps must be at most 10000"),
    "flash without cuda": (lambda m, b, t: gen_args(m["flux"], "--attention_backend", "flash"),
                           "attention backend 'flash' needs the ranks on CUDA GPUs"),
    # Outputs: writable, distinct, and not an input.
    "out under a file": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", str(a_file(t) / "x.safetensors")],
                         "plain.txt is a file, not a folder"),
    "out is a folder": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", str(t)], "is a folder or empty"),
    "out empty": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", ""], "--out '' is a folder or empty"),
    "out not writable": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", "/proc/x.safetensors"],
                         "--out /proc/x.safetensors cannot be written: creating a file in /proc fails"),
    "out is a device": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", "/dev/null"],
                        "--out /dev/null exists and is not a regular file"),
    "out name too long": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", str(t / ("x" * 300))],
                          "cannot be written: File name too long"),
    "latent name too long": (lambda m, b, t: gen_args(m["flux"], "--latent", str(t / ("x" * 300))),
                             "is not a readable safetensors file: [Errno 36] File name too long"),
    "cond name too long": (lambda m, b, t: gen_args(m["flux"], "--cond", str(t / ("x" * 300))),
                           "is not a readable safetensors file: [Errno 36] File name too long"),
    "out is the model": (lambda m, b, t: gen_args(m["flux"])[:-2] + ["--out", model_file(m)],
                         "would overwrite the model"),
    "out is the latent": (lambda m, b, t: [str(t / "latent.safetensors") if a == OUT else a
                                           for a in latent_args(m["flux"], t, Z)],
                          "is the --latent file; write the result elsewhere"),
    "report is a folder": (lambda m, b, t: gen_args(m["flux"], "--report", str(t)), "--report '/"),
    "report under a file": (lambda m, b, t: gen_args(m["flux"], "--report", str(a_file(t) / "r.json")),
                            "plain.txt is a file, not a folder"),
    "report not writable": (lambda m, b, t: gen_args(m["flux"], "--report", "/proc/r.json"),
                            "--report /proc/r.json cannot be written"),
    "report is out": (lambda m, b, t: gen_args(m["flux"], "--report", OUT), "--out and --report are the same file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line(capsys, monkeypatch, tmp_path, tiny_models, bad_folders, case):
    make_argv, needle, *env = CASES[case]
    for name, value in (env[0] if env else {}).items():
        monkeypatch.setenv(name, value)
    # Validation must stop the case before the run: no weight read, no process spawned.
    monkeypatch.setattr(xdit_core.api, "run", lambda *a, **k: pytest.fail("the request reached api.run"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a.replace("@out", str(out_dir)) for a in make_argv(tiny_models, bad_folders, tmp_path)]
    files, children = files_under(tmp_path), child_pids()
    rc, err = run_cli(capsys, argv)
    assert rc == 2
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, err
    assert child_pids() <= children, "a process was left running"
    assert files_under(tmp_path) == files, "a file was left behind"


def test_the_suite_covers_enough_cases():
    assert len(CASES) + 2 >= 45  # with the two subprocess cases below


def test_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xdit_core", "generate", "--model", str(tmp_path / "missing"),
                           "--height", "64", "--width", "64", "--steps", "2", "--seed", "0", "--out", "o"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model path not found") and "Traceback" not in proc.stderr


def test_subprocess_seed_out_of_range(tmp_path, tiny_models):
    """ComfyUI's largest seed plus one: torch overflowed with a traceback before."""
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-m", "xdit_core", "generate", "--model", str(tiny_models["flux"]),
                           "--height", "64", "--width", "64", "--steps", "2", "--seed", str(2 ** 64), "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: seed must be an integer in 0..{2 ** 64 - 1} (ComfyUI's "
                                                f"range), got {2 ** 64}"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Outputs are written atomically: all or nothing, and a late failure says what was written.
# ---------------------------------------------------------------------------------------------
def test_outputs_are_replaced_whole(tmp_path):
    out, report = tmp_path / "sub" / "x.safetensors", tmp_path / "r.json"
    out.parent.mkdir()
    out.write_bytes(b"old")
    write_outputs(torch.ones(1, 16, 2, 2), {"a": 1}, str(out), str(report))
    assert torch.equal(load_file(str(out))["samples"], torch.ones(1, 16, 2, 2))
    assert json.loads(report.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.json", "sub", "x.safetensors"]  # no temporaries


def test_a_failed_report_leaves_nothing(tmp_path, monkeypatch):
    """The report fails while staged: the latent is not written either, and the old one stays."""
    out, report = tmp_path / "x.safetensors", tmp_path / "r.json"
    out.write_bytes(b"old")

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(XDiTError, match="^nothing was written: could not write --report .*No space left"):
        write_outputs(torch.ones(1, 16, 2, 2), {"a": 1}, str(out), str(report))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_a_report_failing_after_the_latent_says_so(tmp_path, monkeypatch, capsys):
    """The latent is in place when renaming the report fails: the CLI's one error line says so, status 2."""
    import xdit_core.cli.generate

    out, report = tmp_path / "x.safetensors", tmp_path / "r.json"
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(report):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(xdit_core.cli.generate, "generate", lambda opts: (torch.ones(1, 16, 2, 2), {"a": 1}))
    monkeypatch.setattr(os, "replace", replace)
    rc, err = run_cli(capsys, ["generate", "--model", "m", "--steps", "1", "--seed", "0", "--out", str(out),
                               "--report", str(report)])
    assert rc == 2 and err == f"error: wrote {out} but could not write --report {report}: Input/output error"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # the staged report is removed


# ---------------------------------------------------------------------------------------------
# The same checks guard build_request, which the ComfyUI nodes call without the CLI.
# ---------------------------------------------------------------------------------------------
def nan_at(shape):
    t = torch.zeros(shape)
    t.view(-1)[-1] = NAN
    return t


@pytest.mark.parametrize("over,needle", [
    (dict(positive=xdit_core.api.BranchCond(nan_at((1, 4, 32)), torch.zeros(1, 32))),
     "positive conditioning holds 1 NaN or inf values of 128"),
    (dict(negative=xdit_core.api.BranchCond(torch.zeros(1, 4, 32), torch.full((1, 32), INF))),
     "negative pooled conditioning holds 32 NaN"),
    (dict(latent=nan_at((1, 16, 8, 8))), "latent holds 1 NaN or inf values of 1024"),
    (dict(latent=torch.zeros(16, 8, 8)), "latent has shape [16, 8, 8], expected 4 dims"),
    (dict(seed=-1), "seed must be an integer in 0.."),
    (dict(cfg=NAN), "cfg must be a finite number, got nan"),
    (dict(guidance=INF), "guidance must be a finite number, got inf"),
    (dict(shift=NAN), "shift must be a finite number, got nan"),
    (dict(batch_index=[0, 1]), "batch_index has 2 entries but the latent has 1 images"),
], ids=["text-nan", "pooled-inf", "latent-nan", "latent-3d", "seed", "cfg", "guidance", "shift", "batch-index"])
def test_build_request_refuses_what_the_nodes_pass(tiny_models, over, needle):
    spec = xdit_core.api.describe_model(str(tiny_models["flux"]))
    zeros = xdit_core.api.BranchCond(torch.zeros(1, 4, 32), torch.zeros(1, 32))
    args = {**dict(latent=torch.zeros(1, 16, 8, 8), seed=0, steps=2, cfg=2.0, sampler="euler", scheduler="simple",
                   denoise=1.0, positive=zeros, negative=zeros), **over}
    with pytest.raises(XDiTError) as e:
        xdit_core.api.build_request(spec, args.pop("latent"), **args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_build_request_takes_numpy_batch_index(tiny_models):
    """ComfyUI's LATENT may carry numpy integers; they are valid indices."""
    import numpy as np

    spec = xdit_core.api.describe_model(str(tiny_models["flux"]))
    cond = xdit_core.api.BranchCond(torch.zeros(1, 4, 32), torch.zeros(1, 32))
    request = xdit_core.api.build_request(spec, torch.zeros(1, 16, 8, 8), seed=3, steps=2, cfg=1.0, sampler="euler",
                                          scheduler="simple", denoise=1.0, positive=cond, negative=None,
                                          batch_index=[np.int64(2)])
    third = xdit_core.api.build_request(spec, torch.zeros(3, 16, 8, 8), seed=3, steps=2, cfg=1.0, sampler="euler",
                                        scheduler="simple", denoise=1.0, positive=cond, negative=None).noise[2]
    assert torch.equal(request.noise[0], third)  # index 2's noise is the third draw of the seed
