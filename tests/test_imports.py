"""The import graph: bench -> export -> kd, and no optional backend loads on `import kd`."""
import json
import subprocess
import sys

HEAVY = ("tensorrt", "pycuda", "onnxruntime", "pycocotools", "onnx", "export", "bench")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_kd_loads_no_optional_backend():
    mods = _modules_after("import kd, kd.config, kd.io")
    loaded = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert loaded == [], f"import kd pulled in {loaded}"


def test_gkd_help_is_light():
    mods = _modules_after("import gkd.cli")
    assert "torch" not in mods, "the root CLI must not import torch just to list commands"
