"""``gkd run``: the one-command pipeline, data -> teacher -> students -> exports -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json``; each is a function
of the package that owns it, taking a typed spec and returning a frozen result (:mod:`gkd.kd.data.prepare`,
:mod:`gkd.kd.stage`, :mod:`gkd.export.stage`, :mod:`gkd.bench.stage`), keyed, reused and resumed by
:mod:`gkd.runner` (shared with ``gkd study``). Here: which stages gkd run chains and what each depends on. The
distilled and the baseline student train side by side (two 1-thread processes) when two cores are free.

**Configs are resolved before anything runs.** The teacher and student configs (with this run's ``teacher.*`` /
``student.*`` sections merged in as data) are validated first, so a misspelt key stops the run with a one-line error
naming it and the closest valid key, before any stage starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset

__all__ = ["PipelineConfig", "run_pipeline", "resolve_stage_configs", "load_pipeline_config", "QUICK",
           "QAD_SCHEDULE"]

log = logging.getLogger("gkd")


@dataclass(frozen=True)
class PipelineConfig:
    """What ``gkd run`` does. ``teacher`` / ``student`` are merged over the stage's own YAML config."""

    name: str = "default"
    runs_dir: str = "runs"
    seed: int = 0
    #: dataset folder; the synthetic generator fills it when it holds no train.json
    data_root: str = "data/synth"
    synth_images: int = 1000
    synth_size: int = 160
    #: the synthetic world (``gkd data synth --preset``): clean (the default) or cluttered
    synth_preset: SynthPreset = "clean"
    teacher_config: str = str(CONFIG_DIR / "teacher.yaml")
    student_config: str = str(CONFIG_DIR / "distill_gkd.yaml")
    #: an existing teacher checkpoint (gkd or torchvision format) instead of training one
    teacher_checkpoint: str = ""
    #: nested mappings merged over the teacher / student run configs, e.g. {"train": {"epochs": 2}}
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    #: the teacher's own seed (its initialisation and data order), apart from the students' ``seed``: the teacher
    #: is an independent model, never the student's own run carried on longer
    teacher_seed: int = 1
    #: the teacher trains in this many local processes of one thread each (torchrun, Gloo on a CPU; its
    #: ``train.batch_size`` is split between them, the global batch stays): measured 20% faster than one 2-thread
    #: process over 40 steps on a 2-core CPU, within the noise over a whole run. 1: one process (its threads chosen
    #: by ``train.threads``). 0 (the default): 2 on a machine with at least 2 cores, else 1
    teacher_processes: int = 0
    #: also train the student without distillation (same schedule, data order and seed) and export it, so that the
    #: report says what distillation bought at each deployed precision
    baseline: bool = True
    #: train the distilled and the baseline student at the same time, in two processes of one thread each (on a
    #: machine with at least 2 free cores): two 1-thread processes get ~25% more work through 2 cores than one
    #: 2-thread process after the other (docs/train.md, "CPU threads"). Off: one after the other, with progress bars
    side_by_side: bool = True
    #: also ship a quantization-aware distilled student (QAD): the distilled student fine-tuned with fake INT8 in
    #: this format (tensorrt or onnxruntime) against the teacher, with the distillation method of ``student``, for
    #: ``qad_student``'s schedule (default :data:`QAD_SCHEDULE`); exported from its learned scales and shown as
    #: "int8 (QAD)" beside the post-training INT8 in the deployment table. null: off
    qad: Optional[Literal["tensorrt", "onnxruntime"]] = None
    #: nested keys merged over the QAD stage's config (after ``student``), e.g. {"train": {"epochs": 2}}
    qad_student: dict = field(default_factory=dict)
    #: export precisions, and whether to benchmark latency/mAP of the exports
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    bench: bool = True
    bench_iterations: int = 30
    #: validation images cycled through while timing
    bench_images: int = 16
    #: write the report's PNG plots (training curves, per-class AP, latency, mAP against latency)
    plots: bool = True
    #: the accuracy gate: the shipped student's INT8 mAP must be at least this fraction of its FP32 mAP, and its
    #: FP32 export must detect (mAP > 0); `gkd run` exits 1 naming the model and the numbers otherwise (0: no gate)
    gate_min_ratio: float = 0.99
    #: the gate also requires the shipped INT8 file's p50 latency to be at most this x FP32's (bench stage, side by
    #: side, onnxruntime CPU, one thread); 0: not checked. INT8's speed-up depends on the CPU's integer dot-product
    #: instructions (VNNI, AMX), so the default asks only that INT8 be faster
    gate_max_int8_latency_ratio: float = 1.0

    RANGES: ClassVar[dict] = {"gate_min_ratio": ((">=", 0), ("<=", 10)), "gate_max_int8_latency_ratio": ((">=", 0),),
                              "synth_images": ((">=", 2),),
                              "teacher_processes": ((">=", 0),),
                              "bench_iterations": ((">=", 1),), "bench_images": ((">=", 1),)}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: the QAD stage's schedule (under ``qad_student``): a short fine-tune of the trained distilled student at a
