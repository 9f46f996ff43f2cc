"""``gkd study``: a reproducible distillation study in the shape of the paper's tables, at CPU scale.

One teacher, then the student with each method of the menu on an identical schedule (same number of updates, same
data order and student initialisation per seed: only the distillation differs), for several seeds; each student
is evaluated on the same val split, overall and on the hard subsets the synthetic generator tags (small, occluded,
blurred objects). Ablations: prototypes per class and the global-loss weight. Everything lands in
``runs/<name>/study.json`` and a Markdown report (``docs/study.md`` by default) with the exact command, the config,
the machine and the wall time.

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
from typing import Any

import click
from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset

__all__ = ["StudyConfig", "run_study", "study", "SUBSETS", "PAPER_TABLES"]

log = logging.getLogger("gkd")
STUDY_CONFIG_DIR = CONFIG_DIR / "study"

#: hard subsets: name -> annotation attribute (written by `gkd data synth`)
SUBSETS = ("small", "occluded", "blurred")

#: The authors' COCO val2017 numbers (ECCV 2022, from their README; method.md section 5.1). Theirs, not ours.
PAPER_TABLES = {
    "Faster R-CNN R101 -> R50 (2x)": [("Teacher R101", 39.8, 60.1, 43.3), ("Student R50", 38.4, 59.0, 42.0),
                                      ("FGFI", 39.3, 59.8, 42.9), ("DeFeat", 40.3, 60.9, 44.0),
                                      ("FBKD", 40.2, 60.4, 43.6), ("GID", 40.2, 60.8, 43.6),
                                      ("Global knowledge (ours in the paper)", 40.6, 61.0, 44.0)],
    "RetinaNet R101 -> R50 (2x)": [("Teacher R101", 38.9, 58.0, 41.5), ("Student R50", 37.4, 56.7, 39.6),
                                   ("FGFI", 38.6, 58.7, 41.3), ("DeFeat", 39.3, 58.2, 42.1),
                                   ("FBKD", 39.3, 58.3, 42.3), ("GID", 39.1, 59.0, 42.3), ("PFI", 39.6, None, None),
                                   ("Global knowledge (ours in the paper)", 39.8, 58.6, 42.6)],
}


@dataclass(frozen=True)
class StudyConfig:
    """What ``gkd study`` runs. ``teacher`` / ``student`` are overrides on top of the stage configs."""

    name: str = "study"
    runs_dir: str = "runs"
    #: its own folder: gkd run's data/synth holds another world (clean, 1000 images), and a folder that holds a
    #: dataset is used as it is
    data_root: str = "data/study"
    synth_images: int = 800
    synth_size: int = 160
    #: the study's designs so far ran on the first (cluttered) world; kept so that their numbers reproduce
    synth_preset: SynthPreset = "cluttered"
    data_seed: int = 0
    teacher_config: str = str(STUDY_CONFIG_DIR / "teacher.yaml")
    student_config: str = str(STUDY_CONFIG_DIR / "distill.yaml")
    #: an existing teacher checkpoint to use instead of training one
    teacher_checkpoint: str = ""
    teacher: Any = field(default_factory=dict)
    #: the paper's protocol (method.md G7): every student starts from the same converged-ish student, trained once
    #: without distillation for this many epochs (`gkd train` with student_init_config); 0 = from random init
    student_init_epochs: int = 3
    student_init_config: str = str(STUDY_CONFIG_DIR / "student_init.yaml")
    student_init: Any = field(default_factory=dict)
    #: overrides for every student run (the distillation phase), e.g. its schedule
    student: Any = field(default_factory=dict)
    methods: tuple[str, ...] = ("none", "local", "robust", "gkd", "pkd", "pkd+global")
    seeds: tuple[int, ...] = (0, 1, 2)
    #: ablations on the `gkd` method (the default values are the main runs)
    ablation_prototypes: tuple[int, ...] = (1, 5)
    ablation_global_weight: tuple[float, ...] = (1.0, 20.0)
    ablation_seeds: tuple[int, ...] = (0,)
    jobs: int = 2
    report: str = "docs/study.md"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: ``--quick``: the same data and teacher recipe on a 640-step schedule (half the teacher's), one epoch of student
#: initialisation, then `none`, `local` and `gkd` for one seed, one epoch each: a real but small comparison
QUICK_OVERRIDES = (
    "name=study-quick", "teacher.train.epochs=8", "teacher.train.steps=[6,7]", "student_init_epochs=1",
    "student.train.epochs=1", "methods=[none,local,gkd]", "seeds=[0]", "ablation_prototypes=[]",
    "ablation_global_weight=[]", "report=runs/study-quick/study.md",
)


# ------------------------------------------------------------------------------------------------ the stages


def evaluate_with_subsets(checkpoint: Path, val_json: Path, threads: int = 1) -> dict[str, Any]:
    """COCO metrics of a detector checkpoint on the val split, overall (``all``) and on each hard subset: the
    product's evaluation (``gkd eval``'s protocol, :func:`gkd.bench.accuracy.evaluate_models`)."""
    from gkd.bench.accuracy import evaluate_models

    [result] = evaluate_models([checkpoint], val_json, threads=threads, subsets=SUBSETS,
                               log=log.debug)["models"].values()
    return {"all": result["metrics"], **result["subsets"]}


def _trained(train: Any, run_cfg: Any, val_json: Path, meta: dict[str, Any], progress: bool) -> dict[str, Any]:
    """A study stage: train (``train``: :func:`gkd.stages.train_teacher` or ``train_student``), then evaluate."""
    import time as _time

    t0 = _time.perf_counter()
    record = train(run_cfg, progress)
    train_s = _time.perf_counter() - t0
    metrics = evaluate_with_subsets(Path(record["outputs"]["checkpoint"]["path"]), val_json,
                                    threads=run_cfg.train.threads or 1)
    return {**record, **meta, "run_dir": str(run_cfg.run_dir), "train_s": round(train_s, 1), "metrics": metrics,
            "epochs": run_cfg.train.epochs, "steps_per_epoch": run_cfg.train.max_steps_per_epoch}


def study_student(run_cfg: Any, val_json: Path, meta: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """One (method, seed) student of the study, trained and evaluated (runs in a worker process)."""
    from gkd.stages import train_student

    return _trained(train_student, run_cfg, val_json, meta, progress)


def _student_runs(cfg: StudyConfig, teacher_ckpt: Path, init_ckpt: Path | None) -> list[tuple[str, Any, dict]]:
    """``(stage name, resolved run config, meta)`` of every student run: the main grid, then the ablations."""
    from gkd.kd.config import load_config, merge_dicts
    from gkd.kd.distill.config import DistillRunConfig

    base = merge_dicts({
        "runs_dir": str(cfg.run_dir / "students"), "data": {"root": cfg.data_root}, "train": {"threads": 1},
        # the study made (or was given) the teacher: its checkpoint records its own architecture
        "distill": {"teacher": {"checkpoint": str(teacher_ckpt), "arch": None, "backbone": None}},
        **({"model": {"weights": str(init_ckpt)}} if init_ckpt is not None else {})}, cfg.student)
    grid = [(f"{m.replace('+', '_')}-s{seed}", seed, {"distill": {"method": m}},
             {"kind": "main", "method": m, "seed": seed}) for seed in cfg.seeds for m in cfg.methods]
    for seed in cfg.ablation_seeds:
        grid += [(f"gkd-protos{k}-s{seed}", seed, {"distill": {"method": "gkd", "pgm": {"num_prototypes": k}}},
                  {"kind": "ablation", "method": "gkd", "seed": seed, "num_prototypes": k})
                 for k in cfg.ablation_prototypes]
        grid += [(f"gkd-gw{w:g}-s{seed}", seed, {"distill": {"method": "gkd", "global_weight": w}},
                  {"kind": "ablation", "method": "gkd", "seed": seed, "global_weight": w})
                 for w in cfg.ablation_global_weight]
    return [(name, load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.",
                               updates=merge_dicts(base, {**extra, "name": name, "seed": seed})), meta)
            for name, seed, extra, meta in grid]


# ------------------------------------------------------------------------------------------------ the study

#: what a refused stage tells the user (a study never mixes runs of two designs in one table)
REFUSE_HINT = ": give the study a new name=, or delete that folder"


def run_study(cfg: StudyConfig, command: str = "") -> dict[str, Any]:
    """Data -> teacher -> student initialisation -> every (method, seed) student + ablations -> report.

    The stages are gkd run's (:mod:`gkd.stages`), in ``runs/<name>/manifest.json``: a rerun reuses every stage
    whose key is unchanged and resumes an interrupted one; a stage whose key changed is refused with a one-line
    error (a new design gets a new name). Returns study.json."""
    from gkd.kd.config import load_config, merge_dicts, to_dict
    from gkd.kd.io import atomic_write_json, atomic_write_text
    from gkd.stages import (Job, Manifest, StageRunner, artifact, data_stage, output_sha, train_images,
                            train_teacher, training_inputs, training_work, with_threads)

    t_start = time.perf_counter()
    root = Path(cfg.data_root)
    val_json = root / "val.json"
    fixed = {"runs_dir": str(cfg.run_dir), "data": {"root": cfg.data_root}}
    tcfg = None if cfg.teacher_checkpoint else load_config(
        cfg.teacher_config, key_prefix="teacher.", updates=merge_dicts(cfg.teacher, {**fixed, "name": "teacher"}))
    icfg = None if cfg.student_init_epochs <= 0 else load_config(
        cfg.student_init_config, key_prefix="student_init.", updates=merge_dicts(cfg.student_init, {
            **fixed, "name": "student-init",
            "train": {"epochs": cfg.student_init_epochs, "max_steps_per_epoch": None, "steps": []}}))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    planned = ["data", "teacher", *(["student-init"] if icfg else [])]  # the students are named once known
    runner = StageRunner(manifest, planned, on_change="refuse", refuse_hint=REFUSE_HINT)

    synth = {"n_images": cfg.synth_images, "seed": cfg.data_seed, "image_size": cfg.synth_size,
             "val_fraction": 0.2, "preset": cfg.synth_preset}
    data = runner.run("data", {"data_root": str(root), "synthetic": synth}, lambda: data_stage(root, synth))
    data_shas = {"train.json": output_sha(data, "train"), "val.json": output_sha(data, "val")}
    n_train = train_images(root / "train.json")
    if tcfg is None:
        path = Path(cfg.teacher_checkpoint)
        teacher = runner.run("teacher", {"given": artifact(path)}, lambda: {
            "outputs": {"checkpoint": artifact(path)}, "kind": "teacher", "checkpoint": str(path), "config": None,
            "train_s": 0.0, "metrics": evaluate_with_subsets(path, val_json, threads=2)})
    else:
        teacher = runner.run("teacher", training_inputs(tcfg, data=data_shas), lambda: {
            **_trained(train_teacher, tcfg, val_json, {"kind": "teacher", "config": to_dict(tcfg)}, True),
            "checkpoint": str(tcfg.run_dir / "checkpoints" / "model.pt")}, "teacher.", training_work(tcfg, n_train))
    teacher_ckpt = Path(teacher["outputs"]["checkpoint"]["path"])
    inputs = {"data": data_shas, "teacher": output_sha(teacher, "checkpoint")}
    init_ckpt = None
    teacher = {k: v for k, v in teacher.items() if k not in ("inputs", "command")}
    if icfg is not None:
        init = runner.run("student-init", training_inputs(icfg, data=data_shas), lambda: {
            **_trained(train_teacher, icfg, val_json, {"kind": "student_init", "config": to_dict(icfg)}, True),
            "checkpoint": str(icfg.run_dir / "checkpoints" / "model.pt")}, "student_init.",
            training_work(icfg, n_train))
        init_ckpt = Path(init["outputs"]["checkpoint"]["path"])
        inputs["init"] = output_sha(init, "checkpoint")
        teacher["student_init"] = {k: v for k, v in init.items() if k not in ("inputs", "command")}

    students = _student_runs(cfg, teacher_ckpt, init_ckpt)
    runner.progress.stages += [name for name, _, _ in students]
    log.info("study: %d student runs on %d worker(s)", len(students), cfg.jobs)
    records = runner.run_parallel(
        [Job(name, training_inputs(run_cfg, **inputs), study_student, (run_cfg, val_json, meta), "student.",
             training_work(run_cfg, n_train), threads=lambda n, c=run_cfg, m=meta: (with_threads(c, n), val_json, m))
         for name, run_cfg, meta in students], cfg.jobs, threads=1)
    runner.flush()
    results = [{k: v for k, v in r.items() if k not in ("inputs", "command")} for r in records.values()]
    wall = time.perf_counter() - t_start
    study = {"format": "gkd-study", "version": 2, "command": command, "config": to_dict(cfg),
             "machine": _machine(), "wall_s": round(wall, 1), "teacher": teacher, "runs": results,
             "invocation": runner.invocation()}
    atomic_write_json(cfg.run_dir / "study.json", study)
    atomic_write_text(cfg.report, render_report(study))
    return study


def _machine() -> dict[str, Any]:
    import torch

    from gkd.bench.stamp import cpu_name

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": cpu_name(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------------ report


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and v >= 0]
    if not values:
        return -1.0, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired_delta(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[float, float, int] | None:
    """Mean and std over seeds of (this method's mAP - the reference method's mAP) at the same seed.

    Runs of one seed share the initialisation, data order and augmentation, so the per-seed difference removes the
    seed-to-seed variation both methods share; its std is the spread that a claimed gain has to beat.
    Returns None when the two methods share no seed."""
    ref = {r["seed"]: r["metrics"]["all"]["bbox_mAP"] for r in reference}
    diffs = [r["metrics"]["all"]["bbox_mAP"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
    if not diffs:
        return None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), len(diffs)


def summarize(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of the main runs: mean and std over seeds of each metric (in [0, 1]), and the paired
    per-seed mAP difference to `none` and to `local` (``vs_none`` / ``vs_local``: mean, std, number of seeds)."""
    rows = []
    main = [r for r in study["runs"] if r.get("kind") == "main"]
    methods = [m for m in study["config"]["methods"] if any(r["method"] == m for r in main)]
    by_method = {m: [r for r in main if r["method"] == m] for m in methods}
    for method in methods:
        runs = by_method[method]
        row = {"method": method, "seeds": sorted(r["seed"] for r in runs)}
        for key, (subset, metric) in {"mAP": ("all", "bbox_mAP"), "AP50": ("all", "bbox_mAP_50"),
                                      "AP75": ("all", "bbox_mAP_75"),
                                      **{f"AP_{s}": (s, "bbox_mAP") for s in SUBSETS}}.items():
            row[key] = _mean_std([r["metrics"][subset][metric] for r in runs])
        for ref in ("none", "local"):
            row[f"vs_{ref}"] = None if method == ref else _paired_delta(runs, by_method.get(ref, []))
        rows.append(row)
    return rows


