"""xDiT Sampler: KSampler's inputs and math, sampled by the parallel workers."""
from __future__ import annotations

import logging
import math
from dataclasses import replace

from . import host
from .comfy_model import comfy_latent_format
from .conditioning import branch_from_conditioning
from .mesh import check_against_model
from .types import XDiTMesh, XDiTModel

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "lcm", "ddim", "gradient_estimation", "dpmpp_sde",
            "dpmpp_2m_sde", "deis", "res_multistep", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform", "linear_quadratic",
              "kl_optimal"]


def model_shape(spec, shape) -> list[int]:
    """The latent shape the model samples: the model's channels (an empty latent's are fixed), and for a video
    model an image latent as one frame (ComfyUI's fix_empty_latent_channels)."""
    shape = [shape[0], spec.latent_channels, *shape[2:]]
    if spec.one_frame and len(shape) == 5:  # Qwen-Image: sampled as an image, handed back with its frame axis
        return shape[:2] + shape[3:]
    return shape[:2] + [1] + shape[2:] if spec.is_video and len(shape) == 4 else shape


def comfy_samples(spec, latent):
    """A sampled latent (model space) as the LATENT ComfyUI's own sampler returns: a one-frame family's with its
    frame axis (ComfyUI's fix_empty_latent_channels gives it one)."""
    latent = spec.latent_format.process_out(latent)
    return latent.unsqueeze(2) if spec.one_frame and latent.ndim == 4 else latent


def lora_refs(model: XDiTModel) -> tuple:
    """The model's LoRAs for a request, each checked against the model again (cached while the file is unchanged)."""
    from xdit_core import api

    for path, _ in model.loras:
        api.check_lora(path, model.path, model.family, model.variant)
    return tuple(api.LoraRef(path, strength) for path, strength in model.loras)


def plan_run(model: XDiTModel, mesh: XDiTMesh, shape, cfg: float, steps: int, positive, negative,
             pipefusion: bool = True):
    """The checks every run on the workers passes before any worker is asked (the mesh against the model and
    cfg, the LoRAs, the machine's limits for a latent of `shape`); returns (pool key, LoRA refs). `pipefusion`
    False: layout auto leaves PipeFusion out (host-driven sampling)."""
    from xdit_core import api

    parallel = check_against_model(mesh, model, cfg, steps, shape[-2], video=len(shape) == 5, pipefusion=pipefusion)
    loras = lora_refs(model)
    remote = api.uses_cluster(mesh.ray_address)
    placement = None if remote else api.local_placement()  # the GPUs check_against_model gave the workers
    text_tokens = max(c.text.shape[1] for c in (positive, negative) if c is not None)
    if mesh.layout == "auto" and placement is not None and placement.gpus:
        # auto on local GPUs: the memory plan may move to sharded weights or PipeFusion when the model won't fit
        spec = api.describe_model(model.path, model.family, model.variant)
        given = api.memory_budget_override()  # $XDIT_MEMORY_BUDGET_GB, as check_request_fits takes it
        chosen = api.fit_mesh(model.path, model.dtype, parallel, shape, spec=spec, with_negative=negative is not None,
                              text_tokens=text_tokens, keep_fp8=model.keep_fp8,
                              budget=given if given is not None else min(g.total_bytes for g in placement.gpus))
        if chosen != parallel:
            logging.getLogger("xdit").warning("xDiT: layout auto: %s does not fit these GPUs; running %s",
                                              parallel.describe(), chosen.describe())
            parallel = chosen  # and what the workers add on ComfyUI's GPU is that of the sharded mesh
            api.place_workers(placement, model.path, model.dtype, parallel, keep_fp8=model.keep_fp8)
        api.validate_parallel_config(parallel, num_heads=model.num_heads, cfg=cfg, num_blocks=model.num_blocks,
                                     steps=steps, latent_height=shape[-2], video=len(shape) == 5)
    api.check_request_fits(
        model.path, list(shape), parallel, backend="ray", remote=remote, dtype=api.DTYPES[model.dtype],
        attention_backend=mesh.attention_backend, num_blocks=model.num_blocks, with_negative=negative is not None,
        text_tokens=text_tokens, threads=1, family=model.family, variant=model.variant, keep_fp8=model.keep_fp8,
        worker_gpus=None if placement is None else [g.total_bytes for g in placement.gpus])
    key = api.PoolKey(model.path, model.dtype, model.family, model.variant, parallel, mesh.attention_backend,
                      threads=1, keep_fp8=model.keep_fp8)
    return key, loras


