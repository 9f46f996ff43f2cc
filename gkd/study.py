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

import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import click

from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset
from gkd.study_report import PAPER_TABLES, SUBSETS, portable_paths, render_report

__all__ = ["StudyConfig", "run_study", "study", "SUBSETS", "PAPER_TABLES", "corrupt_labels", "blind_labels",
           "level_histogram", "training_diagnostics"]

log = logging.getLogger("gkd")
STUDY_CONFIG_DIR = CONFIG_DIR / "study"

#: the positive control's defect (see StudyConfig.control)
ControlKind = Literal["labels", "blind"]


@dataclass(frozen=True)
class StudyConfig:
    """What ``gkd study`` runs. ``teacher`` / ``student_init`` / ``student`` are overrides on top of the stage
    configs. The default design (docs/study_notes.md): an independent teacher, scale-aware method settings, a
    positive control, ablations, and a power stated in advance."""

    name: str = "study"
    runs_dir: str = "runs"
    #: its own folder: gkd run's data/synth holds another world (1000 images), and a folder that holds a dataset is
    #: used as it is
    data_root: str = "data/study"
    synth_images: int = 1300
    #: of which this many are the val split (the power statement below needs a large one)
    synth_val_images: int = 500
    synth_size: int = 160
    synth_preset: SynthPreset = "clean"
    data_seed: int = 0
    teacher_config: str = str(STUDY_CONFIG_DIR / "teacher.yaml")
    student_config: str = str(STUDY_CONFIG_DIR / "distill.yaml")
    #: an existing teacher checkpoint to use instead of training one
    teacher_checkpoint: str = ""
    teacher: Any = field(default_factory=dict)
    #: the paper's protocol (docs/method.md, section 3.10): every student starts from the same student,
    #: trained once without distillation for this many epochs with its own seed (`gkd train` with
    #: student_init_config); 0 = from random init
    student_init_epochs: int = 2
    student_init_config: str = str(STUDY_CONFIG_DIR / "student_init.yaml")
    student_init: Any = field(default_factory=dict)
    #: overrides for every student run (the distillation phase), e.g. its schedule
    student: Any = field(default_factory=dict)
    #: the menu's methods, plus "global": `gkd` with the local terms off (fg, bg and soft weights 0), and
    #: "local-soft0.8": `local` with the soft-label weight 0.8 (what uniform robust weights of ~0.8 amount to)
    methods: tuple[str, ...] = ("none", "local", "robust", "gkd", "global", "pkd", "pkd+global", "local-soft0.8")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    #: ablations on the `gkd` method (the default values are the main runs'), on ablation_seeds
    ablation_prototypes: tuple[int, ...] = (1, 5)
    ablation_global_weight: tuple[float, ...] = (1.0, 20.0)
    #: the student's BatchNorm while prototypes are made (the main runs: eval)
    ablation_bn_modes: tuple[str, ...] = ("batch",)
    #: prototypes refreshed every N steps (the main runs: every epoch of 100 steps)
    ablation_refresh_steps: tuple[int, ...] = (25,)
    ablation_seeds: tuple[int, ...] = (0, 1)
    #: positive control: a second teacher (same recipe and seed) trained on a defective copy of the training split,
    #: which the robust module should notice. "labels": control_fraction of class control_class's boxes get another
    #: class's label (a defect of the teacher's classifier); "blind": control_fraction of the boxes tagged
    #: control_tag (small, occluded, blurred) are deleted, so the teacher learns those objects as background (a defect
    #: of its features). control_fraction 0 = no control; control_class "" = the dataset's first class
    control: ControlKind = "labels"
    control_fraction: float = 0.5
    control_class: str = ""
    control_tag: str = "blurred"
    control_methods: tuple[str, ...] = ("local", "robust", "gkd")
    control_seeds: tuple[int, ...] = (0, 1, 2)
    #: the robust-weight audit (gkd.kd.distill.audit) of each teacher at the students' start: the first N training
    #: images (0 = all)
    audit_images: int = 0
    #: the power statement's assumption: the std over seeds of a paired mAP difference, in mAP points (the
    #: lineage-teacher variants measured 0.68 on 160 val images, docs/study_notes.md; 0.4 assumes it shrinks with the
    #: val split)
    design_sd: float = 0.4
    jobs: int = 2
    report: str = "docs/study.md"

    RANGES: ClassVar[dict] = {"synth_val_images": ((">=", 1),), "control_fraction": ((">=", 0), ("<=", 1)),
                              "design_sd": ((">", 0),), "jobs": ((">=", 1),), "student_init_epochs": ((">=", 0),),
                              "audit_images": ((">=", 0),)}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: ``--quick``: the same data and recipes on short schedules (teachers 3 epochs, initialisation 1, students 1),
