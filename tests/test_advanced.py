"""KSamplerAdvanced's step ranges and ComfyUI's noise_mask, against fixtures from ComfyUI's own code
(tests/fixtures/make_advanced_fixtures.py), then the same semantics on the tiny models end to end."""
import json
from pathlib import Path

import pytest
import torch

from test_sampling import CONFIGS, SDE_ATOL, toy_denoised
from xdit_core.errors import XDiTConfigError
from xdit_core.models.base import BranchCond
from xdit_core.models.families import resolve_model_spec
from xdit_core.runtime.job import denoise_latent, serial_loop
from xdit_core.sampling.inpaint import prepare_mask
from xdit_core.sampling.request import StepRange, build_request

REF = json.loads((Path(__file__).parent / "fixtures" / "comfyui_advanced.json").read_text())
STEPS, SPLIT = REF["steps"], REF["split"]


def toy_sample(family, latent, seed, sampler, steps_range=StepRange(), mask=None, steps=STEPS):
    """Our request preparation and loop around the toy denoiser; the LATENT's samples out, as the nodes give."""
    spec = resolve_model_spec(CONFIGS[family])
    cond = BranchCond(torch.zeros(latent.shape[0], 2, spec.text_dim),
                      None if spec.pooled_dim is None else torch.zeros(latent.shape[0], spec.pooled_dim))
    request = build_request(spec, latent, seed=seed, steps=steps, cfg=1.0, sampler=sampler, scheduler="normal",
                            denoise=1.0, positive=cond, negative=None, noise_mask=mask, steps_range=steps_range)
    if request.unsampled is not None:
        return request.unsampled
    ms = spec.model_sampling(width=request.width, height=request.height)
    return spec.latent_format.process_out(denoise_latent(spec, ms, request, serial_loop(request, ms, toy_denoised)))


def inputs(family):
    data = REF["inputs"][family]
    return torch.tensor(data["image"]), torch.tensor(data["mask"])



def assert_matches(ours, ref, rtol=1e-5, atol=1e-5):
    ref = torch.tensor(ref)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=rtol, atol=atol), float((ours - ref).abs().max())


SPLITS = sorted(k for k in REF["cases"] if k.endswith("/split"))
MASKS = sorted(k for k in REF["cases"] if k.endswith("/mask"))


@pytest.mark.parametrize("key", SPLITS)
def test_two_chained_advanced_samplers_equal_comfyuis(key):
    """The first returns its leftover noise at SPLIT, the second continues without adding noise."""
    family, sampler, _ = key.split("/")
    case = REF["cases"][key]
    image, _ = inputs(family)
    empty = torch.zeros_like(image)
    atol = SDE_ATOL if sampler.endswith("_sde") else 1e-5
    first = toy_sample(family, empty, 5, sampler, StepRange(end_at_step=SPLIT, return_with_leftover_noise=True))
    assert_matches(first, case["first"], atol=atol)
    second = toy_sample(family, first, 5, sampler, StepRange(add_noise=False, start_at_step=SPLIT))
    assert_matches(second, case["second"], atol=atol)


@pytest.mark.parametrize("key", MASKS)
def test_noise_mask_equals_comfyuis(key):
    family, sampler, _ = key.split("/")
    image, mask = inputs(family)
    assert_matches(toy_sample(family, image, 9, sampler, mask=mask), REF["cases"][key]["out"],
                   atol=SDE_ATOL if sampler.endswith("_sde") else 1e-5)


@pytest.mark.parametrize("family", sorted(REF["inputs"]))
def test_partial_and_empty_step_ranges_equal_comfyuis(family):
    image, _ = inputs(family)
    ranged = toy_sample(family, image, 3, "euler", StepRange(start_at_step=1, end_at_step=4))
    assert_matches(ranged, REF["cases"][f"{family}/euler/range"]["out"])
    empty = toy_sample(family, image, 3, "euler", StepRange(start_at_step=STEPS))
    assert torch.equal(empty, image)
    assert_matches(empty, REF["cases"][f"{family}/euler/empty_range"]["out"], rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("family", sorted(REF["inputs"]))
def test_two_halves_equal_one_full_run(family, sampler):
    """Split anywhere, a deterministic sampler's two halves are the whole run (but for the latent format's
    round trip between them)."""
    image, _ = inputs(family)
    full = toy_sample(family, torch.zeros_like(image), 5, sampler)
    for split in (1, SPLIT, STEPS - 1):
        first = toy_sample(family, torch.zeros_like(image), 5, sampler,
                           StepRange(end_at_step=split, return_with_leftover_noise=True))
        second = toy_sample(family, first, 5, sampler, StepRange(add_noise=False, start_at_step=split))
        assert float((second - full).abs().max() / full.abs().max()) <= 1e-6, split


def test_mask_of_ones_is_no_mask_and_zeros_keep_the_latent():
    image, _ = inputs("flux_dev")
    free = toy_sample("flux_dev", image, 9, "dpmpp_2m")
    assert torch.equal(toy_sample("flux_dev", image, 9, "dpmpp_2m", mask=torch.ones(8, 8)), free)
    kept = toy_sample("flux_dev", image, 9, "euler", mask=torch.zeros(8, 8))
    assert torch.allclose(kept, image, atol=1e-5)
    # Half and half: the masked-out half stays, the other half is sampled as without a mask.
    half = torch.zeros(image.shape[2], image.shape[3])
    half[:, : image.shape[3] // 2] = 1
    mixed = toy_sample("flux_dev", image, 9, "euler", mask=half)
    left = image.shape[3] // 2
    assert torch.allclose(mixed[..., left:], image[..., left:], atol=1e-5)
    assert not torch.allclose(mixed[..., :left], image[..., :left], atol=1e-2)


def test_prepare_mask_resizes_repeats_and_refuses_bad_masks():
    m = prepare_mask(torch.rand(1, 20, 30), (3, 4, 5, 6))
    assert m.shape == (3, 4, 5, 6) and torch.equal(m[0], m[2]) and torch.equal(m[:, 0], m[:, 3])
    with pytest.raises(XDiTConfigError, match="noise_mask has shape"):
        prepare_mask(torch.rand(2, 3, 8, 8), (1, 4, 8, 8))
    with pytest.raises(Exception, match="noise_mask"):
        prepare_mask(torch.full((8, 8), float("nan")), (1, 4, 8, 8))


@pytest.mark.parametrize("bad", [dict(start_at_step=-1), dict(end_at_step=10001), dict(start_at_step=1.5)])
def test_bad_step_range_is_refused(bad):
    with pytest.raises(XDiTConfigError, match="KSamplerAdvanced"):
        toy_sample("flux_dev", torch.zeros(1, 16, 4, 6), 0, "euler", StepRange(**bad))
