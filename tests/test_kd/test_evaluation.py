import json

import pytest
import torch

from gkd.kd.evaluation import STAT_NAMES, CocoEvaluator


def gt():
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [55, 50, 40, 45], "area": 1800, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [65, 65, 30, 30], "area": 900, "iscrowd": 0},
        ],
    }


def as_outputs(boxes_xywh, labels, scores=None):
    b = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    n = len(labels)
    return {"boxes": b, "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores if scores is not None else [0.9] * n)}


def test_perfect_detections_give_ap_one():
    ev = CocoEvaluator(gt(), [3, 7])
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [as_outputs([[10, 10, 40, 40], [55, 50, 40, 45]], [1, 2]),
                as_outputs([[0, 0, 60, 60], [65, 65, 30, 30]], [1, 2])])
    m = ev.evaluate()
    assert set(m) == set(STAT_NAMES)
    assert m["bbox_mAP"] == pytest.approx(1.0) and m["bbox_mAP_50"] == pytest.approx(1.0)
    assert m["bbox_mAP_s"] == pytest.approx(1.0)  # the 30x30 box is "small" (area < 32^2)
    assert m["bbox_mAP_l"] == -1.0  # no large objects in the GT: pycocotools' "undefined"
    # label i+1 maps to category_ids[i]
    assert {d["category_id"] for d in ev.detections} == {3, 7}


def test_no_detections_give_zero():
    ev = CocoEvaluator(gt(), [3, 7])
    ev.process([{"image_id": 1}, {"image_id": 2}], [as_outputs([], []), as_outputs([], [])])
    m = ev.evaluate()
    assert m["bbox_mAP"] == 0.0 and m["bbox_AR_100"] == 0.0


def test_half_the_objects_found_hand_computed():
    # Each category: one of its two instances found, with a perfect box. Precision 1 up to recall 0.5, then none:
    # 101-point interpolated AP = 51/101 per category and IoU threshold.
    ev = CocoEvaluator(gt(), [3, 7])
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [as_outputs([[10, 10, 40, 40]], [1]), as_outputs([[65, 65, 30, 30]], [2])])
    m = ev.evaluate()
    assert m["bbox_mAP"] == pytest.approx(51 / 101, abs=1e-6)
    assert m["bbox_AR_100"] == pytest.approx(0.5)


def test_scale_maps_boxes_back_and_matches_pycocotools_directly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    torch.manual_seed(0)
    outputs, targets = [], []
    for img, scale in ((1, 2.0), (2, 0.5)):
        boxes = torch.rand(6, 4) * 50
        boxes[:, 2:] += boxes[:, :2] + 5
        outputs.append({"boxes": boxes * scale, "labels": torch.randint(1, 3, (6,)), "scores": torch.rand(6)})
        targets.append({"image_id": img, "scale": scale})
    ev = CocoEvaluator(gt(), [3, 7])
    ev.process(targets, outputs)
    ours = ev.evaluate()
    # Oracle: pycocotools on the same detections written by hand in original coordinates.
    dets = []
    for t, o in zip(targets, outputs):
        for b, lab, s in zip((o["boxes"] / t["scale"]).tolist(), o["labels"].tolist(), o["scores"].tolist()):
            dets.append({"image_id": t["image_id"], "category_id": [3, 7][lab - 1],
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    (tmp_path / "gt.json").write_text(json.dumps({**gt(), "info": {}, "licenses": []}))
    coco = COCO(str(tmp_path / "gt.json"))
    e = COCOeval(coco, coco.loadRes(dets), "bbox")
    e.evaluate(); e.accumulate(); e.summarize()
    assert [ours[n] for n in STAT_NAMES] == pytest.approx(list(e.stats))


def test_subset_ignores_other_objects():
    # Only the two "dog" objects form the subset; detections of the dogs only.
    ev = CocoEvaluator(gt(), [3, 7])
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [as_outputs([[55, 50, 40, 45], [10, 10, 40, 40]], [2, 1], [0.9, 0.8]),
                as_outputs([[65, 65, 30, 30]], [2])])
    full = ev.evaluate()
    dogs = ev.evaluate(ann_filter=lambda a: a["category_id"] == 7)
    # Overall, one cat is missed; on the dog subset every object is found and the cat detection is not a false
    # positive (it matches an ignored object); the cat category has no subset GT, so it is left out of the mean.
    assert full["bbox_mAP"] < 1.0
    assert dogs["bbox_mAP"] == pytest.approx(1.0)
    none = ev.evaluate(ann_filter=lambda a: False)
    assert none["bbox_mAP"] == -1.0


def _crowded(n_objects=150):
    """One 1000x1000 image holding ``n_objects`` disjoint 20x20 objects of one class; the GT as detections."""
    anns, boxes = [], []
    for i in range(n_objects):
        x, y = 30 * (i % 30), 30 * (i // 30)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 3, "bbox": [x, y, 20, 20], "area": 400,
                     "iscrowd": 0})
        boxes.append([x, y, x + 20, y + 20])
    gt_json = {"images": [{"id": 1, "width": 1000, "height": 1000}], "annotations": anns,
               "categories": [{"id": 3, "name": "a"}]}
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(n_objects, dtype=torch.int64),
           "scores": torch.linspace(0.99, 0.5, n_objects)}
    return gt_json, out