#: `none`, `local` and `gkd` for one seed, and the positive control with `local` and `gkd`: a real but small study
QUICK_OVERRIDES = (
    "name=study-quick", "teacher.train.epochs=3", "teacher.train.steps=[2]", "student_init_epochs=1",
    "student.train.epochs=1", "methods=[none,local,gkd]", "seeds=[0]", "ablation_prototypes=[]",
    "ablation_global_weight=[]", "ablation_bn_modes=[]", "ablation_refresh_steps=[]", "control_methods=[local,gkd]",
    "control_seeds=[0]", "audit_images=300", "report=runs/study-quick/study.md",
)

#: the study's method names that are not menu entries: name -> (menu method, distill overrides). "local-soft0.8"
#: asks whether `robust` is only a smaller soft-label weight: the foreground loss is normalised by the sum of the
#: weights (uniform weights cancel there), while the soft-label loss is scaled by their mean (~0.8 in `robust`).
STUDY_METHODS = {"global": ("gkd", {"fg_weight": 0.0, "bg_weight": 0.0, "soft_weight": 0.0}),
                 "local-soft0.8": ("local", {"soft_weight": 0.8})}


# ------------------------------------------------------------------------------------------------ the stages


def evaluate_with_subsets(checkpoint: Path, val_json: Path, threads: int = 1) -> dict[str, Any]:
    """COCO metrics of a detector checkpoint on the val split, overall (``all``), on each hard subset, and per class
    (``per_class``: class name -> AP, -1 where the class has no val instance): the product's evaluation
    (``gkd eval``'s protocol, :func:`gkd.bench.accuracy.evaluate_models`)."""
    from gkd.bench.accuracy import evaluate_models

    [result] = evaluate_models([checkpoint], val_json, threads=threads, subsets=SUBSETS,
                               log=log.debug)["models"].values()
    return {"all": result["metrics"], **result["subsets"], "per_class": result["per_class_AP"]}


def training_diagnostics(run_dir: Path) -> dict[str, float]:
    """The method's own measurements over a run (``metrics.jsonl``'s ``train/kd_*`` and ``robust_weight_mean``),
    averaged over its epochs: instances per level and step (``instances_s4``), robust weight means per level and
    per class (``rw_s4``, ``rw_c1``: a logged sum over its logged count), ``global_discrepancy``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    epochs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = sorted({k for e in epochs for k in e if k.startswith("train/kd_") or k == "train/robust_weight_mean"})
    mean = {k[len("train/"):]: statistics.fmean(e.get(k, 0.0) for e in epochs) for k in keys}
    out = {}
    for k, v in mean.items():
        if k.startswith("kd_instances_"):
            out[f"instances_{k[len('kd_instances_'):]}"] = v
        elif k.startswith("kd_rw_sum_"):
            n = mean.get("kd_rw_n_" + k[len("kd_rw_sum_"):], 0.0)
            if n > 0:
                out[f"rw_{k[len('kd_rw_sum_'):]}"] = v / n
        elif k in ("kd_global_discrepancy", "robust_weight_mean"):
            out[k.removeprefix("kd_")] = v
    return out


def _trained(train: Any, run_cfg: Any, val_json: Path, meta: dict[str, Any], progress: bool) -> dict[str, Any]:
    """A study stage: train (``train``: :func:`gkd.stages.train_teacher` or ``train_student``), then evaluate."""
    import time as _time

    t0 = _time.perf_counter()
    record = train(run_cfg, progress)
    train_s = _time.perf_counter() - t0
    metrics = evaluate_with_subsets(Path(record["outputs"]["checkpoint"]["path"]), val_json,
                                    threads=run_cfg.train.threads or 1)
    return {**record, **meta, "run_dir": str(run_cfg.run_dir), "train_s": round(train_s, 1), "metrics": metrics,
            "diagnostics": training_diagnostics(run_cfg.run_dir), "epochs": run_cfg.train.epochs,
            "steps_per_epoch": run_cfg.train.max_steps_per_epoch}


def study_student(run_cfg: Any, val_json: Path, meta: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """One (method, seed) student of the study, trained and evaluated (runs in a worker process)."""
    from gkd.stages import train_student

    return _trained(train_student, run_cfg, val_json, meta, progress)


def study_teacher(run_cfg: Any, val_json: Path, meta: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """A detector trained without a teacher (the teacher, the control teacher, the student initialisation), then
    evaluated (runs in a worker process, or in this one)."""
    from gkd.core.config import to_dict
    from gkd.stages import train_teacher

    return {**_trained(train_teacher, run_cfg, val_json, {**meta, "config": to_dict(run_cfg)}, progress),
            "checkpoint": str(run_cfg.run_dir / "checkpoints" / "model.pt")}


def study_audit(run_cfg: Any, max_images: int, threads: int = 1) -> dict[str, Any]:
    """The robust-weight audit (:func:`gkd.kd.distill.audit.audit_robust_weights`) of ``run_cfg``'s teacher at its
    students' start (runs in a worker process, or in this one)."""
    from gkd.kd.distill.audit import audit_robust_weights

    t0 = time.perf_counter()
    result = audit_robust_weights(run_cfg, max_images=max_images or None, threads=threads)
    return {"audit": result, "audit_s": round(time.perf_counter() - t0, 1), "outputs": {}}


