"""xDiT Load Diffusion Model: describes a model file; the workers load it, ComfyUI never does."""
from __future__ import annotations

from . import host
from .types import XDiTModel

DTYPES = ["default", "bf16", "fp16", "fp32"]
FAMILIES = ["auto", "flux", "sd3", "pixart", "wan", "qwen", "zimage", "flux2"]
VARIANTS = ["auto", "dev", "schnell", "sd3", "alpha", "sigma", "t2v", "i2v", "ti2v", "image", "edit_2511", "zimage",
            "klein"]
FP8_WEIGHTS = ["keep", "upcast"]


def default_dtype() -> str:
    """bf16 on GPUs, fp32 on CPU workers."""
    return "bf16" if host.visible_gpus() else "fp32"


class XDiTLoadModel:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("XDIT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = ("Pick a diffusion transformer for the xDiT workers (nothing is loaded into ComfyUI). Only entries "
                   f"of ComfyUI's model folders; an absolute path (scripts) only if {host.ALLOW_ABSOLUTE_ENV}=1 is "
                   "set where ComfyUI runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.model_files() or ["(no model files found)"],
                           {"tooltip": "from ComfyUI's diffusion_models, checkpoints or diffusers folders; an "
                                       f"absolute path only with {host.ALLOW_ABSOLUTE_ENV}=1 on the server"}),
            "weight_dtype": (DTYPES, {"default": "default"}),
            "family": (FAMILIES, {"default": "auto"}),
            "variant": (VARIANTS, {"default": "auto"}),
        }, "optional": {  # optional: workflows saved before it still load and validate
            "fp8_weights": (FP8_WEIGHTS, {"default": "keep",
                                          "tooltip": "a file's fp8 weights: keep them fp8 on the workers (upcast per "
                                                     "layer as used, the same results) or upcast them at load "
                                                     "(twice the memory at bf16)"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        """A listed model, or an absolute path where the server allows them (host.resolve_model_file)."""
        return host.validate_choice(host.resolve_model_file, model_name)

    def load(self, model_name: str, weight_dtype: str, family: str, variant: str, fp8_weights: str = "keep"):
        from xdit_core import api

        try:
            path = host.resolve_model_file(model_name)
            spec = api.describe_model(path, None if family == "auto" else family,
                                      None if variant == "auto" else variant)
        except (api.XDiTError, host.ModelChoiceError) as e:
            raise ValueError(f"xDiT Load Diffusion Model: {e}") from None
        dtype = default_dtype() if weight_dtype == "default" else weight_dtype
        return (XDiTModel(path, dtype, spec.family, spec.variant, spec.num_heads, spec.num_blocks,
                          keep_fp8=fp8_weights == "keep"),)
