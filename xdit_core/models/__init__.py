"""Model families: specs and detection, latent formats, model sampling, conditioning, and one adapter per family
that drives the unchanged diffusers modules."""
from __future__ import annotations

import torch

from xdit_core.models.families import ModelSpec
from xdit_core.models.base import BranchCond, ModelAdapter
from xdit_core.models.flux import FluxAdapter
from xdit_core.models.flux2 import Flux2Adapter
from xdit_core.models.hunyuandit import HunyuanDiTAdapter
from xdit_core.models.pixart import PixArtAdapter
from xdit_core.models.qwen import QwenImageAdapter
from xdit_core.models.zimage import ZImageAdapter
from xdit_core.models.wan import WanAdapter
from .sd3 import SD3Adapter

ADAPTERS = {"flux": FluxAdapter, "sd3": SD3Adapter, "pixart": PixArtAdapter, "wan": WanAdapter,
            "qwen": QwenImageAdapter, "zimage": ZImageAdapter, "flux2": Flux2Adapter, "hunyuandit": HunyuanDiTAdapter}


def make_adapter(model: torch.nn.Module, spec: ModelSpec) -> ModelAdapter:
    """The adapter of `spec.family` around a loaded diffusers transformer."""
    return ADAPTERS[spec.family](model, spec)


__all__ = ["ADAPTERS", "BranchCond", "ModelAdapter", "make_adapter"]
