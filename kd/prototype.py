"""Prototype projection: pool each instance's box from a feature level, then its cosine to every prototype.

This is the per-level core of global-knowledge distillation (docs/method.md, sections 2.3 and 2.4 (d)). Three
versions compute the same function:

* ``prototype_project``: the public entry point. It runs the compiled operator ``torch.ops.kd.prototype_project``
  (C++ CPU kernel, CUDA kernel) when ``gkd.kd._C`` is built, else ``prototype_project_vectorized`` (one warning line).
* ``prototype_project_vectorized``: pure PyTorch, no Python loop over instances (integral image + gathers).
* ``prototype_project_reference``: a plain loop over instances written for clarity; the test oracle.

Cell rule, shared by all versions (``kd/csrc/prototype.h::cell_range``): a box side [v1, v2] in pixels covers the
cells lo .. hi-1 with lo = clamp(floor(v1 / stride), 0, size - 1) and hi = clamp(floor(v2 / stride) + 1, lo + 1,
size). This is the method's inclusive crop ``int(v1/s) .. int(v2/s)``, clipped to the map, never empty. Boxes partly
outside the map keep their inside part; a box wholly outside the map (or inverted) collapses to the nearest edge
cell. (The authors' code takes ``|v|`` first, which mirrors negative coordinates into the map; we clip instead.)

Cosine: ``cos[n, m] = <pooled_n, proto_m> / (max(|pooled_n|, eps) * max(|proto_m|, eps))`` with eps = 1e-8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops

__all__ = ["COS_EPS", "prototype_project", "prototype_project_reference", "prototype_project_vectorized"]

COS_EPS = 1e-8
_OP = "kd::prototype_project: "


def prototype_project(features: Tensor, boxes: Tensor, stride: float, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool every box from one feature level and take its cosine similarity to every prototype.

    Differentiable w.r.t. ``features`` and ``prototypes`` (when they require grad); ``boxes`` get no gradient.

    Args:
        features: one feature level, [B, C, H, W], float32 or float64 (float16/bfloat16 too on CUDA).
        boxes: [N, 5] rows (batch_index, x1, y1, x2, y2) in image pixels, float32 or float64.
        stride: image pixels per feature cell of this level (> 0), e.g. 4, 8, ..., 64 for P2..P6.
        prototypes: [M, C] prototype bank of this level; cast to ``features.dtype`` if it differs.

    Returns:
        pooled: [N, C], each box's mean feature over its cells (see the module docstring for the cell rule).
        cos: [N, M], cosine similarity of each pooled feature to each prototype.

    Raises:
        ValueError: malformed input (ranks, channel mismatch, devices, dtypes, non-finite boxes, batch index out of
            range, stride <= 0), with a message naming the argument.
    """
    if prototypes.dtype != features.dtype:
        prototypes = prototypes.to(features.dtype)
    if _ops.has_kernel(features.device.type):
        return torch.ops.kd.prototype_project(features, boxes, float(stride), prototypes)
    if not torch.compiler.is_compiling():
        _ops.warn_fallback_once(features.device.type)
    return prototype_project_vectorized(features, boxes, stride, prototypes)


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch versions
# ----------------------------------------------------------------------------------------------------------------

