"""The pool with no cluster address (the default of every ComfyUI user): what it exposes to the network,
and how it ends a request whose rank froze or that a cancel cannot stop at a step boundary.

One local 2-rank pool (ulysses 2) serves the module; the fault tests rebuild it, as a user's next prompt would.
"""
import os
import signal
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("grpc")

import netprobe  # noqa: E402
from xdit_core.errors import XDiTCancelled, XDiTWorkerError  # noqa: E402
from xdit_core.loading.load import load_model  # noqa: E402
from xdit_core.models.conditioning import random_cond  # noqa: E402
from xdit_core.parallel.mesh import ParallelConfig  # noqa: E402
from xdit_core.runtime import pool as pool_mod  # noqa: E402
from xdit_core.sampling.request import build_request, empty_latent  # noqa: E402

MESH = ParallelConfig(ulysses_degree=2)


@pytest.fixture(scope="module")
def local_pool(tiny_models):
    """A fresh local Ray (no address anywhere) and a warm 2-rank pool on it."""
    saved = os.environ.pop("XDIT_RAY_ADDRESS", None)
    pool_mod.unload()
    ray.shutdown()
    key = pool_mod.PoolKey(str(tiny_models["flux"]), "fp32", None, None, MESH, "auto", 1)
    pool = pool_mod.get_pool(key)
    yield pool
    pool_mod.unload()
    ray.shutdown()
    if saved is not None:
        os.environ["XDIT_RAY_ADDRESS"] = saved


def make_request(tiny_models, steps):
    _, spec = load_model(tiny_models["flux"])
    pos, _ = random_cond(spec, 1, 0, False)
    return build_request(spec, empty_latent(spec, 1, 64, 48), seed=1, steps=steps, cfg=1.0, sampler="euler",
                         scheduler="simple", denoise=1.0, positive=pos, negative=None)


def test_every_port_beyond_loopback_refuses_a_client_without_the_token(local_pool, tiny_models):
    """Ray serves on every interface (it replaces a loopback node address with the machine's); each of its
    ports must turn away a client that lacks the token (and serve one that has it, so the probe is
    real). The ranks' torch.distributed store and gloo pairs stay on loopback."""
    assert torch.isfinite(local_pool.sample(make_request(tiny_models, 2))).all()
    sockets = netprobe.listening(netprobe.descendants(os.getpid()))
    rank_pids = {info["pid"] for info in local_pool.infos}
    assert rank_pids <= {pid for pid, _, _ in sockets}, "the scan must see the ranks' sockets"
    token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    exposed = [(pid, addr, port) for pid, addr, port in sockets if not netprobe.is_loopback(addr)]
    assert exposed, "a local Ray listens beyond loopback: if that changed, this test should say loopback only"
    for pid, addr, port in exposed:
        host = netprobe.reachable_address(addr)
        anonymous = netprobe.grpc_codes(host, port)
        refused = [m for m, code in anonymous.items() if code == "UNAUTHENTICATED"]
        if refused:
            with_token = netprobe.grpc_codes(host, port, token)
            assert all(with_token[m] != "UNAUTHENTICATED" for m in refused), (pid, port, with_token)
        else:
            status = netprobe.http_status(host, port)
            assert status in (401, 403), f"pid {pid} serves {addr}:{port} to anyone: gRPC {anonymous}, HTTP {status}"
    if hasattr(os, "stat"):
        assert os.stat(os.path.expanduser("~/.ray/auth_token")).st_mode & 0o077 == 0


def _freeze(pool, rank, frozen):
    def on_progress(i, n):
        if not frozen:
            os.kill(pool.infos[rank]["pid"], signal.SIGSTOP)
            frozen.append(time.monotonic())
    return on_progress


def test_frozen_rank_fails_the_request_naming_it_and_the_pool_recovers(local_pool, tiny_models, monkeypatch):
    """Rank 0 frozen: also the rank the host asks for progress, which must not block the wait."""
    monkeypatch.setenv("XDIT_LIVENESS_TIMEOUT_S", "3")
    pool = local_pool
    victim, frozen = pool.infos[0]["pid"], []
    with pytest.raises(XDiTWorkerError, match=r"rank 0 \(pid \d+\) stopped responding: no answer for 3\.\d+s"):
        pool.sample(make_request(tiny_models, 500), on_progress=_freeze(pool, 0, frozen))
    assert time.monotonic() - frozen[0] < 10
    deadline = time.monotonic() + 10
    while netprobe.alive(victim) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not netprobe.alive(victim), "the frozen rank must be killed, not left stopped"
    assert torch.isfinite(pool.sample(make_request(tiny_models, 2))).all()
    assert victim not in [i["pid"] for i in pool.infos]


def test_cancel_reaches_a_request_stuck_in_a_collective(local_pool, tiny_models, monkeypatch):
    """Rank 1 frozen, the liveness limit far away: the cancel's grace period ends the request, so ComfyUI's
    queue moves on, and the next request runs on a rebuilt pool."""
    monkeypatch.setenv("XDIT_LIVENESS_TIMEOUT_S", "120")
    monkeypatch.setenv("XDIT_CANCEL_GRACE_S", "2")
    pool = local_pool
    victim, frozen = pool.infos[1]["pid"], []
    with pytest.raises(XDiTCancelled, match="did not stop within 2s"):
        pool.sample(make_request(tiny_models, 500), on_progress=_freeze(pool, 1, frozen),
                    cancel=lambda: bool(frozen))
    assert time.monotonic() - frozen[0] < 10
    assert torch.isfinite(pool.sample(make_request(tiny_models, 2))).all()
    assert victim not in [i["pid"] for i in pool.infos]
