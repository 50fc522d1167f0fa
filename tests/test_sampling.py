"""Sampling equals ComfyUI's: fixtures come from ComfyUI's own code (tests/fixtures/make_comfyui_fixtures.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xdit_core.sampling import samplers as sampling
from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import resolve_model_spec
from xdit_core.parallel.pipefusion import pipefusion_rounds
from xdit_core.sampling.noise import BrownianNoise

# torchsde rounds a Brownian tree's ends to 6 decimals and clamps a query at sigma_min or sigma_max just outside
# them, with a warning each time (ComfyUI's trees do the same).
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
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


@pytest.mark.parametrize("key", sorted(REF["discard_sigmas"]))
def test_discard_penultimate_sigma_samplers_equal_ksampler(key):
    """uni_pc's schedules: one step more, the penultimate sigma dropped, then a partial denoise's tail."""
    family, sampler, scheduler, steps, denoise = key.split("/")
    ours = sampling.calculate_sigmas(ms_of(family), scheduler, int(steps), float(denoise), sampler)
    assert_close_rel(ours, REF["discard_sigmas"][key])


def test_discard_penultimate_sigma_drops_exactly_that_sigma():
    ms = ms_of("sd3")
    longer = sampling.calculate_sigmas(ms, "normal", 5)
    ours = sampling.calculate_sigmas(ms, "normal", 4, sampler="uni_pc")
    assert torch.equal(ours, torch.cat([longer[:-2], longer[-1:]]))
    assert torch.equal(sampling.calculate_sigmas(ms, "normal", 4, sampler="deis"),
                       sampling.calculate_sigmas(ms, "normal", 4))


# ComfyUI's fixtures move with the machine's float rounding (here and in test_advanced.py). The SDE samplers' Brownian
# tree bisects its interval on float comparisons: regenerated on an AVX-512 machine with torch 2.14, ComfyUI's
# advanced flux_dev/dpmpp_sde/split differs from its fixture by up to 1.9e-3 (of max 19.3), while ours equals the
# regenerated output bit for bit. The other samplers move by rounding alone, up to 2.7e-5 (pixart/uni_pc), ours
# again equal to the regenerated ones (flux_dev/deis/mask: 3.3e-6 from the fixture, 0.0 from ComfyUI on the same
# machine): hence an absolute tolerance of 1e-5 besides. A wrong sampler or noise moves these outputs by O(1).
SDE_ATOL = 5e-3


@pytest.mark.parametrize("key", sorted(REF["samplers"]))
def test_sampler_trajectory_equals_comfyui(key):
    family, name = key.split("/")
    case = REF["samplers"][key]
    ms = ms_of(family)
    noise, latent = torch.tensor(case["noise"]), torch.tensor(case["latent"])
    sigmas = sampling.calculate_sigmas(ms, "normal", len(case["sigmas"]) - 1, sampler=name)
    assert_close_rel(sigmas, case["sigmas"])
    x = ms.noise_scaling(sigmas[0], noise, latent, sampling.is_max_denoise(ms, sigmas))
    out = sampling.run_sampler(name, ms, x, sigmas, toy_denoised, seed=case["seed"])
    out = ms.inverse_noise_scaling(sigmas[-1], out)
    ref = torch.tensor(case["out"])
    assert torch.allclose(out, ref, rtol=1e-5, atol=SDE_ATOL if name.endswith("_sde") else 1e-5), \
        (out - ref).abs().max()


def _one_step_reference(name, x, s0, s1, den, prediction):
    """Hand-written formulas of one step from sigma s0 to s1 (no history, no noise at s1 = 0)."""
    d = (x - den) / s0
    if name in ("euler", "res_multistep", "deis"):  # the multistep ones start with an Euler step
        return x + d * (s1 - s0)
    if name == "heun":  # second evaluation at s1 with the toy model
        x2 = x + d * (s1 - s0)
        d2 = (x2 - toy_denoised(x2, torch.tensor(s1))) / s1
        return x + (d + d2) / 2 * (s1 - s0)
    if name == "dpmpp_2m":  # first step: x * s1/s0 - (exp(-h) - 1) * den, h = log(s0/s1)
        h = torch.log(torch.tensor(s0 / s1))
        return (s1 / s0) * x - torch.expm1(-h) * den
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "res_multistep", "deis"])
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


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_uni_pc_at_one_step_returns_its_scaled_input_as_comfyui(family):
    """ComfyUI's UniPC at one step has order 0: it evaluates the model but returns x / sqrt(1 + sigma_0^2) /
    alpha(0.001), and KSampler's inverse noise scaling at 0.001 (written into the schedule) follows."""
    ms = ms_of(family)
    x, sigmas = torch.randn(1, 4, 2, 2), torch.tensor([0.8, 0.0])
    calls = []
    out = sampling.Sampler("uni_pc", ms, 0).step(0, x, sigmas, lambda *a: calls.append(a) or toy_denoised(*a))
    final = torch.tensor(0.001)
    ref = x / torch.sqrt(1.0 + sigmas[0] ** 2.0) / torch.exp(0.5 * torch.log(1 / (final * final + 1)))
    ref = ref / (1.0 - final) if family == "sd3" else ref
    assert len(calls) == 1 and torch.equal(out, ref)


SEED = 123


