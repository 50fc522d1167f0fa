"""ComfyUI's own model and KSampler against our engine on the same weights: for each family, ComfyUI's code
(tests/comfy_native.py, run once in ComfyUI's Python for every case) and our serial run give the same latent;
for Wan 2.1 / 2.2 from ComfyUI's own Wan latent and conditioning nodes, our xDiT Sampler node too.

Runs only with COMFYUI_PATH (a ComfyUI checkout); ComfyUI's Python as in test_comfyui_integration.py.
"""
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_comfyui_integration import comfy_python

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
HERE = Path(__file__).resolve().parent

# name: (family, write_tiny options, latent [h, w], ComfyUI's model config class). Latents are not square.
# SD3: ComfyUI's MMDiT has 64-wide heads only. PixArt: ComfyUI computes its sin-cos grid for the latent with
# base size / interpolation = 32, as diffusers does for sample sizes of 64 and up (every real PixArt); the tiny
# default of 32 gives diffusers 16 (a relative error of 0.19), so the model is written with 64 (pixart_at_512).
# Its latent's (h + w) / 2 must be over 32 too: ComfyUI's interpolation rounds to 0 there and divides by it.
FAMILIES = {
    "flux_dev": ("flux", {"variant": "dev"}, (8, 12), "Flux"),
    "flux_schnell": ("flux", {"variant": "schnell"}, (12, 8), "FluxSchnell"),
    "sd3": ("sd3", {"heads": 2, "hidden_size": 128}, (8, 12), "SD3"),
    "pixart_alpha": ("pixart", {"variant": "alpha"}, (32, 48), "PixArtAlpha"),
    "pixart_sigma": ("pixart", {"variant": "sigma"}, (48, 32), "PixArtSigma"),
}
# (sampler, scheduler, steps, denoise): txt2img from an empty latent; img2img from a random one; ancestral
# sampling draws its own noise from the seed.
RUNS = {"euler": ("euler", "normal", 5, 1.0), "dpmpp_2m": ("dpmpp_2m", "karras", 4, 0.75),
        "euler_ancestral": ("euler_ancestral", "simple", 4, 1.0)}
# SamplerCustomAdvanced: ComfyUI's CFGGuider on ComfyUI's model against the xDiT Guider on the workers (ulysses 2),
# with samplers the engine's own loop does not have (lms, dpmpp_2m_sde, a CFG++ one), a shift node, a noise_mask.
# (family, sampler, scheduler, steps, shift, mask)
GUIDED = {
    "flux_dev/euler_ancestral": ("flux_dev", "euler_ancestral", "simple", 4, None, False),
    "flux_dev/lms": ("flux_dev", "lms", "normal", 5, None, False),
    "flux_dev/dpmpp_2m_sde": ("flux_dev", "dpmpp_2m_sde", "karras", 5, None, True),
    "sd3/uni_pc": ("sd3", "uni_pc", "simple", 5, 2.0, False),
    "sd3/euler_cfg_pp": ("sd3", "euler_cfg_pp", "normal", 4, None, False),
    "pixart_sigma/dpmpp_3m_sde": ("pixart_sigma", "dpmpp_3m_sde", "exponential", 5, None, False),
}
GUIDED_MESH = {"ulysses_degree": 2}
# Two chained KSamplerAdvanced (the first returns its leftover noise at step 2 of 5, the second adds none):
# family -> sampler.
CHAINED = {"flux_dev": "dpmpp_2m", "sd3": "dpmpp_2m_sde", "pixart_sigma": "uni_pc"}
STAGES = [dict(add_noise="enable", start_at_step=0, end_at_step=2, return_with_leftover_noise="enable"),
          dict(add_noise="disable", start_at_step=2, end_at_step=10000, return_with_leftover_noise="disable")]
# LoRAs: ComfyUI's LoraLoaderModelOnly (merged into the weights) against ours (hooked at run time), in layouts
# ComfyUI reads for the family, two stacked on Flux: name -> [(layout, seed, strength)]. (ComfyUI 0.3.64 loads no
# key of a bare diffusers-named PixArt LoRA, "lora key not loaded" for each, so it is not compared here.)
LORAS = {"flux_dev": [("kohya", 1, 0.8), ("peft", 2, -0.5)], "sd3": [("comfyui", 3, 1.0)],
         "pixart_sigma": [("kohya", 4, 1.2)]}
# Wan 2.1 / 2.2 through ComfyUI's own Wan nodes: the LATENT and conditioning from EmptyHunyuanLatentVideo (T2V),
# WanImageToVideo (Wan 2.1 I2V, with a CLIP vision output) or Wan22ImageToVideoLatent (TI2V 5B: a noise_mask and
# per-frame timesteps), a VAE stand-in's fixed latent for the start image; KSampler on ComfyUI's model against our
# engine serially and our xDiT Sampler node on the workers (WAN_MESH). ComfyUI's WanModel fixes 128-wide heads,
# 4096-wide text and 1280-wide CLIP vision states (comfy_native.WAN_FIXED), so these tiny Wans are 2 heads of 128.
# name: (variant, ComfyUI's latent node, ComfyUI's model config class, sampler, scheduler, text tokens); I2V with
# CLIP vision takes ComfyUI's umT5 length, 512.
WAN = {
    "wan21_t2v": ("t2v", "EmptyHunyuanLatentVideo", "WAN21_T2V", "euler", "simple", 9),
    "wan21_i2v": ("i2v", "WanImageToVideo", "WAN21_I2V", "uni_pc", "simple", 512),
    "wan22_ti2v": ("ti2v", "Wan22ImageToVideoLatent", "WAN22_T2V", "dpmpp_2m", "simple", 9),
}
# 3 latent frames of 6 x 10: 45 tokens after the 2x2 patches, which Ulysses 2 pads.
WAN_FRAMES, WAN_ROWS, WAN_COLS = 3, 6, 10
WAN_STEPS, WAN_CFG, WAN_STD, WAN_MESH = 4, 5.0, 0.05, {"ulysses_degree": 2}
# Through SamplerCustomAdvanced too: the xDiT Guider against CFGGuider on ComfyUI's model (I2V's image inputs;
# the 5B's per-frame timesteps and clean start frame, which the Guider applies from ComfyUI's denoise mask).
WAN_GUIDED = ("wan21_i2v", "wan22_ti2v")
CFG, GUIDANCE, SEED = 2.0, 2.5, 11
# max |ours - ComfyUI's| / max |ComfyUI's|; measured: at most 5e-7 for every family (torch 2.13 here, ComfyUI's
# own torch there). Running the negative at the positive's guidance (2.5) instead of ComfyUI's 3.5 is 3.6e-4.
TOLERANCE = 1e-4


