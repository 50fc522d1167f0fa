"""Sampling equals ComfyUI's: fixtures come from ComfyUI's own code (tests/fixtures/make_comfyui_fixtures.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xdit_core.sampling import samplers as sampling
from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import resolve_model_spec

FIXTURES = Path(__file__).parent / "fixtures"
REF = json.loads((FIXTURES / "comfyui_reference.json").read_text())

CONFIGS = {
    "flux_dev": {"_class_name": "FluxTransformer2DModel", "guidance_embeds": True, "joint_attention_dim": 8,
                 "pooled_projection_dim": 8},
    "flux_schnell": {"_class_name": "FluxTransformer2DModel", "guidance_embeds": False, "joint_attention_dim": 8,
                     "pooled_projection_dim": 8},
    "sd3": {"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 8, "pooled_projection_dim": 8},
    "pixart": {"_class_name": "PixArtTransformer2DModel", "caption_channels": 8},
}


def ms_of(family):
    return resolve_model_spec(CONFIGS[family]).model_sampling()


def assert_close_rel(ours, ref, rtol=1e-6):
    ref = torch.tensor(ref, dtype=torch.float64)
    ours = ours.double()
    assert ours.shape == ref.shape, (ours.tolist(), ref.tolist())
    assert torch.allclose(ours, ref, rtol=rtol, atol=1e-12), (ours.tolist(), ref.tolist())


@pytest.mark.parametrize("key", sorted(REF["sigmas"]))
def test_sigma_tables_equal_comfyui(key):
    family, scheduler, steps = key.split("/")
    assert_close_rel(sampling.calculate_sigmas(ms_of(family), scheduler, int(steps)), REF["sigmas"][key])


@pytest.mark.parametrize("key", sorted(REF["denoise_sigmas"]))
def test_denoise_truncation_equals_comfyui(key):
    family, scheduler, steps, denoise = key.split("/")
    ours = sampling.calculate_sigmas(ms_of(family), scheduler, int(steps), float(denoise))
    assert_close_rel(ours, REF["denoise_sigmas"][key])


def toy_denoised(x, sigma):
    """The same stand-in model as the fixture script."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * x / (1.0 + s) + 0.1 * torch.sin(3.0 * x)


@pytest.mark.parametrize("key", sorted(REF["samplers"]))
def test_sampler_trajectory_equals_comfyui(key):
    family, name = key.split("/")
    case = REF["samplers"][key]
    ms = ms_of(family)
    noise, latent = torch.tensor(case["noise"]), torch.tensor(case["latent"])
    sigmas = sampling.calculate_sigmas(ms, "normal", len(case["sigmas"]) - 1)
    x = ms.noise_scaling(sigmas[0], noise, latent, sampling.is_max_denoise(ms, sigmas))
    out = sampling.run_sampler(name, ms, x, sigmas, toy_denoised, seed=case["seed"])
    out = ms.inverse_noise_scaling(sigmas[-1], out)
    ref = torch.tensor(case["out"])
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()


def _one_step_reference(name, x, s0, s1, den, prediction):
    """Hand-written formulas of one step from sigma s0 to s1 (no history, no noise at s1 = 0)."""
    d = (x - den) / s0
    if name == "euler":
        return x + d * (s1 - s0)
    if name == "heun":  # second evaluation at s1 with the toy model
        x2 = x + d * (s1 - s0)
        d2 = (x2 - toy_denoised(x2, torch.tensor(s1))) / s1
        return x + (d + d2) / 2 * (s1 - s0)
    if name == "dpmpp_2m":  # first step: x * s1/s0 - (exp(-h) - 1) * den, h = log(s0/s1)
        h = torch.log(torch.tensor(s0 / s1))
        return (s1 / s0) * x - torch.expm1(-h) * den
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_one_step_matches_hand_computed(name):
    x = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    sigmas = torch.tensor([0.8, 0.5, 0.0])
    ms = ms_of("sd3")
    ours = sampling.Sampler(name, ms, seed=0).step(0, x, sigmas, toy_denoised)
    ref = _one_step_reference(name, x, 0.8, 0.5, toy_denoised(x, torch.tensor(0.8)), ms.prediction)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_euler_ancestral_last_step_returns_denoised():
    x = torch.randn(1, 4, 2, 2)
    for fam in ("sd3", "pixart"):
        out = sampling.Sampler("euler_ancestral", ms_of(fam), 0).step(0, x, torch.tensor([0.5, 0.0]), toy_denoised)
        assert torch.equal(out, toy_denoised(x, torch.tensor(0.5)))


@pytest.mark.parametrize("seed", [0, 42, 123456789])
def test_noise_equals_prepare_noise(seed):
    ref = load_file(str(FIXTURES / "comfyui_noise.safetensors"))
    latent = torch.zeros(2, 16, 8, 6)
    assert torch.equal(sampling.prepare_noise(latent, seed), ref[f"seed{seed}"])
    assert torch.equal(sampling.prepare_noise(latent, seed, [3, 1]), ref[f"seed{seed}_batch_index"])


def test_fix_empty_latent_channels():
    assert sampling.fix_empty_latent_channels(torch.zeros(2, 4, 8, 8), 16).shape == (2, 16, 8, 8)
    nonzero = torch.ones(1, 4, 8, 8)
    assert sampling.fix_empty_latent_channels(nonzero, 16) is nonzero


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sampler="lms", scheduler="simple", steps=4, denoise=1.0), "valid samplers: euler"),
    (dict(sampler="euler", scheduler="foo", steps=4, denoise=1.0), "valid schedulers: simple"),
    (dict(sampler="euler", scheduler="simple", steps=0, denoise=1.0), "steps must be at least 1"),
    (dict(sampler="euler", scheduler="simple", steps=4, denoise=0.0), "denoise must be in (0, 1]"),
    (dict(sampler="euler", scheduler="simple", steps=4, denoise=1.5), "denoise must be in (0, 1]"),
])
def test_bad_sampler_settings(kwargs, needle):
    with pytest.raises(XDiTConfigError, match=None) as e:
        sampling.validate_sampler_settings(**kwargs)
    assert needle in str(e.value)


def test_kl_optimal_at_one_step_is_refused_where_comfyui_returns_nan():
    with pytest.raises(XDiTConfigError, match="kl_optimal scheduler needs at least 2 steps"):
        sampling.calculate_sigmas(ms_of("flux_dev"), "kl_optimal", 1)
    assert torch.isfinite(sampling.calculate_sigmas(ms_of("flux_dev"), "kl_optimal", 2, 0.5)).all()  # 4 internally


def test_every_comfyui_scheduler_is_offered_and_checked_against_a_fixture():
    offered = set(sampling.SCHEDULERS)
    fixed = {key.split("/")[1] for key in REF["sigmas"]}
    assert offered == fixed == {"simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
                                "linear_quadratic", "kl_optimal"}
