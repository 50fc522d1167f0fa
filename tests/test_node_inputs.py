"""Bad node inputs fail with one clear line and start no process; the Load node takes only entries of ComfyUI's
model folders (absolute paths only when the server opts in) and never leaves them through `..`.

ComfyUI is faked: a `folder_paths` module whose roots are temporary folders, listed as ComfyUI lists them."""
import json
import math
import os
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import netprobe
from nodes import host
from nodes.loader import XDiTLoadModel
from nodes.mesh import XDiTParallelMesh
from nodes.sampler import XDiTSampler
from nodes.types import XDiTMesh

ENV = "XDIT_ALLOW_ABSOLUTE_MODEL_PATHS"
PREFIX = "xDiT Load Diffusion Model: "


def child_pids() -> set[int]:
    """The processes below this one that are still running."""
    return netprobe.live_descendants()


@pytest.fixture(autouse=True)
def no_child_process(monkeypatch):
    """Every case here must fail (or succeed) before any worker exists: no pool, no new child process."""
    import xdit_core.runtime.pool

    monkeypatch.setattr(xdit_core.runtime.pool, "get_pool", lambda *a, **k: pytest.fail("a worker pool was started"))
    before = child_pids()
    yield
    assert child_pids() <= before, "the node started a child process"


def fake_folder_paths(roots: dict[str, list[Path]]) -> types.ModuleType:
    """ComfyUI's folder_paths over `roots`: files listed relative to their root, links followed (os.walk's
    followlinks, as ComfyUI does), '/'-separated."""
    module = types.ModuleType("folder_paths")

    def get_folder_paths(kind):
        return [str(r) for r in roots.get(kind, [])]

    def get_filename_list(kind):
        names = set()
        for root in roots.get(kind, []):
            for dirpath, _, files in os.walk(root, followlinks=True):
                names.update(Path(dirpath, f).relative_to(root).as_posix() for f in files)
        return sorted(names)

    def get_full_path(kind, name):
        for root in roots.get(kind, []):
            path = Path(root) / name
            if path.is_file():
                return str(path)
        return None

    module.get_folder_paths, module.get_filename_list = get_folder_paths, get_filename_list
    module.get_full_path = get_full_path
    return module


