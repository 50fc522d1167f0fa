"""Rank-side code of the CPU scaling benchmark (importable by spawned processes)."""
import time

import torch
import torch.distributed as dist

from xdit_core.engine import run_request
from xdit_core.loading import load_model
from xdit_core.mesh import Mesh
from xdit_core.models import make_adapter
from xdit_core.rank_context import RankContext


def run(rank: int, device: torch.device, payload) -> dict:
    """For each repeat and config (ParallelConfig, ring_impl): member ranks run it, the others wait."""
    path, request, configs, repeats = payload
    model, spec = load_model(path)
    adapter = make_adapter(model, spec)
    meshes = {name: Mesh(cfg, list(range(cfg.world_size))) for name, (cfg, _) in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    run_request(adapter, request)  # warm-up: first-call allocations and kernel selection
    for rep in range(repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))  # balance drift
        for name in order:
            dist.barrier()
            mesh = meshes[name]
            if mesh.is_member:
                steps: list[float] = []
                cfg, ring_impl = configs[name]
                ctx = RankContext(mesh, device, ring_impl=ring_impl) if cfg.world_size > 1 else None
                t0 = time.perf_counter()
                run_request(adapter, request, step_seconds=steps, ctx=ctx)
                times[name].append(time.perf_counter() - t0)
            dist.barrier()
    return times
