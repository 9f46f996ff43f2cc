"""The fixed-shape NMS (export/static_nms.py) against torchvision's batched_nms, in torch, onnxruntime and TensorRT-RTX.

The reference is what torchvision's ``postprocess_detections`` does per image: ``scores > score_thresh``,
``batched_nms``, the first K. Every comparison is exact (same indices, boxes, scores, classes, order) and requires
``converged``: Cluster-NMS's fixed point is greedy NMS, and the order of tied scores is the stable sort's that
torchvision's CPU kernel uses.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision

from gkd.export.static_nms import (DEFAULT_ITERATIONS, StaticDetections, static_batched_nms, static_detections)

FORBIDDEN = {"NonZero", "NonMaxSuppression", "Loop", "If", "Scan", "ScatterND", "ScatterElements", "Scatter"}
IOU = 0.5


def _boxes(xy: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    return torch.cat([xy, xy + wh], -1)


def random_case(gen: torch.Generator, n: int, num_classes: int = 4, size: float = 100.0):
    """``n`` random boxes (1-50 px), uniform scores, ``num_classes`` classes: ``boxes [n, 4]``, ``scores``,
    ``classes``."""
    xy = torch.rand(n, 2, generator=gen) * size
    wh = 1 + torch.rand(n, 2, generator=gen) * 49
    return _boxes(xy, wh), torch.rand(n, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def clustered_case(gen: torch.Generator, objects: int, per_object: int, num_classes: int = 3):
    """Dense clusters: ``per_object`` boxes jittered around each object, scores decaying with the jitter."""
    wh = 20 + torch.rand(objects, 2, generator=gen) * 60
    xy = torch.rand(objects, 2, generator=gen) * 150
    which = torch.arange(objects).repeat_interleave(per_object)
    jitter = torch.randn(objects * per_object, 4, generator=gen) * 0.12 * wh[which].repeat(1, 2)
    boxes = _boxes(xy[which], wh[which]) + jitter
    boxes = torch.cat([torch.min(boxes[:, :2], boxes[:, 2:]), torch.max(boxes[:, :2], boxes[:, 2:])], 1)
    scores = (torch.exp(-jitter.abs().sum(1) / 20) * (0.5 + 0.5 * torch.rand(len(which), generator=gen))).clamp(0, 1)
    classes = torch.randint(0, num_classes, (objects,), generator=gen)[which]
    return boxes, scores, classes


def chain_case(length: int, step: float = 2.5, width: float = 10.0):
    """Boxes shifted by ``step`` along x, scores falling: each overlaps its neighbour at IoU 0.6, the one after it at
    0.33: greedy keeps 0, 2, 4, ...; Fast NMS (one pass) keeps only 0. Every Cluster-NMS iteration settles
    one more link, so a chain of ``length`` needs about ``length`` iterations."""
    x = torch.arange(length, dtype=torch.float32) * step
    boxes = torch.stack([x, torch.zeros(length), x + width, torch.full((length,), width)], 1)
    return boxes, torch.linspace(0.9, 0.5, length), torch.zeros(length, dtype=torch.int64)


def reference(boxes, scores, classes, score_thresh: float | None, k: int | None = None) -> torch.Tensor:
    """Indices (into the image's N) torchvision keeps, in its output order."""
    idx = torch.nonzero(scores > (float("-inf") if score_thresh is None else score_thresh))[:, 0]
    keep = idx[torchvision.ops.batched_nms(boxes[idx], scores[idx], classes[idx], IOU)]
    return keep if k is None else keep[:k]


def assert_nms_matches(boxes, scores, classes, score_thresh=None, iterations=64):
    """static_batched_nms on ``[B, N]`` inputs keeps per image exactly torchvision's set, and says converged."""
    keep, converged = static_batched_nms(boxes, scores, classes, IOU, iterations, score_thresh=score_thresh)
    assert keep.shape == scores.shape and keep.dtype == torch.bool and converged.shape == (scores.shape[0],)
    assert converged.all()
    for i in range(boxes.shape[0]):
        ref = reference(boxes[i], scores[i], classes[i], score_thresh)
        assert torch.nonzero(keep[i])[:, 0].tolist() == sorted(ref.tolist()), f"image {i}"


def assert_detections_match(boxes, scores, classes, score_thresh=0.05, k=100, iterations=64, **kw):
    """static_detections equals torchvision's kept detections per image, in order, zero-padded to K."""
    num, ob, os_, oc, conv = static_detections(boxes, scores, classes, score_thresh=score_thresh,
                                               iou_threshold=IOU, max_detections=k, iterations=iterations, **kw)
    b = boxes.shape[0]
    assert num.shape == (b, 1) and num.dtype == torch.int32
    assert ob.shape == (b, k, 4) and os_.shape == (b, k) and oc.shape == (b, k) and oc.dtype == torch.int32
    assert conv.shape == (b,) and conv.all()
    for i in range(b):
        ref = reference(boxes[i], scores[i], classes[i], score_thresh, k)
        n = int(num[i])
        assert n == len(ref), f"image {i}: {n} detections, torchvision {len(ref)}"
        assert torch.equal(ob[i, :n], boxes[i, ref]) and torch.equal(os_[i, :n], scores[i, ref])
        assert torch.equal(oc[i, :n].long(), classes[i, ref].long())
        assert not ob[i, n:].any() and not os_[i, n:].any() and not oc[i, n:].any()
    return num


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_boxes_batch_with_different_images(seed):
    gen = torch.Generator().manual_seed(seed)
    cases = [random_case(gen, 300) for _ in range(3)]
    boxes, scores, classes = (torch.stack(x) for x in zip(*cases))
    assert_nms_matches(boxes, scores, classes)
    assert_detections_match(boxes, scores, classes, score_thresh=0.3, k=50)
    assert_detections_match(boxes[:1], scores[:1], classes[:1], score_thresh=0.3, k=50)  # B = 1
    assert_detections_match(boxes, scores, classes.to(torch.int32), score_thresh=0.3, k=50)  # int32 class ids


def test_dense_clusters_where_fast_nms_is_wrong():
    gen = torch.Generator().manual_seed(3)
    cases = [clustered_case(gen, 6, 40), clustered_case(gen, 3, 80)]
    boxes, scores, classes = (torch.stack(x) for x in zip(*cases))
    assert_nms_matches(boxes, scores, classes)
    assert_detections_match(boxes, scores, classes, score_thresh=0.05, k=100)
    fast, _ = static_batched_nms(boxes, scores, classes, IOU, iterations=1)
    exact, _ = static_batched_nms(boxes, scores, classes, IOU, iterations=64)
    assert (fast != exact).any()  # the clusters hold chains: one pass (Fast NMS) suppresses too much


def test_suppression_chain_and_converged():
    boxes, scores, classes = (x[None] for x in chain_case(12))
    greedy = reference(boxes[0], scores[0], classes[0], None)
    assert sorted(greedy.tolist()) == list(range(0, 12, 2))
    fast, conv = static_batched_nms(boxes, scores, classes, IOU, iterations=1)
    assert torch.nonzero(fast[0])[:, 0].tolist() == [0] and not conv.any()
    # the fewest iterations at which `converged` holds: before it, False; from it on, True and exact
    needed = next(t for t in range(1, 30) if static_batched_nms(boxes, scores, classes, IOU, t)[1].all())
    assert needed > 5  # a long chain needs many iterations
    for t in (2, 3, needed - 1):
        keep, conv = static_batched_nms(boxes, scores, classes, IOU, t)
        assert not conv.any(), t
    for t in (needed, needed + 1, 30):
        keep, conv = static_batched_nms(boxes, scores, classes, IOU, t)
        assert conv.all() and torch.nonzero(keep[0])[:, 0].tolist() == sorted(greedy.tolist()), t
    # converged is per image: a chain next to an image without overlaps
    quiet = torch.tensor([[0, 0, 1, 1], [5, 5, 6, 6]], dtype=torch.float32).repeat(6, 1)[None] + \
        torch.arange(12, dtype=torch.float32)[None, :, None] * 10
    _, conv = static_batched_nms(torch.cat([boxes, quiet]), scores.repeat(2, 1), classes.repeat(2, 1), IOU, 3)
    assert conv.tolist() == [False, True]


def test_exact_ties_in_score_follow_torchvision_order():
    """Tied scores: torchvision's CPU nms sorts stably (lower index first); the precedence matrix does the same,
    so kept set and output order agree, ties included."""
    gen = torch.Generator().manual_seed(4)
    boxes, _, classes = clustered_case(gen, 5, 30, num_classes=2)
    scores = torch.randint(1, 5, (len(boxes),), generator=gen).float() / 5  # only 4 distinct values
    assert_nms_matches(boxes[None], scores[None], classes[None])
    assert_detections_match(boxes[None], scores[None], classes[None], score_thresh=0.1, k=100)
    same = torch.full_like(scores, 0.5)  # all tied
    assert_nms_matches(boxes[None], same[None], classes[None])
    assert_detections_match(boxes[None], same[None], classes[None], k=40)


def test_identical_boxes():
    box = torch.tensor([10.0, 10.0, 50.0, 40.0])
    boxes = box.repeat(8, 1)
    scores = torch.tensor([0.3, 0.9, 0.9, 0.5, 0.7, 0.9, 0.2, 0.7])
    classes = torch.tensor([0, 0, 1, 0, 1, 1, 2, 0])
    num = assert_detections_match(boxes[None], scores[None], classes[None])
    assert int(num) == 3  # one per class: the first of the 0.9s in classes 0 and 1, and class 2's only box
    assert_nms_matches(boxes[None], scores[None], classes[None])


def test_zero_area_boxes():
    """Zero-area boxes (lines, points, identical points): torchvision's 0/0 IoU is NaN and suppresses nothing;
    here it is 0, the same decision."""
    boxes = torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 5, 20], [5, 5, 5, 20], [0, 0, 10, 0], [0, 0, 10, 10],
                          [0, 0, 10, 10], [5, 5, 5, 5]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    classes = torch.zeros(8, dtype=torch.int64)
    assert_nms_matches(boxes[None], scores[None], classes[None])
    assert_detections_match(boxes[None], scores[None], classes[None])
    keep, _ = static_batched_nms(boxes[None], scores[None], classes[None], IOU, 4)
    assert keep[0].tolist() == [True] * 6 + [False, True]  # only the repeated 10x10 box is suppressed


