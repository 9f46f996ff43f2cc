"""One place for optional dependencies: import them only when a feature needs them, with an actionable message.

``import gkd.export`` must stay light (no onnx, onnxruntime, tensorrt or pycuda): every module here imports heavy
packages inside the functions that use them, through :func:`lazy_import` when a missing package is a user problem.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from gkd.core.errors import GkdError

__all__ = ["lazy_import", "has_module"]

# package -> how to get it (shown in the one-line error)
_HINTS = {
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime-gpu (or onnxruntime; never both in one environment)",
    "tensorrt": "pip install 'gkd[trt]' on a machine with an NVIDIA GPU and NVIDIA's package index",
    "pycuda": "pip install 'gkd[trt]'",
    "pycocotools": "pip install pycocotools",
}


def has_module(name: str) -> bool:
    """True if ``name`` can be imported (found on the path and its import does not fail)."""
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        return False
    try:
        importlib.import_module(name)
    except ImportError:  # e.g. tensorrt bindings present but libnvonnxparser.so missing
        return False
    return True


def lazy_import(name: str, feature: str = "") -> ModuleType:
    """Import ``name`` or raise a one-line :class:`GkdError` saying which feature needs it and how to install it.

    Args:
        name: module name, e.g. ``"onnxruntime"`` or ``"tensorrt"``.
        feature: what the caller was doing, e.g. ``"INT8 quantization"``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        root = name.split(".")[0]
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        need = f" for {feature}" if feature else ""
        raise GkdError(f"{name} is needed{need} but cannot be imported ({why}); {_HINTS.get(root, 'install it')}") \
            from None
