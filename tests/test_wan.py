"""Wan 2.1 / 2.2 video: parallel parity, the adapter against diffusers' own forward, a full generate against a
sampling loop written here over the diffusers transformer, and the conditioning ComfyUI's Wan nodes produce.

The parallel cases run in the suite's shared spawned world (tests/conftest.py), on tiny random Wan models where
attention matters (test_parallel.WEIGHT_STD, q/k norms scaled), at 3 latent frames of 6 x 10: 45 tokens, which
neither 2 nor 4 divides (every split pads).
"""
from dataclasses import replace

import pytest
import torch

from xdit_core.cli.tiny import build_tiny
from xdit_core.errors import XDiTConditioningError, XDiTConfigError
from xdit_core.loading.load import load_model
from xdit_core.models import latent_formats, make_adapter
from xdit_core.models.base import BranchCond
from xdit_core.models.families import resolve_model_spec
from xdit_core.models.wan import I2V_TEXT_TOKENS, image_concat
from xdit_core.parallel.mesh import ParallelConfig, validate_parallel_config
from xdit_core.runtime.job import run_request
from xdit_core.sampling.request import build_request

from test_parallel import CFG, STEPS, TOL, MUTATION_FACTOR, rel_err, write_model

VARIANTS = ("t2v", "i2v", "ti2v")
FRAMES, ROWS, COLS = 3, 6, 10  # latent: 3 x 3 x 5 = 45 tokens after the 2x2 patches
CONFIGS = {
    "u2": ParallelConfig(ulysses_degree=2),
    "u4": ParallelConfig(ulysses_degree=4),
    "r2": ParallelConfig(ring_degree=2),
    "u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg_u2": ParallelConfig(ulysses_degree=2, use_cfg_parallel=True),
}
# Negative controls in the same world (parallel_world.MUTATIONS): each must move the output >= MUTATION_FACTOR x TOL.
NEGATIVE = [("t2v", "r2", "ring_skip"), ("t2v", "u2", "a2a_roll"), ("t2v", "u2", "unmasked_padding"),
            ("ti2v", "u2", "timestep_shard")]


