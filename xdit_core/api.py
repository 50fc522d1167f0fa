"""The engine's façade: what the ComfyUI nodes and the CLI ask of the engine, in one place.

Nothing outside `xdit_core` (and nothing in `cli/`) needs to know the engine's folders: describe a model,
plan and validate a mesh, build a request as KSampler would, run it on a backend (the nodes: always the
warm worker pool), unload.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from xdit_core.errors import (XDiTCancelled, XDiTConditioningError, XDiTConfigError, XDiTError,
                              XDiTNumericError, XDiTWorkerError)
from xdit_core.loading.load import DTYPES, read_model_config
from xdit_core.models.base import BranchCond
from xdit_core.models.conditioning import check_shape as check_conditioning_shape
from xdit_core.models.conditioning import RANDOM_TEXT_LENGTH, load_cond_file, random_cond
from xdit_core.models.families import ModelSpec, resolve_model_spec
from xdit_core.parallel.attention import ATTENTION_BACKENDS
from xdit_core.parallel.auto_mesh import choose_mesh
from xdit_core.parallel.mesh import ParallelConfig, validate_parallel_config
from xdit_core.runtime import pool
from xdit_core.runtime.backends import BACKENDS, RunResult, run
from xdit_core.runtime.job import ModelRef
from xdit_core.runtime.limits import (MEMORY_BUDGET_ENV, RANK_OVERHEAD_BYTES, check_request_fits,
                                      estimate_weight_bytes, gib_from_env)
from xdit_core.runtime.memory_plan import cheapest_fitting_mesh, mesh_candidates, plan_memory
from xdit_core.runtime.placement import (GpuInventory, PhysicalGpu, Placement, parse_visible, plan_placement,
                                         read_inventory)
from xdit_core.runtime.pool import PoolKey, parse_ray_address, ray_address_from_env
from xdit_core.runtime.topology import GpuPlace, Topology, ray_topology, read_nvml_topology
from xdit_core.loading.lora import check_lora
from xdit_core.models.wan import image_concat
from xdit_core.sampling.request import (LoraRef, SampleRequest, StepRange, build_request, empty_latent, latent_shape,
                                        validate_latent_shape, validate_size, video_frames, with_guidance)
from xdit_core.sampling.samplers import SAMPLERS, SCHEDULERS, validate_sampler_settings

__all__ = ["ATTENTION_BACKENDS", "BACKENDS", "BranchCond", "DTYPES", "LoraRef", "ModelRef", "ModelSpec",
           "ParallelConfig", "PoolKey", "RANDOM_TEXT_LENGTH", "RunResult", "SAMPLERS", "SCHEDULERS", "SampleRequest",
           "StepRange", "XDiTCancelled", "XDiTConditioningError", "XDiTConfigError", "XDiTError", "XDiTNumericError",
           "XDiTWorkerError", "build_request", "check_conditioning_shape", "check_lora", "check_request_fits",
           "auto_mesh", "choose_mesh", "cluster_topology", "gpu_topology", "Topology",
           "describe_model", "fit_mesh", "empty_latent", "evaluations", "image_concat", "latent_shape",
           "load_cond_file", "pool_stats", "random_cond", "run", "sample", "unload", "uses_cluster", "validate_latent_shape",
           "GpuInventory", "PhysicalGpu", "Placement", "gpu_inventory", "parse_visible", "plan_placement",
           "place_workers", "local_placement", "comfy_gpu_bytes_needed", "workers_memory", "running_mesh",
           "validate_parallel_config", "validate_ray_address", "validate_sampler_settings", "validate_size",
           "video_frames", "with_guidance"]


def describe_model(path: str, family: Optional[str] = None, variant: Optional[str] = None) -> ModelSpec:
    """The family, variant and ComfyUI settings of a model file or folder (reads its header only)."""
    return resolve_model_spec(read_model_config(path), family, variant)


def gpu_topology(placement: Optional[Placement], ranks: int) -> Topology:
    """The links between a local pool's GPUs (NVML, by PCI bus id); without a placement (no NVML), `ranks` GPUs
    whose links are assumed PCIe, as the topology says."""
    if placement is None:
        return Topology(tuple(GpuPlace("local", i) for i in range(ranks)), source="NVML sees no GPU: PCIe assumed")
    return read_nvml_topology([g.pci_bus_id for g in placement.gpus])


def cluster_topology(ray_address: Optional[str], ranks: int) -> Optional[Topology]:
    """The Ray cluster's node layout for `ranks` GPU workers (connecting to it as the pool would); None when it
    has fewer GPUs."""
    import ray

    pool.ensure_ray(ray_address)
    return ray_topology(ray.nodes(), ranks)


def auto_mesh(path: str, family: Optional[str], variant: Optional[str], ranks: int, cfg: float, *,
              topology: Optional[Topology] = None, pipefusion: bool = True) -> tuple[ParallelConfig, str]:
    """`auto`'s mesh for the model at `path` on `ranks` workers joined by `topology` (None: links unknown, xDiT's
    advice), and why; `pipefusion` False for host-driven sampling (the Guider)."""
    from xdit_core.parallel.perf_workloads import architecture_of, nominal_workload
    from xdit_core.parallel.stages import block_flops

    config = read_model_config(path)
    spec = resolve_model_spec(config, family, variant)
    workload = None
    if topology is not None:  # PipeFusion's stage weights as the engine splits them (video never runs it)
        split = None if spec.is_video else block_flops(config, spec)
        workload = nominal_workload(architecture_of(config, spec), 1, split)
    return choose_mesh(spec.family, spec.num_heads, ranks, cfg, spec.num_blocks,
                       cluster=None if topology is None else topology.cluster(), workload=workload,
                       pipefusion=pipefusion)


def validate_ray_address(address: Optional[str]) -> None:
    """Raise XDiTConfigError unless `address` is empty, "auto", host:port or ray://host:port (no connection
    is made: reachability is checked, with a timeout, when the pool starts)."""
    parse_ray_address(address)


def uses_cluster(ray_address: Optional[str]) -> bool:
    """Whether the pool's ranks run on a Ray cluster (an address given, or $XDIT_RAY_ADDRESS) rather than here."""
    return ray_address_from_env(ray_address) is not None


