"""Training-time geometry: aspect-preserving resize, horizontal flip, and the deterministic flip decision.

The resize rule is torchvision's ``GeneralizedRCNNTransform``: ``scale = min(min_size / short_side, max_size /
long_side)``. Resizing in the dataset (rather than only inside the detector) lets data-loader workers do the work
and makes the boxes the engine sees the boxes the detector trains on; the detector's own resize then finds the
image already at its target size (scale 1.0).

The flip is decided by a hash of ``(seed, epoch, index)``, not by a global RNG: a resumed run and a run with a
different number of loader workers see exactly the same augmentations.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_scale", "resized_size", "resize", "hflip", "flip_decision", "uniform_from"]

_MASK64 = (1 << 64) - 1


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """torchvision's scale factor: the short side goes to ``min_size`` unless the long side would exceed ``max_size``.

    Args:
        height, width: original image size in pixels.
        min_size: target length of the shorter side.
        max_size: cap on the longer side.

    Returns:
        The scale factor applied to both axes.
    """
    short, long_ = min(height, width), max(height, width)
    return min(min_size / short, max_size / long_)


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Output ``(h, w)`` for ``scale``, rounded (not floored) so the short side lands exactly on ``min_size``.

    With rounding, the detector's internal resize computes a scale of exactly 1.0 for an image this dataset already
    resized, so the image is not resampled twice.
    """
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize(image: Image.Image, boxes: np.ndarray, min_size: int,
           max_size: int) -> tuple[Image.Image, np.ndarray, float]:
    """Resize ``image`` with the aspect ratio kept and scale ``boxes`` to match.

    Args:
        image: an RGB PIL image of size ``(W, H)``.
        boxes: ``[n, 4]`` float32 xyxy boxes in the image's pixels.
        min_size, max_size: see :func:`resize_scale`.

    Returns:
        ``(resized image, boxes [n, 4] in its pixels, scale)``. Boxes are scaled per axis by the exact size ratio
        (rounding makes it differ from ``scale`` by under half a pixel over the image).
    """
    w, h = image.size
    scale = resize_scale(h, w, min_size, max_size)
    nh, nw = resized_size(h, w, scale)
    if (nh, nw) == (h, w):
        return image, boxes, scale
    out = image.resize((nw, nh), Image.BILINEAR)
    ratio = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    return out, boxes * ratio, scale


def hflip(image: Image.Image, boxes: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Mirror ``image`` left-right; ``boxes [n, 4]`` xyxy become ``(W - x2, y1, W - x1, y2)``."""
    w = image.size[0]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


def _splitmix64(x: int) -> int:
    # A well-mixed 64-bit integer hash (Steele et al., "SplitMix"); plain integers, so identical on every platform.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_from(*keys: int) -> float:
    """A uniform float in ``[0, 1)`` that depends only on the integer ``keys`` (order matters)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return (h >> 11) / float(1 << 53)


def flip_decision(seed: int, epoch: int, index: int, p: float) -> bool:
    """Whether sample ``index`` is flipped in ``epoch`` of a run seeded ``seed`` (probability ``p``)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return uniform_from(seed, epoch, index, 0x5EED_F11B) < p