def pixart_at_512(folder: Path) -> None:
    """Give a tiny PixArt the sample size of the 512 models (64): only its position grid scale changes."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["sample_size"] = 64
    config_file.write_text(json.dumps(config))


def inputs(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The latents and both branches' conditioning of one family, from a generator of its own."""
    from xdit_core.loading.load import read_model_config
    from xdit_core.models.families import resolve_model_spec

    spec = resolve_model_spec(read_model_config(folder))
    gen = torch.Generator().manual_seed(5)
    h, w = FAMILIES[name][2]
    out = {"empty": torch.zeros(1, spec.latent_channels, h, w),
           "image": torch.randn(1, spec.latent_channels, h, w, generator=gen)}
    for branch in ("positive", "negative"):
        out[f"{branch}_text"] = torch.randn(1, 7, spec.text_dim, generator=gen)
        if spec.pooled_dim is not None:
            out[f"{branch}_pooled"] = torch.randn(1, spec.pooled_dim, generator=gen)
    return {f"{name}/{k}": v for k, v in out.items()}


def branch(name: str, which: str, tensors: dict) -> dict:
    """A case's conditioning: references to the input tensors, and Flux dev's guidance on the positive only, as in
    the usual workflow (FluxGuidance after the positive prompt): ComfyUI runs the negative at 3.5."""
    out = {"text": {"tensor": f"{name}/{which}_text"}}
    if f"{name}/{which}_pooled" in tensors:
        out["pooled"] = {"tensor": f"{name}/{which}_pooled"}
    if name == "flux_dev" and which == "positive":
        out["guidance"] = GUIDANCE
    return out


def write_comfy_wan(out: Path, variant: str, seed: int) -> Path:
    """A tiny Wan of `variant` that ComfyUI's WanModel can hold (comfy_native.WAN_FIXED): 2 heads of 128, 2
    layers, a 64-wide FFN, umT5's 4096-wide text, 256 timestep features, 1280-wide CLIP vision states for I2V;
    random weights as write_tiny's (norm scales near 1)."""
    import diffusers

    from xdit_core.cli.tiny import randomize, tiny_config

    config = tiny_config("wan", layers=2, heads=2, hidden_size=256, variant=variant)
    config.update(text_dim=4096, freq_dim=256, ffn_dim=64)
    if config["image_dim"] is not None:
        config["image_dim"] = 1280
    randomize(diffusers.WanTransformer3DModel(**config), seed, WAN_STD).save_pretrained(out)
    return out


def wan_inputs(name: str) -> dict[str, torch.Tensor]:
    """Both branches' text states and, for the image variants, the start image, the VAE stand-in's latent of it
    and (Wan 2.1 I2V) the CLIP vision states."""
    variant, node, _, _, _, tokens = WAN[name]
    gen = torch.Generator().manual_seed(7)
    out = {f"{b}_text": torch.randn(1, tokens, 4096, generator=gen) for b in ("positive", "negative")}
    if node == "WanImageToVideo":
        out["start_image"] = torch.rand(1, WAN_ROWS * 8, WAN_COLS * 8, 3, generator=gen)
        out["vae_latent"] = torch.randn(1, 16, WAN_FRAMES, WAN_ROWS, WAN_COLS, generator=gen)
        out["clip_vision"] = torch.randn(1, 257, 1280, generator=gen)
    elif node == "Wan22ImageToVideoLatent":
        out["start_image"] = torch.rand(1, WAN_ROWS * 16, WAN_COLS * 16, 3, generator=gen)
        out["vae_latent"] = torch.randn(1, 48, 1, WAN_ROWS, WAN_COLS, generator=gen)
    return {f"wan/{name}/{k}": v for k, v in out.items()}


def wan_cases(name: str, model: Path, tensors: dict) -> list[dict]:
    """KSampler on ComfyUI's model and our xDiT Sampler node, from the same ComfyUI Wan node's outputs."""
    variant, node, _, sampler, scheduler, _ = WAN[name]
    scale = 16 if variant == "ti2v" else 8
    case = {"kind": "wan_video", "model": str(model), "node": node, "width": WAN_COLS * scale,
            "height": WAN_ROWS * scale, "length": 4 * (WAN_FRAMES - 1) + 1, "seed": SEED, "steps": WAN_STEPS,
            "cfg": WAN_CFG, "sampler_name": sampler, "scheduler": scheduler,
            **{b: {"text": {"tensor": f"wan/{name}/{b}_text"}} for b in ("positive", "negative")},
            **{k: {"tensor": f"wan/{name}/{k}"} for k in ("start_image", "vae_latent", "clip_vision")
               if f"wan/{name}/{k}" in tensors}}
    cases = [dict(case, name=f"wan/{name}/comfy", sampler="comfy"),
             dict(case, name=f"wan/{name}/xdit", sampler={"mesh": WAN_MESH})]
    if name in WAN_GUIDED:
        cases += [dict(case, name=f"wan/{name}/comfy_guider", sampler="comfy_guider"),
                  dict(case, name=f"wan/{name}/xdit_guider", sampler={"guider_mesh": WAN_MESH})]
    return cases


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Models, inputs and ComfyUI's outputs of every case, from one run of tests/comfy_native.py."""
    python = comfy_python()
    if python is None:
        pytest.skip("no Python with ComfyUI's and comfyui-xdit's requirements (set COMFYUI_PYTHON)")
    from xdit_core.cli.tiny import write_tiny

    root = tmp_path_factory.mktemp("native")
    models, tensors, cases = {}, {}, []

    def comfy_case(name: str, run: str) -> dict:
        sampler, scheduler, steps, denoise = RUNS[run]
        latent = "empty" if denoise == 1.0 else "image"
        return {"name": f"{name}/{run}", "kind": "ksampler", "model": str(models[name]),
                "latent": {"tensor": f"{name}/{latent}"}, "seed": SEED, "steps": steps, "cfg": CFG,
                "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise,
                "positive": branch(name, "positive", tensors), "negative": branch(name, "negative", tensors)}

    for name, (family, options, _, _) in FAMILIES.items():
        models[name] = write_tiny(family, root / name, seed=1, **options)
        if family == "pixart":
            pixart_at_512(models[name])
        tensors.update(inputs(name, models[name]))
        for run in RUNS:
            cases.append(comfy_case(name, run))
    for key, (name, sampler, scheduler, steps, shift, mask) in GUIDED.items():
        h, w = FAMILIES[name][2]
        if mask:
            tensors[f"{key}/mask"] = torch.zeros(1, h * 8, w * 8)
            tensors[f"{key}/mask"][:, : h * 4] = 1.0  # denoise the top half of an img2img latent
        for guider in ("comfy", {"mesh": GUIDED_MESH}):
            cases.append({"name": f"guided/{key}/{'comfy' if guider == 'comfy' else 'xdit'}",
                          "kind": "custom_sampler", "model": str(models[name]), "guider": guider,
                          "latent": {"tensor": f"{name}/{'image' if mask else 'empty'}"}, "seed": SEED,
                          "steps": steps, "cfg": CFG, "sampler_name": sampler, "scheduler": scheduler, "shift": shift,
                          "noise_mask": {"tensor": f"{key}/mask"} if mask else None,
                          "positive": branch(name, "positive", tensors),
                          "negative": branch(name, "negative", tensors)})
    for name, sampler in CHAINED.items():
        cases.append(dict(comfy_case(name, "euler"), name=f"chained/{name}", kind="ksampler_advanced",
                          sampler_name=sampler, stages=STAGES))
        cases.append(dict(cases[-1], name=f"chained_xdit/{name}", kind="xdit_advanced", mesh=GUIDED_MESH))
    cases.append(dict(comfy_case("flux_dev", "euler"), name="weightless_ksampler", kind="ksampler_on_weightless"))
    from lora_files import make_lora, save_lora
    from xdit_core.loading.load import load_model

    loras = {}
    for name, stack in LORAS.items():
        base, _ = load_model(models[name])
        loras[name] = [(str(save_lora(make_lora(FAMILIES[name][0], base, layout, seed=seed),
                                      root / f"{name}_{layout}.safetensors")), strength)
                       for layout, seed, strength in stack]
        case = dict(comfy_case(name, "euler"), name=f"lora/{name}", loras=loras[name])
        cases.append(case)
    for seed, (name, (variant, *_)) in enumerate(WAN.items(), start=21):
        models[name] = write_comfy_wan(root / name, variant, seed)
        tensors.update(wan_inputs(name))
        cases += wan_cases(name, models[name], tensors)
    return run_native(root, python, models, tensors, cases)


