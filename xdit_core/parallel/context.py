"""One rank's parallel context: its mesh, communicators, byte counter and device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from xdit_core.errors import XDiTWorkerError
from xdit_core.parallel.attention import SPGroups, select_lse_kernel
from xdit_core.parallel.comm import Comm, CommCounter
from xdit_core.parallel.mesh import Mesh
from xdit_core.parallel.p2p import DEFAULT_TIMEOUT_S, P2PChannel, P2PSession, check_semantics, default_semantics


@dataclass
class RankContext:
    mesh: Mesh
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attention_backend: str = "auto"
    ring_impl: str = "p2p"
    counter: CommCounter = field(default_factory=CommCounter)
    effective_patches: int = 0  # PipeFusion's M after fitting it to the latent (0: no PipeFusion)
    pipefusion_stats: Optional[dict] = None  # PipeFusion's last run on this rank: split, bubble (REPORT.json)
    # Point to point: "native" torch.distributed, or "nccl": NCCL's semantics emulated on gloo (tests; see p2p.py).
    p2p_semantics: str = field(default_factory=default_semantics)
    p2p_timeout_s: float = DEFAULT_TIMEOUT_S  # emulated mode: a wait this long would be a hang on NCCL
    _p2p_session: Optional[P2PSession] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_semantics(self.p2p_semantics)

    def begin_run(self) -> None:
        """Start a run (every rank of the mesh, in the same order): emulated NCCL mode gets fresh channels."""
        self.end_run()
        if self.p2p_semantics == "nccl":
            self._p2p_session = P2PSession(self.mesh.ranks, self.p2p_timeout_s)

    def end_run(self) -> None:
        """End the run's channels (emulated mode: its worker threads stop once their work is done)."""
        if self._p2p_session is not None:
            self._p2p_session.close()
            self._p2p_session = None

    def p2p(self, name: str, group, members) -> P2PChannel:
        """A point-to-point channel over `group` (global `members`) with this context's semantics."""
        if self.p2p_semantics == "nccl" and self._p2p_session is None:
            # Sessions are numbered per mesh in start order: one started here, on one rank, would shift them.
            raise XDiTWorkerError("emulated NCCL point to point needs begin_run() on every rank of the mesh first")
        return P2PChannel(name, group, members, self._p2p_session)

    def comm(self, name: str) -> Comm:
        """A counted communicator over this rank's group along `name`."""
        group, members = self.mesh.group(name), self.mesh.members(name)
        return Comm(group, members, self.counter, self.p2p(name, group, members))

    def sp_groups(self, dtype: torch.dtype) -> SPGroups:
        """The Ulysses and Ring communicators and the attention kernel for a model computing in `dtype`."""
        return SPGroups(self.comm("ulysses"), self.comm("ring"),
                        select_lse_kernel(self.device, self.attention_backend, dtype), self.ring_impl)

    @property
    def sp_degree(self) -> int:
        return self.mesh.config.sp_degree

    @property
    def cfg_degree(self) -> int:
        return self.mesh.config.cfg_degree
