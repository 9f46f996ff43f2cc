"""Runners: one interface for PyTorch eager, onnxruntime, OpenVINO and TensorRT.

Files of the static (TensorRT-ready) graph (:mod:`gkd.export.static_graph`) run through the same runners: their
fixed-size outputs are cut at ``num_detections`` into the same three tensors.

A runner is a context manager with ``infer(feed) -> outputs``, done in three steps that benchmarks time apart:
``prepare`` (the input onto the runtime's device: host-to-device on a GPU), ``compute`` (the runtime call, synchronised)
and ``finish`` (the outputs back to CPU torch tensors: device-to-host on a GPU). ``feed`` is ``{"image": [1, 3, H, W] float32 in
[0, 1]}`` and the outputs are ``{"boxes": [N, 4], "scores": [N], "labels": [N]}`` torch tensors on the CPU. All
runners get the same input and return the same outputs: resize, normalisation, padding, NMS and the mapping back to
input pixels happen inside the model (see :mod:`gkd.export.adapters`), so no runner does any pre- or post-processing of
its own. ``provider`` names what actually executed the model (for onnxruntime read back from the InferenceSession:
asking for CUDA silently falls back to the CPU when CUDA is unusable).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from gkd.core.errors import GkdError

from ._lazy import lazy_import
from .adapters import INPUT_NAME, OUTPUT_NAMES, ExportWrapper
from .static_graph import STATIC_OUTPUT_NAMES, to_detections

#: what a runner reads from the static (TensorRT-ready) graph: its detections, not the NMS flag
STATIC_OUTPUTS = STATIC_OUTPUT_NAMES[:4]

__all__ = ["Runner", "TorchRunner", "OrtRunner", "OvRunner", "TrtRunner"]


def _graph_outputs(names) -> tuple[str, list[str]]:
    """Which graph a model with outputs ``names`` is (``static``: the TensorRT-ready one, else ``torchvision``) and
    the outputs a runner reads from it to make its detections."""
    if "num_detections" in names:
        return "static", list(STATIC_OUTPUTS)
    return "torchvision", list(OUTPUT_NAMES)


class Runner:
    """Base class. Subclasses set ``name``, ``precision`` and ``provider`` and implement ``prepare``, ``compute`` and ``finish``."""

    name = "runner"
    precision = "fp32"
    provider = "unknown"

    def activate(self) -> None:
        """Load the model / create the runtime's session or engine (called by ``__enter__``)."""

    def deactivate(self) -> None:
        """Release it (called by ``__exit__``)."""

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one image.

        Args:
            feed: ``{"image": [1, 3, H, W] float32 in [0, 1]}``.

        Returns:
            ``{"boxes": [N, 4] float32, "scores": [N] float32, "labels": [N] int64}`` on the CPU.
        """
        image = feed.get(INPUT_NAME)
        if image is None or image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            shape = None if image is None else list(image.shape)
            raise GkdError(f"{self.name}: feed['{INPUT_NAME}'] must be [1, 3, H, W] (batch fixed at 1), got {shape}")
        return self.finish(self.compute(self.prepare(image.float().contiguous())))

    def prepare(self, image: torch.Tensor):
        """``[1, 3, H, W]`` float32 CPU tensor -> the runtime's input (on its device)."""
        raise NotImplementedError

    def compute(self, prepared):
        """Run the model on a prepared input; returns when the result is ready (synchronised)."""
        raise NotImplementedError

    def finish(self, raw) -> dict[str, torch.Tensor]:
        """The runtime's result -> ``{"boxes", "scores", "labels"}`` CPU tensors."""
        raise NotImplementedError

    def detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Convenience: ``image [3, H, W]`` -> outputs (see :meth:`infer`)."""
        return self.infer({INPUT_NAME: image.unsqueeze(0)})

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "precision": self.precision, "provider": self.provider}


class TorchRunner(Runner):
    """PyTorch eager (the reference).

    Args:
        detector: a torchvision FasterRCNN / RetinaNet.
        device: where to run it.
    """

    def __init__(self, detector: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.wrapper = ExportWrapper(detector).to(self.device)
        self.name = "pytorch"
        self.provider = f"torch-{self.device.type}"

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return x

    @torch.no_grad()
    def compute(self, x: torch.Tensor):
        out = self.wrapper(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def finish(self, raw) -> dict[str, torch.Tensor]:
        boxes, scores, labels = raw
        return {"boxes": boxes.cpu(), "scores": scores.cpu(), "labels": labels.cpu()}


class OrtRunner(Runner):
    """onnxruntime.

    Args:
        path: the ONNX file.
        providers: execution providers to ask for, best first (default: CPU only).
        threads: intra-op threads (0 = onnxruntime's default: all cores).
        precision: label for reports (read from the file's metadata when None).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1,
                 precision: str | None = None):
        self.path = Path(path)
        self.requested = list(providers)
        self.threads = int(threads)
        self.session = None
        self.precision = precision or "unknown"
        self.name = "onnxruntime"

    def activate(self) -> None:
        ort = lazy_import("onnxruntime", "running ONNX models")
        if not self.path.is_file():
            raise GkdError(f"{self.path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # provider fallbacks are reported through `provider`, not console noise
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.requested)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GkdError(f"{self.path}: onnxruntime cannot load this model: {msg[:300]}") from None
        # what runs is what the InferenceSession reports, never what was asked for
        self.provider = self.session.get_providers()[0]
        self.graph, self._output_names = _graph_outputs({o.name for o in self.session.get_outputs()})
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME]:
            raise GkdError(f"{self.path}: inputs are {names}; expected exactly ['{INPUT_NAME}'] (a gkd export)")
        meta = self.session.get_modelmeta().custom_metadata_map.get("gkd.metadata")
        if meta and self.precision == "unknown":
            import json

            self.precision = json.loads(meta).get("precision", "unknown")

    def deactivate(self) -> None:
        self.session = None

    def prepare(self, image: torch.Tensor):
        if self.session is None:
            self.activate()
        return image.cpu().numpy()

    def compute(self, arr):
        """``session.run`` on a NumPy input (with a CUDA provider this includes onnxruntime's own copies)."""
        try:
            return self.session.run(self._output_names, {INPUT_NAME: arr})
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GkdError(f"{self.path}: onnxruntime failed on a {list(arr.shape)} input: {msg[:300]}") from None

    def finish(self, outs) -> dict[str, torch.Tensor]:
        if self.graph == "static":
            return to_detections(outs)
        boxes, scores, labels = (torch.from_numpy(o.copy()) for o in outs)
        return {"boxes": boxes.float(), "scores": scores.float(), "labels": labels.long()}


