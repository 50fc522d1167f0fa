"""Runs inside every rank of the one spawned world the parallel tests share (see test_parallel.py)."""
import contextlib
from dataclasses import replace
from unittest import mock

import torch

from xdit_core.parallel import attention as attention_module
from xdit_core.parallel import routing
from xdit_core.parallel.comm import Comm
from xdit_core.parallel.pipefusion import PipeFusionKV
from xdit_core.runtime.job import run_request
from xdit_core.loading.load import DTYPES, load_model
from xdit_core.parallel.mesh import Mesh
from xdit_core.models import make_adapter
from xdit_core.models.wan import WanAdapter
from xdit_core.parallel.context import RankContext
from xdit_core.parallel import sharding
from xdit_core.parallel.stages import stage_parts
from xdit_core.runtime.job import ModelRef, stage_split
from xdit_core.sampling.inpaint import Inpaint


def run_cases(rank: int, device: torch.device, cases: list) -> dict:
    """Each case: (name, model path, ParallelConfig, ring_impl, SampleRequest). Ranks outside a case's mesh wait.
    A name ending in "@<options>" runs the case with a mutation of MUTATIONS and/or in a dtype ("@bf16").

    Returns this rank's results by case; the latent only from rank 0.
    """
    adapters, results = {}, {}
    for name, path, config, ring_impl, request in cases:
        mesh = Mesh(config, list(range(config.world_size)))  # collective: every rank builds every mesh
        if not mesh.is_member:
            continue
        mutation, dtype = case_options(name)
        ctx = RankContext(mesh, device, ring_impl=ring_impl)
        hooks_of_sharding = 0
        with MUTATIONS[mutation]() if mutation else contextlib.nullcontext():
            if config.pipefusion_parallel_degree > 1 or config.shard_weights:
                # PipeFusion frees the other stages' blocks, sharding replaces the blocks' weights: a fresh model
                # (a sharded stage loads only its blocks, as RankJob does: the others' must not be sharded)
                parts = stage_parts(stage_split(ModelRef(path, dtype), config.pipefusion_parallel_degree, device),
                                    mesh.coords["pipefusion"]) if config.shard_weights and config.pipefusion_parallel_degree > 1 \
                    else None
                model, spec = load_model(path, dtype, parts=parts)
                adapter = make_adapter(model, spec)
                if config.shard_weights:
                    sharding.shard_blocks(adapter, ctx)
                    hooks_of_sharding = _hooks(adapter.model)  # FSDP's own and the gather count's, by design
            else:
                if (path, dtype) not in adapters:
                    adapters[(path, dtype)] = make_adapter(*load_model(path, dtype))
                adapter = adapters[(path, dtype)]
            out = run_request(adapter, request, ctx=ctx)
        results[name] = {
            "out": out if rank == 0 else None, "total": dict(ctx.counter.total), "per_step": ctx.counter.per_step,
            "param_bytes": sharding.local_param_bytes(adapter.model),
            "effective_patches": ctx.effective_patches, "coords": mesh.coords,
            # What the routing left behind (models are reused across cases: warm requests must leave nothing):
            # hooks on the model, active routers, torch function modes.
            "left_behind": _hooks(adapter.model) - hooks_of_sharding + len(routing.active_routers())
            + torch._C._len_torch_function_stack(),
        }
    return results


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def case_options(name: str) -> tuple:
    """(mutation or None, dtype) of a case named "family/size/config[@option[+option]]" (e.g. "@bf16+ring_skip");
    "shard" only names a case whose config shards its weights."""
    options = [o for o in name.partition("@")[2].split("+") if o]
    unknown = [o for o in options if o not in MUTATIONS and o not in DTYPES and o != "shard"]
    if unknown:
        raise ValueError(f"case {name}: unknown options {unknown}; valid: {sorted(MUTATIONS) + sorted(DTYPES)}")
    mutations, dtypes = [o for o in options if o in MUTATIONS], [o for o in options if o in DTYPES]
    if len(mutations) > 1 or len(dtypes) > 1:
        raise ValueError(f"case {name}: at most one mutation and one dtype")
    return (mutations[0] if mutations else None), (dtypes[0] if dtypes else "fp32")


# Negative controls: deliberate bugs injected into the engine inside the rank processes, for one case only
# (each is a context manager that patches one engine function and restores it). The parity comparison must
# catch every one of them.
def _ring_skip():
    """Ring: the K/V block received in a ring step is replaced by the rank's own (the hand-off still runs).
    With ring degree 2 that is the one step of every attention call."""
    original = Comm.ring_exchange

    def ring_exchange(self, x, kind):
        buf, works = original(self, x, kind)
        for w in works:
            w.wait()
        return x.clone(), []

    return mock.patch.object(Comm, "ring_exchange", ring_exchange)


