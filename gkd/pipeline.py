"""``gkd run``: the one-command pipeline, data -> teacher -> student -> export -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json``.

**Content-keyed stages.** Every stage has a key: the SHA-256 of what its result depends on (its resolved config,
the SHA-256 of its input files, gkd's version). A stage is reused only when its recorded key matches and its output
files are still there with the recorded SHA-256; otherwise it runs again, and so do the stages after it (their
inputs changed). The report names, for each stage, whether it ran or was reused and why ("changed:
student.train.lr 0.02 -> 0.01", "interrupted: resumed", "output modified: ...").

**Interrupted stages.** A training stage killed mid-run is resumed from its last finished epoch when the same
command runs again (the run folder's ``last.pt`` holds the exact config, so a resume is only done when that config
is the stage's current one); the result equals an uninterrupted run's on the same machine.

**Configs are resolved before anything runs.** The teacher and student configs (with this run's ``teacher.*`` /
``student.*`` sections merged in as data) are validated first, so a misspelt key stops the run with a one-line error
naming it and the closest valid key, before any stage starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import click
from gkd.kd import CONFIG_DIR
from gkd.report import STUDENTS, accuracy_gate, render_report, report_json, summary_text, write_plots

__all__ = ["PipelineConfig", "run_pipeline", "resolve_stage_configs", "run", "QUICK"]

log = logging.getLogger("gkd")
#: config keys that do not change a training stage's result (they are left out of its key)
UNKEYED = ("train.threads", "data.num_workers", "train.dist_timeout_s")


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
    synth_preset: Literal["clean", "cluttered"] = "clean"
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
    #: also train the student without distillation (same schedule, data order and seed) and export it, so that the
    #: report says what distillation bought at each deployed precision
    baseline: bool = True
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

    RANGES: ClassVar[dict] = {"gate_min_ratio": ((">=", 0), ("<=", 10)), "synth_images": ((">=", 2),),
                              "bench_iterations": ((">=", 1),), "bench_images": ((">=", 1),)}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: the --quick preset: a small dataset and short schedules (the user's keys are applied over it)
QUICK: dict[str, Any] = {
    "name": "quick", "data_root": "data/synth-quick", "synth_images": 60, "synth_size": 128, "bench_iterations": 5,
    "teacher": {"train": {"epochs": 2}, "model": {"min_size": 128, "max_size": 128}},
    "student": {"train": {"epochs": 2, "max_steps_per_epoch": 3}, "model": {"min_size": 128, "max_size": 128},
                "distill": {"pgm": {"min_box_size": 8}}},
}


# ----------------------------------------------------------------------------------------------------------------
# stage configs


@dataclass(frozen=True)
class StageConfigs:
    """The resolved run configs of the training stages (``teacher`` is None when a checkpoint is given)."""

    teacher: Any
    distill: Any
    baseline: Any


def _stage_updates(cfg: PipelineConfig, stage: str, section: dict, prefix: str) -> dict:
    """The user's ``teacher.*`` / ``student.*`` section under this run's fixed keys (stage folder, data, seed)."""
    from gkd.kd.config import merge_dicts
    from gkd.kd.errors import GkdError

    for key in ("name", "runs_dir"):
        if key in section:
            raise GkdError(f"{prefix}{key}: set by gkd run (runs/<name>/<stage>/); use {key}=... for the whole run")
    seed = cfg.teacher_seed if stage == "teacher" else cfg.seed
    fixed = {"runs_dir": str(cfg.run_dir), "name": stage, "seed": seed, "data": {"root": cfg.data_root}}
    return merge_dicts(fixed, section)


def resolve_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Validate and resolve every training stage's config before any stage runs (one-line errors name the key)."""
    from gkd.kd.config import RunConfig, load_config, merge_dicts
    from gkd.kd.distill.config import DistillRunConfig

    teacher = None
    if not cfg.teacher_checkpoint:
        teacher = load_config(cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
                              updates=_stage_updates(cfg, "teacher", cfg.teacher, "teacher."))
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

    return StageConfigs(teacher=teacher, distill=student("distill", None),
                        baseline=student("baseline", "none") if cfg.baseline else None)


