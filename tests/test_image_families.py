"""The image families of issue 18: Qwen-Image (and Edit 2509/2511), FLUX.1 Kontext, Z-Image, FLUX.2, HunyuanDiT.

Parallel parity (Ulysses, Ring, Ulysses x Ring, CFG, PipeFusion exact with warmup = steps) with text key masks
and reference-image tokens, PipeFusion with stale K/V against the exact reference of its schedule, negative
controls; each adapter at degree 1 against a direct diffusers forward; a full generate against a loop over the
diffusers transformer with ComfyUI's (or the diffusers pipeline's) sigmas and conditioning; ComfyUI's positions
where they differ from diffusers'; the masked attention kernels.

The parallel cases run in the suite's shared spawned world (tests/conftest.py) on tiny models where attention
matters (test_parallel.WEIGHT_STD, q/k norms scaled). Latents of 6 x 10 (3 x 5 = 15 tokens: every degree pads),
7 text tokens (replicated at every degree), reference latents of other sizes; batch 2 where a text mask differs
per item (the masked kernel), batch 1 where it is the same (masked keys dropped like padding).
"""
from dataclasses import replace

import pytest
import torch

from xdit_core.cli.tiny import build_tiny
from xdit_core.errors import XDiTConditioningError
from xdit_core.loading.load import load_model
from xdit_core.models import make_adapter
from xdit_core.models.base import BranchCond
from xdit_core.models.families import resolve_model_spec
from xdit_core.models.latent_formats import pack_flux, unpack_flux
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.runtime.job import run_request
from xdit_core.sampling.request import build_request

from pipefusion_reference import pipefusion_reference
from test_parallel import CFG, MUTATION_FACTOR, PF_STEPS, STEPS, TOL, rel_err, write_model

ROWS, COLS, TEXT = 6, 10, 7
CONFIGS = {
    "u2": ParallelConfig(ulysses_degree=2),
    "u3": ParallelConfig(ulysses_degree=3),  # Z-Image's 30 heads take Ulysses 3 (and 5, 6), not 4
    "r2": ParallelConfig(ring_degree=2),
    "u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg_r2": ParallelConfig(ring_degree=2, use_cfg_parallel=True),
    "pf2": ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=STEPS),  # every step warm: exact
    "pf2_r2": ParallelConfig(pipefusion_parallel_degree=2, ring_degree=2, warmup_steps=STEPS),
    "pf4": ParallelConfig(pipefusion_parallel_degree=4, warmup_steps=STEPS),
}
# (case, family, variant, request kind); kinds: see family_request.
CASES = {
    "qwen_edit": ("qwen", "image", "edit"),
    "qwen_masked": ("qwen", "image", "masked"),
    "qwen_masked_split": ("qwen", "image", "masked_split"),  # 8 text tokens: split across 2 and 4 ranks
    "qwen_2511": ("qwen", "edit_2511", "edit"),
    "kontext": ("flux", "dev", "edit"),
    "zimage": ("zimage", "zimage", "plain"),
    "flux2_edit": ("flux2", "dev", "edit"),
    "hunyuandit": ("hunyuandit", "v1.1", "hunyuan"),  # its long skips cross PipeFusion's stages with the patch
}
CASE_CONFIGS = {"qwen_edit": ("u2", "r2", "u2r2", "cfg_r2", "pf2", "pf2_r2"), "qwen_masked": ("u2", "r2", "cfg_r2", "pf2"),
                "qwen_masked_split": ("u2", "r2", "u2r2"),
                "qwen_2511": ("u2", "pf2_r2"), "kontext": ("u2r2", "cfg_r2", "pf2"),
                "zimage": ("u2", "u3", "r2", "cfg_r2", "pf2", "pf2_r2"),
                "flux2_edit": ("u2", "r2", "cfg_r2", "pf2", "pf2_r2"),
                "hunyuandit": ("u2", "r2", "u2r2", "cfg_r2", "pf2", "pf2_r2", "pf4")}  # skips cross the stages
# Weights ~ N(0, std): test_parallel.WEIGHT_STD, but 0.2 for Z-Image, whose float32 rounding margin is thin at 0.15
# (Ring 2 moved its output by 8.2e-6 of the 1e-5 tolerance in 2 steps; at 0.1 by 2.8e-5 of a smaller output; at
# 0.2 by 2.5e-6).
WEIGHT_STD = {"zimage": 0.2}
# PipeFusion with stale K/V (1 warmup step of PF_STEPS): equal to the exact single-process reference of its
# schedule, and its distance from serial measured (the stale K/V's approximation).
PIPELINED = ("qwen_edit", "qwen_masked", "kontext", "zimage", "flux2_edit", "hunyuandit")
PF_PIPELINED = ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=1)
# Negative controls: each must move the output >= MUTATION_FACTOR x TOL.
NEGATIVE = [("qwen_masked", "r2", "unmasked_text"), ("qwen_masked", "pf2", "unmasked_text"),
            ("qwen_masked_split", "u2r2", "unmasked_text"),
            ("qwen_masked", "u2", "unmasked_padding"), ("hunyuandit", "pf2", "carried_zeroed")]


