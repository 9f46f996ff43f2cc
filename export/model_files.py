"""Model files a user may run, each opened as a runner: PyTorch checkpoints, ONNX files (any precision) and TensorRT
engines. ``gkd eval``, ``gkd bench latency`` and ``gkd predict`` all open their models here.

The kind comes from the file name (``.pt``/``.pth``, ``.onnx``, ``.engine``/``.plan``/``.trt``) and is checked
against the content's first bytes (a checkpoint is a zip, an engine is not a protobuf...), so a renamed file is
refused in one line instead of failing deep inside a loader. What a runner reports (provider, precision) is read
back from the runtime or the file, never the request: asking onnxruntime for CUDA on a machine without it runs on
the CPU, and the note returned with the runner says so.
"""
from __future__ import annotations

from pathlib import Path

from gkd.core.errors import GkdError

__all__ = ["KINDS", "ORT_PROVIDERS", "Unavailable", "model_kind", "open_model"]

KINDS = {".pt": "pytorch", ".pth": "pytorch", ".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt",
         ".trt": "tensorrt"}

#: ``--provider`` -> onnxruntime providers to ask for, best first
ORT_PROVIDERS = {"cpu": ("CPUExecutionProvider",),
                 "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                 "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}


class Unavailable(GkdError):
    """The runtime or device a model needs is missing here (reported, and the model skipped, by the benchmarks)."""


def model_kind(path: str | Path) -> str:
    """``"pytorch"``, ``"onnx"`` or ``"tensorrt"`` for ``path``; a one-line GkdError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise GkdError(f"{path}: model file not found")
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise GkdError(f"{path}: unknown model kind (suffix {path.suffix or 'none'!r}); expected a checkpoint "
                       f"(.pt, .pth), an ONNX file (.onnx) or a TensorRT engine (.engine, .plan, .trt)")
    with open(path, "rb") as fh:  # the first bytes only: checkpoints and engines are tens of MB
        head = fh.read(4)
    is_zip = head[:2] == b"PK"
    if kind == "pytorch" and not is_zip:
        raise GkdError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)")
    if kind in ("onnx", "tensorrt") and (is_zip or not head):
        raise GkdError(f"{path}: {'empty file' if not head else 'a zip archive (a PyTorch checkpoint?)'}, "
                       f"not {'an ONNX model' if kind == 'onnx' else 'a TensorRT engine'}")
    return kind


def open_model(path: str | Path, kind: str, *, device: str = "cpu", provider: str | None = None, threads: int = 1):
    """An activated runner for the model file ``path`` and a note (what was used instead of what was asked, or "").

    Deactivate the runner (``runner.deactivate()`` or ``runner.__exit__``) when done.

    Args:
        path: the model file.
        kind: :func:`model_kind`'s answer, or ``"openvino"``: an ONNX file run by OpenVINO's CPU plugin.
        device: ``cpu`` or ``cuda`` (PyTorch checkpoints; ONNX picks its provider from it unless ``provider``).
        provider: onnxruntime provider key (:data:`ORT_PROVIDERS`); default: ``cuda`` on ``--device cuda``.
        threads: intra-op threads of onnxruntime's and OpenVINO's session. PyTorch's thread count is not set here:
            ``torch.set_num_threads`` changes the whole process, which belongs to the caller.

    Returns:
        ``(runner, note)``; a checkpoint's runner also carries ``info`` (the checkpoint's classes, category ids...).

    Raises:
        Unavailable: the model's runtime or device is missing (tensorrt not installed, no CUDA GPU).
        GkdError: the file is not a usable model.
    """
    import torch

    from .runtime import OrtRunner, TorchRunner, TrtRunner

    path = Path(path)
    if kind == "pytorch":
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable(f"{path}: --device cuda asked for, but torch sees no CUDA GPU")
        from gkd.kd.checkpoint import load_detector

        model, info = load_detector(path)
        runner = TorchRunner(model, device=device)
        runner.precision = "fp32"
        runner.info = info
        return runner.__enter__(), ""
    if kind in ("onnx", "openvino"):
        from .integrity import check_unchanged_since_export

        check_unchanged_since_export(path)  # a file its export folder no longer vouches for is refused
    if kind == "openvino":
        import importlib.util

        from .runtime import OvRunner

        if importlib.util.find_spec("openvino") is None:
            raise Unavailable(f"{path}: running ONNX with OpenVINO needs the openvino package (pip install "
                              f"'gkd[openvino]'); it is not installed here")
        if device == "cuda":
            raise Unavailable(f"{path}: gkd runs OpenVINO on the CPU only; --device cuda asked for")
        return OvRunner(path, threads=threads).__enter__(), ""
    if kind == "onnx":
        key = provider or ("cuda" if device == "cuda" else "cpu")
        asked = ORT_PROVIDERS[key]
        runner = OrtRunner(path, providers=asked, threads=threads).__enter__()
        note = ""
        if runner.provider != asked[0]:
            note = (f"{path.name}: asked onnxruntime for {asked[0]}, it runs on {runner.provider} "
                    f"({asked[0]} is not usable here)")
        if runner.precision == "fp16" and runner.provider == "CPUExecutionProvider":
            note = (note + "; " if note else "") + (
                f"{path.name}: FP16 on onnxruntime's CPU provider runs through casts to FP32 (no FP16 kernels "
                f"on x86): its time is not an FP16 time")
        return runner, note
    if kind == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Unavailable(f"{path}: running a TensorRT engine needs the tensorrt Python package (pip install "
                              f"'gkd[trt]' on a machine with an NVIDIA GPU); it is not installed here") from None
        if not torch.cuda.is_available():
            raise Unavailable(f"{path}: running a TensorRT engine needs a CUDA GPU; torch sees none")
        return TrtRunner(path).__enter__(), ""
    raise GkdError(f"{path}: unknown model kind {kind!r}")
