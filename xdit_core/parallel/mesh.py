"""The parallel mesh: cfg x pipefusion x ring x ulysses, its validation and its process groups.

Rank layout (xDiT's, fastest first): ulysses, ring, pipefusion, cfg, so that
rank = u + U * (r + R * (p + P * c)). Ulysses groups are contiguous ranks (one node's fast links);
ring groups stride by the ulysses degree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import PIXEL_MULTIPLE
from xdit_core.sampling.request import MAX_RESOLUTION
from xdit_core.sampling.samplers import MAX_STEPS

DIMS = ("ulysses", "ring", "pipefusion", "cfg")
MAX_PATCH_ROWS = MAX_RESOLUTION // PIXEL_MULTIPLE
DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class ParallelConfig:
    """xDiT's parallel flags, with its field names."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_parallel_degree: int = 1
    use_cfg_parallel: bool = False
    num_pipeline_patch: Optional[int] = None
    warmup_steps: int = 1
    # FSDP-style weight sharding over the ranks that hold the same blocks (a stage's Ulysses x Ring x CFG ranks):
    # each keeps 1/N of every block and gathers a block just before it runs.
    shard_weights: bool = False

    @property
    def cfg_degree(self) -> int:
        return 2 if self.use_cfg_parallel else 1

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def degrees(self) -> dict[str, int]:
        return {"ulysses": self.ulysses_degree, "ring": self.ring_degree,
                "pipefusion": self.pipefusion_parallel_degree, "cfg": self.cfg_degree}

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees.values())

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on every dim."""
        out = {}
        for dim in DIMS:
            out[dim] = rank % self.degrees[dim]
            rank //= self.degrees[dim]
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        """Inverse of `coords`."""
        rank, stride = 0, 1
        for dim in DIMS:
            rank += coords[dim] * stride
            stride *= self.degrees[dim]
        return rank

    def group_ranks(self, dim: str | Sequence[str]) -> list[list[int]]:
        """All groups along `dim` (or several dims together): lists of mesh ranks sharing the other coords."""
        dims = (dim,) if isinstance(dim, str) else tuple(dim)
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = tuple(c[d] for d in DIMS if d not in dims)
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    @property
    def preview_rank(self) -> int:
        """The rank that sees every step's whole prediction: rank 0, or under PipeFusion the last stage of rank
        0's pipeline (stage 0 never sees a prediction)."""
        return self.rank_of({**self.coords(0), "pipefusion": self.pipefusion_parallel_degree - 1})

    def describe(self) -> str:
        """One line: the degrees and the world size."""
        sharded = f", weights sharded over {self.world_size // self.pipefusion_parallel_degree}" \
            if self.shard_weights and self.world_size > self.pipefusion_parallel_degree else ""
        return (f"cfg {self.cfg_degree} x pipefusion {self.pipefusion_parallel_degree} x ring {self.ring_degree} "
                f"x ulysses {self.ulysses_degree} = {self.world_size} ranks{sharded}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_parallel_config(config: ParallelConfig, *, world_size: Optional[int] = None,
                             num_heads: Optional[int] = None, cfg: Optional[float] = None,
                             num_blocks: Optional[int] = None, steps: Optional[int] = None,
                             latent_height: Optional[int] = None, video: bool = False) -> None:
    """Raise XDiTConfigError for an impossible mesh, saying what would be valid. No process is started."""
    for name, value in (("ulysses_degree", config.ulysses_degree), ("ring_degree", config.ring_degree),
                        ("pipefusion_parallel_degree", config.pipefusion_parallel_degree)):
        if not isinstance(value, int) or value < 1:
            raise XDiTConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if config.warmup_steps < 0:
        raise XDiTConfigError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    # Upper bounds that hold for every request, PipeFusion or not: no run has more steps, no latent more rows.
    if config.warmup_steps > MAX_STEPS:
        raise XDiTConfigError(f"warmup_steps must be at most {MAX_STEPS} (the most steps), got {config.warmup_steps}")
    if config.num_pipeline_patch is not None and config.num_pipeline_patch < 1:
        raise XDiTConfigError(f"num_pipeline_patch must be >= 1, got {config.num_pipeline_patch}")
    if config.num_pipeline_patch is not None and config.num_pipeline_patch > MAX_PATCH_ROWS:
        raise XDiTConfigError(f"num_pipeline_patch must be at most {MAX_PATCH_ROWS} (the patch rows of the "
                              f"tallest latent, {MAX_RESOLUTION} px), got {config.num_pipeline_patch}")
    if world_size is not None and config.world_size != world_size:
        raise XDiTConfigError(
            f"the mesh needs {config.world_size} ranks ({config.describe()}) but the world has {world_size}; "
            f"choose degrees whose product is {world_size}")
    if num_heads is not None and num_heads % config.ulysses_degree:
        valid = [d for d in _divisors(num_heads) if d <= 8]
        raise XDiTConfigError(
            f"ulysses_degree {config.ulysses_degree} does not divide the model's {num_heads} attention heads; "
            f"valid ulysses degrees: {valid} (use ring_degree for the rest)")
    if config.shard_weights and config.world_size == config.pipefusion_parallel_degree:
        raise XDiTConfigError("shard_weights needs ranks that hold the same blocks to shard over: a ulysses, ring or "
                              "cfg degree above 1 (PipeFusion stages already split the blocks); turn it off or add one")
    if config.pipefusion_parallel_degree > 1:
        if video:
            raise XDiTConfigError(f"pipefusion_parallel_degree {config.pipefusion_parallel_degree}: PipeFusion does "
                                  "not run video models (its patches are latent rows of one image); split a video "
                                  "with ulysses_degree and ring_degree (and use_cfg_parallel) instead")
        if num_blocks is not None and config.pipefusion_parallel_degree > num_blocks:
            raise XDiTConfigError(f"pipefusion_parallel_degree {config.pipefusion_parallel_degree} is larger than "
                                  f"the model's {num_blocks} blocks; use at most {num_blocks} stages")
        if steps is not None and config.warmup_steps > steps:
            raise XDiTConfigError(f"warmup_steps {config.warmup_steps} is more than the {steps} steps; "
                                  f"use 0 to {steps} ({steps} = no pipelined step, exact)")
        patch_rows = None if latent_height is None else latent_height // 2
        if patch_rows is not None and config.num_pipeline_patch and config.num_pipeline_patch > patch_rows:
            raise XDiTConfigError(f"num_pipeline_patch {config.num_pipeline_patch} is more than this latent's "
                                  f"{patch_rows} patch rows ({latent_height * 8} px high); use at most {patch_rows}")
    if cfg is not None and config.use_cfg_parallel and math.isclose(cfg, 1.0):
        raise XDiTConfigError(
            "use_cfg_parallel needs cfg != 1: at cfg 1.0 ComfyUI evaluates no negative branch, so the second "
            "CFG rank would have nothing to do; turn use_cfg_parallel off or raise cfg")


