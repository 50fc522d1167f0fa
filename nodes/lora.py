"""xDiT LoRA: LoraLoaderModelOnly for a model on the xDiT workers. Chainable; applied at run time on every rank
to the layers it holds, so changing a LoRA or its strength reloads nothing of the base model."""
from __future__ import annotations

from dataclasses import replace

from . import host
from .types import XDiTModel


class XDiTLoRA:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("XDIT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load_lora"
    DESCRIPTION = ("LoraLoaderModelOnly for the xDiT workers: kohya, ai-toolkit, diffusers/PEFT, ComfyUI and BFL "
                   "layouts; chain several. The base weights stay loaded; the LoRA is applied at run time.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "lora_name": (host.lora_files() or ["(no LoRA files found)"],),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        """A listed LoRA, or an absolute path where the server allows them (host.resolve_lora_file)."""
        return host.validate_choice(host.resolve_lora_file, lora_name)

    def load_lora(self, model: XDiTModel, lora_name: str, strength_model: float):
        from xdit_core import api

        if strength_model == 0:  # as LoraLoaderModelOnly: the model unchanged
            return (model,)
        try:
            path = host.resolve_lora_file(lora_name)
            api.check_lora(path, model.path, model.family, model.variant)
        except (api.XDiTError, host.ModelChoiceError) as e:
            raise ValueError(f"xDiT LoRA: {e}") from None
        return (replace(model, loras=model.loras + ((path, float(strength_model)),)),)