def corrupt_labels(train_json: Path, out_json: Path, class_name: str, fraction: float, seed: int) -> dict[str, Any]:
    """The positive control's training split: ``fraction`` of the annotations of class ``class_name`` ("" = the
    first category) get another class's id, drawn uniformly from the others (seeded); every other annotation and
    every image is as in ``train_json``. Writes ``out_json`` atomically; returns what was changed."""
    import random

    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json

    data = json.loads(train_json.read_text())
    cats = data["categories"]
    names = [c["name"] for c in cats]
    name = class_name or names[0]
    if name not in names:
        raise GkdError(f"control_class: '{name}' is not a class of {train_json}; expected one of {', '.join(names)}")
    target = cats[names.index(name)]["id"]
    others = [c["id"] for c in cats if c["id"] != target]
    rng = random.Random(seed)
    mine = [a for a in data["annotations"] if a["category_id"] == target]
    flipped = rng.sample(range(len(mine)), round(fraction * len(mine))) if others else []
    for i in flipped:
        mine[i]["category_id"] = rng.choice(others)
    atomic_write_json(out_json, data)
    return {"class": name, "category_id": target, "annotations": len(mine), "relabelled": len(flipped)}


def blind_labels(train_json: Path, out_json: Path, tag: str, fraction: float, seed: int) -> dict[str, Any]:
    """The blind positive control's training split: ``fraction`` of the annotations whose ``attributes[tag]`` is
    true (written by ``gkd data synth``: small, occluded, blurred, ...) are deleted, drawn at random (seeded). The
    images stay, so a teacher trained on it learns those objects as background. Writes ``out_json`` atomically;
    returns what was changed (``images_left_empty``: images that lost every box and now teach background only)."""
    import random

    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json

    data = json.loads(train_json.read_text())
    anns = data["annotations"]
    known = sorted({k for a in anns for k, v in (a.get("attributes") or {}).items() if isinstance(v, bool)})
    if tag not in known:
        raise GkdError(f"control_tag: '{tag}' is not a tag of {train_json}'s annotations; expected one of "
                       f"{', '.join(known)}" if known else
                       f"control_tag: {train_json}'s annotations carry no 'attributes' tags; the blind control needs "
                       f"a split made by `gkd data synth` (or annotations with boolean 'attributes')")
    tagged = [i for i, a in enumerate(anns) if (a.get("attributes") or {}).get(tag) is True]
    deleted = set(random.Random(seed).sample(tagged, round(fraction * len(tagged))))
    before = {a["image_id"] for a in anns}
    data["annotations"] = [a for i, a in enumerate(anns) if i not in deleted]
    after = {a["image_id"] for a in data["annotations"]}
    atomic_write_json(out_json, data)
    return {"kind": "blind", "tag": tag, "annotations": len(tagged), "deleted": len(deleted),
            "images_left_empty": len(before - after)}


