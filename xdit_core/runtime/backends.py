"""Where a request's ranks run: in this process (a mesh of one), freshly spawned local processes, a world
launched by torchrun (this process is one of its ranks), or the warm Ray worker pool. Every rank runs the
same `RankJob`; each backend returns rank 0's latent, the weight-load time and every rank's report."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.runtime import launch, pool
from xdit_core.runtime.job import ModelRef, RankJob
from xdit_core.sampling.request import SampleRequest

BACKENDS = ("local", "ray", "env")


@dataclass
class RunResult:
    """Rank 0's final latent in the model's space (None on the other ranks of a torchrun world), the
    slowest rank's weight-load seconds, and every rank's report (runtime/report.py)."""

    samples: Optional[torch.Tensor]
    load_s: float
    reports: list[dict[str, Any]]


def _spawned_rank(rank: int, device: torch.device, payload: tuple) -> dict[str, Any]:
    model, parallel, attention_backend, request = payload
    return RankJob(rank, device, model, parallel, attention_backend).run(request)


def _torchrun_rank(model: ModelRef, parallel: ParallelConfig, attention_backend: str, request: SampleRequest,
                   threads: int) -> RunResult:
    """This process is one rank of a world launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != parallel.world_size:
        raise XDiTConfigError(f"--backend env: WORLD_SIZE is {world or 'unset'} but the mesh "
                              f"({parallel.describe()}) needs {parallel.world_size}; launch with "
                              f"torchrun --nproc_per_node {parallel.world_size}")
    torch.set_num_threads(threads)
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        result = RankJob(rank, device, model, parallel, attention_backend).run(request)
        reports: list = [None] * world
        dist.all_gather_object(reports, result["report"])
        loads: list = [None] * world
        dist.all_gather_object(loads, result["load_s"])
        dist.barrier()  # every rank has its data before any closes its connections
    finally:
        dist.destroy_process_group()
    return RunResult(result["samples"], max(loads), reports)


def run(backend: str, model: ModelRef, parallel: ParallelConfig, request: SampleRequest, threads: int,
        attention_backend: str = "auto", ray_address: Optional[str] = None) -> RunResult:
    """Run `request` on `backend` ("local": in-process for one rank, else spawned processes; "env": torchrun;
    "ray": the warm pool)."""
    if backend == "ray":
        workers = pool.get_pool(pool.PoolKey(model.path, model.dtype, model.family, model.variant, parallel,
                                             attention_backend, threads, model.keep_fp8), ray_address)
        samples = workers.sample(request)
        return RunResult(samples, workers.stats.load_s, workers.stats.last_reports)
    if backend == "env":
        return _torchrun_rank(model, parallel, attention_backend, request, threads)
    if backend != "local":
        raise XDiTConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if parallel.world_size == 1:
        torch.set_num_threads(threads)
        result = RankJob(0, torch.device("cpu"), model, parallel, attention_backend).run(request)
        return RunResult(result["samples"], result["load_s"], [result["report"]])
    payload = (model, parallel, attention_backend, request)
    results = launch.spawn_world(_spawned_rank, parallel.world_size, payload, threads)
    return RunResult(results[0]["samples"], max(r["load_s"] for r in results), [r["report"] for r in results])
