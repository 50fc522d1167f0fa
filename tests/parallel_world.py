"""Runs inside every rank of the one spawned world the parallel tests share (see test_parallel.py)."""
import torch

from xdit_core.runtime.job import run_request
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import Mesh
from xdit_core.models import make_adapter
from xdit_core.parallel.context import RankContext


def run_cases(rank: int, device: torch.device, cases: list) -> dict:
    """Each case: (name, model path, ParallelConfig, ring_impl, SampleRequest). Ranks outside a case's mesh wait.

    Returns this rank's results by case; the latent only from rank 0.
    """
    adapters, results = {}, {}
    for name, path, config, ring_impl, request in cases:
        mesh = Mesh(config, list(range(config.world_size)))  # collective: every rank builds every mesh
        if not mesh.is_member:
            continue
        if config.pipefusion_parallel_degree > 1:  # PipeFusion frees the other stages' blocks: fresh model
            adapter = make_adapter(*load_model(path))
        else:
            if path not in adapters:
                adapters[path] = make_adapter(*load_model(path))
            adapter = adapters[path]
        ctx = RankContext(mesh, device, ring_impl=ring_impl)
        out = run_request(adapter, request, ctx=ctx)
        results[name] = {
            "out": out if rank == 0 else None, "total": dict(ctx.counter.total), "per_step": ctx.counter.per_step,
            "param_bytes": sum(p.numel() * p.element_size() for p in adapter.model.parameters() if not p.is_meta),
            "effective_patches": ctx.effective_patches, "coords": mesh.coords,
        }
    return results


def run_mismatched(rank: int, device: torch.device, payload) -> None:
    """PipeFusion 2 where each stage gets a different request (an injected schedule mismatch)."""
    from xdit_core.parallel.mesh import ParallelConfig

    path, requests = payload
    mesh = Mesh(ParallelConfig(pipefusion_parallel_degree=2))
    run_request(make_adapter(*load_model(path)), requests[rank], ctx=RankContext(mesh, device))
