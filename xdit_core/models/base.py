"""What every model adapter offers: embed, the block list, the output head, and where attention runs."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from xdit_core.models.families import ModelSpec


@dataclass
class BranchCond:
    """One CFG branch's conditioning: text states [B, L, D], for Flux and SD3 pooled [B, P], Flux dev's
    guidance (per branch, as ComfyUI's: a negative without FluxGuidance runs at 3.5, not at the positive's),
    and for Wan I2V the CLIP vision states [B, 257, 1280] (2.1 only) and the extra input channels (the start
    image's latent and mask, model space, [B, 20, frames, h, w]) ComfyUI concatenates to the model's input."""

    text: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    guidance: Optional[float] = None
    image: Optional[torch.Tensor] = None
    concat: Optional[torch.Tensor] = None
    # The text's key-padding mask [B, L] (True: a real token), kept on the host: the parallel attention plans
    # with it without a device sync. None: every token is real (what ComfyUI's encoders give one prompt).
    text_mask: Optional[torch.Tensor] = None
    # Reference images (Kontext, Qwen-Image-Edit): latents in model space, [B or 1, C, h, w] each, and how their
    # positions are set (ComfyUI's reference_latents_method; None: the family's default).
    references: tuple[torch.Tensor, ...] = ()
    reference_method: Optional[str] = None
    # HunyuanDiT's second text encoder (mT5): states [B, L2, D2] and both encoders' masks (host).
    text2: Optional[torch.Tensor] = None
    text2_mask: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "BranchCond":
        """A copy with every tensor on `device` (the masks stay on the host)."""
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return replace(self, text=self.text.to(device), pooled=move(self.pooled), image=move(self.image),
                       concat=move(self.concat), references=tuple(r.to(device) for r in self.references),
                       text2=move(self.text2))


@dataclass
class Tokens:
    """The state between embedding and head: image tokens [B, N, D], text tokens, per-token tables."""

    img: torch.Tensor
    txt: Optional[torch.Tensor]
    height: int  # latent height and width (before patching)
    width: int
    extras: dict[str, Any] = field(default_factory=dict)  # temb, rotary tables, ...
    # The joint text's key-padding mask, [B, text tokens] bool on the host (True: attend), which the parallel
    # attention applies; None when every text token is attended. The adapter also hands the blocks their own.
    txt_mask: Optional[torch.Tensor] = None
    # Reference-image tokens (Kontext, Qwen-Image-Edit): the last `n_ref` of `img`, attended like the image's and
    # dropped before the head.
    n_ref: int = 0

    def with_(self, **changes: Any) -> "Tokens":
        return replace(self, **changes)


# How the sequence an attention call sees is made: "joint" = text and image tokens concatenated
# (order given by the adapter's JOINT_ORDER), "image" = image tokens only, "cross" = image queries
# against replicated text keys and values (needs no communication), "local" = a module that runs outside the
# blocks (Z-Image's caption refiner, in the embedding, on every rank): never routed.
ATTENTION_KINDS = ("joint", "image", "cross", "local")


class ModelAdapter:
    """Drives the unchanged diffusers modules of one family in the model's own order."""

    JOINT_ORDER: tuple[str, str] = ("txt", "img")
    TEXT_IS_JOINT = True  # joint text tokens may be split across sequence-parallel ranks
    # PipeFusion sends the joint text with every patch, not only the first of an evaluation: the family's
    # attention fails on zero text tokens (Qwen-Image's rotary reshapes them).
    TEXT_EVERY_UNIT = False

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        self.model = model
        self.spec = spec

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        """Latent [B, C, h, w] ([B, C, frames, h, w] for video; model dtype) and timestep [B] ([B, frames] for
        per-frame timesteps) -> tokens, with every table the blocks need."""
        raise NotImplementedError

    def reference_tokens(self, cond: BranchCond, height: int, width: int) -> int:
        """How many reference-image tokens `embed` appends to the image's for `cond` (Tokens.n_ref)."""
        return 0

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        """The image tokens of `rows` [B, C, r, w] (model dtype), latent rows top..top + r of a latent `height`
        rows high: exactly that slice of `embed(latent, ...).img`, without the other rows (PipeFusion embeds each
        patch once)."""
        raise NotImplementedError

    def blocks(self) -> list[tuple[torch.nn.Module, Callable[[torch.nn.Module, Tokens], Tokens]]]:
        """The transformer blocks in order, each with the function that runs it on Tokens."""
        raise NotImplementedError

    def head(self, tokens: Tokens) -> torch.Tensor:
        """Final norm and projection on the full image tokens -> model output [B, C, h, w]."""
        raise NotImplementedError

    def attention_kinds(self) -> dict[torch.nn.Module, str]:
        """Every attention module and the kind of sequence it attends over (see ATTENTION_KINDS)."""
        raise NotImplementedError

    def carried(self, tokens: Tokens) -> list[torch.Tensor]:
        """Per-token state besides the hidden states that a block leaves for a later one (HunyuanDiT's long skips),
        each shaped like `tokens.img`: what a PipeFusion hand-off carries to the next stage with the patch."""
        return []

    def with_carried(self, tokens: Tokens, carried: list[torch.Tensor]) -> Tokens:
        """`tokens` with the state `carried` gave, received from the previous stage."""
        return tokens

    def carried_after(self, blocks: int) -> int:
        """How many tensors `carried` holds after the first `blocks` blocks ran."""
        return 0

    def shard_extras(self, tokens: Tokens, shard_txt: Callable, shard_img: Callable) -> dict[str, Any]:
        """Per-token tables split like the tokens (default: none are per-token)."""
        return tokens.extras

    def run_blocks(self, tokens: Tokens) -> Tokens:
        for block, run in self.blocks():
            tokens = run(block, tokens)
        return tokens

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
                guidance: Optional[float]) -> torch.Tensor:
        """Serial forward: x [B, C, h, w] in the model's dtype, timestep [B] as the model expects it."""
        tokens = self.run_blocks(self.embed(x, timestep, cond, guidance))
        return self.head(tokens.with_(img=tokens.img[:, :tokens.img.shape[1] - tokens.n_ref]))