def family_request(spec, kind: str, seed: int = 0, steps: int = STEPS, rows: int = ROWS, cols: int = COLS):
    """"edit": batch 1, a reference latent (4 x 8) in the positive branch and two (4 x 8, 4 x 4) placed by "index"
    in the negative (even token counts, where diffusers' positions are ComfyUI's); "masked": batch 2, the positive's
    text mask differing per item, the negative's the same for both (masked keys dropped); "masked_split": the same
    with 8 text tokens (split across the ranks); "plain": batch 1, neither; "hunyuan": HunyuanDiT's two encoders'
    states with their padding masks."""
    gen = torch.Generator().manual_seed(seed)
    batch = 2 if kind.startswith("masked") else 1
    n_txt = TEXT + 1 if kind == "masked_split" else TEXT
    pos, neg = (BranchCond(torch.randn(batch, n_txt, spec.text_dim, generator=gen)) for _ in range(2))
    if spec.pooled_dim:
        pos, neg = (replace(c, pooled=torch.randn(batch, spec.pooled_dim, generator=gen)) for c in (pos, neg))
    if kind == "hunyuan":
        pos, neg = (replace(c, text=torch.randn(batch, 77, spec.text_dim, generator=gen),
                            text2=torch.randn(batch, 256, spec.text2_dim, generator=gen),
                            text_mask=torch.arange(77)[None] < n, text2_mask=torch.arange(256)[None] < 2 * n)
                    for c, n in ((pos, 9), (neg, 4)))
    elif kind == "edit":
        ref = torch.randn(1, spec.latent_channels, 4, 8, generator=gen)
        pos = replace(pos, references=(ref,))
        neg = replace(neg, references=(ref, torch.randn(1, spec.latent_channels, 4, 4, generator=gen)),
                      reference_method="index" if spec.family in ("qwen", "flux") else None)
    elif kind.startswith("masked"):
        mask = torch.ones(batch, n_txt, dtype=torch.bool)
        mask[1, 4:] = False
        pos = replace(pos, text_mask=mask)
        neg = replace(neg, text_mask=torch.tensor([[True] * 5 + [False] * (n_txt - 5)]))
    latent = torch.zeros(batch, spec.latent_channels, rows, cols)
    return build_request(spec, latent, seed=1, steps=steps, cfg=CFG, sampler="euler", scheduler="simple",
                         denoise=1.0, positive=pos, negative=neg)


def world_payload(root):
    """The cases this module adds to the shared spawned world, and their serial references."""
    cases, refs = [], {}
    for case, (family, variant, kind) in CASES.items():
        path = write_model(family, root / case, weight_std=WEIGHT_STD.get(family, 0.15), variant=variant)
        adapter = make_adapter(*load_model(path))
        request = family_request(adapter.spec, kind)
        refs[("families", case)] = run_request(adapter, request)
        for name in CASE_CONFIGS[case]:
            cases.append((f"families/{case}/{name}", str(path), CONFIGS[name], "p2p", request))
        for c, name, mutation in NEGATIVE:
            if c == case:
                cases.append((f"families/{case}/{name}@{mutation}", str(path), CONFIGS[name], "p2p", request))
        if case in PIPELINED:
            request = family_request(adapter.spec, kind, steps=PF_STEPS)
            refs[("families", case, "pipelined")] = run_request(adapter, request)
            refs[("families", case, "pf_reference")] = pipefusion_reference(adapter, request, 2, 1)
            cases.append((f"families/{case}/pf2_pipelined", str(path), PF_PIPELINED, "p2p", request))
    return cases, refs


@pytest.fixture(scope="module")
def world(spawned_world):
    return spawned_world["per_rank"][0]["parallel"], spawned_world["refs"]


