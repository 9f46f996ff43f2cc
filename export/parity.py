"""Parity of an exported model against the PyTorch reference, at three levels, on real images.

1. **Tensors**: element-wise errors of ``boxes``/``scores`` (max/mean absolute and relative) over *matched*
   detections (same label, IoU >= ``iou``: order-free, so two near-equal scores that swap places are compared with
   each other, not with their neighbours), plus the smallest ``atol`` (at the configured ``rtol``) and ``rtol`` (at
   ``atol = 0``) that would have passed (Polygraphy's "minimum required tolerance"), over the pairs where either
   score is >= ``score_floor``. An image fails this level when a detection scoring >= ``score_floor`` on either side
   has no partner, unless it is a swap at the top-k cut (see below). This level gates FP32 only and is diagnostic
   for FP16/INT8.
2. **Detections**: per image, each reference detection (highest score first) is matched to the unmatched candidate
   of the same label with the highest IoU >= ``iou``; recall of the reference detections scoring >= ``score_floor``,
   precision of the candidates scoring >= ``score_floor``, missing / extra counts, mean and max score delta, mean IoU.
   The floor keeps detections that hover at the model's own score threshold (0.05) from flipping in and out and
   raising false alarms; candidates below the floor still count as matches.

   **Swaps at the top-k cut are not failures.** When an output holds the model's maximum number of detections
   (``max_detections``, the contract's ``detections_per_img``), which detections make the cut among near-equal
   scores is decided by rounding: an unmatched detection whose score is within ``tie`` of the other side's lowest
   kept score is counted as ``swapped_at_cut``, not as missing or extra. Anything else unmatched above the floor
   still fails: a real numeric difference moves scores by far more than ``tie``.
3. **mAP** (when the images have annotations): COCO bbox mAP of both, the difference and **how much it moves by
   chance** (:func:`map_comparison`: a paired image bootstrap, :mod:`gkd.kd.paired_map`). The level fails only when
   the data show a loss larger than allowed: when even the upper end of the 95% interval of ``candidate -
   reference`` lies below ``-(1 - min_map_ratio) x reference``. A difference within the noise never fails a model;
   the verdict states the images, the standard error and the interval, so a reader sees how little 16 images
   decide. ``gkd export`` computes this level on the whole annotated split (up to a cap), not on the parity images.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .runtime import Runner

__all__ = ["Tolerances", "DEFAULT_TOLERANCES", "collect_outputs", "compare_outputs", "match_detections",
           "tensor_errors", "format_table", "map_comparison", "map_matches"]


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail thresholds. See docs/export.md ("Parity") for how the defaults were chosen.

    Attributes:
        atol, rtol: tensor level, ``|cand - ref| <= atol + rtol * |ref|`` element-wise (boxes in pixels, scores).
        tensor_gate: whether the tensor level decides the verdict (FP32 only by default).
        iou: IoU for two detections of the same label to match.
        score_floor: detections below it neither need a match nor count as extra.
        min_recall: matched / reference detections (>= floor).
        min_precision: matched / candidate detections (>= floor).
        max_mean_score_delta: mean |score difference| over matched pairs.
        min_map_ratio: candidate mAP / reference mAP (mAP level, when annotated): the level fails when the data
            show the candidate below it beyond chance (see :func:`map_comparison`).
        tie: scores closer than this are near-ties (swaps at the top-k cut are then not failures).
    """

    atol: float = 0.05
    rtol: float = 1e-4
    tensor_gate: bool = True
    iou: float = 0.5
    score_floor: float = 0.3
    min_recall: float = 0.99
    min_precision: float = 0.99
    max_mean_score_delta: float = 1e-3
    min_map_ratio: float = 0.995
    tie: float = 1e-4

    def replace(self, **changes) -> "Tolerances":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


