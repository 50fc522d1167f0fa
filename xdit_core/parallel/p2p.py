"""Point to point between ranks, written for NCCL's semantics and provable on CPU.

Every point-to-point call of the engine goes through a `P2PChannel` (one communicator: a process group
and its members): `isend`, `irecv` and `batch_isend_irecv`. Two semantics, chosen per run:

- "native": torch.distributed on the channel's group; tags are passed where the backend matches by them
  (gloo), and NCCL ignores them.
- "nccl": NCCL's point-to-point semantics emulated on gloo, a test mode: CPU runs fail (by timeout) where
  one communicator's ordering would hang GPUs.
  Tags do not match messages: order does (the intended tag travels in a header and a mismatch is an
  error). A send completes only once its receive is posted (the receiver first sends "ready"). The
  operations of one channel between two ranks run strictly in each rank's issue order, both directions
  together (one worker thread per (channel, peer) runs them). The operations of one batch progress
  together (an NCCL group). A wait that cannot complete within the timeout raises XDiTWorkerError.
  Each run gets a fresh `P2PSession` whose workers talk over new 2-rank gloo groups, so a thread stuck
  in an earlier (failed) run can never take a later run's message.
  Not modelled: separate communicators progress independently here, as they do on GPUs where each has
  its own stream and the kernels of two of them run concurrently; ordering across communicators is not
  checked (PipeFusion's two directions rely on it, as xDiT's do).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from xdit_core.errors import XDiTConfigError, XDiTWorkerError

SEMANTICS = ("native", "nccl")
SEMANTICS_ENV = "XDIT_P2P_SEMANTICS"  # the CLI's switch: XDIT_P2P_SEMANTICS=nccl
DEFAULT_TIMEOUT_S = 120.0  # test mode: a wait longer than this is taken for a hang (raise it for big CPU runs)
_READY, _HEADER, _DATA = 1, 2, 3  # gloo tags of the emulation's own messages
_NCCL_NOTE = ("NCCL matches point-to-point messages between two ranks of a communicator in issue order, in both "
              "directions, ignores tags, and completes a send only when its receive is posted")


def default_semantics() -> str:
    """The semantics a run gets unless told: $XDIT_P2P_SEMANTICS, else "native"."""
    return os.environ.get(SEMANTICS_ENV, "native") or "native"


def check_semantics(value: str) -> str:
    """Return `value` if it names a point-to-point semantics, else raise XDiTConfigError."""
    if value not in SEMANTICS:
        raise XDiTConfigError(f"p2p semantics must be one of {list(SEMANTICS)}, got {value!r} "
                              f"(from the argument or ${SEMANTICS_ENV})")
    return value


@dataclass(frozen=True)
class P2POp:
    """One operation of a batch: send `tensor` to `peer`, or receive into it from `peer` (global ranks)."""

    kind: str  # "send" | "recv"
    tensor: torch.Tensor
    peer: int
    tag: int = 0


class P2PWork:
    """Handle of an issued operation: `wait()` blocks until it completed (and raises its error)."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        raise NotImplementedError

    def is_completed(self) -> bool:
        raise NotImplementedError


class _NativeWork(P2PWork):
    def __init__(self, work) -> None:
        self.work = work

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.work.wait() if timeout is None else self.work.wait(timedelta(seconds=timeout))

    def is_completed(self) -> bool:
        return self.work.is_completed()


