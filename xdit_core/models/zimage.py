"""Z-Image and Z-Image-Turbo: a single-stream DiT over [image, caption] tokens (each padded to a multiple of 32
with a learned pad token that is attended, not masked), two noise-refiner blocks on the image tokens, two
context-refiner blocks on the caption (run with the embedding: it is small and replicated), 3-axis complex
rotary positions (theta 256). The model takes t = 1 - sigma and predicts the negated flow, which the head undoes
(diffusers' ZImagePipeline negates it too)."""
from __future__ import annotations

from typing import Optional

import torch

from xdit_core.models.base import BranchCond, ModelAdapter, Tokens

SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: caption and image are each padded to a multiple of it


def _pad(n: int) -> int:
    return (-n) % SEQ_MULTIPLE


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], each patch's values channel last (Z-Image's _patchify_image)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, 2, 2, d // 4).permute(0, 5, 1, 3, 2, 4).reshape(b, d // 4, h, w)


def _run_refiner(block: torch.nn.Module, t: Tokens) -> Tokens:
    return t.with_(img=block(t.img, None, t.extras["img_freqs"], t.extras["adaln"]))


def _run_layer(block: torch.nn.Module, t: Tokens) -> Tokens:
    n = t.img.shape[1]
    x = block(torch.cat([t.img, t.txt], dim=1), None, torch.cat([t.extras["img_freqs"], t.extras["txt_freqs"]], dim=1),
              t.extras["adaln"])
    return t.with_(img=x[:, :n], txt=x[:, n:])


class ZImageAdapter(ModelAdapter):
    JOINT_ORDER = ("img", "txt")  # the unified sequence: image tokens first

    def reference_tokens(self, cond: BranchCond, height: int, width: int) -> int:
        return _pad((height // 2) * (width // 2))  # the image's pad tokens ride after its rows, like references

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, cond: BranchCond,
              guidance: Optional[float]) -> Tokens:
        m = self.model
        b, _, h, w = x.shape
        dtype, device = x.dtype, x.device
        n_img, n_txt = (h // 2) * (w // 2), cond.text.shape[1]
        txt_len = n_txt + _pad(n_txt)
        # Positions: caption token k at (1 + k, 0, 0) (its pads too); image (txt_len + 1, row, column); image pads 0.
        cap_ids = torch.zeros(txt_len, 3, dtype=torch.long)
        cap_ids[:, 0] = torch.arange(1, txt_len + 1)
        img_ids = torch.zeros(n_img + _pad(n_img), 3, dtype=torch.long)
        img_ids[:n_img, 0] = txt_len + 1
        img_ids[:n_img, 1] = torch.arange(h // 2).repeat_interleave(w // 2)
        img_ids[:n_img, 2] = torch.arange(w // 2).repeat(h // 2)
        img_freqs = m.rope_embedder(img_ids.to(device)).expand(b, -1, -1)
        txt_freqs = m.rope_embedder(cap_ids.to(device)).expand(b, -1, -1)
        adaln = m.t_embedder((1.0 - timestep.to(dtype)) * m.config.t_scale).type_as(x)
        img = self._embedder()(patchify(x))
        img = torch.cat([img, m.x_pad_token.to(dtype).expand(b, _pad(n_img), -1)], dim=1)
        txt = m.cap_embedder(cond.text.to(dtype))
        txt = torch.cat([txt, m.cap_pad_token.to(dtype).expand(b, _pad(n_txt), -1)], dim=1)
        for layer in m.context_refiner:  # the caption alone: every rank, with the embedding
            txt = layer(txt, None, txt_freqs)
        extras = {"adaln": adaln, "img_freqs": img_freqs, "txt_freqs": txt_freqs}
        return Tokens(img, txt, h, w, extras, n_ref=_pad(n_img))

    def _embedder(self) -> torch.nn.Module:
        return self.model.all_x_embedder["2-1"]

    def embed_image(self, rows: torch.Tensor, top: int, height: int) -> torch.Tensor:
        return self._embedder()(patchify(rows))

    def blocks(self):
        m = self.model
        return [(b, _run_refiner) for b in m.noise_refiner] + [(b, _run_layer) for b in m.layers]

    def head(self, tokens: Tokens) -> torch.Tensor:
        out = self.model.all_final_layer["2-1"](tokens.img, c=tokens.extras["adaln"])
        return -unpatchify(out, tokens.height, tokens.width)  # the flow ComfyUI's CONST sampling expects

    def attention_kinds(self):
        m = self.model
        kinds = {b.attention: "image" for b in m.noise_refiner}
        kinds.update({b.attention: "joint" for b in m.layers})
        kinds.update({b.attention: "local" for b in m.context_refiner})  # runs in embed, outside the routing
        return kinds

    def shard_extras(self, tokens, shard_txt, shard_img):
        return {**tokens.extras, "img_freqs": shard_img(tokens.extras["img_freqs"], dim=1),
                "txt_freqs": shard_txt(tokens.extras["txt_freqs"], dim=1)}
