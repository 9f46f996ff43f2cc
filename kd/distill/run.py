"""``gkd distill`` as a library function: datasets, student, teacher, task, then ``gkd.kd.engine.fit``."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from gkd.core.errors import GkdError

from ..config import ModelConfig
from .config import DistillRunConfig, TeacherConfig, method_parts, uses_prototypes

__all__ = ["run_distillation", "load_teacher", "build_task"]

log = logging.getLogger("gkd")


def load_teacher(tcfg: TeacherConfig, classes: Sequence[str], student_cfg: ModelConfig) -> nn.Module:
    """Load the frozen teacher and check it against its declared architecture and the dataset's classes.

    Args:
        tcfg: the ``distill.teacher`` section.
        classes: the dataset's class names (label i + 1 = ``classes[i]``).
        student_cfg: the student's model config (input size, used for a plain state dict's teacher).

    Returns:
        The teacher detector (eval mode, CPU), ``gkd_meta`` set.

    Raises:
        GkdError: no checkpoint, unreadable file, architecture or class mismatch.
    """
    from gkd.core.config import from_dict

    from ..checkpoint import detector_weights, is_gkd_checkpoint, load_checkpoint, load_state_into
    from ..models.detectors import build_detector

    if not tcfg.checkpoint:
        raise GkdError("distill.teacher.checkpoint: not set; give the teacher's checkpoint, e.g. "
                       "distill.teacher.checkpoint=runs/teacher/checkpoints/best.pt")
    path = Path(tcfg.checkpoint)
    ckpt = load_checkpoint(path, need="detector")  # the checks every reader of a checkpoint applies
    if is_gkd_checkpoint(ckpt):
        mcfg = from_dict(ModelConfig, ckpt["model_config"], f"{path} (model_config)")
        for key in ("arch", "backbone"):
            declared = getattr(tcfg, key)
            if declared is not None and declared != getattr(mcfg, key):
                raise GkdError(f"{path}: the teacher checkpoint is a {mcfg.arch}/{mcfg.backbone} model, but "
                               f"distill.teacher.{key} declares '{declared}'")
        saved = ckpt.get("classes")
        if saved is not None and list(saved) != list(classes):
            raise GkdError(f"{path}: the teacher was trained on classes {list(saved)}, the dataset has "
                           f"{list(classes)}; teacher and student must share the label space (same names, same order)")
        source = detector_weights(ckpt, path)
    else:
        if tcfg.arch is None or tcfg.backbone is None:
            raise GkdError(f"{path}: a plain state dict records no architecture; set distill.teacher.arch and "
                           f"distill.teacher.backbone")
        source = detector_weights(ckpt, path)
        mcfg = dataclasses.replace(student_cfg, arch=tcfg.arch, backbone=tcfg.backbone,
                                   anchor_sizes=tuple(tcfg.anchor_sizes), weights=None,
                                   **{"backbone_width": 1.0, **_widths_of(source)})
    mcfg = dataclasses.replace(mcfg, num_classes=len(classes), weights=None)
    teacher = build_detector(mcfg, len(classes))
    try:
        report = load_state_into(teacher, source, str(path), mcfg.arch, classes=list(classes), teacher=True)
    except GkdError as exc:
        raise GkdError(f"distill.teacher ({mcfg.arch}/{mcfg.backbone}): {exc}") from None
    if report:
        log.info("teacher: %s", report)
    if (mcfg.min_size, mcfg.max_size) != (student_cfg.min_size, student_cfg.max_size):
        log.info("teacher was configured for %d/%d px inputs; it sees the student's %d/%d px tensor",
                 mcfg.min_size, mcfg.max_size, student_cfg.min_size, student_cfg.max_size)
    return teacher.eval()


def _model_name(meta: dict) -> str:
    """``faster_rcnn/resnet18`` (``resnet18x0.5`` at a backbone width other than 1)."""
    width = meta.get("backbone_width", 1.0)
    return f"{meta['arch']}/{meta['backbone']}" + (f"x{width:g}" if width != 1.0 else "")


def _widths_of(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Backbone, FPN and box-head widths read off a plain state dict (torchvision's: 1.0, 256 and 1024), not the
    student's."""
    out = {}
    stem = state.get("backbone.body.conv1.weight")  # ResNets only (MobileNetV3 has no width option)
    if stem is not None:
        out["backbone_width"] = int(stem.shape[0]) / 64
    fpn = state.get("backbone.fpn.layer_blocks.0.0.weight", state.get("backbone.fpn.layer_blocks.0.weight"))
    if fpn is not None:
        out["fpn_channels"] = int(fpn.shape[0])
    head = state.get("roi_heads.box_head.fc6.weight")
    if head is not None:
        out["box_head_dim"] = int(head.shape[0])
    return out


