"""The conditioning file contract (`--cond`) and the seeded stand-in conditioning used without one."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from xdit_core.errors import XDiTConditioningError, XDiTConfigError, XDiTNumericError
from xdit_core.models.families import ModelSpec
from xdit_core.models import flux, qwen, wan
from xdit_core.models.hunyuandit import CLIP_TOKENS, T5_TOKENS
from xdit_core.models.base import BranchCond

RANDOM_TEXT_LENGTH = 32
REFERENCE_FAMILIES = ("flux", "qwen", "flux2")  # FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 (references on T = 10 i)
REFERENCE_METHODS = {"flux": flux.REFERENCE_METHODS, "qwen": qwen.REFERENCE_METHODS}
# Families whose text mask the engine applies: Qwen-Image's key mask (diffusers' encoder_hidden_states_mask),
# HunyuanDiT's padding masks (its padded tokens take a learned embedding).
MASK_FAMILIES = ("qwen", "hunyuandit")
CLIP_VISION_TOKENS = 257  # CLIP ViT-H/14's penultimate states at 224 px: 16 x 16 patches and the class token
MAX_SEED = 0xffffffffffffffff  # ComfyUI's seed range is 0..MAX_SEED, which is what torch's generators take


def required_keys(spec: ModelSpec, with_negative: bool) -> list[str]:
    """Keys a `--cond` file must hold for this model (negative only when CFG evaluates it)."""
    branches = ["positive"] + (["negative"] if with_negative else [])
    keys = []
    for branch in branches:
        keys.append(branch)
        if spec.pooled_dim is not None:
            keys.append(f"{branch}_pooled")
        if spec.text2_dim is not None:  # HunyuanDiT: mT5 states and both encoders' masks
            keys += [f"{branch}_t5", f"{branch}_mask", f"{branch}_t5_mask"]
    return keys


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise unless `tensor` is floating point with no NaN or inf: such input would only surface, unexplained,
    as a non-finite prediction after the weights are loaded."""
    if not tensor.is_floating_point():
        raise XDiTConfigError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise XDiTNumericError(f"{name} holds {int((~finite).sum())} NaN or inf values of {tensor.numel()}; "
                               "every value must be finite")


def check_shape(name: str, tensor: torch.Tensor, batch: int, width: int, text: bool,
                source: str = "--cond") -> torch.Tensor:
    """`tensor` as [batch, L, width] (text, L >= 1) or [batch, width] (pooled), repeating a batch of 1; its
    values must be finite floats."""
    expected = f"[{batch}, L, {width}] with L >= 1" if text else f"[{batch}, {width}]"
    ndim = 3 if text else 2
    if tensor.ndim != ndim or tensor.shape[-1] != width or tensor.shape[0] not in (1, batch) or \
            (text and tensor.shape[1] < 1):
        raise XDiTConditioningError(
            f"{source} tensor {name!r} has shape {list(tensor.shape)}, expected {expected} (batch 1 is repeated)")
    check_finite(f"{source} tensor {name!r}", tensor)
    return tensor.float().expand(batch, *tensor.shape[1:]).contiguous()


