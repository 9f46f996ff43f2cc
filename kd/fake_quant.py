"""Fake INT8 quantization for training (quantization-aware training and distillation) that is the INT8 file's
arithmetic, so that the file gkd exports from the trained scales computes what the student was trained to compute.

What is quantized, and how (the INT8 formats of :mod:`gkd.export.quantize`, restricted to what training can model):

* **Where**: the input activation and the weights of every ``Conv2d`` and ``Linear`` of the detector except the head
  outputs (:func:`head_output_layers`: class logits and box deltas stay float, as in the exported files). Only the
  weighted layer reads the quantized activation: the exported file routes every other reader of that tensor (the
  residual ``Add``, the FPN's ``Resize``, ``RoiAlign``) to the float tensor, as the PyTorch model does.
* **Activations**: per tensor, one learned scale per *tensor* (layers that read the same tensor share it, as the file
  quantizes a tensor once; a layer applied to several tensors, e.g. the RPN head over the FPN levels, has one per
  call). ``tensorrt``: int8, zero point 0, range [-128, 127]; ``onnxruntime``: uint8 with a fixed zero point.
  ``y = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` with a straight-through rounding, so ``s`` learns by
  gradient (LSQ, Esser et al. 2020, with its gradient scale ``1 / sqrt(numel * qmax)``).
* **Weights**: per output channel, symmetric int8 in [-127, 127], scale ``max|w_c| / 127`` from the current weights
  (what onnxruntime's quantizer computes from the exported weights). A BatchNorm folded into the convolution at export
  multiplies channel ``c`` by a constant; per-channel symmetric max-abs quantization is equivariant to that
  (``q(a w) = a q(w)``), so quantizing the unfolded weight here equals quantizing the folded weight in the file.
  BatchNorm statistics are frozen while a quantized student trains (:func:`freeze_batchnorm`): the fold the export
  makes is the one the student trained with.
* **Initial scales** are those post-training quantization computes (MinMax over calibration images of the training
  split), so training starts from the PTQ model and only improves on it.

Shapes: activations are whatever the layer reads (``[N, C, H, W]`` for convolutions, ``[N, F]`` for linear layers);
weights ``[C_out, ...]``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gkd.core.errors import GkdError

__all__ = ["QFORMATS", "QFormat", "FakeQuantState", "install_fake_quant", "calibrate_fake_quant",
           "fake_quant_state", "head_output_layers", "quantized_layers", "freeze_batchnorm", "fake_quant_disabled",
           "weight_fake_quant", "activation_fake_quant", "resolve_onnx_layer"]

STATE_NAME = "gkd_fake_quant"  # the detector's submodule holding the learned scales (saved with its weights)


@dataclass(frozen=True)
class QFormat:
    """An activation format: the integer range and whether the zero point is fixed at 0."""
    name: str
    qmin: int
    qmax: int
    symmetric: bool


#: the INT8 formats of the export (gkd.export.quantize.INT8_FORMATS), as activation arithmetic
QFORMATS = {"tensorrt": QFormat("tensorrt", -128, 127, True), "onnxruntime": QFormat("onnxruntime", 0, 255, False)}
WEIGHT_QMAX = 127  # symmetric int8 weights in [-127, 127]

#: the last layer of each head (class logits, box deltas): kept float, as the exported INT8 files keep them
_HEAD_OUTPUTS = {"faster_rcnn": ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                                 "roi_heads.box_predictor.bbox_pred"),
                 "retinanet": ("head.classification_head.cls_logits", "head.regression_head.bbox_reg")}


def head_output_layers(detector: nn.Module) -> tuple[str, ...]:
    """Names of the detector's head-output layers (kept float)."""
    arch = "retinanet" if hasattr(detector, "head") and not hasattr(detector, "rpn") else "faster_rcnn"
    return _HEAD_OUTPUTS[arch]