def _run_name(method: str) -> str:
    return method.replace("+", "_")


def _student_runs(cfg: StudyConfig, teacher_ckpt: Path, init_ckpt: Path | None,
                  control_ckpt: Path | None) -> list[tuple[str, Any, dict]]:
    """``(stage name, resolved run config, meta)`` of every student run: the main grid, the ablations, then the
    positive control's runs (the control teacher)."""
    from gkd.core.config import merge_dicts
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import DistillRunConfig

    def teacher(path: Path) -> dict:
        # the study made (or was given) the teacher: its checkpoint records its own architecture
        return {"distill": {"teacher": {"checkpoint": str(path), "arch": None, "backbone": None}}}

    def method(m: str) -> dict:
        menu, extra = STUDY_METHODS.get(m, (m, {}))
        return {"distill": {"method": menu, **extra}}

    base = merge_dicts({
        "runs_dir": str(cfg.run_dir / "students"), "data": {"root": cfg.data_root}, "train": {"threads": 1},
        **({"model": {"weights": str(init_ckpt)}} if init_ckpt is not None else {})}, cfg.student)
    grid = [(f"{_run_name(m)}-s{seed}", seed, merge_dicts(teacher(teacher_ckpt), method(m)),
             {"kind": "main", "method": m, "seed": seed}) for seed in cfg.seeds for m in cfg.methods]
    gkd = merge_dicts(teacher(teacher_ckpt), method("gkd"))
    ablations = ([(f"gkd-protos{k}", {"pgm": {"num_prototypes": k}}, {"num_prototypes": k})
                  for k in cfg.ablation_prototypes] +
                 [(f"gkd-gw{w:g}", {"global_weight": w}, {"global_weight": w}) for w in cfg.ablation_global_weight] +
                 [(f"gkd-bn{b}", {"pgm": {"bn_mode": b}}, {"bn_mode": b}) for b in cfg.ablation_bn_modes] +
                 [(f"gkd-every{n}", {"pgm": {"interval_steps": n}}, {"refresh_steps": n})
                  for n in cfg.ablation_refresh_steps])
    for seed in cfg.ablation_seeds:
        grid += [(f"{name}-s{seed}", seed, merge_dicts(gkd, {"distill": extra}),
                  {"kind": "ablation", "method": "gkd", "seed": seed, "variant": name, **meta})
                 for name, extra, meta in ablations]
    if control_ckpt is not None:
        grid += [(f"control-{_run_name(m)}-s{seed}", seed, merge_dicts(teacher(control_ckpt), method(m)),
                  {"kind": "control", "method": m, "seed": seed})
                 for seed in cfg.control_seeds for m in cfg.control_methods]
    return [(name, load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.",
                               updates=merge_dicts(merge_dicts(base, extra), {"name": name, "seed": seed})), meta)
            for name, seed, extra, meta in grid]


# ------------------------------------------------------------------------------------------------ the study

#: what a refused stage tells the user (a study never mixes runs of two designs in one table)
REFUSE_HINT = ": give the study a new name=, or delete that folder"


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("inputs", "command")}


def _check_grid(cfg: StudyConfig) -> None:
    """Refuse, before anything runs, a grid with an unknown method or without a seed."""
    from gkd.core.errors import GkdError
    from gkd.kd.distill.config import METHODS

    known = list(METHODS) + list(STUDY_METHODS)
    for key in ("methods", "control_methods"):
        bad = [m for m in getattr(cfg, key) if m not in known]
        if bad:
            raise GkdError(f"{key}: unknown method '{bad[0]}'; expected some of {', '.join(known)}")
    if not cfg.methods:
        raise GkdError("methods: empty; expected at least one method, e.g. methods=[none,gkd]")
    if not cfg.seeds:
        raise GkdError("seeds: empty; expected at least one seed, e.g. seeds=[0]")


