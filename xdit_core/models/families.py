"""The model families the engine knows: how to recognise them and their ComfyUI settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from xdit_core.models import latent_formats
from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.models.latent_formats import LatentFormat
from xdit_core.models.model_sampling import DiscreteEpsSampling, DiscreteFlowSampling, FluxSampling, ModelSampling, flux_auto_shift

FAMILIES = ("flux", "sd3", "pixart")
CLASS_NAMES = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
}
VARIANTS = {"flux": ("dev", "schnell"), "sd3": ("sd3",), "pixart": ("alpha", "sigma")}
# Latent side must be even for the 2x2 patch embedding: pixels multiple of 8 * 2.
PIXEL_MULTIPLE = 16


@dataclass(frozen=True)
class ModelSpec:
    """A concrete model's family, variant and the ComfyUI settings that follow from them."""

    family: str
    variant: str
    latent_format: LatentFormat
    default_cfg: float
    default_guidance: Optional[float]  # Flux with guidance embedding only (FluxGuidance's 3.5)
    default_shift: float
    text_dim: int
    pooled_dim: Optional[int]  # None: the family takes no pooled projection (PixArt)
    num_heads: int
    num_blocks: int = 0  # transformer blocks in PipeFusion's order (Flux: double then single)

    @property
    def latent_channels(self) -> int:
        return self.latent_format.channels

    def model_sampling(self, shift: Optional[float | str] = None, width: int = 1024,
                       height: int = 1024) -> ModelSampling:
        """ComfyUI's model sampling for this model; `shift` overrides the default, `auto` as ModelSamplingFlux."""
        if shift == "auto":
            if self.family != "flux":
                raise XDiTConfigError(f"--shift auto is only defined for Flux (ModelSamplingFlux), not {self.family}")
            return FluxSampling(flux_auto_shift(width, height))
        value = self.default_shift if shift is None else float(shift)
        if self.family == "flux":
            return FluxSampling(value) if self.variant == "dev" else DiscreteFlowSampling(value, multiplier=1.0)
        if self.family == "sd3":
            return DiscreteFlowSampling(value, multiplier=1000.0)
        return DiscreteEpsSampling()

    def scale_latent_inpaint(self, ms: ModelSampling, sigma: torch.Tensor, noise: torch.Tensor,
                             latent: torch.Tensor) -> torch.Tensor:
        """The input latent at `sigma`, pinned outside a noise_mask (ComfyUI's BaseModel.scale_latent_inpaint;
        a family whose ComfyUI model overrides it, such as Wan 2.2 5B, overrides this)."""
        return ms.noise_scaling(sigma, noise, latent, False)


def family_of_class(class_name: Optional[str]) -> str:
    """Family from a diffusers config's `_class_name`."""
    if class_name is None:
        raise XDiTModelError(f"the model config names no _class_name; supported: {', '.join(CLASS_NAMES)}")
    if class_name not in CLASS_NAMES:
        raise XDiTModelError(
            f"unknown model class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES[class_name]


def size_conditioned(config: Mapping[str, Any]) -> bool:
    """Whether a PixArt model takes size conditioning: diffusers turns it on for sample_size 128 when unset."""
    stated = config.get("use_additional_conditions")
    return config.get("sample_size", 128) == 128 if stated is None else bool(stated)


def detect_variant(family: str, config: Mapping[str, Any]) -> str:
    """Variant from the config: Flux dev has a guidance embedder; PixArt-Sigma turns size conditioning off."""
    if family == "flux":
        return "dev" if config.get("guidance_embeds", False) else "schnell"
    if family == "pixart":
        # PixArt-alpha (1024) derives use_additional_conditions=True from sample_size 128;
        # PixArt-Sigma's config sets it to False explicitly.
        return "sigma" if config.get("use_additional_conditions") is False else "alpha"
    return "sd3"


def resolve_model_spec(config: Mapping[str, Any], family: Optional[str] = None,
                       variant: Optional[str] = None) -> ModelSpec:
    """Build the ModelSpec of a diffusers transformer config, with optional overrides."""
    if family is not None and family not in FAMILIES:
        raise XDiTConfigError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    class_name = config.get("_class_name")
    # A given family confirms the config's class; it names the class only where the config has none.
    if class_name is not None or family is None:
        detected = family_of_class(class_name)
        if family not in (None, detected):
            raise XDiTConfigError(f"family {family!r} contradicts the model: its config names {class_name}, a "
                                  f"{detected} model; pass {detected!r} or leave the family to detection")
        family = detected
    detected_variant = detect_variant(family, config)
    variant = variant or detected_variant
    if variant not in VARIANTS[family]:
        raise XDiTConfigError(
            f"unknown variant {variant!r} for {family}; valid variants: {', '.join(VARIANTS[family])}")
    # As ComfyUI's detection: the guidance embedder makes Flux dev; size conditioning exists in PixArt-alpha
    # only (its 512 model lacks it too, so "alpha" without it is a valid choice).
    if family == "flux" and variant != detected_variant:
        has = "has a guidance embedder" if detected_variant == "dev" else "has no guidance embedder"
        raise XDiTConfigError(f"variant {variant!r} contradicts the model: it {has} (guidance_embeds), so it is "
                              f"Flux {detected_variant}; pass {detected_variant!r} or leave the variant to detection")
    if family == "pixart" and variant == "sigma" and size_conditioned(config):
        raise XDiTConfigError("variant 'sigma' contradicts the model: it takes size conditioning "
                              "(use_additional_conditions), which only PixArt-alpha has; pass 'alpha' or leave the "
                              "variant to detection")
    heads = int(config.get("num_attention_heads", 1))
    blocks = int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))
    if family == "flux":
        return ModelSpec("flux", variant, latent_formats.FLUX, 1.0, 3.5 if variant == "dev" else None,
                         1.15 if variant == "dev" else 1.0, int(config["joint_attention_dim"]),
                         int(config["pooled_projection_dim"]), heads, blocks)
    if family == "sd3":
        return ModelSpec("sd3", variant, latent_formats.SD3, 4.5, None, 3.0, int(config["joint_attention_dim"]),
                         int(config["pooled_projection_dim"]), heads, blocks)
    fmt = latent_formats.SDXL if variant == "sigma" else latent_formats.SD15
    return ModelSpec("pixart", variant, fmt, 4.5, None, 1.0, int(config["caption_channels"]), None, heads, blocks)


def model_class(family: str):
    """The diffusers class of a family (imported lazily: diffusers is slow to import)."""
    import diffusers

    return {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
            "pixart": diffusers.PixArtTransformer2DModel}[family]
