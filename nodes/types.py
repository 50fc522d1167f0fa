"""The values our node types carry: descriptions only, nothing loaded in the ComfyUI process."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class XDiTModel:
    """XDIT_MODEL: where the weights are and how to read them."""

    path: str
    dtype: str
    family: str
    variant: str
    num_heads: int
    num_blocks: int = 0
    loras: tuple[tuple[str, float], ...] = ()  # (file, strength) in the order the xDiT LoRA nodes add them
    keep_fp8: bool = True  # fp8 weights stay fp8 on the workers (False: upcast to `dtype` at load)


@dataclass(frozen=True)
class XDiTMesh:
    """XDIT_MESH: the parallel layout and where its workers run."""

    layout: str  # "manual" or "auto" (resolved at sampling time, when the cfg is known)
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_parallel_degree: int = 1
    use_cfg_parallel: bool = False
    num_pipeline_patch: int = 0  # 0: PipeFusion's default
    warmup_steps: int = 1
    gpu_count: int = 0  # 0: all visible GPUs (minus those left to ComfyUI); CPU workers when there are none
    reserve_gpus: int = 0
    ray_address: Optional[str] = None
    attention_backend: str = "auto"
    shard_weights: bool = False  # FSDP: each rank keeps 1/N of the blocks its stage's ranks share
