"""``gkd run``: the one-command pipeline, data -> teacher -> students -> exports -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json``; each is a function
of the package that owns it, taking a typed spec and returning a frozen result (:mod:`gkd.kd.data.prepare`,
:mod:`gkd.kd.stage`, :mod:`gkd.export.stage`, :mod:`gkd.bench.stage`), keyed, reused and resumed by
:mod:`gkd.runner` (shared with ``gkd study``). Here: which stages gkd run chains and what each depends on. The
distilled and the baseline student train side by side (two 1-thread processes) when two cores are free.

**Configs are resolved before anything runs** (:mod:`gkd.run_config`): a misspelt key stops the run with a one-line
error naming it and the closest valid key, before any stage starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gkd import report
from gkd import runner as runner_module
from gkd.bench.stage import BenchResult, BenchSpec, EvalSpec, Evaluation, bench_stage, evaluate_stage
from gkd.core.config import to_dict
from gkd.core.io import atomic_write_json, atomic_write_text
from gkd.core.records import Artifact
from gkd.export.pipeline import EXPORT_RECORD_VERSION
from gkd.export.stage import ExportedModel, ExportSpec, export_stage
from gkd.kd.data.prepare import Dataset, DatasetSpec, count_images, prepare_dataset
from gkd.kd.stage import (TrainedModel, TrainSpec, distill_stage, train_stage, training_inputs, training_work,
                          with_threads)
from gkd.run_config import PipelineConfig, StageConfigs, resolve_stage_configs, teacher_processes
from gkd.runner import Job, Manifest, StageRunner

__all__ = ["run_pipeline"]

log = logging.getLogger("gkd")


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
    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    chain = _Chain(cfg, StageRunner(manifest, _planned(cfg)))
    chain.data_and_teacher(stage_cfgs.teacher)
    students = [("distill", stage_cfgs.distill)] + ([("baseline", stage_cfgs.baseline)] if cfg.baseline else [])
    trained = chain.students(students)
    if stage_cfgs.qad is not None:
        chain.qad(stage_cfgs.qad, trained["distill"])
    if cfg.precisions and cfg.bench:
        chain.bench(trained)
    manifest.data["invocation"] = chain.runner.invocation()
    manifest.data["gate"] = report.accuracy_gate(
        manifest.stages.get("bench") if cfg.precisions and cfg.bench else None, cfg.gate_min_ratio,
        manifest.stages.get("export"), cfg.gate_max_int8_latency_ratio, manifest.stages.get("export-qad"))
    manifest.data["plots"] = report.write_plots(manifest.data, cfg.run_dir) if cfg.plots else {}
    manifest.save()
    atomic_write_text(cfg.run_dir / "report.md", report.render_report(manifest.data))
    atomic_write_json(cfg.run_dir / "report.json", report.report_json(manifest.data))
    return manifest.data


class _Chain:
    """gkd run's stages and what each depends on: each method runs (or reuses) stages and keeps their results."""

    def __init__(self, cfg: PipelineConfig, runner: StageRunner):
        self.cfg, self.runner = cfg, runner
        self.root, self.bench_dir = Path(cfg.data_root), cfg.run_dir / "bench"
        self.exported: dict[str, ExportedModel] = {}  # group -> its export
        self.evaluated: dict[str, Evaluation] = {}  # eval stage -> its result

    def data_and_teacher(self, tcfg: Any) -> None:
        synthetic = _synth_params(self.cfg)  # what the stage would generate; the data is keyed by its SHA-256
        self.data = self.runner.run("data", {"data_root": str(self.root), "synthetic": synthetic},
                                    lambda key: prepare_dataset(DatasetSpec(self.root, synthetic)), Dataset)
        self.shas, self.n_train = self.data.shas(), count_images(self.data.train.path)  # count: progress lines
        if tcfg is None:
            given = Artifact.of(self.cfg.teacher_checkpoint)
            self.teacher = self.runner.run("teacher", {"given": given.record()}, lambda key: TrainedModel(given),
                                           TrainedModel)
            return
        procs = teacher_processes(self.cfg)
        self.teacher = self.runner.run("teacher", {**training_inputs(tcfg, data=self.shas), "processes": procs},
                                       lambda key: train_stage(TrainSpec(tcfg, key, procs)), TrainedModel,
                                       "teacher.", training_work(tcfg, self.n_train, processes=procs))

    def students(self, students: list[tuple[str, Any]]) -> dict[str, TrainedModel]:
        """The distilled student and the baseline, side by side in two 1-thread processes when two cores are free
        (progress bars only when one after the other); each one's export and evaluations run as soon as it is
        trained, on the core it freed."""
        free = runner_module.free_cores()
        workers = len(students) if self.cfg.side_by_side and len(students) > 1 and free >= len(students) else 1
        teacher = self.teacher.checkpoint.sha256
        trained = self.runner.run_parallel([Job(
            name, training_inputs(run_cfg, data=self.shas, teacher=teacher), distill_stage,
            lambda key, n, c=run_cfg: TrainSpec(c, key) if n is None else TrainSpec(with_threads(c, n), key,
                                                                                     progress=False),
            TrainedModel, "student.", training_work(run_cfg, self.n_train)) for name, run_cfg in students],
            workers, then=self._beside_training)
        for name, _ in students:  # what did not run beside the other student's training
            if report.STUDENTS[name] not in self.exported:
                self._follow_up(name, trained[name])
        self.trained = trained
        return trained

    def _beside_training(self, name: str, student: TrainedModel) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._follow_up(name, student)
        finally:
            torch.set_num_threads(before)

    def _follow_up(self, name: str, student: TrainedModel) -> None:
        """What a trained student's result lets run: its export, then the accuracy of its exports (the baseline's)
        and of the teacher."""
        if not self.cfg.precisions:
            return
        group = report.STUDENTS[name]
        folder = "export" if group == "distilled" else "export-baseline"
        self.exported[group] = self._export(folder, student, tuple(self.cfg.precisions), shipped=folder == "export")
        if not self.cfg.bench:
            return
        if "teacher" not in self.evaluated:
            self._evaluate("teacher", (("teacher", self.teacher.checkpoint.path),),
                           {"teacher": self.teacher.checkpoint.sha256})
        if group == "baseline":
            files = self.exported[group].files
            self._evaluate("baseline", tuple((group, f.onnx.path) for f in files.values()),
                           {"exports": {p: f.onnx.sha256 for p, f in files.items()}})

    def _export(self, folder: str, student: TrainedModel, precisions: tuple[str, ...], shipped: bool,
                keyed: dict[str, Any] | None = None) -> ExportedModel:
        cfg = self.cfg
        spec = ExportSpec(student.checkpoint.path, cfg.run_dir / folder, precisions, self.root,
                          cfg.gate_min_ratio or 0.99, cfg.seed, shipped=shipped)
        config = keyed or {"precisions": list(precisions), "seed": cfg.seed, "int8_target": spec.int8_target}
        return self.runner.run(folder, {"config": config, "record": EXPORT_RECORD_VERSION,
                                        "student": student.checkpoint.sha256, "data": self.shas},
                               lambda key: export_stage(spec), ExportedModel)

    def _evaluate(self, name: str, models: tuple, inputs: dict[str, Any]) -> None:
        spec = EvalSpec(models, self.data.val.path, self.bench_dir / f"accuracy-{name}.json",
                        threads=torch.get_num_threads(),  # 1 beside a training student, both cores otherwise
                        optional=name == "teacher")
        self.evaluated[name] = self.runner.run(f"eval-{name}", {**inputs, "data": self.shas},
                                               lambda key: evaluate_stage(spec), Evaluation)

    def qad(self, qcfg: Any, distilled: TrainedModel) -> None:
        """The distilled student fine-tuned with fake INT8 (QAD), exported from its learned scales."""
        qad = self.runner.run("qad", training_inputs(qcfg, data=self.shas, teacher=self.teacher.checkpoint.sha256,
                                                     student=distilled.checkpoint.sha256),
                              lambda key: distill_stage(TrainSpec(qcfg, key)), TrainedModel, "qad_student.",
                              training_work(qcfg, self.n_train))
        if "int8" in self.cfg.precisions:
            self.exported["qad"] = self._export("export-qad", qad, ("fp32", "int8"), shipped=True,
                                                keyed={"precisions": ["fp32", "int8"], "seed": self.cfg.seed})

    def bench(self, trained: dict[str, TrainedModel]) -> None:
        """Latency of the teacher, the students and every export side by side; val mAP of what is not scored yet.
        The QAD student's INT8 file stands beside the post-training one (its float network is the distilled one's)."""
        cfg, groups = self.cfg, {report.STUDENTS[n]: m for n, m in trained.items()}
        models = [("teacher", self.teacher.checkpoint.path, "fp32")]
        for group, model in groups.items():
            models.append((group, model.checkpoint.path, "fp32"))
            models += [(group, f.onnx.path, p) for p, f in self.exported[group].files.items()]
        if "qad" in self.exported:
            models.append(("qad", self.exported["qad"].files["int8"].onnx.path, "int8"))
        evals = tuple(self.evaluated[s] for s in ("teacher", "baseline") if s in self.evaluated)
        spec = BenchSpec(tuple(models), evals, self.data.val.path, self.bench_dir, cfg.bench_iterations,
                         cfg.bench_images, students=tuple(report.STUDENTS.values()))
        inputs = {"config": {"bench_iterations": cfg.bench_iterations, "bench_images": cfg.bench_images},
                  "teacher": self.teacher.checkpoint.sha256,
                  "student": {g: m.checkpoint.sha256 for g, m in groups.items()},
                  "exports": {f"{g}/{p}": f.onnx.sha256 for g, e in self.exported.items() for p, f in e.files.items()},
                  "evals": [e.accuracy.sha256 for e in evals], "data": self.shas}
        self.runner.run("bench", inputs, lambda key: bench_stage(spec), BenchResult)
