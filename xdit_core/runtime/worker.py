"""One rank of the worker pool: joins the process group, loads its share of the weights once, runs
requests, reports progress and stops with all the other ranks when asked.

`RankWorker` is a plain class; the pool wraps it with `ray.remote` (a threaded actor, so that
`poll`, `ping` and `request_stop` run while `sample` does).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from xdit_core.errors import XDiTCancelled, XDiTWorkerError
from xdit_core.models.base import BranchCond
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.mesh import Mesh, ParallelConfig
from xdit_core.runtime.job import Evaluations, ModelRef, RankJob
from xdit_core.runtime.launch import Rendezvous, free_port, init_process_group
from xdit_core.sampling.preview import StepPreview
from xdit_core.sampling.request import LoraRef, SampleRequest


class RankWorker:
    """Holds one rank's process group, model and per-request state."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank = rank
        self.world_size = world_size
        self.threads = threads
        self.device = torch.device("cpu")
        self.parallel: Optional[ParallelConfig] = None
        self.attention_backend = "auto"
        self.ctx: Optional[RankContext] = None  # shared by the resident models: one mesh, one set of groups
        self.jobs: dict[ModelRef, RankJob] = {}  # the resident models (the pool decides which stay)
        self.load_count = 0  # how many times weights were read: warm requests must not add to it
        self._evaluations: Optional[tuple[str, Evaluations]] = None  # the open host-driven session
        self._preview: Optional[tuple[int, torch.Tensor]] = None  # (step, prediction) not yet taken by the host
        self._lock = threading.Lock()
        self._progress: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._job: Optional[str] = None
        self._running = False

    def info(self) -> dict[str, Any]:
        """Where this rank runs: node address and id, process id, a free port on its node."""
        # Import the model classes now, so that the load time measured in setup is the weights alone.
        from diffusers import (Flux2Transformer2DModel, FluxTransformer2DModel, HunyuanDiT2DModel,  # noqa: F401
                               PixArtTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel,
                               WanTransformer3DModel, ZImageTransformer2DModel)
        import ray

        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "port": free_port(), "rank": self.rank}

    def setup(self, rendezvous: Rendezvous, model: ModelRef, parallel: ParallelConfig,
              attention_backend: str) -> dict:
        """Join the process group, build the mesh and load the first model; returns timings in seconds and
        the model's parameter bytes on this rank."""
        t0 = time.perf_counter()
        self.device = init_process_group(self.rank, self.world_size, rendezvous)
        self.parallel, self.attention_backend = parallel, attention_backend
        if parallel.world_size > 1:
            self.ctx = RankContext(Mesh(parallel), self.device, attention_backend)
        rendezvous_s = time.perf_counter() - t0
        return {"rendezvous_s": rendezvous_s, **self.load(model, [])}

    def load(self, model: ModelRef, evict: list[ModelRef]) -> dict[str, Any]:
        """Free the `evict` models, then load `model` (every rank, in the same order: loading builds nothing
        collective, but the pool keeps all ranks' sets equal); returns its load time and parameter bytes."""
        for old in evict:
            self.jobs.pop(old, None)
        if evict:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        job = RankJob(self.rank, self.device, model, self.parallel, self.attention_backend, ctx=self.ctx)
        self.jobs[model] = job
        self.load_count += 1
        return {"load_s": job.load_s, "param_bytes": job.param_bytes}

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "load_count": self.load_count, "resident": list(self.jobs),
                "load_s": sum(j.load_s for j in self.jobs.values())}

    def memory(self) -> dict[str, Any]:
        """This rank's memory, answered while a request runs: the GPU Ray gave it (its CUDA_VISIBLE_DEVICES),
        the bytes torch has allocated and reserved there and the whole device's use, or on the CPU the process's
        resident set (`rss_bytes`, also given on a GPU)."""
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where /proc is missing
        report = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "rss_bytes": rss,
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "models": len(self.jobs)}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            report.update(allocated_bytes=torch.cuda.memory_allocated(self.device),
                          reserved_bytes=torch.cuda.memory_reserved(self.device),
                          device_used_bytes=total - free, device_total_bytes=total,
                          uuid=str(getattr(torch.cuda.get_device_properties(self.device), "uuid", "")))
        return report

    def sample(self, request: SampleRequest, job: str, model: ModelRef) -> dict[str, Any]:
        """Run one request on a resident model; every rank returns its report, rank 0 also the latent (model
        space, CPU)."""
        self.end_evaluations(None)  # a session the host never closed must not leave its LoRAs hooked
        with self._lock:
            self._job, self._progress, self._running, self._preview = job, [], True, None
            self._stop.clear()
        keep_preview = request.preview and self.rank == self.parallel.preview_rank
        preview = StepPreview() if keep_preview else None

        def step_finished(i: int, n: int) -> None:
            with self._lock:
                self._progress.append((i, n))
                if preview is not None and preview.latest is not None:
                    self._preview = (i, preview.latest)

        try:
            # Rank 0's stop flag decides for everyone (run_request), so all ranks leave at the same step.
            result = self.jobs[model].run(request, on_step=step_finished, preview=preview,
                                          should_stop=self._stop.is_set)
        except XDiTCancelled as e:
            return {"cancelled": str(e), "rank": self.rank}
        finally:
            self._running = False
        return {"samples": result["samples"], "report": result["report"], "rank": self.rank}

    def begin_evaluations(self, session: str, model: ModelRef, positive: BranchCond,
                          negative: Optional[BranchCond], loras: tuple[LoraRef, ...] = ()) -> None:
        """Open host-driven evaluations of a resident model for one prompt (closing any earlier session)."""
        self.end_evaluations(None)
        self._evaluations = (session, self.jobs[model].evaluations(positive, negative, loras))

    def evaluate(self, session: str, xc: torch.Tensor, timestep: torch.Tensor,
                 with_negative: bool) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """One evaluation on every rank; rank 0 returns the raw outputs (positive, negative or None)."""
        if self._evaluations is None or self._evaluations[0] != session:
            raise XDiTWorkerError(f"rank {self.rank}: evaluation session {session} is not open (the pool restarted?)")
        out = self._evaluations[1](xc, timestep, with_negative)
        return out if self.rank == 0 else None

    def end_evaluations(self, session: Optional[str]) -> None:
        """Close `session` (None: whichever is open), freeing its conditioning."""
        if self._evaluations is not None and session in (None, self._evaluations[0]):
            self._evaluations[1].close()
            self._evaluations = None

    def poll(self, job: str) -> tuple[list[tuple[int, int]], Optional[tuple[int, torch.Tensor]]]:
        """Steps finished so far in `job`, and the latest step's prediction of the first image if this rank
        keeps previews and has one the host has not taken yet (model space, float32, CPU)."""
        with self._lock:
            if job != self._job:
                return [], None
            latest, self._preview = self._preview, None
            steps = list(self._progress)
        return steps, None if latest is None else (latest[0], latest[1][:1].float().cpu().clone())

    def ping(self) -> int:
        """Answers while a request runs (a threaded actor): a rank that stops answering is frozen."""
        return self.rank

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
        if dist.is_initialized():
            dist.destroy_process_group()