#: defaults per precision (measured noise with margin; justification in docs/export.md)
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(),
    "fp16": Tolerances(atol=1.0, rtol=1e-2, tensor_gate=False, min_recall=0.97, min_precision=0.97,
                       max_mean_score_delta=0.01, min_map_ratio=0.99, tie=1e-2),
    "int8": Tolerances(atol=4.0, rtol=5e-2, tensor_gate=False, min_recall=0.90, min_precision=0.90,
                       max_mean_score_delta=0.05, min_map_ratio=0.99, tie=5e-2),
}

Outputs = list[dict[str, torch.Tensor]]


def collect_outputs(runner: Runner, images: Iterable[tuple[int, torch.Tensor]]) -> Outputs:
    """Run ``runner`` on ``[(image_id, [3, H, W])]``; returns one output dict per image (with ``image_id``)."""
    outs = []
    for image_id, image in images:
        o = runner.detect(image)
        outs.append({**o, "image_id": image_id})
    return outs


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(a.shape[0], b.shape[0])
    return box_iou(a.double(), b.double()).float()


def match_detections(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], iou: float = 0.5
                     ) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of one image's detections, order-free.

    Reference detections are visited by descending score; each takes the unmatched candidate of the same label with
    the highest IoU, if that IoU is >= ``iou``.

    Args:
        ref, cand: ``{"boxes": [N, 4], "scores": [N], "labels": [N]}``.
        iou: the IoU threshold.

    Returns:
        ``[(ref_index, cand_index, iou)]``.
    """
    ious = _box_iou(ref["boxes"], cand["boxes"])
    same = ref["labels"].view(-1, 1) == cand["labels"].view(1, -1)
    ious = torch.where(same, ious, torch.full_like(ious, -1.0))
    used = torch.zeros(cand["boxes"].shape[0], dtype=torch.bool)
    pairs = []
    for r in torch.argsort(ref["scores"], descending=True, stable=True).tolist():
        if ious.shape[1] == 0:
            break
        row = ious[r].masked_fill(used, -1.0)
        c = int(torch.argmax(row))
        if row[c] >= iou:
            used[c] = True
            pairs.append((r, c, float(row[c])))
    return pairs


def _stats(diff: torch.Tensor) -> dict[str, float]:
    if diff.numel() == 0:
        return {"max": 0.0, "mean": 0.0}
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def _at_cut(score: float, other: dict[str, torch.Tensor], max_detections: int | None, tie: float) -> bool:
    """Whether an unmatched detection of ``score`` lost (or won) its place at the other side's top-k cut."""
    n = other["scores"].numel()
    return bool(max_detections and n >= max_detections and score <= float(other["scores"].min()) + tie)


def _unpaired(r: dict, c: dict, pairs, floor: float, max_detections: int | None, tie: float) -> tuple[int, int, int]:
    """``(missing, extra, swapped_at_cut)`` of one image: detections >= ``floor`` without a partner."""
    paired_r = {a for a, _, _ in pairs}
    paired_c = {b for _, b, _ in pairs}
    missing = extra = swapped = 0
    for side, own, other, paired in ((0, r, c, paired_r), (1, c, r, paired_c)):
        for i, score in enumerate(own["scores"].tolist()):
            if i in paired or score < floor:
                continue
            if _at_cut(score, other, max_detections, tie):
                swapped += 1
            elif side == 0:
                missing += 1
            else:
                extra += 1
    return missing, extra, swapped


