"""The models a benchmark or evaluation runs: :class:`ModelSpec` (a file and its kind), the checks made before any
work (devices and providers this machine has, no file given twice), and the runner of each, opened by
:func:`gkd.export.model_files.open_model` (which also decides a file's kind: :func:`model_kind`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gkd.core.errors import GkdError
from gkd.export.model_files import KINDS, ORT_PROVIDERS, Unavailable, model_kind, open_model

__all__ = ["KINDS", "ModelSpec", "model_kind", "open_runner", "ORT_PROVIDERS", "Unavailable", "check_distinct_files",
           "check_device_request"]


@dataclass
class ModelSpec:
    """One model to run: its file and kind (:data:`KINDS`, or ``"openvino"``: an ONNX file run by OpenVINO's CPU
    plugin instead of onnxruntime). Tables label it by :func:`runner_label`."""

    path: Path
    kind: str


def check_device_request(device: str | None, provider: str | None) -> None:
    """Refuse, before any work, a ``--device cuda`` or ``--provider cuda|tensorrt`` this machine cannot honour
    (one line, exit status 2), rather than falling back to the CPU under onnxruntime's provider errors and timing
    something other than what was asked for.

    Raises:
        GkdError: no CUDA GPU, or onnxruntime lacks the execution provider.
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise GkdError("--device: 'cuda' requested but torch sees no CUDA GPU on this machine; use --device cpu")
    if provider not in ("cuda", "tensorrt"):
        return
    if not torch.cuda.is_available():
        raise GkdError(f"--provider {provider}: onnxruntime's {ORT_PROVIDERS[provider][0]} needs a CUDA GPU and "
                       f"torch sees none on this machine; use --provider cpu")
    import onnxruntime as ort

    if ORT_PROVIDERS[provider][0] not in ort.get_available_providers():
        raise GkdError(f"--provider {provider}: this onnxruntime ({ort.__version__}) has no "
                       f"{ORT_PROVIDERS[provider][0]} (it offers {', '.join(ort.get_available_providers())}); install "
                       f"onnxruntime-gpu or use --provider cpu")


def check_distinct_files(paths: Sequence[str | Path]) -> list[Path]:
    """The resolved paths of ``paths``; a one-line GkdError when one file is given twice (under any spelling).

    A model is identified by its file, never by its name: two runs' ``model.pt`` are two models, and one file
    named twice is one model that would be measured twice and reported as two."""
    seen: dict[Path, Path] = {}
    out = []
    for given in paths:
        full = Path(given).resolve()
        if full in seen:
            raise GkdError(f"{given}: given twice (also as {seen[full]}); give each model once")
        seen[full] = Path(given)
        out.append(full)
    return out


def open_runner(spec: ModelSpec, *, device: str = "cpu", provider: str | None = None, threads: int = 1):
    """An activated runner for ``spec`` and a note (what was used instead of what was asked, or ""): see
    :func:`gkd.export.model_files.open_model`.

    Args:
        spec: the model.
        device: ``cpu`` or ``cuda`` (PyTorch checkpoints; ONNX picks its provider from it unless ``provider``).
        provider: onnxruntime provider key (:data:`ORT_PROVIDERS`); default: ``cuda`` on ``--device cuda``.
        threads: CPU threads (PyTorch's intra-op and onnxruntime's intra-op alike). A checkpoint sets torch's for
            the whole process: a benchmark or evaluation owns its process.

    Raises:
        Unavailable: the model's runtime or device is missing (tensorrt not installed, no CUDA GPU).
        GkdError: the file is not a usable model.
    """
    runner, note = open_model(spec.path, spec.kind, device=device, provider=provider, threads=threads)
    if spec.kind == "pytorch":
        import torch

        torch.set_num_threads(threads)
    return runner, note


def runner_label(spec: ModelSpec, runner: Any) -> str:
    """``pytorch-fp32``, ``onnxruntime-int8``, ``onnxruntime-static-int8`` (a file of the static, TensorRT-ready
    graph), ``openvino-fp32``, ``tensorrt-fp16``: the runtime and the precision read back."""
    runtime = getattr(runner, "name", None) or {"pytorch": "pytorch", "onnx": "onnxruntime",
                                                 "tensorrt": "tensorrt"}[spec.kind]
    graph = "static-" if getattr(runner, "graph", "") == "static" else ""  # the TensorRT-ready graph's files
    return f"{runtime}-{graph}{getattr(runner, 'precision', 'unknown')}"
