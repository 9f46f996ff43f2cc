"""The robust-weight audit's pieces: what the teacher does with a box, and the grouping that compares weights
within a level (the audit's own run is covered by the micro study in tests/test_study.py)."""
import pytest
import torch

from gkd.kd.distill.audit import summarize_weights, teacher_outcome


def _det(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_teacher_outcome_takes_the_most_confident_overlapping_detection():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 70, 80, 80]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, 1])
    det = _det([[0, 0, 10, 10], [1, 1, 10, 10],       # box 0: class 2 at 0.9 beats class 1 at 0.5 -> confused
                [20, 20, 30, 30], [20, 20, 31, 30],   # box 1: class 2 at 0.8 beats class 1 at 0.7 -> right
                [50, 50, 52, 52],                     # box 2: IoU 0.04 only -> missed
                [70, 70, 80, 80]],                    # box 3: right class, but under the score floor -> missed
               [2, 1, 2, 1, 3, 1], [0.9, 0.5, 0.8, 0.7, 0.99, 0.01])
    assert teacher_outcome(det, gt, labels) == ["confused", "right", "missed", "missed"]
    assert teacher_outcome(_det([], [], []), gt, labels) == ["missed"] * 4
    assert teacher_outcome(det, gt[:0], labels[:0]) == []


def test_summary_compares_within_a_level():
    """Level 0 holds low weights and level 1 high ones; "confused" boxes sit mostly on level 0. Pooled, "confused"
    looks down-weighted (0.6 vs 0.75); within each level right and confused get the same weight: 0."""
    rows = ([{"w": 0.5, "outcome": "right", "class": "a", "level": 0, "tags": ["small"]}] * 2 +
            [{"w": 0.5, "outcome": "confused", "class": "a", "level": 0, "tags": ["small"]}] * 8 +
            [{"w": 1.0, "outcome": "right", "class": "b", "level": 1, "tags": []}] * 2 +
            [{"w": 1.0, "outcome": "confused", "class": "b", "level": 1, "tags": []}] * 2 +
            [{"w": 0.8, "outcome": "missed", "class": "b", "level": 1, "tags": []}] * 4)
    out = summarize_weights(rows)
    g = out["groups"]
    assert g["teacher right"]["mean"] == pytest.approx(0.75) and g["teacher confused"]["mean"] == pytest.approx(0.6)
    assert g["level 0"]["n"] == 10 and g["tag small"]["n"] == 10 and g["tag clean"]["n"] == 8
    assert g["class b / teacher missed"] == {"n": 4, "mean": 0.8, "std": 0.0}
    assert out["within_level"]["right - confused"] == pytest.approx(0.0)
    # "missed" occurs on level 1 only: 1.0 - 0.8 there
    assert out["within_level"]["right - missed"] == pytest.approx(0.2)
    assert summarize_weights([])["within_level"] == {"right - confused": None, "right - missed": None}


def test_summary_compares_a_class_and_a_tag_with_the_rest_within_a_level():
    """The positive controls' question: are a class's (or a tag's) boxes weighted less than the others on the same
    level? Blurred boxes sit on level 1 (high weights) and get 0.1 less there; pooled they would look heavier."""
    row = lambda w, cls, lv, tags: {"w": w, "outcome": "right", "class": cls, "level": lv, "tags": tags}  # noqa: E731
    rows = ([row(0.5, "a", 0, [])] * 4 + [row(1.0, "a", 1, [])] * 2 + [row(0.9, "b", 1, ["blurred"])] * 6 +
            [row(0.5, "b", 0, ["small"])] * 2)
    out = summarize_weights(rows)
    assert out["groups"]["tag blurred"]["mean"] == pytest.approx(0.9)
    assert out["groups"]["all"]["mean"] < 0.9  # pooled, blurred boxes look heavier than the rest
    within = out["within_level"]
    assert within["others - tag blurred"] == pytest.approx(0.1)  # only level 1 has both
    # small boxes: only level 0, where they weigh as much as the others
    assert within["others - tag small"] == pytest.approx(0.0)
    # class b: 0 on level 0 (6 boxes), 1.0 - 0.9 on level 1 (8 boxes)
    assert within["others - class b"] == pytest.approx((6 * 0.0 + 8 * 0.1) / 14, abs=1e-4)  # rounded to 4 places
    assert within["others - class a"] == pytest.approx(-within["others - class b"])


def test_summary_reports_the_two_cosines_the_weight_compares():
    """Where the rows carry each network's best same-class cosine, every group gets their means, and the tags and
    classes get the teacher's within-level contrast: is the part atypical of its class in the teacher's features?"""
    row = lambda tags, cos_t: {"w": 0.9, "outcome": "right", "class": "a", "level": 0, "tags": tags,  # noqa: E731
                               "cos_s": 0.5, "cos_t": cos_t}
    out = summarize_weights([row(["blurred"], 0.4)] * 2 + [row([], 0.7)] * 2)
    assert out["groups"]["tag blurred"] == {"n": 2, "mean": 0.9, "std": 0.0, "student_cos": 0.5, "teacher_cos": 0.4}
    assert out["within_level"]["teacher cos: others - tag blurred"] == pytest.approx(0.3)
    assert out["within_level"]["others - tag blurred"] == pytest.approx(0.0)
    assert "teacher_cos" not in summarize_weights([{k: v for k, v in row([], 0.7).items() if k != "cos_t"}])[
        "groups"]["all"]
