"""Explicit attention routing: each attention module of the model sends its attention call to the parallel
attention chosen for it, or the forward fails naming the layer.

diffusers' processors reach the attention kernel in one of two ways: by calling
`F.scaled_dot_product_attention` directly (SD3, PixArt, HunyuanDiT), or through diffusers'
`dispatch_attention_fn`, which picks a backend (native, flex, flash, sage, ...) from
`DIFFUSERS_ATTN_BACKEND` or the processor (Flux and the newer families). The router catches the call
at that point, per module, and only while a routed module runs (a forward pre-hook marks it current). The
names a processor's `__call__` uses say where it attends, and the name it calls is replaced, once per
process, in the globals it looks it up in, by a pass-through that hands the call to the current route:
- `dispatch_attention_fn`: no diffusers backend runs, whatever the setting;
- `F.scaled_dot_product_attention`: `F` becomes a copy of torch.nn.functional whose SDPA is routed (every
  other function the processor's module calls through `F` is the same object, at the same cost);
- anything else (a wrapper, another spelling): a TorchFunctionMode is on during that module's forward
  only (not the whole block), catching F.scaled_dot_product_attention however it is called.
With no router active the originals run unchanged; a call through a replaced name while a router is
active but outside every routed module is an error.
A processor's attention mask reaches the route as its last argument (only when there is one): the parallel
attention applies the key-padding mask the adapter declared for the forward, and refuses a mask it was not told
of.
Every routed module must make exactly one attention call (a "cross" module at least one: Wan 2.1 I2V attends
to its CLIP states and its text separately), and every module of the blocks that ran must have been called,
or XDiTWorkerError says which layer escaped and why. Hooks exist only inside `with`, and the routing state is
per thread (the pool's actors are threaded).
"""
from __future__ import annotations

import threading
import types
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from xdit_core.errors import XDiTWorkerError

# attend(module, kind, q, k, v, scale[, mask]) -> out; q, k, v and out: [B, H, S, D]; mask: the processor's
# attention mask, passed only when it gave one.
Attend = Callable[..., torch.Tensor]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ROUTED_F: Optional[types.ModuleType] = None  # torch.nn.functional with a routed SDPA, made once
_KERNEL_NAMES = {"dispatch": "diffusers' dispatch_attention_fn", "sdpa": "F.scaled_dot_product_attention",
                 "mode": "F.scaled_dot_product_attention"}
_LOCAL = threading.local()  # .routers: this thread's active routers, innermost last


def active_routers() -> list["AttentionRouter"]:
    """This thread's active routers (empty outside any `with router:`)."""
    if not hasattr(_LOCAL, "routers"):
        _LOCAL.routers = []
    return _LOCAL.routers


def is_attention_module(module: torch.nn.Module) -> bool:
    """A diffusers attention module (`Attention` or an `AttentionModuleMixin` class): it runs a processor."""
    return callable(getattr(module, "processor", None)) and hasattr(module, "set_processor")


def _check_plain(layer: str, dropout_p, is_causal, enable_gqa) -> None:
    if is_causal or dropout_p or enable_gqa:
        raise XDiTWorkerError(f"attention layer {layer} asks for causal attention, dropout or GQA; the parallel "
                              "attention supports non-causal, dropout-free attention (with key-padding masks)")