def tensor_errors(ref: Outputs, cand: Outputs, atol: float, rtol: float, *, iou: float = 0.5, floor: float = 0.0,
                  max_detections: int | None = None, tie: float = 0.0) -> dict[str, Any]:
    """Tensor-level errors over matched detections (see module docstring).

    ``floor`` (default 0: every detection) is the score from which a detection without a partner makes its image a
    set mismatch."""
    abs_d = {"boxes": [], "scores": []}
    rel_d = {"boxes": [], "scores": []}
    excess = []  # |d| - rtol * |ref|: the atol each element needs
    compared = mismatched = swapped = 0
    for r, c in zip(ref, cand):
        pairs = match_detections(r, c, iou)
        missing, extra, at_cut = _unpaired(r, c, pairs, floor, max_detections, tie)
        swapped += at_cut
        if missing or extra:
            mismatched += 1
            continue
        compared += 1
        # pairs below the floor on both sides are as unstable as the detections the floor leaves out (measured: a
        # box scoring < 0.3 on a 1920x1080 photo differed by 1.7 px between PyTorch and onnxruntime): not compared
        kept = [(a, b) for a, b, _ in pairs if max(float(r["scores"][a]), float(c["scores"][b])) >= floor]
        ri = torch.tensor([a for a, _ in kept], dtype=torch.long)
        ci = torch.tensor([b for _, b in kept], dtype=torch.long)
        for key in ("boxes", "scores"):
            a, b = r[key][ri].double().flatten(), c[key][ci].double().flatten()
            d = (a - b).abs()
            abs_d[key].append(d)
            rel_d[key].append(d / a.abs().clamp_min(1e-12))
            excess.append(d - rtol * a.abs())
    out: dict[str, Any] = {"compared_images": compared, "set_mismatch_images": mismatched,
                           "swapped_at_cut": swapped}
    for key in ("boxes", "scores"):
        a = torch.cat(abs_d[key]) if abs_d[key] else torch.zeros(0)
        rl = torch.cat(rel_d[key]) if rel_d[key] else torch.zeros(0)
        out[key] = {"max_abs": _stats(a)["max"], "mean_abs": _stats(a)["mean"],
                    "max_rel": _stats(rl)["max"], "mean_rel": _stats(rl)["mean"]}
    ex = torch.cat(excess) if excess else torch.zeros(0)
    out["min_atol"] = max(0.0, float(ex.max())) if ex.numel() else 0.0
    out["min_rtol"] = max(out["boxes"]["max_rel"], out["scores"]["max_rel"])
    out["passed"] = bool(compared > 0 and mismatched == 0 and out["min_atol"] <= atol)
    return out


def detection_errors(ref: Outputs, cand: Outputs, iou: float, score_floor: float, *,
                     max_detections: int | None = None, tie: float = 0.0) -> dict[str, Any]:
    """Detection-level comparison (see module docstring)."""
    n_ref = n_cand = matched_ref = matched_cand = swapped_ref = swapped_cand = 0
    deltas, ious = [], []
    for r, c in zip(ref, cand):
        pairs = match_detections(r, c, iou)
        paired_r, paired_c = {a for a, _, _ in pairs}, {b for _, b, _ in pairs}
        swapped_ref += sum(1 for i, sc in enumerate(r["scores"].tolist()) if i not in paired_r and sc >= score_floor
                           and _at_cut(sc, c, max_detections, tie))
        swapped_cand += sum(1 for i, sc in enumerate(c["scores"].tolist()) if i not in paired_c
                            and sc >= score_floor and _at_cut(sc, r, max_detections, tie))
        ref_hi = r["scores"] >= score_floor
        cand_hi = c["scores"] >= score_floor
        n_ref += int(ref_hi.sum())
        n_cand += int(cand_hi.sum())
        for ri, ci, v in pairs:
            if ref_hi[ri]:
                matched_ref += 1
                deltas.append(abs(float(r["scores"][ri]) - float(c["scores"][ci])))
                ious.append(v)
            if cand_hi[ci]:
                matched_cand += 1
    # swaps at the top-k cut neither need a partner nor count as extra
    n_ref, n_cand = n_ref - swapped_ref, n_cand - swapped_cand
    return {"iou": iou, "score_floor": score_floor, "reference_detections": n_ref, "candidate_detections": n_cand,
            "matched": matched_ref, "missing": n_ref - matched_ref, "extra": n_cand - matched_cand,
            "swapped_at_cut": swapped_ref + swapped_cand,
            "recall": matched_ref / n_ref if n_ref else 1.0,
            "precision": matched_cand / n_cand if n_cand else 1.0,
            "mean_score_delta": sum(deltas) / len(deltas) if deltas else 0.0,
            "max_score_delta": max(deltas) if deltas else 0.0,
            "mean_iou": sum(ious) / len(ious) if ious else 1.0}


