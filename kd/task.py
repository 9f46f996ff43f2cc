"""Tasks: what the training loop optimises. A task is an ``nn.Module`` whose forward returns a loss dict.

The protocol (see docs/ARCHITECTURE.md): ``forward(images, targets) -> {"loss": total, <terms>...}`` where keys
containing "loss" are backpropagated terms and the others are logged metrics; ``detector`` is the model that is
evaluated and saved; ``on_epoch_start(epoch, context)`` runs before each epoch and returns metrics to log;
``extra_state()`` / ``load_extra_state(state)`` carry task state beyond the detector's weights (stored in the run
checkpoint under "extra").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DetectionTask", "loss_terms", "with_total"]


def loss_terms(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's loss dict with every key named ``loss_<term>`` (RetinaNet says ``classification``, Faster
    R-CNN ``loss_classifier``): the engine backpropagates and logs keys containing "loss"."""
    return {(k if k.startswith("loss") else f"loss_{k}"): v for k, v in losses.items()}


def with_total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``terms`` plus ``"loss"``: their sum (what the engine backpropagates)."""
    return {**terms, "loss": sum(terms.values())}


class DetectionTask(nn.Module):
    """Plain supervised training of a torchvision detector (no distillation).

    Args:
        detector: a torchvision ``FasterRCNN`` or ``RetinaNet`` (its forward returns a loss dict in train mode).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Args: images: list of ``[3, H, W]`` float tensors in [0, 1]; targets: per image ``boxes [n, 4]`` and
        ``labels [n]``. Returns ``{"loss": sum of terms, "loss_<term>": ...}``."""
        return with_total(loss_terms(self.detector(images, [{"boxes": t["boxes"], "labels": t["labels"]}
                                                            for t in targets])))

    def on_epoch_start(self, epoch: int, context: dict[str, Any]) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"DetectionTask has no extra state, got keys {sorted(state)}")
