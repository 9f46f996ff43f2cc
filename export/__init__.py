"""gkd export side: ONNX (FP32/FP16/INT8), TensorRT engines, runners and parity checks.

Imports ``kd``, never ``bench``. Submodules import onnx / onnxruntime / tensorrt inside their functions, so
``import export`` stays light. Entry point: ``gkd export`` (:mod:`export.cli`); library: :func:`export.pipeline.
export_checkpoint`. See docs/export.md.
"""

__all__: list[str] = []
