"""PKD: feature imitation with the Pearson correlation coefficient (Cao et al., "PKD: General Distillation Framework
for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022), as mmrazor's ``PKDLoss``.

Each map is normalised per channel to zero mean and unit variance over (B, H, W); the loss is MSE / 2 between the
normalised maps, which equals (1 - r) with r the Pearson correlation. Student and teacher maps of the same stride
have the same size here; mmrazor's bilinear resize of the student is kept for safety. Applied to the raw student
FPN features (no adapter), as mmrazor does. mmrazor's weights: 6 (Faster R-CNN), 10 (RetinaNet), summed over levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pkd_loss", "channel_standardize"]


def channel_standardize(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[B, C, H, W]`` -> per-channel (over B, H, W) zero mean, unit (unbiased) std, as mmrazor's ``norm``."""
    b, c, h, w = feat.shape
    flat = feat.permute(1, 0, 2, 3).reshape(c, -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(c, b, h, w).permute(1, 0, 2, 3)


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PKD loss of one level (unweighted).

    Args:
        student: ``[B, C, H, W]`` student features; teacher: ``[B, C, H', W']`` teacher features (constant).

    Returns:
        A scalar.
    """
    if student.shape[2:] != teacher.shape[2:]:
        student = F.interpolate(student, teacher.shape[2:], mode="bilinear")
    return F.mse_loss(channel_standardize(student.float()), channel_standardize(teacher.detach().float())) / 2