def test_many_classes():
    """80 classes, boxes of different classes stacked on each other: only same-class overlaps suppress."""
    gen = torch.Generator().manual_seed(5)
    boxes, scores, classes = clustered_case(gen, 10, 50, num_classes=80)
    classes = torch.randint(0, 80, classes.shape, generator=gen)  # classes mixed within each cluster
    assert_nms_matches(boxes[None], scores[None], classes[None])
    assert_detections_match(boxes[None], scores[None], classes[None], score_thresh=0.05, k=300)
    b2, s2, c2 = random_case(gen, 1200, num_classes=80, size=1000)  # N > 1000: batched_nms's per-class path
    assert_detections_match(b2[None], s2[None], c2[None], score_thresh=0.2, k=500)


def test_borderline_iou_matches_per_class_nms_where_the_offset_trick_rounds():
    """IoU exactly at the threshold (0.5: suppress only above it). torchvision's batched_nms offsets each class's
    boxes by class * (max + 1) on the CPU below 1000 boxes (and whenever traced for export); the offset rounds
    coordinates, which flips such pairs. Its per-class path and the same-class mask compute the IoU of the
    boxes as given and agree."""
    per_class = getattr(torchvision.ops.boxes, "_batched_nms_vanilla", None)
    if per_class is None:
        pytest.skip("this torchvision has no torchvision.ops.boxes._batched_nms_vanilla to compare with")
    gen = torch.Generator().manual_seed(6)
    far = torch.tensor([0.0, 0.0, 1000.0, 1000.0])
    flipped = 0
    for _ in range(60):
        x, w = torch.rand(2, generator=gen) * 1000, 1 + torch.rand(2, generator=gen) * 50
        a = torch.cat([x, x + w])
        b = torch.cat([x, x + w * torch.tensor([1.0, 2.0])])  # IoU 0.5 up to rounding
        boxes, scores, classes = torch.stack([a, b, far]), torch.tensor([0.9, 0.8, 0.1]), torch.tensor([79, 79, 0])
        keep, conv = static_batched_nms(boxes[None], scores[None], classes[None], IOU, 3)
        assert conv.all() and torch.nonzero(keep[0])[:, 0].tolist() == sorted(per_class(boxes, scores, classes,
                                                                                          IOU).tolist())
        flipped += set(per_class(boxes, scores, classes, IOU).tolist()) != set(
            torchvision.ops.batched_nms(boxes, scores, classes, IOU).tolist())
    assert flipped > 0  # the offset trick does flip some of them (about half, measured)


