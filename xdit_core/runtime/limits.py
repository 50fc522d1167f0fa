"""What one machine can be asked to run: a cap on ranks and threads, and a memory budget for a request.

Every check here runs on the host before any rank starts or any weight is read, so that an absurd request
fails in a second with the numbers instead of swapping, hanging or being killed. On GPUs the check is the
memory plan's (runtime/memory_plan.py: each rank's weights, gathered block, K/V buffers, activations and
buffers, from the model's config on the meta device) against each GPU's memory. On CPU workers, whose ranks
share the machine's RAM, the estimate counts what grows with the request (latents, activations, PipeFusion's
K/V buffers, each rank's process), not the weights.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.loading.load import read_model_config
from xdit_core.parallel.attention import FLASH_DTYPES, _flash_attn_available
from xdit_core.parallel.mesh import ParallelConfig
# The memory terms are the memory plan's; GIB, FLOAT32_BYTES, LATENT_COPIES, ACTIVATION_FACTOR and
# RANK_OVERHEAD_BYTES stay importable from here.
from xdit_core.runtime.memory_plan import (ACTIVATION_FACTOR, FLOAT32_BYTES, GIB, LATENT_COPIES,  # noqa: F401
                                           RANK_OVERHEAD_BYTES, activation_term, image_tokens, kv_buffer_term,
                                           latents_term, plan_memory)

# Without --oversubscribe: on CPU at most max(MIN_CPU_RANKS, CPU_RANKS_PER_CORE x cores) ranks (the demo's
# 4-rank and the tests' 8-rank worlds fit a 2-core machine); on GPUs one rank per visible GPU.
MIN_CPU_RANKS = 8
CPU_RANKS_PER_CORE = 4
MAX_THREADS = 1024  # torch threads per rank, even with --oversubscribe: no machine has more cores than this

MEMORY_BUDGET_ENV = "XDIT_MEMORY_BUDGET_GB"  # GiB; overrides the physical (CPU) or GPU memory
RESIDENT_BUDGET_ENV = "XDIT_RESIDENT_GB"  # GiB of weights each rank keeps for its resident models


def max_ranks(cpu_count: int, gpu_count: int) -> int:
    """The most ranks this machine runs without --oversubscribe: one per GPU, else max(8, 4 x cores)."""
    if gpu_count > 0:
        return gpu_count
    return max(MIN_CPU_RANKS, CPU_RANKS_PER_CORE * cpu_count)


def check_rank_count(world_size: int, *, cpu_count: int, gpu_count: int, oversubscribe: bool = False) -> None:
    """Raise XDiTConfigError if `world_size` ranks exceed `max_ranks` (unless `oversubscribe`)."""
    cap = max_ranks(cpu_count, gpu_count)
    if world_size > cap and not oversubscribe:
        basis = (f"one rank per visible GPU ({gpu_count})" if gpu_count > 0 else
                 f"max({MIN_CPU_RANKS}, {CPU_RANKS_PER_CORE} x {cpu_count} CPU cores)")
        raise XDiTConfigError(f"the mesh needs {world_size} ranks but this machine runs at most {cap}: {basis}; "
                              f"lower the degrees, or pass --oversubscribe to run them anyway")


def check_threads(threads: int, *, cpu_count: int, oversubscribe: bool = False) -> None:
    """Torch threads per rank: at least 1, at most the cores (unless `oversubscribe`), never above MAX_THREADS."""
    cap = MAX_THREADS if oversubscribe else min(cpu_count, MAX_THREADS)
    if not 1 <= threads <= cap:
        hint = "" if threads < 1 or cap == MAX_THREADS else \
            f" (more threads than cores only slows the ranks down; --oversubscribe allows up to {MAX_THREADS})"
        raise XDiTConfigError(f"threads must be in 1..{cap}, got {threads}{hint}")


def visible_gpu_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_attention_backend(backend: str, dtype: torch.dtype, on_gpu: bool) -> None:
    """The host-side half of `select_lse_kernel`'s rules: 'flash' needs CUDA ranks, flash-attn and fp16/bf16."""
    if backend != "flash":
        return
    if not on_gpu:
        raise XDiTConfigError("attention backend 'flash' needs the ranks on CUDA GPUs, and these run on CPU "
                              "(no CUDA, or one local rank); use auto or sdpa")
    if not _flash_attn_available():
        raise XDiTConfigError("attention backend 'flash' needs flash-attn: pip install flash-attn, or use auto")
    if dtype not in FLASH_DTYPES:
        raise XDiTConfigError(f"attention backend 'flash' computes in fp16/bf16, not {dtype}; "
                              "use auto or sdpa, or --dtype bf16")