def run_in_patches(name, ms, x, sigmas, rows, shared_noise=True):
    """PipeFusion's sampling without processes: one Sampler per patch of rows, stepped one model evaluation
    at a time in PipeFusion's rounds, each patch taking its rows of one noise source over the whole latent
    (or, with shared_noise False, drawing its own). The toy model is elementwise, so a patch's prediction is
    the whole latent's rows."""
    noise = sampling.make_noise(name, SEED, x, sigmas)
    samplers = [sampling.Sampler(name, ms, SEED, noise=noise.rows(r0, r1) if shared_noise else None)
                for r0, r1 in rows]
    xs = [x[:, :, r0:r1] for r0, r1 in rows]
    rounds = pipefusion_rounds(name, ms, sigmas)
    for i in range(len(sigmas) - 1):
        gens = [s.step_gen(i, xm, sigmas) for s, xm in zip(samplers, xs)]
        asks = [next(g) for g in gens]
        for _, sigma, _ in (r for r in rounds if r[0] == i):
            for k, gen in enumerate(gens):
                assert torch.equal(asks[k][1], sigma)  # what PipeFusion checks: the schedule is the sampler's
                try:
                    asks[k] = gen.send(toy_denoised(*asks[k]))
                except StopIteration as done:
                    xs[k] = done.value
    return torch.cat(xs, dim=2)


NOISY = ("euler_ancestral", "lcm", "dpmpp_sde", "dpmpp_2m_sde")


@pytest.mark.parametrize("family", ["sd3", "pixart"])
@pytest.mark.parametrize("name", sampling.SAMPLERS)
def test_patches_with_their_rows_of_the_noise_equal_the_whole_latent(family, name):
    """Per-patch state (history, uni_pc's corrector, deis's coefficients) and the shared noise's rows make
    PipeFusion's patches sample exactly the serial latent; patches drawing their own noise do not."""
    ms = ms_of(family)
    x = torch.randn(2, 4, 6, 4, generator=torch.Generator().manual_seed(3))
    sigmas = sampling.calculate_sigmas(ms, "normal", 6, sampler=name)
    x = ms.noise_scaling(sigmas[0], x, torch.zeros_like(x), sampling.is_max_denoise(ms, sigmas))
    serial = sampling.run_sampler(name, ms, x, sigmas, toy_denoised, SEED)
    rows = [(0, 2), (2, 6)]
    assert torch.equal(run_in_patches(name, ms, x, sigmas, rows), serial)
    if name in NOISY:
        assert not torch.allclose(run_in_patches(name, ms, x, sigmas, rows, shared_noise=False), serial, atol=1e-3)


def test_brownian_noise_rows_are_the_whole_latents_rows():
    """A patch's Brownian noise is its rows of the one tree over the whole latent: equal to a separate
    whole-latent tree's rows at every interval; a tree over the patch's own shape gives other noise."""
    shape, lo, hi = (2, 4, 6, 4), torch.tensor(0.05), torch.tensor(0.9)
    shared, whole = BrownianNoise(SEED, shape, lo, hi), BrownianNoise(SEED, shape, lo, hi)
    own = BrownianNoise(SEED, (2, 4, 4, 4), lo, hi)
    patch = shared.rows(2, 6)
    for step, (s, s_next) in enumerate([(0.9, 0.6), (0.6, 0.3), (0.3, 0.05)]):
        s, s_next = torch.tensor(s), torch.tensor(s_next)
        rows = patch(step, s, s_next)
        assert torch.equal(rows, whole(step, s, s_next)[:, :, 2:6])
        assert not torch.allclose(rows, own(step, s, s_next), atol=1e-2)


@pytest.mark.parametrize("seed", [0, 123])
def test_brownian_noise_equals_comfyuis_brownian_tree_noise_sampler(seed):
    ref = load_file(str(FIXTURES / "comfyui_noise.safetensors"))[f"brownian_seed{seed}"]
    noise = BrownianNoise(seed, (2, 4, 6, 4), torch.tensor(0.02), torch.tensor(0.9))
    queries = [(0.9, 0.5), (0.5, 0.25), (0.25, 0.5), (0.9, 0.02)]  # as the fixture script's
    ours = torch.stack([noise(k, torch.tensor(a), torch.tensor(b)) for k, (a, b) in enumerate(queries)])
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family,first_below_one", [("sd3", True), ("pixart", False)])
def test_pipefusion_rounds_follow_the_samplers_evaluations(family, first_below_one):
    """dpmpp_sde evaluates twice per step but on the step to 0; on a flow model its first sigma 1 moves below
    1 (ComfyUI's offset for the half-log-SNR), and PipeFusion's rounds carry that sigma."""
    ms = ms_of(family)
    sigmas = sampling.calculate_sigmas(ms, "normal", 4)
    rounds = pipefusion_rounds("dpmpp_sde", ms, sigmas)
    assert [(i, last) for i, _, last in rounds] == [(0, False), (0, True), (1, False), (1, True), (2, False),
                                                     (2, True), (3, True)]
    assert (float(rounds[0][1]) < float(sigmas[0])) == first_below_one
    assert [float(s) for _, s, _ in rounds[2::2]] == [float(s) for s in sigmas[1:4]]


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


def test_every_offered_sampler_is_checked_against_a_fixture():
    fixed = {key.split("/")[1] for key in REF["samplers"]}
    assert set(sampling.SAMPLERS) == fixed
    assert {key.split("/")[1] for key in REF["discard_sigmas"]} == set(sampling.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)


def test_every_comfyui_scheduler_is_offered_and_checked_against_a_fixture():
    offered = set(sampling.SCHEDULERS)
    fixed = {key.split("/")[1] for key in REF["sigmas"]}
    assert offered == fixed == {"simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
                                "linear_quadratic", "kl_optimal"}
