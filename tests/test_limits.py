"""The machine limits (runtime/limits.py): the rank and thread caps, the memory estimate and its budget."""
import time

import pytest
import torch

from xdit_core.cli.generate import GenerateOptions, prepare
from xdit_core.errors import XDiTConfigError
from xdit_core.runtime import limits
from xdit_core.runtime.limits import (GIB, MEMORY_BUDGET_ENV, check_attention_backend, check_memory, check_rank_count,
                                      check_threads, estimate_rank_bytes, max_ranks, memory_budget, transformer_width)

FLUX = dict(hidden_size=3072, dtype_bytes=2)  # Flux.1: 24 heads x 128, in bf16


@pytest.mark.parametrize("cores,gpus,cap", [(1, 0, 8), (2, 0, 8), (3, 0, 12), (16, 0, 64), (16, 4, 4), (2, 8, 8)])
def test_rank_cap_formula(cores, gpus, cap):
    assert max_ranks(cores, gpus) == cap


def test_the_demo_and_test_worlds_fit_a_small_machine():
    for world in (1, 2, 4, 8):
        check_rank_count(world, cpu_count=1, gpu_count=0)


def test_too_many_ranks_are_refused_with_the_numbers():
    with pytest.raises(XDiTConfigError, match=r"needs 9 ranks but this machine runs at most 8: max\(8, 4 x 2 CPU"):
        check_rank_count(9, cpu_count=2, gpu_count=0)
    with pytest.raises(XDiTConfigError, match=r"needs 2 ranks .* at most 1: one rank per visible GPU \(1\)"):
        check_rank_count(2, cpu_count=64, gpu_count=1)
    check_rank_count(9, cpu_count=2, gpu_count=0, oversubscribe=True)
    check_rank_count(2, cpu_count=64, gpu_count=1, oversubscribe=True)


def test_thread_cap():
    check_threads(4, cpu_count=4)
    with pytest.raises(XDiTConfigError, match=r"threads must be in 1\.\.4, got 5 \(more threads than cores"):
        check_threads(5, cpu_count=4)
    with pytest.raises(XDiTConfigError, match=r"threads must be in 1\.\.4, got 0$"):
        check_threads(0, cpu_count=4)
    check_threads(limits.MAX_THREADS, cpu_count=4, oversubscribe=True)
    with pytest.raises(XDiTConfigError, match=r"threads must be in 1\.\.1024, got 1025$"):
        check_threads(limits.MAX_THREADS + 1, cpu_count=4, oversubscribe=True)


