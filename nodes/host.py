"""The few ComfyUI services the nodes use, imported lazily so the nodes import and test without ComfyUI."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

MODEL_FOLDERS = ("diffusion_models", "checkpoints", "diffusers")
ALLOW_ABSOLUTE_ENV = "XDIT_ALLOW_ABSOLUTE_MODEL_PATHS"


class ModelChoiceError(ValueError):
    """A model_name the Load node refuses (not a model folder entry, or one that leads out of them)."""


def model_files() -> list[str]:
    """Model choices: `diffusion_models/<file>`, `checkpoints/<file>` and `diffusers/<folder>` entries."""
    try:
        import folder_paths
    except ImportError:
        return []
    names = [f"diffusion_models/{n}" for n in folder_paths.get_filename_list("diffusion_models")]
    names += [f"checkpoints/{n}" for n in folder_paths.get_filename_list("checkpoints")]
    for root in folder_paths.get_folder_paths("diffusers"):
        base = Path(root)
        if base.is_dir():
            for cfg in sorted(base.glob("*/config.json")) + sorted(base.glob("*/transformer/config.json")):
                names.append(f"diffusers/{cfg.parent.relative_to(base).as_posix()}")
    return names


def absolute_paths_allowed() -> bool:
    """Read at every call: absolute paths are for scripts; only a server started with the variable takes them."""
    return os.environ.get(ALLOW_ABSOLUTE_ENV) == "1"


def resolve_model_file(choice: str) -> str:
    """The real path of a `model_files()` entry, or of an absolute path when `absolute_paths_allowed()`.

    Anything else raises ModelChoiceError with one message whether or not such a path exists, so a prompt
    cannot probe the server's files."""
    if "\0" in choice:
        raise ModelChoiceError(f"model name {choice!r} contains a NUL byte; pick an entry of the model_name list")
    if os.path.isabs(choice) and absolute_paths_allowed():
        return choice  # the operator opted in; the engine reports a missing path
    if choice not in model_files():
        raise ModelChoiceError(
            f"model {choice!r} is not in ComfyUI's diffusion_models, checkpoints or diffusers folders (refresh "
            f"the node after adding files; absolute paths need {ALLOW_ABSOLUTE_ENV}=1 in the server's environment)")
    import folder_paths

    folder, _, name = choice.partition("/")
    # The name is ComfyUI's own listing, so it cannot climb out of its root (checked anyway, lexically). Links
    # inside a model folder are followed, as ComfyUI's loaders do: artists link big files from other disks,
    # and only the machine's owner can make them.
    for root in folder_paths.get_folder_paths(folder):
        path = Path(os.path.normpath(Path(root) / name))
        if not path.is_relative_to(os.path.normpath(root)):
            raise ModelChoiceError(f"model {choice!r} leaves ComfyUI's {folder} folders; pick an entry of the list")
        if path.is_dir() if folder == "diffusers" else path.is_file():
            return str(path.resolve())
    raise ModelChoiceError(f"model {choice!r} is no longer in ComfyUI's {folder} folders (refresh the node)")


def validate_choice(resolve: Callable[[str], str], choice: str) -> bool | str:
    """A VALIDATE_INPUTS answer for a file widget: True, or the ModelChoiceError's message ComfyUI shows."""
    try:
        resolve(choice)
    except ModelChoiceError as e:
        return str(e)
    return True


def lora_files() -> list[str]:
    """LoRA choices: the entries of ComfyUI's loras folders."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list("loras")


def resolve_lora_file(choice: str) -> str:
    """The real path of a `lora_files()` entry (or an absolute path when `absolute_paths_allowed()`); else
    ModelChoiceError, whether or not such a file exists."""
    if "\0" in choice:
        raise ModelChoiceError(f"LoRA name {choice!r} contains a NUL byte; pick an entry of the lora_name list")
    if os.path.isabs(choice) and absolute_paths_allowed():
        return choice
    if choice not in lora_files():
        raise ModelChoiceError(f"LoRA {choice!r} is not in ComfyUI's loras folders (refresh the node after adding "
                               f"files; absolute paths need {ALLOW_ABSOLUTE_ENV}=1 in the server's environment)")
    import folder_paths

    path = folder_paths.get_full_path("loras", choice)  # ComfyUI's own lookup keeps to its folders
    if path is None:
        raise ModelChoiceError(f"LoRA {choice!r} is no longer in ComfyUI's loras folders (refresh the node)")
    return str(Path(path).resolve())


class StepReporter:
    """ComfyUI's progress bar for the node and, when ComfyUI's previewer for the family's latent format is on
    (its --preview-method: latent2rgb, TAESD), each step's preview from the workers' prediction. Without
    ComfyUI it does nothing.

    ComfyUI's progress hook raises its interruption (and clears the flag) when the user cancels. Raised here it
    would leave the workers running; so the flag is set again and the pool's cancel check, which stops every
    rank at the same step, sees it."""

    def __init__(self, total: int, latent_format=None):
        self.bar = self.previewer = self.pending = None
        try:
            import comfy.model_management as mm
            import comfy.utils
            import latent_preview
        except ImportError:
            return
        self.bar = comfy.utils.ProgressBar(total)
        if latent_format is not None:
            self.device = mm.get_torch_device()  # where ComfyUI puts the previewer (TAESD's weights)
            self.previewer = latent_preview.get_previewer(self.device, latent_format)

    @property
    def wants_previews(self) -> bool:
        return self.previewer is not None

    def preview(self, step: int, x0) -> None:
        """The prediction of a step (model space, first image): decoded as ComfyUI's sampler callback does. A
        preview that fails turns previews off (logged once); it never stops the sampling."""
        if self.previewer is None:
            return
        try:
            self.pending = self.previewer.decode_latent_to_preview_image("JPEG", x0.to(self.device))
        except Exception as e:  # noqa: BLE001 - a preview is never worth a failed prompt
            logging.getLogger("xdit").warning("xDiT: live previews turned off for this prompt: %s", e)
            self.previewer = None

    def progress(self, step: int, total: int) -> None:
        if self.bar is None:
            return
        import comfy.model_management as mm

        preview, self.pending = self.pending, None
        try:
            self.bar.update_absolute(step, total, preview)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)


def interrupted() -> bool:
    """Has the user pressed Cancel? (False without ComfyUI.)"""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    return mm.processing_interrupted()


def raise_interrupted() -> None:
    """Raise ComfyUI's own interruption, so the queue treats the prompt as cancelled, not failed."""
    import comfy.model_management as mm

    raise mm.InterruptProcessingException()


