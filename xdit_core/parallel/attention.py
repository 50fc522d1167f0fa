"""Sequence-parallel attention: Ulysses (all-to-all heads <-> sequence), Ring (K/V blocks around the
ring, merged with their log-sum-exp in float32), and USP (Ulysses outside, Ring inside).

The sequence one call sees is made of segments: split ones (sharded over the SP group, shard index
s = ring_rank * ulysses_degree + ulysses_rank, real tokens first and padding last) and replicated ones
(the same on every rank: joint text whose length the degree does not divide). Replicated keys are
attended exactly once; padded keys are dropped before the kernel, so every backend sees no mask and
every collective has equal sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


def attention_with_lse(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel`'s (out [B, H, S, D], lse [B, H, S]); a kernel whose LSE has another shape is an error, not a merge."""
    out, lse = kernel(q, k, v, scale)
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


def _valid_key_index(segments: Sequence[Segment], ulysses: int, ring_origin: int,
                     device: torch.device) -> Optional[torch.Tensor]:
    """Positions of real (unpadded) keys in the split block gathered from ring rank `ring_origin`."""
    keep, pos, padded = [], 0, False
    for u in range(ulysses):
        shard = ring_origin * ulysses + u
        for seg in segments:
            if not seg.split:
                continue
            real = max(0, min(seg.length, seg.valid - shard * seg.length))
            keep.extend(range(pos, pos + real))
            padded |= real < seg.length
            pos += seg.length
    return torch.tensor(keep, dtype=torch.long, device=device) if padded else None


def _merge(acc: Optional[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor, lse: torch.Tensor):
    """Combine two partial attentions over disjoint keys by their log-sum-exp (float32)."""
    out, lse = out.float(), lse.float()
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    merged = acc_out * torch.exp(acc_lse - new_lse).unsqueeze(-1) + out * torch.exp(lse - new_lse).unsqueeze(-1)
    return merged, new_lse


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[Segment],
                  groups: SPGroups, scale: Optional[float] = None,
                  kv_cache: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[tuple]], tuple]] = None
                  ) -> torch.Tensor:
    """Exact attention over the whole (unsharded) sequence for this rank's local queries. q, k, v: [B, H, S, D].

    `kv_cache(ks, vs, rep) -> (k, v)` (PipeFusion) takes the split part's keys and values after the all-to-all
    and the replicated segments' (this rank's heads; None when the call has none), and returns complete keys
    and values: every rank's split tokens and the replicated ones (full-length buffers, which it keeps up to
    date across the ring group itself, with the replicated keys of the last call that had them); they are
    attended as one block, without a ring pass or a merge.
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

    def attend(kb: torch.Tensor, vb: torch.Tensor, acc):
        if blocks_total == 1:  # one block: no LSE needed
            return F.scaled_dot_product_attention(query, kb, vb, scale=scale), None
        out, lse = attention_with_lse(groups.lse_kernel, query, kb, vb, scale)
        return _merge(acc, out, lse)

    acc = None
    if separate_rep:
        acc = attend(*rep_kv, acc)
    if has_split and kv_cache is not None:
        acc = attend(*kv_cache(ks, vs, rep_kv), acc)
    elif has_split:
        kv = torch.stack([ks, vs])

        def attend_block(block: torch.Tensor, origin: int, acc):
            keep = _valid_key_index(segments, U, origin, block.device)
            kb, vb = (block[0], block[1]) if keep is None else (block[0].index_select(2, keep),
                                                                block[1].index_select(2, keep))
            return attend(kb, vb, acc) if kb.shape[2] > 0 else acc

        if groups.ring_impl == "allgather" and ring.size > 1:
            for origin, block in enumerate(ring.all_gather(kv, "ring_all_gather").unbind(0)):
                acc = attend_block(block, origin, acc)
        else:
            for step in range(ring.size):
                # Start the next hand-off before computing on the current block, so they overlap.
                pending = ring.ring_exchange(kv, "ring_p2p") if step < ring.size - 1 else None
                acc = attend_block(kv, (ring.index - step) % ring.size, acc)
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
