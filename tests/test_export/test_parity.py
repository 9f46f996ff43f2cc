"""Parity report fields on hand-made detections, where every number can be checked by hand."""
import pytest
import torch

from gkd.export.parity import Tolerances, compare_outputs, format_table, match_detections, tensor_errors


def _dets(boxes, scores, labels, image_id=1):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id}


REF = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 30, 10, 40]],
            [0.9, 0.8, 0.7, 0.1], [1, 2, 1, 1])
# candidate: box 0 shifted by 1 px (IoU 81/119), box 1 exact but score 0.75, box 2 missing, box 2's place taken by a
# different label (extra), the low-score box 3 gone (below the floor: not missing), listed in a different order
CAND = _dets([[50, 50, 60, 60], [20, 20, 40, 40], [1, 1, 11, 11]], [0.6, 0.75, 0.85], [2, 2, 1])


def test_matching_is_order_free_and_label_aware():
    pairs = match_detections(REF, CAND, iou=0.5)
    assert [(r, c) for r, c, _ in pairs] == [(0, 2), (1, 1)]
    assert pairs[0][2] == pytest.approx(81 / 119)
    assert pairs[1][2] == pytest.approx(1.0)


def test_detection_level_numbers():
    tol = Tolerances(score_floor=0.3, tensor_gate=False, min_recall=0.5, min_precision=0.5, max_mean_score_delta=0.1)
    rep = compare_outputs([REF], [CAND], tol)
    d = rep["detection"]
    assert d["reference_detections"] == 3 and d["candidate_detections"] == 3
    assert d["matched"] == 2 and d["missing"] == 1 and d["extra"] == 1
    assert d["recall"] == pytest.approx(2 / 3) and d["precision"] == pytest.approx(2 / 3)
    assert d["mean_score_delta"] == pytest.approx((0.05 + 0.05) / 2)
    assert d["max_score_delta"] == pytest.approx(0.05)
    assert d["mean_iou"] == pytest.approx((81 / 119 + 1) / 2)
    assert rep["passed"] and rep["map"] is None
    strict = compare_outputs([REF], [CAND], tol.replace(min_recall=0.9))
    assert not strict["passed"] and strict["failures"][0].startswith("detections: recall 0.667 < 0.9")


def test_tensor_level_numbers():
    ref = _dets([[0, 0, 100, 100]], [0.5], [1])
    cand = _dets([[0, 0, 100.5, 100]], [0.52], [1])
    t = tensor_errors([ref], [cand], atol=0.4, rtol=1e-3)
    assert t["boxes"]["max_abs"] == pytest.approx(0.5) and t["boxes"]["mean_abs"] == pytest.approx(0.125)
    assert t["boxes"]["max_rel"] == pytest.approx(0.005)
    assert t["scores"]["max_abs"] == pytest.approx(0.02, abs=1e-6)
    assert t["min_atol"] == pytest.approx(0.5 - 1e-3 * 100)  # the atol that passes at rtol=1e-3
    assert t["min_rtol"] == pytest.approx(0.04, rel=1e-5)  # 0.02 / 0.5
    assert t["passed"]  # exactly the minimum atol
    assert not tensor_errors([ref], [cand], atol=0.39, rtol=1e-3)["passed"]
    mism = tensor_errors([ref], [_dets([], [], [])], atol=1, rtol=0)
    assert mism["set_mismatch_images"] == 1 and mism["compared_images"] == 0 and not mism["passed"]


def test_map_level_and_table():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0}],
          "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}
    ref = _dets([[0, 0, 10, 10]], [0.9], [1])
    empty = _dets([], [], [])
    rep = compare_outputs([ref], [empty], Tolerances(tensor_gate=False), gt_json=gt, category_ids=[5, 9])
    assert rep["map"]["reference"] == pytest.approx(1.0) and rep["map"]["candidate"] == 0.0
    assert rep["map"]["ratio"] == 0.0 and not rep["map"]["passed"] and not rep["passed"]
    table = format_table([{"precision": "int8", "provider": "CPUExecutionProvider", "parity": rep}])
    assert "| int8 | CPUExecutionProvider | 1 |" in table and "FAIL" in table and "1.000 -> 0.000" in table


def _many(n, scores, label=1, x0=0.0):
    """``n`` disjoint detections (10 px boxes 20 px apart) with the given scores."""
    boxes = [[x0 + 20 * i, 0, x0 + 20 * i + 10, 10] for i in range(n)]
    return _dets(boxes, scores, [label] * n)


def test_near_tied_scores_that_swap_places_pass():
    """Two detections whose scores differ by 1e-7 come out in the other order: a tie, not an error."""
    ref = _dets([[0, 0, 10, 10], [50, 50, 60, 60], [0, 30, 10, 40]], [0.9, 0.6000001, 0.6], [1, 1, 2])
    cand = _dets([[0, 0, 10, 10], [0, 30, 10, 40], [50, 50, 60, 60]], [0.9, 0.6000001, 0.6], [1, 2, 1])
    rep = compare_outputs([ref], [cand], Tolerances())
    assert rep["passed"], rep["failures"]
    assert rep["tensor"]["scores"]["max_abs"] < 1e-6 and rep["tensor"]["min_atol"] == 0.0


