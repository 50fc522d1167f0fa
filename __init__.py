"""comfyui-xdit: ComfyUI entry point. Importing it must work without ComfyUI (tests, CLI)."""
import importlib.util
import os
import sys

# The engine is the top-level package `xdit_core` (the name the Ray workers import too). Only a directory
# holding just that package goes on the path, never this folder: its `nodes`, `tests`, `tools` and `bench`
# would shadow ComfyUI's modules of the same names.
_spec = importlib.util.spec_from_file_location(
    "_xdit_import_root", os.path.join(os.path.dirname(os.path.abspath(__file__)), "xdit_core", "import_root.py"))
_import_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_import_root)
_ENGINE_PATH = str(_import_root.engine_import_root())
if _ENGINE_PATH not in sys.path:
    sys.path.insert(0, _ENGINE_PATH)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