#: twentieth of its learning rate, BatchNorm frozen, scales starting from post-training calibration
QAD_SCHEDULE: dict[str, Any] = {"train": {"epochs": 1, "lr": 0.0001, "warmup_iters": 0, "eval_interval": 1},
                                "quant": {"calib_images": 64}}


#: the --quick preset: a small dataset and short schedules (the user's keys are applied over it)
QUICK: dict[str, Any] = {
    # the quick world: 1-3 large solid shapes of 3 classes, no hard cases, 96 px (``gkd data synth --preset quick``)
    "name": "quick", "data_root": "data/quick", "synth_preset": "quick", "synth_images": 300, "synth_size": 96,
    "bench_iterations": 5,
    "teacher": {"train": {"epochs": 5, "warmup_iters": 20}, "model": {"min_size": 96, "max_size": 96}},
    # the students: 300 steps of 4 images (not 150 of 8: about the same time) at lr 5e-4. From scratch on this world
    # the step count decides (measured, baseline student, one thread, same seed: 150 x 8 at lr 2e-3 3.3 mAP, at 1e-3
    # 4.3, at 5e-4 4.0; 300 x 4 at 2e-3 3.2, at 1e-3 8.5, at 5e-4 10.3, seed 1 10.8; the distilled one 19.6)
    "student": {"train": {"epochs": 5, "warmup_iters": 20, "lr": 0.0005, "batch_size": 4},
                "model": {"min_size": 96, "max_size": 96}},
}


# ----------------------------------------------------------------------------------------------------------------
# stage configs


@dataclass(frozen=True)
class StageConfigs:
    """The resolved run configs of the training stages (``teacher`` is None when a checkpoint is given)."""

    teacher: Any
    distill: Any
    baseline: Any
    qad: Any = None


def _stage_updates(cfg: PipelineConfig, stage: str, section: dict, prefix: str) -> dict:
    """The user's ``teacher.*`` / ``student.*`` section under this run's fixed keys (stage folder, data, seed)."""
    from gkd.core.config import merge_dicts

    _checked_section(section, prefix)
    seed = cfg.teacher_seed if stage == "teacher" else cfg.seed
    fixed = {"runs_dir": str(cfg.run_dir), "name": stage, "seed": seed, "data": {"root": cfg.data_root}}
    return merge_dicts(fixed, section)


def teacher_processes(cfg: PipelineConfig) -> int:
    """``teacher_processes``, with 0 (auto) resolved from this machine's cores (not their momentary load: the count
    is part of the teacher's key, and a resumed run needs the same one)."""
    from gkd.kd.cpu_share import available_cores

    return cfg.teacher_processes or min(2, available_cores())


