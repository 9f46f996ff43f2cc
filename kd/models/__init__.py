"""Detectors (torchvision Faster R-CNN / RetinaNet with FPN) and forward-hook recorders."""
from .detectors import build_detector
from .recorders import OutputRecorder

__all__ = ["build_detector", "OutputRecorder"]