# ----------------------------------------------------------------------------------------------------------------
# the manifest and content keys


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import subprocess

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("gkd", "torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "pycocotools", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _artifact(path: Path) -> dict[str, str]:
    from gkd.kd.io import file_sha256

    return {"path": str(path), "sha256": file_sha256(path)}


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _artifacts_in(record: Any) -> list[dict]:
    """Every ``{"path", "sha256"}`` artifact recorded anywhere in a stage record."""
    if isinstance(record, dict):
        if set(record) == {"path", "sha256"}:
            return [record]
        return [a for v in record.values() for a in _artifacts_in(v)]
    if isinstance(record, list):
        return [a for v in record for a in _artifacts_in(v)]
    return []


@dataclass
class Outcome:
    """What one stage did in this invocation."""

    stage: str
    action: str  # "reused" | "ran"
    reason: str
    seconds: float = 0.0


class Manifest:
    """``runs/<name>/manifest.json``: one record per stage (key, inputs, outputs), rewritten atomically."""

    VERSION = 2

    def __init__(self, path: Path, cfg: PipelineConfig):
        from gkd.kd.config import to_dict
        from gkd.kd.io import read_json

        self.path = path
        old = read_json(path, "manifest") if path.exists() else {}
        stages = old.get("stages") if isinstance(old, dict) and old.get("version") == self.VERSION else None
        # an older manifest's records carry no keys: its stages run again
        self.data: dict[str, Any] = {"format": "gkd-manifest", "version": self.VERSION, "command": sys.argv,
                                     "config": to_dict(cfg), "versions": _versions(),
                                     "stages": stages if isinstance(stages, dict) else {}}

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def write(self, stage: str, record: dict[str, Any]) -> None:
        self.stages[stage] = record
        self.save()

    def save(self) -> None:
        from gkd.kd.io import atomic_write_json

        atomic_write_json(self.path, self.data)


def _why_run(old: dict | None, key: str, inputs: dict[str, Any], prefix: str = "") -> str | None:
    """Why a stage must run (None: its recorded result can be reused).

    ``prefix`` is how the user spells the stage's config keys (``student.`` for ``student.train.lr``)."""
    from gkd.kd.config import config_differences
    from gkd.kd.io import file_sha256

    if not old:
        return "not run before"
    if old.get("key") != key:
        diffs = config_differences(old.get("inputs", {}), inputs)
        shown = [f"{prefix}{k.removeprefix('config.')} {a!r} -> {b!r}" if k.startswith("config.")
                 else f"input {k.split('.')[0]!r}" for k, a, b in diffs]
        shown = list(dict.fromkeys(shown))  # one line per changed input, however many of its hashes changed
        more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
        return "changed: " + ", ".join(shown[:3]) + more
    if old.get("status") != "done":
        return "interrupted earlier (a training stage resumes from its last finished epoch)"
    for art in _artifacts_in(old.get("outputs", {})):
        p = Path(art["path"])
        if not p.is_file():
            return f"output missing: {p}"
        if file_sha256(p) != art["sha256"]:
            return f"output modified since it was made: {p}"
    return None


class Progress:
    """One line per stage: ``[3/7] distill: running (why); 160 steps; ETA ...``, then its time and the run's."""

    def __init__(self, stages: list[str]):
        self.stages = stages
        self.t0 = time.perf_counter()

    def tag(self, stage: str) -> str:
        n = self.stages.index(stage) + 1 if stage in self.stages else 0
        return f"[{n}/{len(self.stages)}] {stage}"

    def start(self, stage: str, reason: str, work: str, old: dict | None) -> None:
        # the best estimate before a step has run: this stage's last run (a changed key rarely changes its cost)
        eta = f"; ETA ~{_fmt_s(old['seconds'])} (its last run)" if (old or {}).get("seconds") else ""
        log.info("%s: running (%s)%s%s", self.tag(stage), reason, f"; {work}" if work else "", eta)

    def done(self, stage: str, seconds: float) -> None:
        log.info("%s: done in %s (run so far %s)", self.tag(stage), _fmt_s(seconds),
                 _fmt_s(time.perf_counter() - self.t0))


def _fmt_s(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _run_stage(manifest: Manifest, outcomes: list[Outcome], progress: Progress, stage: str, inputs: dict[str, Any],
               fn: Callable[[], dict[str, Any]], prefix: str = "", work: str = "") -> dict[str, Any]:
    """Reuse or run ``stage``; returns its record (``outputs``, ``metrics``, ...)."""
    from gkd import __version__

    inputs = {**inputs, "gkd": __version__}
    key = _key(inputs)
    old = manifest.stages.get(stage)
    reason = _why_run(old, key, inputs, prefix)
    if reason is None:
        log.info("%s: reused (key %s, unchanged)", progress.tag(stage), key[:12])
        outcomes.append(Outcome(stage, "reused", "unchanged"))
        return old
    progress.start(stage, reason, work, old)
    # the last run's seconds stay in the record while it runs: a run killed now still has an ETA next time
    manifest.write(stage, {"status": "running", "key": key, "inputs": inputs, "command": sys.argv,
                           **({"seconds": old["seconds"]} if (old or {}).get("seconds") else {})})
    t0 = time.perf_counter()
    info = fn()
    seconds = round(time.perf_counter() - t0, 1)
    record = {"status": "done", "key": key, "inputs": inputs, "command": sys.argv, "seconds": seconds, **info}
    manifest.write(stage, record)
    outcomes.append(Outcome(stage, "ran", reason, seconds))
    progress.done(stage, seconds)
    return record


def _train_images(train_json: Path) -> int | None:
    """How many images the training split holds (None when it cannot be read: the stage itself says why)."""
    from gkd.kd.data.coco import load_coco
    from gkd.kd.errors import GkdError

    try:
        return len(load_coco(train_json).images)
    except GkdError:
        return None


def _training_work(run_cfg, n_images: int | None) -> str:
    """``"3 epochs x 80 steps of 8 images"`` (the steps per epoch capped by ``max_steps_per_epoch``)."""
    import math

    if n_images is None:
        return ""
    per_epoch = math.ceil(n_images / run_cfg.train.batch_size)
    if run_cfg.train.max_steps_per_epoch:
        per_epoch = min(per_epoch, run_cfg.train.max_steps_per_epoch)
    return f"{run_cfg.train.epochs} epochs x {per_epoch} steps of {run_cfg.train.batch_size} images"


# ----------------------------------------------------------------------------------------------------------------
# the stages


def _synth_params(cfg: PipelineConfig) -> dict[str, Any]:
    return {"n_images": cfg.synth_images, "seed": cfg.seed, "image_size": cfg.synth_size, "val_fraction": 0.2,
            "preset": cfg.synth_preset}


def _generated_here(root: Path) -> dict | None:
    """The generator's meta.json of ``root`` (None when the data there is not gkd's synthetic data)."""
    meta = root / "meta.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "gkd.synth" else None


def _data_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    # what the stage would generate; the data's own content is keyed through its outputs' SHA-256 (a changed
    # train.json or val.json reruns the stages after it)
    return {"data_root": str(Path(cfg.data_root)), "synthetic": _synth_params(cfg)}


def _data_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """Generate the synthetic dataset into ``data_root`` when it holds none; otherwise use what is there."""
    from gkd.kd.data import generate_synthetic
    from gkd.kd.errors import GkdError

    root = Path(cfg.data_root)
    want = _synth_params(cfg)
    if not (root / "train.json").is_file():
        generate_synthetic(root, **want, progress=True)
    else:
        meta = _generated_here(root)
        other = {k: meta.get(k) for k in want if meta.get(k) != want[k]} if meta else {}
        log.info("data: using the dataset in %s%s", root, f" (generated with {other}; synth_* apply to an empty "
                 f"data_root only)" if other else "")
    if not (root / "val.json").is_file():
        raise GkdError(f"{root}: holds train.json but no val.json; gkd run needs both (and images/)")
    return {"outputs": {"train": _artifact(root / "train.json"), "val": _artifact(root / "val.json")}}


def _training_inputs(run_cfg, **inputs: Any) -> dict[str, Any]:
    from gkd.kd.config import to_dict

    config = to_dict(run_cfg)
    for dotted in UNKEYED:
        section, key = dotted.split(".")
        config.get(section, {}).pop(key, None)
    return {"config": config, **inputs}


def _prepare_run_dir(run_cfg) -> bool:
    """Whether the stage's run folder holds an interrupted run of exactly this config (then resume it).

    A folder made with another config (or without a finished epoch) belongs to a superseded result of this same
    stage: it is removed, so that the stage starts clean.
    """
    from gkd.kd.checkpoint import load_checkpoint
    from gkd.kd.config import config_differences, to_dict

    last = run_cfg.run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        saved = load_checkpoint(last).get("config", {})
        wanted = to_dict(run_cfg)
        if not wanted["model"]["num_classes"]:  # 0 = the dataset's class count, which the run recorded
            wanted["model"]["num_classes"] = saved.get("model", {}).get("num_classes", 0)
        diffs = [k for k, _, _ in config_differences(saved, wanted) if k not in UNKEYED]
        if not diffs:
            log.info("resuming the interrupted run in %s", run_cfg.run_dir)
            return True
        log.info("removing %s: made with another config (%s)", run_cfg.run_dir, ", ".join(diffs[:3]))
    if run_cfg.run_dir.exists():
        shutil.rmtree(run_cfg.run_dir)
    return False


def _training_result(run_cfg, record: dict[str, Any]) -> dict[str, Any]:
    return {"outputs": {"checkpoint": _artifact(run_cfg.run_dir / "checkpoints" / "model.pt")},
            "metrics": {k: v for k, v in record.items() if k.startswith("val/")}}


def _teacher_stage(run_cfg) -> dict[str, Any]:
    from gkd.kd.train import train_detector

    return _training_result(run_cfg, train_detector(run_cfg, resume=_prepare_run_dir(run_cfg)))


def _student_stage(run_cfg) -> dict[str, Any]:
    from gkd.kd.distill.run import run_distillation

    record = run_distillation(run_cfg, resume=_prepare_run_dir(run_cfg))
    return {**_training_result(run_cfg, record), "method": run_cfg.distill.method}


def _export_stage(cfg: PipelineConfig, student_ckpt: Path, out: Path, rtx_check: bool = True) -> dict[str, Any]:
    """``gkd export`` of one student. ``rtx_check`` False skips the TensorRT-RTX parse/build check (the baseline's
    graph is the distilled student's, checked in its own export: building it twice on a CPU costs a minute)."""
    from gkd.export.pipeline import ExportOptions, export_checkpoint

    data = Path(cfg.data_root)
    manifest = export_checkpoint(ExportOptions(checkpoint=student_ckpt, out=out, precisions=tuple(cfg.precisions),
                                               calib_data=data / "train.json", val_data=data / "val.json",
                                               seed=cfg.seed, tensorrt_rtx="auto" if rtx_check else "off"),
                                 log=log.info)
    files = {p: {"onnx": _artifact(out / f["onnx"]), "verified": f["verified"]} for p, f in manifest["files"].items()}
    return {"dir": str(out), "outputs": {"files": files}, "parity": manifest["parity"]["results"],
            "tensorrt": manifest.get("tensorrt")}


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


def _bench_stage(cfg: PipelineConfig, models: list[tuple[str, Path, str]]) -> dict[str, Any]:
    """Latency (round-robin, side by side) and val mAP of the teacher, both students and their exports."""
    from gkd.bench.accuracy import evaluate_models
    from gkd.bench.artifacts import ModelSpec, model_kind
    from gkd.bench.harness import TimingPolicy
    from gkd.bench.latency import benchmark_models
    from gkd.export.manifest import parity_verdict
    from gkd.kd.errors import GkdError
    from gkd.kd.io import atomic_write_json

    out = cfg.run_dir / "bench"
    val = Path(cfg.data_root) / "val.json"
    timed, skipped = [], {}
    for group, path, precision in models:
        kind = model_kind(path)
        if kind == "onnx" and precision == "fp16":
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
    subsets = HARD_SUBSETS if _has_attributes(val) else ()
    exports = [(g, p) for g, p, _ in models if model_kind(p) == "onnx"]
    acc = evaluate_models([p for _, p in exports], val, groups=[g for g, _ in exports], threads=ACCURACY_THREADS,
                          subsets=subsets, log=log.info)
    try:  # the teacher too, when it speaks the data's label space (a given COCO teacher may not)
        acc["models"].update(evaluate_models([models[0][1]], val, groups=["teacher"], threads=ACCURACY_THREADS,
                                             subsets=subsets, log=log.info)["models"])
    except GkdError as exc:
        acc["skipped"]["teacher"] = str(exc)
        log.info("teacher: not evaluated on %s (%s)", val, exc)
    atomic_write_json(out / "latency.json", lat)
    for r in acc["models"].values():
        r.pop("detections", None)  # ~100 boxes per image per model: `gkd eval` writes them when asked
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
    return {"outputs": {"latency": _artifact(out / "latency.json"), "accuracy": _artifact(out / "accuracy.json")},
            "device": "cpu", "threads": BENCH_THREADS, "runners": runners, "skipped": lat["skipped"], "speed": speed,
            "subsets": {n: {k: v["bbox_mAP"] for k, v in acc["models"][n]["subsets"].items()}
                        for n in keep if n in acc["models"] and acc["models"][n]["subsets"]},
            "per_class": {n: acc["models"][n]["per_class_AP"] for n in keep if n in acc["models"]},
            "samples_ms": {n: r["raw_times_ms"] for n, r in lat["runners"].items()}}


def _has_attributes(val: Path) -> bool:
    from gkd.kd.data.coco import load_coco

    return any("attributes" in a for anns in load_coco(val).anns_by_image.values() for a in anns)


def _sha(record: dict[str, Any], *path: str) -> str:
    node: Any = record["outputs"]
    for p in path:
        node = node[p]
    return node["sha256"]


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage whose key changed; return the manifest dict (also in ``runs/<name>/manifest.json``).

    ``manifest["invocation"]`` lists what each stage did this time (reused / ran / resumed, and why).
    """
    from gkd.kd.errors import GkdError

    stage_cfgs = resolve_stage_configs(cfg)  # before anything runs: a bad key costs nothing
    if cfg.teacher_checkpoint and not Path(cfg.teacher_checkpoint).is_file():
        raise GkdError(f"teacher_checkpoint: {cfg.teacher_checkpoint}: file not found")
    from gkd.kd.io import RunLock

    with RunLock(cfg.run_dir):  # one gkd run per run folder at a time
        return _run_stages(cfg, stage_cfgs)


def _run_stages(cfg: PipelineConfig, stage_cfgs: StageConfigs) -> dict[str, Any]:
    from gkd.kd.io import atomic_write_json, atomic_write_text

    manifest = Manifest(cfg.run_dir / "manifest.json", cfg)
    outcomes: list[Outcome] = []
    planned = ["data", "teacher", "distill"] + (["baseline"] if cfg.baseline else [])
    if cfg.precisions:
        planned += ["export"] + (["export-baseline"] if cfg.baseline else []) + (["bench"] if cfg.bench else [])
    progress = Progress(planned)

    def stage(name: str, inputs: dict[str, Any], fn: Callable[[], dict[str, Any]], prefix: str = "",
              work: str = "") -> dict:
        return _run_stage(manifest, outcomes, progress, name, inputs, fn, prefix, work)

    data = stage("data", _data_inputs(cfg), lambda: _data_stage(cfg))
    data_shas = {"train.json": _sha(data, "train"), "val.json": _sha(data, "val")}
    n_train = _train_images(Path(data["outputs"]["train"]["path"]))  # read once, for the progress lines
    if stage_cfgs.teacher is None:
        path = Path(cfg.teacher_checkpoint)
        teacher = stage("teacher", {"given": _artifact(path)}, lambda: {"outputs": {"checkpoint": _artifact(path)},
                                                                        "metrics": {}})
    else:
        teacher = stage("teacher", _training_inputs(stage_cfgs.teacher, data=data_shas),
                        lambda: _teacher_stage(stage_cfgs.teacher), "teacher.", _training_work(stage_cfgs.teacher, n_train))
    teacher_sha = _sha(teacher, "checkpoint")
    students = [("distill", stage_cfgs.distill)] + ([("baseline", stage_cfgs.baseline)] if cfg.baseline else [])
    for name, run_cfg in students:
        stage(name, _training_inputs(run_cfg, data=data_shas, teacher=teacher_sha),
              lambda run_cfg=run_cfg: _student_stage(run_cfg), "student.", _training_work(run_cfg, n_train))
    trained = {STUDENTS[name]: manifest.stages[name] for name, _ in students}
    if cfg.precisions:
        exported = {}
        for group, record in trained.items():
            ckpt = Path(record["outputs"]["checkpoint"]["path"])
            folder = "export" if group == "distilled" else "export-baseline"
            export_inputs = {"config": {"precisions": list(cfg.precisions), "seed": cfg.seed},
                             "student": _sha(record, "checkpoint"), "data": data_shas}
            exported[group] = stage(folder, export_inputs, lambda ckpt=ckpt, folder=folder: _export_stage(
                cfg, ckpt, cfg.run_dir / folder, rtx_check=folder == "export"))
        if cfg.bench:
            models = _bench_models(Path(teacher["outputs"]["checkpoint"]["path"]),
                                   {g: (Path(trained[g]["outputs"]["checkpoint"]["path"]), exported[g])
                                    for g in trained})
            bench_inputs = {"config": {"bench_iterations": cfg.bench_iterations, "bench_images": cfg.bench_images},
                            "teacher": teacher_sha, "student": {g: _sha(r, "checkpoint") for g, r in trained.items()},
                            "exports": {f"{g}/{p}": f["onnx"]["sha256"] for g, e in exported.items()
                                        for p, f in e["outputs"]["files"].items()}, "data": data_shas}
            stage("bench", bench_inputs, lambda: _bench_stage(cfg, models))
    manifest.data["invocation"] = [dataclasses.asdict(o) for o in outcomes]
    manifest.data["gate"] = accuracy_gate(manifest.stages.get("bench") if cfg.precisions and cfg.bench else None,
                                          cfg.gate_min_ratio)
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
      teacher          train the teacher, its own seed (or teacher_checkpoint=PATH) -> runs/<name>/teacher/
      distill          distill the student with global knowledge            -> runs/<name>/distill/
      baseline         the same student without distillation (baseline=false: skip) -> runs/<name>/baseline/
      export           the distilled student: ONNX FP32/FP16/INT8, parity   -> runs/<name>/export/
      export-baseline  the baseline student, the same way                   -> runs/<name>/export-baseline/
      bench            latency side by side (teacher, students, exports) and val mAP of every export
    The report (runs/<name>/report.md, report.json, PNG plots) opens with the deployment table: per precision,
    the baseline's and the distilled student's mAP on their exported files, the gain, p50/p90 latency. The
    accuracy gate (gate_min_ratio, default 0.99: the shipped student's INT8 mAP >= 99% of its FP32 mAP, and
    FP32 must detect) makes the command exit 1 when it fails, naming the model and the numbers;
    gate_min_ratio=0 turns it off.

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
    from gkd.kd.cli import split_config_and_overrides
    from gkd.kd.logs import setup_console_logging

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
