"""The ComfyUI nodes without ComfyUI: import, INPUT_TYPES, validation, and the sampler against the CLI."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.loader import XDiTLoadModel
from nodes.mesh import XDiTParallelMesh
from nodes.lora import XDiTLoRA
from nodes.sampler import XDiTSampler, XDiTSamplerAdvanced
from nodes.types import XDiTMesh
from xdit_core.cli.main import main


@pytest.fixture(autouse=True)
def absolute_model_paths(monkeypatch):
    """These tests name the tiny models by absolute path, as a script would (opted in explicitly)."""
    monkeypatch.setenv("XDIT_ALLOW_ABSOLUTE_MODEL_PATHS", "1")


def test_mappings_and_input_types_are_well_formed():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "xDiT" and isinstance(cls.RETURN_TYPES, tuple) and hasattr(cls, cls.FUNCTION)
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for section in spec.values():
            for widget, entry in section.items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, widget)
                assert isinstance(entry[0], (str, list)), (name, widget)
                assert len(entry) == 1 or isinstance(entry[1], dict), (name, widget)
    ks = XDiTSampler.INPUT_TYPES()["required"]
    for widget in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "positive", "negative",
                   "latent_image"):
        assert widget in ks  # KSampler's names
    assert ks["steps"][1]["default"] == 20 and ks["cfg"][1]["default"] == 8.0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ulysses_degree=2, ring_degree=2, gpu_count=2), "the degrees make 4 ranks"),
    (dict(ulysses_degree=2, use_cfg_parallel=True, gpu_count=8, reserve_gpus=2), "but 6 GPUs are given"),
    (dict(gpu_count=2, reserve_gpus=2), "reserve_gpus 2 leaves none of the 2 GPUs"),
    (dict(ring_degree=0), "ring_degree must be >= 1, got 0"),
])
def test_mesh_widgets_rejected_by_validate_inputs(kwargs, needle):
    result = XDiTParallelMesh.VALIDATE_INPUTS(**kwargs)
    assert isinstance(result, str) and needle in result, result


def test_valid_mesh_widgets_pass():
    assert XDiTParallelMesh.VALIDATE_INPUTS(ulysses_degree=2, ring_degree=2, gpu_count=4) is True
    assert XDiTParallelMesh.VALIDATE_INPUTS(layout="auto", ulysses_degree=1, gpu_count=3) is True


def load(path, family="auto"):
    return XDiTLoadModel().load(str(path), "fp32", family, "auto")[0]


def test_loader_describes_without_loading(tiny_models):
    m = load(tiny_models["pixart_sigma"])
    assert (m.family, m.variant, m.dtype, m.num_heads) == ("pixart", "sigma", "fp32", 4)
    with pytest.raises(ValueError, match="xDiT Load Diffusion Model: model path not found"):
        load(tiny_models["sd3"] / "missing")


def test_auto_mesh_summary_says_what_it_chose(tiny_models):
    mesh_node = XDiTParallelMesh()
    _, flux = mesh_node.build("auto", 1, 1, 1, False, 0, 1, 4, model=load(tiny_models["flux"]))
    assert "auto: cfg 1 x pipefusion 1 x ring 1 x ulysses 4 = 4 ranks" in flux and "Flux" in flux
    _, sd3 = mesh_node.build("auto", 1, 1, 1, False, 0, 1, 4, model=load(tiny_models["sd3"]))
    assert "cfg 2 x pipefusion 2 x ring 1 x ulysses 1 = 4 ranks" in sd3 and "CFG parallel 2 x PipeFusion 2" in sd3


def conditioning(spec_dim, pooled_dim, gen, guidance=None):
    extra = {"pooled_output": torch.randn(1, pooled_dim, generator=gen)} if pooled_dim else {}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, 9, spec_dim, generator=gen), extra]]


def sampler_args(model, mesh, **over):
    gen = torch.Generator().manual_seed(0)
    args = dict(model=model, mesh=mesh, positive=conditioning(32, 32, gen, guidance=2.5),
                negative=conditioning(32, 32, gen), latent_image={"samples": torch.zeros(1, 4, 8, 6)}, seed=7,
                steps=3, cfg=2.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0, shift=0.0)
    args.update(over)
    return args


@pytest.mark.parametrize("mesh,cfg,needle", [
    (XDiTMesh("manual", ulysses_degree=3), 2.0, "ulysses_degree 3 does not divide the model's 4 attention heads"),
    (XDiTMesh("manual", use_cfg_parallel=True), 1.0, "use_cfg_parallel needs cfg != 1"),
    (XDiTMesh("manual", pipefusion_parallel_degree=8), 2.0, "pipefusion_parallel_degree 8 is larger than the "
                                                           "model's 6 blocks"),
])
def test_model_invalid_meshes_fail_at_sampling_start(tiny_models, monkeypatch, mesh, cfg, needle):
    import xdit_core.runtime.pool

    monkeypatch.setattr(xdit_core.runtime.pool, "get_pool", lambda *a, **k: pytest.fail("a pool was started"))
    with pytest.raises(RuntimeError) as e:
        XDiTSampler().sample(**sampler_args(load(tiny_models["flux"]), mesh, cfg=cfg))
    assert needle in str(e.value)


def advanced_args(args, latent, **over):
    keep = {k: args[k] for k in ("model", "mesh", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                  "negative", "shift")}
    base = dict(add_noise="enable", noise_seed=args["seed"], latent_image=latent, start_at_step=0,
                end_at_step=10000, return_with_leftover_noise="disable")
    return {**keep, **base, **over}


def check_advanced_and_mask_on_the_warm_pool(args, full):
    """Two chained xDiT Sampler (Advanced) nodes are the full run (dpmpp_2m restarts its history at the split,
    as ComfyUI's does, so the halves are compared with euler); a noise_mask keeps the latent outside it."""
    whole = dict(args, sampler_name="euler")
    (reference,) = XDiTSampler().sample(**whole)
    (first,) = XDiTSamplerAdvanced().sample(**advanced_args(whole, args["latent_image"], end_at_step=1,
                                                            return_with_leftover_noise="enable"))
    (second,) = XDiTSamplerAdvanced().sample(**advanced_args(whole, first, add_noise="disable", start_at_step=1))
    ref = reference["samples"]
    assert float((second["samples"] - ref).abs().max() / ref.abs().max()) <= 1e-5
    (untouched,) = XDiTSamplerAdvanced().sample(**advanced_args(whole, first, start_at_step=3))
    assert untouched["samples"] is first["samples"]  # nothing left to sample: returned as given, no rank runs
    mask = torch.zeros(1, 64, 48)
    mask[:, :32] = 1  # denoise the top half only
    (masked,) = XDiTSampler().sample(**dict(args, latent_image={"samples": full, "noise_mask": mask}, denoise=0.6))
    out = masked["samples"]
    assert torch.allclose(out[:, :, 4:], full[:, :, 4:], atol=1e-4) and not torch.allclose(out[:, :, :4], full[:, :, :4])
    assert masked["noise_mask"] is mask  # the LATENT keeps its mask, as KSampler's output does


def test_sampler_node_equals_cli_generate(tiny_models, tmp_path):
    import ray

    from xdit_core.runtime import pool

    from lora_files import make_lora, save_lora, write_merged
    from xdit_core.loading.load import load_model

    model = load(tiny_models["flux"])
    mesh = XDiTParallelMesh().build("manual", 2, 1, 1, False, 0, 1, 0)[0]
    args = sampler_args(model, mesh)
    base, _ = load_model(tiny_models["flux"])
    style = make_lora("flux", base, "kohya", seed=3)
    style_file = save_lora(style, tmp_path / "style.safetensors")
    try:
        (latent,) = XDiTSampler().sample(**args)
        check_advanced_and_mask_on_the_warm_pool(args, latent["samples"])
        loads = [s["load_count"] for s in pool._POOL.worker_stats()]
        (styled,) = XDiTSampler().sample(**dict(args, model=XDiTLoRA().load_lora(model, str(style_file), 0.8)[0]))
        (stronger,) = XDiTSampler().sample(**dict(args, model=XDiTLoRA().load_lora(model, str(style_file), 1.5)[0]))
        assert [s["load_count"] for s in pool._POOL.worker_stats()] == loads  # a LoRA change reloads no weights
        (again,) = XDiTSampler().sample(**args)
        assert torch.equal(again["samples"], latent["samples"])  # and leaves nothing behind
    finally:
        pool.unload()
        ray.shutdown()
    pos, neg = args["positive"][0], args["negative"][0]
    save_file({"positive": pos[0], "positive_pooled": pos[1]["pooled_output"], "negative": neg[0],
               "negative_pooled": neg[1]["pooled_output"]}, str(tmp_path / "cond.safetensors"))
    cli_args = ["generate", "--height", "64", "--width", "48", "--steps", "3", "--seed", "7", "--cfg", "2.0",
                "--guidance", "2.5", "--sampler", "dpmpp_2m", "--scheduler", "karras", "--cond",
                str(tmp_path / "cond.safetensors"), "--threads", "1"]
    out = tmp_path / "cli.safetensors"
    assert main(cli_args + ["--model", str(tiny_models["flux"]), "--ulysses_degree", "2", "--out", str(out)]) == 0
    cli = load_file(str(out))["samples"]
    assert latent["samples"].shape == (1, 16, 8, 6)  # the empty 4-channel latent widened as KSampler does
    assert torch.equal(latent["samples"], cli)
    # The LoRA through the node (hooked at run time, 2 ranks) equals it merged into the weights, run serially.
    merged = write_merged(tmp_path / "merged.safetensors", "flux", base, [(style, 0.8)])
    assert main(cli_args + ["--model", str(merged), "--out", str(tmp_path / "merged_out.safetensors")]) == 0
    reference = load_file(str(tmp_path / "merged_out.safetensors"))["samples"]
    assert float((styled["samples"] - reference).abs().max() / reference.abs().max()) <= 1e-5
    assert not torch.allclose(styled["samples"], latent["samples"], atol=1e-3)
    assert not torch.allclose(stronger["samples"], styled["samples"], atol=1e-3)


def test_mesh_validation_keeps_comfyui_checks_for_other_inputs():
    import inspect

    params = inspect.signature(XDiTParallelMesh.VALIDATE_INPUTS).parameters
    assert not any(p.kind == p.VAR_KEYWORD for p in params.values())  # **kwargs would disable ComfyUI's checks
    assert "attention_backend" not in params
    assert "layout must be manual or auto" in XDiTParallelMesh.VALIDATE_INPUTS(layout="bogus")


def test_loader_validation_accepts_listed_names_and_absolute_paths(tiny_models):
    assert XDiTLoadModel.VALIDATE_INPUTS(str(tiny_models["flux"])) is True
    assert "is not in ComfyUI's" in XDiTLoadModel.VALIDATE_INPUTS("diffusion_models/missing.safetensors")


def test_host_callback_exception_stops_every_rank_before_it_propagates(tiny_models):
    """If the host's progress callback raises, the pool stops all ranks first, then re-raises."""
    import ray

    from xdit_core.runtime import pool
    from xdit_core.parallel.mesh import ParallelConfig
    from xdit_core.runtime.pool import PoolKey, get_pool

    class HostInterrupt(Exception):
        pass

    def interrupt(step, n):
        raise HostInterrupt()

    model = load(tiny_models["flux"])
    try:
        p = get_pool(PoolKey(model.path, "fp32", None, None, ParallelConfig(ulysses_degree=2), "auto", 1))
        args = sampler_args(model, XDiTMesh("manual", ulysses_degree=2), steps=200)
        from xdit_core.models.families import resolve_model_spec
        from xdit_core.loading.load import read_model_config
        from xdit_core.sampling.request import build_request
        from nodes.conditioning import branch_from_conditioning

        spec = resolve_model_spec(read_model_config(model.path))
        pos, _ = branch_from_conditioning(spec, args["positive"], [1, spec.latent_channels, 8, 6], "positive")
        neg, _ = branch_from_conditioning(spec, args["negative"], [1, spec.latent_channels, 8, 6], "negative")
        request = build_request(spec, args["latent_image"]["samples"], seed=1, steps=200, cfg=2.0, sampler="euler",
                                scheduler="simple", denoise=1.0, positive=pos, negative=neg)
        with pytest.raises(HostInterrupt):
            p.sample(request, on_progress=interrupt)
        assert ray.get([w.busy.remote() for w in p.workers]) == [False, False]
        steps = [len(s) for s, _ in ray.get([w.poll.remote(p.last_job) for w in p.workers])]
        assert len(set(steps)) == 1 and steps[0] < 200
    finally:
        pool.unload()
        ray.shutdown()


def test_sampler_node_offers_exactly_the_engines_samplers_and_schedulers():
    from nodes.sampler import SAMPLERS, SCHEDULERS
    from xdit_core.sampling import samplers as engine

    assert (tuple(SAMPLERS), tuple(SCHEDULERS)) == (engine.SAMPLERS, engine.SCHEDULERS)