@pytest.mark.parametrize("case,config", [(c, n) for c in CASES for n in CASE_CONFIGS[c]])
def test_parallel_equals_serial(world, case, config):
    results, refs = world
    err = rel_err(results[f"families/{case}/{config}"]["out"], refs[("families", case)])
    print(f"parity {case:12s} {config:7s} max|d|/max|ref| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("case", PIPELINED)
def test_pipelined_pipefusion_equals_its_exact_schedule(world, case):
    """PipeFusion 2 after 1 warmup step (stale K/V, references and text masks in its buffers) equals the exact
    single-process reference of its schedule; its distance from serial is the method's approximation."""
    results, refs = world
    out = results[f"families/{case}/pf2_pipelined"]["out"]
    err = rel_err(out, refs[("families", case, "pf_reference")])
    approx = rel_err(out, refs[("families", case, "pipelined")])
    print(f"pipefusion {case:12s} pf2 warmup 1 of {PF_STEPS}: vs its schedule {err:.2e}, vs serial {approx:.2e}")
    assert err <= TOL
    assert approx > TOL  # stale K/V is used: the comparison above is not the serial one again


@pytest.mark.parametrize("case,config,mutation", NEGATIVE)
def test_negative_control_is_caught(world, case, config, mutation):
    results, refs = world
    err = rel_err(results[f"families/{case}/{config}@{mutation}"]["out"], refs[("families", case)])
    print(f"negative control {case:12s} {config:4s} {mutation:16s} max|d|/max|ref| = {err:.2e}")
    assert err >= MUTATION_FACTOR * TOL


def _qwen(variant="image"):
    model = build_tiny("qwen", seed=2, weight_std=0.15, variant=variant).eval()
    return model, make_adapter(model, resolve_model_spec(dict(model.config), family="qwen"))


@pytest.mark.parametrize("variant", ("image", "edit_2511"))
def test_qwen_forward_equals_diffusers_forward(variant):
    """Degree 1 at even token counts (where ComfyUI's and diffusers' positions agree): our embed -> blocks -> head is
    diffusers' QwenImageTransformer2DModel.forward bit for bit, with a text mask and with a reference image."""
    model, adapter = _qwen(variant)
    gen = torch.Generator().manual_seed(0)
    x, text, ref = (torch.randn(*s, generator=gen) for s in ((1, 16, 8, 12), (1, TEXT, 32), (1, 16, 4, 8)))
    t = torch.tensor([0.7])
    mask = torch.tensor([[True] * 5 + [False] * 2])
    with torch.no_grad():
        for cond, shapes, refs in ((BranchCond(text, text_mask=mask), [[(1, 4, 6)]], []),
                                   (BranchCond(text, references=(ref,)), [[(1, 4, 6), (1, 2, 4)]], [ref])):
            ours = adapter.predict(x, t, cond, None)
            theirs = model(hidden_states=torch.cat([pack_flux(v) for v in [x, *refs]], dim=1),
                           encoder_hidden_states=text, encoder_hidden_states_mask=cond.text_mask, timestep=t,
                           img_shapes=shapes, return_dict=False)[0]
            assert torch.equal(ours, unpack_flux(theirs[:, :24], 8, 12))


def test_qwen_positions_are_comfyuis_at_odd_sizes():
    """At an odd token count ComfyUI centres the rows as -(n // 2) .. n - 1 - n // 2 (diffusers one lower): 5 rows
    are -2..2, and the text starts after max(rows, columns) // 2 of the sampled latent, references not counted."""
    from xdit_core.models.qwen import grid_ids, reference_ids

    ids = grid_ids(5, 3)
    assert ids[:, 1].unique().tolist() == [-2, -1, 0, 1, 2] and ids[:, 2].unique().tolist() == [-1, 0, 1]
    index, offset = reference_ids([(4, 8), (6, 4)], "index"), reference_ids([(4, 8), (6, 4)], "offset")
    assert [r[0, 0].item() for r in index] == [1, 2] and [r[0, 0].item() for r in offset] == [1, 1]
    # "offset" (latent rows): the second (6 + 4 rows <= 4 + 8 columns) goes below the first's 4 rows (2 tokens), then
    # centred: token rows 2..4 - 1
    assert offset[1][:, 1].unique().tolist() == [1, 2, 3] and offset[1][:, 2].unique().tolist() == [-1, 0]


def comfy_flux_sigmas(mu: float, steps: int) -> torch.Tensor:
    """ComfyUI's ModelSamplingFlux table (flux_time_shift(mu, 1, t) at 10000 timesteps, float32) with the "simple"
    scheduler, written out."""
    t = torch.arange(1, 10001) / 10000
    table = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


@torch.no_grad()
def euler_cfg(x, sigmas, request, predict):
    """ComfyUI's euler with CFG over `sigmas`, written out: predict(x, sigma, branch) is a branch's x0 prediction."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        cond, uncond = (predict(x, s, c) for c in (request.positive, request.negative))
        x = x + (x - (uncond + (cond - uncond) * CFG)) / s * (sigmas[i + 1] - s)
    return x


def test_qwen_generate_equals_a_loop_over_the_diffusers_transformer(tmp_path):
    """run_request equals euler with CFG over diffusers' transformer: ComfyUI's Qwen sigmas (ModelSamplingFlux
    1.15), noise and Wan 2.1 latent format, the reference latent in the positive branch, sigma as the timestep."""
    model = build_tiny("qwen", seed=5, weight_std=0.1).eval()
    model.save_pretrained(tmp_path / "q")
    adapter = make_adapter(*load_model(tmp_path / "q"))  # its rotary table is ours: diffusers' stays on meta
    spec, steps, rows, cols = adapter.spec, 3, 8, 12  # even token counts: diffusers' positions are ComfyUI's
    request = family_request(spec, "edit", steps=steps, rows=rows, cols=cols)
    ours = run_request(adapter, request)
    sigmas = comfy_flux_sigmas(1.15, steps).float()
    x = sigmas[0] * torch.randn(1, 16, rows, cols, generator=torch.Generator().manual_seed(1))

    def predict(x, s, c):
        refs = list(c.references)
        shapes = [[(1, rows // 2, cols // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]]
        out = model(hidden_states=torch.cat([pack_flux(v) for v in [x, *refs]], dim=1), encoder_hidden_states=c.text,
                    timestep=s.reshape(1), img_shapes=shapes, return_dict=False)[0]
        return x - unpack_flux(out[:, :(rows // 2) * (cols // 2)], rows, cols) * s

    x = euler_cfg(x, sigmas, request, predict)
    # The negative's second reference sits on frame 2 ("index"), as diffusers' second image: positions agree.
    err = rel_err(ours, x)
    print(f"qwen generate vs loop over diffusers: {err:.2e}")
    assert err <= TOL


def test_odd_reference_latents_are_padded_as_comfyui_pads_them():
    """A 7 x 5 reference (TextEncodeQwenImageEdit scales to about 1 MP without rounding) is padded circularly at the
    bottom and right to 8 x 6 (ComfyUI's pad_to_patch_size): 12 tokens, the same as the padded latent's."""
    _, adapter = _qwen()
    ref = torch.randn(1, 16, 7, 5, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ref, ref[:, :, :1]], dim=2)
    padded = torch.cat([padded, padded[:, :, :, :1]], dim=3)
    text, x, t = torch.randn(1, 3, 32), torch.randn(1, 16, 4, 6), torch.tensor([0.5])
    assert adapter.reference_tokens(BranchCond(text, references=(ref,)), 4, 6) == 12
    with torch.no_grad():
        odd = adapter.predict(x, t, BranchCond(text, references=(ref,)), None)
        even = adapter.predict(x, t, BranchCond(text, references=(padded,)), None)
    assert torch.equal(odd, even)


def test_qwen_latents_keep_comfyuis_frame_axis():
    """ComfyUI's Qwen LATENT is [B, 16, 1, h, w]: the engine samples it as [B, 16, h, w] (same noise) and refuses
    several frames."""
    from xdit_core.errors import XDiTConfigError

    _, adapter = _qwen()
    spec = adapter.spec
    args = dict(seed=3, steps=2, cfg=1.0, sampler="euler", scheduler="simple", denoise=1.0,
                positive=BranchCond(torch.randn(1, 3, 32)), negative=None)
    five = build_request(spec, torch.zeros(1, 16, 1, ROWS, COLS), **args)
    four = build_request(spec, torch.zeros(1, 16, ROWS, COLS), **args)
    assert five.noise.shape == (1, 16, ROWS, COLS) and torch.equal(five.noise, four.noise)
    with pytest.raises(XDiTConfigError, match="2 frames"):
        build_request(spec, torch.zeros(1, 16, 2, ROWS, COLS), **args)


def test_references_and_masks_are_checked():
    _, adapter = _qwen()
    spec = adapter.spec
    args = dict(seed=3, steps=2, cfg=1.0, sampler="euler", scheduler="simple", denoise=1.0, negative=None)
    latent = torch.zeros(1, 16, ROWS, COLS)
    text = torch.randn(1, 3, 32)
    with pytest.raises(XDiTConditioningError, match="reference latent 0 has shape"):
        build_request(spec, latent, positive=BranchCond(text, references=(torch.zeros(1, 8, 3, 4),)), **args)
    with pytest.raises(XDiTConditioningError, match="reference_latents_method 'uxo'"):
        build_request(spec, latent, positive=BranchCond(text, references=(torch.zeros(1, 16, 2, 4),),
                                                        reference_method="uxo"), **args)
    with pytest.raises(XDiTConditioningError, match="masks every token"):
        build_request(spec, latent, positive=BranchCond(text, text_mask=torch.zeros(1, 3, dtype=torch.bool)), **args)
    sd3 = resolve_model_spec({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 8,
                              "pooled_projection_dim": 4, "num_attention_heads": 1, "num_layers": 1})
    with pytest.raises(XDiTConditioningError, match="takes none"):
        build_request(sd3, latent, positive=BranchCond(torch.randn(1, 3, 8), torch.randn(1, 4),
                                                        references=(torch.zeros(1, 16, 2, 4),)), **args)


def test_zimage_forward_equals_diffusers_forward():
    """Degree 1: our embed (pad tokens, caption refiner) -> blocks -> head is diffusers' ZImageTransformer2DModel
    bit for bit, given t = 1 - sigma and the output negated (as its pipeline does), at token counts that pad."""
    model = build_tiny("zimage", seed=2, weight_std=0.15).eval()
    adapter = make_adapter(model, resolve_model_spec(dict(model.config), family="zimage"))
    gen = torch.Generator().manual_seed(0)
    for h, w, n_txt in ((6, 10, TEXT), (8, 16, 32)):
        x, text = torch.randn(1, 16, h, w, generator=gen), torch.randn(1, n_txt, 32, generator=gen)
        sigma = torch.tensor([0.7])
        with torch.no_grad():
            ours = adapter.predict(x, sigma, BranchCond(text), None)
            theirs = model([x[0].unsqueeze(1)], 1 - sigma, [text[0]], return_dict=False)[0][0]
        assert torch.equal(ours[0], -theirs[:, 0])


def test_zimage_generate_equals_the_diffusers_scheduler_loop(tmp_path):
    """run_request (euler, "simple", flow shift 3, cfg c) equals diffusers' ZImagePipeline loop: its
    FlowMatchEulerDiscreteScheduler (shift 3) over sigmas linspace(1, 1/N, N), the negated model output at
    t = 1 - sigma, and its CFG pos + g (pos - neg) with g = c - 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = build_tiny("zimage", seed=5, weight_std=0.1).eval()
    model.save_pretrained(tmp_path / "z")
    adapter = make_adapter(*load_model(tmp_path / "z"))
    steps = 4
    request = family_request(adapter.spec, "plain", steps=steps, rows=8, cols=12)
    ours = run_request(adapter, request)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist())
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        with torch.no_grad():
            pos, neg = (model([x[0].unsqueeze(1)], ((1000 - t) / 1000).reshape(1), [c.text[0]],
                              return_dict=False)[0][0][:, 0] for c in (request.positive, request.negative))
        pred = -(pos + (CFG - 1) * (pos - neg))
        x = scheduler.step(pred[None], t, x, return_dict=False)[0]
    err = rel_err(ours, x)
    print(f"zimage generate vs diffusers' scheduler loop: {err:.2e}")
    # The same math in other float32 steps (t = (1000 - 1000 sigma) / 1000 against 1 - sigma, x + (s' - s) v against
    # ComfyUI's euler through the denoised latent): measured 1.6e-5; the real-host tests' bound.
    assert err <= 1e-4


@pytest.mark.parametrize("ranks,ulysses,ring", [(4, 2, 2), (6, 6, 1), (8, 2, 4)])
def test_auto_layout_keeps_ulysses_within_zimages_30_heads(ranks, ulysses, ring):
    from xdit_core.parallel.auto_mesh import choose_mesh

    config, why = choose_mesh("zimage", 30, ranks, 1.0, 32, pipefusion=False)
    assert (config.ulysses_degree, config.ring_degree) == (ulysses, ring), why


@pytest.mark.parametrize("variant", ("dev", "klein"))
def test_flux2_forward_equals_diffusers_forward(variant):
    """Degree 1: our embed (the shared modulations, 4-axis positions, a reference on T = 10) -> blocks -> head is
    diffusers' Flux2Transformer2DModel.forward bit for bit."""
    from xdit_core.models.flux2 import grid_ids, pack

    model = build_tiny("flux2", seed=2, weight_std=0.15, variant=variant).eval()
    adapter = make_adapter(model, resolve_model_spec(dict(model.config), family="flux2"))
    gen = torch.Generator().manual_seed(0)
    x, text, ref = (torch.randn(*s, generator=gen) for s in ((1, 128, 3, 5), (1, TEXT, 32), (1, 128, 2, 4)))
    sigma, guidance = torch.tensor([0.7]), 4.0 if variant == "dev" else None
    txt_ids = torch.zeros(TEXT, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(TEXT)
    with torch.no_grad():
        ours = adapter.predict(x, sigma, BranchCond(text, references=(ref,)), guidance)
        theirs = model(hidden_states=torch.cat([pack(x), pack(ref)], 1), encoder_hidden_states=text, timestep=sigma,
                       img_ids=torch.cat([grid_ids(3, 5), grid_ids(2, 4, 10)]), txt_ids=txt_ids,
                       guidance=None if guidance is None else torch.tensor([guidance]), return_dict=False)[0]
    assert torch.equal(ours, theirs[:, :15].transpose(1, 2).reshape(1, 128, 3, 5))


def test_flux2_generate_equals_the_diffusers_scheduler_loop(tmp_path):
    """run_request (euler, "simple", FLUX.2's default shift) equals Flux2Pipeline's loop: FlowMatchEulerDiscrete
    with exponential dynamic shifting at compute_empirical_mu(tokens, steps) over linspace(1, 1/N, N), guidance 4,
    real CFG across the branches (cfg > 1), a reference latent on T = 10."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from xdit_core.models.flux2 import grid_ids, pack

    model = build_tiny("flux2", seed=5, weight_std=0.1).eval()
    model.save_pretrained(tmp_path / "f2")
    adapter = make_adapter(*load_model(tmp_path / "f2"))
    steps, rows, cols = 4, 6, 10
    request = family_request(adapter.spec, "edit", steps=steps, rows=rows, cols=cols)
    ours = run_request(adapter, request)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(),
                            mu=compute_empirical_mu(rows * cols, steps))
    x = torch.randn(1, 128, rows, cols, generator=torch.Generator().manual_seed(1))
    txt_ids = torch.zeros(TEXT, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(TEXT)
    for t in scheduler.timesteps:
        preds = []
        for c in (request.positive, request.negative):
            ids = [grid_ids(rows, cols)] + [grid_ids(r.shape[-2], r.shape[-1], 10 * (i + 1))
                                            for i, r in enumerate(c.references)]
            with torch.no_grad():
                out = model(hidden_states=torch.cat([pack(x)] + [pack(r) for r in c.references], 1),
                            encoder_hidden_states=c.text, timestep=(t / 1000).reshape(1), img_ids=torch.cat(ids),
                            txt_ids=txt_ids, guidance=torch.tensor([4.0]), return_dict=False)[0]
            preds.append(out[:, :rows * cols].transpose(1, 2).reshape(1, 128, rows, cols))
        pos, neg = preds
        x = scheduler.step(neg + CFG * (pos - neg), t, x, return_dict=False)[0]
    err = rel_err(ours, x)
    print(f"flux2 generate vs diffusers' scheduler loop: {err:.2e}")
    assert err <= 1e-4  # other float32 steps for the same math (see the Z-Image test)


@pytest.mark.parametrize("variant", ("v1.2", "v1.1"))
def test_hunyuandit_forward_equals_diffusers_forward(variant):
    """Degree 1: our embed (padding embeddings for masked text, size conditioning of v1.0/1.1) -> blocks with the
    long skips -> head is diffusers' HunyuanDiT2DModel.forward bit for bit, given the same rotary table."""
    from xdit_core.models.hunyuandit import rotary

    model = build_tiny("hunyuandit", seed=2, weight_std=0.15, variant=variant).eval()
    adapter = make_adapter(model, resolve_model_spec(dict(model.config), family="hunyuandit"))
    request = family_request(adapter.spec, "hunyuan", rows=8, cols=12)
    c = request.positive
    x, t = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([640.0])
    v11 = variant == "v1.1"
    with torch.no_grad():
        ours = adapter.predict(x, t, c, None)
        theirs = model(x, t, encoder_hidden_states=c.text, text_embedding_mask=c.text_mask,
                       encoder_hidden_states_t5=c.text2, text_embedding_mask_t5=c.text2_mask,
                       image_meta_size=torch.tensor([[64.0, 96.0, 64.0, 96.0, 0.0, 0.0]]) if v11 else None,
                       style=torch.zeros(1, dtype=torch.long) if v11 else None, image_rotary_emb=rotary(16, 4, 6),
                       return_dict=False)[0]
    assert torch.equal(ours, theirs[:, :4])


def test_hunyuandit_rotary_is_comfyuis():
    """Square grids: diffusers' own table; off-centre crops (non-square): numpy's linspace without endpoint, as
    ComfyUI and the original HunyuanDiT (diffusers' torch version scales the stop instead)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    from xdit_core.models.hunyuandit import rope_region, rotary

    for rows, cols in ((8, 8), (4, 8)):
        theirs = get_2d_rotary_pos_embed(16, rope_region(rows, cols), (rows, cols), output_type="pt")
        ours = rotary(16, rows, cols)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs)) == (rows == cols)
    (top, left), (bottom, right) = rope_region(4, 8)  # the crop of the 32 x 32 base grid: rows 8..24
    assert (top, left, bottom, right) == (8, 0, 24, 32)
    cos, _ = rotary(16, 4, 8)
    rows = torch.tensor([8.0, 12.0, 16.0, 20.0])  # 8 + k (24 - 8) / 4
    assert torch.allclose(cos[::8, 8:12], torch.cos(rows[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)))
                          .repeat_interleave(2, dim=1)[:, :4], atol=1e-6)


def test_hunyuandit_skips_still_to_use_travel_with_the_patch():
    """HunyuanDiT's block i < depth/2 - 1 leaves a skip that block depth - 1 - i takes: after the first k blocks a
    PipeFusion hand-off carries the skips pushed and not yet popped (6 blocks: 0, 1, 2, 2, 2, 1, 0; 40: up to 19)."""
    model = build_tiny("hunyuandit", seed=2)
    adapter = make_adapter(model, resolve_model_spec(dict(model.config), family="hunyuandit"))
    assert [adapter.carried_after(k) for k in range(7)] == [0, 1, 2, 2, 2, 1, 0]
    deep = make_adapter(build_tiny("hunyuandit", seed=2, layers=40), adapter.spec)
    assert max(deep.carried_after(k) for k in range(41)) == 19 and deep.carried_after(40) == 0


def test_hunyuandit_generate_equals_comfyuis_v_prediction_loop(tmp_path):
    """run_request equals euler with CFG over diffusers' transformer with ComfyUI's HunyuanDiT1 sampling written
    out here: "linear" betas 0.00085..0.03 (square roots spaced), v-prediction, the discrete timestep nearest in
    log sigma, the "simple" schedule, max-denoise noise scaling."""
    from xdit_core.models.hunyuandit import rotary

    model = build_tiny("hunyuandit", seed=5, weight_std=0.1, variant="v1.1").eval()
    model.save_pretrained(tmp_path / "h")
    adapter = make_adapter(*load_model(tmp_path / "h"))
    steps, rows, cols = 3, 8, 12
    request = family_request(adapter.spec, "hunyuan", steps=steps, rows=rows, cols=cols)
    ours = run_request(adapter, request)
    betas = torch.linspace(0.00085 ** 0.5, 0.03 ** 0.5, 1000, dtype=torch.float64) ** 2
    cumprod = torch.cumprod(1 - betas, dim=0)
    table = ((1 - cumprod) / cumprod).sqrt().float()
    sigmas = torch.tensor([float(table[-(1 + int(i * 1000 / steps))]) for i in range(steps)] + [0.0])
    x = torch.randn(1, 4, rows, cols, generator=torch.Generator().manual_seed(1)) * (1 + sigmas[0] ** 2).sqrt()
    meta = torch.tensor([[64.0, 96.0, 64.0, 96.0, 0.0, 0.0]])

    def predict(x, s, c):
        t = (s.log() - table.log()).abs().argmin().float().reshape(1)
        v = model(x / (s ** 2 + 1).sqrt(), t, encoder_hidden_states=c.text, text_embedding_mask=c.text_mask,
                  encoder_hidden_states_t5=c.text2, text_embedding_mask_t5=c.text2_mask, image_meta_size=meta,
                  style=torch.zeros(1, dtype=torch.long), image_rotary_emb=rotary(16, rows // 2, cols // 2),
                  return_dict=False)[0][:, :4]
        return x / (s ** 2 + 1) - v * s / (s ** 2 + 1).sqrt()

    x = euler_cfg(x, sigmas, request, predict)
    err = rel_err(ours, x)
    print(f"hunyuandit generate vs ComfyUI's v-prediction loop over diffusers: {err:.2e}")
    assert err <= TOL


def test_kontext_forward_equals_diffusers_forward():
    """FLUX.1 Kontext at degree 1: our Flux adapter with a reference latent (ComfyUI's default "offset": the first
    reference on axis 0 = 1 from row and column 0) is diffusers' FluxTransformer2DModel.forward with the reference's
    packed tokens after the image's and FluxKontextPipeline's ids (image_ids[..., 0] = 1), bit for bit."""
    from xdit_core.models.latent_formats import flux_image_ids

    model = build_tiny("flux", seed=2, weight_std=0.15, variant="dev").eval()
    adapter = make_adapter(model, resolve_model_spec(dict(model.config), family="flux"))
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 6, 10, generator=gen), torch.randn(1, 16, 4, 8, generator=gen)
    text, pooled = torch.randn(1, TEXT, 32, generator=gen), torch.randn(1, 32, generator=gen)
    ref_ids = flux_image_ids(4, 8)
    ref_ids[:, 0] = 1
    with torch.no_grad():
        ours = adapter.predict(x, torch.tensor([0.6]), BranchCond(text, pooled, references=(ref,)), 2.5)
        theirs = model(hidden_states=torch.cat([pack_flux(x), pack_flux(ref)], dim=1), encoder_hidden_states=text,
                       pooled_projections=pooled, timestep=torch.tensor([0.6]), guidance=torch.tensor([2.5]),
                       img_ids=torch.cat([flux_image_ids(6, 10), ref_ids]), txt_ids=torch.zeros(TEXT, 3),
                       return_dict=False)[0]
    assert torch.equal(ours, unpack_flux(theirs[:, :15], 6, 10))


def test_masked_lse_kernels_agree_and_an_empty_block_weighs_zero():
    """The masked kernel's two paths (PyTorch's CPU flash kernel with a bias; the explicit float32 product GPUs take)
    agree, and an item whose block has no valid key gets out 0 and LSE -inf, which the merge weighs zero."""
    from xdit_core.parallel.attention import _lse_masked, _merge, lse_masked_explicit

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 5])
    out, lse = _lse_masked(q, k, v, 0.3, mask)
    ref_out, ref_lse = lse_masked_explicit(q, k, v, 0.3, mask)
    assert torch.allclose(out[:2], ref_out[:2], atol=1e-6) and torch.allclose(lse[:2], ref_lse[:2], atol=1e-5)
    assert not out[2].any() and torch.isneginf(lse[2]).all()
    full = torch.nn.functional.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=mask[:2, None, None], scale=0.3)
    assert torch.allclose(out[:2], full, atol=1e-6)
    other_out, other_lse = lse_masked_explicit(q, v, k, 0.3, torch.ones(3, 5, dtype=torch.bool))
    merged, merged_lse = _merge((out, lse), other_out, other_lse)
    assert torch.allclose(merged[2], other_out[2], atol=1e-6) and torch.isfinite(merged).all()
    both, both_lse = _merge((out, lse), out, lse, masked=True)  # no key for item 2 in either block
    assert not both[2].any() and torch.isneginf(both_lse[2]).all() and torch.isfinite(both).all()


def test_kontext_generate_equals_a_loop_over_the_diffusers_transformer(tmp_path):
    """run_request for FLUX.1 Kontext equals euler with CFG over diffusers' FluxTransformer2DModel: ComfyUI's Flux dev
    sigmas (ModelSamplingFlux 1.15), guidance 3.5, the positive's reference at its "offset" place (axis 0 = 1), the
    negative's two by "index" (axis 0 = 1, 2), their packed tokens after the image's."""
    from xdit_core.models.latent_formats import flux_image_ids

    model = build_tiny("flux", seed=5, weight_std=0.1, variant="dev").eval()
    model.save_pretrained(tmp_path / "k")
    adapter = make_adapter(*load_model(tmp_path / "k"))
    steps = 3
    request = family_request(adapter.spec, "edit", steps=steps)
    ours = run_request(adapter, request)
    sigmas = comfy_flux_sigmas(1.15, steps).float()
    x = sigmas[0] * torch.randn(1, 16, ROWS, COLS, generator=torch.Generator().manual_seed(1))
    n = (ROWS // 2) * (COLS // 2)

    def predict(x, s, c):
        ids = [flux_image_ids(ROWS, COLS)]
        for k, r in enumerate(c.references):
            ref_ids = flux_image_ids(*r.shape[-2:])
            ref_ids[:, 0] = k + 1
            ids.append(ref_ids)
        out = model(hidden_states=torch.cat([pack_flux(v) for v in [x, *c.references]], dim=1),
                    encoder_hidden_states=c.text, pooled_projections=c.pooled, timestep=s.reshape(1),
                    guidance=torch.tensor([3.5]), img_ids=torch.cat(ids), txt_ids=torch.zeros(TEXT, 3),
                    return_dict=False)[0]
        return x - unpack_flux(out[:, :n], ROWS, COLS) * s

    x = euler_cfg(x, sigmas, request, predict)
    err = rel_err(ours, x)
    print(f"kontext generate vs loop over diffusers: {err:.2e}")
    assert err <= TOL
