"""Real images for calibration, parity and benchmarks, read from a COCO-format JSON file through ``gkd.kd.data``.

Images load as the evaluation path loads them (``gkd.kd.data.coco.load_image_tensor``: EXIF orientation applied,
converted to 8-bit RGB), as float32 ``[3, H, W]`` in [0, 1] at their original size: the exported graph does the resize.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["ImageSet", "load_image_set"]


class LazyImages(Sequence):
    """``[(image_id, [3, H, W] tensor)]`` decoded from disk on each access: a few hundred full-size photos held as
    float32 tensors would take gigabytes, while each is read only once per model run."""

    def __init__(self, items: list[tuple[int, Path]], decode: Callable[[Path], torch.Tensor]):
        self._items = items
        self._decode = decode

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        image_id, path = self._items[i]
        return image_id, self._decode(path)


@dataclass
class ImageSet:
    """Images of a COCO file, with its ground truth for mAP.

    Attributes:
        path: the COCO JSON file.
        images: ``[(image_id, tensor [3, H, W] float32 in [0, 1])]``.
        gt_json: the cleaned COCO dict (for ``gkd.kd.evaluation.CocoEvaluator``).
        category_ids: COCO category id of labels 1..K.
        classes: class names of labels 1..K.
        has_annotations: whether the chosen images hold any annotation (mAP is meaningful).
        failed: ``[(file, reason)]`` of images that could not be decoded (only with ``skip_unreadable``; they are
            left out of ``images`` and of ``gt_json``, so every model is scored on the same readable images).
    """

    path: Path
    images: list[tuple[int, torch.Tensor]]
    gt_json: dict[str, Any]
    category_ids: list[int]
    classes: list[str]
    has_annotations: bool
    failed: list[tuple[str, str]] = field(default_factory=list)


def load_image_set(json_path: str | Path, *, limit: int | None = None, seed: int = 0,
                   image_root: str | Path | None = None, skip_unreadable: bool = False, lazy: bool = False
                   ) -> ImageSet:
    """Read up to ``limit`` images (a seeded random subset when the file has more) of a COCO JSON file.

    Args:
        json_path: COCO instances JSON; validated by ``gkd.kd.data.coco.load_coco`` (one-line errors).
        limit: number of images (None = all).
        seed: picks the subset, so runs are reproducible.
        image_root: folder of the image files (default: ``images/`` next to the JSON, else its folder).
        skip_unreadable: count images that fail to decode in ``failed`` instead of stopping at the first one
            (the caller reports them; they are never dropped silently).
        lazy: ``images`` decodes each image when it is accessed (:class:`LazyImages`), for large sets of large
            photos; an unreadable image then fails when it is reached.
    """
    from gkd.core.errors import GkdError
    from gkd.kd.data.coco import load_coco, load_image_tensor

    index = load_coco(json_path, image_root=image_root)
    entries = list(index.images)
    if limit is not None and limit < len(entries):
        picked = set(random.Random(seed).sample(range(len(entries)), limit))
        entries = [e for i, e in enumerate(entries) if i in picked]
    if lazy:
        if skip_unreadable:
            raise ValueError("skip_unreadable needs every image decoded up front (lazy=False)")
        images = LazyImages([(int(im["id"]), index.image_path(im)) for im in entries], load_image_tensor)
        annotated = any(index.anns_by_image.get(i) for i, _ in images._items)
        return ImageSet(Path(json_path), images, index.gt_json, list(index.category_ids), list(index.classes),
                        annotated)
    images, failed = [], []
    for im in entries:
        try:
            tensor = load_image_tensor(index.image_path(im))
        except GkdError as exc:
            if not skip_unreadable:
                raise
            failed.append((str(index.image_path(im)), str(exc)))
            continue
        images.append((int(im["id"]), tensor))
    gt_json = index.gt_json
    if failed:
        kept = {i for i, _ in images}
        gt_json = {**gt_json, "images": [im for im in gt_json["images"] if int(im["id"]) in kept],
                   "annotations": [a for a in gt_json["annotations"] if int(a["image_id"]) in kept]}
    annotated = any(index.anns_by_image.get(i) for i, _ in images)
    return ImageSet(Path(json_path), images, gt_json, list(index.category_ids), list(index.classes), annotated,
                    failed)
