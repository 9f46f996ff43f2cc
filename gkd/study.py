"""``gkd study``: a reproducible distillation study in the shape of the paper's tables, at CPU scale.

An independent teacher (its own seed, width and run) and a common student initialisation (its own seed), then the
student with each method of the menu on an identical schedule (same number of updates, same data order and
initialisation per seed: only the distillation differs), for several seeds; each student is evaluated on the same
val split, overall, per class and on the hard subsets the synthetic generator tags (small, occluded, blurred
objects). Ablations (prototypes per class, global weight, BatchNorm mode and refresh interval of the prototypes),
and a positive control: a second teacher trained on a defective copy of the training split (one class's labels
partly swapped, or the boxes of one difficulty tag deleted), which the robust module should notice. Everything lands
in ``runs/<name>/study.json`` and a Markdown report (``docs/study.md`` by default, :mod:`gkd.study_report`) with the
power stated in advance, paired deltas with 95% confidence intervals, the exact command, the config, the machine and
the wall time.

Runs execute in parallel worker processes (``jobs``, one torch thread each: on a 2-core machine two single-thread
runs finish sooner than one two-thread run after the other). Finished runs are skipped when the command is rerun,
an interrupted one resumes from its last epoch, so a killed study loses at most one epoch per worker.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.kd.config import RunConfig
from gkd.study_config import StudyConfig, check_grid, student_runs
from gkd.study_report import PAPER_TABLES, SUBSETS, portable_paths, render_report

__all__ = ["run_study", "study_run", "SUBSETS", "PAPER_TABLES"]

log = logging.getLogger("gkd")


# ------------------------------------------------------------------------------------------------ the stages


@dataclass(frozen=True)
class StudyRunSpec:
    """One run of the study: train (``teacher``: without a teacher, e.g. the teacher or the student
    initialisation; otherwise a student with its method), then evaluate on ``val`` overall, per class and on the
    hard subsets. ``meta`` is what the table knows the run by (kind, method, seed, variant)."""

    train: Any  # gkd.kd.stage.TrainSpec
    val: Path
    meta: dict
    teacher: bool = False


def study_run(spec: StudyRunSpec) -> Any:
    """Train and evaluate one run of the study (in a worker process, or in this one): a
    :class:`gkd.kd.stage.TrainedModel` whose ``metrics`` are the study's (``all``, each subset, ``per_class``)."""
    from gkd.bench.stage import evaluate_checkpoint
    from gkd.core.config import to_dict
    from gkd.kd.distill.diagnostics import training_diagnostics
    from gkd.kd.stage import TrainedModel, distill_stage, train_stage

    run_cfg = spec.train.config
    t0 = time.perf_counter()
    model = (train_stage if spec.teacher else distill_stage)(spec.train)
    train_s = round(time.perf_counter() - t0, 1)
    extra = {**model.extra, **spec.meta, **({"config": to_dict(run_cfg)} if spec.teacher else {}),
             "run_dir": str(run_cfg.run_dir), "train_s": train_s, "diagnostics": training_diagnostics(run_cfg.run_dir),
             "epochs": run_cfg.train.epochs, "steps_per_epoch": run_cfg.train.max_steps_per_epoch,
             **({"checkpoint": str(model.checkpoint.path)} if spec.teacher else {})}
    metrics = evaluate_checkpoint(model.checkpoint.path, spec.val, threads=run_cfg.train.threads or 1)
    return TrainedModel(model.checkpoint, metrics, extra)


def _job(stage: str, inputs: dict[str, Any], run_cfg: Any, val: Path, meta: dict, prefix: str, work: str,
         teacher: bool = False) -> Any:
    """A study run as a job: in this process with progress bars, or in a worker of ``n`` threads without."""
    from gkd.kd.stage import TrainedModel, TrainSpec, with_threads
    from gkd.runner import Job

    def spec(key: str, n: int | None) -> StudyRunSpec:
        train = TrainSpec(run_cfg, key, progress=teacher) if n is None else \
            TrainSpec(with_threads(run_cfg, n), key, progress=False)
        return StudyRunSpec(train, val, meta, teacher)

    return Job(stage, inputs, study_run, spec, TrainedModel, prefix, work)


# ------------------------------------------------------------------------------------------------ the study

#: what a refused stage tells the user (a study never mixes runs of two designs in one table)
REFUSE_HINT = ": give the study a new name=, or delete that folder"


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("inputs", "command")}


