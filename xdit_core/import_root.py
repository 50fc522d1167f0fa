"""A directory that puts exactly one package, the engine `xdit_core`, on the import path.

ComfyUI's process and the pool's workers import the engine as the top-level package `xdit_core` (the
name Ray pickles the worker class by). Putting the plugin folder itself on the path would also expose
its `nodes`, `tests`, `tools` and `bench`, shadowing ComfyUI's own `nodes` module and anything else of
those names; this directory holds only a link to the package. Written without package imports: the
plugin's entry point loads it by file path before `xdit_core` is importable.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _make_link(target: Path, link: Path) -> None:
    try:
        os.symlink(target, link, target_is_directory=True)
    except OSError:
        if os.name != "nt":
            raise
        import _winapi  # Windows without the symlink privilege: a directory junction needs none

        _winapi.CreateJunction(str(target), str(link))


def _link_into(root: Path) -> Path:
    link = root / "xdit_core"
    if not (link.exists() and link.resolve() == PACKAGE):
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".xdit_core.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        elif tmp.exists():
            tmp.rmdir()  # a junction a crashed import left behind
        _make_link(PACKAGE, tmp)
        os.replace(tmp, link)  # atomic: concurrent imports never see a half-made link
    return root


def engine_import_root() -> Path:
    """The directory to put on sys.path / PYTHONPATH; beside the package, or in the temp dir if read-only."""
    try:
        return _link_into(PACKAGE.parent / ".engine_path")
    except OSError:
        tag = hashlib.sha256(str(PACKAGE).encode()).hexdigest()[:12]
        return _link_into(Path(tempfile.gettempdir()) / f"xdit-engine-{tag}")
