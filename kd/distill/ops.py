"""The one import point of the prototype-projection operator for the distillation code.

``prototype_project(features [B, C, H, W], boxes [N, 5], stride, prototypes [M, C]) -> (pooled [N, C], cos [N, M])``
is the project's operator (``gkd.kd.prototype``: C++/CUDA kernels when ``gkd.kd._C`` is built, else its vectorised
PyTorch fallback). It pools each box (batch index, x1, y1, x2, y2 in image pixels) as the mean of its cells on one
level (docs/method.md, section 2.1, clipped to the map, never empty) and returns the cosine similarity of every pooled
vector to every prototype. Everything in ``gkd.kd.distill`` calls it through here, so swapping the implementation is
a one-line change.
"""
from __future__ import annotations

import torch

from ..prototype import prototype_project as _prototype_project

__all__ = ["prototype_project"]


def prototype_project(features: torch.Tensor, boxes: torch.Tensor, stride: float,
                      prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every box from one level and take its cosine similarity to every prototype.

    Args:
        features: ``[B, C, H, W]`` one FPN level.
        boxes: ``[N, 5]`` (batch index, x1, y1, x2, y2) in image pixels.
        stride: image pixels per cell of this level.
        prototypes: ``[M, C]``.

    Returns:
        ``(pooled [N, C], cos [N, M])``, differentiable w.r.t. ``features``.
    """
    # The operator takes float32/float64 boxes and prototypes of the features' dtype (AMP gives float16 maps).
    boxes = boxes.to(torch.float64 if features.dtype == torch.float64 else torch.float32)
    return _prototype_project(features, boxes, float(stride), prototypes.to(features.dtype))