def test_raised_max_dets_is_what_the_summary_uses_and_the_cap_is_warned(caplog):
    gt_json, out = _crowded()
    ev = CocoEvaluator(gt_json, [3], max_dets=1000)
    ev.process([{"image_id": 1}], [out])
    m = ev.evaluate()
    assert m["bbox_mAP"] == pytest.approx(1.0) and m["bbox_AR_100"] == pytest.approx(1.0)  # pycocotools: -1.0
    capped = CocoEvaluator(gt_json, [3], max_dets=100)
    capped.process([{"image_id": 1}], [out])
    with caplog.at_level("WARNING", logger="gkd"):
        c = capped.evaluate()
        capped.evaluate()
    assert c["bbox_mAP"] < 0.7  # 100 of 150 objects can be counted
    warnings = [r.message for r in caplog.records if "max_dets=100" in r.message]
    assert len(warnings) == 1 and "1 image(s) hold more than max_dets=100 objects (up to 150)" in warnings[0]


def _random_case(seed: int, n_images: int = 6, max_objects: int = 140):
    """Ground truth with 1..max_objects objects per image (some above pycocotools' 100) and noisy detections:
    shifted boxes, misses, false positives, wrong classes, crowd regions."""
    import random

    rng = random.Random(seed)
    images, anns, targets, outputs = [], [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"})
        boxes, labels, scores = [], [], []
        for _ in range(rng.randint(1, max_objects)):
            w, h = rng.uniform(4, 200), rng.uniform(4, 200)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = rng.choice([3, 7, 9])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.03)})
            if rng.random() < 0.8:  # found, somewhat off, sometimes with the wrong class
                dx, dy = rng.gauss(0, w * 0.1), rng.gauss(0, h * 0.1)
                lab = [3, 7, 9].index(cat) + 1 if rng.random() < 0.9 else rng.randint(1, 3)
                boxes.append([x + dx, y + dy, x + dx + w, y + dy + h]), labels.append(lab)
                scores.append(rng.random())
        for _ in range(rng.randint(0, 20)):  # false positives
            x, y = rng.uniform(0, 600), rng.uniform(0, 440)
            boxes.append([x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)])
            labels.append(rng.randint(1, 3)), scores.append(rng.random())
        targets.append({"image_id": i})
        outputs.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels),
                        "scores": torch.tensor(scores)})
    gt_json = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": n} for c, n in ((3, "a"), (7, "b"), (9, "c"))]}
    return gt_json, targets, outputs


@pytest.mark.parametrize("max_dets", [100, 1000])
def test_faster_coco_eval_equals_pycocotools(max_dets):
    """faster-coco-eval (used when installed) gives pycocotools' 12 numbers and per-class AP, including images with
    more than 100 objects and a raised maxDets."""
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (it is in requirements.txt)")
    for seed in range(3):
        gt_json, targets, outputs = _random_case(seed)
        got = {}
        for backend in ("pycocotools", "faster-coco-eval"):
            ev = CocoEvaluator(gt_json, [3, 7, 9], max_dets=max_dets, backend=backend)
            ev.process(targets, outputs)
            got[backend] = (ev.evaluate(), ev.per_class)
        ref, fast = got["pycocotools"], got["faster-coco-eval"]
        assert 0.05 < ref[0]["bbox_mAP"] < 0.95  # a case with something to get right
        for name in STAT_NAMES:
            assert fast[0][name] == pytest.approx(ref[0][name], abs=1e-9), (seed, name)
        assert fast[1] == pytest.approx(ref[1], abs=1e-9)


def test_per_class_ap_is_pycocotools_precision_averaged_per_category():
    """Per-class AP: hand-made case where one class is found perfectly and the other not at all; their mean is
    the mAP; a class without ground truth is -1."""
    g = gt()
    g["categories"].append({"id": 11, "name": "bird"})
    ev = CocoEvaluator(g, [3, 7, 11], backend="pycocotools")
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [as_outputs([[10, 10, 40, 40]], [1]), as_outputs([[0, 0, 60, 60]], [1])])
    m = ev.evaluate()
    assert ev.per_class[3] == pytest.approx(1.0) and ev.per_class[7] == 0.0 and ev.per_class[11] == -1.0
    assert m["bbox_mAP"] == pytest.approx(0.5)
