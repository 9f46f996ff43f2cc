"""The one import point of the prototype-projection operator for the distillation code.

``prototype_project(features [B, C, H, W], boxes [N, 5], stride, prototypes [M, C]) -> (pooled [N, C], cos [N, M])``
pools each box (batch index, x1, y1, x2, y2 in image pixels) from one FPN level as the mean over the cells
``rows [lo, hi)`` and ``columns [lo, hi)`` with ``lo = clamp(floor(v1 / stride), 0, size - 1)`` and
``hi = clamp(floor(v2 / stride) + 1, lo + 1, size)`` (method.md 2.3, boxes clipped to the map, never empty) and
returns the cosine similarity of every pooled vector to every prototype, norms clamped at 1e-8 (an all-zero vector
gives cos 0). Gradients flow to the features (and the prototypes).

The project's operator (``kd.prototype``: C++/CUDA extension with a PyTorch fallback) is used when it is importable;
:func:`_project_torch` below is a small private stand-in with the same semantics, used only where ``kd.prototype``
is missing, and the test oracle for the semantics the distillation code relies on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototype_project", "pool_boxes", "cosine_matrix", "OPERATOR"]

_COS_EPS = 1e-8


def _cell_range(v1: torch.Tensor, v2: torch.Tensor, stride: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi) cells covered by the box side [v1, v2] on an axis of ``size`` cells. Int64 ``[N]`` each."""
    # Double division, clamped before floor so that huge values cannot overflow (same arithmetic as the operator).
    q1 = (v1.double() / stride).clamp(-1.0, float(size)).floor()
    q2 = (v2.double() / stride).clamp(-1.0, float(size)).floor() + 1
    lo = q1.clamp(0, size - 1)
    hi = torch.maximum(q2, lo + 1).clamp(max=size)
    return lo.long(), hi.long()


def pool_boxes(features: torch.Tensor, boxes: torch.Tensor, stride: float) -> torch.Tensor:
    """Mean of each box's cells on one level, through an integral image (O(BCHW + NC), differentiable).

    Args:
        features: ``[B, C, H, W]``.
        boxes: ``[N, 5]`` (batch index, x1, y1, x2, y2) in image pixels.
        stride: image pixels per feature cell.

    Returns:
        ``[N, C]`` pooled features (same dtype as ``features``).
    """
    b, c, h, w = features.shape
    n = boxes.shape[0]
    if n == 0:
        return features.new_zeros((0, c))
    # Integral image in float64 so that large maps keep exact-enough sums; [B, C, H + 1, W + 1].
    integral = F.pad(features.double().cumsum(2).cumsum(3), (1, 0, 1, 0))
    bi = boxes[:, 0].long()
    c0, c1 = _cell_range(boxes[:, 1], boxes[:, 3], stride, w)
    r0, r1 = _cell_range(boxes[:, 2], boxes[:, 4], stride, h)
    flat = integral.permute(0, 2, 3, 1).reshape(b, (h + 1) * (w + 1), c)  # [B, (H+1)(W+1), C]

    def at(r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return flat[bi, r * (w + 1) + col]  # [N, C]

    total = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    area = ((r1 - r0) * (c1 - c0)).to(total.dtype).unsqueeze(1)
    return (total / area).to(features.dtype)


def cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``cos[n, m] = <x_n, y_m> / (max(|x_n|, eps) max(|y_m|, eps))``. ``[N, C] x [M, C] -> [N, M]``."""
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
    yn = y / y.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
    return xn @ yn.t()


def _project_torch(features: torch.Tensor, boxes: torch.Tensor, stride: float,
                   prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = pool_boxes(features, boxes, float(stride))
    return pooled, cosine_matrix(pooled, prototypes.to(pooled.dtype))


def _resolve():
    try:
        from .. import prototype as _op  # the project's operator (issue 3), when it exists
    except ImportError:
        return _project_torch, "torch (kd.distill.ops stand-in)"
    return _op.prototype_project, "kd.prototype"


_impl, OPERATOR = _resolve()


def prototype_project(features: torch.Tensor, boxes: torch.Tensor, stride: float,
                      prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every box from one level and take its cosine similarity to every prototype.

    Args:
        features: ``[B, C, H, W]`` one FPN level.
        boxes: ``[N, 5]`` (batch index, x1, y1, x2, y2) in image pixels, same dtype/device family as features.
        stride: image pixels per cell of this level.
        prototypes: ``[M, C]``.

    Returns:
        ``(pooled [N, C], cos [N, M])``.
    """
    return _impl(features, boxes.to(features.dtype), float(stride), prototypes.to(features.dtype))
