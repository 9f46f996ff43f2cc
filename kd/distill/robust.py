"""Robust weights of the Robust Distillation Module (docs/method.md, section 2.3, clamped as section 3.3 decides).

For an instance of class c at one level, with cosine similarities to the level's prototypes in both spaces:

    w = clamp(1 - | max_k cos(f_s, G_s[c, k]) - max_k cos(f_t, G_t[c, k]) |, 0, 1)

large when the instance relates to its class prototypes in the same way in student and teacher space. The weight is
detached (no gradient). An instance whose class has no prototype at this level gets weight 1 (no information, so
no down-weighting), as docs/method.md, section 3.7 decides.
"""
from __future__ import annotations

import torch

__all__ = ["max_same_class_cos", "robust_weights", "weight_from_best"]


def max_same_class_cos(cos: torch.Tensor, labels: torch.Tensor,
                       proto_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity of each instance to a prototype of its own class.

    Args:
        cos: ``[N, M]`` cosine similarity of each instance to each prototype of the level.
        labels: ``[N]`` instance class labels (1..K).
        proto_labels: ``[M]`` class label of each prototype.

    Returns:
        ``(best [N], has [N] bool)``: ``best`` is 0 where the class has no prototype (``has`` False).
    """
    same = labels.view(-1, 1) == proto_labels.view(1, -1)  # [N, M]
    masked = cos.masked_fill(~same, float("-inf"))
    has = same.any(dim=1)
    best = torch.where(has, masked.amax(dim=1) if cos.shape[1] else cos.new_zeros(cos.shape[0]),
                       cos.new_zeros(()))
    return best, has


@torch.no_grad()
def robust_weights(cos_s: torch.Tensor, cos_t: torch.Tensor, labels: torch.Tensor,
                   proto_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance robust weights, detached and clamped to [0, 1].

    Args:
        cos_s / cos_t: ``[N, M]`` cosine similarities to the student / teacher prototypes of the level.
        labels: ``[N]`` instance labels; proto_labels: ``[M]``.

    Returns:
        ``(w [N] in [0, 1], has [N] bool)``; ``w`` is 1 where the instance's class has no prototype.
    """
    best_s, has = max_same_class_cos(cos_s.detach(), labels, proto_labels)
    best_t, _ = max_same_class_cos(cos_t.detach(), labels, proto_labels)
    return weight_from_best(best_s, best_t, has), has


def weight_from_best(best_s: torch.Tensor, best_t: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """The weight formula on each network's best same-class cosine (``[N]`` each, from :func:`max_same_class_cos`):
    ``clamp(1 - |best_s - best_t|, 0, 1)``, and 1 where ``has`` is False (no prototype of the instance's class)."""
    w = (1.0 - (best_s - best_t).abs()).clamp(0.0, 1.0)
    return torch.where(has, w, torch.ones_like(w))