def transformer_width(model_path: str) -> int:
    """The hidden size of a model's transformer, heads x head dim, from its config (a file's header only)."""
    config = read_model_config(model_path)
    heads, head_dim = config.get("num_attention_heads", 1), config.get("attention_head_dim", 1)
    try:
        width = int(heads) * int(head_dim)
    except (TypeError, ValueError):
        width = 0
    if width < 1:
        raise XDiTModelError(f"the model config's num_attention_heads x attention_head_dim must be a positive "
                             f"integer, got {heads!r} x {head_dim!r}")
    return width


def physical_memory() -> Optional[int]:
    """This machine's RAM in bytes, or None where the OS does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gib_from_env(name: str, allow_zero: bool = False) -> Optional[int]:
    """$name as a number of GiB, in bytes; None when unset; XDiTConfigError for anything but a finite number
    > 0 (>= 0 with `allow_zero`)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and (gib >= 0 if allow_zero else gib > 0)):
        kind = "a number of GiB >= 0" if allow_zero else "a positive number of GiB"
        raise XDiTConfigError(f"${name} must be {kind}, got {raw!r}")
    return int(gib * GIB)


def smallest_gpu_memory() -> int:
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def memory_budget(on_gpu: bool, remote: bool = False) -> Optional[tuple[int, str]]:
    """(bytes a request may use, where that figure comes from): $XDIT_MEMORY_BUDGET_GB (GiB) if set, else the
    smallest visible GPU's memory for GPU ranks, else physical memory (os.sysconf). None where nothing is known:
    `remote` ranks (a Ray cluster's machines) without the variable, or a platform without sysconf (Windows)."""
    given = gib_from_env(MEMORY_BUDGET_ENV)
    if given is not None:
        return given, f"${MEMORY_BUDGET_ENV}"
    if remote:
        return None
    if on_gpu:
        return smallest_gpu_memory(), "the smallest GPU's memory"
    ram = physical_memory()
    return None if ram is None else (ram, "physical memory")


def estimate_rank_bytes(latent_shape: Sequence[int], *, hidden_size: int, dtype_bytes: int, sp_degree: int = 1,
                        branches: int = 1, text_tokens: int = 0, kv_layers: int = 0) -> int:
    """Peak bytes one rank needs for a request besides its weights.

    latent_shape: [B, C, h, w] or [B, C, frames, h, w]; branches: conditionings one rank evaluates per step (2
    with CFG unless cfg-parallel); text_tokens: joint text length (counted whole on every rank); kv_layers:
    attention layers whose full-sequence K/V a PipeFusion stage keeps (0 without PipeFusion).
    """
    image = math.ceil(image_tokens(latent_shape) / sp_degree)  # 2x2 patches (per frame), split over SP ranks
    rows = int(latent_shape[0]) * branches
    return (RANK_OVERHEAD_BYTES + latents_term(latent_shape)
            + activation_term(rows, image + text_tokens, hidden_size, dtype_bytes)
            + kv_buffer_term(rows, image, hidden_size, dtype_bytes, kv_layers))


def check_memory(latent_shape: Sequence[int], per_rank: int, ranks_sharing: int,
                 budget: Optional[tuple[int, str]]) -> None:
    """Raise XDiTConfigError if `ranks_sharing` ranks of `per_rank` bytes each exceed `budget` (None: no check).

    ranks_sharing: the processes on one budget (on CPU every local rank, and the host beside a spawned world;
    on GPUs the ranks of one GPU).
    """
    if budget is None:
        return
    limit, source = budget
    need = per_rank * ranks_sharing
    if need > limit:
        raise XDiTConfigError(
            f"a latent of {list(latent_shape)} needs about {need / GIB:.1f} GiB ({ranks_sharing} process(es) x "
            f"{per_rank / GIB:.2f} GiB for latents, activations and the process) but the memory budget is "
            f"{limit / GIB:.1f} GiB ({source}); use a smaller size or batch, more sequence-parallel ranks or bf16, "
            f"or set ${MEMORY_BUDGET_ENV}")


