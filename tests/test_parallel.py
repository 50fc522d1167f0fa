"""Ulysses, Ring, USP and CFG parallel equal serial; the byte counters equal the analytic formulas.

All cases run in one spawned world of 8 gloo ranks (spawning costs seconds per process here);
smaller meshes use the first ranks. The models are ones where attention matters (see WEIGHT_STD), and every
comparison has a negative control: a case run with a deliberate bug injected into the engine inside the
ranks (parallel_world.MUTATIONS) that the same comparison must catch. PipeFusion with stale K/V is compared
with an exact single-process reference of its schedule (pipefusion_reference.py).
"""
from dataclasses import replace

import pytest
import torch

from xdit_core.parallel.comm import COMM_KINDS
from xdit_core.models.conditioning import random_cond
from xdit_core.runtime.job import run_request
from xdit_core.runtime.launch import spawn_world
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.pipefusion import pipefusion_rounds
from xdit_core.parallel.stages import split_stages
from xdit_core.models import make_adapter
from xdit_core.sampling.request import build_request, empty_latent
from xdit_core.cli.tiny import build_tiny

import parallel_world
from pipefusion_reference import pipefusion_reference

PATHS = {}  # family -> tiny model folder of the shared world
CASES = []  # (name, model path, ParallelConfig, ring_impl, SampleRequest) of the shared world
TOL = 1e-5  # max|parallel - serial| / max|serial|, float32
STEPS, CFG = 2, 4.0
# Models where attention matters: every 2-D weight ~ N(0, WEIGHT_STD) (cli.tiny.build_tiny; 0.02, the usual
# initialisation, leaves attention nearly uniform: a broken attention moved the output by ~1e-4). Flux normalises
# q and k (RMSNorm), which caps its logits whatever the weights: its q/k norm scales are multiplied by QK_SCALE
# (no other family here has q/k norms). 4 heads (head size 16 for Flux and SD3, 24 for PixArt); tokens: 16 image
# + 32 text ("even"), 15 image + 30 text ("uneven"). Measured on these models (serial, 64x64): attention's
# entropy / log(keys) averages 0.56 Flux, 0.54 SD3, 0.40 PixArt (1 = uniform); attention replaced by the mean of
# V moves the output by 0.78 / 0.46 / 0.87 of max|out|; activations stay finite (max|q| <= 14, max|latent| 1850).
# Parallel-vs-serial rounding measured 0 to 5e-6 (PipeFusion and USP alike), the mutations 3e-3 to 1.
WEIGHT_STD, QK_SCALE = 0.15, 2.0
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
CONFIGS = {
    "u2": ParallelConfig(ulysses_degree=2),
    "u4": ParallelConfig(ulysses_degree=4),
    "r2": ParallelConfig(ring_degree=2),
    "r4": ParallelConfig(ring_degree=4),
    "u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg": ParallelConfig(use_cfg_parallel=True),
    "cfg_u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2, use_cfg_parallel=True),
    "r4_allgather": ParallelConfig(ring_degree=4),  # the same ring with one all-gather instead of hand-offs
}
# 64x64 px: 16 image tokens, text 32 (both divide every degree). 48x80 px: 15 image tokens (no
# degree divides them: padding), text 30 (split at degree 2, replicated at 4).
SIZES = {"even": (64, 64, 32), "uneven": (48, 80, 30)}
UNEVEN_CONFIGS = ("u2", "u4", "r2", "u2r2", "r4_allgather")
FAMILIES = ("flux", "sd3", "pixart")
# PipeFusion: exact when every step is a warmup step; approximate (stale K/V) once patches pipeline.
PF_CONFIGS = {
    "pf2": ParallelConfig(pipefusion_parallel_degree=2),
    "pf4": ParallelConfig(pipefusion_parallel_degree=4),
    "pf2_u2": ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2),
    "pf2_r2": ParallelConfig(pipefusion_parallel_degree=2, ring_degree=2),
    "cfg_pf2_u2": ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2, use_cfg_parallel=True),
    "pf2_m4": ParallelConfig(pipefusion_parallel_degree=2, num_pipeline_patch=4),
}
PF_EXACT = ("pf2", "pf4", "pf2_u2", "pf2_r2", "cfg_pf2_u2")
# Samplers with noise or history of their own: ancestral draws (lcm), Brownian-tree noise (dpmpp_sde, dpmpp_2m_sde),
# multistep history (gradient_estimation, res_multistep, deis, uni_pc with its pending corrector).
PF_SAMPLERS = ("lcm", "gradient_estimation", "dpmpp_2m_sde", "dpmpp_sde", "uni_pc", "res_multistep", "deis")
PF_PIPELINED = ("pf2", "pf2_m4", "pf2_u2", "pf2_r2", "cfg_pf2_u2")
PF_STEPS = 4  # pipelined cases: 1 warmup step, then 3 steps with stale K/V
# A noise_mask under sequence parallel and under PipeFusion (each patch takes its rows of the mask and latent).
MASKED_CONFIGS = {"u2": ParallelConfig(ulysses_degree=2),
                  "pf2": ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=PF_STEPS)}
