"""Workloads for the performance model from a model's shape (FLOPs x a device's seconds per FLOP), the meshes
the engine accepts, and the fastest of them by the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import BlockCost, Cluster, Workload, predict
from xdit_core.parallel.stages import NOMINAL_PIXELS, NOMINAL_TEXT_TOKENS

# What `auto` assumes of a GPU it cannot measure: an effective bf16 rate between an L40S and an eager H100 (the
# published tables fit 344-625 TFLOP/s), attention kernels at half of it. Only ratios to the links matter.
NOMINAL_FLOPS = 400e12
ATTN_SLOWDOWN = 2.0
# Device time of an attention kernel call beyond its FLOPs (launch, LSE merge, a ring hop's wait): fitted on
# xDiT's compiled FLUX.1-dev Ring-2 row (docs/performance.md, section 7).
NOMINAL_ATTN_CALL_S = 187e-6


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
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

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

    def block_flops(self, img_tokens: int) -> float:
        """FLOPs of one block for `img_tokens` image tokens and this text (linear layers, attention, text K/V)."""
        joint = 0 if self.cross_text else self.txt_tokens
        seq = img_tokens + joint
        attn = 4.0 * self.hidden * (seq * seq + (img_tokens * self.txt_tokens if self.cross_text else 0))
        return self.linear_flops_per_token() * seq + attn + self.text_kv_flops()

    def block_param_bytes(self) -> tuple[int, ...]:
        """Parameter bytes per block: token-wise weights plus adaLN modulation (6 h^2 per stream, 3 h^2 single);
        cross-attention blocks add its q, k, v, out (4 h^2) and share one modulation projection (none per block)."""
        h2 = self.hidden**2
        token_wise = (4 + 2 * self.mlp_ratio) * h2
        if self.cross_text:
            return (int((token_wise + 4 * h2) * self.dtype_bytes),) * self.blocks
        double = int((2 * token_wise + 12 * h2) * self.dtype_bytes)
        single = int((token_wise + 3 * h2) * self.dtype_bytes)
        return (double,) * self.double_blocks + (single,) * self.single_blocks


FLUX_DEV = Architecture("FLUX.1-dev", "flux", 19, 38, 24, 128, 512)
HUNYUAN_VIDEO = Architecture("HunyuanVideo", "flux", 20, 40, 24, 128, 256)
SD35_LARGE = Architecture("SD3.5 Large", "sd3", 38, 0, 38, 64, 333)  # 77 CLIP + 256 T5 tokens
# xdit_core/loading/configs/wan2.1-t2v-14b.json: dim 5120, FFN 13824, 512 umT5 tokens by cross-attention.
WAN21_T2V_14B = Architecture("Wan2.1 T2V 14B", "wan", 40, 0, 40, 128, 512, mlp_ratio=13824 / 5120)
WAN_TEXT_TOKENS = 512  # umT5's fixed length


def architecture_of(config: Mapping[str, Any], spec: Any) -> Architecture:
    """The Architecture of a diffusers transformer config (`spec`: its ModelSpec), at the nominal text length."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    single = int(config.get("num_single_layers", 0)) if spec.family == "flux" else 0
    mlp = float(config["ffn_dim"]) / (heads * head_dim) if spec.family == "wan" else 4.0
    text = WAN_TEXT_TOKENS if spec.family == "wan" else NOMINAL_TEXT_TOKENS
    return Architecture(config.get("_name_or_path") or spec.family, spec.family, int(config["num_layers"]), single,
                        heads, head_dim, text, spec.latent_channels, mlp)


def flop_workload(
    arch: Architecture,
    height: int,
    width: int,
    frames: int = 1,
    branches: int = 1,
    s_per_flop: float = 1e-15,
    attn_slowdown: float = ATTN_SLOWDOWN,
    host_per_block: tuple[float, float] = (0.0, 0.0),
    attn_call_s: float = 0.0,
    ring_hop_host: float = 0.0,
    split_costs: Optional[Sequence[float]] = None,
) -> Workload:
    """A workload whose block times are FLOPs x `s_per_flop` (attention FLOPs x `attn_slowdown`: attention
    kernels reach a lower fraction of peak than GEMMs), plus `attn_call_s` of device time per attention
    kernel call (what a ring hop costs beyond its FLOPs). `host_per_block`: (double, single) dispatch
    seconds; `ring_hop_host`: dispatch seconds of one extra ring hop. `split_costs`: PipeFusion's stage
    weights (the engine's `stages.block_flops`; default: the blocks' FLOPs at the nominal size).
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
    nominal = (NOMINAL_PIXELS // 16) ** 2
    return Workload(
        f"{arch.name} {width}x{height}" + (f"x{frames}" if frames > 1 else ""),
        (double,) * arch.double_blocks + (single,) * arch.single_blocks,
        tuple(split_costs) if split_costs is not None else (arch.block_flops(nominal),) * arch.blocks,
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


# ---------------------------------------------------------------------------------------------------
# Meshes and the fastest of them
# ---------------------------------------------------------------------------------------------------
def candidate_configs(ranks: int, heads: int, blocks: int, branches: int, pipefusion: bool = True) -> list[ParallelConfig]:
    """Every mesh of `ranks` ranks the engine accepts for this model (PipeFusion with M = stages; none of it
    when `pipefusion` is False)."""
    out = []
    for c in (1, 2) if branches == 2 else (1,):
        if ranks % c:
            continue
        rest = ranks // c
        for p in range(1, rest + 1):
            if rest % p or p > blocks or (p > 1 and not pipefusion):
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


NOMINAL_VIDEO = (480, 832, 81)  # Wan's 480p clip: height, width, frames


def nominal_workload(arch: Architecture, branches: int, split_costs: Optional[Sequence[float]] = None) -> Workload:
    """The workload `auto` ranks meshes on: the nominal image (or Wan's 480p clip) on a nominal GPU."""
    height, width, frames = NOMINAL_VIDEO if arch.family == "wan" else (NOMINAL_PIXELS, NOMINAL_PIXELS, 1)
    return flop_workload(arch, height, width, frames, branches, 1 / NOMINAL_FLOPS, attn_call_s=NOMINAL_ATTN_CALL_S,
                         split_costs=split_costs)
