"""One rank's parallel context: its mesh, communicators, byte counter and device."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xdit_core.parallel.attention import SPGroups, select_lse_kernel
from xdit_core.parallel.comm import Comm, CommCounter
from xdit_core.parallel.mesh import Mesh


@dataclass
class RankContext:
    mesh: Mesh
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attention_backend: str = "auto"
    ring_impl: str = "p2p"
    counter: CommCounter = field(default_factory=CommCounter)
    effective_patches: int = 0  # PipeFusion's M after fitting it to the latent (0: no PipeFusion)

    def comm(self, name: str) -> Comm:
        """A counted communicator over this rank's group along `name`."""
        return Comm(self.mesh.group(name), self.mesh.members(name), self.counter)

    def sp_groups(self) -> SPGroups:
        return SPGroups(self.comm("ulysses"), self.comm("ring"),
                        select_lse_kernel(self.device, self.attention_backend), self.ring_impl)

    @property
    def sp_degree(self) -> int:
        return self.mesh.config.sp_degree

    @property
    def cfg_degree(self) -> int:
        return self.mesh.config.cfg_degree
