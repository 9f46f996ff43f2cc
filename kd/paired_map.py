"""How much a COCO mAP difference between two models on the same images moves by chance: a paired image bootstrap.

Two models (an FP32 export and its INT8 twin, two checkpoints) scored on the same ``n`` images differ in mAP by
``delta``. Which images were drawn is itself chance: another ``n`` images from the same distribution would give
another ``delta``. The paired bootstrap resamples the images with replacement (the same draw for both models, so
what the two share cancels) and recomputes both mAPs on every draw; the spread of ``delta`` over the draws is its
standard error, and its 2.5 / 97.5 percentiles are a 95% interval.

Recomputing pycocotools' ``COCOeval`` a thousand times would take minutes. It is not needed: COCOeval's
``evaluate()`` matches detections to ground truth **per image and category**, and only ``accumulate()`` mixes
images. So ``evaluate()`` runs once per model, and each draw re-accumulates with per-image multiplicities as weights
(an image drawn twice counts its true positives, false positives and objects twice), vectorised over the IoU
thresholds. With every weight 1 this is ``accumulate()`` + the AP summary exactly (``tests/test_kd/
test_paired_map.py`` checks it against pycocotools on real detections).
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["ImageMatches", "match_per_image", "weighted_map", "paired_bootstrap", "DEFAULT_RESAMPLES"]

#: bootstrap draws: the 95% interval's ends move by ~0.02 standard errors between two seeds at this count
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class ImageMatches:
    """One model's COCOeval matches on a set of images, per category (area "all", the last ``maxDets``).

    Attributes:
        image_ids: ``[I]`` the images, in the order the weights refer to.
        categories: per category with ground truth: ``(image_index [D], tp [T, D] bool, counted [T, D] bool,
            objects [I] int)`` with the detections sorted by descending score (COCOeval's stable order);
            ``counted`` is False where a detection matched an ignored (crowd) object; ``objects`` counts the
            non-ignored ground-truth boxes of each image.
        absent: categories with no ground truth in these images (pycocotools leaves them out of the mean).
    """

    image_ids: tuple[int, ...]
    categories: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    absent: int
    rec_thrs: np.ndarray


def _detections(outputs: Sequence[dict[str, Any]], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    dets = []
    for out in outputs:
        image_id = int(out["image_id"])
        boxes = np.asarray(out["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(out["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(out["labels"]).reshape(-1)
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            if 1 <= int(lab) <= len(category_ids):
                dets.append({"image_id": image_id, "category_id": int(category_ids[int(lab) - 1]),
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return dets


def match_per_image(gt_json: dict[str, Any], category_ids: Sequence[int], outputs: Sequence[dict[str, Any]],
                    max_dets: int = 100) -> ImageMatches:
    """Run pycocotools' per-image matching once (``COCOeval.evaluate``) and keep what ``accumulate`` needs.

    Args:
        gt_json: COCO ground truth.
        category_ids: COCO category id of label ``i + 1``.
        outputs: per image ``{"image_id", "boxes" [N, 4] xyxy in original pixels, "scores" [N], "labels" [N]}``.
        max_dets: pycocotools' ``maxDets`` cap (the last one).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [int(o["image_id"]) for o in outputs]
    gt = copy.deepcopy(gt_json)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        dets = _detections(outputs, category_ids)
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        if not dets:
            coco_dt.dataset = {"images": gt["images"], "annotations": [], "categories": gt.get("categories", [])}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.params.catIds = sorted(coco_gt.getCatIds())
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
    p = ev.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    index = {img: i for i, img in enumerate(ids)}
    a_all = list(p.areaRngLbl).index("all")
    cats, absent = [], 0
    for k in range(len(p.catIds)):
        rows = []
        objects = np.zeros(len(ids), dtype=np.int64)
        for i_img in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + a_all * n_img + i_img]
            if e is None:
                continue
            i = index[int(e["image_id"])]
            objects[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            scores = np.asarray(e["dtScores"][:max_dets], dtype=np.float64)
            if scores.size:
                rows.append((i, scores, np.asarray(e["dtMatches"])[:, :max_dets],
                             np.asarray(e["dtIgnore"])[:, :max_dets]))
        if objects.sum() == 0:
            absent += 1
            continue
        if rows:
            scores = np.concatenate([r[1] for r in rows])
            order = np.argsort(-scores, kind="mergesort")  # COCOeval's own order (stable over images)
            image_index = np.concatenate([np.full(r[1].size, r[0]) for r in rows])[order]
            matched = np.concatenate([r[2] for r in rows], axis=1)[:, order] > 0
            ignored = np.concatenate([r[3] for r in rows], axis=1)[:, order].astype(bool)
        else:
            image_index = np.zeros(0, dtype=np.int64)
            matched = ignored = np.zeros((len(p.iouThrs), 0), dtype=bool)
        cats.append((image_index, matched & ~ignored, ~ignored, objects))
    return ImageMatches(tuple(ids), tuple(cats), absent, np.asarray(p.recThrs))


def weighted_map(m: ImageMatches, weights: np.ndarray | None = None) -> float:
    """COCO AP (IoU .50:.95, area all) with image ``i`` counted ``weights[i]`` times (None: once each).

    Equals ``COCOeval.accumulate()`` + ``stats[0]`` for unit weights. Returns -1.0 when no category has an object
    among the weighted images (pycocotools' "undefined").
    """
    w = np.ones(len(m.image_ids)) if weights is None else np.asarray(weights, dtype=np.float64)
    rec = m.rec_thrs
    values = []
    for image_index, tp, counted, objects in m.categories:
        n_obj = float(w @ objects)
        if n_obj <= 0:
            continue  # pycocotools: -1 for this category, left out of the mean
        wd = w[image_index]  # [D]
        tp_sum = np.cumsum(tp * wd, axis=1)  # [T, D]
        fp_sum = np.cumsum((counted & ~tp) * wd, axis=1)
        q = np.zeros((tp.shape[0], rec.size))
        if tp.shape[1]:
            recall = tp_sum / n_obj
            precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope from the right
            for t in range(tp.shape[0]):
                at = np.searchsorted(recall[t], rec, side="left")
                ok = at < recall.shape[1]
                q[t, ok] = precision[t, at[ok]]
        values.append(q)
    return float(np.mean(np.stack(values))) if values else -1.0


def paired_bootstrap(reference: ImageMatches, candidate: ImageMatches, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> dict[str, Any]:
    """The mAP difference ``candidate - reference`` on the same images and how much it moves by chance.

    Returns:
        ``{"images", "reference", "candidate", "delta", "se", "ci95": [lo, hi], "ratio", "ratio_ci95",
        "resamples", "seed"}``: point values on the images as given; ``se`` and the intervals from ``resamples``
        paired draws of the images with replacement (``ratio``: candidate / reference mAP).
    """
    if reference.image_ids != candidate.image_ids:
        raise ValueError("a paired comparison needs both models' matches on the same images in the same order")
    n = len(reference.image_ids)
    ref, cand = weighted_map(reference), weighted_map(candidate)
    rng = np.random.default_rng(seed)
    deltas, ratios = [], []
    for _ in range(int(resamples)):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        r, c = weighted_map(reference, w), weighted_map(candidate, w)
        deltas.append(c - r)
        if r > 0:
            ratios.append(c / r)
    deltas_a = np.asarray(deltas)
    out = {"images": n, "reference": ref, "candidate": cand, "delta": cand - ref,
           "ratio": cand / ref if ref > 0 else None, "resamples": int(resamples), "seed": int(seed),
           "se": float(deltas_a.std(ddof=1)) if deltas_a.size > 1 else float("nan"),
           "ci95": [float(np.percentile(deltas_a, 2.5)), float(np.percentile(deltas_a, 97.5))] if deltas else None,
           "ratio_ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))] if ratios else None}
    return out
