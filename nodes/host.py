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


def free_comfy_gpu_memory() -> None:
    """Release ComfyUI's cached models before our workers take the GPUs."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.unload_all_models()
    mm.soft_empty_cache(True)


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
