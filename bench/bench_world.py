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
    """For each repeat and config (ParallelConfig, ring_impl): member ranks run it, the others wait.

    Returns {config: {"times": [s], "bytes_per_step": rank's mean bytes sent per step}}.
    """
    path, request, configs, repeats = payload
    meshes = {name: Mesh(cfg, list(range(cfg.world_size))) for name, (cfg, _) in configs.items()}
    shared = make_adapter(*load_model(path))
    # PipeFusion frees the blocks of other stages, so each PipeFusion config gets its own copy.
    adapters = {name: make_adapter(*load_model(path)) if cfg.pipefusion_parallel_degree > 1 else shared
                for name, (cfg, _) in configs.items() if meshes[name].is_member}
    out = {name: {"times": [], "bytes_per_step": 0.0} for name in configs}
    run_request(shared, request)  # warm-up: first-call allocations and kernel selection
    for rep in range(repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))  # balance drift
        for name in order:
            dist.barrier()
            mesh = meshes[name]
            if mesh.is_member:
                cfg, ring_impl = configs[name]
                ctx = RankContext(mesh, device, ring_impl=ring_impl) if cfg.world_size > 1 else None
                t0 = time.perf_counter()
                run_request(adapters[name], request, ctx=ctx)
                out[name]["times"].append(time.perf_counter() - t0)
                if ctx is not None:
                    steps = ctx.counter.per_step
                    out[name]["bytes_per_step"] = sum(sum(s.values()) for s in steps) / len(steps)
            dist.barrier()
    return out
