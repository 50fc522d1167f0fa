"""comfyui-xdit: ComfyUI entry point. Importing it must work without ComfyUI (tests, CLI)."""
import os
import sys

# The engine is imported as the top-level package `xdit_core`, the name the Ray workers import too.
_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