def _check_inputs(features: Tensor, boxes: Tensor, stride: float, prototypes: Tensor) -> None:
    """The C++ operator's checks, with the same messages, for the pure-PyTorch versions."""
    if features.dim() != 4:
        raise ValueError(f"{_OP}features must be [B, C, H, W], got shape {list(features.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"{_OP}boxes must be [N, 5] = (batch_index, x1, y1, x2, y2), got shape {list(boxes.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"{_OP}prototypes must be [M, C] with C = {features.shape[1]} (the features' channels), "
                         f"got shape {list(prototypes.shape)}")
    if not (features.device == boxes.device == prototypes.device):
        raise ValueError(f"{_OP}features, boxes and prototypes must be on one device, got {features.device}, "
                         f"{boxes.device} and {prototypes.device}")
    if not features.is_floating_point() or prototypes.dtype != features.dtype:
        raise ValueError(f"{_OP}features and prototypes must share a floating dtype, got {features.dtype} and "
                         f"{prototypes.dtype}")
    if boxes.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{_OP}boxes must be float32 or float64, got {boxes.dtype}")
    if not (math.isfinite(stride) and stride > 0):
        raise ValueError(f"{_OP}stride must be a finite number > 0, got {stride}")
    n, (batch, _, height, width) = boxes.shape[0], features.shape
    if n and (height == 0 or width == 0):
        raise ValueError(f"{_OP}features have no cells (shape {list(features.shape)}) but {n} boxes need at least "
                         "one each")
    if n == 0:
        return
    bad = (~torch.isfinite(boxes)).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_OP}boxes[{i}] = {tuple(boxes[i].tolist())} is not finite")
    bidx = boxes[:, 0]
    bad = (bidx < 0) | (bidx >= batch) | (bidx != bidx.floor())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_OP}boxes[{i}] has batch index {float(bidx[i])}; expected an integer in [0, {batch})")


def _cell_range(v1: float, v2: float, stride: float, size: int) -> tuple[int, int]:
    """[lo, hi) cells of the box side [v1, v2]; the same arithmetic as kd/csrc/prototype.h::cell_range."""
    q1 = min(max(v1 / stride, -1.0), float(size))  # clamping first cannot change the result, avoids inf
    q2 = min(max(v2 / stride, -1.0), float(size))
    lo = min(max(math.floor(q1), 0), size - 1)
    hi = min(max(math.floor(q2) + 1, lo + 1), size)
    return lo, hi


def _cosine(pooled: Tensor, prototypes: Tensor) -> Tensor:
    """[N, C], [M, C] -> [N, M] cosine with norms clamped at COS_EPS."""
    fh = pooled / torch.linalg.vector_norm(pooled, dim=1, keepdim=True).clamp_min(COS_EPS)
    ph = prototypes / torch.linalg.vector_norm(prototypes, dim=1, keepdim=True).clamp_min(COS_EPS)
    return fh @ ph.T


