"""Bad input gives one clear line naming the problem, exit status 2, and no traceback."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from xdit_core.cli.main import main


def run_cli(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def gen_args(model, *extra, h="64", w="64"):
    return ["generate", "--model", str(model), "--height", h, "--width", w, "--steps", "2", "--seed", "0",
            "--out", "/tmp/xdit-never-written.safetensors", *extra]


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
    "sampler": (lambda m, b, t: gen_args(m["sd3"], "--sampler", "ddim"),
                "unknown sampler 'ddim'; valid samplers: euler, euler_ancestral, heun, dpmpp_2m"),
    "scheduler": (lambda m, b, t: gen_args(m["sd3"], "--scheduler", "ddim_uniform"),
                  "unknown scheduler 'ddim_uniform'; valid schedulers: simple, normal, karras, exponential"),
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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line(capsys, tmp_path, tiny_models, bad_folders, case):
    make_argv, needle = CASES[case]
    rc, err = run_cli(capsys, make_argv(tiny_models, bad_folders, tmp_path))
    assert rc == 2
    assert "\n" not in err and err.startswith("error: "), err
    assert needle in err, err


def test_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xdit_core", "generate", "--model", str(tmp_path / "missing"),
                           "--height", "64", "--width", "64", "--steps", "2", "--seed", "0", "--out", "o"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model path not found") and "Traceback" not in proc.stderr
