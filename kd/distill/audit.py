"""Do the robust weights single out what the teacher gets wrong? An audit of the Robust Distillation Module.

The paper's claim for the robust weights (docs/method.md, section 2.3) is that they filter noisy knowledge: an
instance the teacher represents badly gets a lower weight. This audit measures it on a distillation run's own data:
it builds the prototype bank as the run's first refresh does (same student start, teacher, PGM settings and seed),
computes each training instance's robust weight at its own level (the one its foreground mask and soft label use),
and groups the weights by what the teacher does with the instance, by class, by level and by difficulty tag.

What the teacher does with a ground-truth box (:func:`teacher_outcome`): its most confident detection overlapping
the box (IoU >= 0.5, score >= 0.05) has the box's class ("right") or another class ("confused"), or no detection
overlaps it ("missed"). Because the weights depend strongly on the level (small boxes on the finest level get lower
weights whatever the teacher does), the comparison that answers the question is within a level:
``within_level``, the count-weighted mean over levels of (mean weight of "right" - mean weight of "confused" /
"missed").

    python -m gkd.kd.distill.audit runs/<run>/config.yaml [--student CKPT] [--images N] [--out F.json]
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["teacher_outcome", "audit_robust_weights", "summarize_weights", "within_level", "OUTCOMES", "AuditSpec",
           "Audit", "audit_stage"]

#: what the teacher does with a ground-truth box
OUTCOMES = ("right", "confused", "missed")


def teacher_outcome(det: dict[str, torch.Tensor], gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                    score: float = 0.05, iou: float = 0.5) -> list[str]:
    """What the teacher says of each ground-truth box.

    Args:
        det: the teacher's detections of the image (``boxes [D, 4]`` xyxy, ``labels [D]``, ``scores [D]``).
        gt_boxes: ``[G, 4]`` xyxy in the same pixels; gt_labels: ``[G]``.
        score / iou: the detections considered, and the overlap that counts as covering the box.

    Returns:
        Per box, ``"right"`` (the most confident detection with IoU >= ``iou`` is of the box's class),
        ``"confused"`` (it is of another class) or ``"missed"`` (no detection overlaps it that much).
    """
    from torchvision.ops import box_iou

    keep = det["scores"] >= score
    boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
    if boxes.numel() == 0 or gt_boxes.numel() == 0:
        return ["missed"] * len(gt_boxes)
    ious = box_iou(gt_boxes.float(), boxes.float())  # [G, D]
    out = []
    for g in range(len(gt_boxes)):
        hit = ious[g] >= iou
        if not hit.any():
            out.append("missed")
            continue
        best = torch.where(hit, scores, torch.full_like(scores, -1.0)).argmax()
        out.append("right" if int(labels[best]) == int(gt_labels[g]) else "confused")
    return out


def _stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """n, mean and std of the rows' weights; where the rows carry them, the mean of each network's best cosine to its
    own class's prototypes (``student_cos`` / ``teacher_cos``: the two terms the weight compares)."""
    t = torch.tensor([r["w"] for r in rows], dtype=torch.float64)
    out = {"n": len(rows), "mean": round(float(t.mean()), 4) if rows else None,
           "std": round(float(t.std()), 4) if len(rows) > 1 else 0.0}
    for key, name in (("cos_s", "student_cos"), ("cos_t", "teacher_cos")):
        if rows and all(key in r for r in rows):
            out[name] = round(sum(r[key] for r in rows) / len(rows), 4)
    return out


def within_level(rows: list[dict[str, Any]], part: Any, rest: Any, value: str = "w") -> float | None:
    """The count-weighted mean over levels of (mean ``value`` of the rows in ``rest`` - mean ``value`` of those in
    ``part``), over the levels where both occur (``part`` / ``rest``: predicates on a row; ``value``: ``w``, the
    robust weight, or ``cos_t`` / ``cos_s``); None where none does.

    The weights fall with the level (small boxes on the finest one), so pooled means mix a level effect into any
    comparison between groups that sit on different levels; within a level they do not."""
    num = den = 0.0
    for lv in sorted({r["level"] for r in rows}):
        a = [r[value] for r in rows if r["level"] == lv and part(r)]
        b = [r[value] for r in rows if r["level"] == lv and rest(r)]
        if a and b:
            n = len(a) + len(b)
            num += n * (sum(b) / len(b) - sum(a) / len(a))
            den += n
    return round(num / den, 4) if den else None


def summarize_weights(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Group per-instance rows (``w``, ``outcome``, ``class``, ``level``, ``tags``, optionally ``cos_s`` / ``cos_t``)
    into the audit's summary: ``groups`` (name -> :func:`_stats`) and ``within_level`` (:func:`within_level`): for
    "confused" and "missed", ``right - <outcome>``; for each class and each tag, ``others - class <c>`` /
    ``others - tag <t>`` (what a positive control's defective part should show: a positive value), and where the
    rows carry it, the same for the teacher's cosine (``teacher cos: others - tag <t>``: is the part atypical of
    its class in the teacher's features?)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        for name in ("all", f"teacher {r['outcome']}", f"class {r['class']}",
                     f"class {r['class']} / teacher {r['outcome']}", f"level {r['level']}",
                     f"level {r['level']} / teacher {r['outcome']}", *(f"tag {t}" for t in r["tags"] or ["clean"])):
            groups[name].append(r)
    right = lambda r: r["outcome"] == "right"  # noqa: E731
    within: dict[str, float | None] = {
        f"right - {other}": within_level(rows, lambda r, o=other: r["outcome"] == o, right) for other in OUTCOMES[1:]}
    values = ["w", *(["cos_t"] if rows and all("cos_t" in r for r in rows) else [])]
    prefix = {"w": "", "cos_t": "teacher cos: "}
    for v in values:
        for c in sorted({r["class"] for r in rows}):
            within[f"{prefix[v]}others - class {c}"] = within_level(rows, lambda r: r["class"] == c,
                                                                    lambda r: r["class"] != c, v)
        for t in sorted({t for r in rows for t in r["tags"]}):
            within[f"{prefix[v]}others - tag {t}"] = within_level(rows, lambda r: t in r["tags"],
                                                                  lambda r: t not in r["tags"], v)
    return {"groups": {name: _stats(v) for name, v in sorted(groups.items())}, "within_level": within}


def audit_robust_weights(cfg: Any, student_checkpoint: str | Path | None = None, max_images: int | None = None,
                         threads: int | None = None) -> dict[str, Any]:
    """The robust weights of a distillation run's training instances, against what its teacher does with them.

    Args:
        cfg: a resolved :class:`~gkd.kd.distill.config.DistillRunConfig` whose method uses prototypes.
        student_checkpoint: the student to audit (default: the run's start, ``model.weights`` or its seeded init).
        max_images: audit only the first N training images (None: all); the prototypes always come from the
            whole PGM sample, as in training.
        threads: torch threads (None: unchanged).

    Returns:
        ``{"images", "instances", "groups", "within_level", "student", "teacher"}`` (see :func:`summarize_weights`).
    """
    from gkd.core.errors import GkdError

    from ..data import CocoDetection
    from ..engine import seed_everything
    from ..train import build_model, load_splits
    from .config import uses_prototypes
    from .levels import assign_levels
    from .ops import prototype_project
    from .robust import max_same_class_cos, weight_from_best
    from .run import build_task, load_teacher

    if not uses_prototypes(cfg.distill):
        raise GkdError(f"distill.method={cfg.distill.method}: has no robust weights to audit; expected a method "
                       f"with prototypes (robust, gkd)")
    if threads:
        torch.set_num_threads(int(threads))
    if student_checkpoint is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(student_checkpoint)))
    train_index, _ = load_splits(cfg)
    k = len(train_index.classes)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k))
    teacher = load_teacher(cfg.distill.teacher, train_index.classes, cfg.model)
    seed_everything(cfg.seed)
    student = build_model(cfg, k, train_index.classes)
    task = build_task(cfg, student, teacher, train_index)
    device = torch.device("cpu")
    task._refresh(device, "audit")  # the run's first refresh: same sample, same models
    student.eval()
    teacher.eval()
    bank = task.bank
    data = CocoDetection(train_index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
    n_images = len(data) if max_images is None else min(len(data), int(max_images))
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for i in range(n_images):
            anns = [a for a in train_index.anns_by_image[data.images[i]["id"]] if not a["iscrowd"]]
            if not anns:
                continue
            img, tgt = data[i]
            outcome = teacher_outcome(teacher([img])[0], tgt["boxes"], tgt["labels"])
            # the training step's view: the detector's own resize, boxes in model-input pixels
            x, tt = student.transform([img], [{"boxes": tgt["boxes"], "labels": tgt["labels"]}])
            boxes5 = torch.cat([torch.zeros(len(tt[0]["boxes"]), 1), tt[0]["boxes"]], 1)
            labels = tt[0]["labels"]
            fs, ft = student.backbone(x.tensors), teacher.backbone(x.tensors)
            level = assign_levels(boxes5[:, 1:], len(task.pairs), task.cfg.level_canonical_size)
            # each instance's weight and the two cosines it compares, at its own level (no prototype: w 1, cos 0)
            own = {"w": torch.ones(len(labels)), "cos_s": torch.zeros(len(labels)), "cos_t": torch.zeros(len(labels))}
            for li, p in enumerate(task.pairs):
                if bank.count(p.key) == 0:
                    continue
                _, cos_s = prototype_project(fs[p.student], boxes5, p.stride, bank.student[p.key])
                _, cos_t = prototype_project(ft[p.teacher], boxes5, p.stride, bank.teacher[p.key])
                best_s, has = max_same_class_cos(cos_s, labels, bank.labels[p.key])
                best_t, _ = max_same_class_cos(cos_t, labels, bank.labels[p.key])
                mine = level == li
                own["w"][mine] = weight_from_best(best_s, best_t, has)[mine]  # robust_weights' formula
                own["cos_s"][mine], own["cos_t"][mine] = best_s[mine], best_t[mine]
            for j, a in enumerate(anns):
                rows.append({**{k: float(v[j]) for k, v in own.items()}, "outcome": outcome[j],
                             "class": train_index.classes[a["label"] - 1], "level": int(level[j]),
                             "tags": [t for t, v in (a.get("attributes") or {}).items() if v is True]})
    return {"images": n_images, "instances": len(rows), **summarize_weights(rows),
            "student": str(cfg.model.weights or f"seeded init (seed {cfg.seed})"),
            "teacher": str(cfg.distill.teacher.checkpoint)}


@dataclass(frozen=True)
class AuditSpec:
    """The audit of ``config``'s teacher at its student's start, on the first ``max_images`` training images (0:
    all), in ``threads`` threads: ``gkd study``'s audit stage."""

    config: Any
    max_images: int
    threads: int = 1


@dataclass(frozen=True)
class Audit:
    result: dict
    seconds: float | None

    def record(self) -> dict[str, Any]:
        return {"audit": self.result, "audit_s": self.seconds, "outputs": {}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Audit":
        return cls(record["audit"], record.get("audit_s"))


def audit_stage(spec: AuditSpec) -> Audit:
    """:func:`audit_robust_weights` as a stage (in a worker process, or in this one)."""
    t0 = time.perf_counter()
    result = audit_robust_weights(spec.config, max_images=spec.max_images or None, threads=spec.threads)
    return Audit(result, round(time.perf_counter() - t0, 1))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json

    from ..config import load_config
    from .config import DistillRunConfig

    ap = argparse.ArgumentParser(prog="python -m gkd.kd.distill.audit", description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="a distillation run's config.yaml (method robust or gkd)")
    ap.add_argument("--student", type=Path, default=None, help="the student to audit (default: the run's start)")
    ap.add_argument("--images", type=int, default=None, help="audit the first N training images (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        result = audit_robust_weights(load_config(args.config, cls=DistillRunConfig), args.student, args.images)
    except GkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in result["groups"].items():
        print(f"{name:42s} n={s['n']:6d}  w={s['mean']:.3f} +- {s['std']:.3f}  best same-class cos: student "
              f"{s['student_cos']:.3f}, teacher {s['teacher_cos']:.3f}")
    print("within a level: " + ", ".join(f"{k} = {v:+.3f}" if v is not None else f"{k}: n/a"
                                         for k, v in result["within_level"].items()))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