def test_swaps_at_the_top_k_cut_pass_but_a_real_difference_fails():
    """Full outputs (max_detections each): the last places differ among near-equal scores -> pass; a
    high-score detection missing, or the same swap where scores are far apart, -> fail."""
    scores = [0.9 - 0.01 * i for i in range(9)] + [0.5]
    ref = _many(10, scores)
    cand = _many(10, scores[:9] + [0.50002], x0=0.0)
    cand["boxes"][9] += 500  # the 10th detection is another box: it made the cut instead of ref's 10th
    tol = Tolerances(score_floor=0.3)
    rep = compare_outputs([ref], [cand], tol, max_detections=10)
    assert rep["passed"], rep["failures"]
    assert rep["detection"]["swapped_at_cut"] == 2 and rep["detection"]["missing"] == 0
    assert rep["tensor"]["swapped_at_cut"] == 2 and rep["tensor"]["set_mismatch_images"] == 0
    assert not compare_outputs([ref], [cand], tol)["passed"]  # without the cut known, it is a difference
    far = _many(10, scores[:9] + [0.7])
    far["boxes"][9] += 500
    # the candidate kept a 0.7 the reference did not have although its own cut was at 0.5: a real difference (the
    # reference's 0.5 scoring below everything the full candidate kept is consistent with the cut, and is not)
    rep = compare_outputs([ref], [far], tol, max_detections=10)
    assert not rep["passed"] and rep["detection"]["extra"] == 1 and rep["detection"]["swapped_at_cut"] == 1
    top_missing = _many(10, scores)
    top_missing["boxes"][0] += 500
    assert not compare_outputs([ref], [top_missing], tol, max_detections=10)["passed"]


def test_a_reference_that_detects_nothing_is_never_verified():
    """Two empty outputs agree perfectly and prove nothing; a mAP ratio to a reference at mAP 0 neither."""
    empty = _dets([], [], [])
    rep = compare_outputs([empty], [empty], Tolerances())
    assert not rep["passed"] and rep["detection"]["reference_detections"] == 0
    assert rep["failures"] == ["detections: the reference detects nothing at score >= 0.3 on these 1 image(s); "
                               "matching empty outputs verifies nothing"]
    low = _dets([[0, 0, 10, 10]], [0.1], [1])  # a detection, but below the floor
    assert not compare_outputs([low], [low], Tolerances())["passed"]
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [60, 60, 10, 10], "area": 100,
                           "iscrowd": 0}], "categories": [{"id": 5, "name": "a"}]}
    wrong = _dets([[0, 0, 10, 10]], [0.9], [1])  # detects, but nothing right: mAP 0
    rep = compare_outputs([wrong], [wrong], Tolerances(), gt_json=gt, category_ids=[5])
    assert not rep["passed"] and not rep["map"]["passed"]
    assert any("reference's mAP is 0.0000" in f for f in rep["failures"])
    assert compare_outputs([REF], [REF], Tolerances())["passed"]  # a real reference still passes against itself


def test_map_level_fails_a_real_loss_and_never_one_within_its_noise():
    """The mAP level is judged against chance (paired bootstrap over images): a loss on one image of 200 is below
    the noise of 200 images and passes; boxes three times noisier on every image lose beyond it and fail. Either
    way the verdict states the images and the interval."""
    from gkd.export.parity import map_comparison, map_matches
    from tests.test_kd.test_paired_map import CATEGORY_IDS, _world

    gt, outs = _world(200, 7)
    ref = map_matches(outs["good"], gt, CATEGORY_IDS)
    one_image_worse = [dict(o) for o in outs["good"]]
    one_image_worse[3] = {**outs["good"][3], "boxes": outs["good"][3]["boxes"] + 30}
    small = map_comparison(ref, map_matches(one_image_worse, gt, CATEGORY_IDS), 0.999)
    assert small["delta"] < -0.001 * small["reference"]  # below the allowed 0.1%, but on a single image
    assert small["passed"] and small["images"] == 200 and small["ci95"][1] >= -small["allowed_loss"]
    big = map_comparison(ref, map_matches(outs["bad"], gt, CATEGORY_IDS), 0.99)
    assert not big["passed"] and big["ci95"][1] < -big["allowed_loss"]
    assert "200 image(s)" in big["summary"] and "FAIL" in big["summary"]
    rep = compare_outputs(outs["good"], outs["bad"], Tolerances(tensor_gate=False), map_level=big)
    assert not rep["passed"] and any(f.startswith("mAP: ") and "95% interval" in f for f in rep["failures"])