@pytest.fixture()
def comfy(tmp_path, monkeypatch, tiny_models):
    """models/{diffusion_models,diffusers} here, checkpoints through a root that is itself a link (another disk),
    and files outside every root that links inside point to."""
    models, outside, disk = tmp_path / "comfy" / "models", tmp_path / "outside", tmp_path / "disk"
    dm, df, ck = models / "diffusion_models", models / "diffusers", disk / "checkpoints"
    for d in (dm, df, ck, outside):
        d.mkdir(parents=True)
    weights = tiny_models["flux"] / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, dm / "tiny.safetensors")
    shutil.copy(weights, ck / "ckpt.safetensors")
    (models / "checkpoints").symlink_to(ck, target_is_directory=True)
    shutil.copytree(tiny_models["flux"], df / "flux")
    shutil.copytree(tiny_models["sd3"], df / "pipe" / "transformer")
    (df / "pipe" / "model_index.json").write_text("{}")
    shutil.copytree(tiny_models["flux"], outside / "flux")
    shutil.copy(weights, outside / "secret.safetensors")
    (df / "broken").mkdir()
    (df / "broken" / "config.json").write_text("{not json")
    (df / "unet").mkdir()
    (df / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    shutil.copy(weights, df / "unet" / "diffusion_pytorch_model.safetensors")
    (df / "no_weights").mkdir()
    shutil.copy(tiny_models["sd3"] / "config.json", df / "no_weights" / "config.json")
    # Links: files that leave the model folders (one to an existing file, one dangling), folders that do, and
    # one from a model folder to another model folder (allowed).
    (dm / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (dm / "dangling.safetensors").symlink_to(outside / "missing.safetensors")
    (df / "escaped").symlink_to(outside / "flux", target_is_directory=True)
    (dm / "sub").symlink_to(outside, target_is_directory=True)  # a linked folder in the middle of the path
    (dm / "from_ckpt.safetensors").symlink_to(ck / "ckpt.safetensors")
    loras = models / "loras"
    loras.mkdir()
    roots = {"diffusion_models": [dm], "checkpoints": [models / "checkpoints"], "diffusers": [df], "loras": [loras]}
    monkeypatch.setitem(sys.modules, "folder_paths", fake_folder_paths(roots))
    monkeypatch.delenv(ENV, raising=False)
    return types.SimpleNamespace(models=models, dm=dm, df=df, ck=ck, outside=outside, tiny=tiny_models, loras=loras)


def refusal(name: str) -> str:
    """The Load node's answer to `name`: VALIDATE_INPUTS' message, checked equal to load()'s error."""
    message = XDiTLoadModel.VALIDATE_INPUTS(name)
    assert isinstance(message, str), f"{name!r} was accepted"
    with pytest.raises(ValueError) as e:
        XDiTLoadModel().load(name, "fp32", "auto", "auto")
    assert str(e.value) == PREFIX + message
    assert "\n" not in message
    return message


def load_error(name: str, family: str = "auto", variant: str = "auto") -> str:
    with pytest.raises(ValueError) as e:
        XDiTLoadModel().load(name, "fp32", family, variant)
    message = str(e.value)
    assert message.startswith(PREFIX) and "\n" not in message, message
    return message


def test_listed_entries_resolve_inside_their_roots(comfy):
    listed = host.model_files()
    assert {"diffusion_models/tiny.safetensors", "checkpoints/ckpt.safetensors", "diffusers/flux",
            "diffusers/pipe/transformer", "diffusion_models/escape.safetensors", "diffusers/escaped"} <= set(listed)
    # A checkpoints root that is a link to another disk is a model folder: its entries resolve to the disk.
    expect = {"diffusion_models/tiny.safetensors": comfy.dm.resolve() / "tiny.safetensors",
              "checkpoints/ckpt.safetensors": comfy.ck.resolve() / "ckpt.safetensors",
              "diffusion_models/from_ckpt.safetensors": comfy.ck.resolve() / "ckpt.safetensors",
              "diffusers/flux": comfy.df.resolve() / "flux",
              "diffusers/pipe/transformer": comfy.df.resolve() / "pipe" / "transformer"}
    for name, path in expect.items():
        assert XDiTLoadModel.VALIDATE_INPUTS(name) is True, name
        assert host.resolve_model_file(name) == str(path)


def test_listed_diffusers_entries_load(comfy):
    flux = XDiTLoadModel().load("diffusers/flux", "fp32", "auto", "auto")[0]
    assert (flux.family, flux.variant, flux.num_heads) == ("flux", "dev", 4)
    assert flux.path == str(comfy.df.resolve() / "flux")
    sd3 = XDiTLoadModel().load("diffusers/pipe/transformer", "fp32", "auto", "auto")[0]
    assert sd3.family == "sd3"


def test_absolute_paths_are_refused_alike_whether_they_exist_or_not(comfy):
    existing = [str(comfy.outside / "secret.safetensors"), str(comfy.outside / "flux"), str(comfy.tiny["flux"]),
                str(comfy.dm / "tiny.safetensors"), "/etc/passwd"]
    missing = [str(comfy.outside / "missing.safetensors"), "/nonexistent/xdit/model", str(comfy.dm / "nope")]
    template = refusal("/x")
    for name in existing + missing:
        assert refusal(name) == template.replace(repr("/x"), repr(name)), name
    assert ENV in template and "exist" not in template and "not found" not in template


def test_absolute_paths_with_the_servers_opt_in_read_at_call_time(comfy, monkeypatch):
    path = str(comfy.tiny["flux"])
    for value in ("0", "true", ""):  # only "1" opts in
        monkeypatch.setenv(ENV, value)
        refusal(path)
    monkeypatch.setenv(ENV, "1")
    assert XDiTLoadModel.VALIDATE_INPUTS(path) is True
    assert XDiTLoadModel().load(path, "fp32", "auto", "auto")[0].family == "flux"
    # With the opt-in the engine may say that a path is missing: the operator asked for paths.
    assert "model path not found" in load_error(str(comfy.outside / "missing"))
    assert "has no config.json" in load_error(str(comfy.outside))
    monkeypatch.delenv(ENV)
    refusal(path)


@pytest.mark.parametrize("name", [
    "diffusers/../x",
    "diffusers/../../../outside/flux",  # exists
    "diffusers/flux/../../../../outside/flux",
    "diffusion_models/../../etc/passwd",
    "diffusion_models/../../../../../../../../../etc/passwd",
    "diffusion_models/..\\..\\..\\outside\\secret.safetensors",
    "checkpoints/../diffusion_models/tiny.safetensors",  # inside the models, but not how the list names it
    "diffusion_models//tiny.safetensors",
    "diffusion_models/./tiny.safetensors",
    "../outside/secret.safetensors",
    "diffusers",
    "diffusers/",
    "",
    "unet/tiny.safetensors",
    "diffusers/flux\nerror: forged second line",
])
def test_names_outside_the_list_are_refused_without_probing(comfy, name):
    message = refusal(name)
    assert message == refusal("diffusers/x").replace(repr("diffusers/x"), repr(name))


@pytest.mark.parametrize("name", ["diffusers/flux\0", "diffusion_models/tiny.safetensors\0.txt", "\0", "/etc/passwd\0"])
def test_nul_bytes_are_refused(comfy, monkeypatch, name):
    assert "NUL byte" in refusal(name)
    monkeypatch.setenv(ENV, "1")  # an allowed absolute path with a NUL still gets the one line, not a crash
    assert "NUL byte" in refusal(name)


def test_links_inside_the_model_folders_are_followed_as_comfyui_does(comfy):
    """Links are the owner's (a big file on another disk): followed like ComfyUI's own loaders follow them."""
    outside = comfy.dm.resolve().parents[2] / "outside"
    assert host.resolve_model_file("diffusion_models/escape.safetensors") == str(outside / "secret.safetensors")
    assert host.resolve_model_file("diffusion_models/sub/secret.safetensors") == str(outside / "secret.safetensors")
    assert host.resolve_model_file("diffusers/escaped") == str(outside / "flux")
    assert "is no longer in ComfyUI's diffusion_models folders" in refusal("diffusion_models/dangling.safetensors")


def test_unknown_family_or_variant_is_one_line(comfy):
    assert "unknown family 'bogus'; valid families: flux, sd3, pixart" in load_error("diffusers/flux", family="bogus")
    assert "unknown variant 'sigma' for flux" in load_error("diffusers/flux", variant="sigma")


def test_broken_or_foreign_config_is_one_line(comfy):
    assert "config.json is not valid JSON" in load_error("diffusers/broken")
    assert "unknown model class 'UNet2DConditionModel'" in load_error("diffusers/unet")
    assert "holds no .safetensors weight file" in load_error("diffusers/no_weights")


@pytest.mark.parametrize("family,variant,words", [
    ("sd3", "auto", ("sd3", "flux")),  # a Flux file described as SD3
    ("pixart", "auto", ("pixart", "flux")),
    ("auto", "schnell", ("schnell", "dev")),  # Flux dev (guidance embedding) named schnell
])
def test_family_or_variant_contradicting_the_file_is_one_line(comfy, family, variant, words):
    message = load_error("diffusers/flux", family, variant)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ulysses_degree=-2), "ulysses_degree must be >= 1, got -2"),
    (dict(pipefusion_parallel_degree=0), "pipefusion_parallel_degree must be >= 1, got 0"),
    (dict(num_pipeline_patch=-1), "num_pipeline_patch (-1) and warmup_steps (1) must be >= 0"),
    (dict(warmup_steps=-3), "num_pipeline_patch (0) and warmup_steps (-3) must be >= 0"),
    (dict(ulysses_degree=3, ring_degree=2, gpu_count=4), "the degrees make 6 ranks"),
    (dict(ulysses_degree=2, gpu_count=4, reserve_gpus=5), "reserve_gpus 5 leaves none of the 4 GPUs"),
    (dict(ray_address="http://head:6379"), "is not host:port"),
    (dict(ray_address="head:99999"), "is not host:port"),
])
def test_mesh_widgets_that_do_not_fit(kwargs, needle):
    message = XDiTParallelMesh.VALIDATE_INPUTS(**kwargs)
    assert isinstance(message, str) and needle in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------
