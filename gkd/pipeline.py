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

from gkd.run_config import PipelineConfig, StageConfigs, resolve_stage_configs, teacher_processes

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
