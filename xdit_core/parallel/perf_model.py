"""A latency model of our parallel configurations: per-layer compute, message sizes, links, pipeline.

What it takes:
- a `Workload`: one model at one resolution. Per transformer block, a `BlockCost` (time of everything
  but attention as a + b * tokens, and of one attention kernel call as c + d * queries * keys * head
  fraction), measured on one device (the CPU calibration of `python -m bench`) or derived from FLOPs
  and a device throughput (`perf_workloads.flop_workload`); the weights PipeFusion splits its stages by
  (the engine's `stages.block_flops`); the embedder, head and sampler costs; the shapes that decide the
  message sizes.
- a `ParallelConfig` (xdit_core's mesh: ulysses, ring, pipefusion, cfg, patches, warmup steps).
- a `Cluster`: the links between ranks (`Link`: latency, bandwidth and how much of the overlappable
  traffic hides behind compute) at up to three levels: inside a fast group (NVLink), between a node's
  groups (PCIe), between nodes (a network whose NIC the node's ranks share); and whether host dispatch
  runs ahead of the device (GPU eager).

What it predicts (`predict`): the time of one image, from
- compute per rank: tokens split over the sequence-parallel ranks (Ulysses: heads too), Ring's attention
  in ring-degree kernel calls, PipeFusion's patches attending over the whole K/V buffer;
- communication per rank from `message_bytes`, which reproduces our byte counters exactly (the bench
  checks it on every measured run): Ulysses' all-to-alls per attention layer (Q, K and V in one, then the
  output) are on the critical path, Ring's point-to-point hops overlap with the attention of the previous
  block (the all-gather variant does not), PipeFusion's hand-offs overlap with the next patch;
- PipeFusion's pipeline: stages split by compute as the engine splits them; `warmup_steps` synchronous
  full-image steps (every stage in turn), then patches flowing across step boundaries without a drain:
  a period per step, the larger of the slowest stage's step (its M patches) and one patch's round trip
  through every stage and back, plus one fill and one drain for the whole run. Joint text rides with
  patch 0 only (its compute once per stage and step); stage 0 embeds only each patch's tokens;
- CFG parallel: each rank evaluates one branch; one all-gather of the prediction per step;
- on a GPU running eagerly, an evaluation takes at least the host's dispatch time of its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from xdit_core.parallel.comm import COMM_KINDS
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.stages import balance_stages, patch_rows

# ---------------------------------------------------------------------------------------------------
# Links and clusters
# ---------------------------------------------------------------------------------------------------
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


# The one table of nominal links: effective (not peak) per-GPU, per-direction figures; edit them to match a
# machine. NCCL runs transfers on their own streams, so overlappable traffic can hide completely (overlap 1).
LINKS: dict[str, Link] = {
    "pcie": uniform_link("PCIe 4.0 x16", 20e9, 15e-6),  # 32 GB/s peak; peer traffic through the root complex
    "nvlink": uniform_link("NVLink 4 (H100 SXM)", 350e9, 10e-6),  # 450 GB/s peak per direction
    # H800 and A800 (the export parts): 200 GB/s peak per direction, at the H100 preset's share of its peak.
    "nvlink400": uniform_link("NVLink 400 GB/s (H800, A800)", 350e9 * 200 / 450, 10e-6),
    "eth100": uniform_link("100 GbE", 11e9, 30e-6),  # 12.5 GB/s line rate, NCCL over RoCE or sockets
    "eth25": uniform_link("25 GbE", 2.8e9, 50e-6),  # 3.125 GB/s line rate, NCCL over sockets
}


@dataclass(frozen=True)
class Cluster:
    """Where the ranks run.

    `link` joins the ranks of one fast group (by default a whole node); `bridge` the groups of one node (PCIe
    between NVLink groups; None: `link`); `inter` the nodes (None: `link`), whose NIC a node's ranks share.
    `places`: each rank's (node, group); empty: the ranks fill `nodes` nodes evenly, one group per node.
    `host_bound`: GPU eager mode, an evaluation lasts at least the host's dispatch.
    `contention`: multi-rank compute is this much slower than one rank alone (CPU ranks sharing cores)."""

    name: str
    link: Link
    nodes: int = 1
    inter: Optional[Link] = None
    host_bound: bool = False
    contention: float = 1.0
    bridge: Optional[Link] = None
    places: tuple[tuple[int, int], ...] = ()

    def place(self, rank: int, world: int) -> tuple[int, int]:
        """(node, fast group) of `rank` in a world of `world` ranks."""
        if self.places:
            return self.places[rank]
        node = rank // -(-world // self.nodes)
        return node, node


def transfer_time(cluster: Cluster, kind: str, group: Sequence[int], world: int, nbytes: float,
                  sharing: Optional[int] = None) -> float:
    """Seconds for the first rank of `group` to move `nbytes` (its local tensor) by `kind` over the group.

    Wire bytes per rank: p2p the tensor; all-to-all (n-1)/n of it; all-gather (n-1) copies. Latency is
    paid once per peer (ring algorithms), at the slowest link's. Each peer's share goes over the link that
    joins it (fast group, node, network; the slowest share bounds the time); over the network the bandwidth is
    shared by `sharing` ranks of the node at once (default: all of the node's ranks).
    """
    n = len(group)
    if n <= 1 or nbytes <= 0:
        return 0.0
    wire = {"p2p": nbytes, "all_to_all": nbytes * (n - 1) / n, "all_gather": nbytes * (n - 1)}[kind]
    messages = 1 if kind == "p2p" else n - 1
    me = cluster.place(group[0], world)
    peers: dict[str, int] = {}
    for r in group[1:]:
        node, fast = cluster.place(r, world)
        level = "link" if (node, fast) == me else "bridge" if node == me[0] else "inter"
        level = level if getattr(cluster, level) is not None else "link"
        peers[level] = peers.get(level, 0) + 1
    node_ranks = sum(1 for r in range(world) if cluster.place(r, world)[0] == me[0])
    latency, seconds = 0.0, 0.0
    for level, count in peers.items():
        cost = getattr(cluster, level).cost(kind)
        bandwidth = cost.bandwidth / ((sharing or node_ranks) if level == "inter" else 1)
        latency = max(latency, cost.latency)
        seconds = max(seconds, wire * count / (n - 1) / bandwidth)
    return messages * latency + seconds


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
    text (`cross_text`). `split_costs`: per block, what PipeFusion balances its stages by (the engine's
    `stages.block_flops`). `latent` is the sampler state [B, C, h, w] (float32); `patch` latent rows per
    token row. `embed`, `head`: (fixed, per token) seconds, every evaluation; `step_fixed`: the sampler's
    own work per step.
    """

    name: str
    blocks: tuple[BlockCost, ...]
    split_costs: tuple[float, ...]
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
    text_every_unit: bool = False  # PipeFusion sends the joint text with every patch (Qwen-Image: TEXT_EVERY_UNIT)
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

    @property
    def joint_txt(self) -> int:
        """Text tokens that join the image's sequence (0 for cross-attention text)."""
        return self.txt_tokens if self.joint_text else 0

    def embed_s(self, tokens: Optional[float] = None) -> float:
        """Embedding `tokens` (default: the whole image and its text)."""
        return self.embed[0] + self.embed[1] * (self.img_tokens + self.txt_tokens if tokens is None else tokens)

    def head_s(self, tokens: float) -> float:
        return self.head[0] + self.head[1] * tokens

    def sp_overhead_s(self, tokens: float, blocks: int) -> float:
        """The parallel attention machinery's cost over `blocks` of the model's blocks at `tokens` local tokens."""
        return (self.sp_overhead[0] + self.sp_overhead[1] * tokens) * blocks / len(self.blocks)

    def stages(self, stages: int) -> list[range]:
        """PipeFusion's split into `stages`, as the engine makes it."""
        return balance_stages(list(self.split_costs), stages)


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


@dataclass(frozen=True)
class PipeUnit:
    """What flows through PipeFusion's stages at once: some latent rows, their image tokens, and whether the
    joint text travels with it (the whole image in a warmup step; patch 0 of a pipelined step)."""

    rows: int
    tokens: int
    text: bool


def pipe_units(w: Workload, config: ParallelConfig, warm: bool) -> list[PipeUnit]:
    """The units of one step: the whole image (warmup) or the M patches."""
    _, _, h, wid = w.latent
    if warm:
        return [PipeUnit(h, w.img_tokens, True)]
    per_row = wid // w.patch
    rows = patch_rows(h, config.num_pipeline_patch or config.pipefusion_parallel_degree, w.patch)
    return [PipeUnit(r1 - r0, (r1 - r0) // w.patch * per_row, m == 0 or w.text_every_unit)
            for m, (r0, r1) in enumerate(rows)]


def handoff_elements(w: Workload, unit: PipeUnit, sp: int) -> int:
    """Elements of one forward hand-off (stage s -> s + 1) per sequence-parallel rank: the unit's local image
    tokens, the joint text when it travels with the unit, and the in-band cancel flag."""
    return w.batch * (_cdiv(unit.tokens, sp) + (w.joint_txt if unit.text else 0)) * w.hidden + 1


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
    B, H, d, a = w.batch, w.heads, w.head_dim, w.act_bytes
    _, lat_c, lat_h, lat_w = w.latent
    evals = w.branches // C  # branches this rank evaluates per step
    if P == 1:
        if S > 1:
            layers = len(w.blocks)
            img_loc, split_len, rep_len = _sp_layout(w, S)
            local = B * H * split_len * d * a
            ring_kind = "ring_all_gather" if ring_impl == "allgather" else "ring_p2p"
            per_eval = {
                "ulysses_all_to_all": layers * 4 * (local * (U - 1) // U),
                "ulysses_all_gather": layers * (U - 1) * B * (H // U) * rep_len * d * a,
                ring_kind: layers * (R - 1) * 2 * B * (H // U) * U * split_len * d * a,
                "sp_gather": (S - 1) * B * img_loc * w.hidden * a,
            }
            for k, v in per_eval.items():
                out[k] += v * evals * steps
        if C > 1:
            out["cfg_gather"] += B * lat_c * lat_h * lat_w * 4 * steps
        return out
    stage = config.coords(rank)["pipefusion"]
    last = stage == P - 1
    stage_blocks = len(w.stages(P)[stage])
    warm = min(config.warmup_steps, steps)
    for step in range(steps):
        for unit in pipe_units(w, config, step < warm):
            loc = _cdiv(unit.tokens, S)
            text = w.joint_txt if unit.text else 0
            per_branch = {
                "ulysses_all_to_all": stage_blocks * 4 * (B * H * loc * d * a * (U - 1) // U),
                "ulysses_all_gather": stage_blocks * (U - 1) * B * (H // U) * text * d * a,
                "ring_all_gather": stage_blocks * (R - 1) * 2 * B * (H // U) * U * loc * d * a,
                "pipefusion_p2p": 0 if last else handoff_elements(w, unit, S) * a,
                "sp_gather": (S - 1) * B * loc * w.hidden * a if last else 0,
            }
            for k, v in per_branch.items():
                out[k] += v * evals
            if last:
                latent_bytes = B * lat_c * unit.rows * lat_w * 4
                out["cfg_gather"] += latent_bytes * (C - 1)
                if step + 1 < steps:  # the patch's next input, back to stage 0
                    out["pipefusion_p2p"] += latent_bytes
    out["control"] += (P - 1) * 6 * 8  # the schedule check before the first step
    if rank == 0:  # at each later step's start stage 0's ranks agree on the cancel flag (one float32 broadcast)
        out["control"] += (steps - 1) * 4 * (S * C - 1)
    return out


# ---------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Seconds for one image and where they go (per step unless named otherwise); under PipeFusion, each
    stage's seconds per pipelined step."""

    total: float
    per_step: float
    breakdown: dict[str, float] = field(default_factory=dict)
    stage_times: tuple[float, ...] = ()


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
    qkv = transfer_time(cluster, "all_to_all", uly, world, 3 * B * H * split_len * d * a)  # Q, K, V in one
    rep_gather = transfer_time(cluster, "all_gather", uly, world, B * (H // U) * rep_len * d * a)
    kv = 2 * B * H * split_len * d * a
    for b in w.blocks:
        attn = _attention_calls(b, w, q, keys, 1.0 / U, img_loc)
        compute += b.rest(local_tokens) + attn
        comm += qkv + a2a + rep_gather
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


def _pf_stage(w: Workload, config: ParallelConfig, cluster: Cluster, stage_blocks: Sequence[BlockCost],
              unit: PipeUnit, stage: int) -> dict[str, float]:
    """One stage on one unit (all branches this rank evaluates). Its text, when the unit carries it, is computed
    here once; the other units attend over the text K/V it left. Stage 0 embeds the unit's own tokens (and the
    text with it); every stage embeds the step's timestep once, with the unit that carries the text."""
    U, R = config.ulysses_degree, config.ring_degree
    S, P = U * R, config.pipefusion_parallel_degree
    world = config.world_size
    evals = w.branches // config.cfg_degree
    loc = _cdiv(unit.tokens, S)
    txt = w.joint_txt if unit.text else 0
    uly, ring, sp = _groups(config, "ulysses"), _groups(config, "ring"), _groups(config, ("ulysses", "ring"))
    B, H, d, a = w.batch, w.heads, w.head_dim, w.act_bytes
    q = U * loc + txt
    keys = [w.img_tokens] + ([w.joint_txt] if w.joint_txt else [])
    compute = comm = 0.0
    a2a = transfer_time(cluster, "all_to_all", uly, world, B * H * loc * d * a)
    qkv = transfer_time(cluster, "all_to_all", uly, world, 3 * B * H * loc * d * a)  # Q, K, V in one
    rep_gather = transfer_time(cluster, "all_gather", uly, world, B * (H // U) * txt * d * a)
    fresh = transfer_time(cluster, "all_gather", ring, world, 2 * B * (H // U) * U * loc * d * a)
    for b in stage_blocks:
        compute += b.rest(loc + txt) + _attention_calls(b, w, q, keys, 1.0 / U, loc)
        comm += qkv + a2a + rep_gather + fresh
    if stage == 0:
        compute += w.embed[1] * (unit.tokens + (w.txt_tokens if unit.text else 0))
    compute += (w.embed[0] if unit.text else 0.0) + w.sp_overhead_s(loc + txt, len(stage_blocks))
    if stage == P - 1:
        comm += transfer_time(cluster, "all_gather", sp, world, B * loc * w.hidden * a)
        compute += w.head_s(unit.tokens)
        if config.cfg_degree > 1:
            comm += transfer_time(
                cluster, "all_gather", _groups(config, "cfg"), world, B * w.latent[1] * unit.rows * w.latent[3] * 4
            )
    host = sum(b.host for b in stage_blocks)
    sampler = w.step_fixed * unit.tokens / w.img_tokens if stage == P - 1 else 0.0  # once per unit, any branches
    return {"compute": compute * evals + sampler, "comm": comm * evals, "host": host * evals}


def _pipefusion(w: Workload, config: ParallelConfig, cluster: Cluster, steps: int) -> Prediction:
    P, S = config.pipefusion_parallel_degree, config.sp_degree
    world = config.world_size
    stages = [[w.blocks[i] for i in r] for r in w.stages(P)]
    evals = w.branches // config.cfg_degree

    def peers(a: int, b: int) -> list[int]:
        return [config.rank_of({"ulysses": 0, "ring": 0, "pipefusion": s, "cfg": 0}) for s in (a, b)]

    def hop(stage: int, unit: PipeUnit) -> float:  # stage -> stage + 1 (all branches); the stage's S ranks send
        nbytes = handoff_elements(w, unit, S) * w.act_bytes
        return evals * transfer_time(cluster, "p2p", peers(stage, stage + 1), world, nbytes, sharing=S)

    def back(unit: PipeUnit) -> float:  # last stage -> stage 0: the unit's next input
        nbytes = w.batch * w.latent[1] * unit.rows * w.latent[3] * 4
        return transfer_time(cluster, "p2p", peers(P - 1, 0), world, nbytes, sharing=1)

    def stage_time(s: int, unit: PipeUnit) -> float:
        return _evaluation_time(_pf_stage(w, config, cluster, stages[s], unit, s), cluster, world)

    (whole,) = pipe_units(w, config, warm=True)
    warm_round = sum(stage_time(s, whole) for s in range(P)) + sum(hop(s, whole) for s in range(P - 1)) + back(whole)
    patches = pipe_units(w, config, warm=False)
    M = len(patches)
    hidden = cluster.link.overlap
    # Per pipelined step, each stage's busy time: its M patches and the exposed part of what it sends.
    tau = [[stage_time(s, u) for u in patches] for s in range(P)]
    sends = [[hop(s, u) if s < P - 1 else back(u) for u in patches] for s in range(P)]
    busy = [sum(t) + (1 - hidden) * sum(x) for t, x in zip(tau, sends)]
    trip = max(sum(tau[s][m] + sends[s][m] for s in range(P)) for m in range(M))  # a patch's round trip
    period = max(max(busy), trip)
    # Patches flow across step boundaries: the pipeline fills once (the first patch's way to the last stage)
    # and drains once (the last stage's last patch); the periods cover the rest.
    fill = sum(tau[s][0] + sends[s][0] for s in range(P - 1))
    drain = tau[-1][-1]
    warm = min(config.warmup_steps, steps)
    pipelined = steps - warm
    fill_drain = max(0.0, fill + drain - period / M) if pipelined else 0.0
    total = warm * warm_round + pipelined * period + fill_drain
    stage_step = tuple(sum(t) for t in tau)
    mean = sum(stage_step) / P
    breakdown = {
        "warmup_step": warm_round,
        "period": period,
        "fill_drain": fill_drain,
        "patch_stage": max(max(t) for t in tau),
        "hop": max(max(x) for x in sends),
        "patches": float(M),
        "imbalance": max(stage_step) / mean if mean else 1.0,
    }
    return Prediction(total, total / steps, breakdown, stage_step)


def predict(w: Workload, config: ParallelConfig, cluster: Cluster, steps: int, ring_impl: str = "p2p") -> Prediction:
    """Seconds for one image of `steps` euler steps under `config` on `cluster` (see the module docstring)."""
    if config.pipefusion_parallel_degree > 1:
        return _pipefusion(w, config, cluster, steps)
    C = config.cfg_degree
    evals = w.branches // C
    if config.sp_degree > 1:
        parts = _sp_eval(w, config, cluster, ring_impl)
    else:
        tokens = w.img_tokens + w.joint_txt
        compute = (sum(b.rest(tokens) + _attention_calls(b, w, tokens, [tokens], 1.0, w.img_tokens) for b in w.blocks)
                   + w.embed_s() + w.head_s(w.img_tokens))
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
