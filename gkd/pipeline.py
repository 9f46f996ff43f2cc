"""``gkd run``: the one-command pipeline, data -> teacher -> students -> exports -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json``; the stages, their
content keys, reuse and resume are :mod:`gkd.stages` (shared with ``gkd study``). Here: what gkd run's stages are
and what each depends on. The distilled and the baseline student train side by side (two 1-thread processes) when
two cores are free.

**Configs are resolved before anything runs.** The teacher and student configs (with this run's ``teacher.*`` /
``student.*`` sections merged in as data) are validated first, so a misspelt key stops the run with a one-line error
naming it and the closest valid key, before any stage starts.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import click

from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset
from gkd.report import STUDENTS, accuracy_gate, render_report, report_json, summary_text, write_plots
from gkd.stages import (Job, Manifest, StageRunner, artifact, data_stage, free_cores, output_sha, train_images,
                        train_student, train_teacher_processes, training_inputs, training_work, with_threads)

__all__ = ["PipelineConfig", "run_pipeline", "resolve_stage_configs", "run", "QUICK", "QAD_SCHEDULE"]

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


def _split_batch(run_cfg, processes: int):
    """The teacher's config per process: ``train.batch_size`` split between ``processes`` (the global batch, and so
    the lr's meaning, stay the config's), one thread each."""
    from gkd.core.errors import GkdError

    if processes <= 1:
        return run_cfg
    batch = run_cfg.train.batch_size
    if batch % processes:
        raise GkdError(f"teacher.train.batch_size {batch} cannot be split between teacher_processes={processes} "
                       f"processes; give a multiple of {processes}, or teacher_processes=1")
    return with_threads(dataclasses.replace(run_cfg, train=dataclasses.replace(
        run_cfg.train, batch_size=batch // processes)), 1)


def resolve_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Validate and resolve every training stage's config before any stage runs (one-line errors name the key)."""
    from gkd.core.config import merge_dicts
    from gkd.core.errors import GkdError
    from gkd.export.pipeline import PRECISIONS
    from gkd.kd.config import RunConfig, load_config
    from gkd.kd.distill.config import DistillRunConfig

    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise GkdError(f"precisions: unknown precision '{bad[0]}' in {list(cfg.precisions)}; expected a list of "
                       f"{', '.join(PRECISIONS)}, e.g. precisions=[fp32,int8]")

    teacher = None
    if not cfg.teacher_checkpoint:
        teacher = _split_batch(load_config(cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
                                           updates=_stage_updates(cfg, "teacher", cfg.teacher, "teacher.")),
                               teacher_processes(cfg))
    teacher_ckpt = cfg.teacher_checkpoint or str(cfg.run_dir / "teacher" / "checkpoints" / "model.pt")
    # a teacher trained here is a gkd checkpoint that names its own architecture
    declared = {} if cfg.teacher_checkpoint else {"arch": None, "backbone": None}
    teacher_keys = {"distill": {"teacher": {"checkpoint": teacher_ckpt, **declared}}}
    # the distill stage is the full method unless the user names another (student.distill.method=...)
    section = merge_dicts({"distill": {"method": "gkd"}}, cfg.student)

    def student(stage: str, method: str | None):
        updates = merge_dicts(_stage_updates(cfg, stage, section, "student."), teacher_keys)
        if method:
            updates = merge_dicts(updates, {"distill": {"method": method}})
        return load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.", updates=updates)

    qad = None
    if cfg.qad:
        from gkd.kd.distill.config import method_parts

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
# the stages


def _synth_params(cfg: PipelineConfig) -> dict[str, Any]:
    return {"n_images": cfg.synth_images, "seed": cfg.seed, "image_size": cfg.synth_size, "val_fraction": 0.2,
            "preset": cfg.synth_preset}


def _data_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    # what the stage would generate; the data's own content is keyed through its outputs' SHA-256 (a changed
    # train.json or val.json reruns the stages after it)
    return {"data_root": str(Path(cfg.data_root)), "synthetic": _synth_params(cfg)}