def _delta_cell(delta: tuple[float, float, int] | None) -> str:
    if delta is None:
        return "-"
    mean, std, n = delta
    return f"{100 * mean:+.1f}" + (f" +- {100 * std:.1f}" if n > 1 else "")


def _init_line(study: dict[str, Any]) -> list[str]:
    init = study["teacher"].get("student_init")
    if not init:
        return ["Every student starts from random initialisation.", ""]
    m = init["metrics"]["all"]
    return [f"Every student starts from the same student trained without distillation for "
            f"{init['config']['train']['epochs']} epochs ({_pct(m['bbox_mAP'])} mAP, {_pct(m['bbox_mAP_50'])} AP50), "
            f"as the paper fine-tunes converged students (method.md G7); `none` is that student trained for the same "
            f"extra steps without distillation.", ""]


def _stage_times_line(study: dict[str, Any]) -> list[str]:
    """Each stage's own time, also for stages a rerun reused: the wall time above is one invocation's only."""
    runs = [r for r in study["runs"] if "train_s" in r]
    if "train_s" not in study["teacher"] or not runs:
        return []
    init = study["teacher"].get("student_init")
    teacher = ("teacher given as a checkpoint (evaluated in {:.1f} min)" if study["config"].get("teacher_checkpoint")
               else "teacher {:.1f} min").format(study["teacher"]["train_s"] / 60)
    parts = [teacher, *([f"student initialisation {init['train_s'] / 60:.1f} min"] if init else []),
             f"{len(runs)} student runs {sum(r['train_s'] for r in runs) / 60:.1f} min in all "
             f"({study['config'].get('jobs', 1)} at a time)"]
    return ["Stage times, each measured when it ran (a rerun reuses finished stages, and the time above counts only "
            "its own invocation): " + ", ".join(parts) + ".", ""]


