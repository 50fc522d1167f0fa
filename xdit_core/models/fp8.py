"""fp8 weights kept fp8 on the device and upcast per layer when used.

A Linear weight stored as fp8 (e4m3fn, e5m2, or ComfyUI's scaled fp8 with a float32 `scale_weight`) is loaded as
an `Fp8Weight`: a tensor subclass that holds the fp8 tensor and its scale and presents itself as a tensor of the
compute dtype. Every operation on it (the Linear's F.linear, torch.equal, torch.cat ...) runs on the upcast
value, computed then with the load path's math, `w.to(dtype)` or `(w.float() * scale).to(dtype)`, and dropped
after the operation: results are bit-identical to upcasting at load, while memory holds the fp8 tensor and one
layer's upcast weight at a time.

A tensor subclass rather than another module or a hook, because everything above it stays as it is: diffusers'
module tree and state_dict names (LoRA conversion and partial loads go by name), `isinstance(m, nn.Linear)`,
and the compute dtype that `weight.dtype` and `parameters()` report (the run-time LoRA hooks cast their deltas to
it; diffusers' Wan casts the timestep embedding to its first parameter's dtype). Moving a model to another device
(`.to(device)`) moves the fp8 tensors and scales as they are.

Scaled fp8 matmuls (torch._scaled_mm) would skip the upcast on GPUs that have them; not done here.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._pytree import tree_map

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Weight(torch.Tensor):
    """A weight kept as fp8 (`fp8`) times an optional float32 `scale`, seen by every op as its `dtype` value."""

    fp8: torch.Tensor
    scale: Optional[torch.Tensor]

    # Results of ops are plain tensors: no re-wrapping into the subclass.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, fp8: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> "Fp8Weight":
        return torch.Tensor._make_wrapper_subclass(cls, fp8.shape, strides=fp8.stride(), dtype=dtype,
                                                   device=fp8.device, requires_grad=False)

    def __init__(self, fp8: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype):
        self.fp8, self.scale = fp8, scale

    def upcast(self) -> torch.Tensor:
        """The weight in its compute dtype, exactly as the upcast-at-load path computes it."""
        if self.scale is None:
            return self.fp8.to(self.dtype)
        return (self.fp8.float() * self.scale).to(self.dtype)

    def __repr__(self) -> str:  # printing the values would go through dispatch on a view of a wrapper
        scaled = "scaled " if self.scale is not None else ""
        return f"Fp8Weight({scaled}{self.fp8.dtype} as {self.dtype}, shape={list(self.shape)}, device={self.device})"

    # Flattening makes it a traceable wrapper subclass, which nn.Module.to swaps in whole (not through `.data`).
    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return (["fp8"] if self.scale is None else ["fp8", "scale"]), self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], dtype: torch.dtype, outer_size: Any,
                             outer_stride: Any) -> "Fp8Weight":
        return Fp8Weight(inner["fp8"], inner.get("scale"), dtype)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:  # nn.Parameter and state_dict() detach: stay fp8
            w = args[0]
            return cls(w.fp8, w.scale, w.dtype)
        if func is torch.ops.aten._to_copy.default and "device" in kwargs and kwargs.get("dtype", args[0].dtype) \
                == args[0].dtype:  # a move to another device: stay fp8
            w, move = args[0], {"device": kwargs["device"], "non_blocking": kwargs.get("non_blocking", False)}
            return cls(w.fp8.to(**move), None if w.scale is None else w.scale.to(**move), w.dtype)

        def upcast(t: Any) -> Any:
            return t.upcast() if isinstance(t, cls) else t

        return func(*tree_map(upcast, args), **tree_map(upcast, kwargs))


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of `module` hold on their devices (meta ones excluded); an Fp8Weight counts
    its fp8 tensor and its scale (the scale shared by the pieces of one fused file tensor counted once)."""
    held: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        for part in (t.fp8, t.scale) if isinstance(t, Fp8Weight) else (t,):
            if part is not None and not part.is_meta:
                held[id(part)] = part
    return sum(t.numel() * t.element_size() for t in held.values())


__all__ = ["FP8_DTYPES", "Fp8Weight", "held_bytes"]
