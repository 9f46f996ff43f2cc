"""gkd export side: ONNX (FP32/FP16/INT8), TensorRT engines, runners and parity checks. Imports ``kd``, never ``bench``."""

__all__: list[str] = []