def build_task(cfg: DistillRunConfig, student: nn.Module, teacher: nn.Module | None, train_index) -> nn.Module:
    """The :class:`DistillationTask` of a run, with the training split (eval mode) as the PGM's source."""
    from ..data import CocoDetection
    from .task import DistillationTask

    annotations, load = None, None
    if uses_prototypes(cfg.distill):
        pgm_set = CocoDetection(train_index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
        annotations = [tuple(torch.from_numpy(a) for a in pgm_set.target_boxes(i)) for i in range(len(pgm_set))]
        load = pgm_set.__getitem__
    task = DistillationTask(student, teacher, cfg.distill, epochs=cfg.train.epochs, classes=train_index.classes,
                            pgm_annotations=annotations, pgm_load=load, seed=cfg.seed)
    return task


def _load_adapters(task, path: str) -> None:
    """Start ``task``'s adapters from the adapters of the distillation run checkpoint ``path``."""
    from ..checkpoint import load_checkpoint

    state = load_checkpoint(path, need="run").get("extra") or {}
    if getattr(task, "adapters", None) is None:
        raise GkdError(f"quant.adapters_from: distill.method '{task.cfg.method}' has no adapters to start")
    if "adapters" not in state:
        raise GkdError(f"quant.adapters_from: {path} holds no adapters (not a distillation run with adapters)")
    try:
        task.adapters.load_state_dict(state["adapters"])
    except RuntimeError as exc:
        raise GkdError(f"quant.adapters_from: {path}: its adapters do not fit this student and teacher "
                       f"({str(exc).splitlines()[0][:200]})") from None
    log.info("adapters initialised from %s", path)


def _make_quantization_aware(student: nn.Module, cfg: DistillRunConfig, train_index) -> None:
    """Fake INT8 in ``cfg.quant.int8_format``, its scales those of post-training calibration on a seeded subset of
    the training split (the same on ``--resume``, whose checkpoint then restores the learned ones); BatchNorm frozen."""
    from ..data import CocoDetection
    from ..fake_quant import calibrate_fake_quant, freeze_batchnorm

    images = CocoDetection(train_index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
    n = min(cfg.quant.calib_images, len(images))
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    state = calibrate_fake_quant(student, (images[i][0] for i in pick), cfg.quant.int8_format)
    frozen = freeze_batchnorm(student)
    log.info("quantization-aware: fake INT8 (%s format) on %d tensors of %d layers, scales calibrated on %d "
             "training images; %d BatchNorm layers frozen", cfg.quant.int8_format, len(state.points),
             len({name for name, _ in state.index}), n, frozen)


def run_distillation(cfg: DistillRunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the student of ``cfg`` with ``cfg.distill.method``; writes ``cfg.run_dir`` (see ``gkd.kd.engine.fit``).

    Started by torchrun, every process joins the job's process group (see :mod:`gkd.kd.distributed`): each rank
    loads the frozen teacher, DDP trains student + adapters, the prototype extraction is sharded.

    Returns:
        The last epoch's metrics record.
    """
    from ..distributed import process_group

    with process_group(cfg.train):
        return _run_distillation(cfg, resume, progress)


def _run_distillation(cfg: DistillRunConfig, resume: bool, progress: bool) -> dict[str, Any]:
    from ..data import CocoDetection
    from ..engine import fit, seed_everything
    from ..train import build_model, load_splits

    train_index, val_index = load_splits(cfg)
    k = len(train_index.classes)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k))
    needs_teacher = method_parts(cfg.distill.method).teacher
    teacher = load_teacher(cfg.distill.teacher, train_index.classes, cfg.model) if needs_teacher else None
    seed_everything(cfg.seed)  # the student's init is the same as `gkd train` with this seed, whatever the method
    student = build_model(cfg, k, train_index.classes)
    if cfg.quant.int8_format:
        _make_quantization_aware(student, cfg, train_index)
    task = build_task(cfg, student, teacher, train_index)
    if cfg.quant.adapters_from and not resume:
        _load_adapters(task, cfg.quant.adapters_from)
    if teacher is not None:  # checked on --resume: the teacher read on the run's behalf must be the same file
        from gkd.core.io import file_sha256

        task.teacher_sha256 = file_sha256(cfg.distill.teacher.checkpoint)
    train_set = CocoDetection(train_index, train=True, min_size=cfg.model.min_size, max_size=cfg.model.max_size,
                              hflip=cfg.train.hflip, seed=cfg.seed, keep_empty=cfg.data.keep_empty)
    val_set = CocoDetection(val_index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
    student_name = _model_name(student.gkd_meta)
    what = (f"distilling {_model_name(teacher.gkd_meta)} -> {student_name}" if teacher is not None
            else f"training {student_name} without a teacher (distill.method=none)")
    log.info("%s on %d images (%d classes), validating on %d -> %s", what, len(train_set), k, len(val_set),
             cfg.run_dir)
    return fit(task, cfg, train_set, val_set, resume=resume, classes=train_index.classes,
               category_ids=train_index.category_ids, gt_json=val_index.gt_json, progress=progress)
