"""Weight files on disk: safetensors only, read tensor by tensor with a byte counter."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from xdit_core.errors import XDiTModelError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Stored dtypes a weight may have (safetensors' names); fp8 Linear weights stay fp8 (models/fp8.py) unless the
# load asks for them upcast to the compute dtype.
STORED_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class LoadStats:
    """What a load read from disk: tensors and their bytes as stored."""

    tensors_read: int = 0
    bytes_read: int = 0


def refuse_pickle(path: Path) -> XDiTModelError:
    """The error for a pickle checkpoint, with the one-line conversion to safetensors."""
    return XDiTModelError(
        f"{path} is a pickle checkpoint; only safetensors are loaded (pickle can run code). Convert it once: "
        "python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"")


def open_safetensors(path: Path) -> Any:
    """A safetensors handle; a truncated or corrupt file is a clear error."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad headers
        raise XDiTModelError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def folder_weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file of a diffusers model folder (one file, or shards listed by an index)."""
    index = folder / INDEX_FILE
    indexes = [index] if index.is_file() else sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise XDiTModelError(f"{indexes[0]} is not a safetensors index (no weight_map): {e}") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_FILE
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise refuse_pickle(pickles[0])
        raise XDiTModelError(f"{folder} holds no .safetensors weight file")
    if len(files) > 1 or len(indexes) > 1:
        raise XDiTModelError(f"{folder} holds several weight files and no {INDEX_FILE}: "
                             f"{', '.join(p.name for p in files + indexes)}; keep one model per folder")
    with open_safetensors(files[0]) as f:
        return {name: files[0] for name in f.keys()}


# ComfyUI's mixed-precision files (comfy-kitchen's layout: Comfy-Org's *_fp8mixed.safetensors): a quantized Linear's
# `weight` in fp8 with one float32 `weight_scale` (its value is weight x weight_scale), the layer's format as JSON in a
# uint8 `comfy_quant` tensor (or in the header's _quantization_metadata), and optionally an `input_scale` for fp8
# matmuls, which is unused here (weights are upcast per layer). They are read as ComfyUI's older scaled fp8, whose
# names the loader knows: `scale_weight` and `scale_input`. The other comfy-kitchen formats (nvfp4, mxfp8, int8) are
# refused: their weights are stored as U8/I8, or their scales are per block.
MIXED_SCALES = {"weight_scale": "scale_weight", "input_scale": "scale_input"}
MIXED_FORMAT = "comfy_quant"


def _mixed_precision_names(locations: dict[str, tuple[Path, str]]) -> dict[str, tuple[Path, str]]:
    """`locations` with ComfyUI's mixed-precision scales under the scaled-fp8 names and the format tensors left out."""
    out = {}
    for name, where in locations.items():
        stem, _, last = name.rpartition(".")
        if last == MIXED_FORMAT and f"{stem}.weight" in locations:
            continue
        if last in MIXED_SCALES and f"{stem}.weight" in locations:
            name = f"{stem}.{MIXED_SCALES[last]}"
            if name in locations:
                raise XDiTModelError(f"{where[0]} holds both {where[1]!r} and {name!r}: two scales for one weight")
        out[name] = where
    return out


class WeightFiles:
    """The tensors of one model, by name, spread over safetensors files; reads count into `stats`."""

    def __init__(self, locations: dict[str, tuple[Path, str]], stats: LoadStats):
        locations = _mixed_precision_names(locations)
        self._locations = locations  # name -> (file, key in that file)
        self._handles: dict[Path, Any] = {}
        self.stats = stats
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, (file, key) in locations.items():
            handle = self._handle(file)
            try:
                info = handle.get_slice(key)
            except Exception:  # the index names a tensor its shard lacks
                raise XDiTModelError(f"{file} has no tensor {key!r} (named by its index)") from None
            if info.get_dtype() not in STORED_DTYPES:
                raise XDiTModelError(f"{file}: tensor {key!r} is stored as {info.get_dtype()}; "
                                     f"supported weight dtypes: {', '.join(STORED_DTYPES)} (of ComfyUI's quantized "
                                     "formats, fp8 with one scale per weight: scaled fp8 and fp8mixed)")
            self.shapes[name] = tuple(info.get_shape())
            if key.endswith(".weight_scale") and math.prod(self.shapes[name]) != 1:
                raise XDiTModelError(f"{file}: {key!r} is a block-wise scale {list(self.shapes[name])}; of ComfyUI's "
                                     "quantized formats only fp8 with one scale per weight (fp8mixed, scaled fp8) "
                                     "is supported")

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            if not file.is_file():
                raise XDiTModelError(f"weight file not found: {file}")
            self._handles[file] = open_safetensors(file)
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored (its bytes are counted)."""
        file, key = self._locations[name]
        tensor = self._handles[file].get_tensor(key)
        self.stats.tensors_read += 1
        self.stats.bytes_read += tensor.numel() * tensor.element_size()
        return tensor
