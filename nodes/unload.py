"""xDiT Unload: frees the workers' GPUs; passes its input through so it can sit inside a graph.

Also frees them when the user asks ComfyUI to free memory. ComfyUI 0.3.64 has no hook for that: its "Unload
Models" and "Free model and node cache" buttons POST /free, the server sets flags on the prompt queue, and the
prompt worker, between prompts, takes them with `PromptQueue.get_flags()` and unloads its own models. At import
this module wraps `get_flags` so that, when the taken flags ask ComfyUI to unload models (`unload_models`, or
`free_memory`, which implies it), the worker pool is shut down too, on the same thread at the same moment.
Only ComfyUI's prompt worker takes the flags, so nothing else unloads the workers: not our own calls (the
sampler frees ComfyUI's memory with `free_memory`, never through the flags), not ComfyUI's unload after an
out-of-memory error, not `--disable-smart-memory`'s unload after every prompt.
"""
from __future__ import annotations

import functools
import logging
import sys

from . import host

log = logging.getLogger("xdit")


def unload_workers(reason: str) -> str:
    """Shut the worker pool down; returns what was freed, in one line."""
    from xdit_core import api

    mesh = api.running_mesh()
    freed = host.describe_workers(api.workers_memory(), mesh)
    api.unload()
    if mesh is None:
        return "no xDiT workers were running"
    summary = f"{reason}: {freed.replace('workers up', 'freed the workers', 1) if freed else 'freed the workers'}"
    log.info("xDiT: %s", summary)
    return summary


def asks_to_unload(flags: dict) -> bool:
    """ComfyUI's own test in its prompt worker: `unload_models`, defaulting to `free_memory`."""
    return bool(flags.get("unload_models", flags.get("free_memory", False)))


def install_free_hook(queue_cls=None) -> bool:
    """Wrap ComfyUI's `PromptQueue.get_flags` (once) so that a /free request unloads the workers too. Without
    ComfyUI (tests, scripts) it does nothing; returns whether the hook is in place."""
    if queue_cls is None:
        execution = sys.modules.get("execution")  # ComfyUI's, imported by its main.py before custom nodes
        queue_cls = getattr(execution, "PromptQueue", None)
    original = getattr(queue_cls, "get_flags", None)
    if original is None:
        return False
    if getattr(original, "xdit_free_hook", False):
        return True

    @functools.wraps(original)
    def get_flags(self, reset=True):
        flags = original(self, reset)
        if reset and isinstance(flags, dict) and asks_to_unload(flags):  # taken by the prompt worker
            try:
                unload_workers("ComfyUI was asked to free memory (/free)")
            except Exception as e:  # noqa: BLE001 - never break ComfyUI's prompt worker loop
                log.warning("xDiT: could not unload the workers on /free: %s", e)
        return flags

    get_flags.xdit_free_hook = True
    queue_cls.get_flags = get_flags
    return True


class XDiTUnload:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "summary")
    FUNCTION = "unload"
    OUTPUT_NODE = True
    DESCRIPTION = ("Shut the xDiT worker pool down and free its GPU memory (ComfyUI's Unload Models / Free model "
                   "and node cache do it too). summary: what each rank held.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"latent": ("LATENT", {"tooltip": "passed through unchanged"})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # always run: unloading is a side effect, not a cached result

    def unload(self, latent=None):
        summary = unload_workers("xDiT Unload")
        return {"ui": {"text": [summary]}, "result": (latent, summary)}


install_free_hook()
