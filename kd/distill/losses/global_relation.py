"""The global-knowledge loss: docs/method.md, section 2.4 (d) (the reference's ``r2i_om_loss`` with ``use_omloss``).

Each instance is represented by its cosine similarities to **all** prototypes of the level (every class), in the
student space and in the teacher space; the two vectors are aligned with a smooth-L1 (beta 1) averaged over N x M,
each row scaled by the instance's robust weight:

    L = SmoothL1_mean(w_i * Phi_s[i, :], w_i * Phi_t[i, :])

The gradient reaches the student's raw FPN features through Phi_s (not the adapters); Phi_t and w are constants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["global_relation_loss"]


def global_relation_loss(cos_s: torch.Tensor, cos_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Robust-weighted smooth-L1 between relation vectors of one level.

    Args:
        cos_s: ``[N, M]`` cosine similarities of the student's pooled instance features to the student prototypes.
        cos_t: ``[N, M]`` the same in teacher space.
        weights: ``[N]`` robust weights (detached).

    Returns:
        A scalar (0 when N or M is 0).
    """
    if cos_s.numel() == 0:
        return cos_s.sum() * 0.0
    w = weights.detach().to(cos_s.dtype).unsqueeze(1)
    return F.smooth_l1_loss(w * cos_s, w * cos_t.detach().to(cos_s.dtype), beta=1.0, reduction="mean")
