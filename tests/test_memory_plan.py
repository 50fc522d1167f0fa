"""The memory plan (runtime/memory_plan.py): weights per rank against the real meta-device parameters, fp8 kept,
the sharding traffic, the refusal before any weight is read, and the mesh search."""
import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.loading import load
from xdit_core.loading.model_files import WeightFiles
from xdit_core.models.families import resolve_model_spec
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.stages import split_stages, stage_parts
from xdit_core.runtime import limits, memory_plan
from xdit_core.runtime.memory_plan import (GIB, PCIE_BYTES_PER_S, cheapest_fitting_mesh, mesh_candidates, model_memory,
                                           plan_memory)

CONFIGS = Path(load.__file__).parent / "configs"
FLUX1 = json.loads((CONFIGS / "flux1-dev.json").read_text())
LATENT = [1, 16, 128, 128]  # 1024x1024


@pytest.fixture(scope="module")
def flux1():
    return model_memory(FLUX1)


@pytest.fixture(scope="module")
def flux1_meta():
    """FLUX.1-dev on the meta device in bf16, as the loader builds it."""
    return load._build_on_meta("flux", FLUX1, torch.bfloat16)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _is_block(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def test_weights_equal_the_meta_parameters_of_each_rank(flux1, flux1_meta):
    named = dict(flux1_meta.named_parameters())
    plan = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2), LATENT)
    assert [r.weights for r in plan.ranks] == [_bytes(named.values())] * 2
    # PipeFusion: each stage's blocks (the loader's split) and the modules every stage loads, the head on the last.
    spec = resolve_model_spec(FLUX1)
    plan = plan_memory(flux1, "bf16", ParallelConfig(pipefusion_parallel_degree=2), LATENT)
    for rank in plan.ranks:
        keep = load._selector(flux1_meta, "flux", stage_parts(split_stages(FLUX1, spec, 2).ranges, rank.stage))
        assert rank.weights == _bytes(p for n, p in named.items() if keep(n)), rank.stage
    assert sum(r.weights for r in plan.ranks) > _bytes(named.values())  # the embedders on both stages
    # Sharded over N: the blocks' 1/N (FSDP's dim-0 shards, rounded up per parameter), the rest whole.
    outside = _bytes(p for n, p in named.items() if not _is_block(n))
    block_params = [p for n, p in named.items() if _is_block(n)]
    for degree in (2, 4, 8):
        shards = sum(math.ceil(p.shape[0] / degree) * (p.numel() // p.shape[0]) * p.element_size()
                     for p in block_params)
        plan = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=degree, shard_weights=True), LATENT)
        assert [r.weights for r in plan.ranks] == [outside + shards] * degree
        assert shards < 1.05 * _bytes(block_params) / degree
        assert plan.shard_group == degree


