"""A latency model of our parallel configurations: per-layer compute, message sizes, links, pipeline.

What it takes:
- a `Workload`: one model at one resolution. Per transformer block, a `BlockCost` (time of everything
  but attention as a + b * tokens, and of one attention kernel call as c + d * queries * keys * head
  fraction), measured on one device (the CPU calibration of `python -m bench`) or derived from FLOPs
  and a device throughput (`flop_workload`); the embedder, head and sampler costs; the shapes that
  decide the message sizes.
- a `ParallelConfig` (xdit_core's mesh: ulysses, ring, pipefusion, cfg, patches, warmup steps).
- a `Cluster`: the links between ranks (`Link`: latency, bandwidth and how much of the overlappable
  traffic hides behind compute), optionally two levels (inside a node, between nodes, with a node's
  ranks sharing its NIC), and whether host dispatch runs ahead of the device (GPU eager).

What it predicts (`predict`): the time of one image, from
- compute per rank: tokens split over the sequence-parallel ranks (Ulysses: heads too), Ring's attention
  in ring-degree kernel calls, PipeFusion's patches attending over the whole K/V buffer;
- communication per rank from `message_bytes`, which reproduces our byte counters exactly (the bench
  checks it on every measured run): Ulysses' four all-to-alls per attention layer are on the critical
  path, Ring's point-to-point hops overlap with the attention of the previous block (the all-gather
  variant does not), PipeFusion's hand-offs overlap with the next patch;
- PipeFusion's pipeline: `warmup_steps` synchronous full-image steps (every stage in turn), then a
  cyclic pipeline whose period is the larger of M patches on the slowest stage and one patch's round
  trip through every stage and back, plus the fill of the first pipelined step (the bubble);
- CFG parallel: each rank evaluates one branch; one all-gather of the prediction per step;
- on a GPU running eagerly, an evaluation takes at least the host's dispatch time of its blocks.

`paper_comm_elements` is the PipeFusion paper's communication table (per device per diffusion step, in
elements) and `exact_comm_elements` the exact per-rank volume of each method under the same idealised
shapes; tests/test_perfmodel.py checks that the exact forms reduce to the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from xdit_core.parallel.comm import COMM_KINDS
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.stages import balance_stages, patch_rows

# ---------------------------------------------------------------------------------------------------
# Links and clusters
# ---------------------------------------------------------------------------------------------------
TRANSFER_KINDS = ("p2p", "all_to_all", "all_gather")


@dataclass(frozen=True)
class LinkCost:
    """One kind of transfer on a link: time = latency per message + bytes on the wire / bandwidth."""

    latency: float  # seconds per message
    bandwidth: float  # bytes per second, per rank and direction


@dataclass(frozen=True)
class Link:
    """The costs of point-to-point, all-to-all and all-gather between two ranks of one link type."""

    name: str
    p2p: LinkCost
    all_to_all: LinkCost
    all_gather: LinkCost
    overlap: float = 1.0  # fraction of an overlappable transfer (ring hop, PipeFusion send) hidden by compute

    def cost(self, kind: str) -> LinkCost:
        return getattr(self, kind)


def uniform_link(name: str, bandwidth: float, latency: float, overlap: float = 1.0) -> Link:
    """A link whose every transfer kind has the same latency and bandwidth (NCCL-style ring algorithms)."""
    c = LinkCost(latency, bandwidth)
    return Link(name, c, c, c, overlap)


# Effective (not peak) per-GPU, per-direction figures; edit them to match a machine. NCCL runs transfers
# on their own streams, so overlappable traffic can hide completely (overlap 1).
LINKS: dict[str, Link] = {
    "pcie": uniform_link("PCIe 4.0 x16", 20e9, 15e-6),  # 32 GB/s peak; peer traffic through the root complex
    "nvlink": uniform_link("NVLink 4 (H100 SXM)", 350e9, 10e-6),  # 450 GB/s peak per direction
    # H800 and A800 (the export parts): 200 GB/s peak per direction, at the H100 preset's share of its peak.
    "nvlink400": uniform_link("NVLink 400 GB/s (H800, A800)", 350e9 * 200 / 450, 10e-6),
    "eth25": uniform_link("25 GbE", 2.8e9, 50e-6),  # 3.125 GB/s line rate, NCCL over sockets
}


@dataclass(frozen=True)
class Cluster:
    """Where the ranks run: `link` inside a node; with `nodes` > 1, `inter` between nodes, the ranks of a
    node sharing its NIC. `host_bound`: GPU eager mode, an evaluation lasts at least the host's dispatch.
    `contention`: multi-rank compute is this much slower than one rank alone (CPU ranks sharing cores)."""

    name: str
    link: Link
    nodes: int = 1
    inter: Optional[Link] = None
    host_bound: bool = False
    contention: float = 1.0  # compute slowdown while every rank computes at once (shared CPU cores)


def transfer_time(cluster: Cluster, kind: str, group: Sequence[int], world: int, nbytes: float,
                  sharing: Optional[int] = None) -> float:
    """Seconds for the first rank of `group` to move `nbytes` (its local tensor) by `kind` over the group.

    Wire bytes per rank: p2p the tensor; all-to-all (n-1)/n of it; all-gather (n-1) copies. Latency is
    paid once per peer (ring algorithms). A group that spans nodes sends the remote share over `inter`,
    whose bandwidth `sharing` ranks of the node use at once (default: all of the node's ranks).
    """
    n = len(group)
    if n <= 1 or nbytes <= 0:
        return 0.0
    wire = {"p2p": nbytes, "all_to_all": nbytes * (n - 1) / n, "all_gather": nbytes * (n - 1)}[kind]
    messages = 1 if kind == "p2p" else n - 1
    local = cluster.link.cost(kind)
    per_node = -(-world // cluster.nodes)
    me = group[0] // per_node
    remote = sum(1 for r in group[1:] if r // per_node != me) / (n - 1)
    if remote == 0 or cluster.inter is None:
        return messages * local.latency + wire / local.bandwidth
    far = cluster.inter.cost(kind)
    t_local = wire * (1 - remote) / local.bandwidth
    t_far = wire * remote / (far.bandwidth / (sharing or per_node))
    return messages * max(local.latency, far.latency) + max(t_local, t_far)


# ---------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockCost:
    """Compute time of one transformer block on one device.

    rest(tokens): everything but the attention kernels, linear in the block's local tokens.
    attention(q, k, f): one attention kernel call of q queries and k keys on a fraction f of the heads.
    host: seconds the host needs to dispatch the block (only used when the cluster is host-bound).
    """

    rest_fixed: float
    rest_per_token: float
    attn_fixed: float
    attn_per_qk: float
    host: float = 0.0

    def rest(self, tokens: float) -> float:
        return self.rest_fixed + self.rest_per_token * tokens

    def attention(self, q: float, k: float, heads: float = 1.0) -> float:
        return self.attn_fixed + self.attn_per_qk * q * k * heads


@dataclass(frozen=True)
class Workload:
    """One model at one resolution, with its per-block costs on one device.

    Attention kinds follow the engine: `joint_text` models (Flux, SD3) attend over text and image tokens
    together; otherwise (PixArt) the image attends to itself and, by a second call per block, to the
    text (`cross_text`). `latent` is the sampler state [B, C, h, w] (float32); `patch` latent rows per
    token row. `embed`, `head`: (fixed, per token) seconds for the whole image, every evaluation;
    `step_fixed`: the sampler's own work per step.
    """

    name: str
    blocks: tuple[BlockCost, ...]
    block_bytes: tuple[int, ...]
    heads: int
    head_dim: int
    img_tokens: int
    txt_tokens: int
    joint_text: bool
    latent: tuple[int, int, int, int]
    branches: int = 1
    act_bytes: int = 4
    patch: int = 2
    cross_text: bool = False
    embed: tuple[float, float] = (0.0, 0.0)
    head: tuple[float, float] = (0.0, 0.0)
    step_fixed: float = 0.0
    sp_overhead: tuple[float, float] = (0.0, 0.0)
    ring_hop_host: float = 0.0  # host dispatch of one extra ring hop per block (attention call, merge, p2p)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def batch(self) -> int:
        return self.latent[0]

    def embed_s(self) -> float:
        return self.embed[0] + self.embed[1] * (self.img_tokens + self.txt_tokens)

    def head_s(self, tokens: float) -> float:
        return self.head[0] + self.head[1] * tokens

    def sp_overhead_s(self, tokens: float, blocks: int) -> float:
        """The parallel attention machinery's cost over `blocks` of the model's blocks at `tokens` local tokens."""
        return (self.sp_overhead[0] + self.sp_overhead[1] * tokens) * blocks / len(self.blocks)


# ---------------------------------------------------------------------------------------------------
# Message sizes (exactly what xdit_core's counters record)
# ---------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sp_layout(w: Workload, sp: int) -> tuple[int, int, int]:
    """(image tokens per rank, split length, replicated text length) of a sequence-parallel evaluation."""
    img_loc = _cdiv(w.img_tokens, sp)
    if not w.joint_text:
        return img_loc, img_loc, 0
    if w.txt_tokens % sp == 0:
        return img_loc, img_loc + w.txt_tokens // sp, 0
    return img_loc, img_loc, w.txt_tokens


def _pf_units(w: Workload, config: ParallelConfig) -> list[tuple[int, int]]:
    """PipeFusion's patches as (latent rows, image tokens)."""
    _, _, h, wid = w.latent
    per_row = wid // w.patch
    rows = patch_rows(h, config.num_pipeline_patch or config.pipefusion_parallel_degree, w.patch)
    return [(r1 - r0, (r1 - r0) // w.patch * per_row) for r0, r1 in rows]


def message_bytes(
    w: Workload, config: ParallelConfig, rank: int = 0, steps: int = 1, ring_impl: str = "p2p"
) -> dict[str, int]:
    """Bytes mesh rank `rank` sends over `steps` euler steps, by counter kind (as CommCounter.per_step
    summed over the steps; PipeFusion's final broadcast of the result comes after the last step and is
    not included)."""
    out = {k: 0 for k in COMM_KINDS}
    if config.world_size == 1:
        return out
    U, R = config.ulysses_degree, config.ring_degree
    S, P, C = U * R, config.pipefusion_parallel_degree, config.cfg_degree
    coords = config.coords(rank)
    B, H, d, a = w.batch, w.heads, w.head_dim, w.act_bytes
    _, lat_c, lat_h, lat_w = w.latent
    evals = w.branches // C  # branches this rank evaluates per step
    layers = len(w.blocks)
    if P == 1:
        if S > 1:
            img_loc, split_len, rep_len = _sp_layout(w, S)
            local = B * H * split_len * d * a
            per_eval = {
                "ulysses_all_to_all": layers * 4 * (local * (U - 1) // U),
                "ulysses_all_gather": layers * (U - 1) * B * (H // U) * rep_len * d * a,
                ("ring_all_gather" if ring_impl == "allgather" else "ring_p2p"): layers
                * (R - 1)
                * 2
                * B
                * (H // U)
                * U
                * split_len
                * d
                * a,
                "sp_gather": (S - 1) * B * img_loc * w.hidden * a,
            }
            for k, v in per_eval.items():
                out[k] += v * evals * steps
        if C > 1:
            out["cfg_gather"] += B * lat_c * lat_h * lat_w * 4 * steps
        return out
    stage = coords["pipefusion"]
    last = stage == P - 1
    patches = _pf_units(w, config)
    stage_blocks = len(balance_stages(list(w.block_bytes), P)[stage])
    txt_joint = w.txt_tokens if w.joint_text else 0
    warm = min(config.warmup_steps, steps)
    units_per_round = [[(lat_h, w.img_tokens)]] * warm + [patches] * (steps - warm)
    for rnd, units in enumerate(units_per_round):
        for rows, tokens in units:
            loc = _cdiv(tokens, S)
            per_branch = {
                "ulysses_all_to_all": stage_blocks * 4 * (B * H * loc * d * a * (U - 1) // U),
                "ulysses_all_gather": stage_blocks * (U - 1) * B * (H // U) * txt_joint * d * a,
                "ring_all_gather": stage_blocks * (R - 1) * 2 * B * (H // U) * U * loc * d * a,
                "pipefusion_p2p": 0 if last else B * (loc + txt_joint) * w.hidden * a,
                "sp_gather": (S - 1) * B * loc * w.hidden * a if last else 0,
            }
            for k, v in per_branch.items():
                out[k] += v * evals
            if last:
                latent_bytes = B * lat_c * rows * lat_w * 4
                out["cfg_gather"] += latent_bytes * (C - 1)
                if rnd + 1 < steps:
                    out["pipefusion_p2p"] += latent_bytes
    out["control"] += (P - 1) * 6 * 8  # the schedule check before the first step
    return out


# ---------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Seconds for one image and where they go (per step unless named otherwise)."""

    total: float
    per_step: float
    breakdown: dict[str, float] = field(default_factory=dict)


def _groups(config: ParallelConfig, dim: str | tuple[str, ...], rank: int = 0) -> list[int]:
    for g in config.group_ranks(dim):
        if rank in g:
            return g
    raise ValueError(f"rank {rank} is in no {dim} group")


def _attention_calls(b: BlockCost, w: Workload, q: float, keys: Sequence[float], heads: float, cross_q: float) -> float:
    t = sum(b.attention(q, k, heads) for k in keys)
    if w.cross_text:
        t += b.attention(cross_q, w.txt_tokens, 1.0)
    return t


def _sp_eval(w: Workload, config: ParallelConfig, cluster: Cluster, ring_impl: str) -> dict[str, float]:
    """One evaluation (one CFG branch) under Ulysses x Ring on rank 0: compute, exposed comm, host."""
    U, R = config.ulysses_degree, config.ring_degree
    S = U * R
    world = config.world_size
    img_loc, split_len, rep_len = _sp_layout(w, S)
    local_tokens = split_len + rep_len if w.joint_text else img_loc
    uly, ring, sp = _groups(config, "ulysses"), _groups(config, "ring"), _groups(config, ("ulysses", "ring"))
    B, H, d, a = w.batch, w.heads, w.head_dim, w.act_bytes
    q = U * split_len + rep_len
    keys = [U * split_len] * R + ([rep_len] if rep_len else [])
    compute = comm = 0.0
    a2a = transfer_time(cluster, "all_to_all", uly, world, B * H * split_len * d * a)
    rep_gather = transfer_time(cluster, "all_gather", uly, world, B * (H // U) * rep_len * d * a)
    kv = 2 * B * H * split_len * d * a
    for b in w.blocks:
        attn = _attention_calls(b, w, q, keys, 1.0 / U, img_loc)
        compute += b.rest(local_tokens) + attn
        comm += 4 * a2a + rep_gather
        if R > 1 and ring_impl == "allgather":
            comm += transfer_time(cluster, "all_gather", ring, world, kv)
        elif R > 1:
            hop = transfer_time(cluster, "p2p", ring[:2], world, kv)
            block_attn = b.attention(q, U * split_len, 1.0 / U)
            comm += (R - 1) * (hop - cluster.link.overlap * min(hop, block_attn))
    comm += transfer_time(cluster, "all_gather", sp, world, B * img_loc * w.hidden * a)
    compute += w.embed_s() + w.head_s(w.img_tokens) + w.sp_overhead_s(local_tokens, len(w.blocks))
    host = sum(b.host for b in w.blocks) + len(w.blocks) * (R - 1) * w.ring_hop_host
    return {"compute": compute, "comm": comm, "host": host}


def _evaluation_time(parts: dict[str, float], cluster: Cluster, world: int) -> float:
    device = parts["compute"] * (cluster.contention if world > 1 else 1.0) + parts["comm"]
    return max(device, parts["host"]) if cluster.host_bound else device


def _pf_stage(
    w: Workload,
    config: ParallelConfig,
    cluster: Cluster,
    stage_blocks: Sequence[BlockCost],
    tokens: int,
    rows: int,
    last: bool,
) -> dict[str, float]:
    """One stage on one unit of `tokens` image tokens (all branches this rank evaluates)."""
    U, R = config.ulysses_degree, config.ring_degree
    S = U * R
    world = config.world_size
    evals = w.branches // config.cfg_degree
    loc = _cdiv(tokens, S)
    txt = w.txt_tokens if w.joint_text else 0
    uly, ring, sp = _groups(config, "ulysses"), _groups(config, "ring"), _groups(config, ("ulysses", "ring"))
    B, H, d, a = w.batch, w.heads, w.head_dim, w.act_bytes
    q = U * loc + txt
    keys = [w.img_tokens] + ([txt] if txt else [])
    compute = comm = 0.0
    a2a = transfer_time(cluster, "all_to_all", uly, world, B * H * loc * d * a)
    rep_gather = transfer_time(cluster, "all_gather", uly, world, B * (H // U) * txt * d * a)
    fresh = transfer_time(cluster, "all_gather", ring, world, 2 * B * (H // U) * U * loc * d * a)
    for b in stage_blocks:
        compute += b.rest(loc + txt) + _attention_calls(b, w, q, keys, 1.0 / U, loc)
        comm += 4 * a2a + rep_gather + fresh
    compute += w.embed_s() + w.sp_overhead_s(loc + txt, len(stage_blocks))  # every stage embeds the whole image
    if last:
        comm += transfer_time(cluster, "all_gather", sp, world, B * loc * w.hidden * a)
        compute += w.head_s(tokens)
        if config.cfg_degree > 1:
            comm += transfer_time(
                cluster, "all_gather", _groups(config, "cfg"), world, B * w.latent[1] * rows * w.latent[3] * 4
            )
    host = sum(b.host for b in stage_blocks)
    sampler = w.step_fixed * tokens / w.img_tokens if last else 0.0  # once per unit, whatever the branches
    return {"compute": compute * evals + sampler, "comm": comm * evals, "host": host * evals}


def _pipefusion(w: Workload, config: ParallelConfig, cluster: Cluster, steps: int) -> Prediction:
    P, S = config.pipefusion_parallel_degree, config.sp_degree
    world = config.world_size
    ranges = balance_stages(list(w.block_bytes), P)
    stages = [[w.blocks[i] for i in r] for r in ranges]
    patches = _pf_units(w, config)
    M = len(patches)
    txt = w.txt_tokens if w.joint_text else 0
    B, _, h, lat_w = w.latent
    evals = w.branches // config.cfg_degree

    def hop(stage: int, tokens: int) -> float:  # stage -> stage + 1, per unit (all branches)
        peers = [config.rank_of({"ulysses": 0, "ring": 0, "pipefusion": s, "cfg": 0}) for s in (stage, stage + 1)]
        nbytes = B * (_cdiv(tokens, S) + txt) * w.hidden * w.act_bytes
        return evals * transfer_time(cluster, "p2p", peers, world, nbytes, sharing=S)  # the stage's S ranks send

    def back(rows: int) -> float:  # last stage -> stage 0: the patch's next input
        peers = [config.rank_of({"ulysses": 0, "ring": 0, "pipefusion": s, "cfg": 0}) for s in (P - 1, 0)]
        return transfer_time(cluster, "p2p", peers, world, B * w.latent[1] * rows * lat_w * 4, sharing=1)

    def stage_time(s: int, tokens: int, rows: int) -> float:
        return _evaluation_time(_pf_stage(w, config, cluster, stages[s], tokens, rows, s == P - 1), cluster, world)

    warm_round = (
        sum(stage_time(s, w.img_tokens, h) for s in range(P))
        + sum(hop(s, w.img_tokens) for s in range(P - 1))
        + back(h)
    )
    rows, tokens = max(patches, key=lambda p: p[1])
    tau = [stage_time(s, tokens, rows) for s in range(P)]
    hops = [hop(s, tokens) for s in range(P - 1)] + [back(rows)]
    hidden = cluster.link.overlap
    busy = [t + (1 - hidden) * x for t, x in zip(tau, hops)]
    cycle = sum(tau) + sum(hops)
    period = max(M * max(busy), cycle)
    fill = sum(tau[:-1]) + sum(hops[:-1])
    warm = min(config.warmup_steps, steps)
    pipelined = steps - warm
    total = warm * warm_round + pipelined * period + (fill if pipelined else 0.0)
    breakdown = {
        "warmup_step": warm_round,
        "period": period,
        "fill": fill if pipelined else 0.0,
        "patch_stage": max(tau),
        "hop": max(hops),
        "patches": float(M),
    }
    return Prediction(total, total / steps, breakdown)


def predict(w: Workload, config: ParallelConfig, cluster: Cluster, steps: int, ring_impl: str = "p2p") -> Prediction:
    """Seconds for one image of `steps` euler steps under `config` on `cluster` (see the module docstring)."""
    if config.pipefusion_parallel_degree > 1:
        return _pipefusion(w, config, cluster, steps)
    C = config.cfg_degree
    evals = w.branches // C
    if config.sp_degree > 1:
        parts = _sp_eval(w, config, cluster, ring_impl)
    else:
        compute = (
            sum(
                b.rest(w.img_tokens + (w.txt_tokens if w.joint_text else 0))
                + _attention_calls(
                    b,
                    w,
                    w.img_tokens + (w.txt_tokens if w.joint_text else 0),
                    [w.img_tokens + (w.txt_tokens if w.joint_text else 0)],
                    1.0,
                    w.img_tokens,
                )
                for b in w.blocks
            )
            + w.embed_s()
            + w.head_s(w.img_tokens)
        )
        parts = {"compute": compute, "comm": 0.0, "host": sum(b.host for b in w.blocks)}
    evaluation = _evaluation_time(parts, cluster, config.world_size)
    cfg_comm = 0.0
    if C > 1:
        B, c, h, lw = w.latent
        cfg_comm = transfer_time(cluster, "all_gather", _groups(config, "cfg"), config.world_size, B * c * h * lw * 4)
    per_step = evals * evaluation + cfg_comm + w.step_fixed
    breakdown = {
        "compute": evals * parts["compute"],
        "comm": evals * parts["comm"] + cfg_comm,
        "host": evals * parts["host"],
        "sampler": w.step_fixed,
    }
    return Prediction(steps * per_step, per_step, breakdown)


# ---------------------------------------------------------------------------------------------------
# Workloads from FLOPs (GPU predictions) and the calibration to one published time
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """A DiT's shape: blocks of two kinds (dual-stream / single-stream, or one kind), text tokens."""

    name: str
    family: str  # engine family whose attention layout it follows ("flux", "sd3": joint text; "pixart", "wan": cross)
    double_blocks: int
    single_blocks: int
    heads: int
    head_dim: int
    txt_tokens: int
    latent_channels: int = 16
    mlp_ratio: float = 4.0
    dtype_bytes: int = 2

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def cross_text(self) -> bool:
        """Text enters by cross-attention: replicated on every rank, never exchanged (PixArt, Wan)."""
        return self.family in ("pixart", "wan")

    def linear_flops_per_token(self) -> float:
        """FLOPs of a block's token-wise linear layers per image/video token: q, k, v, out (4 h^2), MLP (2 r h^2)
        and, with cross-attention, its query and output projections (2 h^2)."""
        return 2.0 * (4 + 2 * self.mlp_ratio + (2 if self.cross_text else 0)) * self.hidden**2

    def text_kv_flops(self) -> float:
        """FLOPs of a block's cross-attention key and value projections of the text, per evaluation: every
        sequence-parallel rank computes them in full (0 for joint text, whose projections are per token)."""
        return 2.0 * 2 * self.hidden**2 * self.txt_tokens if self.cross_text else 0.0

    def block_param_bytes(self) -> tuple[int, ...]:
        """Parameter bytes per block: token-wise weights plus adaLN modulation (6 h^2 per stream, 3 h^2 single);
        cross-attention blocks add its q, k, v, out (4 h^2) and share one modulation projection (none per block)."""
        h2 = self.hidden**2
        token_wise = (4 + 2 * self.mlp_ratio) * h2
        if self.cross_text:
            return (int((token_wise + 4 * h2) * self.dtype_bytes),) * (self.double_blocks + self.single_blocks)
        double = int((2 * token_wise + 12 * h2) * self.dtype_bytes)
        single = int((token_wise + 3 * h2) * self.dtype_bytes)
        return (double,) * self.double_blocks + (single,) * self.single_blocks


FLUX_DEV = Architecture("FLUX.1-dev", "flux", 19, 38, 24, 128, 512)
HUNYUAN_VIDEO = Architecture("HunyuanVideo", "flux", 20, 40, 24, 128, 256)
SD35_LARGE = Architecture("SD3.5 Large", "sd3", 38, 0, 38, 64, 333)  # 77 CLIP + 256 T5 tokens
# xdit_core/loading/configs/wan2.1-t2v-14b.json: dim 5120, FFN 13824, 512 umT5 tokens by cross-attention.
WAN21_T2V_14B = Architecture("Wan2.1 T2V 14B", "wan", 40, 0, 40, 128, 512, mlp_ratio=13824 / 5120)


def flop_workload(
    arch: Architecture,
    height: int,
    width: int,
    frames: int = 1,
    branches: int = 1,
    s_per_flop: float = 1e-15,
    attn_slowdown: float = 2.0,
    host_per_block: tuple[float, float] = (0.0, 0.0),
    attn_call_s: float = 0.0,
    ring_hop_host: float = 0.0,
) -> Workload:
    """A workload whose block times are FLOPs x `s_per_flop` (attention FLOPs x `attn_slowdown`: attention
    kernels reach a lower fraction of peak than GEMMs), plus `attn_call_s` of device time per attention
    kernel call (what a ring hop costs beyond its FLOPs). `host_per_block`: (double, single) dispatch
    seconds; `ring_hop_host`: dispatch seconds of one extra ring hop.
    Video: `frames` pixel frames, 4x temporal compression (129 frames -> 33 latent frames), 2x2 patches; the
    latent's frames are stacked as rows ([B, C, frames x h, w]: the bytes of the CFG gather).
    Cross-attention text (PixArt, Wan): a second attention call per block of the local queries against all text
    tokens, and the text's key/value projections as each block's fixed cost (replicated on every rank)."""
    latent_frames = 1 if frames == 1 else (frames - 1) // 4 + 1
    h, w = height // 8, width // 8
    img = latent_frames * (h // 2) * (w // 2)
    lin = arch.linear_flops_per_token() * s_per_flop
    attn = 4.0 * arch.head_dim * arch.heads * s_per_flop * attn_slowdown
    kv = arch.text_kv_flops() * s_per_flop
    double = BlockCost(kv, lin, attn_call_s, attn, host_per_block[0])
    single = BlockCost(kv, lin, attn_call_s, attn, host_per_block[1])
    return Workload(
        f"{arch.name} {width}x{height}" + (f"x{frames}" if frames > 1 else ""),
        (double,) * arch.double_blocks + (single,) * arch.single_blocks,
        arch.block_param_bytes(),
        arch.heads,
        arch.head_dim,
        img,
        arch.txt_tokens,
        not arch.cross_text,
        (1, arch.latent_channels, h * latent_frames, w),
        branches=branches,
        act_bytes=arch.dtype_bytes,
        cross_text=arch.cross_text,
        ring_hop_host=ring_hop_host,
    )


def calibrate_throughput(make: Any, target_s: float, cluster: Cluster, steps: int) -> float:
    """The seconds-per-FLOP for which `make(s_per_flop)`'s serial prediction equals `target_s` (bisection
    on a log scale; the prediction grows monotonically with it)."""
    lo, hi = 1e-18, 1e-9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if predict(make(mid), ParallelConfig(), cluster, steps).total < target_s:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


# ---------------------------------------------------------------------------------------------------
# The PipeFusion paper's communication table
# ---------------------------------------------------------------------------------------------------
PAPER_METHODS = ("tensor_parallel", "distrifusion", "ring", "ulysses", "pipefusion")


def paper_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Communication per device per diffusion step in the PipeFusion paper (arXiv 2405.14430), in
    elements: p tokens, hs hidden size, L layers, N devices. Works on numbers and sympy symbols."""
    return {
        "tensor_parallel": 4 * p * hs * L,
        "distrifusion": 2 * p * hs * L,
        "ring": 2 * p * hs * L,
        "ulysses": 4 * p * hs * L / N,
        "pipefusion": 2 * p * hs,
    }[method]


def exact_comm_elements(method: str, p: Any, hs: Any, L: Any, N: Any) -> Any:
    """Exact elements one device sends per step under the paper's idealisation (p divisible by N,
    one branch): TP two ring all-reduces per layer; DistriFusion an all-gather of K and V per layer;
    Ring N-1 hops of the local K and V per layer; Ulysses four all-to-alls (Q, K, V, output) per layer;
    PipeFusion, a middle stage: the activations of every patch received and sent once per step."""
    return {
        "tensor_parallel": 2 * 2 * (N - 1) * p * hs * L / N,
        "distrifusion": 2 * (N - 1) * p * hs * L / N,
        "ring": 2 * (N - 1) * p * hs * L / N,
        "ulysses": 4 * (N - 1) * p * hs * L / N**2,
        "pipefusion": 2 * p * hs,
    }[method]


def method_of(config: ParallelConfig) -> Optional[str]:
    """The paper's method a single-method config is (None for hybrids and CFG)."""
    active = [k for k, v in config.degrees.items() if v > 1]
    if len(active) != 1:
        return None
    return {"ulysses": "ulysses", "ring": "ring", "pipefusion": "pipefusion"}.get(active[0])


# ---------------------------------------------------------------------------------------------------
# Configurations and advice
# ---------------------------------------------------------------------------------------------------
def candidate_configs(ranks: int, heads: int, blocks: int, branches: int) -> list[ParallelConfig]:
    """Every mesh of `ranks` ranks the engine accepts for this model (PipeFusion with M = stages)."""
    out = []
    for c in (1, 2) if branches == 2 else (1,):
        if ranks % c:
            continue
        rest = ranks // c
        for p in range(1, rest + 1):
            if rest % p or p > blocks:
                continue
            for r in range(1, rest // p + 1):
                if (rest // p) % r:
                    continue
                u = rest // p // r
                if heads % u:
                    continue
                out.append(
                    ParallelConfig(
                        ulysses_degree=u, ring_degree=r, pipefusion_parallel_degree=p, use_cfg_parallel=c == 2
                    )
                )
    return out


def describe(config: ParallelConfig) -> str:
    """Short name: 'cfg2 x pf2 x u2', 'serial'."""
    parts = [
        f"{name}{deg}"
        for name, deg in (
            ("cfg", config.cfg_degree),
            ("pf", config.pipefusion_parallel_degree),
            ("r", config.ring_degree),
            ("u", config.ulysses_degree),
        )
        if deg > 1
    ]
    return " x ".join(parts) or "serial"


def best_config(
    w: Workload, ranks: int, cluster: Cluster, steps: int, blocks: Optional[int] = None
) -> tuple[ParallelConfig, float]:
    """The fastest predicted mesh of `ranks` ranks and its seconds."""
    configs = candidate_configs(ranks, w.heads, blocks or len(w.blocks), w.branches)
    timed = [(predict(w, c, cluster, steps).total, i, c) for i, c in enumerate(configs)]
    t, _, c = min(timed)
    return c, t
