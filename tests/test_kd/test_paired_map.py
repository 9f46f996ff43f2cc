"""The paired image bootstrap of a COCO mAP difference (gkd.kd.paired_map) against pycocotools itself."""
import numpy as np
import pytest
import torch

from gkd.kd.evaluation import CocoEvaluator
from gkd.kd.paired_map import match_per_image, paired_bootstrap, weighted_map

CATEGORY_IDS = [3, 7, 9]


def _world(n_images: int, seed: int, crowd: bool = True):
    """Ground truth of ``n_images`` images and two models' noisy detections of it (the second model worse)."""
    g = torch.Generator().manual_seed(seed)
    images, anns, outs = [], [], {"good": [], "bad": []}
    aid = 1
    for img in range(1, n_images + 1):
        images.append({"id": img, "width": 200, "height": 150, "file_name": f"{img}.png"})
        k = int(torch.randint(0, 6, (1,), generator=g))  # some images hold no object at all
        boxes = []
        for _ in range(k):
            x, y = torch.rand(2, generator=g) * torch.tensor([150.0, 100.0])
            w, h = 8 + torch.rand(2, generator=g) * 40
            cat = int(torch.randint(0, len(CATEGORY_IDS), (1,), generator=g))
            iscrowd = int(crowd and torch.rand(1, generator=g) < 0.08)
            anns.append({"id": aid, "image_id": img, "category_id": CATEGORY_IDS[cat], "bbox": [float(x), float(y),
                         float(w), float(h)], "area": float(w * h), "iscrowd": iscrowd})
            aid += 1
            boxes.append((float(x), float(y), float(x + w), float(y + h), cat + 1))
        for name, noise in (("good", 2.0), ("bad", 6.0)):
            det = [(x1 + noise * float(torch.randn(1, generator=g)), y1, x2, y2 + noise * float(torch.randn(1, generator=g)),
                    lab) for x1, y1, x2, y2, lab in boxes if torch.rand(1, generator=g) < 0.9]
            det += [(float(a), float(b), float(a) + 20, float(b) + 20, int(torch.randint(1, 4, (1,), generator=g)))
                    for a, b in (torch.rand(int(torch.randint(0, 4, (1,), generator=g)), 2, generator=g) * 120).tolist()]
            n = len(det)
            outs[name].append({"image_id": img,
                               "boxes": torch.tensor([d[:4] for d in det], dtype=torch.float32).reshape(n, 4),
                               "scores": torch.rand(n, generator=g),
                               "labels": torch.tensor([d[4] for d in det], dtype=torch.int64)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}
    return gt, outs


def _pycocotools_map(gt, outs) -> float:
    ev = CocoEvaluator(gt, CATEGORY_IDS, backend="pycocotools")
    ev.process([{"image_id": o["image_id"]} for o in outs], outs)
    return ev.evaluate()["bbox_mAP"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_give_pycocotools_map(seed):
    gt, outs = _world(40, seed)
    for name in ("good", "bad"):
        assert weighted_map(match_per_image(gt, CATEGORY_IDS, outs[name])) == pytest.approx(
            _pycocotools_map(gt, outs[name]), abs=1e-12)


def test_integer_weights_equal_duplicated_images():
    """An image drawn twice counts twice: the same AP as pycocotools on a dataset holding it twice."""
    gt, outs = _world(25, 3)
    weights = np.array([(i % 3) for i in range(25)], dtype=float)  # 0, 1 or 2 copies
    dup_images, dup_anns, dup_outs = [], [], []
    new_id, aid = 1, 1
    for i, (img, out) in enumerate(zip(gt["images"], outs["good"])):
        for _ in range(int(weights[i])):
            dup_images.append({**img, "id": new_id})
            for a in gt["annotations"]:
                if a["image_id"] == img["id"]:
                    dup_anns.append({**a, "id": aid, "image_id": new_id})
                    aid += 1
            dup_outs.append({**out, "image_id": new_id})
            new_id += 1
    dup = {**gt, "images": dup_images, "annotations": dup_anns}
    got = weighted_map(match_per_image(gt, CATEGORY_IDS, outs["good"]), weights)
    assert got == pytest.approx(_pycocotools_map(dup, dup_outs), abs=1e-9)


def test_bootstrap_interval_covers_the_difference_and_shrinks_with_images():
    small_gt, small = _world(30, 4)
    large_gt, large = _world(300, 4)
    a = paired_bootstrap(match_per_image(small_gt, CATEGORY_IDS, small["good"]),
                         match_per_image(small_gt, CATEGORY_IDS, small["bad"]), resamples=300)
    b = paired_bootstrap(match_per_image(large_gt, CATEGORY_IDS, large["good"]),
                         match_per_image(large_gt, CATEGORY_IDS, large["bad"]), resamples=300)
    for r in (a, b):
        assert r["ci95"][0] <= r["delta"] <= r["ci95"][1]
        assert r["delta"] < 0  # the noisier boxes score lower
    assert b["se"] < a["se"]  # ten times the images: about a third of the noise
    assert b["images"] == 300 and b["resamples"] == 300


def test_identical_models_have_zero_noise():
    gt, outs = _world(30, 5)
    m = match_per_image(gt, CATEGORY_IDS, outs["good"])
    r = paired_bootstrap(m, m, resamples=50)
    assert r["delta"] == 0 and r["se"] == 0 and r["ci95"] == [0.0, 0.0] and r["ratio"] == 1.0


def test_no_detections_and_mismatched_images():
    gt, outs = _world(10, 6)
    empty = [{**o, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
             for o in outs["good"]]
    assert weighted_map(match_per_image(gt, CATEGORY_IDS, empty)) == 0.0
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(match_per_image(gt, CATEGORY_IDS, outs["good"]),
                         match_per_image(gt, CATEGORY_IDS, outs["good"][:5]))
