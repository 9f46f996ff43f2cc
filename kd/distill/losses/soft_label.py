"""Robust-weighted soft-label knowledge distillation: docs/method.md, section 2.4 (c).

    KL_i = mean over classes of p_t log(p_t / p_s),   p = softmax(z / T)
    L    = mean_i(T^2 * KL_i * w_i)

The KL is *averaged* over the classes, not summed, as in the reference (``KDLoss``); this keeps the term small and
is part of the released loss balance. Faster R-CNN: the K + 1 logits of the positive RoIs. RetinaNet: a softmax over
the K class logits (sigmoid logits in the detector) of the positive anchors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_label_kl"]


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """Weighted soft-label KL.

    Args:
        student_logits / teacher_logits: ``[N, K]`` logits of the same N instances.
        weights: ``[N]`` robust weights (None: all 1).
        temperature: softmax temperature T.

    Returns:
        A scalar (0 when N = 0).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=1)
    pt = F.softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_ps, pt, reduction="none").mean(dim=1) * t * t  # [N]
    if weights is not None:
        kl = kl * weights.to(kl.dtype)
    return kl.mean()
