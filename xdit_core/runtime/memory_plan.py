"""A memory plan before loading: each rank's peak device memory for a model, a mesh and a request, from the
model's config alone (built on the meta device; a file's header for its fp8 tensors; no weight is read).

Per rank (docs/memory.md has the formulas and a table for real models):

- **weights held**: the parameter bytes of what the rank runs: every module outside the blocks (embedders and
  conditioning on every rank, the head on PipeFusion's last stage only) and its PipeFusion stage's blocks
  (ModelMemory.stage_ranges, the workers' split: by compute, each stage's weights within STAGE_WEIGHT_SHARE of
  the workers' smallest GPU when it is known). With `shard_weights` each block is split over the N ranks that
  run it (a stage's Ulysses x Ring x CFG ranks, N = world / pipefusion) as FSDP2 splits it: every parameter by
  dim 0 into N pieces of ceil(rows / N) rows. fp8 kept: the file's fp8 Linear weights at 1 byte each plus a
  float32 scale per stored tensor, every other tensor in the compute dtype.
- **gathered block** (sharding): the largest block of the stage whole, twice (FSDP2's all-gather output and
  the unsharded parameters it is copied into are both alive for a moment), plus this rank's shard copy.
- **fp8 upcast layer**: the largest fp8 weight upcast for its layer: 8 bytes per weight for a scaled one
  (`fp8.float() * scale`: two float32 copies at once), the compute dtype's size for a plain one.
- **PipeFusion K/V buffers**: per attention layer of the stage and per branch the rank evaluates, K and V over
  every image token (and, for joint text, every text token) for this rank's heads: 2 x batch x tokens x
  hidden / ulysses x dtype.
- **activations**: one forward's (branches run one after the other): batch x (image tokens / SP + joint text
  tokens, split when SP divides them) x hidden x dtype x ACTIVATION_FACTOR.
- **latents**: LATENT_COPIES float32 latent-sized tensors (the request, the sampler's state).
- **communication buffers**: Ulysses' all-to-all outputs (4 x local tokens x hidden), Ring's K/V in flight
  (4 x local tokens x hidden / ulysses), the final gather of the image tokens (2 x all image tokens x hidden)
  and PipeFusion's patch hand-offs (2 x a patch's tokens x hidden), summed.
- **process**: the interpreter with torch, or a CUDA context (RANK_OVERHEAD_BYTES).

The peak is the larger of the run (all of the above) and the load (the weights, plus the one block whole that
is being read: the engine shards each block as it arrives, SHARDS_WHILE_LOADING). Sharding's
price is traffic: each block forward gathers (N - 1) shards, so per step (N - 1) x shard bytes x the stage's
blocks x forwards (2 with CFG unless cfg-parallel, x M patches on PipeFusion's pipelined steps), in
`gather_bytes_per_step` and its time at `link_bytes_per_s`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.stages import balance_stages, block_flops

GIB = 2 ** 30
FLOAT32_BYTES = 4  # latents, noise and the sampler's state are float32 whatever the model's dtype
# Latent-sized float32 tensors one rank holds at once: the request's latent_image and noise, the sampler's
# x, denoised, derivative, previous denoised and ancestral draw, and the output (8); uni_pc's history holds
# about 5 more (three x0 predictions, the corrector's base and residual); a noise_mask and its noise 2 more.
LATENT_COPIES = 15
# Peak live activations of one transformer block, in units of tokens x hidden size (Flux's single block:
# input, norm, q/k/v, their rotary copies, attention output, 4x MLP projection and its GELU, the 5x concat).
# Every attention kernel the engine selects (PyTorch's flash kernel on CPU, memory-efficient SDPA or
# flash-attn on CUDA) is fused, so no [tokens x tokens] score matrix is materialised and none is counted.
ACTIVATION_FACTOR = 20
# A rank's fixed cost: the interpreter with torch and diffusers imported (about 314 MiB RSS measured on CPU),
# or a CUDA context on a GPU.
RANK_OVERHEAD_BYTES = 512 * 2 ** 20
FP8_SCALE_BYTES = 4  # one float32 scale per stored fp8 tensor (ComfyUI's scaled fp8)
# The link sharding's gathers cross unless told: PCIe 4.0 x16, about 20 GB/s effective. A copy of
# bench/perfmodel.py's LINKS["pcie"] (the engine never imports the benchmarks).
PCIE_BYTES_PER_S = 20e9
# FSDP2 copies a block's all-gather output into the block's unsharded parameters
# (torch.distributed.fsdp's foreach_all_gather_copy_out): both are alive for a moment.
GATHER_COPIES = 2
# How the engine loads a sharded model: runtime/job.py has load_model fully_shard() each block as soon as it is
# read (load_model's on_block), so one block at a time is whole on the device (False: the stage's blocks whole
# first, then sharded; the plan can still model that).
SHARDS_WHILE_LOADING = True
# FSDP2 shards an fp8-kept weight's upcast values (models/fp8.py's Fp8Weight upcasts on every op, chunking
# included): sharded blocks hold compute-dtype shards, and only unsharded blocks keep the fp8 saving.
SHARDS_KEEP_FP8 = False
# Modules outside the blocks, by role, for diffusers classes the engine does not run (the docs' table):
# input embedders on every stage, the head on the last.
_GENERIC_EMBED = ("x_embedder", "img_in", "patch_embedding", "pos_embed")
_GENERIC_HEAD = ("norm_out", "proj_out", "scale_shift_table")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


# ---------------------------------------------------------------------------------------------------------
# Terms shared with runtime/limits.py's estimate_rank_bytes
# ---------------------------------------------------------------------------------------------------------
def latent_bytes(latent_shape: Sequence[int]) -> int:
    """One float32 latent of `latent_shape` ([B, C, h, w] or [B, C, frames, h, w])."""
    return math.prod(int(n) for n in latent_shape) * FLOAT32_BYTES


def image_tokens(latent_shape: Sequence[int], patch: int = 2) -> int:
    """Image tokens of one latent: patch x patch pieces of the latent (per frame for video)."""
    _, _, *frames, height, width = (int(n) for n in latent_shape)
    return math.prod(frames) * (height // patch) * (width // patch)


def latents_term(latent_shape: Sequence[int]) -> int:
    """The float32 latent-sized tensors a rank holds at once (LATENT_COPIES)."""
    return LATENT_COPIES * latent_bytes(latent_shape)


def activation_term(rows: int, tokens: int, hidden_size: int, dtype_bytes: int) -> int:
    """Peak live activations of one block over `rows` sequences of `tokens` (ACTIVATION_FACTOR)."""
    return rows * tokens * hidden_size * dtype_bytes * ACTIVATION_FACTOR


def kv_buffer_term(rows: int, tokens: int, width: int, dtype_bytes: int, layers: int) -> int:
    """PipeFusion's K and V buffers: `layers` attention layers x `rows` sequences x `tokens` x `width`."""
    return 2 * rows * tokens * width * dtype_bytes * layers


