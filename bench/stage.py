"""The evaluation and benchmark stages of ``gkd run``: typed specs in, frozen results out.

:func:`evaluate_stage` scores models on the val split (overall, per class, on the synthetic data's hard cases);
:func:`bench_stage` times every model side by side (one round-robin measurement) and scores the exports not yet
scored, then joins both into one table per runner (``teacher/pytorch-fp32``, ``distilled/onnxruntime-int8``...).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.core.io import atomic_write_json
from gkd.core.records import Artifact, result_fields
from gkd.kd.config import HARD_CASES

__all__ = ["evaluate_checkpoint", "EvalSpec", "Evaluation", "evaluate_stage", "BenchSpec", "BenchResult", "bench_stage", "hard_cases_of",
           "BENCH_THREADS", "ACCURACY_THREADS"]

log = logging.getLogger("gkd")
#: CPU threads of the latency measurement (batch 1 on one core: the number an edge device's single stream sees)
BENCH_THREADS = 1
#: threads of the mAP evaluation (not timed: it may use both cores of the reference machine)
ACCURACY_THREADS = 2
#: the runners whose per-subset and per-class AP the report shows
REPORTED = ("teacher/pytorch-fp32", "distilled/onnxruntime-fp32", "baseline/onnxruntime-fp32")


def hard_cases_of(val: Path) -> tuple[str, ...]:
    """The hard-case subsets to score on ``val``: the synthetic generator's tags when its boxes carry them."""
    from gkd.kd.data.coco import load_coco

    tagged = any("attributes" in a for anns in load_coco(val).anns_by_image.values() for a in anns)
    return HARD_CASES if tagged else ()


def evaluate_checkpoint(checkpoint: Path, val: Path, threads: int = 1) -> dict[str, Any]:
    """COCO metrics of a detector checkpoint on ``val``, overall (``all``), on each hard subset, and per class
    (``per_class``: class name -> AP, -1 where the class has no val instance): ``gkd eval``'s protocol."""
    from .accuracy import evaluate_models

    [result] = evaluate_models([checkpoint], val, threads=threads, subsets=HARD_CASES,
                               log=log.debug)["models"].values()
    return {"all": result["metrics"], **result["subsets"], "per_class": result["per_class_AP"]}


@dataclass(frozen=True)
class EvalSpec:
    """Val mAP of ``models`` (``(group, path)``), written to ``out``. ``optional``: a model outside the data's
    label space (a given COCO teacher) is skipped with why instead of failing the stage."""

    models: tuple[tuple[str, Path], ...]
    val: Path
    out: Path
    threads: int
    optional: bool = False


@dataclass(frozen=True)
class Evaluation:
    accuracy: Artifact
    models: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"outputs": {"accuracy": self.accuracy.record()}, "models": self.models, "skipped": self.skipped}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Evaluation":
        return cls(Artifact.from_record(record["outputs"]["accuracy"]), record["models"], record["skipped"])


def _scores(models: list[tuple[str, Path]], val: Path, threads: int) -> dict[str, Any]:
    from .accuracy import evaluate_models

    acc = evaluate_models([p for _, p in models], val, groups=[g for g, _ in models], threads=threads,
                          subsets=hard_cases_of(val), log=log.info)
    for r in acc["models"].values():
        r.pop("detections", None)  # ~100 boxes per image per model: `gkd eval` writes them when asked
    return acc


def evaluate_stage(spec: EvalSpec) -> Evaluation:
    """Val mAP of ``spec.models`` (overall, per class, on the hard subsets) in ``spec.out``."""
    from gkd.core.errors import GkdError

    try:
        acc = _scores(list(spec.models), spec.val, spec.threads)
    except GkdError as exc:
        if not spec.optional:
            raise
        acc = {"models": {}, "skipped": {spec.models[0][0]: str(exc)}}
        log.info("%s: not evaluated on %s (%s)", spec.models[0][0], spec.val, exc)
    atomic_write_json(spec.out, acc)
    return Evaluation(Artifact.of(spec.out), acc["models"], acc["skipped"])


