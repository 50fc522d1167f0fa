"""Wan 2.1 / 2.2 video (T2V, I2V, TI2V 5B): 3-D patched video tokens with 3-D rotary positions, self-attention
over the video, cross-attention to umT5 text (and, for Wan 2.1 I2V, CLIP vision) states, per-token timesteps
for Wan 2.2 5B's clean start frames."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConditioningError
from xdit_core.models.base import BranchCond, ModelAdapter, Tokens
from xdit_core.models.families import ModelSpec

# diffusers' I2V cross-attention takes the last 512 context tokens as text and the rest as CLIP vision states
# (ComfyUI's umT5 tokenizer pads every prompt to at least 512 tokens).
I2V_TEXT_TOKENS = 512


def _run_block(block: torch.nn.Module, t: Tokens) -> Tokens:
    return t.with_(img=block(t.img, t.txt, t.extras["tproj"], t.extras["rotary"]))


def unpatchify_3d(tokens: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw], the layout of diffusers' Wan head."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class WanAdapter(ModelAdapter):
    TEXT_IS_JOINT = False  # text (and CLIP vision) states enter through cross-attention, replicated

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        if cond.concat is not None:  # I2V: the start image's latent and mask, as ComfyUI's concat_cond
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)
        b, _, frames, h, w = x.shape
        pt, ph, pw = m.config.patch_size
        grid = (frames // pt, h // ph, w // pw)
        rotary = m.rope(x)
        img = m.patch_embedding(x).flatten(2).transpose(1, 2)
        per_token = timestep.ndim == 2
        if per_token:  # one timestep per latent frame -> one per token of that frame
            timestep = timestep.repeat_interleave(grid[1] * grid[2], dim=1).flatten()
        image = None if cond.image is None else cond.image.to(x.dtype)
        temb, tproj, txt, image = m.condition_embedder(timestep, cond.text.to(x.dtype), image,
                                                       timestep_seq_len=img.shape[1] if per_token else None)
        tproj = tproj.unflatten(2 if per_token else 1, (6, -1))
        if image is not None:
            txt = torch.cat([image, txt], dim=1)
        return Tokens(img, txt, h, w, {"temb": temb, "tproj": tproj, "rotary": rotary, "grid": grid})

    def blocks(self):
        return [(b, _run_block) for b in self.model.blocks]

    def head(self, tokens: Tokens) -> torch.Tensor:
        m, temb, img = self.model, tokens.extras["temb"], tokens.img
        if temb.ndim == 3:  # per-token timesteps
            shift, scale = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        out = m.proj_out((m.norm_out(img.float()) * (1 + scale) + shift).type_as(img))
        return unpatchify_3d(out, tokens.extras["grid"], m.config.patch_size)

    def attention_kinds(self):
        kinds = {}
        for b in self.model.blocks:
            kinds[b.attn1] = "image"
            kinds[b.attn2] = "cross"  # Wan 2.1 I2V: one call over the CLIP states, one over the text
        return kinds

    def shard_extras(self, tokens, shard_txt, shard_img):
        extras = dict(tokens.extras)
        extras["rotary"] = tuple(shard_img(r, dim=1) for r in tokens.extras["rotary"])  # [1, S, 1, D]
        if extras["tproj"].ndim == 4:  # per-token modulation [B, S, 6, D]
            extras["tproj"] = shard_img(extras["tproj"], dim=1)
        return extras


def image_concat(spec: ModelSpec, shape: Sequence[int], concat_latent_image: Optional[torch.Tensor],
                 concat_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The extra input channels of a Wan I2V model for a latent of `shape` [B, C, frames, h, w], as ComfyUI's
    WAN21.concat_cond makes them from WanImageToVideo's `concat_latent_image` (LATENT space) and
    `concat_mask` (0 on the start frames): 4 channels of (1 - mask), then the image latent in model space.
    Without an image both are zeros, as ComfyUI's; None for a model that takes no extra channels."""
    if spec.concat_channels == 0:
        return None
    b, _, frames, h, w = shape
    if concat_latent_image is None:
        return torch.zeros(b, spec.concat_channels, frames, h, w)
    image = concat_latent_image.float()
    image_channels = spec.concat_channels - 4
    if image.ndim != 5 or image.shape[1] < image_channels or tuple(image.shape[-2:]) != (h, w):
        raise XDiTConditioningError(
            f"concat_latent_image has shape {list(image.shape)}; the I2V model takes [B, {image_channels}, frames, "
            f"{h}, {w}] for this latent (WanImageToVideo makes it at the sampled latent's width and height)")
    step = spec.latent_channels
    image = torch.cat([spec.latent_format.process_in(image[:, i:i + step]) for i in range(0, image_channels, step)],
                      dim=1)
    if concat_mask is None:
        mask = torch.zeros(image.shape[0], 4, *image.shape[2:])
    else:
        mask = concat_mask.float()
        if mask.ndim != 5 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[2] > frames:
            raise XDiTConditioningError(f"concat_mask has shape {list(mask.shape)}; the I2V model takes [B, 1, "
                                        f"at most {frames}, {h}, {w}] for this latent (as WanImageToVideo makes it)")
        if mask.shape[1] != 4:
            mask = mask.mean(dim=1, keepdim=True)
        mask = torch.nn.functional.pad(1.0 - mask, (0, 0, 0, 0, 0, frames - mask.shape[2]))
        if mask.shape[1] == 1:
            mask = mask.repeat(1, 4, 1, 1, 1)
    return torch.cat([_to_batch(mask, b), _to_batch(image, b)], dim=1)


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's resize_to_batch_size: pick items evenly (fewer) or spread them (more)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch < n:
        scale = (n - 1) / (batch - 1) if batch > 1 else 0
        return t[[min(round(i * scale), n - 1) for i in range(batch)]]
    return t[[min(int((i + 0.5) * n / batch), n - 1) for i in range(batch)]]


