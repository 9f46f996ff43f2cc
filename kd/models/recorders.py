"""Forward-hook recorders: reach a detector's intermediate outputs without editing or copying torchvision code.

Example::

    with OutputRecorder(model.backbone) as fpn, OutputRecorder(model.roi_heads.box_predictor) as logits:
        losses = model(images, targets)
    fpn.outputs[-1]      # OrderedDict level name -> [B, 256, H_l, W_l] (still attached to the graph)
    logits.outputs[-1]   # (class_logits [R, K + 1], box_regression [R, 4 (K + 1)])
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["OutputRecorder"]


class OutputRecorder:
    """Records every output of ``module`` while active (a context manager; the hook is removed on exit).

    Args:
        module: any submodule, e.g. ``model.backbone`` (FPN levels), ``model.rpn.head``,
            ``model.roi_heads.box_predictor`` (RoI logits) or ``model.head.classification_head`` (RetinaNet).
        detach: store detached outputs (for logging) instead of graph-attached ones (for losses).
    """

    def __init__(self, module: nn.Module, detach: bool = False):
        self.module, self.detach = module, detach
        self.outputs: list[Any] = []
        self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.outputs.append(_detach(output) if self.detach else output)

    def __enter__(self) -> "OutputRecorder":
        self.outputs.clear()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _detach(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach()
    if isinstance(x, dict):
        return type(x)((k, _detach(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x