def _current(kernel: str) -> "AttentionRouter":
    router = active_routers()[-1]
    if router.current is None:
        raise XDiTWorkerError(f"an attention call through {kernel} outside every attention module the adapter "
                              "declared: it would escape the parallel attention")
    return router


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as the processors whose `F` is routed see it."""
    if not active_routers():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    router = _current("F.scaled_dot_product_attention")
    _check_plain(router.layer_name(), dropout_p, is_causal, enable_gqa)
    return router.route(query, key, value, scale, attn_mask)


def _routed_functional() -> types.ModuleType:
    """torch.nn.functional with a routed SDPA: one per process, whatever names it is bound to."""
    global _ROUTED_F
    if _ROUTED_F is None:
        routed = types.ModuleType("torch.nn.functional (xdit: routed attention)", F.__doc__)
        routed.__dict__.update({k: v for k, v in vars(F).items() if not k.startswith("__")})
        routed.__getattr__ = lambda name: getattr(F, name)  # anything torch adds later
        routed.scaled_dot_product_attention = _routed_sdpa
        _ROUTED_F = routed
    return _ROUTED_F


def _routed_dispatch(original: Callable) -> Callable:
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if not active_routers():
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                            parallel_config=parallel_config)
        router = _current("diffusers' dispatch_attention_fn")
        _check_plain(router.layer_name(), dropout_p, is_causal, enable_gqa)
        # The dispatcher's layout is [B, S, H, D]; the parallel attention's is SDPA's [B, H, S, D].
        out = router.route(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, attn_mask)
        return out.transpose(1, 2)

    dispatch_attention_fn.xdit_original = original
    return dispatch_attention_fn


def _kernel_entries(processor) -> tuple[str, ...]:
    """Where `processor` attends ("dispatch", "sdpa": routed by name; "mode": caught by the TorchFunctionMode),
    from the names its `__call__` uses; the names it calls are routed in its globals, once per process."""
    call = type(processor).__call__
    code = getattr(call, "__code__", None)
    names = set(code.co_names) if code is not None else set()
    scope = getattr(call, "__globals__", {})
    entries = []
    if "dispatch_attention_fn" in names and scope.get("dispatch_attention_fn") is not None:
        if not hasattr(scope["dispatch_attention_fn"], "xdit_original"):
            scope["dispatch_attention_fn"] = _routed_dispatch(scope["dispatch_attention_fn"])
        entries.append("dispatch")
    if {"F", "scaled_dot_product_attention"} <= names and scope.get("F") in (F, _ROUTED_F):
        scope["F"] = _routed_functional()
        entries.append("sdpa")
    elif "scaled_dot_product_attention" in names or not entries:
        entries.append("mode")
    return tuple(entries)


class _SDPACatcher(torch.overrides.TorchFunctionMode):
    """On only while an SDPA processor runs: its F.scaled_dot_product_attention call goes to the route."""

    def __init__(self, router: "AttentionRouter"):
        super().__init__()
        self.router = router

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        p = dict(zip(_SDPA_ARGS, args), **kwargs)
        _check_plain(self.router.layer_name(), p.get("dropout_p", 0.0), p.get("is_causal"), p.get("enable_gqa"))
        # The mode is off inside its own handler, so the parallel attention's kernels run unintercepted.
        return self.router.route(p["query"], p["key"], p["value"], p.get("scale"), p.get("attn_mask"))


def plain_attention(module: torch.nn.Module, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The route of a "local" module (one that runs in the embedding, whole on every rank): PyTorch's SDPA with the
    processor's own mask, so its kernel does not follow diffusers' attention backend either."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def local_router(model: torch.nn.Module, kinds: dict[torch.nn.Module, str]) -> Optional["AttentionRouter"]:
    """A router for the "local" modules alone (entered around the embedding), or None when the model has none."""
    local = [m for m, kind in kinds.items() if kind == "local"]
    return AttentionRouter(model, kinds, plain_attention, run=local) if local else None


class AttentionRouter:
    """Routes the attention of `kinds`' modules (module -> "joint" | "image" | "cross") to `attend`.

    `model`'s every attention module must have a kind (else the family's adapter is incomplete); `run`
    lists the modules the forward runs (a PipeFusion stage runs only its own blocks; default: all but the
    "local" ones, which run outside the blocks).
    Use one `with router:` per forward: it counts the calls and checks them when the forward ends.
    """

    def __init__(self, model: torch.nn.Module, kinds: dict[torch.nn.Module, str], attend: Attend,
                 run: Optional[Iterable[torch.nn.Module]] = None):
        self.names = {m: name for name, m in model.named_modules()}
        missing = [name for name, m in model.named_modules() if is_attention_module(m) and m not in kinds]
        if missing:
            raise XDiTWorkerError(f"attention layers {missing[:4]} ({len(missing)} in all) have no route: the "
                                  "family's adapter must declare every attention module in attention_kinds()")
        self.kinds, self.attend = kinds, attend
        self.run = [m for m, kind in kinds.items() if kind != "local"] if run is None else list(run)
        self.entries = {m: _kernel_entries(m.processor) for m in self.run}
        self.current: Optional[torch.nn.Module] = None
        self._catcher = _SDPACatcher(self)
        self._catching = False
        self._calls = 0
        self._called: list[torch.nn.Module] = []
        self._handles: list = []

    def layer_name(self) -> str:
        return self.names.get(self.current, "?")

    def route(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The current module's attention call: one per module forward."""
        self._calls += 1
        if self._calls > 1 and self.kinds[self.current] != "cross":
            raise XDiTWorkerError(f"attention layer {self.layer_name()} made a second attention call in one "
                                  "forward; the router supports one per module (several for cross-attention)")
        kind = self.kinds[self.current]
        if mask is None:
            return self.attend(self.current, kind, q, k, v, scale)
        return self.attend(self.current, kind, q, k, v, scale, mask)

    def _pre(self, module: torch.nn.Module, args) -> None:
        self.current, self._calls = module, 0
        if "mode" in self.entries[module]:
            self._catcher.__enter__()
            self._catching = True

    def _post(self, module: torch.nn.Module, args, output) -> None:
        # always_call: runs when the forward raised an Exception too (torch then only warns about ours).
        self._stop_catching()
        if self._calls == 0:
            via = " or ".join(_KERNEL_NAMES[e] for e in self.entries[module])
            raise XDiTWorkerError(
                f"attention layer {self.names.get(module, '?')} ({type(module.processor).__name__}) ran without "
                f"the parallel attention: its processor made no call to {via}, where this family's processors "
                "attend; it must not be swapped for another processor or kernel")
        self._called.append(module)

    def _stop_catching(self) -> None:
        if self._catching:
            self._catcher.__exit__(None, None, None)
            self._catching = False
        self.current = None

    def __enter__(self) -> "AttentionRouter":
        self._called = []
        for m in self.run:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        active_routers().append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A BaseException (KeyboardInterrupt, ...) skips even always_call hooks: undo what `_pre` did here.
        self._stop_catching()
        for h in self._handles:
            h.remove()
        self._handles = []
        active_routers().remove(self)
        if exc_type is None and (len(self._called) != len(self.run) or set(self._called) != set(self.run)):
            ran = set(self._called)
            skipped = [self.names.get(m, "?") for m in self.run if m not in ran]
            raise XDiTWorkerError(
                f"{len(self._called)} attention calls routed in this forward, expected {len(self.run)} (one per "
                f"attention layer); not run through their module: {skipped[:4] or 'none (some ran twice)'}")