def check_request_fits(model_path: str, latent_shape: Sequence[int], parallel: ParallelConfig, *, backend: str,
                       remote: bool, dtype: torch.dtype, attention_backend: str, num_blocks: int,
                       with_negative: bool, text_tokens: int, threads: Optional[int] = None,
                       oversubscribe: bool = False, family: Optional[str] = None,
                       variant: Optional[str] = None, keep_fp8: bool = True,
                       worker_gpus: Optional[Sequence[int]] = None) -> None:
    """Every machine limit for one request, as runtime/backends.py will place its ranks (the CLI and the
    nodes call this before any rank starts): the rank cap, threads, the attention backend, the memory budget.

    remote: the ranks run on a Ray cluster's machines, about which this one's cores, GPUs and memory say
    nothing; backend "env": torchrun has started the ranks already. On local GPUs the memory check is the
    memory plan's peak per GPU (weights included, fp8 as the file stores it) against the smallest GPU's memory
    (or $XDIT_MEMORY_BUDGET_GB); a plan that does not fit is refused with its numbers and the nearest mesh that
    fits, before any weight is read. `worker_gpus`: the memory (bytes) of each GPU the local pool's workers
    were placed on (runtime/placement.py), where that differs from what this process sees (ComfyUI's
    --cuda-device); `keep_fp8`: the load keeps a file's fp8 weights fp8.
    """
    world = parallel.world_size
    cores = os.cpu_count() or 1
    gpus = visible_gpu_count() if worker_gpus is None else len(worker_gpus)
    # A local mesh of one runs in this process on CPU; spawned, torchrun and pool ranks take a GPU each.
    on_gpu = gpus > 0 and not (backend == "local" and world == 1)
    if not remote and backend != "env":
        check_rank_count(world, cpu_count=cores, gpu_count=gpus, oversubscribe=oversubscribe)
    if threads is not None:
        check_threads(threads, cpu_count=cores, oversubscribe=oversubscribe or remote)
    if not remote:
        check_attention_backend(attention_backend, dtype, on_gpu)
    budget = memory_budget(on_gpu, remote)
    if worker_gpus and budget is not None and gib_from_env(MEMORY_BUDGET_ENV) is None:
        budget = min(worker_gpus), "the smallest worker GPU's memory"
    if on_gpu and not remote:
        if budget is not None:
            # Kept fp8: the plan reads from the header which Linear weights the file stores in fp8.
            plan = plan_memory(model_path, dtype, parallel, latent_shape, fp8_kept=keep_fp8, text_tokens=text_tokens,
                               with_negative=with_negative, ranks_per_device=math.ceil(world / gpus),
                               family=family, variant=variant,
                               device_bytes=min(worker_gpus) if worker_gpus else None)
            plan.fits(budget[0], budget[1])
        return
    stages = parallel.pipefusion_parallel_degree
    per_rank = estimate_rank_bytes(
        latent_shape, hidden_size=transformer_width(model_path), dtype_bytes=dtype.itemsize,
        sp_degree=parallel.sp_degree, branches=2 if with_negative and not parallel.use_cfg_parallel else 1,
        text_tokens=text_tokens, kv_layers=math.ceil(num_blocks / stages) if stages > 1 else 0)
    # Processes on one budget: every local CPU rank plus the host beside a spawned world (remote: one rank).
    sharing = 1 if remote else world + (world > 1)
    check_memory(latent_shape, per_rank, sharing, budget)


def resident_budget(world_size: int, on_gpu: bool) -> Optional[int]:
    """Bytes of weights one rank may keep across resident models before the least recently used is evicted:
    $XDIT_RESIDENT_GB if set, else 70% of the smallest GPU's memory (the rest is for activations) or, on CPU,
    half the physical memory shared by the ranks; None (no limit) where nothing is known."""
    given = gib_from_env(RESIDENT_BUDGET_ENV, allow_zero=True)
    if given is not None:
        return given
    if on_gpu:
        return int(0.7 * smallest_gpu_memory())
    ram = physical_memory()
    return None if ram is None else ram // (2 * world_size)


def estimate_weight_bytes(model_path: str, dtype: str, parallel: ParallelConfig, keep_fp8: bool = True) -> int:
    """The largest rank's share of a model's weights in `dtype`, from the memory plan (config and header only):
    its PipeFusion stage's blocks and the modules every rank holds, each block 1/N of itself when sharded over N
    ranks, the file's fp8 Linear weights at 1 byte (and a scale) when the loader keeps them (`keep_fp8`)."""
    plan = plan_memory(model_path, dtype, parallel, [1, 1, 2, 2], fp8_kept=keep_fp8)
    return max(r.weights for r in plan.ranks)
