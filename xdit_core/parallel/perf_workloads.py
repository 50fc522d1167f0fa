"""Workloads for the performance model from a model's shape (FLOPs x a device's seconds per FLOP), the meshes
the engine accepts, and the fastest of them by the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from xdit_core.models import ADAPTERS
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
    """A DiT's shape: blocks of two kinds (dual-stream / single-stream, or one kind), text tokens; the latent's
    channels, pixels per latent row (`vae_scale`) and latent rows per token row (`patch`). `mlp_ratio` counts the
    MLP's FLOPs: a gated (SwiGLU) MLP of hidden m x width has three matrices, so it counts as 1.5 m."""

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
    vae_scale: int = 8
    patch: int = 2
    shared_modulation: bool = False  # adaLN projections outside the blocks (FLUX.2) or negligible (Z-Image's 256-wide)

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
        mod = 0 if self.shared_modulation else 1
        double = int((2 * token_wise + mod * 12 * h2) * self.dtype_bytes)
        single = int((token_wise + mod * 3 * h2) * self.dtype_bytes)
        return (double,) * self.double_blocks + (single,) * self.single_blocks


FLUX_DEV = Architecture("FLUX.1-dev", "flux", 19, 38, 24, 128, 512)
HUNYUAN_VIDEO = Architecture("HunyuanVideo", "flux", 20, 40, 24, 128, 256)
SD35_LARGE = Architecture("SD3.5 Large", "sd3", 38, 0, 38, 64, 333)  # 77 CLIP + 256 T5 tokens
# xdit_core/loading/configs/wan2.1-t2v-14b.json: dim 5120, FFN 13824, 512 umT5 tokens by cross-attention.
WAN21_T2V_14B = Architecture("Wan2.1 T2V 14B", "wan", 40, 0, 40, 128, 512, mlp_ratio=13824 / 5120)
WAN_TEXT_TOKENS = 512  # umT5's fixed length
# Qwen/Qwen-Image: 60 double-stream blocks (GELU MLP x4), 24 heads x 128, 16-channel latent at /8, 2x2 patches; a
# prompt's Qwen2.5-VL states are ~100-200 tokens (the template's prefix dropped, no padding): 128.
QWEN_IMAGE = Architecture("Qwen-Image", "qwen", 60, 0, 24, 128, 128)
# black-forest-labs/FLUX.2-dev: 8 double + 48 single blocks, 48 heads x 128, SwiGLU MLP of 3 x width (1.5 x 3 =
# 4.5), 512 Mistral tokens; 128-channel latent at /16 with 1x1 patches (1024^2: 64 x 64 = 4096 tokens).
FLUX2_DEV = Architecture("FLUX.2 dev", "flux2", 8, 48, 48, 128, 512, latent_channels=128, mlp_ratio=4.5,
                         vae_scale=16, patch=1, shared_modulation=True)
# Tongyi-MAI/Z-Image-Turbo: 30 single-stream layers over [image, text] and 2 noise-refiner layers on the image
# (counted here as joint layers: they skip the 128 text tokens, ~3% of their tokens), 30 heads x 128 (Ulysses
# 1, 2, 3, 5, 6), SwiGLU MLP of 8/3 x width (1.5 x 8/3 = 4); ~128 Qwen3 tokens (padded to a multiple of 32). The
# 2 context-refiner layers run on the text alone with the embedding, replicated: left out (~0.2% of the FLOPs).
Z_IMAGE_TURBO = Architecture("Z-Image-Turbo", "zimage", 0, 32, 30, 128, 128, shared_modulation=True)


def architecture_of(config: Mapping[str, Any], spec: Any) -> Architecture:
    """The Architecture of a diffusers transformer config (`spec`: its ModelSpec), at the nominal text length."""
    name = config.get("_name_or_path") or spec.family
    if spec.family == "zimage":  # dim / n_heads; the noise refiners counted with the main layers (Z_IMAGE_TURBO)
        heads = int(config.get("n_heads", 30))
        layers = int(config.get("n_layers", 30)) + int(config.get("n_refiner_layers", 2))
        return Architecture(name, "zimage", 0, layers, heads, int(config.get("dim", 3840)) // heads,
                            NOMINAL_TEXT_TOKENS, spec.latent_channels, shared_modulation=True)
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    single = int(config.get("num_single_layers", 0)) if spec.family in ("flux", "flux2") else 0
    mlp = float(config["ffn_dim"]) / (heads * head_dim) if spec.family == "wan" else 4.0
    text = WAN_TEXT_TOKENS if spec.family == "wan" else NOMINAL_TEXT_TOKENS
    if spec.family == "flux2":  # SwiGLU MLP; 128-channel latent at /16, 1x1 patches
        return Architecture(name, "flux2", int(config["num_layers"]), single, heads, head_dim, text,
                            int(config.get("in_channels", 128)), 1.5 * float(config.get("mlp_ratio", 3.0)),
                            vae_scale=16, patch=1, shared_modulation=True)
    return Architecture(name, spec.family, int(config["num_layers"]), single, heads, head_dim, text,
                        spec.latent_channels, mlp)


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
    h, w = height // arch.vae_scale, width // arch.vae_scale
    img = latent_frames * (h // arch.patch) * (w // arch.patch)
    lin = arch.linear_flops_per_token() * s_per_flop
    attn = 4.0 * arch.head_dim * arch.heads * s_per_flop * attn_slowdown
    kv = arch.text_kv_flops() * s_per_flop
    double = BlockCost(kv, lin, attn_call_s, attn, host_per_block[0])
    single = BlockCost(kv, lin, attn_call_s, attn, host_per_block[1])
    nominal = (NOMINAL_PIXELS // (arch.vae_scale * arch.patch)) ** 2
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
        patch=arch.patch,
        cross_text=arch.cross_text,
        ring_hop_host=ring_hop_host,
        text_every_unit=ADAPTERS[arch.family].TEXT_EVERY_UNIT if arch.family in ADAPTERS else False,
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
