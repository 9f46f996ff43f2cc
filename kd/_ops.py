"""Loads the compiled operators (``gkd.kd._C``) once and says what is available.

``gkd.kd._C`` is built by ``pip install --no-build-isolation -e .`` (see docs/operator.md): with its CUDA kernel where
nvcc exists, CPU-only otherwise. Without it, ``gkd.kd.prototype`` runs the pure-PyTorch version and logs one warning
line the first time it has to.

Everything here is computed once at import and kept in plain module globals, so code traced by ``torch.compile``
can branch on it without a graph break.
"""
from __future__ import annotations

import importlib
import logging

import torch

__all__ = ["has_ops", "has_kernel", "backend_summary", "build_info", "assert_has_ops", "warn_fallback_once"]

_log = logging.getLogger("gkd")

_BUILD_HINT = ("build it with `CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation "
               "--no-deps -e .` (CPU-only when no nvcc; see docs/operator.md)")


def _torch_minor() -> str:
    """The running torch's "major.minor", e.g. "2.14"."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _load(import_module=importlib.import_module) -> tuple[bool, str, dict[str, bool], dict[str, str]]:
    try:
        module = import_module("gkd.kd._C")
    except (ImportError, OSError) as exc:  # not built, or built against another torch (undefined symbol)
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0], {}, {}
    info = {"compiler": getattr(module, "compiler", "unknown"), "torch": getattr(module, "torch_version", "unknown")}
    # libtorch has no stable C++ ABI across minor versions, and an extension that loads against another torch can
    # still crash later (object layouts, inline code). Refuse it here; the registrations it made are then unused.
    if info["torch"] not in ("unknown", _torch_minor()):
        return False, (f"gkd.kd._C was built against torch {info['torch']} but torch {torch.__version__} is running; "
                       "rebuild it"), {}, info
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = {"cpu": has("kd::prototype_project", "CPU"), "cuda": has("kd::prototype_project", "CUDA")}
    kernels["meta"] = True  # the fake kernel registered in gkd.kd.prototype serves meta tensors
    return True, "", kernels, info


_HAS_OPS, _LOAD_ERROR, _KERNELS, _BUILD_INFO = _load()
_warned = False


def has_ops() -> bool:
    """Whether ``gkd.kd._C`` loaded, i.e. ``torch.ops.kd.prototype_project`` exists."""
    return _HAS_OPS


def has_kernel(device_type: str) -> bool:
    """Whether the compiled operator has a kernel for tensors on ``device_type`` ("cpu", "cuda", "meta")."""
    return _KERNELS.get(device_type, False)


def backend_summary() -> str:
    """One short line for logs and benchmark headers, e.g. "C++ CPU + CUDA kernels (GCC 12.2.0, torch 2.14)"."""
    if not _HAS_OPS:
        return f"pure-PyTorch fallback (gkd.kd._C not usable: {_LOAD_ERROR})"
    built = f" ({_BUILD_INFO['compiler']}, torch {_BUILD_INFO['torch']})"
    if _KERNELS["cuda"]:
        return "C++ CPU + CUDA kernels" + built
    return "C++ CPU kernel (built without CUDA; pure-PyTorch fallback on GPUs)" + built


def build_info() -> dict[str, str]:
    """How ``gkd.kd._C`` was built: ``{"compiler": "GCC 12.2.0", "torch": "2.14"}`` ({} when it did not import)."""
    return dict(_BUILD_INFO)


def assert_has_ops() -> None:
    """Raise a RuntimeError that names the fix when ``gkd.kd._C`` is missing."""
    if not _HAS_OPS:
        raise RuntimeError(f"gkd.kd._C is not available ({_LOAD_ERROR}); {_BUILD_HINT}")


def warn_fallback_once(device_type: str) -> None:
    """Log, once per process, that the pure-PyTorch version runs instead of a compiled kernel."""
    global _warned
    if _warned:
        return
    _warned = True
    why = f"gkd.kd._C is not available ({_LOAD_ERROR})" if not _HAS_OPS else f"gkd.kd._C has no {device_type} kernel"
    _log.warning("torch.ops.kd.prototype_project: %s; using the slower pure-PyTorch version. To build it: %s", why,
                 _BUILD_HINT.split("build it with ")[-1])
