"""The local backend: spawn one process per rank, join them in a process group, collect their results.

Nothing listens beyond loopback: on one machine ranks meet through a FileStore in a private folder
(no store socket at all) and gloo/NCCL bind the loopback interface. A rank that fails sends its error
to the launcher, which kills the others and raises XDiTWorkerError; a rank whose heartbeat stops (a
frozen process) is declared dead after the liveness timeout; ranks die with their launcher.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch

from xdit_core.errors import XDiTError, XDiTWorkerError
from xdit_core.runtime import timeouts

COLLECTIVE_TIMEOUT = timedelta(minutes=10)
HEARTBEAT_S = 0.5


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one world meet: a FileStore file (one machine: no socket, only this user can
    open its folder) or a TCP store at `host:port` (a cluster the user named; that store is reachable
    from the network)."""

    store_file: Optional[str] = None
    host: str = ""
    port: int = 0

    @property
    def local(self) -> bool:
        return self.store_file is not None


@contextlib.contextmanager
def private_rendezvous() -> Iterator[Rendezvous]:
    """A FileStore in a fresh folder only this user can enter (mkdtemp: mode 0700), removed afterwards."""
    folder = tempfile.mkdtemp(prefix="xdit-rendezvous-")
    try:
        yield Rendezvous(store_file=os.path.join(folder, "store"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A TCP port that is free now (for a cluster's TCP rendezvous on rank 0's node)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> Optional[str]:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), None where it has none we know."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def bind_loopback() -> None:
    """Make gloo's pairs and NCCL's bootstrap listen on loopback: by default they bind the address the
    host name resolves to, which on most workstations is the network card's."""
    name = loopback_interface()
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        os.environ["NCCL_SOCKET_IFNAME"] = name


def init_process_group(rank: int, world_size: int, rendezvous: Rendezvous,
                       timeout: timedelta = COLLECTIVE_TIMEOUT) -> torch.device:
    """Join the world: NCCL on CUDA (one GPU per rank), gloo on CPU; the collective timeout set explicitly."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if rendezvous.local:
        bind_loopback()
        store = dist.FileStore(rendezvous.store_file, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{rendezvous.host}:{rendezvous.port}", rank=rank,
                                world_size=world_size, timeout=timeout)
    return device


def _die_with_parent(beats, rank: int) -> None:
    """Beat every HEARTBEAT_S and end this process when its launcher is gone.

    Linux's parent-death signal kills it at once; elsewhere the watchdog sees the launcher's sentinel
    close (multiprocessing's handle on the parent, race-free: a launcher that died before this ran is
    already seen as dead). A frozen process (SIGSTOP, a stuck driver) stops beating, which is how the
    launcher tells it from a slow one.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()

    def watch() -> None:
        while True:
            if parent is None or not parent.is_alive():
                os._exit(1)
            beats[rank] = time.monotonic()
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=watch, name="xdit-heartbeat", daemon=True).start()


def error_report(e: BaseException) -> tuple[str, str]:
    """A rank's failure for the host: one line (its exception) and the traceback, kept as details."""
    line = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return line, traceback.format_exc()


def _rank_main(rank: int, world_size: int, rendezvous: Rendezvous, threads: int, fn: Callable, payload: Any,
               results, beats) -> None:
    import torch.distributed as dist

    _die_with_parent(beats, rank)
    try:
        torch.set_num_threads(threads)
        device = init_process_group(rank, world_size, rendezvous)
        # As bytes: a tensor sent as such is shared through a file descriptor that dies with this process,
        # which may exit before the launcher reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, device, payload), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher, not a dead console
        results.put((rank, "error", (*error_report(e), isinstance(e, XDiTError))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stalled(procs, beats, started: float, done: dict) -> Optional[str]:
    """Why the world cannot finish, if it cannot: a rank that exited without a result, or one that stopped
    beating (frozen) or never started."""
    dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
    if dead:
        return f"ranks {dead} exited with codes {[procs[r].exitcode for r in dead]} and no result"
    now = time.monotonic()  # one system-wide clock for every process (a wall-clock step must not kill ranks)
    for r, p in enumerate(procs):
        if r in done:
            continue
        if beats[r] == 0.0:
            if time.monotonic() - started > timeouts.startup_timeout_s():
                return (f"rank {r} (pid {p.pid}) did not start within {timeouts.startup_timeout_s():g}s "
                        "(XDIT_STARTUP_TIMEOUT_S)")
        elif now - beats[r] > timeouts.liveness_timeout_s():
            return (f"rank {r} (pid {p.pid}) stopped responding: no heartbeat for {now - beats[r]:.1f}s "
                    f"(limit {timeouts.liveness_timeout_s():g}s, XDIT_LIVENESS_TIMEOUT_S)")
    return None


def spawn_world(fn: Callable[[int, torch.device, Any], Any], world_size: int, payload: Any, threads: int,
                timeout_s: float = 1800.0) -> list[Any]:
    """Run `fn(rank, device, payload)` on `world_size` fresh processes; returns their results by rank.

    `fn` must be importable (a module-level function): processes are started with `spawn`. Whatever
    ends the wait (a failure, a frozen rank, the deadline, Ctrl-C), no rank outlives this call.
    """
    timeouts.liveness_timeout_s(), timeouts.startup_timeout_s()  # a malformed setting fails before any spawn
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    beats = ctx.Array("d", world_size, lock=False)  # each rank's last heartbeat (time.monotonic()), 0 before it starts
    with private_rendezvous() as rendezvous:
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # children read it at start
        procs: list = []
        out: dict[int, Any] = {}
        error: Optional[tuple[str, str]] = None
        try:
            try:
                for r in range(world_size):
                    procs.append(ctx.Process(target=_rank_main, daemon=True,
                                             args=(r, world_size, rendezvous, threads, fn, payload, results, beats)))
                    procs[-1].start()
            finally:
                if env_threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = env_threads
            started = time.monotonic()
            while len(out) < world_size and error is None:
                try:
                    rank, status, value = results.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    reason = _stalled(procs, beats, started, out)
                    if reason is None and time.monotonic() - started > timeout_s:
                        missing = sorted(set(range(world_size)) - set(out))
                        reason = f"no result from ranks {missing} within {timeout_s:.0f}s"
                    if reason is not None:
                        error = (reason, "")
                    continue
                if status == "error":
                    line, details, ours = value
                    hint = "" if ours else " (the rank's traceback is in the error's details; XDIT_DEBUG=1 prints it)"
                    error = (f"rank {rank} failed: {line}{hint}", details)
                else:
                    out[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            if error is None and len(out) == world_size:  # every rank answered: give them time to leave cleanly
                for p in procs:
                    p.join(timeout=30)
            for p in procs:  # SIGKILL: reaches a frozen (SIGSTOPped) rank too
                if p.is_alive():
                    p.kill()
                p.join()
            results.close()
    if error is not None:
        raise XDiTWorkerError(*error)
    return [out[r] for r in range(world_size)]
