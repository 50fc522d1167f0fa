"""The one thin layer every collective and point-to-point call goes through; it counts bytes sent.

Counting convention (bytes this rank puts on the wire, per call):
- all_to_all over N ranks: (N - 1) / N of the local tensor (its own chunk stays);
- all_gather over N ranks: (N - 1) x the local tensor (each peer needs a copy);
- send: the tensor.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from xdit_core.parallel.p2p import P2PChannel, P2POp

COMM_KINDS = ("ulysses_all_to_all", "ulysses_all_gather", "ring_p2p", "ring_all_gather", "sp_gather",
              "cfg_gather", "pipefusion_p2p", "shard_gather", "control")  # control: tiny consistency checks


class CommCounter:
    """Bytes sent by this rank, per kind, in total and per denoising step."""

    def __init__(self) -> None:
        self.total: dict[str, int] = {k: 0 for k in COMM_KINDS}
        self.per_step: list[dict[str, int]] = []
        self._current: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.total[kind] = self.total.get(kind, 0) + nbytes
        self._current[kind] += nbytes

    def end_step(self) -> None:
        """Close the current step's tally (called after every sampler step)."""
        self.per_step.append({k: self._current.get(k, 0) for k in self.total})
        self._current = defaultdict(int)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Collectives on one group, counted under `kind` into `counter`; point to point through `p2p` (a channel
    over the same group: native torch.distributed unless given one with the emulated NCCL semantics)."""

    def __init__(self, group, members: Sequence[int], counter: Optional[CommCounter],
                 p2p: Optional[P2PChannel] = None):
        self.group = group
        self.members = list(members)
        self.size = len(self.members)
        self.index = self.members.index(dist.get_rank()) if dist.is_initialized() and self.size > 1 else 0
        self.counter = counter
        self.p2p = p2p if p2p is not None else P2PChannel("group", group, self.members)

    def _count(self, kind: str, nbytes: int) -> None:
        if self.counter is not None:
            self.counter.add(kind, nbytes)

    def all_to_all(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x: [N, ...] chunk j goes to rank j; returns [N, ...] with chunk j from rank j."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        self._count(kind, _nbytes(x) * (self.size - 1) // self.size)
        return out

    def all_gather(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Returns [N, *x.shape]: every rank's x in group order."""
        if self.size == 1:
            return x.unsqueeze(0)
        x = x.contiguous()
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        if x.is_cuda:
            dist.all_gather_into_tensor(out, x, group=self.group)
        else:  # gloo: a list of views into `out`
            dist.all_gather(list(out.unbind(0)), x, group=self.group)
        self._count(kind, _nbytes(x) * (self.size - 1))
        return out

    def broadcast(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """The group's first member's x on every rank (counted on that member: one copy per peer)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        dist.broadcast(x, self.members[0], group=self.group)
        if self.index == 0:
            self._count(kind, _nbytes(x) * (self.size - 1))
        return x

    def ring_exchange(self, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, list]:
        """Start sending x to the next rank of the ring and receiving the previous rank's; returns (buffer, works)."""
        x = x.contiguous()
        buf = torch.empty_like(x)
        nxt = self.members[(self.index + 1) % self.size]
        prv = self.members[(self.index - 1) % self.size]
        # One batch: on NCCL a group, so the send and the receive progress together (no ordering deadlock).
        works = self.p2p.batch_isend_irecv([P2POp("send", x, nxt), P2POp("recv", buf, prv)])
        self._count(kind, _nbytes(x))
        return buf, works
