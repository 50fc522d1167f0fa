"""Sequence-parallel attention: Ulysses (all-to-all heads <-> sequence), Ring (K/V blocks around the
ring, merged with their log-sum-exp in float32), and USP (Ulysses outside, Ring inside).

The sequence one call sees is made of segments: split ones (sharded over the SP group, shard index
s = ring_rank * ulysses_degree + ulysses_rank, real tokens first and padding last) and replicated ones
(the same on every rank: joint text whose length the degree does not divide). Replicated keys are
attended exactly once; padded keys are dropped before the kernel, so every backend sees no mask and
every collective has equal sizes.

Key-padding masks (a family's text mask, e.g. Qwen-Image's `encoder_hidden_states_mask`) ride on the segments
as the whole segment's validity per batch item: keys masked for every item are dropped like padding (any
kernel, no mask); keys masked for some items only (batched prompts of different lengths) reach the kernel as
a mask, and a block with no valid key for an item merges with weight zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from xdit_core.parallel.comm import Comm
from xdit_core.errors import XDiTConfigError, XDiTWorkerError

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


# ---------------------------------------------------------------------------------------------
# Kernels returning (out, lse): the backend table.
# ---------------------------------------------------------------------------------------------
def _lse_cpu(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]


def _lse_masked(q, k, v, scale, mask):
    """(out, lse) with a key mask [B, Sk] (True: attend). On the CPU PyTorch's flash kernel takes it as a bias;
    elsewhere the explicit float32 product (flash-attn takes no mask; only batched prompts of different lengths
    come here). An item with no valid key gets out 0 and LSE -inf, which the merge weighs zero."""
    has_key = mask.any(dim=-1)[:, None, None]
    if q.device.type == "cpu":
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, scale=scale, attn_mask=bias[:, None, None, :])[:2]
    else:
        out, lse = lse_masked_explicit(q, k, v, scale, mask)
    return out.masked_fill(~has_key[..., None], 0.0), lse.masked_fill(~has_key, float("-inf"))


def lse_masked_explicit(q, k, v, scale, mask):
    """The masked (out, lse) as an explicit float32 product: the path for GPUs (tested against the CPU kernel)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v.float()).to(q.dtype), lse


def _lse_cuda_sdpa(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]  # the kernel pads the LSE's sequence dim


def _lse_flash_attn(q, k, v, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  return_attn_probs=True)
    return out.transpose(1, 2), lse


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what flash-attn computes in