def quantized_layers(detector: nn.Module) -> list[str]:
    """Names of the ``Conv2d`` / ``Linear`` layers that INT8 quantizes, in module order."""
    heads = set(head_output_layers(detector))
    return [n for n, m in detector.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in heads and not n.startswith(STATE_NAME)]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ONNX QuantizeLinear) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def _grad_scaled(s: torch.Tensor, g: float) -> torch.Tensor:
    """``s`` in the forward pass, its gradient times ``g`` in the backward pass."""
    return (s - s * g).detach() + s * g


def activation_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: QFormat
                          ) -> torch.Tensor:
    """Per-tensor fake quantization of ``x`` (any shape) with a learnable scalar ``scale`` (LSQ gradient)."""
    g = 1.0 / math.sqrt(max(x.numel(), 1) * fmt.qmax)
    s = _grad_scaled(scale, g).clamp_min(1e-12)
    q = torch.clamp(_round_ste(x / s) + zero_point, fmt.qmin, fmt.qmax)
    return (q - zero_point) * s


def weight_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantization of ``w [C_out, ...]`` (scale ``max|w_c| / 127``, held
    constant in the backward pass)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    s = (amax / WEIGHT_QMAX).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(_round_ste(w / s), -WEIGHT_QMAX, WEIGHT_QMAX) * s


class FakeQuantState(nn.Module):
    """The learned activation scales of a detector and which layer call reads which one.

    ``points[i]`` lists the ``(layer name, call index)`` pairs that read tensor ``i``; ``scale[i]`` and
    ``zero_point[i]`` are its quantization parameters. Saved with the detector's weights (``gkd_fake_quant.*``); the
    layout (format and points) is saved in the checkpoint beside them (:meth:`layout`).
    """

    def __init__(self, fmt: str, points: Sequence[Sequence[tuple[str, int]]]):
        super().__init__()
        if fmt not in QFORMATS:
            raise GkdError(f"quantization format '{fmt}' is unknown; expected one of {', '.join(QFORMATS)}")
        self.fmt = QFORMATS[fmt]
        self.points = [[(str(n), int(c)) for n, c in group] for group in points]
        self.scale = nn.Parameter(torch.ones(len(self.points)))
        self.register_buffer("zero_point", torch.zeros(len(self.points)))
        self.index = {p: i for i, group in enumerate(self.points) for p in group}
        self.enabled = True
        self.calls: dict[str, int] = {}

    def layout(self) -> dict[str, Any]:
        """What rebuilds this state before its tensors are loaded (stored in checkpoints)."""
        return {"format": self.fmt.name, "points": [[list(p) for p in group] for group in self.points]}

    def quantize_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        i = self.index.get((name, call))
        if i is None:
            raise GkdError(f"fake quantization: layer {name} ran {call + 1} time(s) in one forward pass, but was "
                           f"calibrated for {call}; the detector's structure changed since calibration")
        return activation_fake_quant(x, self.scale[i], self.zero_point[i], self.fmt)


class _FakeQuantConv2d(nn.Conv2d):
    """A ``Conv2d`` whose input and weights are fake-quantized while its state is enabled (same parameters and
    state-dict keys as ``nn.Conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._gkd_fq_state
        if not st.enabled:
            return super().forward(x)
        return self._conv_forward(st.quantize_input(self._gkd_fq_name, x), weight_fake_quant(self.weight), self.bias)


class _FakeQuantLinear(nn.Linear):
    """A ``Linear`` whose input and weights are fake-quantized while its state is enabled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._gkd_fq_state
        if not st.enabled:
            return super().forward(x)
        return F.linear(st.quantize_input(self._gkd_fq_name, x), weight_fake_quant(self.weight), self.bias)


_SWAP = {nn.Conv2d: _FakeQuantConv2d, nn.Linear: _FakeQuantLinear}


#: the modules a forward pass enters through (a distillation task runs the backbone alone): each entry restarts the
#: call count, so that the k-th call of a layer applied per level (the RPN head's convolution) is call k
_ENTRIES = ("", "backbone", "rpn.head", "head", "roi_heads")


