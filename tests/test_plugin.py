"""The plugin's packaging: ComfyUI entry point, requirements, registry metadata, architecture rules."""
import ast
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_entry_point_imports_without_comfyui():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    spec = importlib.util.spec_from_file_location("comfyui_xdit_plugin", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert "comfy" not in sys.modules


def _requirement_names(path):
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[ ;]", line)[0].lower())
    return names


def test_requirements_never_pin_torch():
    names = _requirement_names(ROOT / "requirements.txt")
    assert {"diffusers", "ray", "safetensors", "numpy", "scipy"} <= set(names)
    assert not {"torch", "torchvision", "torchaudio", "flash-attn"} & set(names)


def test_pyproject_has_registry_metadata_matching_requirements():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= comfy.keys()
    deps = sorted(d.replace(" ", "") for d in meta["project"]["dependencies"])
    reqs = sorted(line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.split("#")[0].strip())
    assert deps == reqs
    assert (ROOT / "docs" / "icon.png").is_file()


def _imports(package):
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                yield path, [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield path, [node.module]


def test_engine_never_imports_comfyui():
    for path, names in _imports("xdit_core"):
        for name in names:
            assert name.split(".")[0] not in {"comfy", "folder_paths", "nodes", "comfy_api"}, (path, name)


def test_nodes_never_touch_torch_distributed():
    for path, names in _imports("nodes"):
        for name in names:
            assert not name.startswith("torch.distributed"), (path, name)


def test_readme_quick_start_has_exactly_two_commands_and_ci_uses_one():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("\n## ")[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick)
    assert len(commands) == 2
    assert commands[0].endswith("python -m xdit_core demo")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "pytest" in ci