# Negative controls (parallel_world.MUTATIONS), per family: (size, config, mutation). Each must move the output
# by at least MUTATION_FACTOR x the tolerance of its comparison.
NEGATIVE = [("even", "r2", "ring_skip"), ("even", "u2", "a2a_roll"), ("uneven", "u2", "unmasked_padding"),
            ("even", "pf2", "stale_kv")]
MUTATION_FACTOR = 100
# bf16: parallel vs serial, both bf16 (CFG off: the guidance formula would amplify rounding and bugs alike by cfg).
# The two runs do the same bf16 operations (Ulysses moves data exactly; row-wise layers give each token the same
# result whatever the sharding) except each attention output, which the parallel path rounds twice (the kernel's
# bf16 output per block, then the float32 LSE merge cast back) and serial once, in another summation order: up to
# 2 unit roundoffs u = 2^-8 per attention layer, and to first order these add up through the L attention layers
# on the residual stream. Bound: 2 * L * u (3.1e-2 for SD3 and PixArt, 4.7e-2 for Flux); measured 0.24x to 0.32x
# of it, and a ring-skip mutation in bf16 moves the output by 5.9x (Flux) to 10x (PixArt) of it (asserted >=
# BF16_MUTATION_FACTOR). bf16 cannot see bugs smaller than that: an unmasked padding key (4e-2 on SD3 in fp32)
# would sit near the bound; the fp32 tests above are the ones that catch it.
BF16_CONFIG, BF16_UNIT_ROUNDOFF, BF16_MUTATION_FACTOR = "u2r2", 2.0 ** -8, 4


def make_request(spec, height, width, text_len, steps=STEPS, cfg=CFG, sampler="euler"):
    pos, neg = random_cond(spec, 1, 0, True)
    for c in (pos, neg):
        c.text = c.text[:, :text_len]
    return build_request(spec, empty_latent(spec, 1, height, width), seed=0, steps=steps, cfg=cfg,
                         sampler=sampler, scheduler="simple", denoise=1.0, positive=pos, negative=neg)