def wan_inputs(spec, seed=0):
    """(latent, noise_mask, positive, negative) as ComfyUI's Wan nodes give them for this variant: T2V an empty
    latent; I2V (Wan 2.1, CLIP vision) WanImageToVideo's start image latent and mask, 512 text tokens; TI2V 5B
    Wan22ImageToVideoLatent's latent with the encoded start frame and a noise_mask zero on it."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, spec.latent_channels, FRAMES, ROWS, COLS)
    text_len = I2V_TEXT_TOKENS if spec.image_dim else 7
    branches = [BranchCond(torch.randn(1, text_len, spec.text_dim, generator=gen)) for _ in range(2)]
    latent, mask = torch.zeros(shape), None
    if spec.variant == "i2v":
        image_latent = torch.randn(1, 16, FRAMES, ROWS, COLS, generator=gen)
        concat_mask = torch.ones(1, 1, FRAMES, ROWS, COLS)
        concat_mask[:, :, 0] = 0.0
        concat = image_concat(spec, shape, image_latent, concat_mask)
        clip = torch.randn(1, 5, spec.image_dim, generator=gen)
        branches = [replace(b, image=clip, concat=concat) for b in branches]
    if spec.variant == "ti2v":
        start = torch.zeros(shape)
        start[:, :, 0] = torch.randn(1, spec.latent_channels, ROWS, COLS, generator=gen)
        mask = torch.ones(1, 1, FRAMES, ROWS, COLS)
        mask[:, :, 0] = 0.0
        latent = latent_formats.WAN22.process_out(start) * mask + start * (1.0 - mask)
    return latent, mask, branches[0], branches[1]


def wan_request(spec, steps=STEPS, cfg=CFG):
    latent, mask, positive, negative = wan_inputs(spec)
    return build_request(spec, latent, seed=1, steps=steps, cfg=cfg, sampler="euler", scheduler="simple",
                         denoise=1.0, positive=positive, negative=negative, noise_mask=mask)


def world_payload(root):
    """The cases this module adds to the shared spawned world, and their serial references."""
    cases, refs = [], {}
    for variant in VARIANTS:
        path = write_model("wan", root / variant, variant=variant)
        adapter = make_adapter(*load_model(path))
        request = wan_request(adapter.spec)
        refs[("wan", variant)] = run_request(adapter, request)
        for name, config in CONFIGS.items():
            cases.append((f"wan/{variant}/{name}", str(path), config, "p2p", request))
        for v, name, mutation in NEGATIVE:
            if v == variant:
                cases.append((f"wan/{variant}/{name}@{mutation}", str(path), CONFIGS[name], "p2p", request))
    return cases, refs


@pytest.fixture(scope="module")
def world(spawned_world):
    return spawned_world["per_rank"][0]["parallel"], spawned_world["refs"]


@pytest.mark.parametrize("variant,config", [(v, c) for v in VARIANTS for c in CONFIGS])
def test_wan_parallel_equals_serial(world, variant, config):
    results, refs = world
    err = rel_err(results[f"wan/{variant}/{config}"]["out"], refs[("wan", variant)])
    print(f"parity wan {variant:5s} {config:7s} max|d|/max|ref| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("variant,config,mutation", NEGATIVE)
def test_wan_negative_control_is_caught(world, variant, config, mutation):
    results, refs = world
    err = rel_err(results[f"wan/{variant}/{config}@{mutation}"]["out"], refs[("wan", variant)])
    print(f"negative control wan {variant:5s} {config:4s} {mutation:16s} max|d|/max|ref| = {err:.2e}")
    assert err >= MUTATION_FACTOR * TOL


@pytest.fixture(scope="module")
def tiny_wans():
    return {v: build_tiny("wan", seed=3, weight_std=0.1, variant=v) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_forward_equals_diffusers_forward(tiny_wans, variant):
    """Degree 1: our embed -> blocks -> head is diffusers' WanTransformer3DModel.forward, bit for bit (per-frame
    timesteps of the 5B expanded to its tokens, I2V's extra channels concatenated to the input)."""
    model = tiny_wans[variant]
    spec = resolve_model_spec(dict(model.config, _class_name="WanTransformer3DModel"))
    latent, mask, positive, _ = wan_inputs(spec)
    x = torch.randn(1, spec.latent_channels, FRAMES, ROWS, COLS)
    timestep = spec.model_timestep(torch.tensor([640.0]), None if mask is None else mask.expand_as(x))
    with torch.no_grad():
        ours = make_adapter(model, spec).predict(x, timestep, positive, None)
        x_in = x if positive.concat is None else torch.cat([x, positive.concat], dim=1)
        t_in = timestep if timestep.ndim == 1 else timestep.repeat_interleave((ROWS // 2) * (COLS // 2), dim=1)
        theirs = model(x_in, t_in, positive.text, encoder_hidden_states_image=positive.image).sample
    assert torch.equal(ours, theirs)
    if variant == "ti2v":  # the start frame runs at timestep 0, the others at 640
        assert timestep.tolist() == [[0.0, 640.0, 640.0]]


def comfy_flow_sigmas(shift, steps):
    """ComfyUI's ModelSamplingDiscreteFlow (multiplier 1000) with the "simple" scheduler, written out here."""
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


@pytest.mark.parametrize("variant", ("t2v", "ti2v"))
def test_generate_equals_a_loop_over_the_diffusers_transformer(tmp_path, variant):
    """run_request (the engine's serial loop) equals euler with CFG over diffusers' transformer, with ComfyUI's
    sigmas, noise and latent format; for the 5B its start frame stays the clean latent and runs at timestep 0."""
    model = build_tiny("wan", seed=5, weight_std=0.1, variant=variant)
    model.save_pretrained(tmp_path / variant)
    adapter = make_adapter(*load_model(tmp_path / variant))
    spec = adapter.spec
    steps, cfg = 3, 5.0
    latent, mask, positive, negative = wan_inputs(spec)
    request = build_request(spec, latent, seed=11, steps=steps, cfg=cfg, sampler="euler", scheduler="simple",
                            denoise=1.0, positive=positive, negative=negative, noise_mask=mask)
    ours = run_request(adapter, request)

    sigmas = comfy_flow_sigmas(8.0, steps).float()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(11))
    clean = spec.latent_format.process_in(latent) if latent.any() else latent
    keep = torch.ones_like(clean) if mask is None else mask.expand_as(clean)
    x = sigmas[0] * noise + (1 - sigmas[0]) * clean
    for i in range(steps):
        s = sigmas[i]
        x_in = x * keep + clean * (1 - keep)
        if mask is None:
            t = (s * 1000).reshape(1)
        else:  # WAN22.process_timestep: the mask's share per frame, then each frame's tokens
            t = (keep.mean(dim=(1, 3, 4)) * s * 1000).repeat_interleave((ROWS // 2) * (COLS // 2), dim=1)
        with torch.no_grad():
            cond, uncond = (x_in - model(x_in, t, c.text).sample * s for c in (positive, negative))
        denoised = (uncond + (cond - uncond) * cfg) * keep + clean * (1 - keep)
        x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    err = rel_err(ours, x)
    print(f"wan {variant} generate vs loop over diffusers: {err:.2e}")
    assert err <= TOL


def test_i2v_concat_is_comfyuis():
    """WAN21.concat_cond: 4 channels of 1 - mask (the start frames 1), then the image latent in model space; no
    start image: zeros; a latent of another size is refused, not resized silently."""
    spec = resolve_model_spec({"_class_name": "WanTransformer3DModel", "in_channels": 36, "text_dim": 8,
                               "num_attention_heads": 1, "num_layers": 1})
    shape = (2, 16, 3, 4, 6)
    image = torch.randn(1, 16, 3, 4, 6)
    mask = torch.ones(1, 1, 2, 4, 6)
    mask[:, :, 0] = 0
    concat = image_concat(spec, shape, image, mask)
    assert concat.shape == (2, 20, 3, 4, 6)
    assert torch.equal(concat[:, :4, 0], torch.ones(2, 4, 4, 6)) and not concat[:, :4, 1:].any()
    assert torch.equal(concat[1, 4:], latent_formats.WAN21.process_in(image)[0])
    assert not image_concat(spec, shape, None, None).any()
    with pytest.raises(XDiTConditioningError, match="concat_latent_image has shape"):
        image_concat(spec, shape, torch.randn(1, 16, 3, 8, 12), mask)


def test_wan_requests_check_their_inputs():
    spec = resolve_model_spec({"_class_name": "WanTransformer3DModel", "in_channels": 36, "text_dim": 8,
                               "image_dim": 4, "num_attention_heads": 1, "num_layers": 1})
    text = torch.randn(1, I2V_TEXT_TOKENS, 8)
    args = dict(seed=0, steps=2, cfg=1.0, sampler="euler", scheduler="simple", denoise=1.0, negative=None)
    with pytest.raises(XDiTConditioningError, match="needs CLIP vision states"):
        build_request(spec, torch.zeros(1, 16, 2, 4, 4), positive=BranchCond(text), **args)
    with pytest.raises(XDiTConditioningError, match="exactly 512 text tokens"):
        build_request(spec, torch.zeros(1, 16, 2, 4, 4), positive=BranchCond(text[:, :9], image=torch.randn(1, 3, 4)),
                      **args)
    request = build_request(spec, torch.zeros(1, 16, 4, 4), positive=BranchCond(text, image=torch.randn(1, 3, 4)),
                            **args)  # an image latent is one frame; no start image: zero extra channels
    assert request.noise.shape == (1, 16, 1, 4, 4) and not request.positive.concat.any()
    assert request.positive.concat.shape == (1, 20, 1, 4, 4)
    batch = build_request(spec, torch.zeros(2, 16, 2, 4, 4), positive=BranchCond(text.expand(2, -1, -1),
                                                                                image=torch.randn(1, 3, 4)), **args)
    assert batch.positive.image.shape == (2, 3, 4) and batch.positive.concat.shape == (2, 20, 2, 4, 4)
    with pytest.raises(XDiTConfigError, match="PipeFusion does not run video models"):
        validate_parallel_config(ParallelConfig(pipefusion_parallel_degree=2), video=True)


def test_wan_22_5b_sizes_follow_its_16x_vae():
    spec = resolve_model_spec({"_class_name": "WanTransformer3DModel", "in_channels": 48, "out_channels": 48,
                               "text_dim": 8, "num_attention_heads": 1, "num_layers": 1})
    assert (spec.variant, spec.latent_format.name, spec.pixel_multiple) == ("ti2v", "Wan22", 32)
    request = build_request(spec, torch.zeros(1, 48, 2, 4, 6), seed=0, steps=2, cfg=1.0, sampler="euler",
                            scheduler="simple", denoise=1.0, positive=BranchCond(torch.randn(1, 3, 8)), negative=None)
    assert (request.height, request.width) == (64, 96)
    with pytest.raises(XDiTConfigError, match="not a multiple of 32"):
        build_request(spec, torch.zeros(1, 48, 2, 3, 6), seed=0, steps=2, cfg=1.0, sampler="euler",
                      scheduler="simple", denoise=1.0, positive=BranchCond(torch.randn(1, 3, 8)), negative=None)


class ClipVisionOutput:
    """What ComfyUI's CLIP Vision Encode gives WanImageToVideo (the engine reads the penultimate states)."""

    def __init__(self, states):
        self.penultimate_hidden_states = states


def test_two_expert_i2v_on_the_warm_pool_equals_the_engine(tmp_path, monkeypatch):
    """Wan 2.2 A14B I2V as ComfyUI's template runs it: WanImageToVideo's conditioning and LATENT into two xDiT
    Sampler (Advanced) nodes, the high-noise expert for steps 0-2 with leftover noise, then the low-noise expert
    for 2-4, both resident on one Ulysses-2 pool; equal to the engine run serially with the same experts."""
    import ray

    from nodes.loader import XDiTLoadModel
    from nodes.mesh import XDiTParallelMesh
    from nodes.sampler import XDiTSamplerAdvanced
    from xdit_core.runtime import pool
    from xdit_core.sampling.request import StepRange

    monkeypatch.setenv("XDIT_ALLOW_ABSOLUTE_MODEL_PATHS", "1")
    experts = []
    for name, seed in (("high", 1), ("low", 2)):
        build_tiny("wan", seed=seed, weight_std=0.1, variant="i2v", clip_vision=False).save_pretrained(tmp_path / name)
        experts.append(XDiTLoadModel().load(str(tmp_path / name), "fp32", "auto", "auto")[0])
    gen = torch.Generator().manual_seed(3)
    image_latent = torch.randn(1, 16, FRAMES, ROWS, COLS, generator=gen)
    mask = torch.ones(1, 1, FRAMES, ROWS, COLS)
    mask[:, :, 0] = 0.0
    keys = {"pooled_output": None, "concat_latent_image": image_latent, "concat_mask": mask}
    texts = [torch.randn(1, 9, 32, generator=gen) for _ in range(2)]
    positive, negative = ([[t, dict(keys)]] for t in texts)
    latent = {"samples": torch.zeros(1, 16, FRAMES, ROWS, COLS)}
    mesh = XDiTParallelMesh().build("manual", 2, 1, 1, False, 0, 1, 0)[0]
    common = dict(mesh=mesh, noise_seed=5, steps=4, cfg=3.5, sampler_name="euler", scheduler="simple",
                  positive=positive, negative=negative, shift=0.0)
    try:
        (first,) = XDiTSamplerAdvanced().sample(model=experts[0], add_noise="enable", latent_image=latent,
                                                start_at_step=0, end_at_step=2, return_with_leftover_noise="enable",
                                                **common)
        (second,) = XDiTSamplerAdvanced().sample(model=experts[1], add_noise="disable", latent_image=first,
                                                 start_at_step=2, end_at_step=10000,
                                                 return_with_leftover_noise="disable", **common)
    finally:
        pool.unload()
        ray.shutdown()

    out = latent["samples"]
    for expert, steps_range in ((experts[0], StepRange(True, 0, 2, True)), (experts[1], StepRange(False, 2))):
        adapter = make_adapter(*load_model(expert.path))
        spec = adapter.spec
        concat = image_concat(spec, out.shape, image_latent, mask)
        request = build_request(spec, out, seed=5, steps=4, cfg=3.5, sampler="euler", scheduler="simple",
                                denoise=1.0, positive=BranchCond(texts[0], concat=concat),
                                negative=BranchCond(texts[1], concat=concat), steps_range=steps_range)
        out = spec.latent_format.process_out(run_request(adapter, request))
    assert second["samples"].shape == (1, 16, FRAMES, ROWS, COLS)
    err = rel_err(second["samples"], out)
    print(f"wan two-expert I2V on the pool (Ulysses 2) vs the engine serially: {err:.2e}")
    assert err <= TOL


AIO = "model.diffusion_model."


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_i2v")
    # 128-wide heads: an original file's heads are its width // 128, as ComfyUI's detection has them
    build_tiny("wan", seed=4, variant="i2v", heads=2, hidden_size=256).save_pretrained(folder)
    return folder


def test_original_layout_files_load_to_the_folders_parameters(i2v_folder, tmp_path):
    """Wan-AI's names (as Comfy-Org's repackaged files keep them), bare and under ComfyUI's checkpoint prefix, in
    bf16: equal to the folder's parameters cast to bf16; the config is inferred from the shapes."""
    from safetensors.torch import save_file

    from xdit_core.loading.key_mapping import model_tensors, to_original

    reference, spec = load_model(i2v_folder, "bf16")
    original = to_original("wan", model_tensors(load_model(i2v_folder)[0]))
    assert "blocks.0.cross_attn.k_img.weight" in original and "head.modulation" in original
    for prefix in ("", AIO):
        path = tmp_path / f"wan{len(prefix)}.safetensors"
        save_file({prefix + k: v.to(torch.bfloat16).contiguous() for k, v in original.items()}, str(path))
        model, file_spec = load_model(path, "bf16")
        assert file_spec == spec
        ours, theirs = model_tensors(model), model_tensors(reference)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_scaled_fp8_file_loads_to_the_dequantised_weights(i2v_folder, tmp_path):
    """ComfyUI's scaled fp8 (Comfy-Org's *_fp8_scaled.safetensors): each fp8 weight times its scale_weight."""
    from safetensors.torch import save_file

    from xdit_core.loading.key_mapping import model_tensors, to_original

    original = to_original("wan", model_tensors(load_model(i2v_folder)[0]))
    stored, expected = {AIO + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in original.items():
        if v.dim() == 2:
            scale = v.abs().max() / 448
            q = (v / scale).to(torch.float8_e4m3fn)
            stored[AIO + k], stored[AIO + k[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            expected[k] = q.float() * scale
        else:
            stored[AIO + k] = expected[k] = v
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp_path / "fp8.safetensors"))
    model, _ = load_model(tmp_path / "fp8.safetensors")
    loaded = to_original("wan", model_tensors(model))
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_our_reverse_names_are_diffusers_converters_inverse():
    """Loading follows diffusers' convert_wan_transformer_to_diffusers; our reverse table (for writing files)
    must be its exact inverse on every real model's tensors."""
    from xdit_core.loading.key_mapping import COMPUTED, model_tensors, to_original
    from xdit_core.loading.original_layout import shipped_configs
    from xdit_core.loading.wan_layout import diffusers_names
    from xdit_core.models.families import model_class

    for stem, config in shipped_configs().items():
        if config["_class_name"] != "WanTransformer3DModel":
            continue
        with torch.device("meta"):
            tensors = {k: v for k, v in model_tensors(model_class("wan").from_config(config)).items()
                       if k not in COMPUTED["wan"]}
        names = diffusers_names(list(to_original("wan", tensors)))
        assert sorted(names.values()) == sorted(tensors), stem


@pytest.mark.parametrize("layout", ["comfyui", "kohya", "peft"])
def test_wan_lora_hooked_at_run_time_equals_it_merged(i2v_folder, tmp_path, layout):
    """Wan LoRAs as trainers and ComfyUI write them (original names under diffusion_model., kohya's, PEFT's)."""
    from lora_files import make_lora, save_lora, write_merged
    from xdit_core.loading.lora import load_lora
    from xdit_core.models.lora import apply_loras

    base, spec = load_model(i2v_folder)
    lora = make_lora("wan", base, layout, seed=1)
    weights = load_lora(str(save_lora(lora, tmp_path / "lora.safetensors")), "wan", base.state_dict())
    latent, mask, positive, _ = wan_inputs(spec)
    x = torch.randn(1, 16, FRAMES, ROWS, COLS)
    with torch.no_grad():
        with apply_loras(base, [(weights, 0.8)]):
            ours = make_adapter(base, spec).predict(x, torch.tensor([500.0]), positive, None)
        merged = make_adapter(*load_model(write_merged(tmp_path / "merged.safetensors", "wan", base, [(lora, 0.8)])))
        reference = merged.predict(x, torch.tensor([500.0]), positive, None)
    assert rel_err(ours, reference) <= TOL and rel_err(ours, make_adapter(base, spec).predict(
        x, torch.tensor([500.0]), positive, None)) > 100 * TOL
