"""xDiT Guider: a GUIDER for ComfyUI's SamplerCustomAdvanced whose model evaluations run on the xDiT workers.

ComfyUI's own sampler, SIGMAS and NOISE drive the loop here, in the ComfyUI process, with ComfyUI's model
sampling (as patched by ModelSampling* nodes) and CFG function (so post-CFG hooks, and with them the CFG++
samplers, see both branch predictions). Each evaluation sends the scaled latent and timestep to the ranks,
which keep the weights and the prompt's conditioning, and gets both branches' raw outputs back. The model is
never loaded here: `sample` replaces CFGGuider's, which would load it.
"""
from __future__ import annotations

import math

from . import host
from .comfy_model import xdit_model_of
from .conditioning import branch_from_conditioning
from .sampler import model_shape, plan_run
from .types import XDiTMesh, XDiTModel


class SamplingView:
    """What ComfyUI's sampler objects read from the guider's `inner_model`, with the patched model sampling."""

    def __init__(self, patcher, spec):
        self.model_sampling = patcher.get_model_object("model_sampling")
        self.latent_format = patcher.get_model_object("latent_format")
        self.spec = spec  # the engine's ModelSpec of the model

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)

    def __getattr__(self, name):
        # Anything else of a BaseModel (apply_model, current_patcher) would run the model here, in ComfyUI.
        raise AttributeError(f"the xDiT Guider's model has no {name!r}: a node that runs the model again inside "
                             "sampling (SkipLayerGuidanceDiT and the like) cannot reach the xDiT workers")

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
        """ComfyUI's BaseModel.scale_latent_inpaint for our families: the input latent noised to sigma (Wan 2.2
        5B's WAN22: the clean input latent)."""
        if self.spec.frame_timesteps:
            return latent_image
        return self.model_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (len(noise.shape) - 1)),
                                                 noise, latent_image)


def unsupported_patches(patcher) -> list[str]:
    """ComfyUI patches on the MODEL that would change the result but cannot reach the workers."""
    found = []
    if patcher.patches:
        found.append("weight patches (LoRA or model merging: use the xDiT LoRA node)")
    options = patcher.model_options
    if options.get("model_function_wrapper") is not None:
        found.append("a model function wrapper")
    if options.get("sampler_calc_cond_batch_function") is not None:
        found.append("a replaced cond batch function (SkipLayerGuidanceDiTSimple and the like)")
    transformer = options.get("transformer_options", {})
    for key in ("patches", "patches_replace"):
        if transformer.get(key):
            found.append(f"transformer {key} ({', '.join(sorted(transformer[key]))})")
    extra = sorted(set(patcher.object_patches) - {"model_sampling"})
    if extra:
        found.append(f"object patches ({', '.join(extra)})")
    return found


