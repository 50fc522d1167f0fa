"""Attention routing: every attention call of every family goes through the parallel path whatever diffusers'
attention backend is, an escaped or unrouted layer fails the forward by name, nothing stays behind after a
forward, and the LSE kernel is chosen by device and dtype.

Models: tiny random ones with weight std 0.1 (attention matters: replacing every attention by a uniform
average moves the prediction by 5-13% of its maximum), 4 heads, 8x8 latent (16 image tokens + 32 text)."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.attention_processor import AttnProcessor

from xdit_core.cli.tiny import build_tiny
from xdit_core.errors import XDiTConfigError, XDiTWorkerError
from xdit_core.models import make_adapter
from xdit_core.models.conditioning import random_cond
from xdit_core.models.families import resolve_model_spec
from xdit_core.parallel import attention, routing
from xdit_core.parallel.attention import attention_with_lse, select_lse_kernel
from xdit_core.parallel.routing import AttentionRouter
from xdit_core.parallel.sequence_parallel import SequenceParallelRunner

FAMILIES = ("flux", "sd3", "pixart")
WEIGHT_STD = 0.1


def _setup(family):
    model = build_tiny(family, seed=1, weight_std=WEIGHT_STD)
    spec = resolve_model_spec(dict(model.config, _class_name=type(model).__name__))
    adapter = make_adapter(model, spec)
    cond, _ = random_cond(spec, 1, 0, False)
    x = torch.randn(1, spec.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return adapter, (x, torch.tensor([0.5]), cond, None)


def _degree_one_runner(adapter):
    return SequenceParallelRunner.single_rank(adapter)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("backend", ["native", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_attention_call_is_routed_whatever_the_backend(family, backend):
    adapter, inputs = _setup(family)
    ref = adapter.predict(*inputs)  # plain diffusers modules, native SDPA
    seen = []

    def record(module, kind, q, k, v, scale):
        seen.append(module)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    with attention_backend(backend):
        tokens = adapter.embed(*inputs)
        with AttentionRouter(adapter.model, adapter.attention_kinds(), record):
            routed = adapter.head(adapter.run_blocks(tokens))
        parallel_path = _degree_one_runner(adapter).predict(*inputs)
    assert seen == list(adapter.attention_kinds())  # every layer, once, in order
    for out in (routed, parallel_path):
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


@torch.no_grad()
def test_an_escaped_attention_fails_naming_its_layer():
    """PixArt attends through F.scaled_dot_product_attention: a processor that computes attention itself
    (diffusers' classic bmm AttnProcessor) escapes the parallel path."""
    adapter, inputs = _setup("pixart")
    adapter.model.transformer_blocks[1].attn1.processor = AttnProcessor()
    with pytest.raises(XDiTWorkerError, match=r"transformer_blocks\.1\.attn1 \(AttnProcessor\) ran without"):
        _degree_one_runner(adapter).predict(*inputs)
    assert _hooks(adapter.model) == 0 and routing.active_routers() == []


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_a_swapped_kernel_fails_naming_its_layer():
    """Flux attends through diffusers' dispatcher: a processor whose call does not arrive there (here: one that
    calls the original dispatcher, with the flex backend on, so no F.scaled_dot_product_attention either) escapes."""
    adapter, inputs = _setup("flux")
    module = adapter.model.single_transformer_blocks[2].attn
    original = type(module.processor).__call__

    def manual(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import diffusers.models.transformers.transformer_flux as flux

        routed = flux.dispatch_attention_fn
        flux.dispatch_attention_fn = routed.xdit_original  # the unrouted kernel, as a hand-written one would be
        try:
            return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            flux.dispatch_attention_fn = routed

    class ManualProcessor(type(module.processor)):
        __call__ = manual

    module.processor = ManualProcessor()
    with attention_backend("flex"), pytest.raises(
            XDiTWorkerError, match=r"single_transformer_blocks\.2\.attn \(ManualProcessor\) ran without"):
        _degree_one_runner(adapter).predict(*inputs)


@torch.no_grad()
def test_an_attention_module_without_a_kind_is_refused():
    adapter, _ = _setup("flux")
    kinds = adapter.attention_kinds()
    del kinds[adapter.model.transformer_blocks[1].attn]
    with pytest.raises(XDiTWorkerError, match=r"transformer_blocks\.1\.attn"):
        AttentionRouter(adapter.model, kinds, lambda *a: None)


@torch.no_grad()
def test_a_layer_that_never_ran_fails_the_forward():
    adapter, inputs = _setup("pixart")
    tokens = adapter.embed(*inputs)
    sdpa = lambda m, kind, q, k, v, scale: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    with pytest.raises(XDiTWorkerError, match=r"routed in this forward, expected .*transformer_blocks\.3"):
        with AttentionRouter(adapter.model, adapter.attention_kinds(), sdpa):
            for block, run in adapter.blocks()[:3]:
                tokens = run(block, tokens)


@torch.no_grad()
def test_a_stage_routes_only_its_blocks_and_catches_an_escape_among_them():
    """A PipeFusion stage routes the attention of its own blocks (`run`); an escape there fails by name."""
    adapter, inputs = _setup("pixart")
    blocks = adapter.blocks()
    stage = [m for m in adapter.attention_kinds() if any(m is b.attn1 or m is b.attn2 for b, _ in blocks[2:])]
    sdpa = lambda m, kind, q, k, v, scale: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    tokens = adapter.embed(*inputs)
    with AttentionRouter(adapter.model, adapter.attention_kinds(), sdpa, run=stage):
        for block, run in blocks[2:]:
            tokens = run(block, tokens)
    blocks[3][0].attn1.processor = AttnProcessor()
    with pytest.raises(XDiTWorkerError, match=r"transformer_blocks\.3\.attn1 \(AttnProcessor\) ran without"):
        with AttentionRouter(adapter.model, adapter.attention_kinds(), sdpa, run=stage):
            for block, run in blocks[2:]:
                tokens = run(block, tokens)


@torch.no_grad()
def test_a_dispatcher_call_outside_the_declared_modules_fails():
    import diffusers.models.transformers.transformer_flux as flux

    adapter, _ = _setup("flux")
    AttentionRouter(adapter.model, adapter.attention_kinds(), lambda *a: None)  # routes flux's dispatcher
    q = torch.randn(1, 6, 2, 8)
    assert flux.dispatch_attention_fn(q, q, q).shape == q.shape  # no router active: the original
    with pytest.raises(XDiTWorkerError, match="outside every attention module"):
        with AttentionRouter(adapter.model, adapter.attention_kinds(), lambda *a: None):
            flux.dispatch_attention_fn(q, q, q)


@torch.no_grad()
def test_warm_requests_leave_no_hooks_modes_or_buffers():
    adapter, inputs = _setup("sd3")
    model = adapter.model
    buffers = sorted(name for name, _ in model.named_buffers())
    outs = [_degree_one_runner(adapter).predict(*inputs) for _ in range(3)]  # a runner per request, as the engine
    assert torch.equal(outs[0], outs[2])

    def broken(m, kind, q, k, v, scale):
        raise RuntimeError("rank failed inside attention")

    with pytest.raises(RuntimeError, match="rank failed"):
        with AttentionRouter(model, adapter.attention_kinds(), broken):
            adapter.run_blocks(adapter.embed(*inputs))

    def interrupted(m, kind, q, k, v, scale):  # a BaseException skips torch's always_call hooks
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with AttentionRouter(model, adapter.attention_kinds(), interrupted):
            adapter.run_blocks(adapter.embed(*inputs))
    assert _hooks(model) == 0
    assert routing.active_routers() == []
    assert torch._C._len_torch_function_stack() == 0
    assert sorted(name for name, _ in model.named_buffers()) == buffers


def test_lse_kernel_by_device_and_dtype(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: True)
    assert select_lse_kernel(cuda, "auto", torch.bfloat16) is attention._lse_flash_attn
    assert select_lse_kernel(cuda, "auto", torch.float16) is attention._lse_flash_attn
    assert select_lse_kernel(cuda, "auto", torch.float32) is attention._lse_cuda_sdpa  # flash has no fp32
    assert select_lse_kernel(cuda, "sdpa", torch.bfloat16) is attention._lse_cuda_sdpa
    assert select_lse_kernel(cpu, "auto", torch.bfloat16) is attention._lse_cpu
    with pytest.raises(XDiTConfigError, match="fp16/bf16"):
        select_lse_kernel(cuda, "flash", torch.float32)
    with pytest.raises(XDiTConfigError, match="CUDA"):
        select_lse_kernel(cpu, "flash", torch.bfloat16)
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: False)
    assert select_lse_kernel(cuda, "auto", torch.bfloat16) is attention._lse_cuda_sdpa
    with pytest.raises(XDiTConfigError, match="flash-attn"):
        select_lse_kernel(cuda, "flash", torch.bfloat16)


def test_lse_shapes_are_checked():
    q = k = v = torch.randn(1, 2, 6, 8)
    out, lse = attention_with_lse(attention._lse_cpu, q, k, v, 8 ** -0.5)
    assert lse.shape == (1, 2, 6)
    reference = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, reference, atol=1e-6)

    def padded(q, k, v, scale):  # as the CUDA efficient kernel returns it, unsliced
        o, l_ = attention._lse_cpu(q, k, v, scale)
        return o, torch.cat([l_, l_.new_zeros(1, 2, 26)], dim=2)

    with pytest.raises(XDiTWorkerError, match="expected LSE"):
        attention_with_lse(padded, q, k, v, 8 ** -0.5)