# The Sampler: every case fails before a pool is asked for (no_child_process).
# ---------------------------------------------------------------------------------------------

def conditioning(gen, text=None, pooled=None, guidance=None):
    extra = {"pooled_output": torch.randn(1, 32, generator=gen) if pooled is None else pooled}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, 9, 32, generator=gen) if text is None else text, extra]]


def sample_error(comfy, **over) -> str:
    gen = torch.Generator().manual_seed(0)
    model = XDiTLoadModel().load("diffusers/flux", "fp32", "auto", "auto")[0]
    args = dict(model=model, mesh=XDiTMesh("manual"), positive=conditioning(gen, guidance=3.5),
                negative=conditioning(gen), latent_image={"samples": torch.zeros(1, 16, 8, 6)}, seed=7, steps=3,
                cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0, shift=0.0)
    args.update(over)
    with pytest.raises((RuntimeError, ValueError)) as e:
        XDiTSampler().sample(**args)
    message = str(e.value)
    assert "\n" not in message, message
    return message


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("over,needle", [
    (dict(mesh=XDiTMesh("manual", ulysses_degree=8)), "ulysses_degree 8 does not divide the model's 4 attention heads"),
    (dict(steps=0), "steps must be at least 1, got 0"),
    (dict(denoise=NAN), "denoise must be in (0, 1], got nan"),
    (dict(sampler_name="lms"), "unknown sampler 'lms'"),
    (dict(cfg=NAN), "cfg must be a finite number, got nan"),
    (dict(cfg=INF), "cfg must be a finite number, got inf"),
    (dict(shift=NAN), "shift must be a finite number, got nan"),
    (dict(shift=INF), "shift must be a finite number, got inf"),
    (dict(latent_image={"samples": torch.zeros(16, 8)}), "latent has shape [16, 8]"),  # the shape given
    (dict(latent_image={"samples": torch.zeros(16, 8, 6)}), "latent has shape [16, 8, 6]"),
    (dict(latent_image={"samples": torch.zeros(1, 16, 8, 6), "batch_index": [-1]}), "batch_index"),
    (dict(positive=conditioning(torch.Generator(), text=torch.full((1, 9, 32), NAN))), "tensor 'positive' holds 288 NaN or inf values"),
    (dict(positive=conditioning(torch.Generator(), pooled=torch.full((1, 32), INF))), "tensor 'positive pooled_output' holds 32 NaN or inf values"),
    (dict(positive=conditioning(torch.Generator(), guidance=NAN)), "guidance must be a finite number, got nan"),
    (dict(mesh=XDiTMesh("manual", ring_degree=64)), "the mesh needs 64 ranks but this machine runs at most"),
    (dict(mesh=XDiTMesh("manual", attention_backend="flash")), "attention backend 'flash' needs"),
], ids=["ulysses-heads", "steps-0", "denoise-nan", "sampler", "cfg-nan", "cfg-inf", "shift-nan", "shift-inf",
        "latent-2d", "latent-3d", "batch-index-negative", "cond-nan", "pooled-inf", "guidance-nan",
        "rank-cap", "flash-on-cpu"])