def render_report(study: dict[str, Any]) -> str:
    """The Markdown report: our table (mean +- std over seeds), ablations, the paper's numbers, provenance."""
    rows = summarize(study)
    t = study["teacher"]["metrics"]
    cfg = study["config"]
    lines = ["# Distillation study on the embedded synthetic dataset", "",
             f"Generated by `{study['command'] or 'gkd study'}` in {study['wall_s'] / 60:.1f} min on "
             f"{study['machine']['processor']} ({study['machine']['cpus']} CPUs, torch {study['machine']['torch']}).",
             "COCO box AP (%) on the val split; mean +- std over seeds " + ", ".join(map(str, cfg["seeds"])) +
             "; every student run has the same schedule, data order and initialisation for a given seed.",
             "The deltas are paired: the mean +- std over seeds of (method - reference) at the same seed.", "",
             *_stage_times_line(study),
             f"Teacher: {_pct(t['all']['bbox_mAP'])} mAP, {_pct(t['all']['bbox_mAP_50'])} AP50, "
             f"{_pct(t['all']['bbox_mAP_75'])} AP75 (small {_pct(t['small']['bbox_mAP'])}, occluded "
             f"{_pct(t['occluded']['bbox_mAP'])}, blurred {_pct(t['blurred']['bbox_mAP'])}).", "",
             *_init_line(study), 
             "| method | mAP | AP50 | AP75 | delta vs none | delta vs local | AP small | AP occluded | AP blurred |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * m:.1f} +- {100 * s:.1f}" if m >= 0 else "n/a"
                 for m, s in (r["mAP"], r["AP50"], r["AP75"])]
        subs = [f"{100 * r[f'AP_{s}'][0]:.1f} +- {100 * r[f'AP_{s}'][1]:.1f}" if r[f"AP_{s}"][0] >= 0 else "n/a"
                for s in SUBSETS]
        lines.append(f"| {r['method']} | {' | '.join(cells)} | {_delta_cell(r['vs_none'])} | "
                     f"{_delta_cell(r['vs_local'])} | {' | '.join(subs)} |")
    abl = [r for r in study["runs"] if r.get("kind") == "ablation"]
    if abl:
        lines += ["", "Ablations of `gkd` (seed " + ", ".join(map(str, cfg["ablation_seeds"])) +
                  "; the main runs use 10 prototypes per class and global weight 5):", "",
                  "| variant | seed | mAP | AP50 | AP small | AP occluded |", "|---|---|---|---|---|---|"]
        for r in sorted(abl, key=lambda r: (str(r.get("num_prototypes", "")), r.get("global_weight", 0))):
            name = (f"{r['num_prototypes']} prototypes per class" if "num_prototypes" in r
                    else f"global weight {r['global_weight']:g}")
            m = r["metrics"]
            lines.append(f"| {name} | {r['seed']} | {_pct(m['all']['bbox_mAP'])} | {_pct(m['all']['bbox_mAP_50'])} "
                         f"| {_pct(m['small']['bbox_mAP'])} | {_pct(m['occluded']['bbox_mAP'])} |")
    lines += ["", "What these numbers mean, why `gkd` does or does not beat `local` here, and what was tried: "
              "docs/study_notes.md.", "",
              "## The paper's COCO numbers, for orientation (theirs, not ours)", "",
              "From the authors' README (COCO val2017, 2x schedules); not comparable in scale with the table above.",
              ""]
    for title, table in PAPER_TABLES.items():
        lines += [f"{title}:", "", "| method | mAP | AP50 | AP75 |", "|---|---|---|---|"]
        lines += [f"| {n} | {a} | {b if b is not None else '-'} | {c if c is not None else '-'} |"
                  for n, a, b, c in table]
        lines.append("")
    lines += ["## Provenance", "", "```json", json.dumps({"config": cfg, "machine": study["machine"]}, indent=1),
              "```", ""]
    return "\n".join(lines)


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
    """
    from gkd.kd.cli import split_config_and_overrides
    from gkd.kd.config import load_config
    from gkd.kd.logs import setup_console_logging

    setup_console_logging()
    config, rest = split_config_and_overrides(config, overrides)
    cfg = load_config(config, (list(QUICK_OVERRIDES) if quick else []) + rest, cls=StudyConfig)
    result = run_study(cfg, command=" ".join(["gkd", *sys.argv[1:]]))
    click.echo(f"wrote {cfg.report} and {cfg.run_dir / 'study.json'} ({result['wall_s'] / 60:.1f} min)")
