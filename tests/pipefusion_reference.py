"""An exact single-process reference of PipeFusion's stale-K/V schedule, written without the PipeFusion runner.

One process, the whole model, no stages and no communication. The latent is cut into M horizontal patches
(whole rows of 2x2 tokens), each with its own sampler. Every attention layer keeps, per CFG branch, full-length
image K/V buffers. Model evaluations happen in rounds (one per sampler evaluation: euler 1 per step, heun 2):
- a warmup round (step < warmup_steps) evaluates the whole image at once: every buffer gets the whole fresh
  K/V, which is plain attention, as serial;
- a later round evaluates the patches one after the other, m = 0..M-1: embed, run every block on patch m's
  image tokens, where each attention layer writes patch m's fresh K/V into its slice of the buffer and
  attends over the whole buffer (fresh for patches < m of this round, the previous round's for patches > m),
  then the head on patch m's tokens. Joint text (Flux, SD3) runs with patch 0 only: its K/V, kept per layer,
  serve the later patches of the round; so do reference-image tokens (Kontext, Qwen-Image-Edit, FLUX.2; Z-Image's
  image pad tokens), which sit after the image's in the buffers. A text key mask applies to the text's keys.
After each round every patch's sampler takes the CFG-combined prediction of its own rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from xdit_core.models.base import ModelAdapter, Tokens
from xdit_core.parallel.routing import AttentionRouter
from xdit_core.parallel.stages import patch_rows
from xdit_core.sampling.request import SampleRequest
from xdit_core.sampling.samplers import Sampler, is_max_denoise, make_noise


class _StaleKV:
    """The `attend` of an AttentionRouter: per-(layer, branch) full-length image K/V buffers."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.n_img: dict[int, int] = {}  # per branch: image tokens, its references included
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # joint text K/V of patch 0
        self.tokens: Optional[torch.Tensor] = None  # image tokens of the current evaluation
        self.txt_mask: dict[int, Optional[torch.Tensor]] = {}  # per branch: the text's key mask
        self.branch = 0

    def __call__(self, module, kind, q, k, v, scale, processor_mask=None):
        if kind == "cross":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=processor_mask, scale=scale)
        n = len(self.tokens)
        n_txt = q.shape[2] - n  # "image": 0; "joint": the text tokens
        img_first = kind == "image" or self.adapter.JOINT_ORDER[0] == "img"
        img = slice(0, n) if img_first else slice(n_txt, n_txt + n)
        txt = slice(n, n + n_txt) if img_first else slice(0, n_txt)
        key = (id(module), self.branch)
        if key not in self.buffers:
            shape = (k.shape[0], k.shape[1], self.n_img[self.branch], k.shape[3])
            self.buffers[key] = (k.new_zeros(shape), v.new_zeros(shape))
        kb, vb = self.buffers[key]
        kb[:, :, self.tokens] = k[:, :, img]
        vb[:, :, self.tokens] = v[:, :, img]
        kt, vt = k[:, :, txt], v[:, :, txt]
        if kind == "joint" and n_txt:
            self.text[key] = (kt, vt)
        elif kind == "joint":
            kt, vt = self.text[key]
        keys = [kb, kt] if img_first else [kt, kb]
        values = [vb, vt] if img_first else [vt, vb]
        mask = self.txt_mask.get(self.branch)
        if mask is not None and kind == "joint":
            ones = torch.ones(mask.shape[0], kb.shape[2], dtype=torch.bool)
            mask = torch.cat([ones, mask] if img_first else [mask, ones], dim=1)[:, None, None, :]
        else:
            mask = None
        return F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                              scale=scale)