def test_sampler_inputs_fail_before_any_worker(comfy, over, needle):
    message = sample_error(comfy, **over)
    assert needle.lower() in message.lower(), message


def test_sampler_refuses_a_latent_beyond_the_memory_budget(comfy, monkeypatch):
    monkeypatch.setenv("XDIT_MEMORY_BUDGET_GB", "1")
    message = sample_error(comfy, latent_image={"samples": torch.zeros(1, 16, 512, 512)})
    assert "but the memory budget is 1.0 GiB ($XDIT_MEMORY_BUDGET_GB)" in message, message


def with_keys(**keys):
    cond = conditioning(torch.Generator().manual_seed(1), guidance=3.5)
    cond[0][1].update(keys)
    return cond


@pytest.mark.parametrize("over,needle", [
    (dict(positive=with_keys(control=object())), "'control', which the xdit samplers do not apply: controlnet"),
    (dict(negative=with_keys(start_percent=0.2)), "negative conditioning has the key 'start_percent'"),
    (dict(positive=with_keys(reference_latents=[torch.zeros(1, 4, 8, 6)])), "reference latent 0 has shape [1, 4, 8, 6]"),
    (dict(positive=with_keys(area=(8, 8, 0, 0), strength=1.0)), "area conditioning is not supported yet"),
    (dict(positive=with_keys(some_new_key=1)),
     "apply only guidance, pooled_output, reference_latents, reference_latents_method for flux"),
    (dict(positive=with_keys() + with_keys()), "positive conditioning has 2 entries"),
    (dict(latent_image={"samples": torch.zeros(1, 16, 8, 6), "noise_mask": torch.zeros(2, 3, 8, 8)}),
     "noise_mask has shape [2, 3, 8, 8]"),
    (dict(latent_image={"samples": torch.zeros(1, 16, 8, 6), "noise_mask": torch.full((8, 8), NAN)}),
     "noise_mask"),
], ids=["controlnet", "timestep-range", "reference-latents", "area", "unknown-key", "combined", "mask-shape",
        "mask-nan"])
def test_conditioning_keys_and_masks_the_engine_cannot_apply_are_refused(comfy, over, needle):
    assert needle.lower() in sample_error(comfy, **over).lower()


