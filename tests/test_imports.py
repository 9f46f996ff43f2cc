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
