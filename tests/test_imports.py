"""The import graph: bench -> export -> kd, and no optional backend loads on `import gkd.kd`.

The folders ``kd/``, ``export/`` and ``bench/`` are installed as ``gkd.kd``, ``gkd.export`` and ``gkd.bench`` (see
setup.py): no generic top-level module name is ever imported.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorrt", "pycuda", "onnxruntime", "pycocotools", "onnx")
#: package folder -> the gkd subpackages its modules may not import
FORBIDDEN = {"kd": ("gkd.export", "gkd.bench", "gkd.pipeline", "gkd.cli"), "export": ("gkd.bench", "gkd.pipeline")}


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT.parent)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """Absolute module names imported anywhere in ``path`` (module level or inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_import_kd_loads_no_optional_backend():
    mods = _modules_after("import gkd.kd, gkd.kd.config, gkd.core.io")
    loaded = sorted(m for m in mods if m.split(".")[0] in HEAVY or m.startswith(("gkd.export", "gkd.bench")))
    assert loaded == [], f"import gkd.kd pulled in {loaded}"


def test_gkd_help_is_light():
    mods = _modules_after("import gkd.cli")
    assert "torch" not in mods, "the root CLI must not import torch just to list commands"


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_flow_one_way(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _imported_names(path):
            if name.startswith(FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert bad == []


def test_no_generic_top_level_imports():
    """Every project module is imported as gkd.<...>: a bare `import export` would pick up another project's
    export.py (YOLOv5 has one at its root) in a notebook started there."""
    bad = []
    for folder in ("gkd", "kd", "export", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in _imported_names(path):
                if name.split(".")[0] in ("kd", "export", "bench"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert bad == []


PACKAGES = {"core": "gkd.core", "kd": "gkd.kd", "export": "gkd.export", "bench": "gkd.bench", "gkd": "gkd"}


def _module_files() -> dict[str, Path]:
    """gkd's own modules, by installed name (``kd/data/coco.py`` -> ``gkd.kd.data.coco``)."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((name, *parts))] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> the gkd modules it imports, at module level or inside functions (relative imports resolved;
    ``from package import module`` names the module)."""
    files = _module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_even_inside_functions():
    """No two modules of gkd import each other, directly or around a loop, wherever the import statement stands:
    an import hidden inside a function is still a dependency both ways."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_nothing_else_of_gkd():
    bad = [f"{m} imports {t}" for m, targets in _import_graph().items() if m.startswith("gkd.core")
           for t in targets if not t.startswith("gkd.core")]
    assert bad == []