# CUDA_VISIBLE_DEVICES as the user started ComfyUI with it, read at plugin import (before anything else can).
# ComfyUI's --cuda-device and --default-device rewrite it in os.environ before torch starts; /proc/self/environ
# keeps the environment the process was started with (os.environ changes do not touch it).
def _launch_environment() -> dict[str, str]:
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs
            if k in (b"CUDA_VISIBLE_DEVICES", b"CUDA_DEVICE_ORDER")}


_LAUNCH_ENV = _launch_environment()


def comfy_gpu_view() -> dict:
    """How ComfyUI's process sees the GPUs, as `api.plan_placement` takes it: the CUDA_VISIBLE_DEVICES the user
    gave it (`user_visible`; None: unset), the one in the process now (`comfy_visible`, after ComfyUI's
    `--cuda-device`/`--default-device`, named in `comfy_flag`), ComfyUI's CUDA device index in that view
    (`comfy_device`; None when it computes on the CPU or runs without ComfyUI) and that device's UUID."""
    now = os.environ.get("CUDA_VISIBLE_DEVICES")
    flag = ""
    try:
        from comfy.cli_args import args
    except ImportError:
        args = None
    if getattr(args, "cuda_device", None) is not None:
        flag = f"--cuda-device {args.cuda_device}"
    elif getattr(args, "default_device", None) is not None:
        flag = f"--default-device {args.default_device}"
    # When ComfyUI rewrote the variable, the user's own restriction is the one the process started with.
    user = _LAUNCH_ENV.get("CUDA_VISIBLE_DEVICES") if flag else now
    device = uuid = None
    try:
        import comfy.model_management as mm
    except ImportError:
        mm = None
    if mm is not None:
        dev = mm.get_torch_device()
        if getattr(dev, "type", None) == "cuda":
            import torch

            device = dev.index if dev.index is not None else torch.cuda.current_device()
            uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "") or None
    return {"user_visible": user, "comfy_visible": now, "comfy_device": device, "comfy_uuid": uuid,
            "comfy_flag": flag}


def plan_placement(gpu_count: int, reserve_gpus: int, world_size: int):
    """The physical GPUs a local pool of `world_size` ranks takes beside ComfyUI (`api.Placement`: the GPUs,
    rank by rank, and a note), or None where NVML sees no GPU (CPU machines: Ray's own detection, as before).
    Raises api.XDiTConfigError when the mesh does not fit."""
    from xdit_core import api

    inventory = api.gpu_inventory()
    if not len(inventory):
        return None
    return api.plan_placement(inventory, world_size=world_size, gpu_count=gpu_count, reserve_gpus=reserve_gpus,
                              **comfy_gpu_view())


def free_comfy_gpu_memory() -> None:
    """Before the workers run: make room on ComfyUI's GPU only when a worker runs there, and only as much as
    they add (`api.comfy_gpu_bytes_needed()`: their weights unless already resident there, a CUDA context when
    the pool starts) plus ComfyUI's own inference reserve. ComfyUI's `free_memory` unloads its models on that
    device, least recently used first, until that much is free; the others stay loaded."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    from xdit_core import api

    need = api.comfy_gpu_bytes_needed()
    device = mm.get_torch_device()
    if need <= 0 or getattr(device, "type", None) != "cuda":
        return
    mm.free_memory(need + mm.minimum_inference_memory(), device)


def visible_gpus() -> int:
    """GPUs the workers may use on this machine: NVML's (all of them, whatever ComfyUI's --cuda-device left its
    own process) less those the user's CUDA_VISIBLE_DEVICES hides; without NVML, the CUDA devices this process
    sees. 0: CPU workers."""
    from xdit_core import api

    inventory = api.gpu_inventory()
    if len(inventory):
        return len(api.parse_visible(comfy_gpu_view()["user_visible"], inventory)[0])
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GIB = 2 ** 30


def describe_workers(reports: list[dict], mesh: str | None) -> str:
    """One line on the running workers' memory: per rank its GPU and the bytes torch reserved there (allocated
    in brackets), or the process's RSS on the CPU; '' without workers."""
    if not reports:
        return ""
    parts, total = [], 0
    for r in reports:
        if "reserved_bytes" in r:
            total += r["reserved_bytes"]
            parts.append(f"rank {r['rank']} → GPU {r.get('gpu', '?')} {r['reserved_bytes'] / GIB:.2f} GiB "
                         f"({r['allocated_bytes'] / GIB:.2f} allocated)")
        else:
            total += r["rss_bytes"]
            where = f" → GPU {r['gpu']}" if r.get("gpu") is not None else ""
            parts.append(f"rank {r['rank']}{where} {r['rss_bytes'] / GIB:.2f} GiB RSS")
    return f"workers up ({mesh or 'mesh unknown'}): {', '.join(parts)}; {total / GIB:.2f} GiB in all"