def load_cond_file(path: str | Path, spec: ModelSpec, batch: int, with_negative: bool,
                   shape: Optional[Sequence[int]] = None) -> tuple[BranchCond, Optional[BranchCond]]:
    """Read and validate a conditioning safetensors file; returns (positive, negative or None). A Wan I2V
    model's image inputs, shared by both branches as WanImageToVideo sets them, are `clip_vision` (Wan 2.1) and
    `concat_latent_image` / `concat_mask` (LATENT space, for the latent of `shape`). Optional per branch:
    `<branch>_mask`, the text's key mask [B, L] (HunyuanDiT: required, with `<branch>_t5` and `<branch>_t5_mask`).
    Reference images (Kontext, Qwen-Image-Edit, FLUX.2), shared by both branches: `reference_0`, `reference_1`, ...
    in LATENT space."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if not path.is_file():
            raise XDiTConditioningError(f"--cond file not found: {path}")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise XDiTConditioningError(f"--cond file {path} is not a readable safetensors file: {e}") from None
    missing = [k for k in required_keys(spec, with_negative) if k not in tensors]
    if missing:
        raise XDiTConditioningError(
            f"--cond file {path} lacks keys {missing}; a {spec.family} model needs "
            f"{required_keys(spec, with_negative)}")
    branches = []
    for branch in ["positive", "negative"] if with_negative else ["positive"]:
        text = check_shape(branch, tensors[branch], batch, spec.text_dim, text=True)
        pooled = None
        if spec.pooled_dim is not None:
            pooled = check_shape(f"{branch}_pooled", tensors[f"{branch}_pooled"], batch, spec.pooled_dim, False)
        cond = BranchCond(text, pooled, text_mask=tensors.get(f"{branch}_mask"))
        if spec.text2_dim is not None:
            t5 = check_shape(f"{branch}_t5", tensors[f"{branch}_t5"], batch, spec.text2_dim, True)
            cond = replace(cond, text2=t5, text2_mask=tensors[f"{branch}_t5_mask"])
        branches.append(cond)
    references, i = [], 0
    while f"reference_{i}" in tensors:
        ref = tensors[f"reference_{i}"].float()
        references.append(spec.latent_format.process_in(ref[:, :, 0] if ref.ndim == 5 and ref.shape[2] == 1 else ref))
        i += 1
    branches = [replace(b, references=tuple(references)) for b in branches]
    if spec.family == "wan":
        image = tensors.get("clip_vision")
        if image is not None:
            image = check_shape("clip_vision", image, batch, spec.image_dim or image.shape[-1], text=True)
        concat = None
        if "concat_latent_image" in tensors and shape is not None:
            concat = wan.image_concat(spec, shape, tensors["concat_latent_image"], tensors.get("concat_mask"))
        branches = [replace(b, image=image, concat=concat) for b in branches]
    return branches[0], (branches[1] if with_negative else None)


def prepare_branch(spec: ModelSpec, cond: Optional[BranchCond], shape: Sequence[int],
                   branch: str) -> Optional[BranchCond]:
    """A branch checked against the model and the latent of `shape` (finite values, the family's extra inputs),
    with what ComfyUI fills in where the workflow gives nothing (a Wan I2V model without a start image: zeros)."""
    if cond is None:
        return None
    check_finite(f"{branch} conditioning", cond.text)
    if cond.pooled is not None:
        check_finite(f"{branch} pooled conditioning", cond.pooled)
    check_text_mask(cond, branch)
    if cond.text_mask is not None and spec.family not in MASK_FAMILIES:
        raise XDiTConditioningError(f"{branch}: a text mask reaches a {spec.family} model, which attends every text "
                                    f"token (masks apply to {', '.join(MASK_FAMILIES)}); leave it out")
    if cond.references and spec.family not in REFERENCE_FAMILIES:
        raise XDiTConditioningError(f"{branch}: reference latents reach a {spec.family} model, which takes none "
                                    "(FLUX.1 Kontext, Qwen-Image-Edit and FLUX.2 do)")
    for i, ref in enumerate(cond.references):
        check_finite(f"{branch} reference latent {i}", ref)
        if ref.ndim != 4 or ref.shape[1] != spec.latent_channels or ref.shape[0] not in (1, shape[0]):
            # (an odd side is padded to whole patches, as ComfyUI does)
            raise XDiTConditioningError(
                f"{branch}: reference latent {i} has shape {list(ref.shape)}; expected [1 or {shape[0]}, "
                f"{spec.latent_channels}, h, w] (a VAE Encode of the reference image with the model's VAE)")
    check_second_text(spec, cond, shape[0], branch)
    methods = REFERENCE_METHODS.get(spec.family, ())
    if cond.reference_method is not None and cond.reference_method not in methods:
        raise XDiTConditioningError(f"{branch}: reference_latents_method {cond.reference_method!r} is not one of "
                                    f"{', '.join(methods) or 'none (this model takes no references)'}")
    if spec.family != "wan":
        if cond.image is not None or cond.concat is not None:
            raise XDiTConditioningError(f"{branch}: image conditioning (CLIP vision, a start image) reaches a "
                                        f"{spec.family} model, which takes none")
        return cond
    if spec.concat_channels and cond.concat is None:
        cond = replace(cond, concat=wan.image_concat(spec, shape, None, None))
    if cond.image is not None and cond.image.ndim == 3 and cond.image.shape[0] == 1 < shape[0]:
        cond = replace(cond, image=cond.image.expand(shape[0], -1, -1))  # one start image for the whole batch
    for name in ("image", "concat"):
        if getattr(cond, name) is not None:
            check_finite(f"{branch} {name} conditioning", getattr(cond, name))
    wan.check_branch(spec, cond, shape, branch)
    return cond


def check_second_text(spec: ModelSpec, cond: BranchCond, batch: int, branch: str) -> None:
    """HunyuanDiT's two encoders: CLIP-BERT states [B, 77, D] and mT5 states [B, 256, D2], each with its mask (the
    padded tokens take the model's learned padding); other families take neither."""
    if spec.text2_dim is None:
        if cond.text2 is not None:
            raise XDiTConditioningError(f"{branch}: a second text encoder's states (mT5) reach a {spec.family} model, "
                                        "which takes one text encoder")
        return
    if cond.text2 is None or cond.text_mask is None or cond.text2_mask is None:
        raise XDiTConditioningError(f"{branch}: HunyuanDiT needs both text encoders' states and masks (ComfyUI's "
                                    "conditioning_mt5xl, attention_mask and attention_mask_mt5xl): encode the prompt "
                                    "with HunyuanDiT's CLIP loader")
    check_finite(f"{branch} mT5 conditioning", cond.text2)
    for name, states, mask, length, width in (("CLIP", cond.text, cond.text_mask, CLIP_TOKENS, spec.text_dim),
                                              ("mT5", cond.text2, cond.text2_mask, T5_TOKENS, spec.text2_dim)):
        if states.ndim != 3 or states.shape[1:] != (length, width) or states.shape[0] not in (1, batch) \
                or tuple(mask.shape[-1:]) != (length,):
            raise XDiTConditioningError(f"{branch}: HunyuanDiT's {name} states are {list(states.shape)} with a mask "
                                        f"of {list(mask.shape)}; it takes [B, {length}, {width}] and [B, {length}] "
                                        f"(its tokenizer pads to {length})")


def check_text_mask(cond: BranchCond, branch: str) -> None:
    """A text key mask is [1 or B, L] over the text's L tokens and keeps at least one token per item."""
    mask = cond.text_mask
    if mask is None:
        return
    if mask.ndim != 2 or mask.shape[1] != cond.text.shape[1] or mask.shape[0] not in (1, cond.text.shape[0]):
        raise XDiTConditioningError(f"{branch}: the text mask has shape {list(mask.shape)}, expected "
                                    f"[1 or {cond.text.shape[0]}, {cond.text.shape[1]}] (one entry per text token)")
    if not bool(mask.bool().any(dim=1).all()):
        raise XDiTConditioningError(f"{branch}: the text mask masks every token of an item; keep at least one")


def random_cond(spec: ModelSpec, batch: int, seed: int, with_negative: bool,
                shape: Optional[Sequence[int]] = None) -> tuple[BranchCond, Optional[BranchCond]]:
    """Stand-in conditioning of the right shapes from a generator seeded with `seed + 1`.

    Its own generator keeps the noise exactly ComfyUI's for `seed`. Both branches are always drawn,
    so the positive branch does not depend on the CFG scale. A Wan 2.1 I2V model gets 512 text tokens (as
    ComfyUI's umT5 pads them) and CLIP vision states; an I2V model no start image (`shape`: the latent's).
    """
    gen = torch.Generator().manual_seed((seed + 1) % (MAX_SEED + 1))  # seed MAX_SEED wraps to 0
    text_len = wan.I2V_TEXT_TOKENS if spec.image_dim else CLIP_TOKENS if spec.text2_dim else RANDOM_TEXT_LENGTH
    branches = []
    for _ in range(2):
        text = torch.randn(batch, text_len, spec.text_dim, generator=gen)
        pooled = torch.randn(batch, spec.pooled_dim, generator=gen) if spec.pooled_dim is not None else None
        image = torch.randn(batch, CLIP_VISION_TOKENS, spec.image_dim, generator=gen) if spec.image_dim else None
        concat = wan.image_concat(spec, shape, None, None) if shape is not None and spec.concat_channels else None
        cond = BranchCond(text, pooled, image=image, concat=concat)
        if spec.text2_dim:  # HunyuanDiT: mT5 states, each encoder's first RANDOM_TEXT_LENGTH tokens real
            cond = replace(cond, text2=torch.randn(batch, T5_TOKENS, spec.text2_dim, generator=gen),
                           text_mask=_prefix_mask(batch, CLIP_TOKENS), text2_mask=_prefix_mask(batch, T5_TOKENS))
        branches.append(cond)
    return branches[0], (branches[1] if with_negative else None)


def _prefix_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, :RANDOM_TEXT_LENGTH] = 1
    return mask
