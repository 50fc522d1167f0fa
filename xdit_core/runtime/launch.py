"""The local backend: spawn one process per rank, join them in a process group, collect their results.

A rank that fails sends its traceback to the launcher, which stops the others and raises
XDiTWorkerError; a rank that hangs is stopped after `timeout_s`.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch

from xdit_core.errors import XDiTWorkerError

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def free_port() -> int:
    """A free TCP port on loopback for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, host: str = "127.0.0.1",
                       timeout: timedelta = COLLECTIVE_TIMEOUT) -> torch.device:
    """Join the world: NCCL on CUDA (one GPU per rank), gloo on CPU; the collective timeout set explicitly."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=timeout)
    return device


def _rank_main(rank: int, world_size: int, port: int, threads: int, fn: Callable, payload: Any, results) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        device = init_process_group(rank, world_size, port)
        # As bytes: a tensor sent as such is shared through a file descriptor that dies with this process,
        # which may exit before the launcher reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, device, payload), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the launcher, not a dead console
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_world(fn: Callable[[int, torch.device, Any], Any], world_size: int, payload: Any, threads: int,
                timeout_s: float = 1800.0) -> list[Any]:
    """Run `fn(rank, device, payload)` on `world_size` fresh processes; returns their results by rank.

    `fn` must be importable (a module-level function): processes are started with `spawn`.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # children read it at start
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, threads, fn, payload, results),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    out: dict[int, Any] = {}
    error: Optional[str] = None
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size and error is None:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    error = f"ranks {dead} exited with codes {[procs[r].exitcode for r in dead]} and no result"
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    error = f"no result from ranks {missing} within {timeout_s:.0f}s"
                continue
            if status == "error":
                error = f"rank {rank} failed:\n{value}"
            else:
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.terminate()
            p.join(timeout=30)
    if error is not None:
        raise XDiTWorkerError(error)
    return [out[r] for r in range(world_size)]