def sample(key: PoolKey, request: SampleRequest, ray_address: Optional[str] = None,
           on_progress: Optional[Callable[[int, int], None]] = None,
           cancel: Optional[Callable[[], bool]] = None,
           on_preview: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Sample `request` on the warm pool of `key`; returns rank 0's latent in the model's space (CPU)."""
    return pool.get_pool(key, ray_address).sample(request, on_progress=on_progress, cancel=cancel,
                                                  on_preview=on_preview)


def evaluations(key: PoolKey, positive: BranchCond, negative: Optional[BranchCond],
                ray_address: Optional[str] = None, loras: tuple[LoraRef, ...] = ()) -> pool.PoolEvaluations:
    """Host-driven evaluations on the warm pool of `key` (a context manager): call it with the model input
    scaled by the host's model sampling, the timestep and whether the negative branch is needed; it returns
    the raw model outputs of both branches (the host applies CFG and its sampler)."""
    return pool.get_pool(key, ray_address).evaluations(positive, negative, loras)


def pool_stats(key: PoolKey, ray_address: Optional[str] = None) -> pool.PoolStats:
    """The warm pool's cold-start breakdown and counters (starts the pool if it is not up)."""
    return pool.get_pool(key, ray_address).stats


def unload() -> None:
    """Stop the worker pool and free every weight it holds."""
    pool.unload()


def gpu_inventory(refresh: bool = False) -> GpuInventory:
    """This machine's NVIDIA GPUs from NVML, whatever CUDA_VISIBLE_DEVICES says (none without NVML or a driver)."""
    return read_inventory(refresh)


_COMFY_GPU_NEED = 0  # bytes the next run's workers add on the host's GPU (see place_workers)


def place_workers(placement: Optional[Placement], model_path: Optional[str] = None, dtype: Optional[str] = None,
                  parallel: Optional[ParallelConfig] = None, shares_host_gpu: Optional[bool] = None,
                  keep_fp8: bool = True) -> int:
    """Give the local pool `placement`'s GPUs from the next request on (None: the GPUs Ray detects) and return
    the bytes that request's workers will add on the host's compute GPU: 0 unless a worker runs there (the
    placement says; without one, `shares_host_gpu` does), else the model's weights per rank unless the running
    pool already holds them there, plus a rank's CUDA context when the pool starts. `comfy_gpu_bytes_needed()`
    repeats the figure until the next call."""
    global _COMFY_GPU_NEED
    pool.place_local_workers(placement)
    shares = placement.shares_comfy_gpu if shares_host_gpu is None and placement is not None else bool(shares_host_gpu)
    need = 0
    if shares and model_path is not None:
        running = pool.running_pool()
        same_gpus = running is not None and (running.placement.gpus if running.placement else None) == \
            (placement.gpus if placement else None)
        warm = same_gpus and running.address is None and running.key.parallel == parallel
        resident = warm and any((m.path, m.dtype, m.keep_fp8) == (model_path, dtype, keep_fp8)
                                for m in running.resident)
        need = (0 if resident else estimate_weight_bytes(model_path, dtype, parallel, keep_fp8)) + \
            (0 if warm else RANK_OVERHEAD_BYTES)
    _COMFY_GPU_NEED = need
    return need


def local_placement() -> Optional[Placement]:
    """The GPUs the local pool's workers take from the next request on (the last `place_workers`), or None."""
    return pool.local_placement()


def comfy_gpu_bytes_needed() -> int:
    """What the last `place_workers` said the next run's workers add on the host's compute GPU."""
    return _COMFY_GPU_NEED


def workers_memory() -> list[dict]:
    """Each rank's memory when a pool is up (rank, gpu: physical index or None on the CPU, rss_bytes, and on a
    GPU allocated_bytes, reserved_bytes, device_used_bytes, device_total_bytes); [] without one."""
    return pool.workers_memory()


def running_mesh() -> Optional[str]:
    """The running pool's mesh (ParallelConfig.describe()) and where its ranks run, or None; starts nothing."""
    running = pool.running_pool()
    if running is None:
        return None
    where = f" on a Ray cluster ({running.address})" if running.address else ""
    return running.key.parallel.describe() + where


def memory_budget_override() -> Optional[int]:
    """$XDIT_MEMORY_BUDGET_GB in bytes when set (it replaces the GPUs' memory in every memory check), else None."""
    return gib_from_env(MEMORY_BUDGET_ENV)


def fit_mesh(model: str | Mapping[str, Any], dtype: str, parallel: ParallelConfig, latent_shape: Sequence[int], *,
             spec: ModelSpec, with_negative: bool, text_tokens: int, keep_fp8: bool, budget: int) -> ParallelConfig:
    """The mesh layout `auto` runs on GPUs of `budget` bytes: `parallel` when its memory plan fits, else the same
    mesh with its weights sharded (exact, like `parallel`; PipeFusion would fit without per-step traffic but is
    approximate after its warmup steps, so auto never moves to it for memory); the plan's one-line refusal, naming
    the nearest mesh that fits, when neither does."""
    candidates = [c for c in mesh_candidates(parallel, heads=spec.num_heads, num_blocks=spec.num_blocks,
                                             video=spec.is_video)
                  if c.pipefusion_parallel_degree == parallel.pipefusion_parallel_degree]
    chosen, _ = cheapest_fitting_mesh(
        candidates, lambda p: plan_memory(model, dtype, p, latent_shape, fp8_kept=keep_fp8, text_tokens=text_tokens,
                                          with_negative=with_negative, family=spec.family, variant=spec.variant,
                                          device_bytes=budget),
        budget, source="the workers' smallest GPU")
    return chosen