class _RestartCalls:
    """A forward pre-hook that restarts the call count of a :class:`FakeQuantState` (an object, not a closure, so
    that a deep copy of the detector hooks its own state)."""

    def __init__(self, state: "FakeQuantState"):
        self.state = state

    def __call__(self, module: nn.Module, args) -> None:
        self.state.calls = {}


def fake_quant_state(detector: nn.Module) -> FakeQuantState | None:
    """The detector's :class:`FakeQuantState`, or None for a float detector."""
    state = getattr(detector, STATE_NAME, None)
    return state if isinstance(state, FakeQuantState) else None


def install_fake_quant(detector: nn.Module, layout: dict[str, Any]) -> FakeQuantState:
    """Make ``detector`` a fake-quantized detector with the points of ``layout`` (scales 1 until calibrated or
    loaded). Parameters and state-dict keys of its layers do not change; the scales are ``gkd_fake_quant.*``."""
    if fake_quant_state(detector) is not None:
        raise GkdError("the detector is already fake-quantized")
    state = FakeQuantState(layout["format"], layout["points"])
    modules = dict(detector.named_modules())
    for name in sorted({n for group in state.points for n, _ in group}):
        m = modules.get(name)
        if m is None or type(m) not in _SWAP:
            raise GkdError(f"fake quantization: layer '{name}' is not a Conv2d/Linear of this detector")
        m.__class__ = _SWAP[type(m)]
        object.__setattr__(m, "_gkd_fq_state", state)  # a reference, not a submodule: saved once, under STATE_NAME
        object.__setattr__(m, "_gkd_fq_name", name)
    detector.add_module(STATE_NAME, state)
    for entry in _ENTRIES:
        if entry in modules:
            modules[entry].register_forward_pre_hook(_RestartCalls(state))
    return state


class fake_quant_disabled:
    """``with fake_quant_disabled(detector):`` runs the float network (a float detector: no effect)."""

    def __init__(self, detector: nn.Module):
        self.state = fake_quant_state(detector)

    def __enter__(self):
        if self.state is not None:
            self.prev, self.state.enabled = self.state.enabled, False
        return self

    def __exit__(self, *exc):
        if self.state is not None:
            self.state.enabled = self.prev


@torch.no_grad()
def calibrate_fake_quant(detector: nn.Module, images: Iterable[torch.Tensor], fmt: str) -> FakeQuantState:
    """Find the quantization points of ``detector`` and install them with post-training (MinMax) scales.

    Runs the float detector (eval mode) on ``images`` (``[3, H, W]`` in [0, 1], from the training split), records
    the range of every quantized layer's input per call, and groups calls that read the same tensor.

    Returns:
        The installed :class:`FakeQuantState`, its scales and zero points those of onnxruntime's MinMax calibration
        (symmetric: ``max|x| / 127``; asymmetric: ``(max(x, 0) - min(x, 0)) / 255`` with a rounded zero point).
    """
    if fmt not in QFORMATS:
        raise GkdError(f"quantization format '{fmt}' is unknown; expected one of {', '.join(QFORMATS)}")
    images = list(images)
    if not images:
        raise GkdError("fake quantization needs calibration images")
    names = quantized_layers(detector)
    modules = dict(detector.named_modules())
    ranges: dict[tuple[str, int], list[float]] = {}
    groups: dict[tuple[str, int], tuple[str, int]] = {}  # point -> the first point that read the same tensor
    calls: dict[str, int] = {}
    seen: dict[int, tuple[str, int]] = {}
    alive: list[torch.Tensor] = []  # keeps this pass's tensors alive so that id() identifies them

    def hook(name):
        def pre(module, args):
            x = args[0]
            call = calls.get(name, 0)
            calls[name] = call + 1
            point = (name, call)
            lo, hi = float(x.min()), float(x.max())
            r = ranges.setdefault(point, [math.inf, -math.inf])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
            first = seen.setdefault(id(x), point)
            alive.append(x)
            prev = groups.setdefault(point, first)
            if prev != first:
                raise GkdError(f"fake quantization: layer {name} call {call} shares its input with different layers "
                               f"on different images; cannot quantize it as one tensor")
        return pre

    def restart(module, args):
        calls.clear()

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    handles += [modules[e].register_forward_pre_hook(restart) for e in _ENTRIES if e in modules]
    was_training = detector.training
    detector.eval()
    try:
        for image in images:
            seen.clear()
            alive.clear()
            detector([image])
    finally:
        for h in handles:
            h.remove()
        detector.train(was_training)
    order = list(dict.fromkeys(groups.values()))
    members = {first: [p for p, f in groups.items() if f == first] for first in order}
    state = install_fake_quant(detector, {"format": fmt, "points": [members[f] for f in order]})
    q = QFORMATS[fmt]
    for i, first in enumerate(order):
        lo = min(ranges[p][0] for p in members[first])
        hi = max(ranges[p][1] for p in members[first])
        scale, zp = _minmax_params(lo, hi, q)
        state.scale.data[i] = scale
        state.zero_point[i] = zp
    return state