# ---------------------------------------------------------------------------------------------------------
# The model, from its config on the meta device
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter: its rows (dim 0, along which FSDP2 shards), its size, and whether fp8 would keep it."""

    rows: int
    numel: int
    fp8: bool = False

    def bytes(self, dtype_bytes: int, fp8: bool, rows: Optional[int] = None) -> int:
        numel = self.numel if rows is None else rows * (self.numel // max(self.rows, 1))
        return numel * (1 if fp8 and self.fp8 else dtype_bytes)


@dataclass(frozen=True)
class Part:
    """The parameters of one block, or of a group of modules outside the blocks."""

    params: tuple[Param, ...] = ()
    scales: int = 0  # float32 scales of its fp8 tensors (one per stored tensor, shared by a fused one's pieces)
    scaled: bool = False  # its fp8 weights carry a scale (upcast through float32)
    attention_layers: int = 0  # attention modules over the image tokens (PipeFusion buffers their K/V)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def fp8_numel(self) -> int:
        return sum(p.numel for p in self.params if p.fp8)

    def held(self, dtype_bytes: int, fp8: bool) -> int:
        """Bytes held whole: fp8 weights at 1 byte plus their scales when `fp8`, the rest in the dtype."""
        return sum(p.bytes(dtype_bytes, fp8) for p in self.params) + (self.scales * FP8_SCALE_BYTES if fp8 else 0)

    def shard(self, n: int, dtype_bytes: int, fp8: bool) -> int:
        """Bytes of one rank's FSDP2 shard over `n` ranks: ceil(rows / n) rows of every parameter (scales whole)."""
        if n == 1:
            return self.held(dtype_bytes, fp8)
        return (sum(p.bytes(dtype_bytes, fp8, rows=-(-p.rows // n)) for p in self.params)
                + (self.scales * FP8_SCALE_BYTES if fp8 else 0))

    def upcast(self, dtype_bytes: int) -> int:
        """The transient of upcasting its largest fp8 weight (0 without fp8)."""
        largest = max((p.numel for p in self.params if p.fp8), default=0)
        return largest * (2 * FLOAT32_BYTES if self.scaled else dtype_bytes)


@dataclass(frozen=True)
class ModelMemory:
    """What the plan needs of a model, from its config on the meta device (and its file's header for fp8)."""

    name: str
    hidden_size: int
    heads: int
    blocks: tuple[Part, ...]  # in PipeFusion's order (Flux: double, then single)
    embed: Part  # input embedders: every stage
    head: Part  # output head: the last stage
    other: Part  # conditioning (time, text, guidance embedders, modulations): every rank
    buffers: int  # bytes of buffers every rank holds (position tables)
    joint_text: bool  # text tokens join the attention sequence (Flux, SD3, Qwen) rather than cross-attention
    video: bool
    fp8_source: str  # where the fp8 flags come from: the file's header, or the assumption for a bare config
    block_costs: tuple[float, ...] = ()  # what PipeFusion balances its stages by (stages.block_flops)
    patch_size: int = 2  # latent rows per image token (FLUX.2: 1)

    @property
    def parameter_count(self) -> int:
        return sum(b.numel for b in self.blocks) + self.embed.numel + self.head.numel + self.other.numel

    def stage_ranges(self, stages: int, dtype_bytes: int = FLOAT32_BYTES, fp8: bool = False,
                     device_bytes: Optional[int] = None) -> list[range]:
        """PipeFusion's blocks per stage, as the ranks load them: balanced by FLOPs (a table-only model without a
        family: by bytes) and, on GPUs of `device_bytes`, such that each stage's weights fit STAGE_WEIGHT_SHARE of
        one. When no split fits, the compute split (the plan's fit check then says what would fit)."""
        if stages == 1:
            return [range(len(self.blocks))]
        costs = list(self.block_costs) or [b.numel * FLOAT32_BYTES for b in self.blocks]
        if device_bytes is not None:
            fixed = sum(part.held(dtype_bytes, fp8) for part in (self.other, self.embed, self.head))
            try:
                return balance_stages(costs, stages, [b.held(dtype_bytes, fp8) for b in self.blocks],
                                      cap=int(STAGE_WEIGHT_SHARE * device_bytes) - fixed)
            except XDiTConfigError:
                pass
        return balance_stages(costs, stages)


_CACHE: dict[tuple, ModelMemory] = {}
# PipeFusion balances its stages by compute as long as each stage's weights take at most this share of a GPU; the
# rest is for the K/V buffers, activations and latents the plan adds per request (the split is made once, at load).
STAGE_WEIGHT_SHARE = 0.75


def model_memory(model: Union[str, Path, Mapping[str, Any]], family: Optional[str] = None,
                 variant: Optional[str] = None, name: Optional[str] = None) -> ModelMemory:
    """A model's ModelMemory from a model path (its config, and its header's fp8 tensors) or a diffusers config
    (fp8 then assumed for every Linear weight of the blocks). A config of a diffusers class the engine does not
    run (Qwen-Image, FLUX.2) is built too, for the tables. No tensor data is read."""
    if isinstance(model, Mapping):
        return _describe(dict(model), family, variant, None, name or str(model.get("_name_or_path") or
                                                                          model.get("_class_name")))
    path = Path(model)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, family, variant)
    if key not in _CACHE:
        from xdit_core.loading.load import _open
        from xdit_core.loading.model_files import LoadStats

        _CACHE[key] = _describe(None, family, variant, _open(path, LoadStats()), name or path.name)
    return _CACHE[key]


def _describe(config: Optional[dict[str, Any]], family: Optional[str], variant: Optional[str], source: Any,
              name: str) -> ModelMemory:
    import diffusers
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    from xdit_core.loading.load import BLOCK_LISTS, EMBED_MODULES, HEAD_MODULES, _build_on_meta
    from xdit_core.models import make_adapter
    from xdit_core.models.families import CLASS_NAMES, resolve_model_spec

    config = source.config if source is not None else config
    class_name = config.get("_class_name")
    if family is not None or class_name in CLASS_NAMES or source is not None:
        spec = resolve_model_spec(config, family, variant)
        model = _build_on_meta(spec.family, config, torch.float32)
        lists, embed, head = BLOCK_LISTS[spec.family], EMBED_MODULES[spec.family], HEAD_MODULES[spec.family]
        kinds = make_adapter(model, spec).attention_kinds()
        buffered = {m for m, kind in kinds.items() if kind != "cross"}
        joint, video, heads = any(k == "joint" for k in kinds.values()), spec.is_video, spec.num_heads
        costs = () if video else tuple(block_flops(config, spec))
        patch, hidden = spec.patch_size, int(config.get("dim") or 0)  # Z-Image states its width as dim
    else:  # a diffusers class for the tables only: every attention module joint, ModuleLists of blocks
        cls = getattr(diffusers, str(class_name), None)
        if cls is None:
            raise XDiTConfigError(f"{name}: diffusers has no model class {class_name!r}")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        lists = tuple(n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)
                      and n.endswith("blocks"))
        embed, head = _GENERIC_EMBED, _GENERIC_HEAD
        buffered = {m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))}
        joint, video, heads = True, False, int(config.get("num_attention_heads", 1))
        costs, patch, hidden = (), 2, 0
    hidden = hidden or int(config.get("num_attention_heads", 1)) * int(config.get("attention_head_dim", 1))

    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    prefixes = [f"{lst}.{i}." for lst in lists for i in range(len(getattr(model, lst)))]
    if source is None:
        fp8 = {n for n in linear_weights if n.startswith(tuple(prefixes))}
        scaled = {n: n for n in fp8}  # each its own scale
        fp8_source = "assumed: every Linear weight of the blocks stored as scaled fp8 (a scale per tensor)"
    else:
        fp8, scaled, fp8_source = _file_fp8(source, model, spec, linear_weights)

    groups: dict[str, list[Param]] = {}
    scales: dict[str, set[str]] = {}
    for pname, p in model.named_parameters():
        group = next((pre for pre in prefixes if pname.startswith(pre)), None)
        if group is None:
            top = pname.split(".", 1)[0]
            group = "embed" if top in embed else "head" if top in head else "other"
        shape = tuple(p.shape)
        groups.setdefault(group, []).append(Param(shape[0] if shape else 1, p.numel(), pname in fp8))
        if pname in scaled:
            scales.setdefault(group, set()).add(scaled[pname])
    attention: dict[str, int] = {}
    for mname, module in model.named_modules():
        if module in buffered:
            group = next((pre for pre in prefixes if f"{mname}.".startswith(pre)), None)
            if group is not None:
                attention[group] = attention.get(group, 0) + 1

    def part(group: str) -> Part:
        n = len(scales.get(group, ()))
        return Part(tuple(groups.get(group, ())), n, n > 0, attention.get(group, 0))

    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelMemory(name, hidden, heads, tuple(part(p) for p in prefixes), part("embed"), part("head"),
                       part("other"), buffers, joint, video, fp8_source, costs, patch)


