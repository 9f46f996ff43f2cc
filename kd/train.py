"""``gkd train`` and ``gkd eval`` as library functions: datasets + detector + loop from a resolved config."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from gkd.core.errors import GkdError

from .config import RunConfig

__all__ = ["load_splits", "check_num_classes", "build_model", "train_detector"]

log = logging.getLogger("gkd")


def load_splits(cfg: RunConfig, train: bool = True):
    """Load and validate the train and val splits; both must have the same categories.

    Returns:
        ``(train_index, val_index)``; ``train_index`` is None when ``train`` is False.
    """
    from .data import load_coco

    image_root = cfg.data.path("images")
    val_index = load_coco(cfg.data.path("val"), image_root=image_root)
    if not train:
        return None, val_index
    train_index = load_coco(cfg.data.path("train"), image_root=image_root)
    if not any(a.get("iscrowd", 0) == 0 for anns in train_index.anns_by_image.values() for a in anns):
        raise GkdError(f"{cfg.data.path('train')}: holds no annotated object ({len(train_index.anns_by_image)} "
                       f"images, 0 boxes to learn from); expected a training split with labelled boxes")
    if train_index.category_ids != val_index.category_ids or train_index.classes != val_index.classes:
        raise GkdError(f"{cfg.data.path('val')}: categories differ from {cfg.data.path('train')} "
                       f"({val_index.classes} vs {train_index.classes}); both splits need the same category list")
    return train_index, val_index


def check_num_classes(cfg: RunConfig, num_classes: int) -> None:
    """``model.num_classes`` is optional (0 = the dataset's); when given it must agree with the dataset."""
    if cfg.model.num_classes and cfg.model.num_classes != num_classes:
        raise GkdError(f"model.num_classes is {cfg.model.num_classes} but the dataset has {num_classes} classes "
                       f"(set it to 0 to take the dataset's count)")


def build_model(cfg: RunConfig, num_classes: int, classes: list[str] | None = None) -> torch.nn.Module:
    """Detector for ``cfg.model`` with ``num_classes`` classes, initialised from ``cfg.model.weights`` if given
    (torchvision COCO weights are mapped to ``classes`` by name, or their class heads re-initialised)."""
    from .checkpoint import detector_weights, load_checkpoint, load_state_into
    from .models.detectors import build_detector

    check_num_classes(cfg, num_classes)
    model = build_detector(cfg.model, num_classes)
    if cfg.model.weights:
        ckpt = load_checkpoint(cfg.model.weights, need="detector")  # the checks every reader applies
        state = detector_weights(ckpt, cfg.model.weights)
        report = load_state_into(model, state, cfg.model.weights, cfg.model.arch, classes=classes)
        log.info("initialised from %s%s", cfg.model.weights, f": {report}" if report else "")
    return model


def train_detector(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a detector without distillation (a teacher, or the ``none`` baseline student).

    Started by torchrun, every process joins the job's process group and trains its share (see
    :mod:`gkd.kd.distributed`); rank 0 writes the run folder."""
    from .distributed import process_group

    with process_group(cfg.train):
        return _train_detector(cfg, resume, progress)


def _train_detector(cfg: RunConfig, resume: bool, progress: bool) -> dict[str, Any]:
    from .data import CocoDetection
    from .engine import fit, seed_everything
    from .task import DetectionTask

    train_index, val_index = load_splits(cfg)
    k = len(train_index.classes)
    seed_everything(cfg.seed)  # model init is part of the seeded run
    model = build_model(cfg, k, train_index.classes)  # checks model.num_classes against the dataset's k
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k))
    train_set = CocoDetection(train_index, train=True, min_size=cfg.model.min_size, max_size=cfg.model.max_size,
                              hflip=cfg.train.hflip, seed=cfg.seed, keep_empty=cfg.data.keep_empty)
    val_set = CocoDetection(val_index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
    log.info("training %s/%s on %d images (%d classes), validating on %d images -> %s", cfg.model.arch,
             cfg.model.backbone, len(train_set), k, len(val_set), cfg.run_dir)
    return fit(DetectionTask(model), cfg, train_set, val_set, resume=resume, classes=train_index.classes,
               category_ids=train_index.category_ids, gt_json=val_index.gt_json, progress=progress)
