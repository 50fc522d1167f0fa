"""Runs inside every rank of the spawned world of test_nccl_semantics.py: the engine's multi-rank paths in
native and emulated-NCCL point-to-point semantics, and negative controls that the emulation must catch."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from xdit_core.errors import XDiTCancelled, XDiTWorkerError
from xdit_core.loading.load import load_model
from xdit_core.models import make_adapter
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.mesh import Mesh
from xdit_core.parallel.p2p import P2PChannel, P2POp, P2PSession, join_workers
from xdit_core.parallel.pipefusion import PipeFusionRunner
from xdit_core.runtime.job import run_request

BIG = 3 * 1024 * 1024  # float32 elements: 12 MiB messages (NCCL's eager protocol never applies to these)


def _run(rank, device, name, path, config, ring_impl, request, semantics, timeout_s, cancel_after=None) -> dict:
    """One case on the first ranks; `cancel_after`: rank 0 asks to stop once it has finished that many steps
    (the engine's cancel: every rank raises XDiTCancelled before the same step)."""
    mesh = Mesh(config, list(range(config.world_size)))  # collective: every rank builds every mesh
    if not mesh.is_member:
        return {}
    ctx = RankContext(mesh, device, ring_impl=ring_impl, p2p_semantics=semantics, p2p_timeout_s=timeout_s)
    finished: list[int] = []
    should_stop = None if cancel_after is None else lambda: len(finished) >= cancel_after

    t0 = time.perf_counter()
    try:
        out = run_request(make_adapter(*load_model(path)), request, on_step=lambda i, n: finished.append(i),
                          ctx=ctx, should_stop=should_stop)
    except (XDiTWorkerError, XDiTCancelled) as e:
        first = f" (raised while handling: {e.__context__})" if e.__context__ is not None else ""
        return {name: {"error": f"{type(e).__name__}: {e}{first}", "seconds": time.perf_counter() - t0,
                       "per_step": ctx.counter.per_step}}
    return {name: {"out": out if rank == 0 else None, "per_step": ctx.counter.per_step,
                   "seconds": time.perf_counter() - t0}}


def _single_channel(self: PipeFusionRunner, src: int, dst: int) -> P2PChannel:
    """The mutation of the negative control: both directions on the pipefusion group, as before item 3."""
    return self.pp.p2p


def _raw_controls(rank: int, timeout_s: float, control_timeout_s: float) -> dict:
    """Ranks 0 and 1: hand-written patterns on one 2-rank group, native and emulated (the patterns that
    must fail wait `control_timeout_s`)."""
    pair = dist.new_group([0, 1])  # collective over the world
    if rank > 1:
        return {}
    peer, out = 1 - rank, {}

    def attempt(name: str, semantics: str, body, timeout_s: float) -> None:
        session = P2PSession([0, 1], timeout_s) if semantics == "nccl" else None
        channel = P2PChannel(f"control {name}", pair, [0, 1], session)
        t0 = time.perf_counter()
        try:
            out[f"{name}/{semantics}"] = {"result": body(channel), "seconds": time.perf_counter() - t0}
        except XDiTWorkerError as e:
            out[f"{name}/{semantics}"] = {"error": str(e), "seconds": time.perf_counter() - t0}
        finally:
            if session is not None:
                session.close()

    def both_send_first(ch: P2PChannel):
        """Each rank sends to the other, then receives: fine on gloo, a deadlock on NCCL."""
        x, y = torch.full((BIG,), float(rank)), torch.empty(BIG)
        works = [ch.isend(x, peer, tag=5), ch.irecv(y, peer, tag=5)]
        for w in works:
            w.wait()
        return float(y[0])

    def ordered(ch: P2PChannel):
        """Rank 0 sends then receives, rank 1 receives then sends, then one batched exchange: fine on NCCL."""
        x, y, z = torch.full((BIG,), float(rank)), torch.empty(BIG), torch.empty(BIG)
        if rank == 0:
            ch.isend(x, peer, tag=1).wait()
            ch.irecv(y, peer, tag=2).wait()
        else:
            ch.irecv(y, peer, tag=1).wait()
            ch.isend(x, peer, tag=2).wait()
        for w in ch.batch_isend_irecv([P2POp("send", x, peer, 3), P2POp("recv", z, peer, 3)]):
            w.wait()
        return float(y[0]), float(z[-1])

    def tags_crossed(ch: P2PChannel):
        """Rank 0 sends tags 1 then 2; rank 1 receives tag 2 first: gloo matches by tag, NCCL by order."""
        if rank == 0:
            works = [ch.isend(torch.full((4,), 1.0), peer, tag=1), ch.isend(torch.full((4,), 2.0), peer, tag=2)]
            for w in works:
                w.wait()
            return None
        a, b = torch.empty(4), torch.empty(4)
        works = [ch.irecv(a, peer, tag=2), ch.irecv(b, peer, tag=1)]
        for w in works:
            w.wait()
        return float(a[0]), float(b[0])

    for name, body, limit in (("ordered", ordered, timeout_s), ("both_send_first", both_send_first, control_timeout_s),
                              ("tags_crossed", tags_crossed, timeout_s)):
        for semantics in ("native", "nccl"):
            attempt(name, semantics, body, limit)
    return out


def run_world(rank: int, device: torch.device, payload: dict) -> dict:
    """payload: cases (name, path, config, ring_impl, request, semantics, timeout_s), the negative controls'
    PipeFusion case and timeout, and the cases to run again after them. Returns this rank's results."""
    results: dict = {"timings": {}}
    t0 = time.perf_counter()
    for case in payload["cases"]:
        results.update(_run(rank, device, *case))
    results["timings"]["cases"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results.update(_raw_controls(rank, payload["timeout_s"], payload["control_timeout_s"]))
    original = PipeFusionRunner._channel
    PipeFusionRunner._channel = _single_channel
    try:
        for case in payload["single_group_cases"]:
            results.update(_run(rank, device, *case))
    finally:
        PipeFusionRunner._channel = original
    results["timings"]["controls"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # later runs in the same processes, while the controls' threads may still be stuck
    for case in payload["after_cases"]:
        results.update(_run(rank, device, *case))
    results["timings"]["after"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # a thread still inside gloo at exit would abort the process
    results["threads_left"] = join_workers(30.0)
    results["timings"]["join"] = time.perf_counter() - t0
    return results