def _file_fp8(source: Any, model: torch.nn.Module, spec: Any, linear_weights: set[str]
              ) -> tuple[set[str], dict[str, str], str]:
    """(parameters kept fp8, parameter -> its stored scale, a description) from a weight file's header, by the
    loader's rules: a stored fp8 tensor whose pieces are all Linear weights, with no scale or a single one."""
    from xdit_core.loading import wan_layout
    from xdit_core.loading.key_mapping import Rule, identity_rules, layout_rules

    files = source.files
    # The stored dtype and shape of every tensor, from the headers the loader opened (WeightFiles keeps its
    # handles and locations privately; nothing is read but the headers).
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    for tname, (file, key) in files._locations.items():
        info = files._handle(file).get_slice(key)
        stored[tname] = (info.get_dtype(), tuple(info.get_shape()))
    names = [n for n, _ in model.named_parameters()]
    if source.layout is None:
        rules = identity_rules(names)
    elif source.layout == "wan":
        original = {new: old for old, new in wan_layout.diffusers_names(list(files.shapes)).items()}
        rules = [Rule(original.get(n, n), (n,)) for n in names]
    else:
        rules = layout_rules(spec.family, names)
    fp8: set[str] = set()
    scaled: dict[str, str] = {}
    kinds: dict[str, int] = {}
    for rule in rules:
        dtype, _ = stored.get(rule.original, ("", ()))
        if dtype not in _FP8_DTYPES or not all(p in linear_weights for p in rule.parts):
            continue
        scale = rule.original[: -len("weight")] + "scale_weight" if rule.original.endswith(".weight") else None
        scale_shape = stored[scale][1] if scale in stored else None
        if scale_shape is not None and math.prod(scale_shape) != 1:
            continue  # a per-row scale: upcast at load
        fp8.update(rule.parts)
        if scale_shape is not None:
            scaled.update({p: scale for p in rule.parts})
        kinds[dtype] = kinds.get(dtype, 0) + 1
    found = ", ".join(f"{n} {d}" for d, n in sorted(kinds.items())) or "none"
    return fp8, scaled, f"the file's header (fp8 Linear weights: {found})"


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------
TERMS = ("weights held", "other resident models", "buffers", "gathered block", "fp8 upcast layer",
         "PipeFusion K/V buffers", "activations", "latents", "communication buffers", "process")


