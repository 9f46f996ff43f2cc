"""Robust-weighted decoupled feature imitation: the "local knowledge" of docs/method.md, section 2.4 (b).

DeFeat-style (Guo et al., CVPR 2021) foreground / background split of an MSE between the adapted student map
``A = adapter(S)`` and the teacher map ``T``, with the foreground cells weighted by the instances' robust weights:

    L_fg = sum((A - T)^2 * M) / max(1, 2 sum(M))          (sum over B, C, H, W; M broadcast over channels)
    L_bg = sum((A - T)^2 * (1 - [M > 0])) / max(1, 2 sum(1 - [M > 0]))

Because of the normaliser, L_fg is a weighted mean: the robust weights act as relative weights between instances.
Deviations from the reference (docs/method.md, section 3.3): where boxes overlap the mask takes the **max** weight (the
reference lets the last box in the sampler's random order win), and weights are clamped to [0, 1] upstream (a
weight <= 0 would otherwise turn a box into background).
"""
from __future__ import annotations

import torch

__all__ = ["weighted_box_mask", "decoupled_imitation"]


def _cells(v1: torch.Tensor, v2: torch.Tensor, stride: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The reference's mask rule: [int(v1 / s), min(int(v2 / s), size)); the start kept inside the map.
    lo = torch.div(v1.clamp_min(0), stride, rounding_mode="floor").long().clamp(max=size - 1)
    hi = torch.div(v2.clamp_min(0), stride, rounding_mode="floor").long().clamp(max=size)
    return lo, hi


@torch.no_grad()
def weighted_box_mask(boxes: torch.Tensor, weights: torch.Tensor, stride: float,
                      shape: tuple[int, int, int]) -> torch.Tensor:
    """Foreground mask of one level: each box's cells carry its weight, overlaps take the max.

    A box covers rows ``[int(y1 / s), min(int(y2 / s), H))`` and the same for columns. A box too small to cover a
    cell that way (empty range on either axis) marks the single cell ``(int(y1 / s), int(x1 / s))``, as the reference.

    Args:
        boxes: ``[N, 5]`` (batch index, x1, y1, x2, y2) in image pixels.
        weights: ``[N]`` weights in [0, 1].
        stride: image pixels per cell.
        shape: ``(B, H, W)``.

    Returns:
        ``[B, 1, H, W]`` float mask (0 = background).
    """
    b, h, w = shape
    mask = torch.zeros((b, 1, h, w), dtype=torch.float32, device=boxes.device)
    if boxes.shape[0] == 0:
        return mask
    bi = boxes[:, 0].long()
    c0, c1 = _cells(boxes[:, 1], boxes[:, 3], stride, w)
    r0, r1 = _cells(boxes[:, 2], boxes[:, 4], stride, h)
    empty = (c1 <= c0) | (r1 <= r0)
    c1 = torch.where(empty, c0 + 1, c1)
    r1 = torch.where(empty, r0 + 1, r1)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    rows = (ys[None] >= r0[:, None]) & (ys[None] < r1[:, None])  # [N, H]
    cols = (xs[None] >= c0[:, None]) & (xs[None] < c1[:, None])  # [N, W]
    wts = weights.float()
    for img in bi.unique().tolist():
        sel = (bi == img).nonzero().squeeze(1)
        # [n, H, W] per image only: bounded memory, and amax makes the result independent of box order.
        cover = rows[sel, :, None] & cols[sel, None, :]
        mask[img, 0] = (cover.float() * wts[sel, None, None]).amax(dim=0)
    return mask


def decoupled_imitation(adapted: torch.Tensor, teacher: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background imitation losses of one level (unweighted by the loss weights).

    Args:
        adapted: ``[B, C, H, W]`` adapted student features (gradient flows here).
        teacher: ``[B, C, H, W]`` teacher features (constant).
        mask: ``[B, 1, H, W]`` from :func:`weighted_box_mask`.

    Returns:
        ``(L_fg, L_bg)`` scalars.
    """
    c = adapted.shape[1]
    # float32 even under AMP: a sum of C squared differences overflows float16 for ordinary FPN magnitudes.
    sq = (adapted.float() - teacher.float()).pow(2).sum(dim=1, keepdim=True)  # [B, 1, H, W], summed over C
    mask = mask.to(sq.dtype)
    bg = (mask <= 0).to(sq.dtype)
    # The reference's mask is expanded over the C channels, so its sums count each cell C times.
    fg_loss = (sq * mask).sum() / torch.clamp(2 * c * mask.sum(), min=1.0)
    bg_loss = (sq * bg).sum() / torch.clamp(2 * c * bg.sum(), min=1.0)
    return fg_loss, bg_loss
