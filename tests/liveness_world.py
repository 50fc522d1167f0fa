"""Rank functions for the fault tests (tests/test_liveness.py): spawned ranks import them by name."""
import os
import signal
import time

import torch
import torch.distributed as dist


def freeze_rank_1(rank: int, device: torch.device, payload) -> int:
    """Rank 1 freezes itself (as a stuck driver or a debugger would) once its heartbeat runs; rank 0 waits
    for it in a collective."""
    time.sleep(1.0)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.barrier()
    return rank


def record_pid_and_wait(rank: int, device: torch.device, folder: str) -> int:
    """Write this rank's pid, then wait far longer than any test."""
    with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    return rank


def raise_on_rank_1(rank: int, device: torch.device, payload) -> int:
    if rank == 1:
        raise KeyError("boom on purpose")
    dist.barrier()
    return rank


def listening_after_collectives(rank: int, device: torch.device, payload) -> list:
    """This rank's listening sockets once its gloo pairs are connected."""
    import netprobe

    dist.all_reduce(torch.ones(2))
    dist.barrier()
    return netprobe.listening([os.getpid()])