def prototype_project_reference(features: Tensor, boxes: Tensor, stride: float,
                                prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-instance loop, written for clarity (the way the authors' code pools): the test oracle.

    Same arguments, returns and errors as ``prototype_project``; differentiable through plain autograd.
    """
    _check_inputs(features, boxes, stride, prototypes)
    _, channels, height, width = features.shape
    rows = []
    for b, x1, y1, x2, y2 in boxes.tolist():
        r0, r1 = _cell_range(y1, y2, stride, height)
        c0, c1 = _cell_range(x1, x2, stride, width)
        rows.append(features[int(b), :, r0:r1, c0:c1].mean(dim=(1, 2)))             # [C]
    pooled = torch.stack(rows) if rows else features.new_zeros((0, channels))
    return pooled, _cosine(pooled, prototypes)


def _cell_ranges(boxes: Tensor, stride: float, height: int, width: int) -> tuple[Tensor, ...]:
    """Vectorised ``_cell_range`` for all boxes: (b, r0, r1, c0, c1), each [N] int64."""
    b64 = boxes.to(torch.float64)
    # A full tensor as divisor: a scalar divisor may be turned into a multiply by its reciprocal, which can round
    # differently from the exact division every other version uses.
    q = b64[:, 1:] / torch.full_like(b64[:, 1:], stride)                           # [N, 4] = x1, y1, x2, y2
    size = torch.tensor([width, height, width, height], dtype=torch.float64, device=boxes.device)
    q = torch.minimum(q.clamp_min(-1.0), size).floor()
    lo = torch.minimum(q[:, :2].clamp_min(0.0), size[:2] - 1)
    hi = torch.minimum(torch.maximum(q[:, 2:] + 1, lo + 1), size[2:])
    lo, hi = lo.long(), hi.long()
    return b64[:, 0].long(), lo[:, 1], hi[:, 1], lo[:, 0], hi[:, 0]


def prototype_project_vectorized(features: Tensor, boxes: Tensor, stride: float,
                                 prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """No Python loop over instances: a zero-padded integral image and four gathers of [N, C] (the fallback).

    The integral image is accumulated in the features' dtype (cumsum accumulates in double internally, but each
    prefix is rounded to the dtype), so float32 results carry an error of about 1e-7 x the plane's partial sums;
    float64 matches the reference to rounding. Same arguments, returns and errors as ``prototype_project``.
    """
    _check_inputs(features, boxes, stride, prototypes)
    _, channels, height, width = features.shape
    if boxes.shape[0] == 0:
        pooled = features.new_zeros((0, channels))
        return pooled, _cosine(pooled, prototypes)
    b, r0, r1, c0, c1 = _cell_ranges(boxes, stride, height, width)
    # Pad first and accumulate in place: one full-size temporary instead of three (about 2x faster forward).
    integral = F.pad(features, (1, 0, 1, 0)).cumsum_(2).cumsum_(3)                  # [B, C, H+1, W+1]
    s = integral.permute(0, 2, 3, 1)                                                # view [B, H+1, W+1, C]
    total = s[b, r1, c1] - s[b, r0, c1] - s[b, r1, c0] + s[b, r0, c0]               # [N, C]
    area = ((r1 - r0) * (c1 - c0)).to(features.dtype)
    pooled = total / area.unsqueeze(1)
    return pooled, _cosine(pooled, prototypes)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registrations for the compiled operator (fake kernels for torch.compile/export, autograd)
# ----------------------------------------------------------------------------------------------------------------

def _prototype_project_fake(features, boxes, stride, prototypes):
    torch._check(features.dim() == 4, lambda: f"{_OP}features must be [B, C, H, W], got {list(features.shape)}")
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 5,
                 lambda: f"{_OP}boxes must be [N, 5], got shape {list(boxes.shape)}")
    torch._check(prototypes.dim() == 2 and prototypes.shape[1] == features.shape[1],
                 lambda: f"{_OP}prototypes must be [M, C] with C = {features.shape[1]}, got "
                         f"{list(prototypes.shape)}")
    n, m = boxes.shape[0], prototypes.shape[0]
    return features.new_empty((n, features.shape[1])), features.new_empty((n, m))


def _prototype_project_backward_fake(grad_pooled, grad_cos, boxes, stride, prototypes, pooled, batch_size, height,
                                     width, features_grad, prototypes_grad):
    grad_features = (pooled.new_empty((batch_size, pooled.shape[1], height, width)) if features_grad
                     else pooled.new_empty((0,)))
    grad_prototypes = prototypes.new_empty(prototypes.shape) if prototypes_grad else prototypes.new_empty((0,))
    return grad_features, grad_prototypes


def _setup_context(ctx, inputs, output):
    features, boxes, stride, prototypes = inputs
    pooled, _ = output
    # Only the small tensors are kept: the backward needs the feature map's size, not its values.
    ctx.save_for_backward(boxes, prototypes, pooled)
    ctx.stride = stride
    ctx.feature_size = (features.shape[0], features.shape[2], features.shape[3])


def _backward(ctx, grad_pooled, grad_cos):
    boxes, prototypes, pooled = ctx.saved_tensors
    features_grad, prototypes_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if grad_pooled is None:
        grad_pooled = torch.zeros_like(pooled)
    if grad_cos is None:
        grad_cos = pooled.new_zeros((pooled.shape[0], prototypes.shape[0]))
    grad_features, grad_prototypes = torch.ops.kd._prototype_project_backward(
        grad_pooled, grad_cos, boxes, ctx.stride, prototypes, pooled, *ctx.feature_size, features_grad,
        prototypes_grad)
    return (grad_features if features_grad else None), None, None, (grad_prototypes if prototypes_grad else None)


def _no_double_backward(ctx, *grads):
    # Without this, PyTorch's fallback would silently return zero second-order gradients.
    raise RuntimeError("kd::prototype_project: double backward (second-order gradients) is not supported")


if _ops.has_ops():
    torch.library.register_fake("kd::prototype_project")(_prototype_project_fake)
    torch.library.register_fake("kd::_prototype_project_backward")(_prototype_project_backward_fake)
    torch.library.register_autograd("kd::prototype_project", _backward, setup_context=_setup_context)
    torch.library.register_autograd("kd::_prototype_project_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
