"""HunyuanDiT (v1.0-1.2, the xDiT paper's model): DiT blocks with image self-attention (2-D rotary positions on a
512-px base grid, ComfyUI's formula), cross-attention to two text encoders' states (CLIP-BERT 77 and mT5 256, padded
tokens replaced by a learned embedding rather than masked), and long skip connections from the first half of the
blocks to the second. Ulysses, Ring and CFG parallel split the skips with the image tokens; under PipeFusion they
cross the stage boundaries with the patch (`carried`: every hand-off takes the skips still to be used)."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.models.base import BranchCond, ModelAdapter, Tokens

CLIP_TOKENS, T5_TOKENS = 77, 256  # ComfyUI's HunyuanDiT tokenizers pad to these; diffusers requires them
BASE_GRID = 512 // 8 // 2  # the rotary grid's base side in tokens (512 px, /8 VAE, 2x2 patches)


def rope_region(rows: int, cols: int, base: int = BASE_GRID) -> tuple[tuple[int, int], tuple[int, int]]:
    """The crop of the base grid a rows x cols token grid maps to (ComfyUI's get_fill_resize_and_crop)."""
    if rows / cols > 1:
        height, width = base, int(round(base / rows * cols))
    else:
        width, height = base, int(round(base / cols * rows))
    top, left = int(round((base - height) / 2.0)), int(round((base - width) / 2.0))
    return (top, left), (top + height, left + width)


def rotary(head_dim: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [rows*cols, head_dim] as ComfyUI's calc_rope: positions start + k (stop - start) / n (numpy's
    linspace without endpoint; diffusers' torch version differs off-centre, for non-square sizes)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_from_grid

    (top, left), (bottom, right) = rope_region(rows, cols)
    grid_h = (top + torch.arange(rows, dtype=torch.float64) * ((bottom - top) / rows)).float()
    grid_w = (left + torch.arange(cols, dtype=torch.float64) * ((right - left) / cols)).float()
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0).reshape(2, 1, rows, cols)
    return get_2d_rotary_pos_embed_from_grid(head_dim, grid, use_real=True)


def _runner(index: int, depth: int):
    """Block `index`'s run: it takes the skip of block depth - 1 - index (second half), and the first half's
    outputs but the last are kept for them (diffusers' HunyuanDiT2DModel.forward)."""
    def run(block: torch.nn.Module, t: Tokens) -> Tokens:
        skips = t.extras["skips"]
        skip = skips.pop() if index > depth // 2 else None
        img = block(t.img, encoder_hidden_states=t.txt, temb=t.extras["temb"], image_rotary_emb=t.extras["rotary"],
                    skip=skip)
        if index < depth // 2 - 1:
            skips.append(img)
        return t.with_(img=img)
    return run


class HunyuanDiTAdapter(ModelAdapter):
    TEXT_IS_JOINT = False  # the text enters through cross-attention, replicated

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        dtype, device = x.dtype, x.device
        t5 = cond.text2.to(dtype)
        meta = style = None
        if m.config.use_style_cond_and_image_meta_size:  # v1.0/1.1: ComfyUI's size (the latent's) and style 0
            size = [h * 8, w * 8]
            meta = torch.tensor([size + size + [0, 0]], dtype=dtype, device=device).expand(b, -1)
            style = torch.zeros(b, dtype=torch.long, device=device)
        t = timestep.to(dtype)
        temb = m.time_extra_emb(t, t5, meta, style, hidden_dtype=t.dtype)
        t5 = m.text_embedder(t5.reshape(-1, t5.shape[-1])).reshape(b, t5.shape[1], -1)
        mask = torch.cat([cond.text_mask, cond.text2_mask], dim=-1).bool().to(device).expand(b, -1)
        txt = torch.where(mask.unsqueeze(2), torch.cat([cond.text.to(dtype), t5], dim=1), m.text_embedding_padding)
        cos, sin = rotary(m.config.attention_head_dim, h // 2, w // 2)
        extras = {"temb": temb, "rotary": (cos.to(device), sin.to(device)), "skips": []}
        return Tokens(m.pos_embed(x), txt, h, w, extras)

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return self.model.pos_embed(rows)  # a plain patch projection: positions live in the rotary table

    def blocks(self):
        depth = len(self.model.blocks)
        return [(b, _runner(i, depth)) for i, b in enumerate(self.model.blocks)]

    def head(self, tokens: Tokens) -> torch.Tensor:
        m = self.model
        out = m.proj_out(m.norm_out(tokens.img, tokens.extras["temb"].to(torch.float32)))
        b, c = out.shape[0], m.out_channels
        out = out.reshape(b, tokens.height // 2, tokens.width // 2, 2, 2, c)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(b, c, tokens.height, tokens.width)
        return out[:, :self.spec.latent_channels]  # learn_sigma: the variance half is unused, as in ComfyUI

    def attention_kinds(self):
        kinds = {}
        for b in self.model.blocks:
            kinds[b.attn1] = "image"
            kinds[b.attn2] = "cross"
        return kinds

    def carried(self, tokens: Tokens) -> list[torch.Tensor]:
        return list(tokens.extras["skips"])

    def with_carried(self, tokens: Tokens, carried: list[torch.Tensor]) -> Tokens:
        return tokens.with_(extras={**tokens.extras, "skips": list(carried)})

    def carried_after(self, blocks: int) -> int:
        depth = len(self.model.blocks)  # pushes by blocks < depth // 2 - 1, pops by blocks > depth // 2
        return sum(1 for i in range(blocks) if i < depth // 2 - 1) - sum(1 for i in range(blocks) if i > depth // 2)

    def shard_extras(self, tokens, shard_txt, shard_img):
        cos, sin = tokens.extras["rotary"]
        return {**tokens.extras, "rotary": (shard_img(cos, dim=0), shard_img(sin, dim=0)), "skips": []}