def select_lse_kernel(device: torch.device, backend: str = "auto", dtype: torch.dtype = torch.float32) -> Callable:
    """The attention kernel that also returns the LSE Ring needs, for `device`, `dtype` and the requested backend.

    flash-attn only on CUDA in fp16/bf16 (it has no fp32 kernel); otherwise PyTorch's SDPA kernels.
    """
    if backend not in ATTENTION_BACKENDS:
        raise XDiTConfigError(f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "flash":
        if device.type != "cuda":
            raise XDiTConfigError("attention backend 'flash' needs a CUDA GPU; on CPU use auto or sdpa")
        if not _flash_attn_available():
            raise XDiTConfigError("attention backend 'flash' needs flash-attn: pip install flash-attn, or use auto")
        if dtype not in FLASH_DTYPES:
            raise XDiTConfigError(f"attention backend 'flash' computes in fp16/bf16, this model runs in {dtype}; "
                                  "use auto or sdpa, or load the model in bf16")
        return _lse_flash_attn
    if device.type == "cuda":
        return _lse_flash_attn if backend == "auto" and dtype in FLASH_DTYPES and _flash_attn_available() \
            else _lse_cuda_sdpa
    return _lse_cpu


def attention_with_lse(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel`'s (out [B, H, S, D], lse [B, H, S]) (with a key mask [B, Sk]: the masked kernel's); a kernel whose
    LSE has another shape is an error, not a merge."""
    out, lse = kernel(q, k, v, scale) if mask is None else _lse_masked(q, k, v, scale, mask)
    if out.shape != q.shape[:3] + v.shape[3:] or lse.shape != q.shape[:3]:
        raise XDiTWorkerError(f"attention kernel {kernel.__name__} returned out {tuple(out.shape)} and LSE "
                              f"{tuple(lse.shape)} for queries {tuple(q.shape)}; expected LSE {tuple(q.shape[:3])}")
    return out, lse


# ---------------------------------------------------------------------------------------------
# Layout of one attention call's sequence.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A run of tokens in a rank's local sequence."""

    length: int  # local length
    split: bool  # sharded across the SP group (else replicated)
    valid: int  # split: real tokens in the whole sequence (the rest is padding); replicated: = length
    # Key-padding mask of the whole segment, [B, valid] bool on the host (True: attend); None: every key is real.
    mask: Optional[torch.Tensor] = field(default=None, compare=False)


@dataclass
class SPGroups:
    """The sequence-parallel communicators of one rank and the kernel to use."""

    ulysses: Comm
    ring: Comm
    lse_kernel: Callable
    ring_impl: str = "p2p"  # "p2p": K/V blocks hop around the ring, overlapped; "allgather": one collective

    @property
    def shard_index(self) -> int:
        return self.ring.index * self.ulysses.size + self.ulysses.index


def _select(x: torch.Tensor, segments: Sequence[Segment], split: bool) -> torch.Tensor:
    if all(seg.split == split for seg in segments):
        return x  # the whole sequence, already in order: no copy
    parts, start = [], 0
    for seg in segments:
        if seg.split == split:
            parts.append(x.narrow(2, start, seg.length))
        start += seg.length
    return torch.cat(parts, dim=2) if len(parts) != 1 else parts[0]


def _key_validity(segments: Sequence[Segment], ulysses: int, ring_origin: int, split: bool) -> Optional[torch.Tensor]:
    """Which keys are real, [B, keys] bool on the host (B = 1 without masks), in the split block gathered from
    ring rank `ring_origin` (split) or in the replicated segments (not split): padding and masked tokens are
    not. None when every key is real (found from the lengths alone, without a tensor, when nothing is masked)."""
    runs = []  # (segment, its first token in the whole sequence, real tokens of this block's piece)
    for u in range(ulysses if split else 1):
        shard = ring_origin * ulysses + u
        for seg in segments:
            if seg.split == split:
                start = shard * seg.length if split else 0
                runs.append((seg, start, max(0, min(seg.length, seg.valid - start))))
    masked = [seg.mask for seg, _, _ in runs if seg.mask is not None]
    if not masked and all(real == seg.length for seg, _, real in runs):
        return None
    batch = max((m.shape[0] for m in masked), default=1)
    parts = []
    for seg, start, real in runs:
        part = torch.zeros(batch, seg.length, dtype=torch.bool)
        part[:, :real] = True if seg.mask is None else seg.mask[:, start:start + real]
        parts.append(part)
    valid = torch.cat(parts, dim=1)
    return None if bool(valid.all()) else valid


def select_keys(valid: Optional[torch.Tensor], device: torch.device
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(keys to keep, mask) for a validity from `_key_validity`: keys invalid for every item are dropped (an index
    of the rest), a mask [B, keys] remains only where the items differ."""
    if valid is None:
        return None, None
    if bool((valid == valid[0]).all()):
        return valid[0].nonzero().flatten().to(device), None
    return None, valid.to(device)


def _merge(acc: Optional[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor, lse: torch.Tensor,
           masked: bool = False):
    """Combine two partial attentions over disjoint keys by their log-sum-exp (float32). `masked`: `lse` may be
    -inf (a masked block with no key for an item)."""
    out, lse = out.float(), lse.float()
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    # Both parts without a key for a query (only a masked block can add one): weigh them zero instead of NaN.
    ref = new_lse.masked_fill(torch.isneginf(new_lse), 0.0) if masked else new_lse
    merged = acc_out * torch.exp(acc_lse - ref).unsqueeze(-1) + out * torch.exp(lse - ref).unsqueeze(-1)
    return merged, new_lse


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[Segment],
                  groups: SPGroups, scale: Optional[float] = None,
                  kv_cache: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[tuple]], tuple]] = None
                  ) -> torch.Tensor:
    """Exact attention over the whole (unsharded) sequence for this rank's local queries. q, k, v: [B, H, S, D].

    `kv_cache(ks, vs, rep) -> (k, v, valid)` (PipeFusion) takes the split part's keys and values after the
    all-to-all and the replicated segments' (this rank's heads; None when the call has none), and returns
    complete keys and values: every rank's split tokens and the replicated ones (full-length buffers, which it
    keeps up to date across the ring group itself, with the replicated keys of the last call that had them),
    with their validity as `_key_validity` gives it; they are attended as one block, without a ring pass or a
    merge.
    """
    b, heads, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    uly, ring = groups.ulysses, groups.ring
    U = uly.size
    has_split = any(s.split for s in segments)
    has_rep = any(not s.split for s in segments)
    hu = heads // U
    head_slice = slice(uly.index * hu, (uly.index + 1) * hu)

    def to_heads(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Each [B, H, Ls, D] -> [B, H/U, U*Ls, D]: send head group j to Ulysses rank j, receive its sequence
        # shard. Q, K and V travel in one all-to-all (one collective's latency instead of three).
        if U == 1:
            return xs  # no head groups to exchange: no copy either
        ls = xs[0].shape[2]
        x = torch.stack([t.reshape(b, U, hu, ls, d).permute(1, 0, 2, 3, 4) for t in xs], dim=1)
        x = uly.all_to_all(x, "ulysses_all_to_all")  # [U, n, B, H/U, Ls, D]
        return x.permute(1, 2, 3, 0, 4, 5).reshape(len(xs), b, hu, U * ls, d).unbind(0)

    qs = ks = vs = rep_kv = None
    if has_split:
        qs, ks, vs = to_heads(*(_select(t, segments, True) for t in (q, k, v)))
    if has_rep:
        qr, kr, vr = (_select(t, segments, False)[:, head_slice] for t in (q, k, v))
        query = torch.cat([qs, qr], dim=2) if has_split else qr
        rep_kv = (kr, vr)
    else:
        query = qs
    split_blocks = 0 if not has_split else 1 if kv_cache is not None else ring.size
    separate_rep = has_rep and kv_cache is None  # the cache holds the replicated keys with the split ones
    blocks_total = split_blocks + (1 if separate_rep else 0)

    def attend(kb: torch.Tensor, vb: torch.Tensor, valid: Optional[torch.Tensor], acc):
        keep, mask = select_keys(valid, kb.device)
        if keep is not None:
            kb, vb = kb.index_select(2, keep), vb.index_select(2, keep)
            if kb.shape[2] == 0:
                return acc
        if blocks_total == 1:  # one block: no LSE needed
            return F.scaled_dot_product_attention(
                query, kb, vb, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale), None
        out, lse = attention_with_lse(groups.lse_kernel, query, kb, vb, scale, mask)
        return _merge(acc, out, lse, masked=mask is not None)

    acc = None
    if separate_rep:
        acc = attend(*rep_kv, _key_validity(segments, U, 0, split=False), acc)
    if has_split and kv_cache is not None:
        acc = attend(*kv_cache(ks, vs, rep_kv), acc)
    elif has_split:
        kv = torch.stack([ks, vs])
        if groups.ring_impl == "allgather" and ring.size > 1:
            for origin, block in enumerate(ring.all_gather(kv, "ring_all_gather").unbind(0)):
                acc = attend(block[0], block[1], _key_validity(segments, U, origin, split=True), acc)
        else:
            for step in range(ring.size):
                # Start the next hand-off before computing on the current block, so they overlap.
                pending = ring.ring_exchange(kv, "ring_p2p") if step < ring.size - 1 else None
                acc = attend(kv[0], kv[1], _key_validity(segments, U, (ring.index - step) % ring.size, split=True),
                             acc)
                if pending is not None:
                    buf, works = pending
                    for w in works:
                        w.wait()
                    kv = buf
    out = acc[0].to(q.dtype)

    # Back to this rank's local layout: [B, H, S_local, D].
    split_len = qs.shape[2] if has_split else 0
    pieces = {}
    if has_split and U == 1:
        pieces[True] = out[:, :, :split_len]
    elif has_split:
        ls = split_len // U
        o = out[:, :, :split_len].reshape(b, hu, U, ls, d).permute(2, 0, 1, 3, 4)
        o = uly.all_to_all(o, "ulysses_all_to_all")  # chunk j: my sequence shard, head group j
        pieces[True] = o.permute(1, 0, 2, 3, 4).reshape(b, heads, ls, d)
    if has_rep and U == 1:
        pieces[False] = out[:, :, split_len:]
    elif has_rep:
        r = uly.all_gather(out[:, :, split_len:], "ulysses_all_gather")  # [U, B, H/U, Lr, D]
        pieces[False] = r.permute(1, 0, 2, 3, 4).reshape(b, heads, -1, d)
    if len(pieces) == 1:  # one kind of segment: already in the local order
        return next(iter(pieces.values()))
    result, offsets = [], {True: 0, False: 0}
    for seg in segments:
        result.append(pieces[seg.split].narrow(2, offsets[seg.split], seg.length))
        offsets[seg.split] += seg.length
    return torch.cat(result, dim=2)