def test_fp8_kept_is_one_byte_per_fp8_weight_plus_a_scale_each(flux1, flux1_meta):
    linear = {f"{n}.weight" for n, m in flux1_meta.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8 = [p for n, p in flux1_meta.named_parameters() if n in linear and _is_block(n)]
    rest = [p for n, p in flux1_meta.named_parameters() if not (n in linear and _is_block(n))]
    plan = plan_memory(flux1, "bf16", ParallelConfig(), LATENT, fp8_kept=True)
    assert plan.ranks[0].weights == sum(p.numel() for p in fp8) + 4 * len(fp8) + _bytes(rest)
    assert plan.ranks[0].weights < 0.51 * plan_memory(flux1, "bf16", ParallelConfig(), LATENT).ranks[0].weights
    # The upcast of one layer: the largest fp8 weight through float32 (scaled: two float32 copies at once).
    assert plan.ranks[0].upcast_layer == max(p.numel() for p in fp8) * 8


def _write_sparse(folder: Path, model: torch.nn.Module, dtype: str = "BF16", fp8: tuple = ()) -> Path:
    """A diffusers folder whose weight file has a real header and no data (a sparse file: nothing to read)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(FLUX1))
    header, offset = {}, 0
    for name, p in model.state_dict().items():
        kind = "F8_E4M3" if name in fp8 else dtype
        size = p.numel() * (1 if kind == "F8_E4M3" else 2)
        header[name] = {"dtype": kind, "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
        if name in fp8:  # ComfyUI's scaled fp8: a float32 scale per weight
            header[name[: -len("weight")] + "scale_weight"] = {"dtype": "F32", "shape": [],
                                                               "data_offsets": [offset, offset + 4]}
            offset += 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "diffusion_pytorch_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


@pytest.fixture(scope="module")
def flux1_files(tmp_path_factory, flux1_meta):
    """FLUX.1-dev-shaped folders (bf16; fp8 Linear weights in the blocks) whose tensors are never read."""
    root = tmp_path_factory.mktemp("flux1")
    linear = {f"{n}.weight" for n, m in flux1_meta.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8 = tuple(n for n in linear if _is_block(n))
    return _write_sparse(root / "bf16", flux1_meta), _write_sparse(root / "fp8", flux1_meta, fp8=fp8), fp8


def test_fp8_comes_from_the_file_header(flux1, flux1_files):
    bf16, fp8_folder, fp8 = flux1_files
    from_config = plan_memory(flux1, "bf16", ParallelConfig(), LATENT, fp8_kept=True).ranks[0].weights
    from_file = plan_memory(fp8_folder, "bf16", ParallelConfig(), LATENT, fp8_kept=True)
    assert from_file.ranks[0].weights == from_config  # the same tensors, one scale each
    assert f"{len(fp8)} F8_E4M3" in from_file.model.fp8_source
    # A bf16 file keeps nothing in fp8; without fp8_kept the fp8 file is upcast to bf16.
    full = plan_memory(flux1, "bf16", ParallelConfig(), LATENT).ranks[0].weights
    assert plan_memory(bf16, "bf16", ParallelConfig(), LATENT, fp8_kept=True).ranks[0].weights == full
    assert plan_memory(fp8_folder, "bf16", ParallelConfig(), LATENT).ranks[0].weights == full


def test_fp8_plan_equals_what_the_loader_holds(tiny_models, tmp_path):
    """On a tiny Flux whose block Linear weights are scaled fp8: the plan equals the bytes the loaded model holds
    (when the loader keeps fp8: models/fp8.py)."""
    fp8_module = pytest.importorskip("xdit_core.models.fp8")
    from safetensors.torch import load_file, save_file

    src = Path(tiny_models["flux"])
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    model, _ = load.load_model(src)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for name, t in tensors.items():
        if name in linear and _is_block(name):
            scale = t.abs().max().float() / 448
            out[name] = (t.float() / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[name] = t
    folder = tmp_path / "fp8"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    save_file(out, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded, _ = load.load_model(folder, "bf16")
    plan = plan_memory(folder, "bf16", ParallelConfig(), [1, 16, 32, 32], fp8_kept=True)
    assert plan.ranks[0].weights == fp8_module.held_bytes(loaded) - sum(
        b.numel() * b.element_size() for b in loaded.buffers())


def test_a_plan_that_cannot_fit_is_refused_before_any_weight_is_read(flux1_files, monkeypatch):
    bf16, _, _ = flux1_files

    def no_read(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(memory_plan, "_CACHE", {})  # read the config and the header again, under the patches
    monkeypatch.setattr(WeightFiles, "read", no_read)
    monkeypatch.setattr(load, "load_model", no_read)
    monkeypatch.delenv(limits.MEMORY_BUDGET_ENV, raising=False)
    monkeypatch.setattr(limits, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(limits, "smallest_gpu_memory", lambda: 20 * GIB)
    args = dict(backend="local", remote=False, dtype=torch.bfloat16, attention_backend="auto", num_blocks=57,
                with_negative=False, text_tokens=512)
    with pytest.raises(XDiTConfigError) as e:
        limits.check_request_fits(str(bf16), LATENT, ParallelConfig(ulysses_degree=2), **args)
    message = str(e.value)
    assert "\n" not in message
    plan = plan_memory(bf16, "bf16", ParallelConfig(ulysses_degree=2), LATENT, fp8_kept=True)
    near = plan.nearest_fitting(20 * GIB)
    assert near is not None and near.device_peak <= 20 * GIB
    for part in (f"needs about {plan.device_peak / GIB:.1f} GiB per GPU", "the biggest term weights held 22.2 GiB",
                 "the memory budget is 20.0 GiB (the smallest GPU's memory)",
                 f"the nearest mesh that fits: {near.mesh()}", "a latent of [1, 16, 128, 128]"):
        assert part in message, (part, message)
    # The same request on 24 GiB cards fits; the fp8 file fits 20 GiB (its header says fp8, and fp8 stays fp8).
    monkeypatch.setattr(limits, "smallest_gpu_memory", lambda: 24 * GIB)
    limits.check_request_fits(str(bf16), LATENT, ParallelConfig(ulysses_degree=2), **args)
    monkeypatch.setattr(limits, "smallest_gpu_memory", lambda: 20 * GIB)
    limits.check_request_fits(str(flux1_files[1]), LATENT, ParallelConfig(ulysses_degree=2), **args)


def test_nothing_fits_says_how_many_gpus_would(flux1):
    plan = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2), LATENT)
    with pytest.raises(XDiTConfigError,
                       match=r"no mesh of these 2 GPU\(s\) fits: .*on \d+ GPUs .* needs [\d.]+ GiB per GPU"):
        plan.fits(4 * GIB, "test")


def test_gather_bytes_per_step_flux1_dev_bf16_on_2_gpus(flux1, flux1_meta):
    """The issue's "about 12 GB per rank per step" is one forward per step: cfg 1 (FLUX.1-dev's distilled
    guidance) or CFG parallel. (N - 1)/N of the 23.6 GB of blocks = 11.8 GB; with a negative branch on the same
    ranks (no CFG parallel) each step runs two forwards: 23.6 GB."""
    blocks = _bytes(p for n, p in flux1_meta.named_parameters() if _is_block(n))
    ulysses = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2, shard_weights=True), LATENT)
    assert ulysses.gather_bytes_per_step == pytest.approx(blocks / 2, rel=1e-3)
    assert 11.5e9 < ulysses.gather_bytes_per_step < 12.1e9
    assert ulysses.gather_seconds_per_step == pytest.approx(ulysses.gather_bytes_per_step / 20e9)
    assert PCIE_BYTES_PER_S == 20e9
    cfg = plan_memory(flux1, "bf16", ParallelConfig(use_cfg_parallel=True, shard_weights=True), LATENT,
                      with_negative=True)
    assert cfg.gather_bytes_per_step == ulysses.gather_bytes_per_step
    both = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2, shard_weights=True), LATENT, with_negative=True)
    assert both.gather_bytes_per_step == 2 * ulysses.gather_bytes_per_step
    # PipeFusion x sharding: every patch's forward gathers its stage's blocks again (M = 2 patches).
    pf = plan_memory(flux1, "bf16", ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2,
                                                    shard_weights=True), LATENT)
    for rank in pf.ranks:
        stage = [flux1.blocks[i] for i in flux1.stage_ranges(2)[rank.stage]]
        assert rank.gather_bytes_per_step == 2 * sum(b.shard(2, 2, False) for b in stage)
    assert plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2), LATENT).gather_bytes_per_step == 0


def test_terms(flux1):
    p = ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2)
    plan = plan_memory(flux1, "bf16", p, LATENT, with_negative=True, text_tokens=512)
    for rank in plan.ranks:
        layers = sum(flux1.blocks[i].attention_layers for i in flux1.stage_ranges(2)[rank.stage])
        assert layers == len(flux1.stage_ranges(2)[rank.stage])  # one joint attention per Flux block
        # K and V, 2 branches, every image token (4096) and the 512 text tokens kept for the later patches, this
        # rank's 12 of 24 heads x 128, bf16
        assert rank.kv_buffers == 2 * 2 * (4096 + 512) * 1536 * 2 * layers
        # one forward at a time: 4096 / 2 image tokens + 512 / 2 text tokens
        assert rank.activations == (2048 + 256) * 3072 * 2 * memory_plan.ACTIVATION_FACTOR
        assert rank.latents == memory_plan.LATENT_COPIES * 16 * 128 * 128 * 4
        assert rank.peak == rank.run_tensor_bytes + memory_plan.RANK_OVERHEAD_BYTES
    # The engine shards each block as it is read (SHARDS_WHILE_LOADING): the load holds the shards and one block
    # whole; sharding after a whole load would peak at the unsharded weights.
    assert memory_plan.SHARDS_WHILE_LOADING
    whole = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2), LATENT).ranks[0].weights
    sharded = plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2, shard_weights=True), LATENT)
    assert sharded.ranks[0].load_tensor_bytes < 0.6 * whole and sharded.ranks[0].tensor_bytes < 0.7 * whole
    assert plan_memory(flux1, "bf16", ParallelConfig(ulysses_degree=2, shard_weights=True), LATENT,
                       shard_on_load=False).ranks[0].load_tensor_bytes == whole
    # Two models resident (Wan 2.2's experts): both held, one running.
    two = plan_memory(flux1, "bf16", ParallelConfig(), LATENT, resident=[flux1])
    one = plan_memory(flux1, "bf16", ParallelConfig(), LATENT)
    assert two.ranks[0].held == 2 * one.ranks[0].held
    assert two.peak - one.peak == one.ranks[0].weights


def test_limits_estimate_shares_the_plans_terms():
    got = limits.estimate_rank_bytes(LATENT, hidden_size=3072, dtype_bytes=2, sp_degree=2, branches=2,
                                     text_tokens=512, kv_layers=19)
    image = 4096 // 2
    assert got == (memory_plan.RANK_OVERHEAD_BYTES + memory_plan.latents_term(LATENT)
                   + memory_plan.activation_term(2, image + 512, 3072, 2)
                   + memory_plan.kv_buffer_term(2, image, 3072, 2, 19))
    assert limits.RANK_OVERHEAD_BYTES is memory_plan.RANK_OVERHEAD_BYTES and limits.GIB == GIB


def test_estimate_weight_bytes_is_the_plans(flux1_files):
    bf16, fp8_folder, _ = flux1_files
    full = plan_memory(bf16, "bf16", ParallelConfig(), LATENT).ranks[0].weights
    assert limits.estimate_weight_bytes(str(bf16), "bf16", ParallelConfig(ulysses_degree=2)) == full
    sharded = limits.estimate_weight_bytes(str(bf16), "bf16", ParallelConfig(ulysses_degree=2, shard_weights=True))
    assert 0.5 * full < sharded < 0.52 * full
    assert limits.estimate_weight_bytes(str(fp8_folder), "bf16", ParallelConfig()) < 0.51 * full


def test_cheapest_fitting_mesh_weighs_gathers_against_pipefusion(flux1):
    def plan_fn(p):
        return plan_memory(flux1, "bf16", p, LATENT, shard_on_load=True)

    preferred = ParallelConfig(ulysses_degree=2)
    candidates = mesh_candidates(preferred, heads=24, num_blocks=57, video=False)
    assert candidates[:3] == [preferred, replace(preferred, shard_weights=True),
                              ParallelConfig(pipefusion_parallel_degree=2)]
    # 24 GiB: the preferred mesh fits as it is.
    assert cheapest_fitting_mesh(candidates, plan_fn, 24 * GIB)[0] == preferred
    # 20 GiB: sharded Ulysses 2 and PipeFusion 2 fit; PipeFusion splits the weights without traffic.
    config, plan = cheapest_fitting_mesh(candidates, plan_fn, 20 * GIB)
    assert config == ParallelConfig(pipefusion_parallel_degree=2) and plan.gather_bytes_per_step == 0
    # A step-time estimate that makes PipeFusion 1 s slower per step: sharded Ulysses' 0.59 s of gathers win.
    config, plan = cheapest_fitting_mesh(candidates, plan_fn, 20 * GIB,
                                         step_seconds=lambda p: 1.0 if p.pipefusion_parallel_degree > 1 else 0.0)
    assert config == replace(preferred, shard_weights=True) and 0.5 < plan.gather_seconds_per_step < 0.7
    with pytest.raises(XDiTConfigError, match=r"needs about .* GiB per GPU.*budget is 4\.0 GiB"):
        cheapest_fitting_mesh(candidates, plan_fn, 4 * GIB)
    # Video models never get PipeFusion candidates.
    assert all(c.pipefusion_parallel_degree == 1 for c in mesh_candidates(preferred, heads=40, num_blocks=40,
                                                                           video=True))


def test_ranks_sharing_a_gpu_add_up_and_fewer_ranks_are_suggested(flux1):
    plan = plan_memory(flux1, "bf16", ParallelConfig(pipefusion_parallel_degree=2), LATENT, ranks_per_device=2)
    assert plan.device_peak == 2 * plan.peak
    near = plan.nearest_fitting(24 * GIB)
    assert near is not None and near.ranks_per_device == 1 and near.parallel.world_size == 1
    assert math.isclose(near.device_peak, plan_memory(flux1, "bf16", ParallelConfig(), LATENT).device_peak)


def test_auto_moves_to_a_mesh_that_fits_or_refuses_with_the_numbers():
    """api.fit_mesh (layout auto on local GPUs): FLUX.1-dev bf16 on 2 GPUs keeps Ulysses 2 where it fits, moves
    to the same mesh sharded (exact; never to PipeFusion, which is approximate) on 16 GiB, and refuses in one line
    when nothing fits."""
    from xdit_core import api
    from xdit_core.loading.original_layout import CONFIG_DIR
    from xdit_core.models.families import resolve_model_spec

    config = json.loads((CONFIG_DIR / "flux1-dev.json").read_text())
    spec = resolve_model_spec(config)
    args = dict(spec=spec, with_negative=False, text_tokens=512, keep_fp8=False)
    u2 = ParallelConfig(ulysses_degree=2)
    assert api.fit_mesh(config, "bf16", u2, [1, 16, 128, 128], budget=80 * 2**30, **args) == u2
    assert api.fit_mesh(config, "bf16", u2, [1, 16, 128, 128], budget=16 * 2**30, **args) == \
        replace(u2, shard_weights=True)
    with pytest.raises(XDiTConfigError, match=r"needs about .* GiB per GPU.*budget is 4\.0 GiB"):
        api.fit_mesh(config, "bf16", u2, [1, 16, 128, 128], budget=4 * 2**30, **args)


def test_pipefusion_stages_balance_compute_within_the_gpu():
    """FLUX.1-dev bf16 on 2 stages: by compute 28 | 29 blocks (stage 0 holds the 19 heavy double blocks); on GPUs
    where that stage's weights would pass STAGE_WEIGHT_SHARE of the memory, blocks move to the second stage until
    each fits (the plan's ranks hold that split, as the workers load it); where none fits, the compute split."""
    mm = memory_plan.model_memory(FLUX1, "flux")
    fixed = sum(p.held(2, False) for p in (mm.other, mm.embed, mm.head))

    def stage_bytes(ranges):
        return [sum(mm.blocks[i].held(2, False) for i in r) + fixed for r in ranges]

    free = mm.stage_ranges(2, 2, False)
    assert [len(r) for r in free] == [28, 29] and mm.stage_ranges(2, 2, False, 24 * GIB) == free
    capped = mm.stage_ranges(2, 2, False, 16 * GIB)
    assert len(capped[0]) < 28 and max(stage_bytes(capped)) <= memory_plan.STAGE_WEIGHT_SHARE * 16 * GIB
    assert max(stage_bytes(free)) > memory_plan.STAGE_WEIGHT_SHARE * 16 * GIB  # the cap did bind
    plan = plan_memory(mm, "bf16", ParallelConfig(pipefusion_parallel_degree=2), LATENT, device_bytes=16 * GIB)
    assert [r.blocks for r in plan.ranks] == [len(r) for r in capped]
    assert mm.stage_ranges(2, 2, False, 8 * GIB) == free  # nothing fits 8 GiB: the plan's check refuses it