def run_native(root: Path, python: str, models: dict, tensors: dict, cases: list) -> dict:
    """ComfyUI's side of `cases` (tests/comfy_native.py in ComfyUI's Python), with what the tests read back."""
    save_file(tensors, str(root / "inputs.safetensors"))
    (root / "cases.json").write_text(json.dumps({"tensors": str(root / "inputs.safetensors"), "cases": cases}))
    out = root / "outputs.safetensors"
    done = subprocess.run([python, str(HERE / "comfy_native.py"), str(root / "cases.json"), str(out)],
                          env={**os.environ, "COMFYUI_PATH": COMFYUI, "HF_HUB_OFFLINE": "1",
                               "XDIT_ALLOW_ABSOLUTE_MODEL_PATHS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return {"models": models, "inputs": tensors, "cases": {c["name"]: c for c in cases},
            "outputs": load_file(str(out)), "errors": json.loads(meta["errors"]),
            "classes": json.loads(meta["model_configs"])}


def ours(comfy, name: str, run: str, case_name: Optional[str] = None) -> torch.Tensor:
    """Our engine's serial run of a case (its LoRAs hooked at run time), as a LATENT (ComfyUI's latent space)."""
    from xdit_core.loading.load import load_model
    from xdit_core.loading.lora import load_lora
    from xdit_core.models import make_adapter
    from xdit_core.models.base import BranchCond
    from xdit_core.models.lora import apply_loras
    from xdit_core.runtime.job import run_request
    from xdit_core.sampling.request import build_request

    case, t = comfy["cases"][case_name or f"{name}/{run}"], comfy["inputs"]
    model, spec = load_model(comfy["models"][name])

    def cond(which):
        return BranchCond(t[f"{name}/{which}_text"], t.get(f"{name}/{which}_pooled"))

    request = build_request(spec, t[case["latent"]["tensor"]], seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                            sampler=case["sampler_name"], scheduler=case["scheduler"], denoise=case["denoise"],
                            positive=cond("positive"), negative=cond("negative"),
                            guidance=GUIDANCE if name == "flux_dev" else None)
    loras = [(load_lora(path, spec.family, model.state_dict()), strength) for path, strength in case.get("loras", [])]
    with apply_loras(model, loras):
        return spec.latent_format.process_out(run_request(make_adapter(model, spec), request))


@pytest.mark.parametrize("name", FAMILIES)
def test_comfyui_builds_its_own_model_of_the_family(comfy, name):
    assert comfy["classes"][str(comfy["models"][name])] == FAMILIES[name][3]


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_ksampler_on_comfyui_model_equals_our_engine(comfy, name, run):
    key = f"{name}/{run}"
    assert key not in comfy["errors"], comfy["errors"][key]
    theirs, mine = comfy["outputs"][f"{key}/samples"], ours(comfy, name, run)
    latent = comfy["inputs"][comfy["cases"][key]["latent"]["tensor"]]
    assert theirs.shape == mine.shape == latent.shape
    assert torch.isfinite(theirs).all() and (theirs - latent).abs().max() > 0.1  # it sampled
    error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    assert error < TOLERANCE, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("key", GUIDED)
def test_xdit_guider_equals_comfyuis_cfg_guider(comfy, key):
    """SamplerCustomAdvanced with the xDiT Guider (evaluations on two ranks) equals it with ComfyUI's CFGGuider on
    ComfyUI's model: ComfyUI's sampler, sigmas (BasicScheduler on our weightless MODEL), noise, shift and mask."""
    for kind in ("comfy", "xdit"):
        assert f"guided/{key}/{kind}" not in comfy["errors"], comfy["errors"][f"guided/{key}/{kind}"]
    out = {kind: comfy["outputs"][f"guided/{key}/{kind}/samples"] for kind in ("comfy", "xdit")}
    assert torch.equal(comfy["outputs"][f"guided/{key}/comfy/sigmas"], comfy["outputs"][f"guided/{key}/xdit/sigmas"])
    assert torch.isfinite(out["comfy"]).all() and out["comfy"].abs().max() > 0.1
    error = ((out["xdit"] - out["comfy"]).abs().max() / out["comfy"].abs().max()).item()
    print(f"guider {key}: relative error {error:.2e}")
    assert error < TOLERANCE, f"{key}: relative error {error:.2e}"
    denoised = {kind: comfy["outputs"][f"guided/{key}/{kind}/denoised"] for kind in ("comfy", "xdit")}
    assert torch.allclose(denoised["xdit"], denoised["comfy"], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", LORAS)
def test_lora_equals_comfyuis_lora_loader(comfy, name):
    """Our LoRA path (read by our key mapping, hooked at run time) against ComfyUI's LoraLoaderModelOnly (its own
    key mapping, merged into the weights) and KSampler on ComfyUI's model."""
    key = f"lora/{name}"
    assert key not in comfy["errors"], comfy["errors"][key]
    theirs, mine = comfy["outputs"][f"{key}/samples"], ours(comfy, name, "euler", key)
    plain = comfy["outputs"][f"{name}/euler/samples"]
    assert (theirs - plain).abs().max() > 1e-2  # the LoRA changed ComfyUI's result
    error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    print(f"lora {name}: relative error {error:.2e}")
    assert error < TOLERANCE, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("name", CHAINED)
def test_two_chained_advanced_samplers_equal_comfyuis(comfy, name):
    """Our KSamplerAdvanced semantics on our engine against ComfyUI's two KSamplerAdvanced nodes on its model:
    each stage's LATENT, the second continuing from the first's leftover noise."""
    from xdit_core.loading.load import load_model
    from xdit_core.models import make_adapter
    from xdit_core.models.base import BranchCond
    from xdit_core.runtime.job import run_request
    from xdit_core.sampling.request import StepRange, build_request

    key = f"chained/{name}"
    assert key not in comfy["errors"], comfy["errors"][key]
    case, t = comfy["cases"][key], comfy["inputs"]
    model, spec = load_model(comfy["models"][name])
    adapter = make_adapter(model, spec)
    latent = t[case["latent"]["tensor"]]
    for i, stage in enumerate(case["stages"]):
        request = build_request(
            spec, latent, seed=case["seed"], steps=case["steps"], cfg=case["cfg"], sampler=case["sampler_name"],
            scheduler=case["scheduler"], denoise=1.0,
            positive=BranchCond(t[f"{name}/positive_text"], t.get(f"{name}/positive_pooled")),
            negative=BranchCond(t[f"{name}/negative_text"], t.get(f"{name}/negative_pooled")),
            guidance=GUIDANCE if name == "flux_dev" else None,
            steps_range=StepRange(add_noise=stage["add_noise"] == "enable", start_at_step=stage["start_at_step"],
                                  end_at_step=stage["end_at_step"],
                                  return_with_leftover_noise=stage["return_with_leftover_noise"] == "enable"))
        latent = spec.latent_format.process_out(run_request(adapter, request))
        theirs = comfy["outputs"][f"{key}/stage{i}"]
        error = ((latent - theirs).abs().max() / theirs.abs().max()).item()
        print(f"chained {name} stage {i}: relative error {error:.2e}")
        assert error < TOLERANCE, f"{key} stage {i}: relative error {error:.2e}"


@pytest.mark.parametrize("name", CHAINED)
def test_two_chained_xdit_advanced_nodes_equal_comfyuis_two(comfy, name):
    """The xDiT Sampler (Advanced) node twice, on the workers (ulysses 2), against ComfyUI's two KSamplerAdvanced
    nodes on ComfyUI's model: every stage's LATENT."""
    key = f"chained_xdit/{name}"
    assert key not in comfy["errors"], comfy["errors"][key]
    for i in range(len(STAGES)):
        theirs, mine = comfy["outputs"][f"chained/{name}/stage{i}"], comfy["outputs"][f"{key}/stage{i}"]
        error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        print(f"xdit advanced {name} stage {i}: relative error {error:.2e}")
        assert error < TOLERANCE, f"{key} stage {i}: relative error {error:.2e}"


def test_comfyuis_ksampler_on_the_weightless_model_says_what_to_use(comfy):
    assert "its weights are on the xDiT workers; sample it with the xDiT Guider" in comfy["errors"]["weightless_ksampler"]


@pytest.mark.parametrize("name", WAN)
def test_comfyui_builds_its_own_wan_model(comfy, name):
    assert comfy["classes"][str(comfy["models"][name])] == WAN[name][2]


def wan_made(comfy, name: str) -> dict[str, Optional[torch.Tensor]]:
    """What ComfyUI's Wan node made for the KSampler case: the LATENT (and noise_mask), the start image keys."""
    key = f"wan/{name}/comfy"
    assert key not in comfy["errors"], comfy["errors"][key]
    return {k: comfy["outputs"].get(f"{key}/{k}") for k in ("samples", "latent", "noise_mask", "concat_latent_image",
                                                           "concat_mask")}


def ours_wan(comfy, name: str, drop: Optional[str] = None) -> torch.Tensor:
    """Our engine's serial run from what ComfyUI's Wan node made: its LATENT and noise_mask, and our own reading
    of its conditioning (image_concat of concat_latent_image and concat_mask, the CLIP vision states). `drop`
    (a control): "clip_vision" or "concat" zeroed, or the "noise_mask" left out."""
    from xdit_core.loading.load import load_model
    from xdit_core.models import make_adapter
    from xdit_core.models.base import BranchCond
    from xdit_core.models.wan import image_concat
    from xdit_core.runtime.job import run_request
    from xdit_core.sampling.request import build_request

    case, t, made = comfy["cases"][f"wan/{name}/comfy"], comfy["inputs"], wan_made(comfy, name)
    model, spec = load_model(comfy["models"][name])
    latent = made["latent"]
    concat = image_concat(spec, latent.shape, made["concat_latent_image"], made["concat_mask"])
    image = t.get(f"wan/{name}/clip_vision")
    if drop == "clip_vision":
        image = torch.zeros_like(image)
    elif drop == "concat":
        concat = torch.zeros_like(concat)

    def cond(which):
        return BranchCond(t[f"wan/{name}/{which}_text"], image=image, concat=concat)

    request = build_request(spec, latent, seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                            sampler=case["sampler_name"], scheduler=case["scheduler"], denoise=1.0,
                            positive=cond("positive"), negative=cond("negative"),
                            noise_mask=None if drop == "noise_mask" else made["noise_mask"])
    return spec.latent_format.process_out(run_request(make_adapter(model, spec), request))


@pytest.mark.parametrize("name", WAN)
def test_ksampler_on_comfyuis_wan_equals_our_engine(comfy, name):
    """KSampler on ComfyUI's Wan model, from ComfyUI's Wan node's LATENT and conditioning, against our engine's
    serial run of the same: 5-D latents, WAN21.concat_cond (I2V), CLIP vision states, WAN22's per-frame
    timesteps and clean start frame (TI2V 5B)."""
    variant, node = WAN[name][:2]
    made = wan_made(comfy, name)
    theirs, latent = made["samples"], made["latent"]
    channels = 48 if variant == "ti2v" else 16
    assert latent.shape == theirs.shape == (1, channels, WAN_FRAMES, WAN_ROWS, WAN_COLS)
    assert (made["concat_latent_image"] is not None) == (node == "WanImageToVideo")
    assert (made["noise_mask"] is not None) == (node == "Wan22ImageToVideoLatent")
    assert torch.isfinite(theirs).all() and (theirs - latent).abs().max() > 0.1  # it sampled
    if variant == "ti2v":  # the encoded start frame is kept (noise_mask 0 there)
        assert torch.allclose(theirs[:, :, 0], latent[:, :, 0], atol=1e-5)
    mine = ours_wan(comfy, name)
    error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    print(f"wan {name} engine vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("name,drop", [("wan21_i2v", "clip_vision"), ("wan21_i2v", "concat"),
                                       ("wan22_ti2v", "noise_mask")])
def test_wan_image_conditioning_is_compared(comfy, name, drop):
    """Control: without the CLIP vision states, the start image's channels or the 5B's noise_mask our run is far
    from ComfyUI's (measured 0.28, 0.15, 0.80), so the comparisons above check each at TOLERANCE."""
    theirs = wan_made(comfy, name)["samples"]
    error = ((ours_wan(comfy, name, drop) - theirs).abs().max() / theirs.abs().max()).item()
    assert error > 100 * TOLERANCE, f"{name} without {drop}: relative error {error:.2e}"


@pytest.mark.parametrize("name", WAN)
def test_xdit_sampler_node_equals_comfyuis_ksampler_on_wan(comfy, name):
    """Our xDiT Sampler node on the workers (Ulysses 2, 45 tokens: padded) from ComfyUI's Wan node's LATENT and
    conditioning, against KSampler on ComfyUI's model from the same node's outputs."""
    key = f"wan/{name}/xdit"
    assert key not in comfy["errors"], comfy["errors"][key]
    theirs, mine = wan_made(comfy, name)["samples"], comfy["outputs"][f"{key}/samples"]
    assert torch.equal(comfy["outputs"][f"{key}/latent"], wan_made(comfy, name)["latent"])
    assert mine.shape == theirs.shape
    error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    print(f"wan {name} xDiT Sampler (ulysses 2) vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("name", WAN_GUIDED)
def test_xdit_guider_equals_comfyuis_cfg_guider_on_wan(comfy, name):
    """SamplerCustomAdvanced with the xDiT Guider (Ulysses 2) against CFGGuider on ComfyUI's model, from the same
    Wan node's LATENT and conditioning: the I2V inputs, and the 5B's per-frame timesteps and clean start frame,
    which the Guider takes from ComfyUI's denoise mask."""
    keys = [f"wan/{name}/{kind}" for kind in ("comfy_guider", "xdit_guider")]
    for key in keys:
        assert key not in comfy["errors"], comfy["errors"][key]
    theirs, mine = (comfy["outputs"][f"{key}/samples"] for key in keys)
    error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    print(f"wan {name} xDiT Guider (ulysses 2) vs ComfyUI's CFGGuider: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


# Edit models' reference latents against ComfyUI's own models: Qwen-Image (ComfyUI's QwenImage; Edit 2509 is the same
# transformer with reference_latents) and FLUX.1 Kontext (ComfyUI's Flux dev with reference_latents). Each branch's
# conditioning goes through ComfyUI's ReferenceLatent node per reference (what TextEncodeQwenImageEdit sets too: the
# LATENT as encoded, ComfyUI applies process_latent_in) and FluxKontextMultiReferenceLatentMethod for a method;
# KSampler on ComfyUI's model against our engine's serial run of the same ComfyUI values through the xDiT Sampler's
# conversion (nodes.conditioning, nodes.sampler), and against our xDiT Sampler node on the workers (Ulysses 2).
# Weights at std 0.1, so attention mixes the reference tokens in enough for the controls below.
# name: (family, write_tiny options, ComfyUI's model config class, cfg)
EDIT_MODELS = {"qwen": ("qwen", {}, "QwenImage", 2.5), "kontext": ("flux", {"variant": "dev"}, "Flux", 2.0)}
EDIT_STD = 0.1
# Qwen: a 6 x 10 latent is 3 x 5 tokens, odd counts, where ComfyUI centres positions one step later than diffusers'
# QwenEmbedRope; its LATENTs are [B, 16, 1, h, w] (qwen_image takes EmptySD3LatentImage's 4-D one, which ComfyUI's
# KSampler gives the frame axis). The first reference (7 x 3 tokens) reaches further from the centre than the
# output, so the text's positions start after the output's extent (ComfyUI), not the reference's (diffusers).
EDIT_LATENTS = {"qwen": (1, 16, 1, 6, 10), "qwen_4d": (1, 16, 6, 10), "kontext": (1, 16, 8, 12)}
EDIT_REFERENCES = {"qwen": [(1, 16, 1, 14, 6), (1, 16, 1, 6, 8)], "kontext": [(1, 16, 10, 6), (1, 16, 6, 8)]}
# name: (model, latent, references used, FluxKontextMultiReferenceLatentMethod's value or None, sampler, scheduler)
EDIT_CASES = {
    "qwen_image": ("qwen", "qwen_4d", 0, None, "euler", "simple"),
    "qwen_edit": ("qwen", "qwen", 2, None, "dpmpp_2m", "simple"),  # ComfyUI's QwenImage default: "index"
    "qwen_edit_offset": ("qwen", "qwen", 2, "offset", "dpmpp_2m", "simple"),
    "kontext": ("kontext", "kontext", 2, None, "euler", "simple"),  # ComfyUI's Flux default: "offset"
    "kontext_index": ("kontext", "kontext", 2, "index", "euler", "simple"),
    "kontext_uxo": ("kontext", "kontext", 2, "uxo/uno", "euler", "simple"),
}
EDIT_XDIT = ("qwen_image", "qwen_edit", "kontext")  # also through our xDiT Sampler node on the workers
EDIT_MESH, EDIT_STEPS = {"ulysses_degree": 2}, 4


def edit_inputs() -> dict[str, torch.Tensor]:
    """Both branches' text states (Flux: and pooled), the latents and the reference LATENTs."""
    gen = torch.Generator().manual_seed(13)
    out = {}
    for name, (family, *_) in EDIT_MODELS.items():
        for which in ("positive", "negative"):
            out[f"{name}/{which}_text"] = torch.randn(1, 7, 32, generator=gen)
            if family == "flux":
                out[f"{name}/{which}_pooled"] = torch.randn(1, 32, generator=gen)
        for i, shape in enumerate(EDIT_REFERENCES[name]):
            out[f"{name}/reference{i}"] = torch.randn(*shape, generator=gen)
    out.update({f"latent/{k}": torch.zeros(shape) for k, shape in EDIT_LATENTS.items()})
    return {f"edit/{k}": v for k, v in out.items()}


def edit_branch(model: str, which: str) -> dict:
    out = {"text": {"tensor": f"edit/{model}/{which}_text"}}
    if EDIT_MODELS[model][0] == "flux":
        out["pooled"] = {"tensor": f"edit/{model}/{which}_pooled"}
        if which == "positive":  # FluxGuidance after the positive prompt; ComfyUI runs the negative at 3.5
            out["guidance"] = GUIDANCE
    return out


@pytest.fixture(scope="module")
def comfy_edit(tmp_path_factory):
    """Models, inputs and outputs of the edit cases, from one run of tests/comfy_native.py. Our xDiT Sampler node
    loads the Qwen model from a ComfyUI-style single file (diffusers names, as Comfy-Org's qwen_image_*.safetensors)."""
    python = comfy_python()
    if python is None:
        pytest.skip("no Python with ComfyUI's and comfyui-xdit's requirements (set COMFYUI_PYTHON)")
    from xdit_core.cli.tiny import write_tiny
    from xdit_core.loading.key_mapping import model_tensors, to_original
    from xdit_core.models.families import model_class

    root = tmp_path_factory.mktemp("native_edit")
    models, xdit_models = {}, {}
    for seed, (name, (family, options, _, _)) in enumerate(EDIT_MODELS.items(), start=31):
        models[name] = write_tiny(family, root / name, seed=seed, weight_std=EDIT_STD, **options)
        xdit_models[name] = models[name]
    reference = model_class("qwen").from_pretrained(models["qwen"], low_cpu_mem_usage=False)
    xdit_models["qwen"] = root / "qwen_image_edit_2509_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in to_original("qwen", model_tensors(reference)).items()},
              str(xdit_models["qwen"]))
    tensors = edit_inputs()
    cases = []
    for name, (model, latent, n_refs, method, sampler, scheduler) in EDIT_CASES.items():
        case = {"kind": "reference", "model": str(models[model]), "xdit_model": str(xdit_models[model]),
                "latent": {"tensor": f"edit/latent/{latent}"},
                "references": [{"tensor": f"edit/{model}/reference{i}"} for i in range(n_refs)], "method": method,
                "seed": SEED, "steps": EDIT_STEPS, "cfg": EDIT_MODELS[model][3], "sampler_name": sampler,
                "scheduler": scheduler, "positive": edit_branch(model, "positive"),
                "negative": edit_branch(model, "negative")}
        cases.append(dict(case, name=f"edit/{name}/comfy", sampler="comfy"))
        if name in EDIT_XDIT:
            cases.append(dict(case, name=f"edit/{name}/xdit", sampler={"mesh": EDIT_MESH}))
    return run_native(root, python, models, tensors, cases)


def edit_output(comfy_edit, key: str) -> torch.Tensor:
    assert key not in comfy_edit["errors"], comfy_edit["errors"][key]
    return comfy_edit["outputs"][f"{key}/samples"]


def ours_edit(comfy_edit, name: str) -> torch.Tensor:
    """Our engine's serial run of an edit case from the same ComfyUI values, as the xDiT Sampler node converts them
    (nodes.conditioning.branch_from_conditioning: the reference LATENTs through the model's process_in; nodes.sampler:
    the sampled shape, and the LATENT handed back with Qwen's frame axis)."""
    from nodes.conditioning import branch_from_conditioning
    from nodes.sampler import comfy_samples, model_shape
    from xdit_core.loading.load import load_model
    from xdit_core.models import make_adapter
    from xdit_core.runtime.job import run_request
    from xdit_core.sampling.request import build_request

    case, t = comfy_edit["cases"][f"edit/{name}/comfy"], comfy_edit["inputs"]
    model, spec = load_model(comfy_edit["models"][EDIT_CASES[name][0]])
    latent = t[case["latent"]["tensor"]]
    shape = model_shape(spec, latent.shape)

    def conditioning(which):  # what ReferenceLatent (and the method node) make of the branch's CONDITIONING
        branch, extra = case[which], {}
        if "pooled" in branch:
            extra["pooled_output"] = t[branch["pooled"]["tensor"]]
        if "guidance" in branch:
            extra["guidance"] = branch["guidance"]
        if case["references"]:
            extra["reference_latents"] = [t[r["tensor"]] for r in case["references"]]
        if case["method"]:
            extra["reference_latents_method"] = "uxo" if "uxo" in case["method"] else case["method"]
        return branch_from_conditioning(spec, [[t[branch["text"]["tensor"]], extra]], shape, which)

    (pos, guidance), (neg, neg_guidance) = conditioning("positive"), conditioning("negative")
    request = build_request(spec, latent, seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                            sampler=case["sampler_name"], scheduler=case["scheduler"], denoise=1.0, positive=pos,
                            negative=neg, guidance=guidance, negative_guidance=neg_guidance)
    return comfy_samples(spec, run_request(make_adapter(model, spec), request))


def relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((mine - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_comfyui_builds_its_own_edit_model(comfy_edit, name):
    assert comfy_edit["classes"][str(comfy_edit["models"][name])] == EDIT_MODELS[name][2]


@pytest.mark.parametrize("name", EDIT_CASES)
def test_ksampler_with_reference_latents_equals_our_engine(comfy_edit, name):
    """KSampler on ComfyUI's QwenImage / Flux with ReferenceLatent's conditioning against our engine's serial run:
    Qwen's centred positions at an odd token grid, its index / offset references and text after the output's extent;
    Kontext's offset / index / uxo placements; cfg > 1 with a negative that has the references too."""
    key = f"edit/{name}/comfy"
    theirs, case, t = edit_output(comfy_edit, key), comfy_edit["cases"][key], comfy_edit["inputs"]
    for i, ref in enumerate(case["references"]):  # the node set the LATENT as it is (ComfyUI's model processes it)
        assert torch.equal(comfy_edit["outputs"][f"{key}/positive_reference{i}"], t[ref["tensor"]])
    model = EDIT_CASES[name][0]
    expected = EDIT_LATENTS["qwen"] if model == "qwen" else EDIT_LATENTS[model]  # Qwen's LATENT: 5-D
    latent = t[case["latent"]["tensor"]]
    assert tuple(theirs.shape) == expected
    assert torch.isfinite(theirs).all() and (theirs - latent.reshape(expected)).abs().max() > 0.1  # it sampled
    mine = ours_edit(comfy_edit, name)
    assert mine.shape == theirs.shape
    error = relative(mine, theirs)
    print(f"edit {name} engine vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("name", EDIT_XDIT)
def test_xdit_sampler_node_with_reference_latents_equals_comfyuis_ksampler(comfy_edit, name):
    """Our xDiT Sampler node on the workers (Ulysses 2; Qwen loaded from a ComfyUI-style single file) from the same
    CONDITIONING and LATENT as KSampler on ComfyUI's model: the same LATENT back (Qwen's with its frame axis)."""
    theirs, mine = edit_output(comfy_edit, f"edit/{name}/comfy"), edit_output(comfy_edit, f"edit/{name}/xdit")
    assert mine.shape == theirs.shape
    error = relative(mine, theirs)
    print(f"edit {name} xDiT Sampler (ulysses 2) vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("a,b", [("qwen_edit", "qwen_image"), ("qwen_edit", "qwen_edit_offset"),
                                 ("kontext", "kontext_index"), ("kontext", "kontext_uxo"),
                                 ("kontext_index", "kontext_uxo")])
def test_references_and_their_placement_change_comfyuis_result(comfy_edit, a, b):
    """Control: ComfyUI's results with and without references, and with each placement, are far apart, so the
    comparisons above check the references and their positions at TOLERANCE."""
    error = relative(edit_output(comfy_edit, f"edit/{a}/comfy"), edit_output(comfy_edit, f"edit/{b}/comfy"))
    print(f"edit control {a} vs {b}: {error:.2e}")
    assert error > 100 * TOLERANCE, f"{a} vs {b}: relative difference {error:.2e}"


def test_qwen_odd_grid_positions_are_compared(comfy_edit, monkeypatch):
    """Control: with diffusers' QwenEmbedRope positions (an odd row or column count centred one step earlier) our
    run is far from ComfyUI's at the odd 3 x 5 token grid, so the comparison above checks ComfyUI's."""
    from xdit_core.models import qwen

    comfyui_grid = qwen.grid_ids

    def diffusers_grid(rows, cols, index=0, row_offset=0, col_offset=0):
        ids = comfyui_grid(rows, cols, index, row_offset, col_offset)
        ids[:, 1] -= rows % 2
        ids[:, 2] -= cols % 2
        return ids

    monkeypatch.setattr(qwen, "grid_ids", diffusers_grid)
    error = relative(ours_edit(comfy_edit, "qwen_image"), edit_output(comfy_edit, "edit/qwen_image/comfy"))
    print(f"qwen at diffusers' odd-grid positions vs ComfyUI: {error:.2e}")
    assert error > 100 * TOLERANCE, f"relative error {error:.2e}"


# HunyuanDiT against ComfyUI's own HunYuanDiT: "hydit" (v1.2: ComfyUI runs its attention in fp32) and "hydit1" (v1.0/1.1:
# size and style conditioning, ComfyUI's image_meta_size from the latent's size), KSampler on ComfyUI's model against
# our engine's serial run of the same CONDITIONING through the xDiT Sampler's conversion (nodes.conditioning) and against
# our xDiT Sampler node on the workers (Ulysses 2; v1.2 loaded from an original-layout single file, as ComfyUI's
# hunyuan_dit_1.2.safetensors). ComfyUI's model fixes a 1024-wide pooler output (comfy_native.HUNYUAN_POOLED_DIM) and
# takes its other sizes from the unet_config, so these tiny models are 2 heads of 16 over 32-wide CLIP-BERT and
# 48-wide mT5 states, 6 blocks (long skips into blocks 4 and 5). The latent is 12 x 20: 6 x 10 tokens, whose rotary
# crop of the 32 x 32 base grid starts at row 6, where ComfyUI's (numpy's) grid and diffusers' differ. The masks pad the
# last CLIP-BERT and mT5 tokens (the learned padding embeddings replace them); cfg 4 with a negative of its own.
# name: (variant, ComfyUI's model config class)
HUNYUAN_MODELS = {"hydit": ("v1.2", "HunyuanDiT"), "hydit1": ("v1.1", "HunyuanDiT1")}
HUNYUAN_LATENT, HUNYUAN_CFG, HUNYUAN_STD, HUNYUAN_STEPS = (1, 4, 12, 20), 4.0, 0.1, 4
HUNYUAN_REAL_TOKENS = {"positive": (20, 100), "negative": (9, 40)}  # CLIP-BERT of 77, mT5 of 256 real tokens
# name: (model, sampler, scheduler, denoise); img2img from a random latent where denoise < 1
HUNYUAN_CASES = {"hydit/euler": ("hydit", "euler", "normal", 1.0),
                 "hydit/dpmpp_2m": ("hydit", "dpmpp_2m", "karras", 0.75),
                 "hydit1/euler_ancestral": ("hydit1", "euler_ancestral", "simple", 1.0)}
HUNYUAN_XDIT = ("hydit/euler", "hydit1/euler_ancestral")  # also through our xDiT Sampler node on the workers
HUNYUAN_MESH = {"ulysses_degree": 2}


def write_comfy_hunyuan(out: Path, variant: str, seed: int) -> Path:
    """A tiny HunyuanDiT ComfyUI's HunYuanDiT can hold: its pooler's output 1024 wide; random weights as
    write_tiny's (norm scales near 1) at HUNYUAN_STD, so attention mixes the tokens enough for the controls."""
    import diffusers

    from xdit_core.cli.tiny import randomize, tiny_config

    config = tiny_config("hunyuandit", heads=2, hidden_size=32, variant=variant)
    config.update(pooled_projection_dim=1024)
    randomize(diffusers.HunyuanDiT2DModel(**config), seed, HUNYUAN_STD).save_pretrained(out)
    return out


def hunyuan_inputs() -> dict[str, torch.Tensor]:
    """Both branches' CLIP-BERT (77 x 32) and mT5 (256 x 48) states, pooled output and masks (the tail padded), and
    the latents."""
    gen = torch.Generator().manual_seed(17)
    out = {"latent/empty": torch.zeros(HUNYUAN_LATENT), "latent/image": torch.randn(HUNYUAN_LATENT, generator=gen)}
    for which, (clip_real, t5_real) in HUNYUAN_REAL_TOKENS.items():
        out[f"{which}/text"] = torch.randn(1, 77, 32, generator=gen)
        out[f"{which}/pooled"] = torch.randn(1, 32, generator=gen)
        out[f"{which}/t5"] = torch.randn(1, 256, 48, generator=gen)
        out[f"{which}/attention_mask"] = (torch.arange(77) < clip_real).long().unsqueeze(0)
        out[f"{which}/t5_mask"] = (torch.arange(256) < t5_real).long().unsqueeze(0)
    return {f"hunyuan/{k}": v for k, v in out.items()}


def hunyuan_branch(which: str) -> dict:
    return {k: {"tensor": f"hunyuan/{which}/{k}"} for k in ("text", "pooled", "t5", "attention_mask", "t5_mask")}


@pytest.fixture(scope="module")
def comfy_hunyuan(tmp_path_factory):
    """Models, inputs and outputs of the HunyuanDiT cases, from one run of tests/comfy_native.py."""
    python = comfy_python()
    if python is None:
        pytest.skip("no Python with ComfyUI's and comfyui-xdit's requirements (set COMFYUI_PYTHON)")
    from xdit_core.loading.key_mapping import model_tensors, to_original
    from xdit_core.models.families import model_class

    root = tmp_path_factory.mktemp("native_hunyuan")
    models = {name: write_comfy_hunyuan(root / name, variant, seed)
              for seed, (name, (variant, _)) in enumerate(HUNYUAN_MODELS.items(), start=41)}
    single = root / "hunyuan_dit_1.2.safetensors"  # the v1.2 model in Tencent's layout, under the all-in-one prefix
    reference = model_class("hunyuandit").from_pretrained(models["hydit"], low_cpu_mem_usage=False)
    save_file({f"model.diffusion_model.{k}": v.contiguous()
               for k, v in to_original("hunyuandit", model_tensors(reference)).items()}, str(single))
    tensors = hunyuan_inputs()
    cases = []
    for name, (model, sampler, scheduler, denoise) in HUNYUAN_CASES.items():
        case = {"kind": "hunyuan", "model": str(models[model]),
                "xdit_model": str(single if model == "hydit" else models[model]),
                "latent": {"tensor": f"hunyuan/latent/{'empty' if denoise == 1.0 else 'image'}"}, "seed": SEED,
                "steps": HUNYUAN_STEPS, "cfg": HUNYUAN_CFG, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": denoise, "positive": hunyuan_branch("positive"), "negative": hunyuan_branch("negative")}
        cases.append(dict(case, name=f"hunyuan/{name}/comfy", sampler="comfy"))
        if name in HUNYUAN_XDIT:
            cases.append(dict(case, name=f"hunyuan/{name}/xdit", sampler={"mesh": HUNYUAN_MESH}))
    return run_native(root, python, models, tensors, cases)


def hunyuan_output(comfy_hunyuan, key: str) -> torch.Tensor:
    assert key not in comfy_hunyuan["errors"], comfy_hunyuan["errors"][key]
    return comfy_hunyuan["outputs"][f"{key}/samples"]


def ours_hunyuan(comfy_hunyuan, name: str, masks: bool = True) -> torch.Tensor:
    """Our engine's serial run of a HunyuanDiT case from the same CONDITIONING, as the xDiT Sampler node converts it
    (nodes.conditioning.branch_from_conditioning). `masks` False (a control): the masks all ones."""
    from nodes.conditioning import branch_from_conditioning
    from nodes.sampler import comfy_samples, model_shape
    from xdit_core.loading.load import load_model
    from xdit_core.models import make_adapter
    from xdit_core.runtime.job import run_request
    from xdit_core.sampling.request import build_request

    case, t = comfy_hunyuan["cases"][f"hunyuan/{name}/comfy"], comfy_hunyuan["inputs"]
    model, spec = load_model(comfy_hunyuan["models"][HUNYUAN_CASES[name][0]])
    latent = t[case["latent"]["tensor"]]
    shape = model_shape(spec, latent.shape)

    def conditioning(which):
        b = {k: t[v["tensor"]] for k, v in case[which].items()}
        if not masks:
            b.update(attention_mask=torch.ones_like(b["attention_mask"]), t5_mask=torch.ones_like(b["t5_mask"]))
        extra = {"pooled_output": b["pooled"], "attention_mask": b["attention_mask"], "conditioning_mt5xl": b["t5"],
                 "attention_mask_mt5xl": b["t5_mask"]}
        return branch_from_conditioning(spec, [[b["text"], extra]], shape, which)

    (pos, _), (neg, _) = conditioning("positive"), conditioning("negative")
    request = build_request(spec, latent, seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                            sampler=case["sampler_name"], scheduler=case["scheduler"], denoise=case["denoise"],
                            positive=pos, negative=neg)
    return comfy_samples(spec, run_request(make_adapter(model, spec), request))


@pytest.mark.parametrize("name", HUNYUAN_MODELS)
def test_comfyui_builds_its_own_hunyuandit(comfy_hunyuan, name):
    assert comfy_hunyuan["classes"][str(comfy_hunyuan["models"][name])] == HUNYUAN_MODELS[name][1]


@pytest.mark.parametrize("name", HUNYUAN_CASES)
def test_ksampler_on_comfyuis_hunyuandit_equals_our_engine(comfy_hunyuan, name):
    """KSampler on ComfyUI's HunYuanDiT (our weights in Tencent's layout fill every tensor of it) against our engine's
    serial run: v-prediction on ComfyUI's linear betas, its rotary grid at a non-square latent, both text encoders'
    padding embeddings from the masks, v1.1's size and style conditioning, cfg 4."""
    key = f"hunyuan/{name}/comfy"
    theirs, t = hunyuan_output(comfy_hunyuan, key), comfy_hunyuan["inputs"]
    latent = t[comfy_hunyuan["cases"][key]["latent"]["tensor"]]
    assert theirs.shape == latent.shape == HUNYUAN_LATENT
    assert torch.isfinite(theirs).all() and (theirs - latent).abs().max() > 0.1  # it sampled
    error = relative(ours_hunyuan(comfy_hunyuan, name), theirs)
    print(f"hunyuan {name} engine vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("name", HUNYUAN_XDIT)
def test_xdit_sampler_node_equals_comfyuis_ksampler_on_hunyuandit(comfy_hunyuan, name):
    """Our xDiT Sampler node on the workers (Ulysses 2: one head each; v1.2 from its original-layout single file) from
    the same CONDITIONING and LATENT as KSampler on ComfyUI's model."""
    theirs = hunyuan_output(comfy_hunyuan, f"hunyuan/{name}/comfy")
    mine = hunyuan_output(comfy_hunyuan, f"hunyuan/{name}/xdit")
    assert mine.shape == theirs.shape
    error = relative(mine, theirs)
    print(f"hunyuan {name} xDiT Sampler (ulysses 2) vs ComfyUI's KSampler: relative error {error:.2e}")
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


def test_hunyuandit_rotary_grid_and_masks_are_compared(comfy_hunyuan, monkeypatch):
    """Controls: our run with diffusers' rotary positions (torch.linspace to stop (n - 1) / n, which differs from
    ComfyUI's grid where the crop starts off 0), or without the text masks, is far from ComfyUI's, so the comparisons
    above check ComfyUI's grid and the padding embeddings at TOLERANCE."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    from xdit_core.models import hunyuandit

    theirs = hunyuan_output(comfy_hunyuan, "hunyuan/hydit/euler/comfy")
    error = relative(ours_hunyuan(comfy_hunyuan, "hydit/euler", masks=False), theirs)
    print(f"hunyuan without masks vs ComfyUI: {error:.2e}")
    assert error > 100 * TOLERANCE, f"without masks: relative error {error:.2e}"

    def diffusers_rotary(head_dim, rows, cols):
        start, stop = hunyuandit.rope_region(rows, cols)
        return get_2d_rotary_pos_embed(head_dim, (start, stop), (rows, cols), use_real=True, output_type="pt")

    assert hunyuandit.rope_region(6, 10)[0] != (0, 0)  # the crop starts off 0 at this latent
    monkeypatch.setattr(hunyuandit, "rotary", diffusers_rotary)
    error = relative(ours_hunyuan(comfy_hunyuan, "hydit/euler"), theirs)
    print(f"hunyuan at diffusers' rotary positions vs ComfyUI: {error:.2e}")
    assert error > 100 * TOLERANCE, f"diffusers' rotary grid: relative error {error:.2e}"