def _a2a_roll():
    """Ulysses: every all-to-all sends chunk j to rank j + 1 instead of rank j (chunks rolled by one)."""
    original = Comm.all_to_all

    def all_to_all(self, x, kind):
        return original(self, x.roll(1, 0) if kind == "ulysses_all_to_all" else x, kind)

    return mock.patch.object(Comm, "all_to_all", all_to_all)


def _unmasked_padding():
    """Uneven sizes: the padded keys are not dropped, so every query also attends the padding (masked keys too)."""
    return mock.patch.object(attention_module, "_key_validity", lambda *args, **kwargs: None)


def _unmasked_text():
    """Key masks: the text's mask is ignored by the parallel attention (padding is still dropped), so every query
    attends the masked text tokens."""
    original = attention_module._key_validity

    def key_validity(segments, *args, **kwargs):
        return original([replace(s, mask=None) for s in segments], *args, **kwargs)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(attention_module, "_key_validity", key_validity))
    stack.enter_context(mock.patch.object(PipeFusionKV, "_validity", lambda self, kb: None))  # its buffers' keys
    return stack


def _carried_zeroed():
    """PipeFusion: the state a hand-off carries to the next stage (HunyuanDiT's long skips) arrives as zeros."""
    from xdit_core.models.hunyuandit import HunyuanDiTAdapter

    original = HunyuanDiTAdapter.carried
    return mock.patch.object(HunyuanDiTAdapter, "carried",
                             lambda self, tokens: [torch.zeros_like(t) for t in original(self, tokens)])


def _stale_kv():
    """PipeFusion: after a layer's first evaluation, the fresh K/V of the first half of the image tokens (the
    first of 2 patches) is never written again: those keys stay stale, even in an exact (all-warmup) run."""
    original = PipeFusionKV._cache
    first = {}  # (layer, branch) -> the stale half's K/V from the first evaluation

    def _cache(self, module):
        update = original(self, module)

        def stale(ks, vs, text):
            kb, vb, valid = update(ks, vs, text)
            n, key = self.n_img // 2, (id(module), self.unit.branch)
            if key not in first:
                first[key] = kb[:, :, :n].clone(), vb[:, :, :n].clone()
            else:
                kb[:, :, :n], vb[:, :, :n] = first[key]
            return kb, vb, valid

        return stale

    return mock.patch.object(PipeFusionKV, "_cache", _cache)


def _mask_rows():
    """PipeFusion with a noise_mask: every patch takes the first rows of the mask, latent and noise (its own
    count of them) instead of its own rows."""
    original = Inpaint.rows
    return mock.patch.object(Inpaint, "rows", lambda self, r0, r1: original(self, 0, r1 - r0))


def _timestep_shard():
    """Wan 2.2 5B's per-token timesteps: every rank takes the first tokens' modulation instead of its own shard's
    (the clean start frame's timestep 0 lands on other tokens)."""
    original = WanAdapter.shard_extras

    def shard_extras(self, tokens, shard_txt, shard_img):
        extras = original(self, tokens, shard_txt, shard_img)
        if extras["tproj"].ndim == 4:
            extras["tproj"] = tokens.extras["tproj"][:, :extras["tproj"].shape[1]]
        return extras

    return mock.patch.object(WanAdapter, "shard_extras", shard_extras)


def _shard_roll():
    """Weight sharding: every block's first weight shard is rolled by one row on each rank, so the gathered
    weight is a wrong permutation of the real one."""
    original = sharding.shard_blocks

    def shard_blocks(adapter, ctx):
        count = original(adapter, ctx)
        with torch.no_grad():
            for block, _ in adapter.blocks():
                weight = next(p for p in block.parameters() if p.dim() == 2)
                local = weight.to_local()
                local.copy_(local.roll(1, 0))
        return count

    return mock.patch.object(sharding, "shard_blocks", shard_blocks)


MUTATIONS = {"ring_skip": _ring_skip, "a2a_roll": _a2a_roll, "unmasked_padding": _unmasked_padding,
             "unmasked_text": _unmasked_text, "carried_zeroed": _carried_zeroed,
             "stale_kv": _stale_kv, "mask_rows": _mask_rows, "timestep_shard": _timestep_shard,
             "shard_roll": _shard_roll}


def run_mismatched(rank: int, device: torch.device, payload) -> None:
    """PipeFusion 2 where each stage gets a different request (an injected schedule mismatch)."""
    from xdit_core.parallel.mesh import ParallelConfig

    path, requests = payload
    mesh = Mesh(ParallelConfig(pipefusion_parallel_degree=2))
    run_request(make_adapter(*load_model(path)), requests[rank], ctx=RankContext(mesh, device))


def run_all(rank: int, device: torch.device, payload: dict) -> dict:
    """The suite's shared world (tests/conftest.py): the parity cases, then the point-to-point cases."""
    import nccl_world

    return {"parallel": run_cases(rank, device, payload["parallel"]),
            "nccl": nccl_world.run_world(rank, device, payload["nccl"])}
