"""ComfyUI CONDITIONING -> the engine's per-branch conditioning, with an explicit list of accepted keys.

A CONDITIONING is a list of [tensor, dict] entries; the dict's keys steer ComfyUI's model (pooled output,
Flux guidance, ControlNet, areas, masks, timestep ranges, reference latents...). A key the xDiT samplers do
not apply would silently change the result, so every key is either applied, ignored exactly as ComfyUI's
own model for the family ignores it, a no-op at its value, or refused with what to do instead.
"""
from __future__ import annotations

import math
from dataclasses import replace

# Keys ComfyUI's model for the family reads and the engine applies ("guidance": Flux dev's distilled guidance).
# Wan: WanImageToVideo's CLIP vision output (Wan 2.1 I2V) and start image latent and mask (I2V).
# Flux (Kontext) and Qwen-Image-Edit: ReferenceLatent's and the Qwen edit encoders' reference latents, with
# FluxKontextMultiReferenceLatentMethod's placement.
REFERENCES = {"reference_latents", "reference_latents_method"}
APPLIED = {"flux": {"pooled_output", "guidance"} | REFERENCES, "sd3": {"pooled_output"}, "pixart": set(),
           "wan": {"clip_vision_output", "concat_latent_image", "concat_mask"}, "qwen": set(REFERENCES),
           "zimage": {"attention_mask"}, "flux2": {"guidance", "reference_latents"},
           "hunyuandit": {"attention_mask", "conditioning_mt5xl", "attention_mask_mt5xl"}}
# Keys ComfyUI's model for the family never reads (so neither do we): the T5-only PixArt's and Wan's empty
# pooled output, FluxGuidance on a model without a guidance embedder.
# Qwen: ComfyUI's QwenImage hands the text encoder's attention_mask to its blocks, whose attention never uses it.
IGNORED = {"flux": set(), "sd3": {"guidance"}, "pixart": {"pooled_output", "guidance"},
           "wan": {"pooled_output", "guidance"}, "qwen": {"pooled_output", "guidance", "attention_mask"},
           "zimage": {"pooled_output", "guidance"}, "flux2": {"pooled_output"},
           "hunyuandit": {"pooled_output", "guidance"}}