class OvRunner(Runner):
    """OpenVINO's CPU plugin on an ONNX file (read directly, no conversion step).

    FP32 files run at FP32: the CPU plugin's default on CPUs with bfloat16 or FP16 units (AMX, AVX-512 BF16) is to
    compute in those, which would make an "FP32" result something else, so ``INFERENCE_PRECISION_HINT`` is set to
    ``f32`` always. INT8 Q/DQ files run through OpenVINO's low-precision transformations (INT8 kernels where the
    CPU has them); FP16 files are computed in FP32 by the CPU plugin, as by onnxruntime's CPU provider.

    Known hazard (OpenVINO 2026.4 with torch 2.14 on Linux): a long-lived process that has loaded OpenVINO and then
    goes on with PyTorch work (training, many other tests) was seen to die of a segmentation fault minutes later,
    while waiting on a subprocess. One gkd command per process is unaffected; the tests and long-lived Python
    programs run OpenVINO in a child process.

    Args:
        path: the ONNX file.
        threads: ``INFERENCE_NUM_THREADS`` (0 = OpenVINO's default: all cores).
        precision: label for reports (read from the file's metadata when None).
    """

    def __init__(self, path: str | Path, threads: int = 1, precision: str | None = None):
        self.path = Path(path)
        self.threads = int(threads)
        self.precision = precision or "unknown"
        self.name = "openvino"
        self.compiled = None

    def activate(self) -> None:
        ov = lazy_import("openvino", "running ONNX models with OpenVINO (pip install openvino)")
        if not self.path.is_file():
            raise GkdError(f"{self.path}: ONNX file not found")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads > 0:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GkdError(f"{self.path}: OpenVINO cannot load this model: {msg[:300]}") from None
        names = [i.get_any_name() for i in self.compiled.inputs]
        if names != [INPUT_NAME]:
            raise GkdError(f"{self.path}: inputs are {names}; expected exactly ['{INPUT_NAME}'] (a gkd export)")
        self._outputs = {o.get_any_name(): o for o in self.compiled.outputs}
        self.graph, self._names = _graph_outputs(self._outputs)
        missing = [n for n in self._names if n not in self._outputs]
        if missing:
            raise GkdError(f"{self.path}: outputs {sorted(self._outputs)} lack {missing} (a gkd export has "
                           f"{self._names})")
        self._request = self.compiled.create_infer_request()
        self.provider = f"OpenVINO {ov.__version__.split('-')[0]} CPU"
        if self.precision == "unknown":  # OpenVINO does not carry ONNX metadata_props: read them from the file
            from .onnx import read_metadata

            self.precision = read_metadata(self.path).get("precision", "unknown")

    def deactivate(self) -> None:
        self.compiled = self._request = None

    def prepare(self, image: torch.Tensor):
        if self.compiled is None:
            self.activate()
        return image.cpu().numpy()

    def compute(self, arr):
        try:
            self._request.infer({INPUT_NAME: arr})
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GkdError(f"{self.path}: OpenVINO failed on a {list(arr.shape)} input: {msg[:300]}") from None
        return [self._request.get_tensor(self._outputs[n]).data.copy() for n in self._names]

    def finish(self, outs) -> dict[str, torch.Tensor]:
        if self.graph == "static":
            return to_detections(outs)
        boxes, scores, labels = (torch.from_numpy(o) for o in outs)
        return {"boxes": boxes.float().reshape(-1, 4), "scores": scores.float().reshape(-1),
                "labels": labels.long().reshape(-1)}


