"""COCO box evaluation through pycocotools, with mmdet-style metric names.

One protocol for every backend (PyTorch, ONNX Runtime, TensorRT): detections are mapped back to original image
coordinates, converted to COCO results (``[x, y, w, h]``, category id, score) and scored by pycocotools'
``COCOeval`` with ``iouType="bbox"``. ``max_dets`` is pycocotools' ``maxDets`` cap used for AP and the third AR
(default 100; the summary is computed for the cap actually set, see :func:`summary_stats`, and a warning says when
images hold more objects than the cap).

Two scorers compute the same numbers: pycocotools (the reference) and faster-coco-eval (a C++ re-implementation,
used when it is installed because it is several times faster on large sets; ``tests/test_kd/test_evaluation.py``
checks that both give the same 12 numbers and per-class AP). ``CocoEvaluator.backend`` names the one used; the subset
filters (``ann_filter``) always run on pycocotools, whose ``_prepare`` they extend.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["CocoEvaluator", "STAT_NAMES", "evaluate_detector", "coco_metrics_from_stats", "summary_stats",
           "per_class_ap", "default_backend", "max_objects_per_image"]

#: names of pycocotools' 12 summary numbers, mmdet-style (the KD literature's keys)
STAT_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
              "bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l")


def coco_metrics_from_stats(stats: Sequence[float]) -> dict[str, float]:
    """pycocotools ``stats`` (12 floats, -1 where undefined) -> named metrics."""
    return {name: float(v) for name, v in zip(STAT_NAMES, stats)}


def default_backend() -> str:
    """``"faster-coco-eval"`` when it is importable, else ``"pycocotools"``."""
    import importlib.util

    return "faster-coco-eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def max_objects_per_image(gt_json: dict[str, Any]) -> int:
    """The most non-crowd objects any image of ``gt_json`` holds (what ``max_dets`` must reach for AP to reach 1)."""
    counts: dict[int, int] = {}
    for a in gt_json.get("annotations", []):
        if not a.get("iscrowd", 0):
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    return max(counts.values(), default=0)


class CocoEvaluator:
    """Accumulate detections and compute COCO box metrics.

    Args:
        gt_json: the COCO ground-truth dict (images, annotations with iscrowd/area, categories).
        category_ids: COCO category id of each contiguous label; label ``i + 1`` -> ``category_ids[i]``.
        max_dets: detections per image considered for AP (pycocotools ``maxDets[-1]``).
        backend: ``"pycocotools"``, ``"faster-coco-eval"`` or None (:func:`default_backend`).

    After :meth:`evaluate`, ``per_class`` maps each category id to its AP (IoU .50:.95, all areas, ``max_dets``;
    -1.0 for a category without ground truth in the evaluated images).
    """

    def __init__(self, gt_json: dict[str, Any], category_ids: Sequence[int], max_dets: int = 100,
                 backend: str | None = None):
        self.gt_json = gt_json
        self.category_ids = [int(c) for c in category_ids]
        self.max_dets = int(max_dets)
        self.backend = backend or default_backend()
        if self.backend not in ("pycocotools", "faster-coco-eval"):
            raise ValueError(f"unknown COCO evaluation backend {self.backend!r}")
        self.per_class: dict[int, float] = {}
        self.reset()

    def reset(self) -> None:
        self.detections: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()
        self._warned = getattr(self, "_warned", False)

    def process(self, targets: Iterable[dict], outputs: Iterable[dict]) -> None:
        """Add one batch.

        Args:
            targets: per image, a dict with ``image_id`` (and optionally ``scale``: predicted boxes are divided by
                it to return to original-image pixels).
            outputs: per image, ``{"boxes": [n, 4] xyxy, "scores": [n], "labels": [n] in 1..K}``.
        """
        for tgt, out in zip(targets, outputs):
            image_id = int(tgt["image_id"])
            self._image_ids.add(image_id)
            boxes = out["boxes"].detach().float().cpu()
            scale = float(tgt.get("scale", 1.0))
            if scale != 1.0:
                boxes = boxes / scale
            scores = out["scores"].detach().float().cpu().tolist()
            labels = out["labels"].detach().cpu().tolist()
            for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores, labels):
                lab = int(lab)
                if not 1 <= lab <= len(self.category_ids):
                    continue  # background or out-of-range label: not a detection of a dataset class
                self.detections.append({"image_id": image_id, "category_id": self.category_ids[lab - 1],
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})

    def evaluate(self, image_ids: Iterable[int] | None = None, verbose: bool = False,
                 ann_filter: Callable[[dict], bool] | None = None) -> dict[str, float]:
        """Run COCOeval over the processed images (or ``image_ids``). Returns the 12 named metrics.

        Args:
            image_ids: restrict to these images (default: all processed images).
            verbose: print pycocotools' summary table.
            ann_filter: evaluate on a subset of the ground truth (e.g. occluded objects): annotations for which it
                returns False are marked *ignore*, exactly as pycocotools treats objects outside an area range:
                they count neither as hits nor as misses, and detections matched to them are not false positives.

        With no detections at all, every AP/AR is 0.0 (pycocotools itself would refuse an empty result list).
        """
        fast = self.backend == "faster-coco-eval" and ann_filter is None
        if fast:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

        ids = sorted(self._image_ids if image_ids is None else set(int(i) for i in image_ids))
        gt = copy.deepcopy(self.gt_json)
        gt.setdefault("info", {})
        gt.setdefault("licenses", [])
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            wanted = set(ids)
            dets = [d for d in self.detections if d["image_id"] in wanted]
            if not dets:
                has = _has_gt(coco_gt, ids, ann_filter)
                self.per_class = {c: (0.0 if _has_gt(coco_gt, ids, ann_filter, c) else -1.0)
                                  for c in self.category_ids}
                return {name: (0.0 if has else -1.0) for name in STAT_NAMES}
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
            ev_cls = _subset_cocoeval(ann_filter) if ann_filter is not None else COCOeval
            ev = ev_cls(coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = ids
            ev.params.catIds = sorted(coco_gt.getCatIds())
            ev.params.maxDets = [1, 10, self.max_dets]
            ev.evaluate()
            ev.accumulate()
        self._warn_if_capped(coco_gt, ids)
        self.per_class = per_class_ap(ev)
        return coco_metrics_from_stats(summary_stats(ev))

    def _warn_if_capped(self, coco_gt, ids) -> None:
        """Say once when images hold more objects than ``max_dets``: their AP cannot reach 1 (the cap, not the
        model, loses them)."""
        if self._warned:
            return
        counts = [sum(1 for a in coco_gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)) for i in ids]
        over = [c for c in counts if c > self.max_dets]
        if over:
            import logging

            self._warned = True
            logging.getLogger("gkd").warning(
                "%d image(s) hold more than max_dets=%d objects (up to %d): AP counts at most %d detections per "
                "image, so it is capped below 1; raise max_dets (gkd eval --max-dets, eval.max_dets)",
                len(over), self.max_dets, max(over), self.max_dets)


def summary_stats(ev) -> list[float]:
    """pycocotools' 12 summary numbers, computed for the ``maxDets`` actually set.

    ``COCOeval.summarize()`` computes the first one (AP) for maxDets=100 whatever ``params.maxDets`` says, so with
    ``maxDets=[1, 10, 1000]`` it prints AP = -1. This is the same computation on ``ev.eval`` (after
    ``accumulate()``) with the last ``maxDets`` for every AP and for the third AR: with the default ``[1, 10, 100]``
    it equals ``summarize()`` exactly (tested).
    """
    import numpy as np

    p = ev.params
    last = p.maxDets[-1]

    def one(ap: bool, iou: float | None = None, area: str = "all", max_dets: int = last) -> float:
        a = [i for i, lbl in enumerate(p.areaRngLbl) if lbl == area]
        m = [i for i, v in enumerate(p.maxDets) if v == max_dets]
        s = ev.eval["precision"] if ap else ev.eval["recall"]  # [T, R, K, A, M] / [T, K, A, M]
        if iou is not None:
            s = s[np.where(np.isclose(p.iouThrs, iou))[0]]
        s = s[..., a, :][..., m]
        valid = s[s > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    return [one(True), one(True, 0.5), one(True, 0.75), one(True, area="small"), one(True, area="medium"),
            one(True, area="large"), one(False, max_dets=p.maxDets[0]), one(False, max_dets=p.maxDets[1]),
            one(False), one(False, area="small"), one(False, area="medium"), one(False, area="large")]


def per_class_ap(ev) -> dict[int, float]:
    """Category id -> AP at IoU .50:.95, all areas, the last ``maxDets`` (after ``accumulate()``); -1.0 where the
    category has no ground truth (pycocotools marks it so in ``eval["precision"]``)."""
    import numpy as np

    p = ev.params
    a = [i for i, lbl in enumerate(p.areaRngLbl) if lbl == "all"]
    prec = np.asarray(ev.eval["precision"])[:, :, :, a, -1]  # [T, R, K, 1]
    out = {}
    for k, cat in enumerate(p.catIds):
        s = prec[:, :, k]
        valid = s[s > -1]
        out[int(cat)] = float(np.mean(valid)) if valid.size else -1.0
    return out


def _subset_cocoeval(ann_filter):
    from pycocotools.cocoeval import COCOeval

    class SubsetCOCOeval(COCOeval):
        def _prepare(self):
            super()._prepare()
            # pycocotools recomputes gt["ignore"] from iscrowd in _prepare; mark the excluded objects afterwards.
            for gts in self._gts.values():
                for gt in gts:
                    if not ann_filter(gt):
                        gt["ignore"] = 1

    return SubsetCOCOeval


def _has_gt(coco_gt, ids, ann_filter=None, category_id: int | None = None) -> bool:
    return any(not a.get("iscrowd", 0) and (ann_filter is None or ann_filter(a))
               and (category_id is None or a["category_id"] == category_id)
               for i in ids for a in coco_gt.imgToAnns.get(i, []))


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, loader: Iterable, evaluator: CocoEvaluator,
                      device: torch.device | str = "cpu", progress: bool = False) -> dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` batches ``(images, targets)`` and return COCO metrics."""
    from tqdm import tqdm

    model.eval()
    evaluator.reset()
    it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True) if progress else loader
    for images, targets in it:
        images = [im.to(device, non_blocking=True) for im in images]
        outputs = model(images)
        evaluator.process(targets, outputs)
    return evaluator.evaluate()