# Keys that change nothing at these values (a Conditioning Set Timestep Range of 0..1, strength 1).
NO_OP = {"start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}
# What to use instead of a key the engine does not apply yet.
ADVICE = {
    "control": "ControlNet is not supported by the xDiT samplers yet; use ComfyUI's KSampler for ControlNet",
    "area": "area conditioning is not supported yet; use one prompt per branch",
    "mask": "masked conditioning is not supported yet; use a LATENT noise_mask to restrict denoising",
    "start_percent": "timestep ranges are not supported yet; remove Conditioning Set Timestep Range",
    "end_percent": "timestep ranges are not supported yet; remove Conditioning Set Timestep Range",
    "strength": "conditioning strength is not supported yet; leave it at 1.0",
    "reference_latents": "reference latents reach FLUX.1 Kontext, Qwen-Image-Edit and FLUX.2 models only",
    "reference_latents_method": "a reference placement method applies to FLUX.1 Kontext and Qwen-Image-Edit only "
                                "(FLUX.2 places reference i on T = 10 (i + 1), as diffusers' Flux2Pipeline)",
    "concat_latent_image": "inpainting-model conditioning is not supported yet; use a LATENT noise_mask",
    "concat_mask_index": "Wan Fun / camera models' mask placement is not supported; use a Wan I2V model",
    "time_dim_concat": "Wan frame-extension conditioning is not supported yet",
    "clip_vision_output": "CLIP vision conditioning reaches only Wan 2.1 I2V models",
    "attention_mask": "text attention masks are not supported; load the text encoder without the T5 attention mask",
    "hooks": "conditioning hooks (scheduled LoRA) are not supported; use the xDiT LoRA node",
    "gligen": "GLIGEN is not supported",
}
PIXART_SIZE_KEYS = ("width", "height", "aspect_ratio")
HUNYUAN_SIZE_KEYS = ("width", "height", "target_width", "target_height")  # its image_meta_size


def check_keys(family: str, extra: dict, name: str, height: int, width: int) -> None:
    """Raise ValueError for any conditioning key the engine would not apply as ComfyUI does."""
    for key, value in extra.items():
        if key in APPLIED[family] or key in IGNORED[family]:
            continue
        if key in NO_OP and _equals(value, NO_OP[key]):
            continue
        if (family == "pixart" and key in PIXART_SIZE_KEYS) or (family == "hunyuandit" and key in HUNYUAN_SIZE_KEYS):
            # ComfyUI's PixArt and HunyuanDiT take their size conditioning from these when set; ours is the
            # latent's own size.
            default = {"width": width, "height": height, "aspect_ratio": height / width, "target_width": width,
                       "target_height": height}[key]
            if _equals(value, default):
                continue
            model = "PixArt" if family == "pixart" else "HunyuanDiT"
            raise ValueError(f"{name} conditioning sets {key} {value}, but the xDiT Sampler conditions {model} on the "
                             f"latent's size ({width}x{height}); use a latent of the size you want instead")
        advice = ADVICE.get(key, f"the xDiT samplers apply only {_listing(family)} for {family}")
        raise ValueError(f"{name} conditioning has the key {key!r}, which the xDiT samplers do not apply: {advice}")


def _equals(value, expected: float) -> bool:
    try:
        return math.isclose(float(value), expected, rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _listing(family: str) -> str:
    keys = sorted(APPLIED[family] | IGNORED[family])
    return ", ".join(keys) if keys else "no keys"


def branch_from_conditioning(spec, conditioning, shape, name: str, noise_mask=None):
    """ComfyUI CONDITIONING ([[tensor, dict]]) -> (BranchCond, guidance or None) for the model's family and a
    latent of `shape` (the model's: see sampler.model_shape) with the LATENT's `noise_mask`."""
    from xdit_core.api import BranchCond, XDiTConditioningError
    from xdit_core.api import check_conditioning_shape as check_shape

    batch = shape[0]
    height, width = spec.pixel_size(shape)

    if not conditioning:
        raise XDiTConditioningError(f"{name} conditioning is empty")
    if len(conditioning) != 1:
        raise XDiTConditioningError(
            f"{name} conditioning has {len(conditioning)} entries (Conditioning Combine, or area conditioning); "
            "the xDiT samplers take one per branch: use Conditioning (Concat) or a single text encoder output")
    tensor, extra = conditioning[0]
    try:
        check_keys(spec.family, extra, name, height, width)
    except ValueError as e:
        raise XDiTConditioningError(str(e)) from None
    if spec.family == "zimage" and extra.get("attention_mask") is not None:
        tensor = _real_tokens(tensor, extra["attention_mask"], name)
    text = check_shape(name, tensor, batch, spec.text_dim, text=True, source=f"{name} conditioning")
    pooled = None
    if spec.pooled_dim is not None:
        if extra.get("pooled_output") is None:
            raise XDiTConditioningError(f"{name} conditioning has no pooled_output; {spec.family} needs the "
                                        "pooled CLIP output of its text encoders")
        pooled = check_shape(f"{name} pooled_output", extra["pooled_output"], batch, spec.pooled_dim,
                             text=False, source=f"{name} conditioning")
    guidance = extra.get("guidance") if "guidance" in APPLIED[spec.family] else None
    if spec.default_guidance is not None and "guidance" in extra and guidance is None:
        raise XDiTConditioningError(f"{name} conditioning turns Flux's guidance embedding off (FluxDisableGuidance), "
                                    "which the xDiT samplers do not support yet; remove that node or use FluxGuidance")
    image = concat = None
    if spec.family == "wan":
        image, concat = _wan_image_inputs(spec, extra, shape, name, noise_mask)
    references = _references(spec, extra.get("reference_latents") or (), batch, name)
    cond = BranchCond(text, pooled, image=image, concat=concat, references=references,
                      reference_method=extra.get("reference_latents_method"))
    if spec.family == "hunyuandit":  # ComfyUI's HunyuanDiT text encoder: both encoders' states and masks
        t5 = extra.get("conditioning_mt5xl")
        if t5 is not None:
            t5 = check_shape(f"{name} conditioning_mt5xl", t5, batch, spec.text2_dim, text=True,
                             source=f"{name} conditioning")
        cond = replace(cond, text2=t5, text_mask=_host(extra.get("attention_mask")),
                       text2_mask=_host(extra.get("attention_mask_mt5xl")))
    return cond, guidance


def _host(mask):
    return None if mask is None else mask.cpu()


def _real_tokens(tensor, mask, name: str):
    """Z-Image takes only the prompt's real tokens (diffusers' ZImagePipeline keeps prompt_embeds[mask]): the text
    encoder's padded states cut to its attention_mask, which must be the same for every item."""
    from xdit_core.api import XDiTConditioningError

    mask = mask.bool().reshape(mask.shape[0], -1)
    if mask.shape[-1] != tensor.shape[1] or not bool((mask == mask[0]).all()):
        raise XDiTConditioningError(f"{name} conditioning's attention_mask {list(mask.shape)} does not fit its "
                                    f"{list(tensor.shape)} states with one set of real tokens for every item")
    return tensor[:, mask[0]]


def _references(spec, latents, batch: int, name: str) -> tuple:
    """ReferenceLatent's LATENTs in model space, as ComfyUI's model takes them (process_latent_in), each [B or 1,
    C, h, w] (a one-frame [B, C, 1, h, w] from the Wan VAE loses its frame axis)."""
    from xdit_core.api import XDiTConditioningError

    out = []
    for i, lat in enumerate(latents):
        if lat.ndim == 5 and lat.shape[2] == 1:
            lat = lat[:, :, 0]
        if lat.ndim != 4 or lat.shape[1] != spec.latent_channels or lat.shape[0] not in (1, batch):
            raise XDiTConditioningError(f"{name} conditioning: reference latent {i} has shape {list(lat.shape)}; "
                                        f"this {spec.family} model takes [1 or {batch}, {spec.latent_channels}, h, w] "
                                        "(a VAE Encode of the reference image with the model's VAE)")
        out.append(spec.latent_format.process_in(lat.float()))
    return tuple(out)


def _wan_image_inputs(spec, extra: dict, shape, name: str, noise_mask):
    """(CLIP vision states, extra input channels) from WanImageToVideo's keys, as ComfyUI's WAN21 reads them."""
    from xdit_core.api import XDiTConditioningError, image_concat

    clip = extra.get("clip_vision_output")
    image = None if clip is None else clip.penultimate_hidden_states
    latent, mask = extra.get("concat_latent_image"), extra.get("concat_mask")
    if latent is not None and mask is None and noise_mask is not None:
        # ComfyUI would take the LATENT's noise_mask as the start image mask here; WanImageToVideo sets both keys.
        raise XDiTConditioningError(f"{name} conditioning has a concat_latent_image without a concat_mask, and the "
                                    "LATENT has a noise_mask; the xDiT samplers take the mask from WanImageToVideo")
    return image, image_concat(spec, shape, latent, mask)