def check_branch(spec: ModelSpec, cond: BranchCond, shape: Sequence[int], branch: str) -> None:
    """A Wan branch's CLIP vision states and extra channels fit the model and the latent of `shape`."""
    if spec.image_dim is not None:
        if cond.image is None:
            raise XDiTConditioningError(
                f"{branch}: this Wan 2.1 I2V model needs CLIP vision states: connect a CLIP Vision Encode output "
                "to WanImageToVideo's clip_vision_output")
        if cond.image.ndim != 3 or cond.image.shape[-1] != spec.image_dim or cond.image.shape[0] not in (1, shape[0]):
            raise XDiTConditioningError(f"{branch}: CLIP vision states have shape {list(cond.image.shape)}, expected "
                                        f"[{shape[0]}, N, {spec.image_dim}] (the penultimate hidden states)")
        if cond.text.shape[1] != I2V_TEXT_TOKENS:
            raise XDiTConditioningError(
                f"{branch}: Wan I2V with CLIP vision takes exactly {I2V_TEXT_TOKENS} text tokens (ComfyUI's umT5 "
                f"pads to {I2V_TEXT_TOKENS}), got {cond.text.shape[1]}: shorten the prompt")
    elif cond.image is not None:
        raise XDiTConditioningError(f"{branch}: this Wan {spec.variant} model has no image embedder for CLIP vision "
                                    "states; leave WanImageToVideo's clip_vision_output unconnected")
    want = (shape[0], spec.concat_channels, *shape[2:])
    if spec.concat_channels and (cond.concat is None or tuple(cond.concat.shape) != want):
        got = None if cond.concat is None else list(cond.concat.shape)
        raise XDiTConditioningError(f"{branch}: the I2V model's extra input channels are {got}, expected {list(want)}")
    if not spec.concat_channels and cond.concat is not None:
        raise XDiTConditioningError(f"{branch}: a start image's latent and mask (concat_latent_image) reach a Wan "
                                    f"{spec.variant} model, which takes none; use an I2V model or Wan22ImageToVideoLatent")