def coco_map(outputs: Outputs, gt_json: dict, category_ids: Sequence[int]) -> dict[str, float]:
    """COCO bbox metrics of ``outputs`` (boxes already in original-image pixels)."""
    from gkd.kd.evaluation import CocoEvaluator

    ev = CocoEvaluator(gt_json, category_ids)
    ev.process([{"image_id": o["image_id"]} for o in outputs], outputs)
    return ev.evaluate(image_ids=[o["image_id"] for o in outputs])


def map_matches(outputs: Outputs, gt_json: dict, category_ids: Sequence[int]):
    """COCOeval's per-image matches of ``outputs`` (the input of :func:`map_comparison`)."""
    from gkd.kd.paired_map import match_per_image

    return match_per_image(gt_json, category_ids, outputs)


def map_comparison(reference, candidate, min_ratio: float, *, resamples: int | None = None, seed: int = 0
                   ) -> dict[str, Any]:
    """The mAP level's verdict: candidate against reference on the same images, judged against chance.

    Args:
        reference, candidate: :func:`map_matches` of both models on the same images.
        min_ratio: the candidate may lose at most ``(1 - min_ratio) x`` the reference's mAP.
        resamples: bootstrap draws (default :data:`gkd.kd.paired_map.DEFAULT_RESAMPLES`).

    Returns:
        ``{"reference", "candidate", "delta", "ratio", "images", "se", "ci95", "allowed_loss", "passed",
        "summary", ...}``: ``passed`` is False only when the upper end of the 95% interval of the difference lies
        below ``-allowed_loss`` (the loss is real, not chance), or when the reference scores 0.
    """
    from gkd.kd.paired_map import DEFAULT_RESAMPLES, paired_bootstrap

    boot = paired_bootstrap(reference, candidate, resamples or DEFAULT_RESAMPLES, seed)
    r, c = boot["reference"], boot["candidate"]
    allowed = (1.0 - min_ratio) * max(r, 0.0)
    hi = boot["ci95"][1] if boot["ci95"] else boot["delta"]
    passed = r > 0 and hi >= -allowed
    ratio = c / r if r > 0 else (1.0 if c >= r else 0.0)
    summary = (f"mAP {c:.4f} vs {r:.4f} ({ratio:.1%}): {boot['delta']:+.4f}, 95% interval "
               f"[{boot['ci95'][0]:+.4f}, {boot['ci95'][1]:+.4f}] over {boot['images']} image(s) (se "
               f"{boot['se']:.4f}); allowed loss {allowed:.4f}") if boot["ci95"] else f"mAP {c:.4f} vs {r:.4f}"
    return {**boot, "ratio": ratio, "min_ratio": min_ratio, "allowed_loss": allowed, "passed": bool(passed),
            "summary": summary + (" -> PASS" if passed else " -> FAIL")}


