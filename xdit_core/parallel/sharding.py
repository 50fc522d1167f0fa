"""Weight sharding (FSDP2) over the ranks that hold the same blocks: a PipeFusion stage's Ulysses x Ring x CFG
ranks. Each keeps 1/N of every block it runs and all-gathers a block's full weights just before the block runs,
freeing them after (`reshard_after_forward`); embedders and the head stay whole on every rank. The gathered
weights are the exact ones, so results equal the unsharded run's; the price is (N - 1)/N of the block bytes
received per block forward, counted here as "shard_gather" (what each rank sends: its shard, N - 1 times).
"""
from __future__ import annotations

import torch

from xdit_core.models.base import ModelAdapter
from xdit_core.models.fp8 import Fp8Weight
from xdit_core.parallel.context import RankContext


class BlockSharder:
    """fully_shards one block at a time over this rank's "stage" group (a no-op when the group is this rank
    alone): the loader calls it as each block's weights arrive (load_model's `on_block`), so no rank ever holds
    more than one block whole."""

    def __init__(self, ctx: RankContext):
        from torch.distributed.device_mesh import DeviceMesh

        self.ctx, group = ctx, ctx.mesh.group("stage")
        self.size = ctx.mesh.size("stage") if group is not None else 1
        self.device_mesh = DeviceMesh.from_group(group, ctx.device.type) if group is not None else None

    def __call__(self, block: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.device_mesh is None:
            return
        fully_shard(block, mesh=self.device_mesh, reshard_after_forward=True)
        sent = (self.size - 1) * local_param_bytes(block)
        ctx = self.ctx

        def count(module: torch.nn.Module, args) -> None:
            ctx.counter.add("shard_gather", sent)  # the run's counter (RankJob replaces it per request)

        block.register_forward_pre_hook(count)


def shard_blocks(adapter: ModelAdapter, ctx: RankContext) -> int:
    """Shard every block a loaded model holds (PipeFusion: its stage's; the others stay on meta); returns how many
    were sharded."""
    sharder = BlockSharder(ctx)
    if sharder.device_mesh is None:
        return 0
    blocks = [block for block, _ in adapter.blocks() if not any(p.is_meta for p in block.parameters())]
    for block in blocks:
        sharder(block)
    return len(blocks)


def local_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: a sharded parameter's local shard, not its global size; an fp8
    weight kept in fp8 its fp8 tensor and scale (a scale shared by the pieces of a fused tensor once)."""
    held: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        for part in (local.fp8, local.scale) if isinstance(local, Fp8Weight) else (local,):
            if part is not None and not part.is_meta:
                held[id(part)] = part
    return sum(t.numel() * t.element_size() for t in held.values())
