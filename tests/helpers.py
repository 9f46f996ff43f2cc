"""Small shared test settings and utilities."""
import os
from typing import Any

from torch import nn

#: torch threads for the whole suite (``GKD_TEST_THREADS``, default 1; scripts/test_matrix.sh runs 1 and 2)
TEST_THREADS = int(os.environ.get("GKD_TEST_THREADS", "1"))


# A forward-hook recorder: the tests' way to look at a detector's intermediate outputs (FPN levels, head logits).
# Training reaches them as plain return values instead (gkd.kd.distill.task), or spies on a call
# (gkd.kd.distill.recorders.capture_calls), so this lives with the tests.
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
