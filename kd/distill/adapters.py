"""Per-level adapters (mmrazor's "connectors"): map student FPN features into the teacher's feature space.

As docs/method.md, section 3.4 decides: one 3x3 convolution per distilled level, padding 1 (the map keeps its size,
so it lines up with the teacher's), no activation, PyTorch's default initialisation (what the reference actually
runs, its intended small-normal init never being applied), for both Faster R-CNN and RetinaNet.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Adapters"]


class Adapters(nn.Module):
    """One ``Conv2d(c_s, c_t, kernel, padding=kernel // 2)`` per level key.

    Args:
        keys: level keys (e.g. ``["s4", "s8"]``).
        student_channels / teacher_channels: FPN widths (256 for torchvision's FPNs).
        kernel: 3 (the method) or 1 (a cheaper option: the 3x3 adapters are most of a gkd step's extra cost).
    """

    def __init__(self, keys: list[str], student_channels: int = 256, teacher_channels: int = 256, kernel: int = 3):
        super().__init__()
        self.convs = nn.ModuleDict({k: nn.Conv2d(student_channels, teacher_channels, kernel, padding=kernel // 2)
                                    for k in keys})

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_s, H, W] -> [B, C_t, H, W]`` for level ``key``."""
        return self.convs[key](x)
