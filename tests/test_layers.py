"""The engine's folders are its layers: imports go downwards only, no cycles (function-level imports
included), the nodes use the façade, and only a directory holding `xdit_core` joins the import path."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "xdit_core"
# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ["errors", "import_root", "models", "loading", "sampling", "parallel", "runtime", "api", "cli", "__main__"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_imports() -> dict[str, set[str]]:
    """Every xdit_core module -> the xdit_core modules it imports anywhere (module or function level)."""
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in found:
                if target.startswith("xdit_core") and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the package itself: top


def test_engine_has_no_import_cycles():
    graph = _engine_imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_engine_imports_go_down_the_layers():
    graph = _engine_imports()
    bad = [(m, t) for m, targets in graph.items() for t in targets if _layer(t) > _layer(m)]
    assert not bad, f"upward imports (layers, lowest first: {LAYERS}): {bad}"
    # The random-weight builders serve tests, benchmarks and the demo only.
    assert not [m for m, targets in graph.items() if "xdit_core.cli.tiny" in targets and not m.startswith("xdit_core.cli")]


def test_the_cli_uses_the_facade():
    """The CLI reaches the engine through xdit_core.api too (tiny builds diffusers models: it needs models/)."""
    graph = _engine_imports()
    for module, targets in graph.items():
        if module.startswith("xdit_core.cli") and module != "xdit_core.cli.tiny":
            beside = {t for t in targets if not t.startswith("xdit_core.cli")}
            assert beside <= {"xdit_core.api", "xdit_core.errors"}, (module, beside)


def test_nodes_use_only_the_facade():
    for path in (ROOT / "nodes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("xdit_core"):
                    ok = name == "xdit_core.api" or (name == "xdit_core" and [a.name for a in node.names] == ["api"])
                    assert ok, f"{path.name} imports {name}; nodes go through xdit_core.api"


def test_plugin_puts_only_the_engine_on_the_import_path(tmp_path):
    """ComfyUI imports the plugin as a package; afterwards `nodes`, `tests`, `tools` and `bench` are still the
    host's own modules, `xdit_core` imports from a directory that holds nothing else, and the pool's workers
    get that directory, not the plugin folder."""
    for name in ("nodes", "tests", "tools", "bench"):
        (tmp_path / f"{name}.py").write_text("OWNER = 'host'\n")
    script = textwrap.dedent(f"""
        import importlib.util, os, sys
        sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if os.path.abspath(p or '.') != {str(ROOT)!r}]
        spec = importlib.util.spec_from_file_location("comfyui_xdit", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        plugin = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_xdit"] = plugin
        spec.loader.exec_module(plugin)
        assert plugin.NODE_CLASS_MAPPINGS
        import nodes, tests, tools, bench
        assert [m.OWNER for m in (nodes, tests, tools, bench)] == ["host"] * 4
        assert {str(ROOT)!r} not in [os.path.abspath(p or '.') for p in sys.path]
        import xdit_core
        from xdit_core.runtime.pool import worker_pythonpath
        engine_dir = os.path.dirname(os.path.dirname(os.path.abspath(xdit_core.__file__)))
        assert os.listdir(engine_dir) == ["xdit_core"], os.listdir(engine_dir)
        first = worker_pythonpath().split(os.pathsep)[0]
        assert os.listdir(first) == ["xdit_core"] and first != {str(ROOT)!r}
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
