"""The public Python API: the same stages as the ``gkd`` commands, for notebooks and scripts.

Every function takes a config the way the command does (a YAML path, or a mapping, or nothing for the defaults)
plus overrides (``["train.epochs=2"]`` as on the command line, or a nested mapping merged as data), and returns
paths and metrics. Errors a user can cause raise :class:`gkd.core.errors.GkdError` with a one-line message.

Example::

    from gkd.api import distill, evaluate, export, run, synth, train

    synth("data/synth", n_images=200, image_size=128)
    teacher = train("kd/configs/study/teacher.yaml", {"name": "teacher", "train": {"epochs": 4}})
    student = distill("kd/configs/distill_gkd.yaml",
                      {"name": "student", "distill": {"teacher": {"checkpoint": str(teacher.checkpoint),
                                                                  "arch": None, "backbone": None}}})
    print(student.metrics["val/bbox_mAP"])
    metrics = evaluate(student.checkpoint, "data/synth/val.json")
    manifest = export(student.checkpoint, "runs/student/export", precisions=("fp32", "int8"),
                      calib_data="data/synth/train.json", val_data="data/synth/val.json")
    manifest = run({"name": "smoke"}, quick=True)   # the whole pipeline; the report is runs/smoke/report.md
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["RunResult", "synth", "train", "distill", "evaluate", "export", "run"]

#: a YAML path, a mapping of keys, or None for the defaults
Config = Optional[Union[str, Path, Mapping[str, Any]]]
#: command-line style ``["train.epochs=2"]`` strings, or a nested mapping merged as data
Overrides = Union[Sequence[str], Mapping[str, Any]]


@dataclass(frozen=True)
class RunResult:
    """What a training or distillation run left in ``run_dir``."""

    run_dir: Path
    #: the detector of the last epoch (what ``evaluate`` and ``export`` take)
    checkpoint: Path
    #: the detector of the best val ``bbox_mAP`` epoch
    best: Path
    #: the last epoch's record: train losses, ``val/bbox_mAP`` and the other COCO metrics
    metrics: dict[str, Any]
    #: the resolved config (a frozen dataclass)
    config: Any


def _load(config, overrides, cls, preset: Mapping[str, Any] | None = None):
    """The resolved config: ``preset``, then the YAML file or mapping ``config``, then ``overrides``."""
    from gkd.core.config import merge_dicts
    from gkd.kd.config import load_config

    path, updates = (None, dict(config)) if isinstance(config, Mapping) else (config, {})
    updates = merge_dicts(dict(preset or {}), updates)
    strings: list[str] = []
    if isinstance(overrides, Mapping):
        updates = merge_dicts(updates, dict(overrides))
    else:
        strings = [overrides] if isinstance(overrides, str) else list(overrides)
    return load_config(path, strings, cls=cls, updates=updates or None)


def _result(cfg, record: dict[str, Any]) -> RunResult:
    ckpts = cfg.run_dir / "checkpoints"
    return RunResult(cfg.run_dir, ckpts / "model.pt", ckpts / "best.pt", dict(record), cfg)


def synth(out: str | Path, *, n_images: int = 800, seed: int = 0, image_size: int = 160,
          val_fraction: float = 0.2, preset: str = "clean") -> dict[str, Any]:
    """Write the embedded synthetic dataset (``train.json``, ``val.json``, ``images/``) to ``out``; its metadata.
    ``preset``: ``clean`` (the default world) or ``cluttered`` (see ``gkd data synth --help``)."""
    from gkd.kd.data import generate_synthetic

    return generate_synthetic(out, n_images=n_images, seed=seed, image_size=image_size, val_fraction=val_fraction,
                              preset=preset)


def train(config: Config = None, overrides: Overrides = (), *, resume: bool = False,
          progress: bool = False) -> RunResult:
    """``gkd train``: train a detector (a teacher, or a student without distillation)."""
    from gkd.kd.config import RunConfig
    from gkd.kd.train import train_detector

    cfg = _load(config, overrides, RunConfig)
    return _result(cfg, train_detector(cfg, resume=resume, progress=progress))


def distill(config: Config = None, overrides: Overrides = (), *, resume: bool = False,
            progress: bool = False) -> RunResult:
    """``gkd distill``: train a student from the teacher in ``distill.teacher.checkpoint``."""
    from gkd.kd.distill.config import DistillRunConfig
    from gkd.kd.distill.run import run_distillation

    cfg = _load(config, overrides, DistillRunConfig)
    return _result(cfg, run_distillation(cfg, resume=resume, progress=progress))


def evaluate(model: str | Path, data: str | Path, *, images: str | Path | None = None,
             out_dir: str | Path | None = None, max_dets: int | None = None, device: str = "cpu",
             compare: Sequence[str | Path] = ()) -> dict[str, float]:
    """``gkd eval``: the 12 COCO box metrics of ``model`` (a checkpoint, an ONNX file or a TensorRT engine) on a COCO
    JSON, under ``gkd eval``'s protocol. ``compare``: more models scored on the same images (their metrics, per-class
    AP and delta are in ``out_dir/eval.json``). ``detections.json`` and ``metrics.json`` go to ``out_dir``, default
    ``eval/<model name>`` beside the run's checkpoints."""
    from gkd.bench.accuracy import check_eval_out, default_eval_dir, evaluate_models, write_eval_outputs

    out = Path(out_dir) if out_dir else default_eval_dir(Path(model))
    check_eval_out(out)  # before the work, as the command does
    rep = evaluate_models([Path(model), *map(Path, compare)], Path(data), image_root=images, max_dets=max_dets,
                          device=device, log=lambda line: None)
    write_eval_outputs(rep, Path(model), Path(data), out)
    return rep["models"][rep["reference"]]["metrics"]


def export(checkpoint: str | Path, out: str | Path, *, precisions: Sequence[str] = ("fp32",),
           calib_data: str | Path | None = None, val_data: str | Path | None = None, log=None,
           **options: Any) -> dict[str, Any]:
    """``gkd export``: ONNX files (and TensorRT engines where TensorRT exists), each run and compared with PyTorch on
    real images; returns the manifest (also ``out/export.json``). ``options``: any field of
    :class:`gkd.export.pipeline.ExportOptions` (``parity_images``, ``int8_target``, ``opset``, ...)."""
    from gkd.export.pipeline import ExportOptions, export_checkpoint

    opts = ExportOptions(checkpoint=Path(checkpoint), out=Path(out), precisions=tuple(precisions),
                         calib_data=Path(calib_data) if calib_data else None,
                         val_data=Path(val_data) if val_data else None, **options)
    return export_checkpoint(opts, log=log or (lambda line: None))


def run(config: Config = None, overrides: Overrides = (), *, quick: bool = False) -> dict[str, Any]:
    """``gkd run``: the whole pipeline; returns the manifest (``manifest["invocation"]``: what each stage did and
    why). ``quick``: the ``--quick`` preset under ``config`` and ``overrides``."""
    from gkd.pipeline import run_pipeline
    from gkd.run_config import QUICK, PipelineConfig

    return run_pipeline(_load(config, overrides, PipelineConfig, preset=QUICK if quick else None))