def run_sampler(model: XDiTModel, mesh: XDiTMesh, positive, negative, latent_image: dict, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, denoise: float, shift: float, steps_range=None):
    """KSampler's (or KSamplerAdvanced's) run on the workers: ComfyUI values in, the LATENT out."""
    from xdit_core import api

    try:
        spec = api.describe_model(model.path, model.family, model.variant)
        samples = latent_image["samples"]
        api.validate_latent_shape(spec, samples.shape)
        shape = model_shape(spec, samples.shape)
        noise_mask = latent_image.get("noise_mask")
        pos, guidance = branch_from_conditioning(spec, positive, shape, "positive", noise_mask)
        neg = neg_guidance = None
        if not math.isclose(cfg, 1.0):  # at cfg 1 ComfyUI evaluates no negative branch
            neg, neg_guidance = branch_from_conditioning(spec, negative, shape, "negative", noise_mask)
        key, loras = plan_run(model, mesh, shape, cfg, steps, pos, neg)
        request = api.build_request(spec, samples, seed=seed, steps=steps, cfg=cfg, sampler=sampler_name,
                                    scheduler=scheduler, denoise=denoise, positive=pos, negative=neg,
                                    guidance=guidance, negative_guidance=neg_guidance,
                                    shift=None if shift == 0 else shift,
                                    batch_index=latent_image.get("batch_index"),
                                    noise_mask=noise_mask,
                                    steps_range=steps_range or api.StepRange(), loras=loras)
        result = dict(latent_image)
        if request.unsampled is not None:  # an empty step range: KSamplerAdvanced returns the latent as it is
            result["samples"] = request.unsampled.unsqueeze(2) if spec.one_frame else request.unsampled
            return (result,)
        reporter = host.StepReporter(request.steps, comfy_latent_format(model))
        request = replace(request, preview=reporter.wants_previews)
        if host.visible_gpus():
            host.free_comfy_gpu_memory()
        out = api.sample(key, request, mesh.ray_address, on_progress=reporter.progress, cancel=host.interrupted,
                         on_preview=reporter.preview if request.preview else None)
    except api.XDiTCancelled:
        host.raise_interrupted()
    except api.XDiTError as e:
        raise RuntimeError(f"xDiT Sampler: {e}") from None
    result["samples"] = comfy_samples(spec, out)
    return (result,)


SHIFT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                   "tooltip": "model-sampling shift; 0: the family's default (Flux dev 1.15, schnell 1.0, SD3 3.0, "
                              "Wan 8.0, Qwen-Image ModelSamplingFlux 1.15, Z-Image 3.0, FLUX.2 its empirical mu for "
                              "the size and steps; HunyuanDiT and PixArt have none). Qwen-Image: a shift is "
                              "ModelSamplingAuraFlow's"})


class XDiTSampler:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "KSampler on the xDiT workers: same seed and settings, same noise and sigmas; honours noise_mask."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "mesh": ("XDIT_MESH",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS,),
            "scheduler": (SCHEDULERS,),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "shift": SHIFT,
        }}

    def sample(self, model: XDiTModel, mesh: XDiTMesh, positive, negative, latent_image, seed, steps, cfg,
               sampler_name, scheduler, denoise, shift=0.0):
        return run_sampler(model, mesh, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                           denoise, shift)


class XDiTSamplerAdvanced:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = ("KSamplerAdvanced on the xDiT workers: a range of the schedule, with or without fresh noise, "
                   "optionally returning the leftover noise for a next sampler (Wan 2.2's two experts).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "mesh": ("XDIT_MESH",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS,),
            "scheduler": (SCHEDULERS,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
            "shift": SHIFT,
        }}

    def sample(self, model: XDiTModel, mesh: XDiTMesh, add_noise, noise_seed, steps, cfg, sampler_name, scheduler,
               positive, negative, latent_image, start_at_step, end_at_step, return_with_leftover_noise, shift=0.0):
        from xdit_core import api

        steps_range = api.StepRange(add_noise=add_noise == "enable", start_at_step=start_at_step,
                                    end_at_step=end_at_step,
                                    return_with_leftover_noise=return_with_leftover_noise == "enable")
        return run_sampler(model, mesh, positive, negative, latent_image, noise_seed, steps, cfg, sampler_name,
                           scheduler, 1.0, shift, steps_range)
