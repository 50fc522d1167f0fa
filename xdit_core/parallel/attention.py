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
from xdit_core.errors import XDiTConfigError

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


# ---------------------------------------------------------------------------------------------
# Kernels returning (out, lse): the backend table.
# ---------------------------------------------------------------------------------------------
def _lse_cpu(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


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


def select_lse_kernel(device: torch.device, backend: str = "auto") -> Callable:
    """The attention kernel that also returns the LSE Ring needs, for `device` and the requested backend."""
    if backend not in ATTENTION_BACKENDS:
        raise XDiTConfigError(f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    if device.type == "cuda":
        if backend == "flash" and not _flash_attn_available():
            raise XDiTConfigError("attention backend 'flash' needs flash-attn: pip install flash-attn, or use auto")
        if backend in ("auto", "flash") and _flash_attn_available():
            return _lse_flash_attn
        return _lse_cuda_sdpa
    if backend == "flash":
        raise XDiTConfigError("attention backend 'flash' needs a CUDA GPU; on CPU use auto or sdpa")
    return _lse_cpu


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
                  kv_cache: Optional[Callable[[torch.Tensor, torch.Tensor], tuple]] = None) -> torch.Tensor:
    """Exact attention over the whole (unsharded) sequence for this rank's local queries. q, k, v: [B, H, S, D].

    `kv_cache(ks, vs) -> (k, v)` (PipeFusion) takes the split part's keys and values after the all-to-all
    and returns complete keys and values over every rank's tokens (a full-length buffer, which it keeps
    up to date across the ring group itself); they are then attended as one block, without a ring pass.
    """
    b, heads, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    uly, ring = groups.ulysses, groups.ring
    U = uly.size
    has_split = any(s.split for s in segments)
    has_rep = any(not s.split for s in segments)
    hu = heads // U
    head_slice = slice(uly.index * hu, (uly.index + 1) * hu)

    def to_heads(x: torch.Tensor) -> torch.Tensor:
        # [B, H, Ls, D] -> [B, H/U, U*Ls, D]: send head group j to Ulysses rank j, receive its sequence shard.
        ls = x.shape[2]
        x = x.reshape(b, U, hu, ls, d).permute(1, 0, 2, 3, 4)
        x = uly.all_to_all(x, "ulysses_all_to_all")
        return x.permute(1, 2, 0, 3, 4).reshape(b, hu, U * ls, d)

    qs = ks = vs = None
    if has_split:
        qs, ks, vs = (to_heads(_select(t, segments, True)) for t in (q, k, v))
    if has_rep:
        qr, kr, vr = (_select(t, segments, False)[:, head_slice] for t in (q, k, v))
        query = torch.cat([qs, qr], dim=2) if has_split else qr
    else:
        query = qs

    split_blocks = 0 if not has_split else 1 if kv_cache is not None else ring.size
    blocks_total = split_blocks + (1 if has_rep else 0)

    def attend(kb: torch.Tensor, vb: torch.Tensor, acc):
        if blocks_total == 1:  # one block: no LSE needed
            return F.scaled_dot_product_attention(query, kb, vb, scale=scale), None
        out, lse = groups.lse_kernel(query, kb, vb, scale)
        return _merge(acc, out, lse)

    acc = None
    if has_rep:
        acc = attend(kr, vr, acc)
    if has_split and kv_cache is not None:
        acc = attend(*kv_cache(ks, vs), acc)
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
    if has_split:
        ls = split_len // U
        o = out[:, :, :split_len].reshape(b, hu, U, ls, d).permute(2, 0, 1, 3, 4)
        o = uly.all_to_all(o, "ulysses_all_to_all")  # chunk j: my sequence shard, head group j
        pieces[True] = o.permute(1, 0, 2, 3, 4).reshape(b, heads, ls, d)
    if has_rep:
        r = uly.all_gather(out[:, :, split_len:], "ulysses_all_gather")  # [U, B, H/U, Lr, D]
        pieces[False] = r.permute(1, 0, 2, 3, 4).reshape(b, heads, -1, d)
    result, offsets = [], {True: 0, False: 0}
    for seg in segments:
        result.append(pieces[seg.split].narrow(2, offsets[seg.split], seg.length))
        offsets[seg.split] += seg.length
    return torch.cat(result, dim=2)


# ---------------------------------------------------------------------------------------------
# Interception below the processors.
# ---------------------------------------------------------------------------------------------
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_params(args: tuple, kwargs: dict) -> dict:
    """The arguments of an F.scaled_dot_product_attention call by name (diffusers passes keywords)."""
    params = dict(zip(_SDPA_ARGS, args))
    params.update(kwargs)
    if params.get("attn_mask") is not None or params.get("is_causal") or params.get("dropout_p", 0.0):
        raise NotImplementedError("parallel attention supports unmasked, non-causal, dropout-free attention "
                                  "(what these DiTs use)")
    return params


class SequenceParallelAttention(torch.overrides.TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` of the model's attention modules to `usp_attention`.

    Forward pre-hooks on the attention modules say which kind of sequence the next call sees; the
    caller sets `segments[kind]` for the current forward. Cross-attention (replicated text keys)
    needs no communication and runs unchanged.
    """

    def __init__(self, kinds: dict[torch.nn.Module, str], groups: SPGroups):
        super().__init__()
        self.groups = groups
        self.segments: dict[str, list[Segment]] = {}
        self.current: Optional[str] = None
        self._hooks = [m.register_forward_pre_hook(self._make_hook(kind)) for m, kind in kinds.items()]
        self._hooks += [m.register_forward_hook(self._clear) for m in kinds]

    def _make_hook(self, kind: str):
        def hook(module, args):
            self.current = kind
        return hook

    def _clear(self, module, args, output):
        self.current = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.current in (None, "cross"):
            return func(*args, **kwargs)
        params = sdpa_params(args, kwargs)
        return usp_attention(params["query"], params["key"], params["value"], self.segments[self.current],
                             self.groups, params.get("scale"))
