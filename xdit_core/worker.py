"""One rank of the worker pool: joins the process group, loads its share of the weights once, runs
requests, reports progress and stops with all the other ranks when asked.

`RankWorker` is a plain class; the pool wraps it with `ray.remote` (a threaded actor, so that
`progress` and `request_stop` run while `sample` does).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import torch

from .errors import XDiTCancelled


class RankWorker:
    """Holds one rank's process group, model and per-request state."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank = rank
        self.world_size = world_size
        self.threads = threads
        self.device = torch.device("cpu")
        self.adapter = None
        self.ctx = None
        self.load_count = 0  # how many times weights were read: warm requests must not add to it
        self.load_s = 0.0
        self._lock = threading.Lock()
        self._progress: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._job: Optional[str] = None
        self._running = False

    def info(self) -> dict[str, Any]:
        """Where this rank runs: node address and id, process id, a free port on its node."""
        # Import the model classes now, so that the load time measured in setup is the weights alone.
        from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel  # noqa: F401
        import ray

        from .launch import free_port

        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "port": free_port(), "rank": self.rank}

    def setup(self, master_addr: str, port: int, model: dict[str, Any], parallel, attention_backend: str) -> dict:
        """Join the process group, build the mesh and load the weights; returns timings in seconds."""
        from .launch import init_process_group
        from .loading import load_model
        from .mesh import Mesh
        from .models import make_adapter
        from .rank_context import RankContext
        from .stages import pipefusion_parts

        t0 = time.perf_counter()
        self.device = init_process_group(self.rank, self.world_size, port, host=master_addr)
        mesh = Mesh(parallel)
        t1 = time.perf_counter()
        parts = pipefusion_parts(model["path"], model.get("family"), model.get("variant"), parallel, self.rank)
        net, spec = load_model(model["path"], model["dtype"], model.get("family"), model.get("variant"),
                               parts=parts, device=self.device)
        self.adapter = make_adapter(net, spec)
        self.ctx = RankContext(mesh, self.device, attention_backend)
        self.load_count += 1
        self.load_s = time.perf_counter() - t1
        return {"rendezvous_s": t1 - t0, "load_s": self.load_s}

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "load_count": self.load_count, "load_s": self.load_s}

    def sample(self, request, job: str) -> dict[str, Any]:
        """Run one request; every rank returns its report, rank 0 also the latent (model space, CPU)."""
        import torch.distributed as dist

        from .comm import CommCounter
        from .engine import run_request
        from .generate import rank_report

        with self._lock:
            self._job, self._progress, self._running = job, [], True
            self._stop.clear()
        self.ctx.counter = CommCounter()
        step_s: list[float] = []

        def at_step_boundary(i: int, n: int) -> None:
            with self._lock:
                self._progress.append((i, n))
            # Rank 0's stop flag decides for everyone, so all ranks leave at the same step.
            flag = torch.tensor([1 if self._stop.is_set() else 0], device=self.device)
            if self.world_size > 1:
                dist.broadcast(flag, src=0)
            if flag.item() and i < n:
                raise XDiTCancelled(f"cancelled after step {i} of {n}")

        try:
            out = run_request(self.adapter, request, on_step=at_step_boundary, step_seconds=step_s, ctx=self.ctx)
        except XDiTCancelled as e:
            return {"cancelled": str(e), "rank": self.rank}
        finally:
            self._running = False
        param_bytes = sum(p.numel() * p.element_size() for p in self.adapter.model.parameters()
                          if not p.is_meta)
        report = rank_report(self.rank, self.ctx.mesh.config, param_bytes, step_s, self.ctx.counter,
                             self.ctx.effective_patches)
        return {"samples": out.cpu() if self.rank == 0 else None, "report": report, "rank": self.rank}

    def progress(self, job: str) -> list[tuple[int, int]]:
        """Steps finished so far in `job` (empty for another job)."""
        with self._lock:
            return list(self._progress) if job == self._job else []

    def busy(self) -> bool:
        """Whether a request is running on this rank."""
        return self._running

    def request_stop(self, job: str) -> None:
        """Ask the running `job` to stop at the next step boundary."""
        with self._lock:
            if job == self._job:
                self._stop.set()

    def shutdown(self) -> None:
        """Leave the process group so the actor can exit cleanly."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