def test_single_candidate_and_k_above_n():
    boxes, scores, classes = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), torch.tensor([[0.6]]), torch.tensor([[3]])
    num = assert_detections_match(boxes, scores, classes, k=10)
    assert int(num) == 1
    assert_nms_matches(boxes, scores, classes)
    keep, conv = static_batched_nms(boxes, scores, classes, IOU, 1)
    assert keep.tolist() == [[True]] and conv.all()


def test_everything_below_threshold():
    gen = torch.Generator().manual_seed(7)
    boxes, scores, classes = random_case(gen, 50)
    scores = scores * 0.05  # all <= 0.05, and `>` is the rule
    num, ob, os_, oc, conv = static_detections(boxes[None], scores[None], classes[None], score_thresh=0.05,
                                               iou_threshold=IOU, max_detections=20)
    assert int(num) == 0 and not ob.any() and not os_.any() and not oc.any() and conv.all()
    keep, conv = static_batched_nms(boxes[None], scores[None], classes[None], IOU, score_thresh=0.05)
    assert not keep.any() and conv.all()


def test_padding_and_low_scores_never_suppress():
    """An image padded to the batch's N with -inf scores, and candidates under the threshold, both copies of its
    real boxes at lower indices: they are never kept and suppress nothing. (Invalid scores are below every valid
    one, so they never precede one: the structure guarantees it; min_size below covers invalid high scores.)"""
    gen = torch.Generator().manual_seed(8)
    real, s_real, c_real = random_case(gen, 40)
    boxes = torch.stack([torch.cat([real[:20], real[:20]]), random_case(gen, 40)[0]])
    scores = torch.stack([torch.cat([torch.full((20,), float("-inf")), s_real[:20] * 0.5 + 0.5]),
                          torch.rand(40, generator=gen)])
    scores[0, :10] = 0.01  # under score_thresh but over -inf
    classes = torch.stack([torch.cat([c_real[:20], c_real[:20]]), c_real])
    assert_detections_match(boxes, scores, classes, score_thresh=0.05, k=30)
    scores_inf = scores.clone()
    scores_inf[0, :20] = float("-inf")
    keep, conv = static_batched_nms(boxes, scores_inf, classes, IOU)
    assert not keep[0, :20].any() and keep[0, 20:].sum() > 10 and conv.all()
    assert_nms_matches(boxes, scores_inf, classes)


