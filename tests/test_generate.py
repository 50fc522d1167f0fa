"""`generate` end to end: determinism, a hand-written Flux loop, REPORT.json, conditioning and latent inputs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from xdit_core.cli.main import main
from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.loading.load import load_model
from xdit_core.sampling.samplers import calculate_sigmas


def test_generate_is_bit_deterministic(tiny_models):
    opts = GenerateOptions(model=str(tiny_models["sd3"]), height=64, width=64, steps=3, seed=5,
                           sampler="euler_ancestral")
    a, _ = generate(opts)
    b, _ = generate(opts)
    c, _ = generate(GenerateOptions(**{**opts.__dict__, "seed": 6}))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flux_euler_simple_equals_direct_diffusers_loop(tiny_models):
    """The whole run against a loop written here over the diffusers transformer."""
    from diffusers import FluxPipeline

    h = w = 64
    steps, seed = 4, 11
    ours, report = generate(GenerateOptions(model=str(tiny_models["flux"]), height=h, width=w, steps=steps,
                                            seed=seed, sampler="euler", scheduler="simple"))

    model, spec = load_model(tiny_models["flux"])
    sigmas = calculate_sigmas(spec.model_sampling(), "simple", steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, h // 8, w // 8, generator=gen)  # ComfyUI's noise for the seed
    cond_gen = torch.Generator().manual_seed(seed + 1)  # the CLI's stand-in conditioning
    text = torch.randn(1, 32, spec.text_dim, generator=cond_gen)
    pooled = torch.randn(1, spec.pooled_dim, generator=cond_gen)
    x = FluxPipeline._pack_latents(noise, 1, 16, h // 8, w // 8)  # sigma_0 = 1: x = noise
    ids = FluxPipeline._prepare_latent_image_ids(1, h // 16, w // 16, "cpu", torch.float32)
    with torch.no_grad():
        for i in range(steps):
            v = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=sigmas[i].reshape(1), img_ids=ids, txt_ids=torch.zeros(32, 3),
                      guidance=torch.tensor([3.5])).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # flow matching: euler on the velocity
    ref = FluxPipeline._unpack_latents(x, h, w, 8) / 0.3611 + 0.1159  # Flux latent format out
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    assert report["config"]["guidance"] == 3.5 and report["config"]["cfg"] == 1.0


@pytest.mark.parametrize("name,sampler,scheduler", [
    ("sd3", "dpmpp_2m", "karras"), ("pixart", "heun", "normal"), ("pixart_sigma", "euler_ancestral", "beta"),
    ("flux_schnell", "euler", "sgm_uniform"),
])
def test_every_family_generates_finite_latents(tiny_models, name, sampler, scheduler):
    out, report = generate(GenerateOptions(model=str(tiny_models[name]), height=48, width=64, steps=2, seed=1,
                                           sampler=sampler, scheduler=scheduler))
    channels = 4 if name.startswith("pixart") else 16
    assert out.shape == (1, channels, 6, 8) and torch.isfinite(out).all()
    assert len(report["per_rank"][0]["step_s"]) == 2


def test_cfg_one_skips_negative_and_cfg_changes_result(tiny_models):
    base = dict(model=str(tiny_models["sd3"]), height=32, width=32, steps=2, seed=3)
    one, _ = generate(GenerateOptions(**base, cfg=1.0))
    four, _ = generate(GenerateOptions(**base, cfg=4.5))
    default, report = generate(GenerateOptions(**base))
    assert report["config"]["cfg"] == 4.5 and torch.equal(default, four)
    assert not torch.allclose(one, four)


def test_cond_file_is_used(tiny_models, tmp_path):
    base = dict(model=str(tiny_models["sd3"]), height=32, width=32, steps=2, seed=3, cfg=2.0)
    gen = torch.Generator().manual_seed(4)  # the CLI's own stand-in conditioning for seed 3
    cond = {k: torch.randn(*s, generator=gen) for k, s in
            [("positive", (1, 32, 32)), ("positive_pooled", (1, 32)), ("negative", (1, 32, 32)),
             ("negative_pooled", (1, 32))]}
    save_file(cond, str(tmp_path / "c.safetensors"))
    from_file, _ = generate(GenerateOptions(**base, cond=str(tmp_path / "c.safetensors")))
    drawn, _ = generate(GenerateOptions(**base))
    assert torch.equal(from_file, drawn)
    cond["positive"] = cond["positive"] * 2
    save_file(cond, str(tmp_path / "d.safetensors"))
    changed, _ = generate(GenerateOptions(**base, cond=str(tmp_path / "d.safetensors")))
    assert not torch.allclose(changed, drawn)


def test_img2img_denoise_starts_from_latent(tiny_models, tmp_path):
    start = torch.randn(1, 16, 4, 4) * 0.5
    save_file({"samples": start}, str(tmp_path / "in.safetensors"))
    base = dict(model=str(tiny_models["flux"]), steps=2, seed=0, latent=str(tmp_path / "in.safetensors"))
    low, _ = generate(GenerateOptions(**base, denoise=0.1))
    high, _ = generate(GenerateOptions(**base, denoise=1.0))
    # A light denoise stays near the input; a full one does not.
    assert (low - start).abs().mean() < (high - start).abs().mean()


def test_cli_writes_out_and_report(tiny_models, tmp_path, capsys):
    out, rep = tmp_path / "o.safetensors", tmp_path / "REPORT.json"
    rc = main(["generate", "--model", str(tiny_models["pixart"]), "--height", "32", "--width", "48", "--steps", "2",
               "--seed", "0", "--batch", "2", "--out", str(out), "--report", str(rep), "--threads", "1"])
    assert rc == 0
    samples = load_file(str(out))["samples"]
    assert samples.shape == (2, 4, 4, 6)
    report = json.loads(rep.read_text())
    assert {"config", "world_size", "wall_s", "load_s", "per_rank"} <= report.keys()
    r0 = report["per_rank"][0]
    assert r0["coords"] == {"cfg": 0, "pipefusion": 0, "ring": 0, "ulysses": 0}
    assert r0["param_bytes"] == sum(p.numel() * 4 for p in load_model(tiny_models["pixart"])[0].parameters())
    assert len(r0["step_s"]) == 2 and len(r0["comm_bytes_per_step"]) == 2
    assert all(v == 0 for v in r0["comm_bytes"].values())
    assert report["config"]["threads"] == 1 and report["config"]["sampler"] == "euler"
    assert math.isclose(report["config"]["cfg"], 4.5)