@dataclass(frozen=True)
class RankMemory:
    """One rank's predicted bytes."""

    rank: int
    stage: int
    blocks: int  # blocks this rank runs
    weights: int  # this model's parameter bytes held between requests
    other_models: int  # the resident models beside it
    buffers: int
    gathered_block: int
    upcast_layer: int
    kv_buffers: int
    activations: int
    latents: int
    comm_buffers: int
    process: int
    load_extra: int  # held while loading beyond `weights` (a stage's blocks whole before sharding)
    gather_bytes_per_step: int  # received by the sharding's all-gathers per (pipelined) step

    def terms(self) -> dict[str, int]:
        values = (self.weights, self.other_models, self.buffers, self.gathered_block, self.upcast_layer,
                  self.kv_buffers, self.activations, self.latents, self.comm_buffers, self.process)
        return dict(zip(TERMS, values))

    @property
    def held(self) -> int:
        """Held between requests: weights of every resident model and the buffers."""
        return self.weights + self.other_models + self.buffers

    @property
    def run_tensor_bytes(self) -> int:
        """Tensors at the run's peak (everything but the process)."""
        return sum(v for k, v in self.terms().items() if k != "process")

    @property
    def load_tensor_bytes(self) -> int:
        return self.held + self.load_extra

    @property
    def tensor_bytes(self) -> int:
        return max(self.run_tensor_bytes, self.load_tensor_bytes)

    @property
    def peak(self) -> int:
        return self.tensor_bytes + self.process

    @property
    def biggest_term(self) -> tuple[str, int]:
        terms = self.terms()
        if self.load_tensor_bytes > self.run_tensor_bytes:
            terms["weights held"] += self.load_extra  # the load's peak: the stage's blocks whole
        return max(terms.items(), key=lambda kv: kv[1])