def latent(batch=1, size=1024, channels=16):
    return [batch, channels, size // 8, size // 8]


def test_estimate_grows_with_every_dimension_of_the_request():
    base = dict(FLUX, sp_degree=2, branches=1, text_tokens=256, kv_layers=0)
    ref = estimate_rank_bytes(latent(), **base)
    bigger = [estimate_rank_bytes(latent(batch=2), **base), estimate_rank_bytes(latent(size=1040), **base),
              estimate_rank_bytes(latent(), **{**base, "hidden_size": 4096}),
              estimate_rank_bytes(latent(), **{**base, "dtype_bytes": 4}),
              estimate_rank_bytes(latent(), **{**base, "branches": 2}),
              estimate_rank_bytes(latent(), **{**base, "text_tokens": 512}),
              estimate_rank_bytes(latent(), **{**base, "kv_layers": 19})]
    assert all(b > ref for b in bigger), (ref, bigger)
    assert estimate_rank_bytes(latent(), **{**base, "sp_degree": 4}) < ref  # more SP ranks: fewer tokens each
    sizes = [estimate_rank_bytes(latent(size=s), **FLUX) for s in (256, 512, 1024, 2048, 4096, 8192, 16384)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_estimate_counts_latents_activations_and_the_process():
    # 1024 px: 128 x 128 latent -> 64 x 64 = 4096 tokens of 2 x 2 patches.
    got = estimate_rank_bytes(latent(), hidden_size=100, dtype_bytes=2)
    assert got == (limits.RANK_OVERHEAD_BYTES + limits.LATENT_COPIES * 16 * 128 * 128 * 4
                   + 4096 * 100 * 2 * limits.ACTIVATION_FACTOR)


def test_32768_squared_is_refused_and_1024_squared_allowed():
    budget = (128 * GIB, "test")
    huge = estimate_rank_bytes(latent(size=32768), **FLUX)
    with pytest.raises(XDiTConfigError, match=r"a latent of \[1, 16, 4096, 4096\] needs about \d+\.\d GiB .* "
                                              r"the memory budget is 128\.0 GiB \(test\)"):
        check_memory(latent(size=32768), huge, 1, budget)
    check_memory(latent(), estimate_rank_bytes(latent(), **FLUX), 1, budget)
    check_memory(latent(), estimate_rank_bytes(latent(), **FLUX), 1, (4 * GIB, "a small machine"))


def test_ranks_sharing_one_budget_add_up():
    per_rank = 3 * GIB
    check_memory(latent(), per_rank, 2, (8 * GIB, "test"))
    with pytest.raises(XDiTConfigError, match=r"needs about 9\.0 GiB \(3 process\(es\) x 3\.00 GiB"):
        check_memory(latent(), per_rank, 3, (8 * GIB, "test"))
    check_memory(latent(), 10 ** 18, 1, None)  # no budget known: no check


def test_default_budget_is_physical_memory(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    budget, source = memory_budget(on_gpu=False)
    assert source == "physical memory"
    with open("/proc/meminfo") as f:  # an independent reading of the same figure (the kernel's, in kB)
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert abs(budget - total) < 0.02 * total
    assert memory_budget(on_gpu=False, remote=True) is None  # a Ray cluster's machines are not this one


def test_gpu_ranks_are_budgeted_by_the_smallest_gpu(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    sizes = [80 * GIB, 40 * GIB, 141 * GIB]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(sizes))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": sizes[i]}))
    assert memory_budget(on_gpu=True) == (40 * GIB, "the smallest GPU's memory")


def test_env_overrides_the_budget(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "2.5")
    assert memory_budget(on_gpu=False) == (int(2.5 * GIB), f"${MEMORY_BUDGET_ENV}")
    assert memory_budget(on_gpu=False, remote=True) == (int(2.5 * GIB), f"${MEMORY_BUDGET_ENV}")
    for bad in ("0", "-1", "nan", "inf", "lots", ""):
        monkeypatch.setenv(MEMORY_BUDGET_ENV, bad)
        with pytest.raises(XDiTConfigError, match=f"must be a positive number of GiB, got {bad!r}"):
            memory_budget(on_gpu=False)


def test_resident_budget_env_and_default(monkeypatch):
    monkeypatch.delenv(limits.RESIDENT_BUDGET_ENV, raising=False)
    monkeypatch.setattr(limits, "physical_memory", lambda: 64 * GIB)
    assert limits.resident_budget(4, on_gpu=False) == 8 * GIB  # half the RAM, shared by 4 ranks
    monkeypatch.setenv(limits.RESIDENT_BUDGET_ENV, "0")  # one model at a time
    assert limits.resident_budget(4, on_gpu=False) == 0
    for bad in ("-1", "nan", "lots"):
        monkeypatch.setenv(limits.RESIDENT_BUDGET_ENV, bad)
        with pytest.raises(XDiTConfigError, match=f"XDIT_RESIDENT_GB must be a number of GiB >= 0, got {bad!r}"):
            limits.resident_budget(4, on_gpu=False)


def test_flash_is_checked_on_the_host(monkeypatch):
    check_attention_backend("auto", torch.float32, on_gpu=False)
    check_attention_backend("sdpa", torch.float32, on_gpu=False)
    with pytest.raises(XDiTConfigError, match="'flash' needs the ranks on CUDA GPUs"):
        check_attention_backend("flash", torch.bfloat16, on_gpu=False)
    monkeypatch.setattr(limits, "_flash_attn_available", lambda: False)
    with pytest.raises(XDiTConfigError, match="needs flash-attn: pip install flash-attn"):
        check_attention_backend("flash", torch.bfloat16, on_gpu=True)
    monkeypatch.setattr(limits, "_flash_attn_available", lambda: True)
    with pytest.raises(XDiTConfigError, match="computes in fp16/bf16, not torch.float32"):
        check_attention_backend("flash", torch.float32, on_gpu=True)
    check_attention_backend("flash", torch.bfloat16, on_gpu=True)


def test_transformer_width_reads_the_config(tiny_models):
    assert transformer_width(str(tiny_models["flux"])) == 4 * 16  # the tiny Flux: 4 heads of 16


def test_prepare_refuses_32768_quickly_and_allows_1024(tiny_models, monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    opts = dict(model=str(tiny_models["flux"]), steps=1, seed=0)
    t0 = time.perf_counter()
    with pytest.raises(XDiTConfigError, match="height 32768 is out of range"):
        prepare(GenerateOptions(**opts, height=32768, width=32768))
    assert time.perf_counter() - t0 < 5
    request, _, _ = prepare(GenerateOptions(**opts, height=1024, width=1024))
    assert request.noise.shape == (1, 16, 128, 128)
    # The budget, not the size cap, refuses a large batch at a size the cap allows.
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1")
    with pytest.raises(XDiTConfigError, match=r"a latent of \[64, 16, 512, 512\] needs about .* budget is 1\.0 GiB"):
        prepare(GenerateOptions(**opts, height=4096, width=4096, batch=64))