def run_study(cfg: StudyConfig, command: str = "") -> dict[str, Any]:
    """Data -> (teacher, control teacher, student initialisation: side by side) -> every student run -> report.

    The stages are gkd run's (:mod:`gkd.stages`), in ``runs/<name>/manifest.json``: a rerun reuses every stage
    whose key is unchanged and resumes an interrupted one; a stage whose key changed is refused with a one-line
    error (a new design gets a new name). Returns study.json."""
    from gkd.core.config import merge_dicts, to_dict
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json, atomic_write_text
    from gkd.kd.config import load_config
    from gkd.stages import (Job, Manifest, StageRunner, artifact, data_stage, output_sha, train_images, training_inputs,
                            training_work, with_threads)

    t_start = time.perf_counter()
    root = Path(cfg.data_root)
    val_json = root / "val.json"
    if cfg.synth_val_images >= cfg.synth_images:
        raise GkdError(f"synth_val_images is {cfg.synth_val_images}; expected fewer than synth_images "
                       f"({cfg.synth_images}): the rest is the training split")
    _check_grid(cfg)
    fixed = {"runs_dir": str(cfg.run_dir), "data": {"root": cfg.data_root}}
    tcfg = None if cfg.teacher_checkpoint else load_config(
        cfg.teacher_config, key_prefix="teacher.", updates=merge_dicts(cfg.teacher, {**fixed, "name": "teacher"}))
    icfg = None if cfg.student_init_epochs <= 0 else load_config(
        cfg.student_init_config, key_prefix="student_init.", updates=merge_dicts(cfg.student_init, {
            **fixed, "name": "student-init",
            "train": {"epochs": cfg.student_init_epochs, "max_steps_per_epoch": None, "steps": []}}))
    control_json = cfg.run_dir / "control" / "train.json"
    ccfg = None if cfg.control_fraction <= 0 or not cfg.control_methods else load_config(
        cfg.teacher_config, key_prefix="teacher.", updates=merge_dicts(cfg.teacher, {
            **fixed, "name": "teacher-control",
            "data": {"root": cfg.data_root, "train": os.path.relpath(control_json, root)}}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    planned = ["data", *(["control-data", "teacher-control"] if ccfg else []), "teacher",
               *(["student-init"] if icfg else [])]  # the students are named once known
    runner = StageRunner(manifest, planned, on_change="refuse", refuse_hint=REFUSE_HINT)

    synth = {"n_images": cfg.synth_images, "seed": cfg.data_seed, "image_size": cfg.synth_size,
             "val_fraction": cfg.synth_val_images / cfg.synth_images, "preset": cfg.synth_preset}
    data = runner.run("data", {"data_root": str(root), "synthetic": synth}, lambda: data_stage(root, synth))
    data_shas = {"train.json": output_sha(data, "train"), "val.json": output_sha(data, "val")}
    n_train = train_images(root / "train.json")
    control = None
    if ccfg is not None:
        if cfg.control == "blind":
            spec = {"control": "blind", "tag": cfg.control_tag, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
            make = lambda: blind_labels(root / "train.json", control_json, cfg.control_tag,  # noqa: E731
                                        cfg.control_fraction, cfg.data_seed)
        else:  # the key of the first control ("labels"), unchanged so that its finished studies stay reusable
            spec = {"class": cfg.control_class, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
            make = lambda: corrupt_labels(root / "train.json", control_json, cfg.control_class,  # noqa: E731
                                          cfg.control_fraction, cfg.data_seed)
        control = runner.run("control-data", {"data": data_shas["train.json"], **spec},
                             lambda: {**make(), "outputs": {"train": artifact(control_json)}})

    # the teachers and the student initialisation are independent of each other: side by side
    jobs = []
    if ccfg is not None:
        jobs.append(Job("teacher-control", training_inputs(ccfg, data={**data_shas, "train.json": output_sha(
            control, "train")}), study_teacher, (ccfg, val_json, {"kind": "teacher_control"}, True), "teacher.",
            training_work(ccfg, n_train), threads=lambda n, c=ccfg: (with_threads(c, n), val_json,
                                                                      {"kind": "teacher_control"})))
    if tcfg is not None:
        jobs.append(Job("teacher", training_inputs(tcfg, data=data_shas), study_teacher,
                        (tcfg, val_json, {"kind": "teacher"}, True), "teacher.", training_work(tcfg, n_train),
                        threads=lambda n, c=tcfg: (with_threads(c, n), val_json, {"kind": "teacher"})))
    if icfg is not None:
        jobs.append(Job("student-init", training_inputs(icfg, data=data_shas), study_teacher,
                        (icfg, val_json, {"kind": "student_init"}, True), "student_init.",
                        training_work(icfg, n_train),
                        threads=lambda n, c=icfg: (with_threads(c, n), val_json, {"kind": "student_init"})))
    if tcfg is None:
        path = Path(cfg.teacher_checkpoint)
        given = runner.run("teacher", {"given": artifact(path)}, lambda: {
            "outputs": {"checkpoint": artifact(path)}, "kind": "teacher", "checkpoint": str(path), "config": None,
            "train_s": 0.0, "metrics": evaluate_with_subsets(path, val_json, threads=2)})
    trained = runner.run_parallel(jobs, cfg.jobs, threads=1)
    teacher = given if tcfg is None else trained["teacher"]
    teacher_ckpt = Path(teacher["outputs"]["checkpoint"]["path"])
    inputs = {"data": data_shas, "teacher": output_sha(teacher, "checkpoint")}
    init_ckpt = control_ckpt = None
    teacher = _strip(teacher)
    if icfg is not None:
        init_ckpt = Path(trained["student-init"]["outputs"]["checkpoint"]["path"])
        inputs["init"] = output_sha(trained["student-init"], "checkpoint")
        teacher["student_init"] = _strip(trained["student-init"])
    if ccfg is not None:
        control_ckpt = Path(trained["teacher-control"]["outputs"]["checkpoint"]["path"])
        teacher["control"] = {**_strip(trained["teacher-control"]), "corruption": _strip(control)}

    students = _student_runs(cfg, teacher_ckpt, init_ckpt, control_ckpt)
    runner.progress.stages += [name for name, _, _ in students]
    log.info("study: %d student runs on %d worker(s)", len(students), cfg.jobs)
    control_sha = output_sha(trained["teacher-control"], "checkpoint") if ccfg is not None else None
    records = runner.run_parallel(
        [Job(name, training_inputs(run_cfg, **{**inputs, **({"teacher": control_sha} if meta["kind"] == "control"
                                                             else {})}),
             study_student, (run_cfg, val_json, meta), "student.", training_work(run_cfg, n_train),
             threads=lambda n, c=run_cfg, m=meta: (with_threads(c, n), val_json, m))
         for name, run_cfg, meta in students], cfg.jobs, threads=1)
    audits = _audits(cfg, runner, students, inputs, control_sha)
    runner.flush()
    results = [_strip(r) for r in records.values()]
    wall = time.perf_counter() - t_start
    # the config as data with the shipped config files named relative to the package: study.json is committed as a
    # record (docs/measurements/) and must not hold one machine's checkout path
    study = {"format": "gkd-study", "version": 3, "command": command, "config": portable_paths(to_dict(cfg)),
             "machine": _machine(), "wall_s": round(wall, 1), "teacher": teacher, "runs": results,
             "audits": audits,
             "levels": level_histogram(root / "train.json", results, students[0][1]) if students else {},
             "invocation": runner.invocation()}
    atomic_write_json(cfg.run_dir / "study.json", study)
    atomic_write_text(cfg.report, render_report(study))
    return study


def _audits(cfg: StudyConfig, runner: Any, students: list[tuple[str, Any, dict]], inputs: dict[str, Any],
            control_sha: str | None) -> dict[str, Any]:
    """The robust-weight audit of the teacher and of the control teacher, each with the config of its first
    `robust` (else `gkd`) run: ``{"main": ..., "control": ...}`` (a teacher without such a run is not audited)."""
    from gkd.stages import Job, training_inputs

    jobs = {}
    for kind in ("main", "control"):
        runs = [(name, c, m) for name, c, m in students if m["kind"] == kind and m["method"] in ("robust", "gkd")]
        runs.sort(key=lambda r: (r[2]["method"] != "robust", r[2]["seed"]))
        if not runs:
            continue
        name, run_cfg, _ = runs[0]
        stage = "audit" if kind == "main" else "audit-control"
        keyed = {**inputs, **({"teacher": control_sha} if kind == "control" else {}), "images": cfg.audit_images}
        jobs[kind] = Job(stage, training_inputs(run_cfg, **keyed), study_audit, (run_cfg, cfg.audit_images, 2),
                         "student.", f"robust weights of {name}'s start",
                         threads=lambda n, c=run_cfg: (c, cfg.audit_images, n))
    if not jobs:
        return {}
    runner.progress.stages += [j.stage for j in jobs.values()]
    done = runner.run_parallel(list(jobs.values()), cfg.jobs, threads=1)
    return {kind: {**done[job.stage]["audit"], "audit_s": done[job.stage].get("audit_s")} for kind, job in jobs.items()}


def level_histogram(train_json: Path, runs: list[dict[str, Any]], run_cfg: Any) -> dict[str, Any]:
    """How the level rule spreads the training split's boxes over the distilled levels (finest first), under the
    canonical size of the student runs (``run_cfg``'s, resolved for its input size) and under mmdet's 56 px:
    ``{"canonical", "levels", "gt", "gt_at_56", "positives_per_step"}``, the last the positive RoIs per step and
    level that a main `gkd` run logged."""
    import torch

    from gkd.kd.distill.config import resolve_scale
    from gkd.kd.distill.levels import assign_levels

    canonical = resolve_scale(run_cfg.distill, run_cfg.model.min_size).level_canonical_size
    data = json.loads(train_json.read_text())
    # the detector's resize: the short side to min_size, unless the long side would pass max_size
    scale = {im["id"]: min(run_cfg.model.min_size / min(im["height"], im["width"]),
                           run_cfg.model.max_size / max(im["height"], im["width"])) for im in data["images"]}
    boxes = torch.tensor([[0.0, 0.0, a["bbox"][2] * scale[a["image_id"]], a["bbox"][3] * scale[a["image_id"]]]
                          for a in data["annotations"]]).reshape(-1, 4)
    diag = next((r.get("diagnostics", {}) for r in runs if r.get("method") == "gkd" and r.get("kind") == "main"), {})
    levels = sorted((k[len("instances_"):] for k in diag if k.startswith("instances_")), key=lambda k: int(k[1:]))
    n = len(levels) or 5
    count = lambda c: torch.bincount(assign_levels(boxes, n, c), minlength=n).tolist()  # noqa: E731
    return {"canonical": canonical, "levels": levels or [f"level {i}" for i in range(n)], "gt": count(canonical),
            "gt_at_56": count(56.0), "positives_per_step": {k: diag[f"instances_{k}"] for k in levels}}


def _machine() -> dict[str, Any]:
    import torch

    from gkd.bench.stamp import cpu_name

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": cpu_name(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


@click.command("study")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A small version (<= 20 minutes on 2 cores) to try the study out.")
def study(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Compare every distillation method on the embedded dataset, over several seeds, with ablations.

    \b
    Trains the teacher once, then a student per (method, seed) on an identical schedule, evaluates each on the val
    split (overall and on small / occluded / blurred objects) and writes a Markdown table in the paper's shape
    (docs/study.md by default) plus runs/<name>/study.json. Rerunning continues an interrupted study; a cached
    run made with another config is refused (use a new name=). Deltas are paired by seed.

    \b
    Examples:
      gkd study --quick
      gkd study seeds=[0,1,2] jobs=2
      gkd study methods=[none,gkd] seeds=[0] teacher_checkpoint=runs/teacher/checkpoints/best.pt
      gkd study name=study-blind control=blind control_fraction=1   # a control teacher blind to blurred objects
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.logs import setup_console_logging
    from gkd.kd.config import load_config

    setup_console_logging()
    config, rest = split_config_and_overrides(config, overrides)
    cfg = load_config(config, (list(QUICK_OVERRIDES) if quick else []) + rest, cls=StudyConfig)
    result = run_study(cfg, command=" ".join(["gkd", *sys.argv[1:]]))
    click.echo(f"wrote {cfg.report} and {cfg.run_dir / 'study.json'} ({result['wall_s'] / 60:.1f} min)")