@dataclass(frozen=True)
class MemoryPlan:
    """Every rank's predicted peak for one model, mesh and request (see the module docstring)."""

    model: ModelMemory
    resident: tuple[ModelMemory, ...]
    dtype: torch.dtype
    fp8_kept: bool
    parallel: ParallelConfig
    latent_shape: tuple[int, ...]
    text_tokens: int
    with_negative: bool
    link_bytes_per_s: float
    ranks_per_device: int
    shard_on_load: bool
    ranks: tuple[RankMemory, ...]
    device_bytes: Optional[int] = None  # the GPU size that capped PipeFusion's stage weights (None: uncapped)

    @property
    def shard_group(self) -> int:
        """N, the ranks each block is sharded over (1 without sharding)."""
        p = self.parallel
        return p.world_size // p.pipefusion_parallel_degree if p.shard_weights else 1

    @property
    def busiest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def peak(self) -> int:
        """The largest rank's peak bytes."""
        return self.busiest.peak

    @property
    def device_peak(self) -> int:
        """Bytes on the fullest device: its ranks' peaks (ranks_per_device of them)."""
        return self.peak * self.ranks_per_device

    @property
    def gather_bytes_per_step(self) -> int:
        return max(r.gather_bytes_per_step for r in self.ranks)

    @property
    def gather_seconds_per_step(self) -> float:
        return self.gather_bytes_per_step / self.link_bytes_per_s

    def mesh(self) -> str:
        return describe_mesh(self.parallel)

    def summary(self) -> str:
        """One line: the peak, its biggest terms, the sharding traffic."""
        r = self.busiest
        terms = sorted(((k, v) for k, v in r.terms().items() if v), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms[:4])
        load = f"; load {r.load_tensor_bytes / GIB:.1f} GiB (a stage's blocks whole before sharding)" \
            if r.load_tensor_bytes > r.run_tensor_bytes else ""
        per = f" per GPU ({self.ranks_per_device} ranks)" if self.ranks_per_device > 1 else " per rank"
        gather = (f"; gathers {self.gather_bytes_per_step / 1e9:.1f} GB per step, "
                  f"{self.gather_seconds_per_step:.2f} s at {self.link_bytes_per_s / 1e9:g} GB/s"
                  if self.gather_bytes_per_step else "")
        return f"{self.mesh()}: {self.device_peak / GIB:.1f} GiB{per} (GiB: {text}){load}{gather}"

    def replan(self, parallel: ParallelConfig, ranks_per_device: Optional[int] = None) -> "MemoryPlan":
        """The same model and request on another mesh."""
        return plan_memory(self.model, self.dtype, parallel, self.latent_shape, fp8_kept=self.fp8_kept,
                           text_tokens=self.text_tokens, with_negative=self.with_negative, resident=self.resident,
                           link_bytes_per_s=self.link_bytes_per_s,
                           ranks_per_device=self.ranks_per_device if ranks_per_device is None else ranks_per_device,
                           shard_on_load=self.shard_on_load, device_bytes=self.device_bytes)

    def nearest_fitting(self, budget: int) -> Optional["MemoryPlan"]:
        """The nearest mesh that fits `budget` bytes per device: the same degrees sharded; PipeFusion degrees that
        divide the ranks (not for video), unsharded then sharded; fewer ranks per device (when ranks share one).
        None when none fits."""
        p, rpd = self.parallel, self.ranks_per_device
        devices = -(-p.world_size // rpd)
        tiers = [(c, rpd) for c in mesh_candidates(p, heads=self.model.heads, num_blocks=len(self.model.blocks),
                                                   video=self.model.video)[1:]]
        for k in range(rpd - 1, 0, -1):  # fewer ranks per device
            world = devices * k
            cfg = p.use_cfg_parallel and world % 2 == 0
            u, r = split_sp(world // (2 if cfg else 1), self.model.heads)
            fewer = ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=cfg, warmup_steps=p.warmup_steps)
            tiers += [(c, k) for c in mesh_candidates(fewer, heads=self.model.heads,
                                                      num_blocks=len(self.model.blocks), video=self.model.video)]
        for config, per_device in tiers:
            plan = self.replan(config, per_device)
            if plan.device_peak <= budget:
                return plan
        return None

    def fits(self, budget: int, source: str = "the budget") -> None:
        """Raise XDiTConfigError, in one line, if the fullest device's peak exceeds `budget` bytes: the predicted
        peak, the budget, the biggest term, and the nearest mesh that fits (or what else would)."""
        if self.device_peak <= budget:
            return
        r = self.busiest
        term, size = r.biggest_term
        per = f"per GPU ({self.ranks_per_device} ranks of {r.peak / GIB:.1f} GiB)" if self.ranks_per_device > 1 \
            else "per GPU"
        fp8 = ", fp8 kept" if self.fp8_kept and any(b.fp8_numel for b in self.model.blocks) else ""
        head = (f"{self.model.name} ({_dtype_name(self.dtype)}{fp8}) on {self.mesh()} for a latent of "
                f"{list(self.latent_shape)} needs about {self.device_peak / GIB:.1f} GiB {per}, the biggest term "
                f"{term} {size / GIB:.1f} GiB (rank {r.rank}), but the memory budget is {budget / GIB:.1f} GiB "
                f"({source})")
        near = self.nearest_fitting(budget)
        if near is not None:
            raise XDiTConfigError(f"{head}; the nearest mesh that fits: {near.summary()}")
        raise XDiTConfigError(f"{head}; no mesh of these {-(-self.parallel.world_size // self.ranks_per_device)} "
                              f"GPU(s) fits: use fp8 weights, a smaller size or batch, or more GPUs "
                              f"({self._gpus_needed(budget)})")

    def _gpus_needed(self, budget: int) -> str:
        """The fewest GPUs (up to 64) on which a mesh like this one (its CFG parallel kept; sharded, PipeFusion)
        fits, as a phrase."""
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus <= self.parallel.world_size:
                continue
            cfg = self.parallel.use_cfg_parallel
            u, r = split_sp(gpus // (2 if cfg else 1), self.model.heads)
            base = ParallelConfig(ulysses_degree=u, ring_degree=r, use_cfg_parallel=cfg)
            for config in mesh_candidates(base, heads=self.model.heads, num_blocks=len(self.model.blocks),
                                          video=self.model.video):
                plan = self.replan(config, 1)
                if plan.device_peak <= budget:
                    return f"on {gpus} GPUs {plan.mesh()} needs {plan.device_peak / GIB:.1f} GiB per GPU"
        return "none of the meshes of up to 64 GPUs tried fits"


def plan_memory(model: Union[str, Path, Mapping[str, Any], ModelMemory], dtype: Union[str, torch.dtype],
                parallel: ParallelConfig, latent_shape: Sequence[int], *, fp8_kept: bool = False,
                text_tokens: int = 512, with_negative: bool = False,
                resident: Sequence[Union[str, Path, Mapping[str, Any], ModelMemory]] = (),
                link_bytes_per_s: float = PCIE_BYTES_PER_S, ranks_per_device: int = 1,
                shard_on_load: Optional[bool] = None, family: Optional[str] = None,
                variant: Optional[str] = None, device_bytes: Optional[int] = None) -> MemoryPlan:
    """Predict every rank's peak device bytes before anything is loaded.

    model: a model path, a diffusers config, or a ModelMemory; dtype: the compute dtype ("bf16", torch.bfloat16);
    latent_shape: [B, C, h, w] or [B, C, frames, h, w]; fp8_kept: a file's fp8 Linear weights stay fp8 (a bare
    config: every block Linear weight taken as scaled fp8); text_tokens: the conditioning's length; with_negative:
    cfg != 1 (a negative branch); resident: models held beside it on the same mesh (Wan 2.2's other expert), their
    weights only; ranks_per_device: ranks sharing one device; shard_on_load: blocks sharded as they load
    (default SHARDS_WHILE_LOADING, the engine's way); device_bytes: the workers' smallest GPU, which caps
    PipeFusion's stage weights as the ranks cap them (ModelMemory.stage_ranges).
    """
    mm = model if isinstance(model, ModelMemory) else model_memory(model, family, variant)
    others = tuple(r if isinstance(r, ModelMemory) else model_memory(r) for r in resident)
    torch_dtype = _torch_dtype(dtype)
    shard_on_load = SHARDS_WHILE_LOADING if shard_on_load is None else shard_on_load
    shape = tuple(int(n) for n in latent_shape)
    ranges = mm.stage_ranges(parallel.pipefusion_parallel_degree, torch_dtype.itemsize, fp8_kept, device_bytes)
    ranks = tuple(_rank_memory(rank, mm, others, torch_dtype.itemsize, fp8_kept, parallel, shape, text_tokens,
                               with_negative, shard_on_load, ranges) for rank in range(parallel.world_size))
    return MemoryPlan(mm, others, torch_dtype, fp8_kept, parallel, shape, text_tokens, with_negative,
                      link_bytes_per_s, max(1, ranks_per_device), shard_on_load, ranks, device_bytes)


def _held(mm: ModelMemory, parallel: ParallelConfig, stage: int, db: int, fp8: bool,
          ranges: Optional[list[range]] = None) -> tuple[int, list[Part], int]:
    """(bytes a rank of `stage` holds, its blocks, N) for model `mm` (`ranges`: its stage split, default uncapped)."""
    P = parallel.pipefusion_parallel_degree
    n = parallel.world_size // P if parallel.shard_weights else 1
    blocks = [mm.blocks[i] for i in (ranges or mm.stage_ranges(P))[stage]]
    outside = mm.other.held(db, fp8) + mm.embed.held(db, fp8) + (mm.head.held(db, fp8) if stage == P - 1 else 0)
    return outside + sum(b.shard(n, db, fp8 and SHARDS_KEEP_FP8) if n > 1 else b.held(db, fp8) for b in blocks), \
        blocks, n


def _rank_memory(rank: int, mm: ModelMemory, others: tuple[ModelMemory, ...], db: int, fp8: bool,
                 p: ParallelConfig, shape: tuple[int, ...], text_tokens: int, with_negative: bool,
                 shard_on_load: bool, ranges: list[range]) -> RankMemory:
    coords = p.coords(rank)
    stage, P, U, R = coords["pipefusion"], p.pipefusion_parallel_degree, p.ulysses_degree, p.ring_degree
    S, batch, hidden = p.sp_degree, shape[0], mm.hidden_size
    weights, blocks, n = _held(mm, p, stage, db, fp8, ranges)
    bfp8 = fp8 and (n == 1 or SHARDS_KEEP_FP8)  # whether this rank's blocks hold fp8
    other_models = sum(_held(o, p, stage, db, fp8)[0] for o in others)
    branches = 2 if with_negative and not p.use_cfg_parallel else 1
    n_img = image_tokens(shape, mm.patch_size)
    patches = max(1, min(p.num_pipeline_patch or P, shape[-2] // mm.patch_size)) if P > 1 else 1
    local_img = -(-n_img // S)
    text = 0 if not mm.joint_text else text_tokens // S if text_tokens % S == 0 else text_tokens
    gathered = max((GATHER_COPIES * b.held(db, bfp8) + b.shard(n, db, bfp8) for b in blocks), default=0) \
        if n > 1 else 0
    upcast = max([b.upcast(db) for b in blocks if bfp8] + [mm.embed.upcast(db), mm.head.upcast(db),
                                                            mm.other.upcast(db)]) if fp8 else 0
    # The image's K/V, and a joint model's text K/V the first patch leaves for the others (whole on every rank).
    kv_tokens = n_img + (text_tokens if mm.joint_text else 0)
    kv = kv_buffer_term(batch * branches, kv_tokens, hidden // U, db, sum(b.attention_layers for b in blocks)) \
        if P > 1 else 0
    comm = ((4 * batch * (local_img + text) * hidden * db if U > 1 else 0)
            + (4 * batch * (local_img + text) * (hidden // U) * db if R > 1 else 0)
            + (2 * batch * local_img * S * hidden * db if S > 1 else 0)
            + (2 * batch * -(-n_img // patches) * hidden * db if P > 1 else 0))
    if n > 1 and not shard_on_load:
        load_extra = sum(b.held(db, bfp8) - b.shard(n, db, bfp8) for b in blocks)
    elif n > 1:
        load_extra = max(b.held(db, bfp8) for b in blocks)
    else:
        load_extra = 0
    gather = (n - 1) * sum(b.shard(n, db, bfp8) for b in blocks) * branches * patches if n > 1 else 0
    return RankMemory(rank=rank, stage=stage, blocks=len(blocks), weights=weights, other_models=other_models,
                      buffers=mm.buffers + sum(o.buffers for o in others), gathered_block=gathered,
                      upcast_layer=upcast, kv_buffers=kv,
                      activations=activation_term(batch, local_img + text, hidden, db),
                      latents=latents_term(shape), comm_buffers=comm, process=RANK_OVERHEAD_BYTES,
                      load_extra=load_extra, gather_bytes_per_step=gather)


# ---------------------------------------------------------------------------------------------------------
# Meshes: the candidates near a mesh, and the cheapest that fits (for `auto`)
# ---------------------------------------------------------------------------------------------------------
def split_sp(ranks: int, heads: int) -> tuple[int, int]:
    """(ulysses, ring) for `ranks` sequence-parallel ranks: as much Ulysses as the heads allow (auto_mesh's rule)."""
    ulysses = max(d for d in range(1, ranks + 1) if ranks % d == 0 and heads % d == 0)
    return ulysses, ranks // ulysses


def describe_mesh(p: ParallelConfig) -> str:
    """Short: "cfg2 x pf2 x r2 x u2, sharded over 4" (degrees of 1 left out)."""
    parts = [f"{k}{v}" for k, v in (("cfg", p.cfg_degree), ("pf", p.pipefusion_parallel_degree),
                                    ("r", p.ring_degree), ("u", p.ulysses_degree)) if v > 1] or ["serial"]
    shard = p.world_size // p.pipefusion_parallel_degree
    return " x ".join(parts) + (f", sharded over {shard}" if p.shard_weights and shard > 1 else "")


def mesh_candidates(parallel: ParallelConfig, *, heads: int, num_blocks: int, video: bool) -> list[ParallelConfig]:
    """`parallel` first, then the meshes of as many ranks that hold less per rank, nearest first: `parallel`
    sharded; every PipeFusion degree P > 1 dividing the ranks (not for video), CFG parallel kept where the rest
    is even, the rest Ulysses as far as the heads divide and Ring, unsharded then sharded."""
    world = parallel.world_size
    out = [parallel]
    if not parallel.shard_weights and world // parallel.pipefusion_parallel_degree > 1:
        out.append(replace(parallel, shard_weights=True))
    if not video:
        for stages in range(2, world + 1):
            if world % stages or stages > num_blocks or stages == parallel.pipefusion_parallel_degree:
                continue
            rest = world // stages
            cfg = parallel.use_cfg_parallel and rest % 2 == 0
            u, r = split_sp(rest // (2 if cfg else 1), heads)
            base = ParallelConfig(ulysses_degree=u, ring_degree=r, pipefusion_parallel_degree=stages,
                                  use_cfg_parallel=cfg, warmup_steps=parallel.warmup_steps)
            out += [base] + ([replace(base, shard_weights=True)] if rest > 1 else [])
    unique: list[ParallelConfig] = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def cheapest_fitting_mesh(candidates: Sequence[ParallelConfig], plan_fn: Callable[[ParallelConfig], MemoryPlan],
                          budget: int, *, step_seconds: Optional[Callable[[ParallelConfig], float]] = None,
                          source: str = "the budget") -> tuple[ParallelConfig, MemoryPlan]:
    """The candidate whose plan fits `budget` bytes per device at the least cost: its sharding gathers' seconds
    per step, plus `step_seconds(candidate)` when given (a prediction of the step without them, e.g. the
    performance model's for the machine's links). Ties go to the earlier candidate, so with candidates in the
    caller's order of preference and no `step_seconds`, the first unsharded candidate that fits wins (no
    per-step weight traffic: PipeFusion splits weights without any), else the sharded one that gathers least.
    Raises the first candidate's XDiTConfigError (its numbers and the nearest mesh) when none fits."""
    if not candidates:
        raise XDiTConfigError("no candidate mesh to plan")
    plans = [(c, plan_fn(c)) for c in candidates]
    fitting = [(i, c, plan) for i, (c, plan) in enumerate(plans) if plan.device_peak <= budget]
    if not fitting:
        plans[0][1].fits(budget, source)
        raise AssertionError("unreachable: the plan does not fit")

    def cost(item: tuple[int, ParallelConfig, MemoryPlan]) -> tuple[float, int]:
        i, config, plan = item
        return (step_seconds(config) if step_seconds else 0.0) + plan.gather_seconds_per_step, i

    _, config, plan = min(fitting, key=cost)
    return config, plan


def _torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in names:
        raise XDiTConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(names)}")
    return names[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


__all__ = ["ACTIVATION_FACTOR", "FLOAT32_BYTES", "GIB", "LATENT_COPIES", "MemoryPlan", "ModelMemory",
           "PCIE_BYTES_PER_S", "RANK_OVERHEAD_BYTES", "RankMemory", "activation_term", "cheapest_fitting_mesh",
           "describe_mesh", "image_tokens", "kv_buffer_term", "latent_bytes", "latents_term", "mesh_candidates",
           "model_memory", "plan_memory", "split_sp"]
