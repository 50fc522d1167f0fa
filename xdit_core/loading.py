"""Load a diffusers transformer offline, safetensors only."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import XDiTModelError
from .families import CLASS_NAMES, ModelSpec, resolve_model_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _refuse_pickle(path: Path) -> XDiTModelError:
    return XDiTModelError(
        f"{path} is a pickle checkpoint; only safetensors are loaded (pickle can run code). Convert it once: "
        "python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"")


def read_model_config(path: str | Path) -> dict:
    """The config.json of a diffusers model folder, after checking the folder holds safetensors weights."""
    path = Path(path)
    if not path.exists():
        raise XDiTModelError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        raise XDiTModelError(
            f"{path} is a single file; this version loads diffusers model folders (config.json + safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise XDiTModelError(f"{path} has no config.json; expected a diffusers model folder "
                             f"(save_pretrained layout of one of {', '.join(CLASS_NAMES)})")
    if not any(path.glob("*.safetensors")):
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise XDiTModelError(f"{path} holds no .safetensors weight file")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise XDiTModelError(f"{config_file} is not valid JSON: {e}") from None


def load_model(path: str | Path, dtype: str = "fp32", family: Optional[str] = None,
               variant: Optional[str] = None) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a diffusers model folder on the CPU in `dtype`; returns (model, spec)."""
    from .tiny import model_class

    if dtype not in DTYPES:
        raise XDiTModelError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    config = read_model_config(path)
    spec = resolve_model_spec(config, family, variant)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    try:
        model = model_class(spec.family).from_pretrained(
            str(path), torch_dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True,
            low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XDiTModelError(f"cannot load {path} as {spec.family}: {first}") from None
    return model.eval().requires_grad_(False), spec
