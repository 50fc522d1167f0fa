"""Sequence parallelism around a model adapter: shard the tokens after embedding, run the blocks with every
attention layer routed to USP attention, gather the image tokens before the head."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

import torch.nn.functional as F

from xdit_core.parallel.attention import Segment, SPGroups, select_lse_kernel, usp_attention
from xdit_core.parallel.comm import Comm
from xdit_core.parallel.routing import AttentionRouter, local_router
from xdit_core.errors import XDiTWorkerError
from xdit_core.models.base import BranchCond, ModelAdapter


def shard_padded(x: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    """Shard `index` of `parts` along `dim`, after zero-padding the end to a multiple of `parts`."""
    n = x.shape[dim]
    local = math.ceil(n / parts)
    start = index * local
    real = max(0, min(local, n - start))
    piece = x.narrow(dim, min(start, n), real)
    if real == local:
        return piece
    pad_shape = list(x.shape)
    pad_shape[dim] = local - real
    return torch.cat([piece, x.new_zeros(pad_shape)], dim=dim)


def check_declared_mask(module: torch.nn.Module, mask: Optional[torch.Tensor], declared: bool) -> None:
    """A processor's attention mask must be the text mask the adapter declared (Tokens.txt_mask), which the
    parallel attention applies in its place: any other mask would be dropped silently."""
    if mask is not None and not declared:
        raise XDiTWorkerError(f"attention layer {type(module).__name__} was given a mask the model adapter did not "
                              "declare (Tokens.txt_mask): the parallel attention applies only declared key masks")


class SequenceParallelRunner:
    """`predict` with the same contract as the adapter's, run over the SP group (ulysses x ring)."""

    def __init__(self, adapter: ModelAdapter, groups: SPGroups, sp_comm: Comm):
        self.adapter = adapter
        self.groups = groups
        self.sp_comm = sp_comm  # the whole SP group, in shard order, for the final gather
        self.degree = groups.ulysses.size * groups.ring.size
        self.index = groups.shard_index
        self.segments: dict[str, list[Segment]] = {}
        kinds = adapter.attention_kinds()
        self.router = AttentionRouter(adapter.model, kinds, self._attend)
        self.embed_router = local_router(adapter.model, kinds)

    @classmethod
    def single_rank(cls, adapter: ModelAdapter) -> "SequenceParallelRunner":
        """The whole parallel path over groups of size 1, without a process group: what it costs beyond the
        model (benchmarks) and what reaches its attention (tests)."""
        lone = Comm(None, [0], None)
        device = next(adapter.model.parameters()).device
        return cls(adapter, SPGroups(lone, lone, select_lse_kernel(device, dtype=adapter.dtype)), lone)

    def _attend(self, module: torch.nn.Module, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: Optional[float], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if kind == "cross":  # image queries against replicated text: nothing to exchange (its mask applies as is)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        check_declared_mask(module, mask, any(seg.mask is not None for seg in self.segments[kind]))
        return usp_attention(q, k, v, self.segments[kind], self.groups, scale)

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        a, S, idx = self.adapter, self.degree, self.index
        with self.embed_router or contextlib.nullcontext():
            tokens = a.embed(x, timestep, cond, guidance)
        n_img = tokens.img.shape[1]
        n_txt = tokens.txt.shape[1] if tokens.txt is not None else 0
        # Joint text is split when its length divides the degree, else replicated (attended once).
        txt_split = a.TEXT_IS_JOINT and n_txt % S == 0

        def shard_img(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_padded(t, dim, idx, S)

        def shard_txt(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return t.narrow(dim, idx * (n_txt // S), n_txt // S) if txt_split else t

        local = tokens.with_(img=shard_img(tokens.img),
                             txt=shard_txt(tokens.txt) if a.TEXT_IS_JOINT else tokens.txt,
                             extras=a.shard_extras(tokens, shard_txt, shard_img))
        img_seg = Segment(local.img.shape[1], True, n_img)
        segments = {"image": [img_seg]}
        if a.TEXT_IS_JOINT:
            txt_seg = Segment(n_txt // S if txt_split else n_txt, txt_split, n_txt, tokens.txt_mask)
            segments["joint"] = [img_seg if part == "img" else txt_seg for part in a.JOINT_ORDER]
        self.segments = segments
        with self.router:
            local = a.run_blocks(local)
        gathered = self.sp_comm.all_gather(local.img, "sp_gather")  # [S, B, N/S, D] in shard order
        full = gathered.permute(1, 0, 2, 3).reshape(x.shape[0], -1, gathered.shape[-1])[:, :n_img - tokens.n_ref]
        return a.head(tokens.with_(img=full))
