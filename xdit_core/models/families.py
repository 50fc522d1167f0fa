"""The model families the engine knows: how to recognise them and their ComfyUI settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from xdit_core.models import latent_formats
from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.models.latent_formats import LatentFormat
from xdit_core.models.model_sampling import (DiscreteEpsSampling, DiscreteFlowSampling, DiscreteVSampling, FluxSampling,
                                             ModelSampling, flux2_mu, flux_auto_shift)

FAMILIES = ("flux", "sd3", "pixart", "wan", "qwen", "zimage", "flux2", "hunyuandit")
CLASS_NAMES = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
    "WanTransformer3DModel": "wan",
    "QwenImageTransformer2DModel": "qwen",
    "ZImageTransformer2DModel": "zimage",
    "Flux2Transformer2DModel": "flux2",
    "HunyuanDiT2DModel": "hunyuandit",
}
VIDEO_FAMILIES = ("wan",)
# Wan: t2v = Wan 2.1 T2V and the Wan 2.2 A14B T2V experts; i2v = Wan 2.1 I2V (CLIP vision) and the Wan 2.2 A14B
# I2V experts (none), which take the start image's latent and mask as 20 extra input channels; ti2v = Wan 2.2
# TI2V 5B (48-channel latents, the start image inside the latent, per-frame timesteps).
# Qwen: image = Qwen-Image and Qwen-Image-Edit 2509 (the same transformer; an edit takes reference latents in its
# conditioning), edit_2511 = Qwen-Image-Edit 2511 (its reference tokens modulated at timestep 0: zero_cond_t).
VARIANTS = {"flux": ("dev", "schnell"), "sd3": ("sd3",), "pixart": ("alpha", "sigma"), "wan": ("t2v", "i2v", "ti2v"),
            "qwen": ("image", "edit_2511"), "zimage": ("zimage",), "flux2": ("dev", "klein"),
            "hunyuandit": ("v1.2", "v1.1")}
# Latent side must be even for the 2x2 patch embedding: pixels multiple of 8 * 2 (the image families'; see
# ModelSpec.pixel_multiple, 32 for Wan 2.2 5B's 16x VAE).
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
    image_dim: Optional[int] = None  # Wan 2.1 I2V: the CLIP vision states' width, which it requires
    concat_channels: int = 0  # Wan I2V: input channels beyond the latent's (the start image's latent and mask)
    patch_size: int = 2  # latent rows (and columns) per image token: 2x2 patches, 1 for FLUX.2's packed latent
    text2_dim: Optional[int] = None  # HunyuanDiT: the second (mT5) text encoder's width

    @property
    def latent_channels(self) -> int:
        return self.latent_format.channels

    @property
    def pixel_multiple(self) -> int:
        """Image sizes must be multiples of this: the latent is patched after the VAE's downscale."""
        return self.patch_size * self.latent_format.spatial_scale

    def pixel_size(self, shape: Sequence[int]) -> tuple[int, int]:
        """(height, width) in pixels of a latent of `shape` (its last two dims are rows and columns)."""
        scale = self.latent_format.spatial_scale
        return shape[-2] * scale, shape[-1] * scale

    @property
    def is_video(self) -> bool:
        """Latents are [B, C, frames, h, w] of several frames (ComfyUI's latent_dimensions 3, a video model)."""
        return self.latent_format.dims == 3 and self.family in VIDEO_FAMILIES

    @property
    def one_frame(self) -> bool:
        """An image model whose ComfyUI LATENTs are [B, C, 1, h, w] (Qwen-Image's Wan 2.1 VAE format): the engine
        samples them as [B, C, h, w] and hands them back with the frame axis."""
        return self.latent_format.dims == 3 and not self.is_video

    @property
    def frame_timesteps(self) -> bool:
        """The model takes a timestep per latent frame from the noise_mask (ComfyUI's WAN22.process_timestep)."""
        return self.family == "wan" and self.variant == "ti2v"

    def model_timestep(self, timestep: torch.Tensor, noise_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The timestep the model takes ([B]): per latent frame ([B, frames]) for Wan 2.2 5B with a noise_mask,
        the mask's mean over each frame times the timestep, so its clean start frames run at 0."""
        if noise_mask is None or not self.frame_timesteps:
            return timestep
        share = noise_mask.mean(dim=(1, 3, 4), keepdim=True)
        return (share * timestep.view(-1, 1, 1, 1, 1)).reshape(timestep.shape[0], -1)

    def resolve_shift(self, shift: Optional[float | str], width: int, height: int,
                      steps: int) -> Optional[float | str]:
        """The shift a request stores: FLUX.2's default is Flux2Pipeline's empirical mu for the image's tokens and
        the step count (so every rank's model sampling is the same without the step count); others' as given."""
        if self.family == "flux2" and shift is None:
            scale = self.latent_format.spatial_scale
            return flux2_mu((height // scale) * (width // scale), steps)
        return shift

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
        if self.family in ("sd3", "wan"):
            return DiscreteFlowSampling(value, multiplier=1000.0)
        if self.family == "hunyuandit":  # ComfyUI's HunyuanDiT (v1.2) and HunyuanDiT1 (v1.0/1.1)
            return DiscreteVSampling(0.00085, 0.018 if self.variant == "v1.2" else 0.03)
        if self.family == "flux2":  # Flux2Pipeline: the exponential shift mu (resolve_shift's) on linspace sigmas
            return FluxSampling(value)
        if self.family == "zimage":  # Z-Image-Turbo's scheduler: flow shift 3 on t (ModelSamplingAuraFlow 3)
            return DiscreteFlowSampling(value, multiplier=1.0)
        if self.family == "qwen":  # ComfyUI's default is ModelSamplingFlux at 1.15; its templates' override is
            # ModelSamplingAuraFlow (discrete flow, multiplier 1), which a given shift stands for here
            return FluxSampling(value) if shift is None else DiscreteFlowSampling(value, multiplier=1.0)
        return DiscreteEpsSampling()

    def scale_latent_inpaint(self, ms: ModelSampling, sigma: torch.Tensor, noise: torch.Tensor,
                             latent: torch.Tensor) -> torch.Tensor:
        """The input latent at `sigma`, pinned outside a noise_mask (ComfyUI's BaseModel.scale_latent_inpaint;
        a family whose ComfyUI model overrides it, such as Wan 2.2 5B, overrides this)."""
        if self.frame_timesteps:  # WAN22: the region outside the mask is the clean latent, at timestep 0
            return latent
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
    if family == "wan":  # as ComfyUI's detection: 48 output channels make Wan 2.2 5B, 36 inputs an I2V model
        if (config.get("out_channels") or config.get("in_channels")) == 48:
            return "ti2v"
        return "i2v" if config.get("in_channels", 16) != 16 else "t2v"
    if family == "qwen":
        return "edit_2511" if config.get("zero_cond_t") else "image"
    if family == "zimage":
        return "zimage"
    if family == "flux2":
        return "dev" if config.get("guidance_embeds", True) else "klein"
    if family == "hunyuandit":  # as ComfyUI's detection: size and style conditioning make hydit1 (v1.0, v1.1)
        return "v1.1" if config.get("use_style_cond_and_image_meta_size", True) else "v1.2"
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
    if family == "wan" and variant != detected_variant:
        raise XDiTConfigError(f"variant {variant!r} contradicts the model: its channels (in_channels "
                              f"{config.get('in_channels', 16)}, out_channels {config.get('out_channels')}) make a Wan "
                              f"{detected_variant} model; pass {detected_variant!r} or leave the variant to detection")
    if family in ("qwen", "flux2", "hunyuandit") and variant != detected_variant:
        why = {"qwen": f"its config {'sets' if config.get('zero_cond_t') else 'does not set'} zero_cond_t",
               "flux2": f"its guidance_embeds is {bool(config.get('guidance_embeds', True))}",
               "hunyuandit": "its size and style conditioning (use_style_cond_and_image_meta_size) is "
                             f"{bool(config.get('use_style_cond_and_image_meta_size', True))}"}[family]
        raise XDiTConfigError(f"variant {variant!r} contradicts the model: {why}, so it is {family} "
                              f"{detected_variant}; pass {detected_variant!r} or leave the variant to detection")
    if family == "pixart" and variant == "sigma" and size_conditioned(config):
        raise XDiTConfigError("variant 'sigma' contradicts the model: it takes size conditioning "
                              "(use_additional_conditions), which only PixArt-alpha has; pass 'alpha' or leave the "
                              "variant to detection")
    heads = int(config.get("num_attention_heads", config.get("n_heads", 1)))
    blocks = int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))
    if family == "flux":
        return ModelSpec("flux", variant, latent_formats.FLUX, 1.0, 3.5 if variant == "dev" else None,
                         1.15 if variant == "dev" else 1.0, int(config["joint_attention_dim"]),
                         int(config["pooled_projection_dim"]), heads, blocks)
    if family == "sd3":
        return ModelSpec("sd3", variant, latent_formats.SD3, 4.5, None, 3.0, int(config["joint_attention_dim"]),
                         int(config["pooled_projection_dim"]), heads, blocks)
    if family == "wan":
        # ComfyUI's WAN21/WAN22 model sampling: discrete flow, shift 8; templates run cfg 5 to 6.
        fmt = latent_formats.WAN22 if variant == "ti2v" else latent_formats.WAN21
        in_channels = int(config.get("in_channels", 16))
        return ModelSpec("wan", variant, fmt, 5.0, None, 8.0, int(config.get("text_dim", 4096)), None, heads, blocks,
                         image_dim=config.get("image_dim"), concat_channels=in_channels - fmt.channels)
    if family == "qwen":
        # ComfyUI's QwenImage: Wan 2.1 VAE latents, ModelSamplingFlux shift 1.15 (multiplier 1); templates run cfg 2.5
        return ModelSpec("qwen", variant, latent_formats.WAN21, 2.5, None, 1.15,
                         int(config.get("joint_attention_dim", 3584)), None, heads, blocks)
    if family == "hunyuandit":
        # ComfyUI's HunyuanDiT: SDXL latents, v-prediction; templates run cfg 6. Text: CLIP-BERT 1024 + mT5 2048.
        return ModelSpec("hunyuandit", variant, latent_formats.SDXL, 6.0, None, 1.0,
                         int(config.get("cross_attention_dim", 1024)), None, heads, blocks,
                         text2_dim=int(config.get("cross_attention_dim_t5", 2048)))
    if family == "flux2":
        # Flux2Pipeline: 128-channel latents at 1/16, distilled guidance 4.0 (dev), cfg 1; the shift is its mu, here
        # at 1024² and 20 steps (a request resolves it for its own size and steps: resolve_shift)
        dev = variant == "dev"
        return ModelSpec("flux2", variant, latent_formats.FLUX2, 1.0, 4.0 if dev else None, flux2_mu(64 * 64, 20),
                         int(config.get("joint_attention_dim", 15360)), None, heads, blocks, patch_size=1)
    if family == "zimage":
        # diffusers' ZImagePipeline: the FLUX.1 VAE's latents, flow shift 3; Turbo samples 8 steps at cfg 1 (its
        # CFG is diffusers' guidance + 1: pos + g (pos - neg))
        blocks = int(config.get("n_refiner_layers", 2)) + int(config.get("n_layers", 30))
        return ModelSpec("zimage", variant, latent_formats.FLUX, 1.0, None, 3.0, int(config.get("cap_feat_dim", 2560)),
                         None, heads, blocks)
    fmt = latent_formats.SDXL if variant == "sigma" else latent_formats.SD15
    return ModelSpec("pixart", variant, fmt, 4.5, None, 1.0, int(config["caption_channels"]), None, heads, blocks)


def model_class(family: str):
    """The diffusers class of a family (imported lazily: diffusers is slow to import)."""
    import diffusers

    return {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
            "pixart": diffusers.PixArtTransformer2DModel, "wan": diffusers.WanTransformer3DModel,
            "qwen": diffusers.QwenImageTransformer2DModel, "zimage": diffusers.ZImageTransformer2DModel,
            "flux2": diffusers.Flux2Transformer2DModel,
            "hunyuandit": diffusers.HunyuanDiT2DModel}[family]
