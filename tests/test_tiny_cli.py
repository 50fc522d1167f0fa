"""`python -m xdit_core tiny` never destroys data: it refuses an existing file or non-empty folder (a folder only
yields to --force), writes aside and renames into place, and refuses unusable sizes before building anything."""
import errno
import hashlib
from pathlib import Path

import diffusers  # noqa: F401  (imported here, so its import-time warnings are not in a test's stderr)
import pytest

from xdit_core.api import describe_model
from xdit_core.cli import tiny
from xdit_core.cli.main import main


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `python -m xdit_core tiny ...`, in-process."""
    rc = main(["tiny", *argv])
    return rc, capsys.readouterr().err.splitlines()


def assert_one_error(rc: int, err: list[str], *needles: str) -> None:
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (itself included in the names) with its content hash; folders as 'dir'."""
    return {p.relative_to(folder.parent).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in [folder, *folder.rglob("*")]}


@pytest.fixture()
def model(tmp_path, capsys):
    """A tiny SD3 folder written by the CLI, plus a file of the user's beside its weights."""
    out = tmp_path / "model"
    assert run(capsys, "--family", "sd3", "--out", str(out), "--seed", "1") == (0, [])
    (out / "notes.txt").write_text("mine")
    return out


def test_existing_model_folder_is_left_byte_identical(model, capsys):
    before = snapshot(model.parent)
    rc, err = run(capsys, "--family", "flux", "--out", str(model), "--seed", "2")
    assert_one_error(rc, err, str(model), "not empty", "--force")
    assert snapshot(model.parent) == before  # and no temporary sibling was left


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_existing_file_is_left_byte_identical_even_with_force(tmp_path, capsys, force):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"someone's weights")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "--family", "sd3", "--out", str(target), *force)
    assert_one_error(rc, err, str(target), "is a file", "even with --force")
    assert snapshot(tmp_path) == before


def test_empty_existing_folder_is_filled(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, err = run(capsys, "--family", "pixart", "--variant", "sigma", "--out", str(out))
    assert (rc, err) == (0, [])
    assert (describe_model(str(out)).family, describe_model(str(out)).variant) == ("pixart", "sigma")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_force_refuses_a_folder_that_holds_more_than_a_model(model, capsys):
    before = snapshot(model.parent)
    rc, err = run(capsys, "--family", "flux", "--out", str(model), "--force")
    assert_one_error(rc, err, str(model), "holds more than a model")
    assert snapshot(model.parent) == before


def test_force_replaces_the_whole_folder(model, capsys):
    (model / "notes.txt").unlink()  # now only what tiny wrote: a model folder to refresh
    old_weights = (model / "diffusion_pytorch_model.safetensors").read_bytes()
    rc, err = run(capsys, "--family", "flux", "--out", str(model), "--force", "--seed", "2")
    assert (rc, err) == (0, [])
    assert describe_model(str(model)).family == "flux"
    assert not (model / "notes.txt").exists()
    assert (model / "diffusion_pytorch_model.safetensors").read_bytes() != old_weights
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]  # nothing set aside is left


class FailingModel:
    """save_pretrained writes part of a model, then the disk fills up."""

    def save_pretrained(self, folder, safe_serialization):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "forced-over-existing"])
def test_a_failed_write_leaves_nothing_half_written(model, capsys, monkeypatch, existing):
    monkeypatch.setattr(tiny, "build_tiny", lambda *a, **k: FailingModel())
    (model / "notes.txt").unlink()  # --force replaces only a model folder
    out = model if existing else model.parent / "new"
    before = snapshot(model.parent)
    rc, err = run(capsys, "--family", "sd3", "--out", str(out), "--force")
    assert_one_error(rc, err, f"cannot write --out {out}", "No space left on device")
    assert snapshot(model.parent) == before


def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, err = run(capsys, "--family", "sd3", "--out", str(tmp_path / "file" / "model"))
    assert_one_error(rc, err, "cannot write --out")


@pytest.mark.parametrize("args,needle", [
    (["--family", "flux", "--variant", "sigma"], "--variant 'sigma' is not a flux variant; valid: dev, schnell"),
    (["--family", "pixart", "--variant", "dev"], "--variant 'dev' is not a pixart variant; valid: alpha, sigma"),
    (["--family", "sd3", "--variant", "schnell"], "--variant 'schnell' is not a sd3 variant; valid: sd3"),
    (["--family", "hunyuan"], "unknown family 'hunyuan'"),
    (["--family", "wan", "--variant", "dev"], "--variant 'dev' is not a wan variant; valid: t2v, i2v, ti2v"),
    (["--family", "wan", "--heads", "2", "--hidden-size", "20"], "Wan head size 10 (hidden size / heads) must be"),
    (["--family", "sd3", "--preset", "huge"], "unknown preset 'huge'"),
    (["--family", "sd3", "--layers", "0"], "--layers must be at least 1, got 0"),
    (["--family", "flux", "--layers", "-3"], "--layers must be at least 1, got -3"),
    (["--family", "sd3", "--heads", "0"], "--heads must be at least 1, got 0"),
    (["--family", "pixart", "--hidden-size", "0"], "--hidden-size must be at least 1, got 0"),
    (["--family", "sd3", "--hidden-size", "30"], "--hidden-size 30 must be a multiple of --heads 4"),
    (["--family", "flux", "--heads", "4", "--hidden-size", "16"], "Flux head size 4 (hidden size / heads) must be"),
    (["--family", "flux", "--heads", "2", "--hidden-size", "20"], "Flux head size 10"),
    (["--family", "sd3", "--heads", "3", "--hidden-size", "18"], "sd3 hidden size 18 must be a multiple of 4"),
    (["--family", "pixart", "--variant", "sigma", "--heads", "2", "--hidden-size", "6"],
     "pixart hidden size 6 must be a multiple of 4"),
    (["--family", "pixart", "--heads", "2", "--hidden-size", "16"],
     "PixArt-alpha hidden size 16 must be a multiple of 3"),
    (["--family", "flux", "--hidden-size", "65536"], "GiB in fp32; tiny builds at most"),
    (["--family", "sd3", "--layers", "100000000"], "GiB in fp32; tiny builds at most"),
])
def test_unusable_variants_and_sizes_are_refused_before_building(tmp_path, capsys, args, needle):
    rc, err = run(capsys, *args, "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []  # not even the temporary folder: refused before the build


@pytest.mark.parametrize("family,kwargs", [("flux", dict(layers=3)), ("sd3", dict(layers=5)),
                                           ("pixart", dict(layers=2, variant="sigma"))])
def test_the_size_bound_counts_exact_parameters(family, kwargs):
    """The bound's count (models of one and two blocks, on the meta device) is the built model's."""
    config = tiny.tiny_config(family, **kwargs)
    built = sum(p.numel() for p in tiny.build_tiny(family, **kwargs).parameters())
    assert tiny.param_count(family, config) == built


def test_the_size_bound_is_applied(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tiny, "MAX_WEIGHT_BYTES", 2**20)
    rc, err = run(capsys, "--family", "flux", "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, "a flux model of 613,824 parameters, 2.3 MiB in fp32", "at most 1.0 MiB")
    assert run(capsys, "--family", "sd3", "--layers", "1", "--heads", "2", "--hidden-size", "32",
               "--out", str(tmp_path / "small")) == (0, [])