def _export_stage(cfg: PipelineConfig, student_ckpt: Path, out: Path, shipped: bool = True,
                  precisions: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``gkd export`` of one student. The shipped (distilled) student also gets the static, TensorRT-ready graph
    and its TensorRT-RTX parse/build check; the baseline only the onnxruntime files (it is compared, not shipped,
    and its graph is the distilled student's: building it twice on a CPU costs a minute)."""
    from gkd.export.pipeline import ExportOptions, export_checkpoint

    data = Path(cfg.data_root)
    manifest = export_checkpoint(ExportOptions(checkpoint=student_ckpt, out=out,
                                               precisions=tuple(precisions or cfg.precisions),
                                               calib_data=data / "train.json", val_data=data / "val.json",
                                               int8_target=cfg.gate_min_ratio or 0.99, seed=cfg.seed,
                                               static=shipped, tensorrt_rtx="auto" if shipped else "off"),
                                 log=log.info)
    files = {p: {"onnx": artifact(out / f["onnx"]), "verified": f["verified"]} for p, f in manifest["files"].items()}
    int8 = (manifest["files"].get("int8") or {}).get("details") or {}
    keep = ("is_int8", "floor", "macs_int8_share", "weights_int8_share", "counts", "activations", "weights", "bias",
            "blocking")
    return {"dir": str(out), "outputs": {"files": files}, "parity": manifest["parity"]["results"],
            "int8": {k: int8.get(k) for k in keep} if int8 else None, "speed": manifest.get("speed"),
            "tensorrt": manifest.get("tensorrt"), "tensorrt_rtx": manifest.get("tensorrt_rtx_check"),
            "trtexec": manifest.get("trtexec"), "tensorrt_profile": manifest.get("tensorrt_profile")}


#: the val objects' attributes (the synthetic generator's hard cases) that the report gives AP on
HARD_SUBSETS = ("small", "occluded", "blurred")
#: CPU threads of the latency measurement (batch 1 on one core: the number an edge device's single stream sees)
BENCH_THREADS = 1
#: threads of the mAP evaluation (not timed: it may use both cores of the reference machine)
ACCURACY_THREADS = 2


def _bench_models(teacher_ckpt: Path, students: dict[str, tuple[Path, dict]]) -> list[tuple[str, Path, str]]:
    """``(group, path, precision)`` of every model the bench stage measures: the teacher's checkpoint, then each
    student's checkpoint and exported files (``students``: group -> (checkpoint, its export stage record))."""
    models = [("teacher", teacher_ckpt, "fp32")]
    for group, (ckpt, exported) in students.items():
        models.append((group, ckpt, "fp32"))
        models += [(group, Path(f["onnx"]["path"]), p) for p, f in exported["outputs"]["files"].items()]
    return models


def _eval_stage(cfg: PipelineConfig, models: list[tuple[str, Path]], name: str) -> dict[str, Any]:
    """Val mAP of ``(group, path)`` models (overall, per class, on the hard subsets): ``runs/<name>/bench/
    accuracy-<name>.json``. A model outside the data's label space (a given COCO teacher) is skipped with why."""
    from gkd.bench.accuracy import evaluate_models
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json

    val = Path(cfg.data_root) / "val.json"
    subsets = HARD_SUBSETS if _has_attributes(val) else ()
    import torch

    threads = torch.get_num_threads()  # 1 beside a training student, both cores otherwise
    try:
        acc = evaluate_models([p for _, p in models], val, groups=[g for g, _ in models], threads=threads,
                              subsets=subsets, log=log.info)
    except GkdError as exc:
        if name != "teacher":
            raise
        acc = {"models": {}, "skipped": {"teacher": str(exc)}}
        log.info("teacher: not evaluated on %s (%s)", val, exc)
    for r in acc["models"].values():
        r.pop("detections", None)  # ~100 boxes per image per model: `gkd eval` writes them when asked
    out = cfg.run_dir / "bench" / f"accuracy-{name}.json"
    atomic_write_json(out, acc)
    return {"outputs": {"accuracy": artifact(out)}, "models": acc["models"], "skipped": acc["skipped"]}


def _bench_stage(cfg: PipelineConfig, models: list[tuple[str, Path, str]], evals: list[dict]) -> dict[str, Any]:
    """Latency (round-robin, side by side) of the teacher, both students and their exports; val mAP of the exports
    not evaluated yet (``evals``: the eval-* stages' records, run while a student still trained)."""
    from gkd.bench.accuracy import evaluate_models
    from gkd.bench.artifacts import ModelSpec, model_kind
    from gkd.bench.harness import TimingPolicy
    from gkd.bench.latency import benchmark_models
    from gkd.core.io import atomic_write_json
    from gkd.export.manifest import parity_verdict

    out = cfg.run_dir / "bench"
    val = Path(cfg.data_root) / "val.json"
    timed, skipped = [], {}
    for group, path, precision in models:
        kind = model_kind(path)
        if kind == "onnx" and precision.endswith("fp16"):
            # onnxruntime's CPU provider has no FP16 convolution kernels on x86: it inserts casts and computes in
            # FP32, so an FP16 timing here would measure casts, not FP16 (its accuracy is measured all the same)
            skipped[f"{group}/onnxruntime-fp16"] = ("onnxruntime's CPU provider has no FP16 kernels on x86 (it "
                                                    "runs through casts): FP16 is timed on a GPU only")
            continue
        timed.append((group, ModelSpec(path, kind)))
    lat = benchmark_models([s for _, s in timed], val, threads=BENCH_THREADS,
                           policy=TimingPolicy.fixed(5, cfg.bench_iterations), latency_images=cfg.bench_images,
                           groups=[g for g, _ in timed], log=log.info)
    lat["skipped"].update(skipped)
    evaluated = {r["path"] for e in evals for r in e["models"].values()}
    exports = [(g, p) for g, p, _ in models if model_kind(p) == "onnx" and str(p) not in evaluated]
    acc = {"models": {}, "skipped": {}}
    if exports:
        acc = evaluate_models([p for _, p in exports], val, groups=[g for g, _ in exports],
                              threads=ACCURACY_THREADS, subsets=HARD_SUBSETS if _has_attributes(val) else (),
                              log=log.info)
        for r in acc["models"].values():
            r.pop("detections", None)
    for e in evals:  # one table of every model's accuracy, whichever stage scored it
        acc["models"].update(e["models"])
        acc["skipped"].update(e["skipped"])
    atomic_write_json(out / "latency.json", lat)
    atomic_write_json(out / "accuracy.json", acc)
    runners: dict[str, dict[str, Any]] = {}
    for name, r in lat["runners"].items():
        runners[name] = {"p50_ms": r["latency"]["p50"], "p90_ms": r["latency"]["p90"], "provider": r["provider"],
                         "verified": r["verified"], "bbox_mAP": None}
    for name, r in acc["models"].items():
        runners.setdefault(name, {"p50_ms": None, "p90_ms": None, "provider": r["provider"], "verified": None})
        runners[name]["bbox_mAP"] = r["metrics"]["bbox_mAP"]
        if r["kind"] == "onnx" and runners[name]["verified"] is None:
            runners[name]["verified"] = parity_verdict(r["path"])
    # the students' PyTorch mAP is their FP32 export's (parity-checked against it); not evaluated twice
    for group in STUDENTS.values():
        pt, onnx = runners.get(f"{group}/pytorch-fp32"), runners.get(f"{group}/onnxruntime-fp32") or {}
        if pt is not None and pt["bbox_mAP"] is None:
            pt["bbox_mAP_source"] = f"{group}/onnxruntime-fp32 (verified export of this checkpoint)"
            pt["bbox_mAP"] = onnx.get("bbox_mAP") if onnx.get("verified") else None
    teacher, student = runners.get("teacher/pytorch-fp32") or {}, runners.get("distilled/pytorch-fp32") or {}
    speed = {}
    if teacher.get("p50_ms") and student.get("p50_ms"):
        speed = {"teacher_p50_ms": teacher["p50_ms"], "student_p50_ms": student["p50_ms"],
                 "teacher_over_student_p50": teacher["p50_ms"] / student["p50_ms"]}
    keep = ("teacher/pytorch-fp32", "distilled/onnxruntime-fp32", "baseline/onnxruntime-fp32")
    return {"outputs": {"latency": artifact(out / "latency.json"), "accuracy": artifact(out / "accuracy.json")},
            "device": "cpu", "threads": BENCH_THREADS, "runners": runners, "skipped": lat["skipped"], "speed": speed,
            "subsets": {n: {k: v["bbox_mAP"] for k, v in acc["models"][n]["subsets"].items()}
                        for n in keep if n in acc["models"] and acc["models"][n]["subsets"]},
            "per_class": {n: acc["models"][n]["per_class_AP"] for n in keep if n in acc["models"]},
            "samples_ms": {n: r["raw_times_ms"] for n, r in lat["runners"].items()}}


def _qad_stages(cfg: PipelineConfig, run_cfg, stage, data_shas: dict, teacher_sha: str, distilled: dict,
                n_train: int | None) -> dict[str, Any] | None:
    """The quantization-aware distillation stage (the distilled student fine-tuned with fake INT8) and its export
    (FP32 and INT8 from the learned scales, the static graph and its TensorRT-RTX check); returns the export's
    record, or None when ``qad`` is off."""
    if run_cfg is None:
        return None
    from gkd.export.pipeline import EXPORT_RECORD_VERSION

    record = stage("qad", training_inputs(run_cfg, data=data_shas, teacher=teacher_sha,
                                          student=output_sha(distilled, "checkpoint")),
                   lambda: train_student(run_cfg), "qad_student.", training_work(run_cfg, n_train))
    if not cfg.precisions or "int8" not in cfg.precisions:
        return None
    ckpt = Path(record["outputs"]["checkpoint"]["path"])
    inputs = {"config": {"precisions": ["fp32", "int8"], "seed": cfg.seed}, "record": EXPORT_RECORD_VERSION,
              "student": output_sha(record, "checkpoint"), "data": data_shas}
    return stage("export-qad", inputs, lambda: _export_stage(cfg, ckpt, cfg.run_dir / "export-qad",
                                                             precisions=("fp32", "int8")))


def _has_attributes(val: Path) -> bool:
    from gkd.kd.data.coco import load_coco

    return any("attributes" in a for anns in load_coco(val).anns_by_image.values() for a in anns)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage whose key changed; return the manifest dict (also in ``runs/<name>/manifest.json``).

    ``manifest["invocation"]`` lists what each stage did this time (reused / ran / resumed, and why).
    """
    from gkd.core.errors import GkdError

    stage_cfgs = resolve_stage_configs(cfg)  # before anything runs: a bad key costs nothing
    if cfg.teacher_checkpoint and not Path(cfg.teacher_checkpoint).is_file():
        raise GkdError(f"teacher_checkpoint: {cfg.teacher_checkpoint}: file not found")
    made_by_training = [p for p in ("config.yaml", "checkpoints", "metrics.jsonl") if (cfg.run_dir / p).exists()]
    if made_by_training and not (cfg.run_dir / "manifest.json").is_file():
        raise GkdError(f"{cfg.run_dir}: holds a training run ({', '.join(made_by_training)}) that gkd run did not "
                       f"make; choose another name=... or runs_dir=...")
    from gkd.core.io import RunLock

    with RunLock(cfg.run_dir):  # one gkd run per run folder at a time
        return _run_stages(cfg, stage_cfgs)


def _run_stages(cfg: PipelineConfig, stage_cfgs: StageConfigs) -> dict[str, Any]:
    from gkd.core.config import to_dict
    from gkd.core.io import atomic_write_json, atomic_write_text

    manifest = Manifest(cfg.run_dir / "manifest.json", to_dict(cfg))
    planned = ["data", "teacher", "distill"] + (["baseline"] if cfg.baseline else []) + (["qad"] if cfg.qad else [])
    if cfg.precisions:
        planned += ["export"] + (["export-baseline"] if cfg.baseline else []) + (["export-qad"] if cfg.qad else [])
        planned += (["eval-teacher"] + (["eval-baseline"] if cfg.baseline else []) + ["bench"]) if cfg.bench else []
    runner = StageRunner(manifest, planned)
    stage = runner.run

    root = Path(cfg.data_root)
    data = stage("data", _data_inputs(cfg), lambda: data_stage(root, _synth_params(cfg)))
    data_shas = {"train.json": output_sha(data, "train"), "val.json": output_sha(data, "val")}
    n_train = train_images(Path(data["outputs"]["train"]["path"]))  # read once, for the progress lines
    if stage_cfgs.teacher is None:
        path = Path(cfg.teacher_checkpoint)
        teacher = stage("teacher", {"given": artifact(path)}, lambda: {"outputs": {"checkpoint": artifact(path)},
                                                                       "metrics": {}})
    else:
        procs = teacher_processes(cfg)
        work = training_work(stage_cfgs.teacher, n_train, processes=procs)
        teacher = stage("teacher", {**training_inputs(stage_cfgs.teacher, data=data_shas), "processes": procs},
                        lambda: train_teacher_processes(stage_cfgs.teacher, procs), "teacher.", work)
    teacher_sha = output_sha(teacher, "checkpoint")
    students = [("distill", stage_cfgs.distill)] + ([("baseline", stage_cfgs.baseline)] if cfg.baseline else [])
    # side by side: two processes of one thread each when two cores are free (progress bars only when sequential)
    workers = len(students) if cfg.side_by_side and len(students) > 1 and free_cores() >= len(students) else 1
    teacher_ckpt = Path(teacher["outputs"]["checkpoint"]["path"])
    followed: dict[str, dict[str, Any]] = {}  # this invocation's export / eval stage records

    def follow_up(name: str, record: dict[str, Any]) -> None:
        """What a trained student's result lets run: its export, then the accuracy of its exports (the baseline's)
        and of the teacher. Run while the other student still trains (one thread: that core is free)."""
        if not cfg.precisions:
            return
        group = STUDENTS[name]
        folder = "export" if group == "distilled" else "export-baseline"
        ckpt = Path(record["outputs"]["checkpoint"]["path"])
        from gkd.export.pipeline import EXPORT_RECORD_VERSION

        export_inputs = {"config": {"precisions": list(cfg.precisions), "seed": cfg.seed,
                                    "int8_target": cfg.gate_min_ratio or 0.99}, "record": EXPORT_RECORD_VERSION,
                         "student": output_sha(record, "checkpoint"), "data": data_shas}
        followed[folder] = stage(folder, export_inputs, lambda: _export_stage(
            cfg, ckpt, cfg.run_dir / folder, shipped=folder == "export"))
        if not cfg.bench:
            return
        if "eval-teacher" not in followed:
            followed["eval-teacher"] = stage("eval-teacher", {"teacher": teacher_sha, "data": data_shas},
                                             lambda: _eval_stage(cfg, [("teacher", teacher_ckpt)], "teacher"))
        if group == "baseline":
            files = followed[folder]["outputs"]["files"]
            followed["eval-baseline"] = stage(
                "eval-baseline", {"exports": {p: f["onnx"]["sha256"] for p, f in files.items()}, "data": data_shas},
                lambda: _eval_stage(cfg, [(group, Path(f["onnx"]["path"])) for f in files.values()], group))

    def beside_training(name: str, record: dict[str, Any]) -> None:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            follow_up(name, record)
        finally:
            torch.set_num_threads(before)

    runner.run_parallel([Job(name, training_inputs(run_cfg, data=data_shas, teacher=teacher_sha), train_student,
                             (run_cfg,), "student.", training_work(run_cfg, n_train),
                             threads=lambda n, run_cfg=run_cfg: (with_threads(run_cfg, n), False))
                         for name, run_cfg in students], workers, then=beside_training)
    trained = {STUDENTS[name]: manifest.stages[name] for name, _ in students}
    for name, _ in students:  # what did not run beside the other student's training
        if ("export" if name == "distill" else "export-baseline") not in followed:
            follow_up(name, manifest.stages[name])
    qad = _qad_stages(cfg, stage_cfgs.qad, stage, data_shas, teacher_sha, manifest.stages["distill"], n_train)
    if cfg.precisions and cfg.bench:
        exported = {g: followed["export" if g == "distilled" else "export-baseline"] for g in trained}
        models = _bench_models(teacher_ckpt, {g: (Path(trained[g]["outputs"]["checkpoint"]["path"]), exported[g])
                                              for g in trained})
        if qad is not None:  # its INT8 file beside the post-training one (its float network is the distilled one's)
            models.append(("qad", Path(qad["outputs"]["files"]["int8"]["onnx"]["path"]), "int8"))
            exported["qad"] = qad
        evals = [followed[s] for s in ("eval-teacher", "eval-baseline") if s in followed]
        bench_inputs = {"config": {"bench_iterations": cfg.bench_iterations, "bench_images": cfg.bench_images},
                        "teacher": teacher_sha,
                        "student": {g: output_sha(r, "checkpoint") for g, r in trained.items()},
                        "exports": {f"{g}/{p}": f["onnx"]["sha256"] for g, e in exported.items()
                                    for p, f in e["outputs"]["files"].items()},
                        "evals": [output_sha(e, "accuracy") for e in evals], "data": data_shas}
        stage("bench", bench_inputs, lambda: _bench_stage(cfg, models, evals))
    manifest.data["invocation"] = runner.invocation()
    manifest.data["gate"] = accuracy_gate(manifest.stages.get("bench") if cfg.precisions and cfg.bench else None,
                                          cfg.gate_min_ratio, manifest.stages.get("export"),
                                          cfg.gate_max_int8_latency_ratio, manifest.stages.get("export-qad"))
    manifest.data["plots"] = write_plots(manifest.data, cfg.run_dir) if cfg.plots else {}
    manifest.save()
    atomic_write_text(cfg.run_dir / "report.md", render_report(manifest.data))
    atomic_write_json(cfg.run_dir / "report.json", report_json(manifest.data))
    return manifest.data


# ----------------------------------------------------------------------------------------------------------------
# the command


def load_pipeline_config(config: Path | None, overrides: list[str], quick: bool = False) -> PipelineConfig:
    """The ``gkd run`` config: the --quick preset (if asked), then the YAML file, then command-line overrides."""
    from gkd.kd.config import load_config

    return load_config(config, overrides, cls=PipelineConfig, updates=QUICK if quick else None)


@click.command("run")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A few-minute smoke version: small dataset, short schedules.")
def run(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Run the whole pipeline on the embedded synthetic dataset (or your own, via data_root=...).

    \b
    Stages, each recorded in runs/<name>/manifest.json:
      data             generate the synthetic dataset in data_root (if it has no train.json)
      teacher          train the teacher, its own seed, in 2 processes where 2 cores exist (or
                       teacher_checkpoint=PATH)                             -> runs/<name>/teacher/
      distill          distill the student with global knowledge            -> runs/<name>/distill/
      baseline         the same student without distillation (baseline=false: skip), trained at the same time
                       in a second process (side_by_side=false: after it)   -> runs/<name>/baseline/
      export           the distilled student: ONNX FP32/FP16/INT8, parity   -> runs/<name>/export/
      export-baseline  the baseline student, the same way                   -> runs/<name>/export-baseline/
      eval-teacher, eval-baseline   val mAP of the teacher and of the baseline's exports (on the free core
                       while the distilled student trains)                  -> runs/<name>/bench/
      bench            latency side by side (teacher, students, exports) and val mAP of the distilled exports
    The report (runs/<name>/report.md, report.json, PNG plots) opens with the deployment table: per precision,
    the baseline's and the distilled student's mAP on their exported files, the gain, p50/p90 latency. The
    gate makes the command exit 1 when it fails, naming the model and the numbers: the shipped student's FP32
    file detects, every file it ships is verified, its INT8 file is INT8 (>= 90% of the MACs) and loses at most
    1 - gate_min_ratio (default 0.99) of FP32's mAP beyond chance (paired bootstrap on the val split), and INT8
    p50 <= gate_max_int8_latency_ratio (default 1.0) x FP32 p50. gate_min_ratio=0 turns it off.

    \b
    Rerunning is cheap and safe. Each stage is keyed by what it depends on (its config, its inputs' SHA-256, gkd's
    version): an unchanged stage is reused, a changed one runs again with every stage after it, and a training
    stage interrupted by a kill resumes from its last finished epoch. The report says what ran and why. Every key
    is checked before any stage runs: a misspelt one is an error naming the closest valid key.

    \b
    Examples:
      gkd run
      gkd run --quick name=smoke
      gkd run teacher.train.epochs=4 student.model.backbone=resnet34 baseline=false
      gkd run teacher_checkpoint=my_teacher.pt data_root=data/mine
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.logs import setup_console_logging

    setup_console_logging()
    config, overrides = split_config_and_overrides(config, overrides)
    cfg = load_pipeline_config(config, overrides, quick)
    manifest = run_pipeline(cfg)
    click.echo(summary_text(manifest))
    click.echo(f"done: {cfg.run_dir}  (report.md with the plots, report.json, manifest.json)")
    gate = manifest.get("gate") or {}
    for line in gate.get("failures", []):
        click.echo(f"gkd run: gate failed: {line}", err=True)
    if gate.get("passed") is False:
        raise click.exceptions.Exit(1)  # the run finished and its files are kept; what it shipped fails the gate

