"""Runs inside every rank of the one spawned world the parallel tests share (see test_parallel.py)."""
import torch

from xdit_core.engine import run_request
from xdit_core.loading import load_model
from xdit_core.mesh import Mesh
from xdit_core.models import make_adapter
from xdit_core.rank_context import RankContext


def run_cases(rank: int, device: torch.device, cases: list) -> dict:
    """Each case: (name, model path, ParallelConfig, ring_impl, SampleRequest). Ranks outside a case's mesh wait."""
    adapters, results = {}, {}
    for name, path, config, ring_impl, request in cases:
        if path not in adapters:
            model, spec = load_model(path)
            adapters[path] = make_adapter(model, spec)
        mesh = Mesh(config, list(range(config.world_size)))  # collective: every rank builds every mesh
        if not mesh.is_member:
            continue
        ctx = RankContext(mesh, device, ring_impl=ring_impl)
        out = run_request(adapters[path], request, ctx=ctx)
        if rank == 0:
            results[name] = {"out": out, "total": dict(ctx.counter.total), "per_step": ctx.counter.per_step}
    return results
