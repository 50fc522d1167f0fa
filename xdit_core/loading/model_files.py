"""Weight files on disk: safetensors only, read tensor by tensor with a byte counter."""
from __future__ import annotations

import json
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


class WeightFiles:
    """The tensors of one model, by name, spread over safetensors files; reads count into `stats`."""

    def __init__(self, locations: dict[str, tuple[Path, str]], stats: LoadStats):
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
                                     f"supported weight dtypes: {', '.join(STORED_DTYPES)}")
            self.shapes[name] = tuple(info.get_shape())

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