def resolve_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Validate and resolve every training stage's config before any stage runs (one-line errors name the key)."""
    from gkd.core.config import merge_dicts
    from gkd.core.errors import GkdError
    from gkd.export.pipeline import PRECISIONS
    from gkd.kd.config import RunConfig, load_config
    from gkd.kd.distill.config import DistillRunConfig, method_parts, teacher_section
    from gkd.kd.stage import per_process

    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise GkdError(f"precisions: unknown precision '{bad[0]}' in {list(cfg.precisions)}; expected a list of "
                       f"{', '.join(PRECISIONS)}, e.g. precisions=[fp32,int8]")

    teacher = None
    if not cfg.teacher_checkpoint:
        teacher = per_process(load_config(cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
                                          updates=_stage_updates(cfg, "teacher", cfg.teacher, "teacher.")),
                              teacher_processes(cfg), "teacher_processes", "teacher.")
    teacher_ckpt = cfg.teacher_checkpoint or str(cfg.run_dir / "teacher" / "checkpoints" / "model.pt")
    teacher_keys = {"distill": {"teacher": teacher_section(teacher_ckpt, trained_here=not cfg.teacher_checkpoint)}}
    # the distill stage is the full method unless the user names another (student.distill.method=...)
    section = merge_dicts({"distill": {"method": "gkd"}}, cfg.student)

    def student(stage: str, method: str | None):
        updates = merge_dicts(_stage_updates(cfg, stage, section, "student."), teacher_keys)
        if method:
            updates = merge_dicts(updates, {"distill": {"method": method}})
        return load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.", updates=updates)

    qad = None
    if cfg.qad:
        ckpts = cfg.run_dir / "distill" / "checkpoints"
        quant = {"int8_format": cfg.qad}
        if method_parts(section["distill"]["method"]).local:  # the distilled run's adapters, not fresh ones
            quant["adapters_from"] = str(ckpts / "last.pt")
        section_qad = merge_dicts(merge_dicts(section, QAD_SCHEDULE), {
            "model": {"weights": str(ckpts / "model.pt")}, "quant": quant})
        updates = merge_dicts(merge_dicts(_stage_updates(cfg, "qad", section_qad, "student."), teacher_keys),
                              _checked_section(cfg.qad_student, "qad_student."))
        qad = load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="qad_student.", updates=updates)
    return StageConfigs(teacher=teacher, distill=student("distill", None),
                        baseline=student("baseline", "none") if cfg.baseline else None, qad=qad)


def _checked_section(section: dict, prefix: str) -> dict:
    """``section`` (a stage's user keys), refused when it sets what gkd run sets for every stage."""
    from gkd.core.errors import GkdError

    for key in ("name", "runs_dir"):
        if key in section:
            raise GkdError(f"{prefix}{key}: set by gkd run (runs/<name>/<stage>/); use {key}=... for the whole run")
    return section


# ----------------------------------------------------------------------------------------------------------------
# the chain


