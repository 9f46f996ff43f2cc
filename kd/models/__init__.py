"""Detectors (torchvision Faster R-CNN / RetinaNet with FPN)."""
from .detectors import build_detector

__all__ = ["build_detector"]