class _EmulatedWork(P2PWork):
    """Completed by the (channel, peer) worker thread; `wait` gives up after the session's timeout."""

    def __init__(self, op: P2POp, channel: str, number: int, timeout_s: float) -> None:
        self.op, self.channel, self.number, self.timeout_s = op, channel, number, timeout_s
        self.error: Optional[BaseException] = None
        self._done = threading.Event()

    def describe(self) -> str:
        op = self.op
        way = "to" if op.kind == "send" else "from"
        return (f"rank {dist.get_rank()}'s {op.kind} of {op.tensor.numel() * op.tensor.element_size()} bytes {way} "
                f"rank {op.peer} with tag {op.tag} (operation #{self.number} it issued to that rank on channel "
                f"'{self.channel}')")

    def finish(self, error: Optional[BaseException] = None) -> None:
        self.error = error
        self._done.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        limit = self.timeout_s if timeout is None else timeout
        if not self._done.wait(limit):
            other = "receive" if self.op.kind == "send" else "send"
            raise XDiTWorkerError(
                f"{self.describe()} did not complete within {limit:g}s: rank {self.op.peer} has not issued the "
                f"matching {other} as its next operation with this rank on this channel. On NCCL this would hang: "
                f"{_NCCL_NOTE}.")
        if self.error is not None:
            raise self.error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class _PairWorker:
    """Runs this rank's operations with one peer on one channel, strictly in issue order, over its own gloo group."""

    def __init__(self, prefix: str, me: int, peer: int, channel: str, gloo_timeout_s: float) -> None:
        self.prefix, self.me, self.peer, self.channel = prefix, me, peer, channel
        self.gloo_timeout = timedelta(seconds=gloo_timeout_s)
        self.queue: queue.Queue = queue.Queue()
        self.issued = 0  # operations this rank issued to the peer (numbers the works)
        self.sent = 0  # messages this rank sent to the peer on the channel: NCCL pairs them by this number
        self.broken: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name=f"xdit-p2p {channel} {me}->{peer}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        pg = None
        try:
            store = dist.PrefixStore(self.prefix, dist.distributed_c10d._get_default_store())
            pg = dist.ProcessGroupGloo(store, 0 if self.me < self.peer else 1, 2, self.gloo_timeout)
        except BaseException as e:  # noqa: BLE001 - reported on every wait of this worker
            self.broken = XDiTWorkerError(f"rank {self.me}: no emulated p2p link to rank {self.peer} on channel "
                                          f"'{self.channel}': {e}")
        while True:
            item = self.queue.get()
            if item is None:
                return
            ops, works = item
            if self.broken is not None:
                for w in works:
                    w.finish(self.broken)
                continue
            try:
                errors = self._execute(pg, ops)
            except BaseException as e:  # noqa: BLE001 - a gloo timeout or lost peer: the link is unusable now
                self.broken = XDiTWorkerError(f"{works[0].describe()} failed: {e}. On NCCL this would hang: "
                                              f"{_NCCL_NOTE}.")
                errors = [self.broken] * len(ops)
            for w, err in zip(works, errors):
                w.finish(err)

    def _execute(self, pg, ops: Sequence[P2POp]) -> list[Optional[BaseException]]:
        """One batch with this peer: its sends and receives progress together; returns each op's error."""
        p = 1 if self.me < self.peer else 0
        keep, pending = [], []  # tensors must live until their gloo sends complete
        recvs = [i for i, op in enumerate(ops) if op.kind == "recv"]
        for _ in recvs:  # rendezvous: tell the peer this rank's receive is posted
            ready = torch.ones(1, dtype=torch.int64)
            keep.append(ready)
            pending.append(pg.send([ready], p, _READY))
        for op in (op for op in ops if op.kind == "send"):
            pg.recv([torch.empty(1, dtype=torch.int64)], p, _READY).wait()  # its receive is posted
            self.sent += 1
            data = _bytes_view(op.tensor.detach().contiguous().cpu())
            header = torch.tensor([op.tag, self.sent, data.numel()], dtype=torch.int64)
            keep += [header, data]
            pending.append(pg.send([header], p, _HEADER))
            if data.numel():
                pending.append(pg.send([data], p, _DATA))
        errors: list[Optional[BaseException]] = [None] * len(ops)
        for i in recvs:
            op = ops[i]
            header = torch.empty(3, dtype=torch.int64)
            pg.recv([header], p, _HEADER).wait()
            tag, number, nbytes = header.tolist()
            buf = op.tensor
            expected = buf.numel() * buf.element_size()
            direct = nbytes == expected and buf.is_contiguous() and buf.device.type == "cpu"
            target = _bytes_view(buf) if direct else torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                pg.recv([target], p, _DATA).wait()
            if not direct and nbytes == expected:
                buf.copy_(target.view(buf.dtype).reshape(buf.shape))
            if tag != op.tag or nbytes != expected:
                errors[i] = XDiTWorkerError(
                    f"rank {self.me}'s receive from rank {self.peer} on channel '{self.channel}' expected tag "
                    f"{op.tag} ({expected} bytes) but its next message from that rank is send #{number}, "
                    f"with tag {tag} ({nbytes} bytes): NCCL would have paired the wrong messages ({_NCCL_NOTE}).")
        for w in pending:
            w.wait()
        return errors