def _synth_params(cfg: PipelineConfig) -> dict[str, Any]:
    return {"n_images": cfg.synth_images, "seed": cfg.seed, "image_size": cfg.synth_size, "val_fraction": 0.2,
            "preset": cfg.synth_preset}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage whose key changed; return the manifest dict (also in ``runs/<name>/manifest.json``).

    ``manifest["invocation"]`` lists what each stage did this time (reused / ran / resumed, and why).
    """
    from gkd.core.errors import GkdError
    from gkd.core.io import RunLock

    stage_cfgs = resolve_stage_configs(cfg)  # before anything runs: a bad key costs nothing
    if cfg.teacher_checkpoint and not Path(cfg.teacher_checkpoint).is_file():
        raise GkdError(f"teacher_checkpoint: {cfg.teacher_checkpoint}: file not found")
    made_by_training = [p for p in ("config.yaml", "checkpoints", "metrics.jsonl") if (cfg.run_dir / p).exists()]
    if made_by_training and not (cfg.run_dir / "manifest.json").is_file():
        raise GkdError(f"{cfg.run_dir}: holds a training run ({', '.join(made_by_training)}) that gkd run did not "
                       f"make; choose another name=... or runs_dir=...")
    with RunLock(cfg.run_dir):  # one gkd run per run folder at a time
        return _run_stages(cfg, stage_cfgs)


def _planned(cfg: PipelineConfig) -> list[str]:
    planned = ["data", "teacher", "distill"] + (["baseline"] if cfg.baseline else []) + (["qad"] if cfg.qad else [])
    if cfg.precisions:
        planned += ["export"] + (["export-baseline"] if cfg.baseline else []) + (["export-qad"] if cfg.qad else [])
        planned += (["eval-teacher"] + (["eval-baseline"] if cfg.baseline else []) + ["bench"]) if cfg.bench else []
    return planned


def _run_stages(cfg: PipelineConfig, stage_cfgs: StageConfigs) -> dict[str, Any]:
    import torch

    from gkd.bench.stage import BenchResult, BenchSpec, EvalSpec, Evaluation, bench_stage, evaluate_stage
    from gkd.core.config import to_dict
    from gkd.core.io import atomic_write_json, atomic_write_text
    from gkd.core.records import Artifact
    from gkd.export.pipeline import EXPORT_RECORD_VERSION
    from gkd.export.stage import ExportedModel, ExportSpec, export_stage
    from gkd.kd.data.prepare import Dataset, DatasetSpec, count_images, prepare_dataset
    from gkd.kd.stage import (TrainedModel, TrainSpec, distill_stage, train_stage, training_inputs, training_work,
                              with_threads)
    from gkd.report import STUDENTS, accuracy_gate, render_report, report_json, write_plots
    from gkd.runner import Job, Manifest, StageRunner, free_cores

    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    runner = StageRunner(manifest, _planned(cfg))
    root, bench_dir = Path(cfg.data_root), cfg.run_dir / "bench"
    synthetic = _synth_params(cfg)  # what the stage would generate; the data itself is keyed by its SHA-256
    data = runner.run("data", {"data_root": str(root), "synthetic": synthetic},
                      lambda key: prepare_dataset(DatasetSpec(root, synthetic)), Dataset)
    shas, n_train = data.shas(), count_images(data.train.path)  # the count for the progress lines
    if stage_cfgs.teacher is None:
        given = Artifact.of(cfg.teacher_checkpoint)
        teacher = runner.run("teacher", {"given": given.record()}, lambda key: TrainedModel(given), TrainedModel)
    else:
        procs, tcfg = teacher_processes(cfg), stage_cfgs.teacher
        teacher = runner.run("teacher", {**training_inputs(tcfg, data=shas), "processes": procs},
                             lambda key: train_stage(TrainSpec(tcfg, key, procs)), TrainedModel, "teacher.",
                             training_work(tcfg, n_train, processes=procs))
    students = [("distill", stage_cfgs.distill)] + ([("baseline", stage_cfgs.baseline)] if cfg.baseline else [])
    followed: dict[str, Any] = {}  # this invocation's export / eval stage results

    def evaluate(name: str, models: tuple, inputs: dict[str, Any]) -> Evaluation:
        spec = EvalSpec(models, data.val.path, bench_dir / f"accuracy-{name}.json", threads=torch.get_num_threads(),
                        optional=name == "teacher")  # 1 thread beside a training student, both cores otherwise
        return runner.run(f"eval-{name}", {**inputs, "data": shas}, lambda key: evaluate_stage(spec), Evaluation)

    def follow_up(name: str, student: TrainedModel) -> None:
        """What a trained student's result lets run: its export, then the accuracy of its exports (the baseline's)
        and of the teacher. Run while the other student still trains (one thread: that core is free)."""
        if not cfg.precisions:
            return
        group = STUDENTS[name]
        folder = "export" if group == "distilled" else "export-baseline"
        spec = ExportSpec(student.checkpoint.path, cfg.run_dir / folder, tuple(cfg.precisions), root,
                          cfg.gate_min_ratio or 0.99, cfg.seed, shipped=folder == "export")
        followed[folder] = runner.run(folder, {
            "config": {"precisions": list(cfg.precisions), "seed": cfg.seed, "int8_target": spec.int8_target},
            "record": EXPORT_RECORD_VERSION, "student": student.checkpoint.sha256, "data": shas},
            lambda key: export_stage(spec), ExportedModel)
        if not cfg.bench:
            return
        if "eval-teacher" not in followed:
            followed["eval-teacher"] = evaluate("teacher", (("teacher", teacher.checkpoint.path),),
                                                {"teacher": teacher.checkpoint.sha256})
        if group == "baseline":
            files = followed[folder].files
            followed["eval-baseline"] = evaluate("baseline", tuple((group, f.onnx.path) for f in files.values()),
                                                 {"exports": {p: f.onnx.sha256 for p, f in files.items()}})

    def beside_training(name: str, student: TrainedModel) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            follow_up(name, student)
        finally:
            torch.set_num_threads(before)

    # side by side: two processes of one thread each when two cores are free (progress bars only when sequential)
    workers = len(students) if cfg.side_by_side and len(students) > 1 and free_cores() >= len(students) else 1
    trained = runner.run_parallel([Job(
        name, training_inputs(run_cfg, data=shas, teacher=teacher.checkpoint.sha256), distill_stage,
        lambda key, n, c=run_cfg: TrainSpec(c, key) if n is None else TrainSpec(with_threads(c, n), key,
                                                                                 progress=False),
        TrainedModel, "student.", training_work(run_cfg, n_train)) for name, run_cfg in students], workers,
        then=beside_training)
    for name, _ in students:  # what did not run beside the other student's training
        if ("export" if name == "distill" else "export-baseline") not in followed:
            follow_up(name, trained[name])
    exported = {STUDENTS[n]: followed["export" if n == "distill" else "export-baseline"]
                for n, _ in students if cfg.precisions}
    qcfg = stage_cfgs.qad
    if qcfg is not None:  # the distilled student fine-tuned with fake INT8, exported from its learned scales
        qad = runner.run("qad", training_inputs(qcfg, data=shas, teacher=teacher.checkpoint.sha256,
                                                student=trained["distill"].checkpoint.sha256),
                         lambda key: distill_stage(TrainSpec(qcfg, key)), TrainedModel, "qad_student.",
                         training_work(qcfg, n_train))
        if "int8" in cfg.precisions:
            spec = ExportSpec(qad.checkpoint.path, cfg.run_dir / "export-qad", ("fp32", "int8"), root,
                              cfg.gate_min_ratio or 0.99, cfg.seed)
            exported["qad"] = runner.run("export-qad", {
                "config": {"precisions": ["fp32", "int8"], "seed": cfg.seed}, "record": EXPORT_RECORD_VERSION,
                "student": qad.checkpoint.sha256, "data": shas}, lambda key: export_stage(spec), ExportedModel)
    if cfg.precisions and cfg.bench:
        models = [("teacher", teacher.checkpoint.path, "fp32")]
        for n, _ in students:
            models.append((STUDENTS[n], trained[n].checkpoint.path, "fp32"))
            models += [(STUDENTS[n], f.onnx.path, p) for p, f in exported[STUDENTS[n]].files.items()]
        if "qad" in exported:  # its INT8 file beside the post-training one (its float network is the distilled one's)
            models.append(("qad", exported["qad"].files["int8"].onnx.path, "int8"))
        evals = tuple(followed[s] for s in ("eval-teacher", "eval-baseline") if s in followed)
        spec = BenchSpec(tuple(models), evals, data.val.path, bench_dir, cfg.bench_iterations, cfg.bench_images,
                         students=tuple(STUDENTS.values()))
        runner.run("bench", {"config": {"bench_iterations": cfg.bench_iterations, "bench_images": cfg.bench_images},
                             "teacher": teacher.checkpoint.sha256,
                             "student": {STUDENTS[n]: trained[n].checkpoint.sha256 for n, _ in students},
                             "exports": {f"{g}/{p}": f.onnx.sha256 for g, e in exported.items()
                                         for p, f in e.files.items()},
                             "evals": [e.accuracy.sha256 for e in evals], "data": shas},
                   lambda key: bench_stage(spec), BenchResult)
    manifest.data["invocation"] = runner.invocation()
    manifest.data["gate"] = accuracy_gate(manifest.stages.get("bench") if cfg.precisions and cfg.bench else None,
                                          cfg.gate_min_ratio, manifest.stages.get("export"),
                                          cfg.gate_max_int8_latency_ratio, manifest.stages.get("export-qad"))
    manifest.data["plots"] = write_plots(manifest.data, cfg.run_dir) if cfg.plots else {}
    manifest.save()
    atomic_write_text(cfg.run_dir / "report.md", render_report(manifest.data))
    atomic_write_json(cfg.run_dir / "report.json", report_json(manifest.data))
    return manifest.data


def load_pipeline_config(config: Path | None, overrides: list[str], quick: bool = False) -> PipelineConfig:
    """The ``gkd run`` config: the --quick preset (if asked), then the YAML file, then command-line overrides."""
    from gkd.core.config import load_config

    return load_config(config, overrides, cls=PipelineConfig, updates=QUICK if quick else None)
