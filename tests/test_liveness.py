"""Faults of the local backend and of the inputs a run cannot detect before it starts: a frozen rank, a
killed launcher, a rank that raises, a model that computes NaN; and what its ranks listen on."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import liveness_world
import netprobe
from xdit_core.cli.main import main
from xdit_core.errors import XDiTWorkerError
from xdit_core.runtime.launch import spawn_world

TESTS = Path(__file__).parent


def test_local_ranks_listen_on_loopback_only():
    """FileStore rendezvous (no store socket) and gloo bound to loopback: a TCPStore, which binds every
    interface whatever host it is given, would show up here as 0.0.0.0."""
    per_rank = spawn_world(liveness_world.listening_after_collectives, 2, None, threads=1, timeout_s=120)
    sockets = [s for rank in per_rank for s in rank]
    assert sockets, "gloo's pairs listen somewhere: the scan must see them"
    assert all(netprobe.is_loopback(addr) for _, addr, _ in sockets), sockets


def test_frozen_rank_is_named_within_the_liveness_timeout(monkeypatch):
    monkeypatch.setenv("XDIT_LIVENESS_TIMEOUT_S", "3")
    before = netprobe.descendants(os.getpid())
    t0 = time.monotonic()
    with pytest.raises(XDiTWorkerError, match=r"rank 1 \(pid \d+\) stopped responding: no heartbeat for 3\.\d+s"):
        spawn_world(liveness_world.freeze_rank_1, 2, None, threads=1, timeout_s=300)
    assert time.monotonic() - t0 < 30  # spawn and imports take seconds here; the collective timeout is 10 min
    assert not [p for p in netprobe.descendants(os.getpid()) - before if netprobe.alive(p)]


def test_a_rank_that_raises_fails_the_run_in_one_line_with_the_traceback_kept():
    with pytest.raises(XDiTWorkerError) as e:
        spawn_world(liveness_world.raise_on_rank_1, 2, None, threads=1, timeout_s=120)
    assert str(e.value).splitlines()[0].startswith("rank 1 failed: KeyError: 'boom on purpose'")
    assert len(str(e.value).splitlines()) == 1
    assert "Traceback" in e.value.details and "raise_on_rank_1" in e.value.details


def test_ranks_die_with_their_launcher(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    launcher = subprocess.Popen([sys.executable, str(TESTS / "launch_and_wait.py"), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        assert all(netprobe.alive(p) for p in pids)
        launcher.kill()  # SIGKILL: no cleanup runs in the launcher
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(netprobe.alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if netprobe.alive(p)], "ranks outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tiny_models):
    """The tiny SD3 with one NaN in its output projection, as a corrupt or overflowed file would have."""
    folder = tmp_path_factory.mktemp("nan_model")
    for f in tiny_models["sd3"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["proj_out.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    return folder


@pytest.mark.parametrize("mesh, rank", [([], "0"), (["--pipefusion_parallel_degree", "2"], "1")],
                         ids=["serial", "pipefusion2"])  # the two places that check: the denoiser, the last stage
def test_nan_in_the_weights_fails_at_step_1_naming_the_rank(nan_model, tmp_path, capsys, mesh, rank):
    out = tmp_path / "out.safetensors"
    rc = main(["generate", "--model", str(nan_model), "--height", "64", "--width", "64", "--steps", "2",
               "--seed", "0", "--threads", "1", "--out", str(out), *mesh])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(rf"prediction at step 1 of 2 on rank {rank} contains NaN or inf", err), err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("address, needle", [
    ("127.0.0.1:{free}", "does not answer within 1s (XDIT_CONNECT_TIMEOUT_S)"),  # nothing listens there
    ("192.0.2.1:6379", "does not answer within 1s (XDIT_CONNECT_TIMEOUT_S)"),  # TEST-NET-1: never answers
    ("http://head:6379", "is not host:port"),
    ("head:99999", "is not host:port"),
], ids=["refused", "unreachable", "scheme", "port"])
def test_cluster_address_fails_in_time_before_ray_starts(tiny_models, tmp_path, capsys, monkeypatch, address, needle):
    import ray

    from xdit_core.runtime.launch import free_port

    monkeypatch.setenv("XDIT_CONNECT_TIMEOUT_S", "1")
    was_up = ray.is_initialized()
    t0 = time.monotonic()
    rc = main(["generate", "--model", str(tiny_models["sd3"]), "--height", "64", "--width", "64", "--steps", "2",
               "--seed", "0", "--backend", "ray", "--ray_address", address.format(free=free_port()),
               "--out", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert time.monotonic() - t0 < 5
    assert ray.is_initialized() == was_up and not list(tmp_path.iterdir())