def compare_outputs(ref: Outputs, cand: Outputs, tol: Tolerances, *, gt_json: dict | None = None,
                    category_ids: Sequence[int] | None = None, ref_matches=None,
                    max_detections: int | None = None, map_level: dict[str, Any] | None = None) -> dict[str, Any]:
    """All three levels and the verdict.

    Args:
        ref, cand: outputs of :func:`collect_outputs` on the same images, in the same order.
        tol: thresholds.
        max_detections: the model's detections per image (the top-k cut), or None when unknown.
        gt_json, category_ids: annotations for the mAP level on these images (skipped when None).
        ref_matches: the reference's :func:`map_matches` if already computed (saves one evaluation per candidate).
        map_level: a :func:`map_comparison` computed elsewhere (e.g. on the whole annotated split): used as the mAP
            level instead of one on these images.

    Returns:
        ``{"images", "tensor", "detection", "map", "tolerances", "passed", "failures"}``.
    """
    if [o["image_id"] for o in ref] != [o["image_id"] for o in cand]:
        raise ValueError("reference and candidate outputs must cover the same images in the same order")
    tensor = tensor_errors(ref, cand, tol.atol, tol.rtol, iou=tol.iou, floor=tol.score_floor,
                           max_detections=max_detections, tie=tol.tie)
    tensor["gating"] = tol.tensor_gate
    det = detection_errors(ref, cand, tol.iou, tol.score_floor, max_detections=max_detections, tie=tol.tie)
    failures = []
    if tol.tensor_gate and not tensor["passed"]:
        failures.append(f"tensors: needs atol {tensor['min_atol']:.3g} (allowed {tol.atol:g} at rtol {tol.rtol:g}), "
                        f"{tensor['set_mismatch_images']} image(s) whose detections >= {tol.score_floor:g} differ")
    if det["recall"] < tol.min_recall:
        failures.append(f"detections: recall {det['recall']:.3f} < {tol.min_recall:g} ({det['missing']} missing)")
    if det["precision"] < tol.min_precision:
        failures.append(f"detections: precision {det['precision']:.3f} < {tol.min_precision:g} "
                        f"({det['extra']} extra)")
    if det["mean_score_delta"] > tol.max_mean_score_delta:
        failures.append(f"detections: mean score delta {det['mean_score_delta']:.4f} > {tol.max_mean_score_delta:g}")
    found = sum(int((o["scores"] >= tol.score_floor).sum()) for o in ref)
    if found == 0:
        # two empty outputs agree perfectly and prove nothing: a model that detects nothing is never verified
        failures.append(f"detections: the reference detects nothing at score >= {tol.score_floor:g} on these "
                        f"{len(ref)} image(s); matching empty outputs verifies nothing")
    det["reference_detections"] = found
    det["passed"] = not any(f.startswith("detections") for f in failures)
    if map_level is None and gt_json is not None and category_ids is not None:
        ref_m = ref_matches if ref_matches is not None else map_matches(ref, gt_json, category_ids)
        map_level = map_comparison(ref_m, map_matches(cand, gt_json, category_ids), tol.min_map_ratio)
    if map_level is not None and not map_level["passed"]:
        if map_level["reference"] <= 0:
            failures.append(f"mAP: the reference's mAP is {map_level['reference']:.4f} on these images; a ratio to "
                            f"it verifies nothing")
        else:
            failures.append(f"mAP: {map_level['summary']}")
    return {"images": len(ref), "tensor": tensor, "detection": det, "map": map_level,
            "tolerances": dataclasses.asdict(tol), "passed": not failures, "failures": failures}


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A short markdown table of parity reports (``rows``: dicts with ``precision``, ``provider`` and a report)."""
    head = ("| precision | runs on | images | recall | precision | missing/extra | score delta (mean) "
            "| box error max (px) | mAP ref -> cand (ratio; delta [95% interval], images) | verdict |")
    lines = [head, "|" + "---|" * 10]
    for row in rows:
        rep = row["parity"]
        d, t, m = rep["detection"], rep["tensor"], rep["map"]
        # a non-gating tensor level compares sets whose order may differ: shown only where it decides the verdict
        box = _fmt(t["boxes"]["max_abs"], ".2g") if t["compared_images"] and t.get("gating", True) else "n/a"
        mp = (f"{m['reference']:.3f} -> {m['candidate']:.3f} ({m['ratio']:.1%}; {m['delta']:+.3f} "
              f"[{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}], {m['images']} img)" if m and m.get("ci95")
              else "no annotations")
        lines.append(f"| {row['precision']} | {row['provider']} | {rep['images']} | {_fmt(d['recall'])} "
                     f"| {_fmt(d['precision'])} | {d['missing']}/{d['extra']} | {_fmt(d['mean_score_delta'], '.4f')} "
                     f"| {box} | {mp} | {'PASS' if rep['passed'] else 'FAIL'} |")
    return "\n".join(lines)
