"""Every model a user may benchmark or evaluate, opened as a runner: PyTorch checkpoints, ONNX files (any precision)
and TensorRT engines.

The kind comes from the file name (``.pt``/``.pth``, ``.onnx``, ``.engine``/``.plan``/``.trt``) and is checked
against the content's first bytes (a checkpoint is a zip, an engine is not a protobuf...), so a renamed file is
refused in one line instead of failing deep inside a loader. What a runner reports (provider, precision) is read
back from the runtime or the file, never the request: asking onnxruntime for CUDA on a machine without it runs on
the CPU, and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gkd.core.errors import GkdError

__all__ = ["KINDS", "ModelSpec", "model_kind", "open_runner", "ORT_PROVIDERS", "Unavailable", "check_distinct_files",
           "check_device_request"]

KINDS = {".pt": "pytorch", ".pth": "pytorch", ".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt",
         ".trt": "tensorrt"}

#: ``--provider`` -> onnxruntime providers to ask for, best first
ORT_PROVIDERS = {"cpu": ("CPUExecutionProvider",),
                 "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                 "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}


class Unavailable(GkdError):
    """The runtime or device a model needs is missing here (reported, and the model skipped, by the callers)."""


@dataclass
class ModelSpec:
    """One model to run: its file and kind (:data:`KINDS`, or ``"openvino"``: an ONNX file run by OpenVINO's CPU
    plugin instead of onnxruntime). Tables label it by :func:`runner_label`."""

    path: Path
    kind: str


def model_kind(path: str | Path) -> str:
    """``"pytorch"``, ``"onnx"`` or ``"tensorrt"`` for ``path``; a one-line GkdError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise GkdError(f"{path}: model file not found")
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise GkdError(f"{path}: unknown model kind (suffix {path.suffix or 'none'!r}); expected a checkpoint "
                       f"(.pt, .pth), an ONNX file (.onnx) or a TensorRT engine (.engine, .plan, .trt)")
    head = path.read_bytes()[:4] if path.stat().st_size else b""
    is_zip = head[:2] == b"PK"
    if kind == "pytorch" and not is_zip:
        raise GkdError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)")
    if kind in ("onnx", "tensorrt") and (is_zip or not head):
        raise GkdError(f"{path}: {'empty file' if not head else 'a zip archive (a PyTorch checkpoint?)'}, "
                       f"not {'an ONNX model' if kind == 'onnx' else 'a TensorRT engine'}")
    return kind


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
    """An activated runner for ``spec`` and a note (what was used instead of what was asked, or "").

    Args:
        spec: the model.
        device: ``cpu`` or ``cuda`` (PyTorch checkpoints; ONNX picks its provider from it unless ``provider``).
        provider: onnxruntime provider key (:data:`ORT_PROVIDERS`); default: ``cuda`` on ``--device cuda``.
        threads: CPU threads (PyTorch's intra-op and onnxruntime's intra-op alike).

    Raises:
        Unavailable: the model's runtime or device is missing (tensorrt not installed, no CUDA GPU).
        GkdError: the file is not a usable model.
    """
    import torch

    from gkd.export.runtime import OrtRunner, TorchRunner, TrtRunner

    if spec.kind == "pytorch":
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable(f"{spec.path}: --device cuda asked for, but torch sees no CUDA GPU")
        from gkd.kd.checkpoint import load_detector

        torch.set_num_threads(threads)
        model, info = load_detector(spec.path)
        runner = TorchRunner(model, device=device)
        runner.precision = "fp32"
        runner.info = info
        return runner.__enter__(), ""
    if spec.kind in ("onnx", "openvino"):
        from gkd.export.integrity import check_unchanged_since_export

        check_unchanged_since_export(spec.path)  # a file its export folder no longer vouches for is refused
    if spec.kind == "openvino":
        import importlib.util

        from gkd.export.runtime import OvRunner

        if importlib.util.find_spec("openvino") is None:
            raise Unavailable(f"{spec.path}: running ONNX with OpenVINO needs the openvino package (pip install "
                              f"'gkd[openvino]'); it is not installed here")
        if device == "cuda":
            raise Unavailable(f"{spec.path}: gkd runs OpenVINO on the CPU only; --device cuda asked for")
        return OvRunner(spec.path, threads=threads).__enter__(), ""
    if spec.kind == "onnx":
        key = provider or ("cuda" if device == "cuda" else "cpu")
        asked = ORT_PROVIDERS[key]
        runner = OrtRunner(spec.path, providers=asked, threads=threads).__enter__()
        note = ""
        if runner.provider != asked[0]:
            note = (f"{spec.path.name}: asked onnxruntime for {asked[0]}, it runs on {runner.provider} "
                    f"({asked[0]} is not usable here)")
        if runner.precision == "fp16" and runner.provider == "CPUExecutionProvider":
            note = (note + "; " if note else "") + (
                f"{spec.path.name}: FP16 on onnxruntime's CPU provider runs through casts to FP32 (no FP16 kernels "
                f"on x86): its time is not an FP16 time")
        return runner, note
    if spec.kind == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Unavailable(f"{spec.path}: running a TensorRT engine needs the tensorrt Python package (pip "
                              f"install 'gkd[trt]' on a machine with an NVIDIA GPU); it is not installed here") from None
        if not torch.cuda.is_available():
            raise Unavailable(f"{spec.path}: running a TensorRT engine needs a CUDA GPU; torch sees none")
        return TrtRunner(spec.path).__enter__(), ""
    raise GkdError(f"{spec.path}: unknown model kind {spec.kind!r}")


def runner_label(spec: ModelSpec, runner: Any) -> str:
    """``pytorch-fp32``, ``onnxruntime-int8``, ``onnxruntime-static-int8`` (a file of the static, TensorRT-ready
    graph), ``openvino-fp32``, ``tensorrt-fp16``: the runtime and the precision read back."""
    runtime = getattr(runner, "name", None) or {"pytorch": "pytorch", "onnx": "onnxruntime",
                                                 "tensorrt": "tensorrt"}[spec.kind]
    graph = "static-" if getattr(runner, "graph", "") == "static" else ""  # the TensorRT-ready graph's files
    return f"{runtime}-{graph}{getattr(runner, 'precision', 'unknown')}"