def test_no_op_and_ignored_keys_are_accepted():
    from nodes.conditioning import check_keys

    check_keys("flux", {"pooled_output": 1, "guidance": 3.5, "start_percent": 0.0, "end_percent": 1.0,
                        "strength": 1.0}, "positive", 64, 48)
    check_keys("sd3", {"pooled_output": 1, "guidance": 3.5}, "positive", 64, 48)  # ComfyUI's SD3 ignores guidance
    check_keys("pixart", {"pooled_output": None, "width": 48, "height": 64, "aspect_ratio": 64 / 48}, "positive", 64, 48)
    with pytest.raises(ValueError, match="conditions PixArt on the latent's size"):
        check_keys("pixart", {"width": 1024, "height": 1024}, "positive", 64, 48)


def test_guider_refuses_pipefusion_and_bad_conditioning_before_any_worker(comfy):
    from nodes.guider import prepare

    model = XDiTLoadModel().load("diffusers/flux", "fp32", "auto", "auto")[0]
    good = {"positive": with_keys(), "negative": with_keys()}
    cases = [
        (dict(mesh=XDiTMesh("manual", pipefusion_parallel_degree=2)), "PipeFusion runs the sampling loop inside"),
        (dict(conds={**good, "positive": with_keys(control=object())}), "'control', which the xdit samplers"),
        (dict(conds={**good, "negative": with_keys(guidance=math.nan)}), "negative guidance must be a finite"),
        (dict(shape=(1, 16, 8, 5)), "width 40 is not a multiple of 16"),
    ]
    for over, needle in cases:
        args = {"xdit": model, "mesh": XDiTMesh("manual"), "conds": good, "cfg": 2.0, "shape": (1, 16, 8, 6),
                "steps": 4, **over}
        with pytest.raises(RuntimeError) as e:
            prepare(**args)
        assert str(e.value).startswith("xDiT Guider: ") and needle.lower() in str(e.value).lower(), str(e.value)


def test_lora_node_takes_listed_files_of_the_models_family_only(comfy):
    from lora_files import make_lora, save_lora
    from nodes.lora import XDiTLoRA
    from xdit_core.loading.load import load_model

    flux = XDiTLoadModel().load("diffusers/flux", "fp32", "auto", "auto")[0]
    save_lora(make_lora("flux", load_model(comfy.tiny["flux"])[0], "kohya"), comfy.loras / "flux_style.safetensors")
    save_lora(make_lora("sd3", load_model(comfy.tiny["sd3"])[0], "peft"), comfy.loras / "sd3_style.safetensors")
    (styled,) = XDiTLoRA().load_lora(flux, "flux_style.safetensors", 0.7)
    assert styled.loras == ((str((comfy.loras / "flux_style.safetensors").resolve()), 0.7),)
    assert XDiTLoRA().load_lora(flux, "flux_style.safetensors", 0.0)[0] is flux  # strength 0: unchanged
    assert "is not in ComfyUI's loras folders" in XDiTLoRA.VALIDATE_INPUTS("../flux_style.safetensors")
    with pytest.raises(ValueError, match="xDiT LoRA: .*sd3"):
        XDiTLoRA().load_lora(flux, "sd3_style.safetensors", 1.0)
    message = sample_error(comfy, model=replace(styled, loras=((styled.loras[0][0], math.inf),)))
    assert "strength of LoRA" in message and "must be a finite number" in message


def test_flux_disable_guidance_is_refused_not_run_at_the_default(comfy):
    assert "FluxDisableGuidance" in sample_error(comfy, positive=with_keys(guidance=None))


def test_guider_names_model_patches_the_workers_cannot_apply():
    from nodes.guider import unsupported_patches

    def patcher(**options):
        return types.SimpleNamespace(patches={}, model_options=options, object_patches={"model_sampling": object()})

    assert unsupported_patches(patcher()) == []  # a shift node's object patch reaches the workers' math
    assert "cond batch function" in unsupported_patches(patcher(sampler_calc_cond_batch_function=print))[0]
    assert "transformer patches_replace (dit)" in unsupported_patches(
        patcher(transformer_options={"patches_replace": {"dit": {}}}))[0]


def test_a_failing_preview_turns_previews_off_and_never_stops_sampling():
    reporter = host.StepReporter(3)  # without ComfyUI: no bar, no previewer
    reporter.device = torch.device("cpu")
    reporter.previewer = types.SimpleNamespace(decode_latent_to_preview_image=lambda fmt, x0: 1 / 0)
    reporter.preview(1, torch.zeros(1, 16, 2, 2))
    assert reporter.previewer is None and not reporter.wants_previews
    reporter.progress(1, 3)