class P2PSession:
    """One run's emulated NCCL point to point: a worker per (channel, peer), each on a fresh 2-rank gloo group.

    Every rank of a mesh starts one per run, in the same order, so the n-th session over the same ranks
    names the same gloo groups on all of them.
    """

    _started: dict[tuple[int, ...], int] = {}  # sessions started per mesh (global ranks), in this process

    def __init__(self, mesh_ranks: Sequence[int], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        ranks = tuple(mesh_ranks)
        number = P2PSession._started.get(ranks, 0) + 1
        P2PSession._started[ranks] = number
        self.key = f"xdit-p2p-nccl/{'.'.join(map(str, ranks))}/{number}"
        self.timeout_s = timeout_s
        self._workers: dict[tuple[str, int], _PairWorker] = {}
        self._lock = threading.Lock()

    def submit(self, channel: str, ops: Sequence[P2POp]) -> list[P2PWork]:
        """Issue `ops` (one batch) on `channel`; each peer's share goes to its worker in issue order."""
        me = dist.get_rank()
        works: list[P2PWork] = []
        by_peer: dict[int, tuple[list, list]] = {}
        with self._lock:
            for op in ops:
                if op.peer == me:
                    raise XDiTWorkerError(f"rank {me} issued a {op.kind} to itself on channel '{channel}'")
                worker = self._workers.get((channel, op.peer))
                if worker is None:
                    lo, hi = sorted((me, op.peer))
                    # A stuck worker ends by itself at its gloo timeout, just after the waits give up.
                    worker = _PairWorker(f"{self.key}/{channel}/{lo}-{hi}/", me, op.peer, channel,
                                         self.timeout_s + 2)
                    self._workers[(channel, op.peer)] = worker
                worker.issued += 1
                work = _EmulatedWork(op, channel, worker.issued, self.timeout_s)
                mine = by_peer.setdefault(op.peer, ([], []))
                mine[0].append(op)
                mine[1].append(work)
                works.append(work)
            for peer, item in by_peer.items():
                self._workers[(channel, peer)].queue.put(item)
        return works

    def close(self) -> None:
        """Let the workers end once their queued operations are done (a stuck one ends at its gloo timeout)."""
        with self._lock:
            for worker in self._workers.values():
                worker.queue.put(None)
            self._workers = {}


def join_workers(timeout_s: float) -> int:
    """Wait up to `timeout_s` for this process's emulation threads to end (call before the process exits: a
    thread still inside gloo then aborts it); returns how many are still running."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith("xdit-p2p "):
            thread.join(max(0.0, deadline - time.monotonic()))
    return sum(1 for t in threading.enumerate() if t.name.startswith("xdit-p2p ") and t.is_alive())


class P2PChannel:
    """One communicator for point to point: a process group, its members (global ranks) and the semantics.

    `name` identifies the channel in the emulated mode and in errors: the same on every member, unique per
    group within a mesh. `session` None: native semantics.
    """

    def __init__(self, name: str, group, members: Sequence[int], session: Optional[P2PSession] = None) -> None:
        self.name, self.group, self.members, self.session = name, group, list(members), session
        self._tags: Optional[bool] = None

    @property
    def semantics(self) -> str:
        return "native" if self.session is None else "nccl"

    def _tag(self, tag: int) -> int:
        if self._tags is None:  # NCCL ignores tags (and some versions warn): pass them where they match
            self._tags = dist.get_backend(self.group) != "nccl"
        return tag if self._tags else 0

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> P2PWork:
        """Start sending `tensor` to global rank `peer`; it must stay unchanged until the work completes."""
        if self.session is not None:
            return self.session.submit(self.channel_key, [P2POp("send", tensor, peer, tag)])[0]
        return _NativeWork(dist.isend(tensor, peer, group=self.group, tag=self._tag(tag)))

    def irecv(self, buf: torch.Tensor, peer: int, tag: int = 0) -> P2PWork:
        """Start receiving into `buf` from global rank `peer`."""
        if self.session is not None:
            return self.session.submit(self.channel_key, [P2POp("recv", buf, peer, tag)])[0]
        return _NativeWork(dist.irecv(buf, peer, group=self.group, tag=self._tag(tag)))

    def batch_isend_irecv(self, ops: Sequence[P2POp]) -> list[P2PWork]:
        """Start `ops` as one batch (an NCCL group: they progress together); one work per op."""
        if self.session is not None:
            return self.session.submit(self.channel_key, ops)
        torch_ops = [dist.P2POp(dist.isend if op.kind == "send" else dist.irecv, op.tensor, op.peer,
                                group=self.group, tag=self._tag(op.tag)) for op in ops]
        return [_NativeWork(w) for w in dist.batch_isend_irecv(torch_ops)]

    @property
    def channel_key(self) -> str:
        return f"{self.name}[{'.'.join(map(str, self.members))}]"