def write_model(family, out, weight_std=WEIGHT_STD, **kwargs):
    """A tiny random model with WEIGHT_STD (and QK_SCALE on q/k norms), saved into `out`."""
    model = build_tiny(family, seed=2, weight_std=weight_std, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if len(parts) > 1 and parts[-2] in QK_NORMS:  # e.g. transformer_blocks.0.attn.norm_q.weight
                param.mul_(QK_SCALE)
    model.save_pretrained(out, safe_serialization=True)
    return out


def rel_err(out, ref):
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def masked_request(spec, height, width, text_len):
    """dpmpp_2m (history) from a random latent, denoised only where a soft noise_mask is set (top rows, a ramp)."""
    pos, neg = random_cond(spec, 1, 0, True)
    for c in (pos, neg):
        c.text = c.text[:, :text_len]
    gen = torch.Generator().manual_seed(4)
    latent = torch.randn(1, spec.latent_channels, height // 8, width // 8, generator=gen)
    mask = torch.zeros(1, height, width)
    mask[:, : height // 2] = torch.linspace(1.0, 0.3, width)
    return build_request(spec, latent, seed=3, steps=PF_STEPS, cfg=CFG, sampler="dpmpp_2m", scheduler="simple",
                         denoise=0.8, positive=pos, negative=neg, noise_mask=mask)


def world_payload(root):
    """The cases this module adds to the shared spawned world (tests/conftest.py), and their serial references."""
    paths = {f: write_model(f, root / f) for f in FAMILIES}
    paths["sd3_deep"] = write_model("sd3", root / "sd3_deep", layers=8)
    PATHS.update(paths)
    cases, refs, shapes, adapters = [], {}, {}, {}
    for key, path in paths.items():
        model, spec = load_model(path)
        adapter = adapters[key] = make_adapter(model, spec)
        sizes = SIZES if key in FAMILIES else {"even": SIZES["even"]}
        for size, (h, w, text_len) in sizes.items():
            request = make_request(spec, h, w, text_len)
            refs[(key, size)] = run_request(adapter, request)
            shapes[(key, size)] = (spec, model.config)
            names = CONFIGS if size == "even" else UNEVEN_CONFIGS
            if key == "sd3_deep":
                names = ("u2", "r2")
            for name in names:
                ring_impl = "allgather" if name.endswith("allgather") else "p2p"
                cases.append((f"{key}/{size}/{name}", str(path), CONFIGS[name], ring_impl, request))
    h, w, text_len = SIZES["even"]
    for key in FAMILIES:
        spec = adapters[key].spec
        for name in PF_EXACT:
            cfg = replace(PF_CONFIGS[name], warmup_steps=STEPS)
            cases.append((f"{key}/even/{name}", str(paths[key]), cfg, "p2p", make_request(spec, h, w, text_len)))
    for sampler in PF_SAMPLERS:  # samplers with state or noise of their own, kept per patch by PipeFusion
        request = make_request(adapters["sd3"].spec, h, w, text_len, PF_STEPS, sampler=sampler)  # history matters
        refs[("sd3", sampler)] = run_request(adapters["sd3"], request)
        cfg = replace(PF_CONFIGS["pf2"], warmup_steps=PF_STEPS)
        cases.append((f"sd3/{sampler}/pf2", str(paths["sd3"]), cfg, "p2p", request))
    masked = masked_request(adapters["flux"].spec, h, w, text_len)  # img2img under a noise_mask
    refs[("flux", "masked")] = run_request(adapters["flux"], masked)
    for name, cfg in MASKED_CONFIGS.items():
        cases.append((f"flux/masked/{name}", str(paths["flux"]), cfg, "p2p", masked))
    cases.append(("flux/masked/pf2@mask_rows", str(paths["flux"]), MASKED_CONFIGS["pf2"], "p2p", masked))
    for key, path in paths.items():
        adapter = adapters[key]
        request = make_request(adapter.spec, h, w, text_len, PF_STEPS)
        refs[(key, "pipelined")] = run_request(adapter, request)
        shapes[(key, "pipelined")] = (adapter.spec, adapter.model.config)
        for name in (PF_PIPELINED if key in FAMILIES else ("pf2",)):
            cfg = replace(PF_CONFIGS[name], warmup_steps=1)
            cases.append((f"{key}/pipelined/{name}", str(path), cfg, "p2p", request))
            patches = cfg.num_pipeline_patch or cfg.pipefusion_parallel_degree
            if key in FAMILIES and (key, "pf_reference", patches) not in refs:
                refs[(key, "pf_reference", patches)] = pipefusion_reference(adapter, request, patches, 1)
    for key in FAMILIES:  # negative controls: the cases above, each with one injected bug
        for size, name, mutation in NEGATIVE:
            config = CONFIGS[name] if name in CONFIGS else replace(PF_CONFIGS[name], warmup_steps=STEPS)
            request = next(c[4] for c in cases if c[0] == f"{key}/{size}/{name}")
            cases.append((f"{key}/{size}/{name}@{mutation}", str(paths[key]), config, "p2p", request))
    for key in FAMILIES:  # bf16, CFG off: the parallel run and the bf16 ring-skip mutation
        spec = adapters[key].spec
        request = make_request(spec, h, w, text_len, cfg=1.0)
        refs[(key, "bf16")] = run_request(make_adapter(*load_model(paths[key], "bf16")), request)
        for option in ("bf16", "bf16+ring_skip"):
            cases.append((f"{key}/bf16/{BF16_CONFIG}@{option}", str(paths[key]), CONFIGS[BF16_CONFIG], "p2p",
                          request))
    CASES[:] = cases
    return cases, refs, shapes


@pytest.fixture(scope="module")
def world(spawned_world):
    per_rank = [r["parallel"] for r in spawned_world["per_rank"]]
    return per_rank[0], spawned_world["refs"], spawned_world["shapes"], per_rank


PARITY = [(f, s, c) for f in FAMILIES for s in SIZES for c in (CONFIGS if s == "even" else UNEVEN_CONFIGS)]


@pytest.mark.parametrize("family,size,config", PARITY)
def test_parallel_equals_serial(world, family, size, config):
    results, refs, _, _ = world
    out, ref = results[f"{family}/{size}/{config}"]["out"], refs[(family, size)]
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"parity {family:6s} {size:6s} {config:8s} max|d|/max|ref| = {err:.2e}")
    assert err <= TOL


def test_warm_requests_leave_no_hooks_on_the_model(world):
    """Every rank reuses its models across the cases (warm requests): no hooks, routers or modes accumulate."""
    _, _, _, per_rank = world
    assert all(res["left_behind"] == 0 for rank in per_rank for res in rank.values())
    assert sum(len(rank) for rank in per_rank) > 200


def _attention_layers(family, config):
    if family == "flux":
        return config.num_layers + config.num_single_layers
    return config.num_layers


def _expected_bytes(family, size, name, spec, config):
    """Analytic bytes sent per rank per step, from the shapes (float32, batch 1, euler: 1 eval per step)."""
    h, w, n_txt = SIZES[size]
    n_img = (h // 16) * (w // 16)
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    hidden = heads * head_dim
    par = CONFIGS[name]
    U, R = par.ulysses_degree, par.ring_degree
    S = U * R
    branches = 1 if par.use_cfg_parallel else 2  # CFG: each rank evaluates its own branch only
    layers = _attention_layers(family, config)
    img_loc = -(-n_img // S)
    txt_loc = n_txt // S if n_txt % S == 0 else n_txt
    split_len = img_loc + (txt_loc if family != "pixart" and n_txt % S == 0 else 0)
    rep_len = n_txt if family != "pixart" and n_txt % S else 0
    e = {k: 0 for k in COMM_KINDS}
    if S > 1:
        local = heads * split_len * head_dim * 4
        e["ulysses_all_to_all"] = branches * layers * 4 * local * (U - 1) // U  # Q, K, V and the output
        e["ulysses_all_gather"] = branches * layers * (U - 1) * (heads // U) * rep_len * head_dim * 4
        ring_kind = "ring_all_gather" if name.endswith("allgather") else "ring_p2p"
        e[ring_kind] = branches * layers * (R - 1) * 2 * (heads // U) * U * split_len * head_dim * 4  # K and V
        e["sp_gather"] = branches * (S - 1) * img_loc * hidden * 4
    if par.use_cfg_parallel:
        channels = spec.latent_channels
        e["cfg_gather"] = channels * (h // 8) * (w // 8) * 4
    return e  # "control" stays 0: only PipeFusion exchanges a schedule check


@pytest.mark.parametrize("family,size,config", [(f, s, c) for f, s, c in PARITY if c != "cfg_u2r2"] +
                         [("sd3_deep", "even", "u2"), ("sd3_deep", "even", "r2")])
def test_counters_equal_analytic_bytes(world, family, size, config):
    results, _, shapes, _ = world
    spec, model_config = shapes[(family, size)]
    res = results[f"{family}/{size}/{config}"]
    expected = _expected_bytes(family.split("_")[0], size, config, spec, model_config)
    assert len(res["per_step"]) == STEPS
    for step in res["per_step"]:
        assert step == expected
    assert res["total"] == {k: v * STEPS for k, v in expected.items()}


def test_performance_model_charges_exactly_the_counted_bytes(world):
    """What the latency model (bench/perfmodel.py) charges each rank equals that rank's counters, in every
    case of the world: USP, CFG parallel, PipeFusion (warmup and pipelined), hybrids, even and uneven sizes."""
    from bench.calibrate import model_shape, shape_workload
    from bench.perfmodel import message_bytes

    _, _, _, per_rank = world
    adapters = {}
    for name, path, config, ring_impl, request in CASES:
        dtype = parallel_world.case_options(name)[1]
        if (path, dtype) not in adapters:
            adapters[(path, dtype)] = make_adapter(*load_model(path, dtype))
        adapter = adapters[(path, dtype)]
        workload = shape_workload(model_shape(adapter, request))
        # The model counts euler steps, one evaluation each: give it the sampler's evaluations (dpmpp_sde's two
        # per step), those of the warmup steps synchronous.
        ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
        rounds = pipefusion_rounds(request.sampler, ms, request.sigmas)
        as_euler = replace(config, warmup_steps=sum(1 for i, _, _ in rounds if i < config.warmup_steps))
        for rank in range(config.world_size):
            steps = per_rank[rank][name]["per_step"]
            counted = {k: sum(s.get(k, 0) for s in steps) for k in COMM_KINDS}
            model = message_bytes(workload, as_euler, rank, len(rounds), ring_impl)
            assert model == counted, f"{name}, rank {rank}"


@pytest.mark.parametrize("config,kind", [("u2", "ulysses_all_to_all"), ("r2", "ring_p2p")])
def test_counters_grow_linearly_with_depth(world, config, kind):
    results, _, shapes, _ = world
    shallow = results[f"sd3/even/{config}"]["total"][kind]
    deep = results[f"sd3_deep/even/{config}"]["total"][kind]
    layers = shapes[("sd3", "even")][1].num_layers, shapes[("sd3_deep", "even")][1].num_layers
    assert shallow > 0 and deep * layers[0] == shallow * layers[1]
    assert results["sd3/even/u2"]["total"]["sp_gather"] == results["sd3_deep/even/u2"]["total"]["sp_gather"]


@pytest.mark.parametrize("flags", [["--ulysses_degree", "2"], ["--use_cfg_parallel"],
                                   ["--use_cfg_parallel", "--shard_weights"]])
def test_cli_local_backend_equals_serial_cli(tiny_models, tmp_path, flags):
    from safetensors.torch import load_file

    from xdit_core.cli.main import main

    base = ["generate", "--model", str(tiny_models["flux"]), "--height", "64", "--width", "48", "--steps", "2",
            "--seed", "3", "--cfg", "2.5", "--threads", "1", "--backend", "local"]
    assert main(base + ["--out", str(tmp_path / "serial.safetensors")]) == 0
    assert main(base + flags + ["--out", str(tmp_path / "par.safetensors"),
                                "--report", str(tmp_path / "r.json")]) == 0
    ref = load_file(str(tmp_path / "serial.safetensors"))["samples"]
    out = load_file(str(tmp_path / "par.safetensors"))["samples"]
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world_size"] == 2 and len(report["per_rank"]) == 2
    kind = "ulysses_all_to_all" if "--ulysses_degree" in flags else "cfg_gather"
    assert all(r["comm_bytes"][kind] > 0 for r in report["per_rank"])
    # RankJob shards its blocks: each rank gathers the other's shards on every forward
    assert all((r["comm_bytes"]["shard_gather"] > 0) == ("--shard_weights" in flags) for r in report["per_rank"])


@pytest.mark.parametrize("family,config", [(f, c) for f in FAMILIES for c in PF_EXACT])
def test_pipefusion_with_all_warmup_steps_equals_serial(world, family, config):
    results, refs, _, _ = world
    out, ref = results[f"{family}/even/{config}"]["out"], refs[(family, "even")]
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"pipefusion exact {family:6s} {config:10s} max|d|/max|ref| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("sampler", PF_SAMPLERS)
def test_pipefusion_keeps_sampler_state_and_noise_per_patch(world, sampler):
    """Each patch's sampler keeps its own history (gradient_estimation) and takes its slice of the
    whole latent's noise draw (lcm): with every step synchronous, PipeFusion 2 equals the serial run."""
    results, refs, _, _ = world
    out, ref = results[f"sd3/{sampler}/pf2"]["out"], refs[("sd3", sampler)]
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL


@pytest.mark.parametrize("config", MASKED_CONFIGS)
def test_noise_mask_under_ulysses_and_pipefusion_equals_serial(world, config):
    results, refs, _, _ = world
    out, ref = results[f"flux/masked/{config}"]["out"], refs[("flux", "masked")]
    assert rel_err(out, ref) <= TOL


def test_noise_mask_negative_control_is_caught(world):
    """Patches that take the wrong rows of the mask move PipeFusion's masked run far off the serial one."""
    results, refs, _, _ = world
    err = rel_err(results["flux/masked/pf2@mask_rows"]["out"], refs[("flux", "masked")])
    assert err >= MUTATION_FACTOR * TOL, err


@pytest.mark.parametrize("family", FAMILIES)
def test_pipefusion_reference_without_stale_kv_is_serial(tmp_path, family):
    """The reference itself: all steps warmup, or one patch, leave nothing stale: it equals the serial run."""
    adapter = make_adapter(*load_model(write_model(family, tmp_path / family)))
    h, w, text_len = SIZES["even"]
    request = make_request(adapter.spec, h, w, text_len, PF_STEPS)
    serial = run_request(adapter, request)
    assert rel_err(pipefusion_reference(adapter, request, 2, PF_STEPS), serial) <= TOL
    assert rel_err(pipefusion_reference(adapter, request, 1, 1), serial) <= TOL


@pytest.mark.parametrize("family,config", [(f, c) for f in FAMILIES for c in PF_PIPELINED])
def test_pipefusion_with_stale_kv_equals_the_exact_reference_of_its_schedule(world, family, config):
    """1 warmup step of PF_STEPS: PipeFusion equals pipefusion_reference (one process, the same stale-K/V
    schedule); its distance from serial is measured, and must be far above the tolerance (staleness is real)."""
    results, refs, _, _ = world
    res = results[f"{family}/pipelined/{config}"]
    patches = res["effective_patches"]
    assert patches == (4 if config == "pf2_m4" else 2)
    out, reference, serial = res["out"], refs[(family, "pf_reference", patches)], refs[(family, "pipelined")]
    err, stale = rel_err(out, reference), rel_err(out, serial)
    print(f"pipefusion warmup 1/{PF_STEPS} {family:6s} {config:10s} M={patches}: vs reference "
          f"max|d|/max|ref| = {err:.2e}; vs serial {stale:.2e}")
    assert err <= TOL
    assert stale > MUTATION_FACTOR * TOL


@pytest.mark.parametrize("family,size,config,mutation", [(f, *n) for f in FAMILIES for n in NEGATIVE])
def test_negative_control_is_caught(world, family, size, config, mutation):
    """The parity comparison fails on the case run with an injected bug, by far (parallel_world.MUTATIONS)."""
    results, refs, _, _ = world
    ref = refs[(family, size)]
    err = rel_err(results[f"{family}/{size}/{config}@{mutation}"]["out"], ref)
    clean = rel_err(results[f"{family}/{size}/{config}"]["out"], ref)
    print(f"negative control {family:6s} {size:6s} {config:4s} {mutation:16s} max|d|/max|ref| = {err:.2e} "
          f"(unmutated {clean:.2e}, tolerance {TOL:.0e})")
    assert clean <= TOL < err
    assert err >= MUTATION_FACTOR * TOL


def _bf16_tol(family, config):
    """2 * L * u, L the self/joint attention layers (PixArt's cross-attention runs the same kernel on the same
    query rows in both runs)."""
    return 2 * _attention_layers(family, config) * BF16_UNIT_ROUNDOFF


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_parallel_equals_bf16_serial(world, family):
    """bf16 model, USP (Ulysses 2 x Ring 2) vs serial, within the bound of BF16_UNIT_ROUNDOFF (see above); a ring
    hand-off skipped in bf16 exceeds that bound BF16_MUTATION_FACTOR times over."""
    results, refs, shapes, _ = world
    tol = _bf16_tol(family, shapes[(family, "even")][1])
    ref = refs[(family, "bf16")]
    out = results[f"{family}/bf16/{BF16_CONFIG}@bf16"]["out"]
    mutated = results[f"{family}/bf16/{BF16_CONFIG}@bf16+ring_skip"]["out"]
    err, err_mutated = rel_err(out, ref), rel_err(mutated, ref)
    print(f"bf16 {family:6s} {BF16_CONFIG}: max|d|/max|ref| = {err:.2e} = {err / tol:.2f} x bound {tol:.2e}; "
          f"ring_skip mutation {err_mutated:.2e} = {err_mutated / tol:.1f} x bound")
    bf16_bytes = results[f"{family}/bf16/{BF16_CONFIG}@bf16"]["param_bytes"]
    assert 2 * bf16_bytes == results[f"{family}/even/{BF16_CONFIG}"]["param_bytes"]  # the ranks ran bf16 weights
    assert err <= tol
    assert err_mutated >= BF16_MUTATION_FACTOR * tol


def module_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _stage_bytes(path, stages):
    model, spec = load_model(path)
    adapter = make_adapter(model, spec)
    blocks = [b for b, _ in adapter.blocks()]
    ranges = split_stages(dict(model.config), spec, stages).ranges
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    shared = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in block_ids)
    return [shared + sum(module_bytes(blocks[i]) for i in r) for r in ranges]


@pytest.mark.parametrize("family,config,stages", [(f, "pf2", 2) for f in FAMILIES] + [("flux", "pf4", 4)])
def test_pipefusion_rank_holds_exactly_its_stage(world, tiny_models, family, config, stages):
    _, _, _, per_rank = world
    expected = _stage_bytes(tiny_models_path(world, family), stages)
    name = f"{family}/even/{config}"
    held = [r[name] for r in per_rank if name in r]
    assert len(held) == stages  # pf2 and pf4: one rank per stage
    for r in held:
        assert r["param_bytes"] == expected[r["coords"]["pipefusion"]]


def tiny_models_path(world, family):
    return PATHS[family]


@pytest.mark.parametrize("family", FAMILIES + ("sd3_deep",))
def test_pipefusion_p2p_bytes_per_step_equal_the_patch_hand_off(world, family):
    results, _, shapes, per_rank = world
    spec, config = shapes[(family, "pipelined")]
    h, w, n_txt = SIZES["even"]
    n_img = (h // 16) * (w // 16)
    hidden = config.num_attention_heads * config.attention_head_dim
    joint_txt = 0 if family == "pixart" else n_txt
    patches = 2
    # Stage 0 sends, per branch and unit, the unit's hidden states and the cancel flag (one element); the joint
    # text rides with the first unit of an evaluation only: the warmup step sends the whole image as one unit,
    # the pipelined steps one unit per patch, so the bytes do not grow with the patches.
    warmup = 2 * ((n_img + joint_txt) * hidden + 1) * 4
    pipelined = 2 * ((n_img + joint_txt) * hidden + patches) * 4
    res = results[f"{family}/pipelined/pf2"]
    assert [s["pipefusion_p2p"] for s in res["per_step"]] == [warmup] + [pipelined] * (PF_STEPS - 1)
    # The last stage sends the next input of every patch back to stage 0 (not after the last step).
    last = next(r[f"{family}/pipelined/pf2"] for r in per_rank[1:] if f"{family}/pipelined/pf2" in r
                and r[f"{family}/pipelined/pf2"]["coords"]["pipefusion"] == 1)
    latent = spec.latent_channels * (h // 8) * (w // 8) * 4
    assert [s["pipefusion_p2p"] for s in last["per_step"]] == [latent] * (PF_STEPS - 1) + [0]


def test_pipefusion_p2p_bytes_do_not_grow_with_depth(world):
    results, _, shapes, _ = world
    shallow, deep = results["sd3/pipelined/pf2"], results["sd3_deep/pipelined/pf2"]
    assert shapes[("sd3_deep", "pipelined")][1].num_layers == 2 * shapes[("sd3", "pipelined")][1].num_layers
    assert shallow["per_step"] == deep["per_step"]


def test_pipefusion_stage_mismatch_fails_instead_of_hanging(tiny_models):
    """Stage 1 gets a request with more steps than stage 0: both stop with an error, quickly."""
    import time

    from xdit_core.errors import XDiTWorkerError

    model, spec = load_model(tiny_models["sd3"])
    requests = [make_request(spec, 64, 64, 32, steps) for steps in (2, 3)]
    t0 = time.perf_counter()
    with pytest.raises(XDiTWorkerError, match="PipeFusion stages disagree"):
        spawn_world(parallel_world.run_mismatched, 2, (str(tiny_models["sd3"]), requests), threads=1, timeout_s=120)
    assert time.perf_counter() - t0 < 120


def test_env_backend_under_torchrun_equals_local(tiny_models, tmp_path):
    """`--backend env`: ranks from torchrun's environment; rank 0 writes the same latent as --backend local."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from xdit_core.cli.main import main

    base = ["generate", "--model", str(tiny_models["sd3"]), "--height", "48", "--width", "64", "--steps", "2",
            "--seed", "4", "--threads", "1", "--ulysses_degree", "2"]
    assert main(base + ["--backend", "local", "--out", str(tmp_path / "local.safetensors")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xdit_core",
                           *base, "--backend", "env", "--out", str(tmp_path / "env.safetensors")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[:4000]  # the ranks' own output comes before torchrun's summary
    local = load_file(str(tmp_path / "local.safetensors"))["samples"]
    assert torch.equal(load_file(str(tmp_path / "env.safetensors"))["samples"], local)