@dataclass(frozen=True)
class BenchSpec:
    """Every model to time (``(group, path, precision)``), the evaluations already made (their exports are not
    scored twice), the val split, the output folder and the timing budget. ``students``: the groups whose PyTorch
    mAP is their verified FP32 export's (parity-checked against it: not evaluated twice)."""

    models: tuple[tuple[str, Path, str], ...]
    evaluations: tuple[Evaluation, ...]
    val: Path
    out: Path
    iterations: int
    images: int
    students: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchResult:
    """``latency.json`` and ``accuracy.json``, and the joined table (runners, speed-up, subsets, per class)."""

    latency: Artifact
    accuracy: Artifact
    details: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"outputs": {"latency": self.latency.record(), "accuracy": self.accuracy.record()}, **self.details}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "BenchResult":
        out = record["outputs"]
        details = result_fields(record, "outputs")
        return cls(Artifact.from_record(out["latency"]), Artifact.from_record(out["accuracy"]), details)


def bench_stage(spec: BenchSpec) -> BenchResult:
    """Latency (round-robin, side by side) of every model of ``spec``; val mAP of the exports not evaluated yet."""
    from gkd.export.manifest import parity_verdict

    from .artifacts import ModelSpec, model_kind
    from .harness import TimingPolicy
    from .latency import benchmark_models, untimed_on_cpu

    timed, skipped = [], {}
    for group, path, precision in spec.models:
        kind = model_kind(path)
        why = untimed_on_cpu(kind, precision)
        if why:  # its accuracy is measured all the same
            skipped[f"{group}/onnxruntime-{precision}"] = why
            continue
        timed.append((group, ModelSpec(path, kind)))
    lat = benchmark_models([s for _, s in timed], spec.val, threads=BENCH_THREADS,
                           policy=TimingPolicy.fixed(5, spec.iterations), latency_images=spec.images,
                           groups=[g for g, _ in timed], log=log.info)
    lat["skipped"].update(skipped)
    evaluated = {r["path"] for e in spec.evaluations for r in e.models.values()}
    exports = [(g, p) for g, p, _ in spec.models if model_kind(p) == "onnx" and str(p) not in evaluated]
    acc = _scores(exports, spec.val, ACCURACY_THREADS) if exports else {"models": {}, "skipped": {}}
    for e in spec.evaluations:  # one table of every model's accuracy, whichever stage scored it
        acc["models"].update(e.models)
        acc["skipped"].update(e.skipped)
    atomic_write_json(spec.out / "latency.json", lat)
    atomic_write_json(spec.out / "accuracy.json", acc)
    runners: dict[str, dict[str, Any]] = {}
    for name, r in lat["runners"].items():
        runners[name] = {"p50_ms": r["latency"]["p50"], "p90_ms": r["latency"]["p90"], "provider": r["provider"],
                         "verified": r["verified"], "bbox_mAP": None}
    for name, r in acc["models"].items():
        runners.setdefault(name, {"p50_ms": None, "p90_ms": None, "provider": r["provider"], "verified": None})
        runners[name]["bbox_mAP"] = r["metrics"]["bbox_mAP"]
        if r["kind"] == "onnx" and runners[name]["verified"] is None:
            runners[name]["verified"] = parity_verdict(r["path"])
    for group in spec.students:
        pt, onnx = runners.get(f"{group}/pytorch-fp32"), runners.get(f"{group}/onnxruntime-fp32") or {}
        if pt is not None and pt["bbox_mAP"] is None:
            pt["bbox_mAP_source"] = f"{group}/onnxruntime-fp32 (verified export of this checkpoint)"
            pt["bbox_mAP"] = onnx.get("bbox_mAP") if onnx.get("verified") else None
    teacher, student = runners.get("teacher/pytorch-fp32") or {}, runners.get("distilled/pytorch-fp32") or {}
    speed = {}
    if teacher.get("p50_ms") and student.get("p50_ms"):
        speed = {"teacher_p50_ms": teacher["p50_ms"], "student_p50_ms": student["p50_ms"],
                 "teacher_over_student_p50": teacher["p50_ms"] / student["p50_ms"]}
    details = {"device": "cpu", "threads": BENCH_THREADS, "runners": runners, "skipped": lat["skipped"],
               "speed": speed,
               "subsets": {n: {k: v["bbox_mAP"] for k, v in acc["models"][n]["subsets"].items()}
                           for n in REPORTED if n in acc["models"] and acc["models"][n]["subsets"]},
               "per_class": {n: acc["models"][n]["per_class_AP"] for n in REPORTED if n in acc["models"]},
               "samples_ms": {n: r["raw_times_ms"] for n, r in lat["runners"].items()}}
    return BenchResult(Artifact.of(spec.out / "latency.json"), Artifact.of(spec.out / "accuracy.json"), details)