def guider_class():
    """CFGGuider's subclass (defined once ComfyUI is importable)."""
    global _XDiTCFGGuider
    if _XDiTCFGGuider is not None:
        return _XDiTCFGGuider
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sampler_helpers
    import comfy.samplers
    import torch

    class XDiTCFGGuider(comfy.samplers.CFGGuider):
        def __init__(self, model_patcher, mesh: XDiTMesh):
            super().__init__(model_patcher)
            self.mesh = mesh
            self.evaluate = self.denoise_mask = None
            self.raw_conds: dict = {}

        def inner_set_conds(self, conds):
            super().inner_set_conds(conds)
            self.raw_conds.update(conds)  # ComfyUI's CONDITIONING as given, for the engine's conversion

        def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None):
            if sigmas.shape[-1] == 0:
                return latent_image
            xdit = xdit_model_of(self.model_patcher)
            patches = unsupported_patches(self.model_patcher)
            if patches:
                raise RuntimeError(f"xDiT Guider: the MODEL carries {'; '.join(patches)}, which the xDiT workers "
                                   "do not apply; remove those nodes between the xDiT model and the guider")
            key, positive, negative, loras, spec = prepare(xdit, self.mesh, self.raw_conds, self.cfg, noise.shape,
                                                    sigmas.shape[-1] - 1, denoise_mask)
            self.inner_model = SamplingView(self.model_patcher, spec)
            if denoise_mask is not None:
                denoise_mask = comfy.sampler_helpers.prepare_mask(denoise_mask, noise.shape, noise.device)
            self.denoise_mask = denoise_mask  # Wan 2.2 5B takes its timestep per frame from it
            if torch.count_nonzero(latent_image) > 0:  # as CFGGuider: the empty latent is not shifted
                latent_image = self.inner_model.process_latent_in(latent_image)
            options = comfy.model_patcher.create_model_options_clone(self.model_options)
            options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            extra_args = {"model_options": options, "seed": seed}
            from xdit_core import api

            try:
                with api.evaluations(key, positive, negative, self.mesh.ray_address, loras) as evaluate:
                    self.evaluate = evaluate
                    samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                             disable_pbar)
            except api.XDiTError as e:
                raise RuntimeError(f"xDiT Guider: {e}") from None
            finally:
                self.evaluate = None
            return self.inner_model.process_latent_out(samples.to(torch.float32))

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            mm.throw_exception_if_processing_interrupted()  # cancel lands between evaluations
            ms = self.inner_model.model_sampling
            # As sampling_function: at cfg 1 the negative is not evaluated (its prediction reads as zeros) unless
            # a sampler (the CFG++ ones) asks for it.
            skip_negative = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            with_negative = not skip_negative and "negative" in self.original_conds
            spec = self.inner_model.spec
            model_timestep = spec.model_timestep(ms.timestep(timestep).float(), self.denoise_mask)
            xin = ms.calculate_input(timestep, x)
            one_frame = spec.one_frame and xin.ndim == 5  # Qwen-Image: the workers sample [B, C, h, w]
            cond_out, uncond_out = self.evaluate(xin[:, :, 0] if one_frame else xin, model_timestep, with_negative)
            if one_frame:
                cond_out = cond_out.unsqueeze(2)
                uncond_out = None if uncond_out is None else uncond_out.unsqueeze(2)
            cond_pred = ms.calculate_denoised(timestep, cond_out.to(x.device), x)
            uncond_pred = (ms.calculate_denoised(timestep, uncond_out.to(x.device), x) if with_negative
                           else torch.zeros_like(x))
            cond = self.original_conds.get("positive")
            uncond = None if skip_negative else self.original_conds.get("negative")
            out = [cond_pred, uncond_pred]
            for fn in model_options.get("sampler_pre_cfg_function", []):
                out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                          "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
            return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=cond, uncond=uncond)

    _XDiTCFGGuider = XDiTCFGGuider
    return _XDiTCFGGuider


_XDiTCFGGuider = None


def prepare(xdit: XDiTModel, mesh: XDiTMesh, conds: dict, cfg: float, shape, steps: int, noise_mask=None):
    """Every check before a worker is asked (the conditioning as the engine takes it, the mesh, the memory);
    returns (pool key, positive, negative or None, LoRAs, the model's spec)."""
    from xdit_core import api

    try:
        spec = api.describe_model(xdit.path, xdit.family, xdit.variant)
        api.validate_latent_shape(spec, shape, "noise")
        shape = model_shape(spec, shape)

        def branch(name: str):
            cond, guidance = branch_from_conditioning(spec, conds[name], shape, name, noise_mask)
            return api.with_guidance(spec, cond, guidance, "guidance" if name == "positive" else "negative guidance")

        positive = branch("positive")
        negative = branch("negative") if conds.get("negative") else None
        if mesh.pipefusion_parallel_degree > 1:
            raise api.XDiTConfigError("PipeFusion runs the sampling loop inside the ranks, so it cannot serve "
                                      "ComfyUI's samplers: use a mesh without PipeFusion with the xDiT Guider, or "
                                      "the xDiT Sampler nodes for PipeFusion")
        # layout auto leaves PipeFusion out here: it cannot serve ComfyUI's samplers
        key, loras = plan_run(xdit, mesh, shape, cfg if negative is not None else 1.0, steps, positive, negative,
                              pipefusion=False)
    except api.XDiTError as e:
        raise RuntimeError(f"xDiT Guider: {e}") from None
    if host.visible_gpus():
        host.free_comfy_gpu_memory()
    return key, positive, negative, loras, spec


class XDiTGuider:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = ("CFGGuider whose model evaluations run on the xDiT workers (Ulysses, Ring and CFG parallel): any "
                   "ComfyUI sampler, SIGMAS and NOISE through SamplerCustomAdvanced.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the MODEL of 'xDiT Model for ComfyUI Samplers' (optionally through "
                                           "ModelSamplingFlux / ModelSamplingSD3)"}),
            "mesh": ("XDIT_MESH",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        }}

    def get_guider(self, model, mesh: XDiTMesh, positive, negative, cfg):
        xdit_model_of(model)
        guider = guider_class()(model, mesh)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)