@torch.no_grad()
def pipefusion_reference(adapter: ModelAdapter, request: SampleRequest, patches: int,
                         warmup_steps: int) -> torch.Tensor:
    """The final latent (model space, float32) of PipeFusion's schedule with M = `patches`."""
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
    b, _, h, w = x.shape
    p = adapter.spec.patch_size
    per_row = w // p  # tokens per row of patches
    n_img = (h // p) * per_row
    rows = patch_rows(h, patches, p)
    noise = make_noise(request.sampler, request.seed, x, sigmas)  # the whole latent's, sliced per patch
    samplers = [Sampler(request.sampler, ms, request.seed, noise=noise.rows(r0, r1)) for r0, r1 in rows]
    xs = [x[:, :, r0:r1] for r0, r1 in rows]
    branches = [(1, request.positive)] if request.negative is None else [(0, request.negative),
                                                                           (1, request.positive)]
    attend = _StaleKV(adapter)
    refs = {branch: adapter.reference_tokens(cond, h, w) for branch, cond in branches}
    attend.n_img = {branch: n_img + n for branch, n in refs.items()}
    router = AttentionRouter(adapter.model, adapter.attention_kinds(), attend)

    def evaluate(latent: torch.Tensor, sigma: torch.Tensor, r0: int, r1: int, first: bool) -> torch.Tensor:
        """CFG-combined x0 prediction of latent rows r0:r1 (the only rows whose tokens run the blocks); the first
        patch of an evaluation carries the joint text and the references (a TEXT_EVERY_UNIT family: every patch
        the text)."""
        text = first or adapter.TEXT_EVERY_UNIT
        drop = adapter.TEXT_IS_JOINT and not text
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(latent.device).expand(b)
        preds = []
        for branch, cond in branches:
            tokens = torch.arange(r0 // p * per_row, r1 // p * per_row, device=latent.device)
            n_ref = refs[branch] if first else 0  # the references ride with the first patch, after its tokens
            tokens = torch.cat([tokens, torch.arange(n_img, n_img + n_ref)])
            full = adapter.embed(ms.calculate_input(sigma, latent).to(adapter.dtype), timestep, cond,
                                 cond.guidance)
            if text:
                attend.txt_mask[branch] = full.txt_mask

            def pick(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
                return t.index_select(dim, tokens)

            def keep_txt(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
                return t.narrow(dim, 0, 0) if drop else t

            local = full.with_(img=pick(full.img), txt=keep_txt(full.txt) if full.txt is not None else None,
                               extras=adapter.shard_extras(full, keep_txt, pick))
            attend.tokens, attend.branch = tokens, branch
            with router:
                for block, run in adapter.blocks():
                    local = run(block, local)
            img = local.img[:, :local.img.shape[1] - n_ref]
            out = adapter.head(Tokens(img, None, r1 - r0, w, full.extras)).float()
            preds.append(ms.calculate_denoised(sigma, out, latent[:, :, r0:r1]))
        if len(preds) == 1:
            return preds[0]
        uncond, cond = preds
        return uncond + (cond - uncond) * request.cfg

    for i in range(len(sigmas) - 1):
        gens = [s.step_gen(i, xm, sigmas) for s, xm in zip(samplers, xs)]
        asks = [next(g) for g in gens]  # (x, sigma) each patch's sampler asks the model for
        while asks:
            sigma = asks[0][1]
            assert all(torch.equal(s, sigma) for _, s in asks)
            if i < warmup_steps:  # synchronous: the whole image in one evaluation
                denoised = evaluate(torch.cat([a for a, _ in asks], dim=2), sigma, 0, h, True)
                preds = [denoised[:, :, r0:r1] for r0, r1 in rows]
            else:
                preds = []
                for m, (r0, r1) in enumerate(rows):
                    latent = torch.cat([a for a, _ in asks], dim=2)  # other rows do not reach the blocks
                    preds.append(evaluate(latent, sigma, r0, r1, m == 0))
            nxt = []
            for m, (g, pred) in enumerate(zip(gens, preds)):
                try:
                    nxt.append(g.send(pred))
                except StopIteration as done:
                    xs[m] = done.value
            assert len(nxt) in (0, len(gens)), "every patch's sampler needs the same evaluations"
            asks = nxt
    return ms.inverse_noise_scaling(sigmas[-1], torch.cat(xs, dim=2)).float()
