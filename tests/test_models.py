"""Tiny models build, save and reload; each adapter's forward equals a direct diffusers forward."""
import json

import pytest
import torch

from xdit_core.models.families import resolve_model_spec
from xdit_core.models.latent_formats import FLUX, SD3, SD15, SDXL, flux_image_ids, pack_flux, unpack_flux
from xdit_core.loading.load import load_model
from xdit_core.models import BranchCond, make_adapter
from xdit_core.cli.tiny import build_tiny, tiny_config
from xdit_core.models.families import model_class


def test_tiny_structure():
    flux = tiny_config("flux")
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (2, 4, 4)
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    assert tiny_config("sd3")["num_layers"] == 4 and tiny_config("pixart")["num_layers"] == 4
    assert tiny_config("flux", variant="schnell")["guidance_embeds"] is False


def test_tiny_is_deterministic_for_a_seed():
    a, b, c = build_tiny("sd3", seed=3), build_tiny("sd3", seed=3), build_tiny("sd3", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ["flux", "flux_schnell", "sd3", "pixart", "pixart_sigma"])
def test_save_reload_identical(tiny_models, name):
    folder = tiny_models[name]
    config = json.loads((folder / "config.json").read_text())
    fam = resolve_model_spec(config).family
    model, spec = load_model(folder)
    ref = build_tiny(fam, seed=1, variant=spec.variant)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_variants_and_latent_formats_detected(tiny_models):
    expect = {"flux": ("dev", FLUX, 3.5), "flux_schnell": ("schnell", FLUX, None), "sd3": ("sd3", SD3, None),
              "pixart": ("alpha", SD15, None), "pixart_sigma": ("sigma", SDXL, None)}
    for name, (variant, fmt, guidance) in expect.items():
        _, spec = load_model(tiny_models[name])
        assert (spec.variant, spec.latent_format, spec.default_guidance) == (variant, fmt, guidance)


def test_flux_packing_equals_diffusers_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 12)
    assert torch.equal(pack_flux(x), packed)
    assert torch.equal(unpack_flux(packed, 8, 12), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    assert torch.equal(flux_image_ids(8, 12), ids)


def test_latent_format_round_trip():
    x = torch.randn(1, 16, 4, 4)
    for fmt in (FLUX, SD3, SD15, SDXL):
        assert torch.allclose(fmt.process_out(fmt.process_in(x)), x, atol=1e-6)


def _direct_forward(model, family, x, t, text, pooled, guidance):
    """The diffusers call written out by hand, the way diffusers' own pipelines prepare it."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    if family == "flux":
        out = model(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=t,
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                    txt_ids=torch.zeros(text.shape[1], 3), guidance=guidance).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
    if family == "sd3":
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    added = {"resolution": None, "aspect_ratio": None}
    if model.config.use_additional_conditions:
        added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
                 "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1)}
    return model(hidden_states=x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=added).sample[:, :c]


@pytest.mark.parametrize("name", ["flux", "flux_schnell", "sd3", "pixart", "pixart_sigma"])
def test_adapter_forward_equals_diffusers(tiny_models, name):
    model, spec = load_model(tiny_models[name])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.latent_channels, 8, 12, generator=gen)
    text = torch.randn(2, 7, spec.text_dim, generator=gen)
    pooled = torch.randn(2, spec.pooled_dim, generator=gen) if spec.pooled_dim else None
    t = torch.tensor([0.7, 0.3]) if spec.family == "flux" else torch.tensor([700.0, 300.0])
    guidance = torch.tensor([3.5, 3.5]) if spec.variant == "dev" else None
    with torch.no_grad():
        ours = make_adapter(model, spec).predict(x, t, BranchCond(text, pooled), 3.5)
        ref = _direct_forward(model, spec.family, x, t, text, pooled, guidance)
    assert ours.shape == x.shape
    assert ours.abs().max() > 0
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()


@pytest.mark.parametrize("family,variant", [("flux", "dev"), ("flux", "schnell"), ("sd3", None), ("pixart", "alpha"),
                                            ("pixart", "sigma")])
def test_adapter_creates_its_tensors_on_the_models_device(family, variant):
    """The whole forward on the meta device: a tensor the adapter made on the CPU (guidance, position ids,
    size conditioning) would meet the model's weights on another device and raise, as it would on CUDA."""
    config = tiny_config(family, variant=variant)
    spec = resolve_model_spec(config, family)
    with torch.device("meta"):
        model = model_class(family).from_config(config)
    meta = dict(device="meta")
    x = torch.empty(1, spec.latent_channels, 8, 8, **meta)
    cond = BranchCond(torch.empty(1, 5, spec.text_dim, **meta),
                      torch.empty(1, spec.pooled_dim, **meta) if spec.pooled_dim else None)
    with torch.no_grad():
        out = make_adapter(model, spec).predict(x, torch.full((1,), 0.5, **meta), cond, 3.5)
    assert out.device.type == "meta" and out.shape == x.shape
