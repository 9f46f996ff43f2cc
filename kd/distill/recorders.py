"""Recording what a torchvision detector computes internally, without editing or copying torchvision code.

The distillation task runs the detector's own submodules one after the other (transform, backbone, rpn, roi_heads
pieces / head, anchor_generator, compute_loss), so FPN features and RoI sampling results are plain return values.
The one thing torchvision computes and does not return is RetinaNet's anchor matching (``matched_idxs``, made inside
``RetinaNet.compute_loss`` and passed to ``head.compute_loss``): :func:`capture_calls` wraps that bound method on the
instance for the duration of a ``with`` block and records its arguments.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["capture_calls"]


@contextlib.contextmanager
def capture_calls(obj: Any, name: str) -> Iterator[list[tuple[tuple, dict]]]:
    """Record the arguments of every call of ``obj.<name>`` inside the block (the call itself is unchanged).

    The wrapper is an instance attribute that shadows the class's method and is removed on exit, so the object is
    exactly as before afterwards (nothing reaches its ``state_dict``).

    Yields:
        A list that receives ``(args, kwargs)`` per call.
    """
    calls: list[tuple[tuple, dict]] = []
    if name in vars(obj):
        raise RuntimeError(f"{type(obj).__name__}.{name} is already wrapped")
    bound = getattr(obj, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return bound(*args, **kwargs)

    object.__setattr__(obj, name, spy)
    try:
        yield calls
    finally:
        object.__delattr__(obj, name)