class Mesh:
    """One rank's view of the mesh: coordinates and torch.distributed groups over `ranks` (global ranks).

    Creating it is collective: every process of the default group must construct the same meshes in the
    same order (gloo's new_group is), including processes that are not in `ranks`.
    """

    def __init__(self, config: ParallelConfig, ranks: Optional[Sequence[int]] = None,
                 timeout: timedelta = DEFAULT_TIMEOUT):
        import torch.distributed as dist

        self.config = config
        self.ranks = list(range(config.world_size)) if ranks is None else list(ranks)
        if len(self.ranks) != config.world_size:
            raise XDiTConfigError(f"{config.describe()} needs {config.world_size} ranks, given {len(self.ranks)}")
        me = dist.get_rank()
        self.is_member = me in self.ranks
        self.rank = self.ranks.index(me) if self.is_member else -1
        self.coords = config.coords(self.rank) if self.is_member else {}
        self._groups: dict[str, object] = {}
        self._group_members: dict[str, list[int]] = {}
        names = [("ulysses", "ulysses"), ("ring", "ring"), ("sp", ("ulysses", "ring")), ("pipefusion", "pipefusion"),
                 ("cfg", "cfg"), ("mesh", DIMS)]  # mesh: every rank of it (a mesh may span part of the world)
        if config.shard_weights or config.pipefusion_parallel_degree > 1:
            # The ranks that hold the same blocks: weight sharding's group (parallel/sharding.py), and the group
            # in which PipeFusion's first stage agrees on a cancel.
            names.append(("stage", ("ulysses", "ring", "cfg")))
        for name, dims in names:
            for members in config.group_ranks(dims):
                global_members = [self.ranks[r] for r in members]
                group = dist.new_group(global_members, timeout=timeout) if len(members) > 1 else None
                if me in global_members:
                    self._groups[name] = group
                    self._group_members[name] = global_members
        # PipeFusion's hand-offs: one group per direction of every edge (stage i -> i + 1, and last -> first),
        # so that at 2 stages the two directions are separate NCCL communicators (as xDiT does).
        self._edges: dict[tuple[int, int], object] = {}
        P = config.pipefusion_parallel_degree
        if P > 1:
            for members in config.group_ranks("pipefusion"):
                stages = [self.ranks[r] for r in members]
                for src, dst in [(stages[i], stages[i + 1]) for i in range(P - 1)] + [(stages[-1], stages[0])]:
                    group = dist.new_group([src, dst], timeout=timeout)
                    if me in (src, dst):
                        self._edges[(src, dst)] = group

    def group(self, name: str):
        """The process group of this rank along `name` (ulysses, ring, sp, pipefusion, cfg, mesh, and stage with
        shard_weights or PipeFusion); None if size 1."""
        return self._groups.get(name)

    def members(self, name: str) -> list[int]:
        """Global ranks of this rank's group along `name`, in group-rank order."""
        return self._group_members[name]

    def edge_group(self, src: int, dst: int):
        """The process group of PipeFusion's hand-offs from global rank `src` to `dst` (adjacent stages, or the
        last stage to the first): a group of its own per direction."""
        return self._edges[(src, dst)]

    def size(self, name: str) -> int:
        return len(self._group_members[name])

    def index(self, name: str) -> int:
        """This rank's position inside its group along `name`."""
        import torch.distributed as dist

        return self._group_members[name].index(dist.get_rank())