def test_max_detections_truncates_in_score_order():
    gen = torch.Generator().manual_seed(9)
    boxes, scores, classes = random_case(gen, 400, size=400)
    num = assert_detections_match(boxes[None], scores[None], classes[None], score_thresh=0.0, k=17)
    assert int(num) == 17


def test_min_size_matches_remove_small_boxes():
    gen = torch.Generator().manual_seed(10)
    boxes, scores, classes = random_case(gen, 200)
    boxes[::7, 2] = boxes[::7, 0] + 0.005  # narrower than 1e-2
    # a too-small box with the top score over a valid one (IoU 0.82): removed first, so it suppresses nothing
    boxes[:2] = torch.tensor([[0, 0, 0.009, 10], [0, 0, 0.011, 10]])
    scores[:2], classes[:2] = torch.tensor([1.5, 1.4]), 0  # above every random score
    num, ob, os_, oc, conv = static_detections(boxes[None], scores[None], classes[None], score_thresh=0.05,
                                               iou_threshold=IOU, max_detections=100, min_size=1e-2)
    idx = torch.nonzero(scores > 0.05)[:, 0]
    idx = idx[torchvision.ops.remove_small_boxes(boxes[idx], 1e-2)]
    ref = idx[torchvision.ops.batched_nms(boxes[idx], scores[idx], classes[idx], IOU)][:100]
    assert int(ref[0]) == 1
    assert int(num) == len(ref) and torch.equal(ob[0, : len(ref)], boxes[ref]) and conv.all()
    assert torch.equal(os_[0, : len(ref)], scores[ref]) and torch.equal(oc[0, : len(ref)].long(), classes[ref])


def test_pre_nms_top_n_is_exact_when_it_says_so():
    """With M < valid candidates the cut is exact iff the M best already hold K detections; converged says which."""
    gen = torch.Generator().manual_seed(11)
    boxes, scores, classes = (torch.stack(x) for x in zip(*[clustered_case(gen, 8, 40) for _ in range(2)]))
    scores[:, ::5] = 0.5  # ties at the cut too
    assert_detections_match(boxes, scores, classes, k=8, pre_nms_top_n=150)  # the 150 best hold 9 and 13
    assert_detections_match(boxes, scores, classes, k=100, pre_nms_top_n=320)  # every candidate survives the cut
    num, *_, conv = static_detections(boxes, scores, classes, score_thresh=0.05, iou_threshold=IOU,
                                      max_detections=100, pre_nms_top_n=20)
    full = [len(reference(boxes[i], scores[i], classes[i], 0.05, 100)) for i in range(2)]
    assert not conv.any() and all(int(num[i]) < full[i] for i in range(2))  # too few detections in the top 20