def run_study(cfg: StudyConfig, command: str = "") -> dict[str, Any]:
    """Data -> (teacher, control teacher, student initialisation: side by side) -> every student run -> report.

    The stages are keyed by :mod:`gkd.runner` in ``runs/<name>/manifest.json``: a rerun reuses every stage whose key
    is unchanged and resumes an interrupted one; a stage whose key changed is refused with a one-line error (a new
    design gets a new name). Returns study.json."""
    from gkd.bench.stage import evaluate_checkpoint
    from gkd.bench.stamp import machine_summary
    from gkd.core.config import load_config, merge_dicts, to_dict
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json, atomic_write_text
    from gkd.core.records import Artifact
    from gkd.kd.data.defects import DefectiveSplit, DefectSpec, make_defective_split
    from gkd.kd.data.prepare import Dataset, DatasetSpec, count_images, prepare_dataset
    from gkd.kd.distill.levels import level_histogram
    from gkd.kd.stage import TrainedModel, training_inputs, training_work
    from gkd.runner import Manifest, StageRunner

    t_start = time.perf_counter()
    root = Path(cfg.data_root)
    val_json = root / "val.json"
    if cfg.synth_val_images >= cfg.synth_images:
        raise GkdError(f"synth_val_images is {cfg.synth_val_images}; expected fewer than synth_images "
                       f"({cfg.synth_images}): the rest is the training split")
    check_grid(cfg)
    fixed = {"runs_dir": str(cfg.run_dir), "data": {"root": cfg.data_root}}
    tcfg = None if cfg.teacher_checkpoint else load_config(
        cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
        updates=merge_dicts(cfg.teacher, {**fixed, "name": "teacher"}))
    icfg = None if cfg.student_init_epochs <= 0 else load_config(
        cfg.student_init_config, cls=RunConfig, key_prefix="student_init.", updates=merge_dicts(cfg.student_init, {
            **fixed, "name": "student-init",
            "train": {"epochs": cfg.student_init_epochs, "max_steps_per_epoch": None, "steps": []}}))
    control_json = cfg.run_dir / "control" / "train.json"
    ccfg = None if cfg.control_fraction <= 0 or not cfg.control_methods else load_config(
        cfg.teacher_config, cls=RunConfig, key_prefix="teacher.", updates=merge_dicts(cfg.teacher, {
            **fixed, "name": "teacher-control",
            "data": {"root": cfg.data_root, "train": os.path.relpath(control_json, root)}}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    planned = ["data", *(["control-data", "teacher-control"] if ccfg else []), "teacher",
               *(["student-init"] if icfg else [])]  # the students are named once known
    runner = StageRunner(manifest, planned, on_change="refuse", refuse_hint=REFUSE_HINT)

    synth = {"n_images": cfg.synth_images, "seed": cfg.data_seed, "image_size": cfg.synth_size,
             "val_fraction": cfg.synth_val_images / cfg.synth_images, "preset": cfg.synth_preset}
    data = runner.run("data", {"data_root": str(root), "synthetic": synth},
                      lambda key: prepare_dataset(DatasetSpec(root, synth)), Dataset)
    shas, n_train = data.shas(), count_images(root / "train.json")
    jobs = []  # the teachers and the student initialisation are independent of each other: side by side
    if ccfg is not None:
        if cfg.control == "blind":
            spec = {"control": "blind", "tag": cfg.control_tag, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
        else:  # the key of the first control ("labels"), unchanged so that its finished studies stay reusable
            spec = {"class": cfg.control_class, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
        defect = DefectSpec(cfg.control, root / "train.json", control_json,
                            cfg.control_tag if cfg.control == "blind" else cfg.control_class, cfg.control_fraction,
                            cfg.data_seed)
        control = runner.run("control-data", {"data": shas["train.json"], **spec},
                             lambda key: make_defective_split(defect), DefectiveSplit)
        jobs.append(_job("teacher-control", training_inputs(ccfg, data={**shas, "train.json": control.train.sha256}),
                         ccfg, val_json, {"kind": "teacher_control"}, "teacher.", training_work(ccfg, n_train), True))
    if tcfg is not None:
        jobs.append(_job("teacher", training_inputs(tcfg, data=shas), tcfg, val_json, {"kind": "teacher"},
                         "teacher.", training_work(tcfg, n_train), True))
    if icfg is not None:
        jobs.append(_job("student-init", training_inputs(icfg, data=shas), icfg, val_json, {"kind": "student_init"},
                         "student_init.", training_work(icfg, n_train), True))
    if tcfg is None:
        given = Artifact.of(cfg.teacher_checkpoint)
        runner.run("teacher", {"given": given.record()}, lambda key: TrainedModel(
            given, evaluate_checkpoint(given.path, val_json, threads=2),
            {"kind": "teacher", "checkpoint": str(given.path), "config": None, "train_s": 0.0}), TrainedModel)
    trained = runner.run_parallel(jobs, cfg.jobs, threads=1)
    teacher = trained.get("teacher") or TrainedModel.from_record(runner.record("teacher"))
    inputs = {"data": shas, "teacher": teacher.checkpoint.sha256}
    init = trained.get("student-init")
    control_teacher = trained.get("teacher-control")
    if init is not None:
        inputs["init"] = init.checkpoint.sha256
    students = student_runs(cfg, teacher.checkpoint.path, init and init.checkpoint.path,
                             control_teacher and control_teacher.checkpoint.path)
    runner.progress.stages += [name for name, _, _ in students]
    log.info("study: %d student runs on %d worker(s)", len(students), cfg.jobs)
    control_sha = control_teacher.checkpoint.sha256 if control_teacher else None
    runner.run_parallel([_job(name, training_inputs(run_cfg, **{**inputs, **(
        {"teacher": control_sha} if meta["kind"] == "control" else {})}), run_cfg, val_json, meta, "student.",
        training_work(run_cfg, n_train)) for name, run_cfg, meta in students], cfg.jobs, threads=1)
    audits = _audits(cfg, runner, students, inputs, control_sha)
    runner.flush()
    teacher_row = {**_strip(runner.record("teacher")),
                   **({"student_init": _strip(runner.record("student-init"))} if init is not None else {}),
                   **({"control": {**_strip(runner.record("teacher-control")),
                                   "corruption": _strip(runner.record("control-data"))}} if ccfg else {})}
    results = [_strip(runner.record(name)) for name, _, _ in students]
    # the config as data with the shipped config files named relative to the package: study.json is committed as a
    # record (docs/measurements/) and must not hold one machine's checkout path
    study = {"format": "gkd-study", "version": 3, "command": command, "config": portable_paths(to_dict(cfg)),
             "machine": machine_summary(), "wall_s": round(time.perf_counter() - t_start, 1), "teacher": teacher_row,
             "runs": results, "audits": audits,
             "levels": level_histogram(root / "train.json", results, students[0][1]) if students else {},
             "invocation": runner.invocation()}
    atomic_write_json(cfg.run_dir / "study.json", study)
    atomic_write_text(cfg.report, render_report(study))
    return study


def _audits(cfg: StudyConfig, runner: Any, students: list[tuple[str, Any, dict]], inputs: dict[str, Any],
            control_sha: str | None) -> dict[str, Any]:
    """The robust-weight audit of the teacher and of the control teacher, each with the config of its first
    `robust` (else `gkd`) run: ``{"main": ..., "control": ...}`` (a teacher without such a run is not audited)."""
    from gkd.kd.distill.audit import Audit, AuditSpec, audit_stage
    from gkd.kd.stage import training_inputs
    from gkd.runner import Job

    jobs = {}
    for kind in ("main", "control"):
        runs = [(name, c, m) for name, c, m in students if m["kind"] == kind and m["method"] in ("robust", "gkd")]
        runs.sort(key=lambda r: (r[2]["method"] != "robust", r[2]["seed"]))
        if not runs:
            continue
        name, run_cfg, _ = runs[0]
        stage = "audit" if kind == "main" else "audit-control"
        keyed = {**inputs, **({"teacher": control_sha} if kind == "control" else {}), "images": cfg.audit_images}
        jobs[kind] = Job(stage, training_inputs(run_cfg, **keyed), audit_stage,
                         lambda key, n, c=run_cfg: AuditSpec(c, cfg.audit_images, 2 if n is None else n), Audit,
                         "student.", f"robust weights of {name}'s start")
    if not jobs:
        return {}
    runner.progress.stages += [j.stage for j in jobs.values()]
    done = runner.run_parallel(list(jobs.values()), cfg.jobs, threads=1)
    return {kind: {**done[job.stage].result, "audit_s": done[job.stage].seconds} for kind, job in jobs.items()}
