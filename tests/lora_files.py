"""Synthetic LoRA files in each layout the engine reads, made for a loaded model from random low-rank matrices, and
the same LoRAs merged into the model's weights (the reference: W + strength * scale * up @ down).

The merge is written here on its own, in the LoRA's own namespace: diffusers-layout LoRAs on the diffusers
weights, original-layout ones on the original single-file tensors (fused q/k/v, linear1, swapped adaLN halves
as they are), then the merged weights are written as an original-layout checkpoint for `load_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import save_file

from xdit_core.loading.key_mapping import model_tensors, to_original


@dataclass(frozen=True)
class Layout:
    """How one trainer writes a LoRA: names (diffusers or original), prefix, `_` for `.`, suffixes, alpha."""

    namespace: str
    prefix: str
    underscored: bool
    down: str
    up: str
    alpha: bool


LAYOUTS = {
    "peft": Layout("diffusers", "transformer.", False, "lora_A.weight", "lora_B.weight", False),  # ai-toolkit
    "diffusers": Layout("diffusers", "", False, "lora_A.weight", "lora_B.weight", True),
    "onetrainer": Layout("diffusers", "lora_transformer_", True, "lora_down.weight", "lora_up.weight", True),
    "comfyui": Layout("original", "diffusion_model.", False, "lora_down.weight", "lora_up.weight", True),
    "bfl": Layout("original", "", False, "lora_A.weight", "lora_B.weight", False),
    "kohya": Layout("original", "lora_unet_", True, "lora_down.weight", "lora_up.weight", True),
}
# A text-encoder key as kohya's files carry them: not the transformer's, to be set aside.
TEXT_ENCODER_KEY = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


@dataclass
class LayerDelta:
    """One layer of a synthetic LoRA, in its namespace: a low-rank pair and/or full diffs."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    scale: float = 1.0
    diff: Optional[torch.Tensor] = None
    diff_b: Optional[torch.Tensor] = None


@dataclass
class SyntheticLora:
    family: str
    layout: str
    layers: dict[str, LayerDelta]  # layer name in the layout's namespace (no .weight) -> delta
    tensors: dict[str, torch.Tensor]  # the file's contents

    @property
    def namespace(self) -> str:
        return LAYOUTS[self.layout].namespace


def namespace_tensors(family: str, model: torch.nn.Module, namespace: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of `namespace` (diffusers, or the original single-file layout)."""
    tensors = model_tensors(model)
    return tensors if namespace == "diffusers" else to_original(family, tensors)


def linear_layers(family: str, model: torch.nn.Module, namespace: str) -> dict[str, tuple[int, int]]:
    """Layer name -> (out, in) of every 2-D weight (every Linear; fused ones whole in the original layout)."""
    return {name[: -len(".weight")]: tuple(t.shape) for name, t in namespace_tensors(family, model, namespace).items()
            if name.endswith(".weight") and t.dim() == 2}


def _key(layout: Layout, layer: str, suffix: str) -> str:
    return layout.prefix + (layer.replace(".", "_") if layout.underscored else layer) + "." + suffix


def make_lora(family: str, model: torch.nn.Module, layout: str, rank: int = 4, seed: int = 0, alpha: float = 2.0,
              std: float = 0.15, only: Callable[[str], bool] = lambda name: True, full_diffs: bool = False,
              text_encoder: bool = False) -> SyntheticLora:
    """A random LoRA on every Linear layer (of its namespace) that `only` keeps; `full_diffs` writes full weight
    and bias diffs (.diff, .diff_b) instead of low-rank pairs."""
    spec = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    biases = namespace_tensors(family, model, spec.namespace)
    for name, (out, inp) in linear_layers(family, model, spec.namespace).items():
        if not only(name):
            continue
        if full_diffs:
            delta = LayerDelta(diff=torch.randn(out, inp, generator=gen) * std / 2)
            tensors[_key(spec, name, "diff")] = delta.diff
            if f"{name}.bias" in biases:
                delta.diff_b = torch.randn(out, generator=gen) * std / 2
                tensors[_key(spec, name, "diff_b")] = delta.diff_b
        else:
            down, up = torch.randn(rank, inp, generator=gen) * std, torch.randn(out, rank, generator=gen) * std
            delta = LayerDelta(down, up, alpha / rank if spec.alpha else 1.0)
            tensors[_key(spec, name, spec.down)], tensors[_key(spec, name, spec.up)] = down, up
            if spec.alpha:
                tensors[_key(spec, name, "alpha")] = torch.tensor(alpha)
        layers[name] = delta
    if text_encoder:
        tensors[f"{TEXT_ENCODER_KEY}.lora_down.weight"] = torch.randn(rank, 8, generator=gen)
        tensors[f"{TEXT_ENCODER_KEY}.lora_up.weight"] = torch.randn(8, rank, generator=gen)
    return SyntheticLora(family, layout, layers, tensors)


def save_lora(lora: SyntheticLora, path: str | Path) -> Path:
    save_file({k: v.contiguous() for k, v in lora.tensors.items()}, str(path))
    return Path(path)


def _merge(tensors: dict[str, torch.Tensor], lora: SyntheticLora, strength: float) -> None:
    """W += strength * (scale * up @ down + diff), b += strength * diff_b, the delta in float64."""
    for name, d in lora.layers.items():
        w = tensors[f"{name}.weight"]
        delta = torch.zeros(w.shape, dtype=torch.float64)
        if d.down is not None:
            delta += d.scale * d.up.double() @ d.down.double()
        if d.diff is not None:
            delta += d.diff.double()
        tensors[f"{name}.weight"] = (w.double() + strength * delta).to(w.dtype)
        if d.diff_b is not None:
            b = tensors[f"{name}.bias"]
            tensors[f"{name}.bias"] = (b.double() + strength * d.diff_b.double()).to(b.dtype)


def write_merged(path: str | Path, family: str, model: torch.nn.Module,
                 loras: Sequence[tuple[SyntheticLora, float]]) -> Path:
    """The model (whole, loaded) with `loras` merged into its weights, as an original-layout checkpoint."""
    tensors = dict(model_tensors(model))
    for lora, strength in loras:
        if lora.namespace == "diffusers":
            _merge(tensors, lora, strength)
    original = to_original(family, tensors)
    for lora, strength in loras:
        if lora.namespace == "original":
            _merge(original, lora, strength)
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    return Path(path)
