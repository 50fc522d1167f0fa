"""A weightless ComfyUI MODEL for an xDiT model: ComfyUI's samplers, schedulers and shift nodes see the
family's model sampling and latent format, while the weights stay on the xDiT workers.

BasicScheduler, ModelSamplingFlux / ModelSamplingSD3 and SamplerCustomAdvanced take it like any MODEL; the
xDiT Guider runs its evaluations on the workers. ComfyUI never loads it: it holds no parameters.
"""
from __future__ import annotations

from .types import XDiTModel

# Our family/variant -> ComfyUI's supported-model config class and the model type its model_base uses (and, for
# a model ComfyUI 0.3.64 predates, the sampling settings to give that class: Z-Image takes Lumina 2's flow
# sampling and FLUX.1 VAE format, at its own shift).
COMFY_CONFIGS = {
    ("flux", "dev"): ("Flux", "FLUX"),
    ("flux", "schnell"): ("FluxSchnell", "FLOW"),
    ("sd3", "sd3"): ("SD3", "FLOW"),
    ("pixart", "alpha"): ("PixArtAlpha", "EPS"),
    ("pixart", "sigma"): ("PixArtSigma", "EPS"),
    ("wan", "t2v"): ("WAN21_T2V", "FLOW"),
    ("wan", "i2v"): ("WAN21_I2V", "FLOW"),
    ("wan", "ti2v"): ("WAN22_T2V", "FLOW"),
    ("qwen", "image"): ("QwenImage", "FLUX"),
    ("qwen", "edit_2511"): ("QwenImage", "FLUX"),  # ComfyUI 0.3.64 predates 2511: the same settings
    ("zimage", "zimage"): ("Lumina2", "FLOW", {"multiplier": 1.0, "shift": 3.0}),
    ("hunyuandit", "v1.2"): ("HunyuanDiT", "V_PREDICTION"),
    ("hunyuandit", "v1.1"): ("HunyuanDiT1", "V_PREDICTION"),
}
# Families ComfyUI 0.3.64 has no model config for (no latent format, model sampling or scheduler of theirs): no
# previews, and no weightless MODEL (their schedules run inside the xDiT Sampler nodes).
NO_COMFY_CONFIG = {"flux2": "FLUX.2"}


def weightless_model_class():
    """The torch module class (defined once ComfyUI and torch are importable)."""
    global _WeightlessModel
    if _WeightlessModel is None:
        import torch

        class WeightlessModel(torch.nn.Module):
            """What ComfyUI's sampling code reads from a BaseModel, for a model whose weights live elsewhere."""

            def __init__(self, xdit: XDiTModel, model_config, model_type, model_sampling):
                super().__init__()
                self.xdit = xdit
                self.model_config, self.model_type = model_config, model_type
                self.model_sampling = model_sampling
                self.latent_format = model_config.latent_format
                self.device = torch.device("cpu")

            def process_latent_in(self, latent):
                return self.latent_format.process_in(latent)

            def process_latent_out(self, latent):
                return self.latent_format.process_out(latent)

            def __getattr__(self, name):
                # Anything else of a BaseModel (extra_conds_shapes, apply_model) means a sampler would load and
                # run the model in ComfyUI's process.
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    raise AttributeError(
                        f"the xDiT MODEL has no {name!r}: its weights are on the xDiT workers; sample it with the "
                        "xDiT Guider (SamplerCustomAdvanced) or the xDiT Sampler nodes, not KSampler or "
                        "CFGGuider") from None

        _WeightlessModel = WeightlessModel
    return _WeightlessModel


_WeightlessModel = None


def comfy_latent_format(xdit: XDiTModel):
    """ComfyUI's latent format object for the model's family (previews), or None without ComfyUI."""
    try:
        import comfy.supported_models
    except ImportError:
        return None
    if xdit.family in NO_COMFY_CONFIG:
        return None
    return getattr(comfy.supported_models, COMFY_CONFIGS[(xdit.family, xdit.variant)][0])({}).latent_format


def comfy_model_config(xdit: XDiTModel):
    """ComfyUI's model config object and model type name for the model's family (see COMFY_CONFIGS)."""
    import comfy.supported_models

    if xdit.family in NO_COMFY_CONFIG:
        raise ValueError(f"xDiT Model for ComfyUI Samplers: this ComfyUI has no {NO_COMFY_CONFIG[xdit.family]} model "
                         "sampling or scheduler to drive it with; sample it with the xDiT Sampler nodes, which run "
                         "its own schedule (diffusers' Flux2Pipeline's)")
    class_name, type_name, *settings = COMFY_CONFIGS[(xdit.family, xdit.variant)]
    config = getattr(comfy.supported_models, class_name)({})
    if settings:
        config.sampling_settings = dict(settings[0])
    return config, type_name


def weightless_patcher(xdit: XDiTModel):
    """A ComfyUI ModelPatcher around the weightless model of `xdit`'s family."""
    import comfy.model_base
    import comfy.model_patcher
    import torch

    model_config, type_name = comfy_model_config(xdit)
    model_type = getattr(comfy.model_base.ModelType, type_name)
    model_sampling = comfy.model_base.model_sampling(model_config, model_type)
    model = weightless_model_class()(xdit, model_config, model_type, model_sampling)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu, size=0)


def xdit_model_of(patcher) -> XDiTModel:
    """The xDiT model behind a MODEL made by the xDiT Model for ComfyUI Samplers node, else ValueError."""
    model = getattr(patcher, "model", None)
    xdit = getattr(model, "xdit", None)
    if not isinstance(xdit, XDiTModel):
        raise ValueError("the xDiT Guider needs the MODEL output of 'xDiT Model for ComfyUI Samplers' (a model "
                         "whose weights are on the xDiT workers), not a model ComfyUI loaded itself")
    return xdit


class XDiTSamplingModel:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    DESCRIPTION = ("A weightless MODEL for ComfyUI's sampling nodes (BasicScheduler, ModelSamplingFlux/SD3, the "
                   "xDiT Guider with SamplerCustomAdvanced); the weights stay on the xDiT workers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("XDIT_MODEL",)}}

    def build(self, model: XDiTModel):
        return (weightless_patcher(model),)