def test_argument_checks():
    b, s, c = chain_case(3)
    with pytest.raises(ValueError, match="iterations"):
        static_batched_nms(b[None], s[None], c[None], IOU, 0)
    with pytest.raises(ValueError, match="max_detections"):
        static_detections(b[None], s[None], c[None], score_thresh=0, iou_threshold=IOU, max_detections=4000)
    with pytest.raises(ValueError, match=r"boxes \[B, N, 4\]"):
        static_batched_nms(b, s, c, IOU)


# ----------------------------------------------------------------------------------------------------------------
# the exported graph


class _Keep(torch.nn.Module):
    def forward(self, boxes, scores, classes):
        return static_batched_nms(boxes, scores, classes, IOU, DEFAULT_ITERATIONS, score_thresh=0.05)


NAMES = ["boxes", "scores", "classes"]
DYNAMIC = {n: {0: "batch", 1: "candidates"} for n in NAMES}
PROFILE = {"boxes": {"min": [1, 1, 4], "opt": [1, 600, 4], "max": [4, 2000, 4]},
           "scores": {"min": [1, 1], "opt": [1, 600], "max": [4, 2000]},
           "classes": {"min": [1, 1], "opt": [1, 600], "max": [4, 2000]}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (module, path)}``: static_detections (plain and with pre_nms_top_n) and static_batched_nms,
    exported with the legacy exporter, opset 17, B and N dynamic."""
    root = tmp_path_factory.mktemp("static_nms")
    gen = torch.Generator().manual_seed(12)
    args = tuple(torch.stack(x) for x in zip(*[clustered_case(gen, 4, 50) for _ in range(2)]))
    modules = {"detections": StaticDetections(0.05, IOU, 100), "keep": _Keep(),
               "detections_pre": StaticDetections(0.05, IOU, 100, pre_nms_top_n=150, min_size=1e-2)}
    out = {}
    for name, module in modules.items():
        path = root / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation warning
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=NAMES,
                              dynamic_axes=DYNAMIC)
        out[name] = (module, path)
    return out


def test_onnxruntime_equals_torch_for_any_batch_and_n(exported):
    ort = pytest.importorskip("onnxruntime")
    gen = torch.Generator().manual_seed(13)
    inputs = [tuple(x[None] for x in random_case(gen, 1)),
              tuple(torch.stack(x) for x in zip(*[clustered_case(gen, 5, 60), clustered_case(gen, 2, 150)])),
              tuple(torch.stack(x) for x in zip(*[random_case(gen, 700), random_case(gen, 700)]))]
    for name, (module, path) in exported.items():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for args in inputs:
            got = sess.run(None, {n: a.numpy() for n, a in zip(NAMES, args)})
            want = module(*args)
            b = args[0].shape[0]
            if name != "keep":  # EfficientNMS_TRT's shapes, whatever N is
                assert [g.shape for g in got] == [(b, 1), (b, 100, 4), (b, 100), (b, 100), (b,)]
            for g, w in zip(got, want):
                assert g.dtype == w.numpy().dtype and np.array_equal(g, w.numpy()), (name, args[0].shape)


def test_graph_uses_no_data_dependent_ops(exported):
    import onnx

    for name, (_, path) in exported.items():
        model = onnx.load(str(path))
        ops = {n.op_type for n in model.graph.node}
        assert not ops & FORBIDDEN, (name, ops & FORBIDDEN)
        assert "TopK" in ops or name == "keep"
        assert not any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute)


def test_tensorrt_rtx_parses_and_builds(exported):
    pytest.importorskip("tensorrt_rtx", exc_type=ImportError,
                        reason="tensorrt_rtx is not importable here (pip install tensorrt-rtx, the trt-rtx extra): "
                               "the TensorRT-RTX parse/build check cannot run")
    from gkd.export import trt_rtx

    # in child processes, as gkd export runs it: TensorRT-RTX's libraries never load into the test process
    results = trt_rtx.check_files({name: path for name, (_, path) in exported.items()}, PROFILE)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["parsed"] and r["rejected"] == [], (name, r["rejected"])
        assert r["build"]["ok"], (name, r["build"])
