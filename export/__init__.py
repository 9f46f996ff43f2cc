"""gkd export side: ONNX (FP32/FP16/INT8), TensorRT engines, runners and parity checks.

Imports ``gkd.kd``, never ``gkd.bench``. Submodules import onnx / onnxruntime / tensorrt inside their functions, so
``import gkd.export`` stays light. Entry point: ``gkd export`` (:mod:`gkd.export.cli`); library: :func:`gkd.export.pipeline.
export_checkpoint`. See docs/export.md.
"""

__all__: list[str] = []
