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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.study_config import StudyConfig, StudyStageConfigs, control_key, resolve_stage_configs, student_runs
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
    from gkd.core.config import to_dict
    from gkd.kd.data.prepare import Dataset, DatasetSpec, count_images, prepare_dataset
    from gkd.kd.stage import training_inputs, training_work
    from gkd.runner import Manifest, StageRunner

    t_start = time.perf_counter()
    stages = resolve_stage_configs(cfg)  # before anything runs: a bad key or grid costs nothing
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    planned = ["data", *(["control-data", "teacher-control"] if stages.control else []), "teacher",
               *(["student-init"] if stages.init else [])]  # the students are named once known
    runner = StageRunner(Manifest(cfg.run_dir / "manifest.json", to_dict(cfg)), planned, on_change="refuse",
                         refuse_hint=REFUSE_HINT)
    root = Path(cfg.data_root)
    synth = {"n_images": cfg.synth_images, "seed": cfg.data_seed, "image_size": cfg.synth_size,
             "val_fraction": cfg.synth_val_images / cfg.synth_images, "preset": cfg.synth_preset}
    data = runner.run("data", {"data_root": str(root), "synthetic": synth},
                      lambda key: prepare_dataset(DatasetSpec(root, synth)), Dataset)
    shas, n_train = data.shas(), count_images(data.train.path)
    teacher, init, control_teacher = _teachers(cfg, stages, runner, shas, n_train)
    inputs = {"data": shas, "teacher": teacher.checkpoint.sha256,
              **({"init": init.checkpoint.sha256} if init is not None else {})}
    students = student_runs(cfg, teacher.checkpoint.path, init and init.checkpoint.path,
                            control_teacher and control_teacher.checkpoint.path)
    runner.progress.stages += [name for name, _, _ in students]
    log.info("study: %d student runs on %d worker(s)", len(students), cfg.jobs)
    control_sha = control_teacher.checkpoint.sha256 if control_teacher else None
    runner.run_parallel([_job(name, training_inputs(run_cfg, **{**inputs, **(
        {"teacher": control_sha} if meta["kind"] == "control" else {})}), run_cfg, data.val.path, meta, "student.",
        training_work(run_cfg, n_train)) for name, run_cfg, meta in students], cfg.jobs, threads=1)
    audits = _audits(cfg, runner, students, inputs, control_sha)
    runner.flush()
    return _write_study(cfg, stages, runner, students, audits, command, time.perf_counter() - t_start)


def _teachers(cfg: StudyConfig, stages: StudyStageConfigs, runner: Any, shas: dict[str, str],
              n_train: int | None) -> tuple[Any, Any, Any]:
    """The control's defective split, then the teacher, the control teacher and the student initialisation side by
    side (a given teacher is only evaluated): their :class:`gkd.kd.stage.TrainedModel` (None where not asked)."""
    from gkd.bench.stage import evaluate_checkpoint
    from gkd.core.records import Artifact
    from gkd.kd.data.defects import DefectiveSplit, make_defective_split
    from gkd.kd.stage import TrainedModel, training_inputs, training_work

    val = Path(cfg.data_root) / "val.json"
    jobs = []
    if stages.control is not None:
        defect = stages.defect
        control = runner.run("control-data", {"data": shas["train.json"], **control_key(cfg)},
                             lambda key: make_defective_split(defect), DefectiveSplit)
        ccfg = stages.control
        jobs.append(_job("teacher-control", training_inputs(ccfg, data={**shas, "train.json": control.train.sha256}),
                         ccfg, val, {"kind": "teacher_control"}, "teacher.", training_work(ccfg, n_train), True))
    for stage, run_cfg, kind, prefix in (("teacher", stages.teacher, "teacher", "teacher."),
                                         ("student-init", stages.init, "student_init", "student_init.")):
        if run_cfg is not None:
            jobs.append(_job(stage, training_inputs(run_cfg, data=shas), run_cfg, val, {"kind": kind}, prefix,
                             training_work(run_cfg, n_train), True))
    if stages.teacher is None:
        given = Artifact.of(cfg.teacher_checkpoint)
        runner.run("teacher", {"given": given.record()}, lambda key: TrainedModel(
            given, evaluate_checkpoint(given.path, val, threads=2),
            {"kind": "teacher", "checkpoint": str(given.path), "config": None, "train_s": 0.0}), TrainedModel)
    trained = runner.run_parallel(jobs, cfg.jobs, threads=1)
    teacher = trained.get("teacher") or TrainedModel.from_record(runner.record("teacher"))
    return teacher, trained.get("student-init"), trained.get("teacher-control")


def _write_study(cfg: StudyConfig, stages: StudyStageConfigs, runner: Any, students: list[tuple[str, Any, dict]],
                 audits: dict[str, Any], command: str, wall_s: float) -> dict[str, Any]:
    """study.json (the records of every run, as the manifest holds them) and the report."""
    from gkd.bench.stamp import machine_summary
    from gkd.core.config import to_dict
    from gkd.core.io import atomic_write_json, atomic_write_text
    from gkd.kd.distill.levels import level_histogram

    done = runner.manifest.stages
    teacher_row = {**_strip(done["teacher"]),
                   **({"student_init": _strip(done["student-init"])} if stages.init is not None else {}),
                   **({"control": {**_strip(done["teacher-control"]), "corruption": _strip(done["control-data"])}}
                      if stages.control is not None else {})}
    results = [_strip(done[name]) for name, _, _ in students]
    train_json = Path(cfg.data_root) / "train.json"
    # the config as data with the shipped config files named relative to the package: study.json is committed as a
    # record (docs/measurements/) and must not hold one machine's checkout path
    study = {"format": "gkd-study", "version": 3, "command": command, "config": portable_paths(to_dict(cfg)),
             "machine": machine_summary(), "wall_s": round(wall_s, 1), "teacher": teacher_row, "runs": results,
             "audits": audits, "levels": level_histogram(train_json, results, students[0][1]) if students else {},
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
