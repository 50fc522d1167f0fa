"""The few ComfyUI services the nodes use, imported lazily so the nodes import and test without ComfyUI."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def comfy_available() -> bool:
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:
        return False
    return True


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


def resolve_model_file(choice: str) -> str:
    """The full path of a `model_files()` entry (or of an absolute path, for scripting)."""
    if Path(choice).is_absolute():
        return choice
    import folder_paths

    folder, _, name = choice.partition("/")
    if folder == "diffusers":
        for root in folder_paths.get_folder_paths("diffusers"):
            if (Path(root) / name).is_dir():
                return str(Path(root) / name)
        raise FileNotFoundError(f"diffusers folder {name!r} not found in {folder_paths.get_folder_paths('diffusers')}")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{choice!r} not found in ComfyUI's {folder} folders")
    return path


def progress_callback(total: int) -> Callable[[int, int], None]:
    """ComfyUI's progress bar for the node (a no-op without ComfyUI).

    ComfyUI's progress hook raises its interruption (and clears the flag) when the user cancels. Raised
    here it would leave the workers running; so the flag is set again and the pool's cancel check, which
    stops every rank at the same step, sees it."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:
        return lambda step, n: None
    bar = comfy.utils.ProgressBar(total)

    def update(step: int, n: int) -> None:
        try:
            bar.update_absolute(step, n)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)

    return update


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