def _minmax_params(lo: float, hi: float, q: QFormat) -> tuple[float, float]:
    """onnxruntime's MinMax scale and zero point for the range ``[lo, hi]`` (``compute_scale_zp``)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if q.symmetric:
        amax = max(abs(lo), abs(hi))
        return (amax / 127.0 if amax > 0 else 1.0), 0.0
    if hi == lo:
        return 1.0, 0.0
    scale = (hi - lo) / (q.qmax - q.qmin)
    return scale, float(min(max(round(q.qmin - lo / scale), q.qmin), q.qmax))


_FROZEN: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass of the BatchNorm class ``cls`` whose ``train()`` keeps it in eval mode."""
    if cls not in _FROZEN:
        def train(self, mode: bool = True):
            return super(_FROZEN[cls], self).train(False)

        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (cls,), {"train": train, "__module__": __name__})
    return _FROZEN[cls]


def freeze_batchnorm(detector: nn.Module) -> int:
    """Keep every BatchNorm of ``detector`` in eval mode (running statistics frozen, affine parameters still train),
    also when ``detector.train()`` is called. Returns how many were frozen."""
    n = 0
    for m in detector.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in _FROZEN.values():
            m.__class__ = _frozen_class(type(m))
            m.eval()
            n += 1
    return n


_CALL = re.compile(r"^(.*)_(\d+)$")


def resolve_onnx_layer(node_name: str, detector: nn.Module) -> tuple[str, int]:
    """``(layer name, call index)`` of the detector layer an exported ONNX node was traced from.

    The TorchScript exporter names a node by its module scopes, e.g. ``/model/backbone/body/layer1/layer1.0/conv1/
    Conv`` (a list's element is named by its qualified name: ``layer1.0``) and the ``k``-th further call of a module
    gets the suffix ``_k`` (``/head/conv/conv.0/conv.0.0_3/Conv``). The scope path is matched against the end of
    the detector's layer names; exactly one must match.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    call = 0
    if parts:
        m = _CALL.match(parts[-1])
        names = {n for n, _ in detector.named_modules()}
        if m and not any(n.endswith(parts[-1]) for n in names):
            parts[-1], call = m.group(1), int(m.group(2))
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    dotted = ".".join(path)
    layers = quantized_layers(detector) + list(head_output_layers(detector))
    hits = [n for n in layers if n == dotted or dotted.endswith("." + n) or n.endswith("." + dotted)]
    if len(hits) != 1:
        raise GkdError(f"ONNX node {node_name}: {'no' if not hits else len(hits)} layer(s) of the detector match "
                       f"'{dotted}'{': ' + ', '.join(hits) if hits else ''}")
    return hits[0], call