class TrtRunner(Runner):
    """TensorRT engine on torch CUDA buffers, on ``torch.cuda.current_stream()``.

    The engine's stamp (sidecar JSON) must match this machine (TensorRT version, GPU, compute capability) and the
    engine file: see :func:`gkd.export.trt.check_stamp`. Output sizes depend on the data (number of detections), so the
    outputs are allocated through an output allocator once the engine knows them.

    Args:
        engine_path: the ``.engine`` file (its stamp is ``<engine>.json``).
        device: CUDA device index.
    """

    def __init__(self, engine_path: str | Path, device: int = 0):
        self.path = Path(engine_path)
        self.device = torch.device("cuda", device)
        self.name = "tensorrt"
        self.engine = self.context = None

    def activate(self) -> None:
        from .trt import check_stamp, current_machine, load_stamp

        trt = lazy_import("tensorrt", "running TensorRT engines")
        if not torch.cuda.is_available():
            raise GkdError(f"{self.path}: running a TensorRT engine needs a CUDA GPU; torch sees none")
        stamp = load_stamp(self.path)
        check_stamp(stamp, current_machine(trt, self.device.index or 0), self.path)
        self.precision = stamp.get("precision_built", "unknown")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise GkdError(f"{self.path}: TensorRT could not deserialize the engine (corrupt or built elsewhere)")
        self.context = self.engine.create_execution_context()
        self.provider = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)}"
        self._allocator = _make_output_allocator(trt, self.device)
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        self.graph, _ = _graph_outputs(io)  # gkd export builds engines from the static graph
        # every output gets an allocator, the static graph's NMS flag included
        self._names = list(STATIC_OUTPUT_NAMES if self.graph == "static" else OUTPUT_NAMES)
        for name in self._names:
            self.context.set_output_allocator(name, self._allocator)

    def deactivate(self) -> None:
        self.context = self.engine = None

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            self.activate()
        x = image.to(self.device).contiguous()
        torch.cuda.synchronize(self.device)
        return x

    def compute(self, x: torch.Tensor) -> None:
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GkdError(f"{self.path}: TensorRT execution failed for input shape {list(x.shape)}")
        stream.synchronize()

    def finish(self, raw=None) -> dict[str, torch.Tensor]:
        out = {}
        for name in self._names:
            buf, shape = self._allocator.buffers[name], self._allocator.shapes[name]
            out[name] = buf[: int(torch.tensor(shape).prod())].view(*shape).cpu() if shape else buf[:0].cpu()
        if self.graph == "static":
            return to_detections([out[n] for n in STATIC_OUTPUTS])
        return {"boxes": out["boxes"].float().reshape(-1, 4), "scores": out["scores"].float(),
                "labels": out["labels"].long()}


def _make_output_allocator(trt, device: torch.device):
    """An ``IOutputAllocator`` backed by torch tensors (grown on demand, reused across calls)."""
    dtypes = {"boxes": torch.float32, "scores": torch.float32, "labels": torch.int64, "num_detections": torch.int32,
              "detection_boxes": torch.float32, "detection_scores": torch.float32, "detection_classes": torch.int32,
              "nms_converged": torch.bool}

    class _TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            super().__init__()
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream=None):
            dtype = dtypes.get(tensor_name, torch.float32)
            itemsize = torch.empty((), dtype=dtype).element_size()
            n = max(1, (int(size) + itemsize - 1) // itemsize)
            buf = self.buffers.get(tensor_name)
            if buf is None or buf.numel() < n:
                buf = torch.empty(n, dtype=dtype, device=device)
                self.buffers[tensor_name] = buf
            return buf.data_ptr()

        def reallocate_output(self, tensor_name, memory, size, alignment):  # TensorRT < 10 name
            return self.reallocate_output_async(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return _TorchOutputAllocator()
