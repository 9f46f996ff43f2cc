"""Fixed-shape, class-aware NMS and detection post-processing in standard ONNX ops (TensorRT / TensorRT-RTX).

torchvision's detectors end in ``batched_nms``: boolean masking (``NonZero``) and ``NonMaxSuppression`` inside an
``If``. TensorRT-RTX has no runner for either, and in full TensorRT they give data-dependent shapes, the slow part of
a torchvision detector there. This module computes the same result with fixed shapes:

* :func:`static_batched_nms` is **Cluster-NMS** (Zheng et al. 2020, arXiv 2005.03572) in a matrix form: with ``S`` the
  0/1 matrix "candidate i comes before j, has the same class, and their IoU exceeds the threshold",
  ``keep_t = valid AND (keep_{t-1} @ S == 0)``. Its fixed point is greedy NMS exactly (the fixed point is unique: by
  induction over the score order, each candidate's status is decided by the earlier ones, as in greedy NMS), and
  ``t`` iterations decide every candidate whose suppression chain ("A suppresses B, which would have suppressed C")
  is shorter than ``t``. The iterations are unrolled; ``converged`` says the last one changed nothing, which proves
  the result is the fixed point.
* :func:`static_detections` adds the score threshold and a final top-K, with EfficientNMS_TRT's output contract:
  ``num_detections [B, 1]`` int32, ``boxes [B, K, 4]``, ``scores [B, K]``, ``classes [B, K]`` int32, detections first in
  descending score, zero-padded to K.

Ops in the exported graphs (legacy exporter, opset 17; all three variants of the tests): Abs, Add, And, Cast, Clip,
Concat, Constant, ConstantOfShape, Div, Equal, Expand, Gather, GatherElements, Greater, GreaterOrEqual, Less,
LessOrEqual, MatMul, Max, Min, Mul, Or, Range, ReduceMax, ReduceSum, Shape, Sub, TopK, Unsqueeze, Where. No NonZero,
NonMaxSuppression, Loop, If or Scatter*; every shape comes from B, N or constants, and B and N stay dynamic.
TensorRT-RTX 1.7.1 parses and builds them on the CPU (B 1-4, N 1-2000 profile).

Design choices (why):

* **No sort.** Cluster-NMS is usually written as "sort by score, take the upper triangle of the IoU matrix". Here the
  order is a comparison matrix instead: ``i`` precedes ``j`` iff ``s_i > s_j``, or ``s_i == s_j`` and ``i < j``. That is
  the order of a stable descending sort, which is what torchvision's CPU ``nms`` uses, so ties resolve as torchvision
  resolves them (lower index first); it needs no TopK over all N (TensorRT's TopK takes K < 3840 only, so N would be
  capped), and no reliance on how a runtime orders TopK ties (ONNX says lower index first; TensorRT does not say).
* **A same-class mask, not torchvision's coordinate offsets.** Offsetting boxes by ``class * (max_coord + 1)`` adds
  rounding to every IoU (a 1000 px image with 80 classes puts coordinates near 8e4, where an fp32 step is 0.008 px),
  so near-threshold pairs can flip against torchvision's per-class result; in an FP16 graph such coordinates
  overflow (fp16 max 65504). One N x N ``Equal`` of the class ids costs less than the IoU itself and is exact.
* **IoU as torchvision's CPU kernel computes it**: ``inter / (area_i + area_j - inter)`` with the same operation order,
  and ``IoU > threshold`` suppresses. Where the union is 0 (two zero-area boxes) torchvision gets 0/0 = NaN, which
  suppresses nothing; here the union is clamped at the smallest normal float, so the IoU is 0 (no NaN enters the
  graph), the same decision.
* **Counting instead of max(IoU * keep).** ``max_i IoU_ij keep_i > thr`` iff some kept earlier box overlaps ``j`` above
  the threshold iff ``(keep @ S)_j > 0``: one MatMul (GEMV) per iteration on a 0/1 matrix, exact in fp32, fp16 or
  TF32 (a sum of non-negative terms is never rounded to 0).
* **Ranking without sort**: the output order is the rank of each kept detection among the kept ones,
  ``rank_j = (keep @ P)_j`` with ``P`` the precedence matrix; TopK over ``count - rank`` (distinct integers) returns the
  detections in descending score with torchvision's tie order, whatever the runtime does with ties.
* Invalid candidates (score not above ``score_thresh``, -inf or NaN scores, boxes smaller than ``min_size``) are
  neither kept nor suppress anything: ``keep`` starts at, and stays under, the validity mask, and a row of ``S`` counts
  only through ``keep``. Pad a batch with ``-inf`` scores (or scores under ``score_thresh``).

Agreement with ``torchvision.ops.batched_nms`` (tests/test_export/test_static_nms.py): the same kept set, scores and
order, ties included, in every tested case, once ``converged`` is True. Where an IoU lies on the threshold to the
last bit, torchvision's two code paths disagree with each other (its coordinate offsets, used on the CPU up to 1000
boxes and whenever traced for export, flipped about half of such pairs in the tests) and this module agrees with
the per-class path (the boxes' own IoU). The remaining sources of difference: a graph computed in FP16 (IoU and
score comparisons rounded differently; keep the post-processing in FP32: it is a few N x N element-wise ops), and
torchvision's CUDA ``nms`` (its own kernel, not compared here).

Convergence on detector-like outputs (measured with ``python -m gkd.export.static_nms``, commit 7a0b9a8): N = 600 =
100 proposals x 6 classes per image, as a trained two-stage head emits them (most proposals jittered around 1-12
objects, per-class boxes regressed part of the way to the object, softmax scores falling with the distance, the rest
background), IoU 0.5, K = 100. "Not converged" is ``converged == False`` after T iterations; "wrong" is a kept set
that differs from greedy NMS (the flag is conservative: a result can be right one iteration before it is proven):

    scene (images; mean candidates > thresh; mean kept)   not converged at T = 2 / 3 / 5 / 10   most T needed
    1-12 objects, score_thresh 0.05 (2000; 135; 41)       82.2% / 34.6% /  0.6% / 0             6
    20-40 objects, score_thresh 0.05 (500; 136; 79)       55.8% / 12.4% /  0.2% / 0             6
    1-12 objects, score_thresh 0.001 (500; 597; 230)      100%  / 99.0% / 19.4% / 0             8

    scene                                                 wrong at T = 2 / 3 / 5 / 10
    1-12 objects, score_thresh 0.05                       34.6% /  3.8% / 0    / 0
    20-40 objects, score_thresh 0.05                      12.4% /  1.6% / 0    / 0
    1-12 objects, score_thresh 0.001                      99.0% / 53.8% / 1.4% / 0

Fast NMS (T = 1) is wrong on most images; T = 10 converged on every image of all three scenes. ``pre_nms_top_n``
(exact when the M best hold the K detections): M = 300 was exact on every image at score_thresh 0.05 (M = 150 on
74% / 70%), and on 52% at score_thresh 0.001 (the longest needed M = 598 there).

Speed (commit 7a0b9a8): onnxruntime 1.31.1, CPU execution provider, 1 thread (intra and inter op), B = 1, candidates
as above, 50 runs round robin over the graphs, min / median ms, on an "AMD EPYC" (lscpu's model name: family 25
(Zen 3), AVX2, no AVX-512; a 2-core KVM guest shared with other work, so the medians carry load):

    graph                                                     N = 600 (134 > thresh)    N = 1000 (278 > thresh)
    static_batched_nms, T = 3                                 1.85 / 2.09               4.77 / 6.00
    static_batched_nms, T = 5                                 1.90 / 2.26               4.98 / 5.94
    static_batched_nms, T = 10                                2.11 / 2.41               5.33 / 6.58
    static_detections, T = 10                                 2.16 / 2.56               5.62 / 6.96
    static_detections, T = 10, pre_nms_top_n = 300            0.81 / 0.96               0.82 / 1.05
    ONNX NonMaxSuppression node (scores [1, 6, N])            0.048 / 0.066             0.066 / 0.106
    torchvision's tail (NonZero mask, batched_nms, [:K])      0.106 / 0.119             0.135 / 0.167

On a CPU the fixed-shape NMS is 15-85x slower than onnxruntime's NonMaxSuppression: it always does the N^2 work
(about 25 element-wise passes over ``[N, N]``, memory-bound), where a greedy NMS stops early on few candidates
above the threshold. It exists for the runtimes that have no data-dependent NMS (TensorRT-RTX) or run it badly
(TensorRT, GPUs: N^2 = 1e6 element-wise work is small there, data-dependent shapes are not); on the CPU keep
onnxruntime's NonMaxSuppression graph, or cap the cost with ``pre_nms_top_n``. An iteration (one GEMV) costs
0.04-0.08 ms of it.

Default ``iterations`` = 10: every image of the three scenes converged by 8, and 7 iterations over 3 add under 0.6 ms
on this CPU at N = 1000 (less on a GPU); images that would need more are flagged by ``converged``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_ITERATIONS", "static_batched_nms", "static_detections", "StaticDetections"]

#: unrolled Cluster-NMS iterations (see the module docstring for the measurements behind it)
DEFAULT_ITERATIONS = 10

#: TensorRT's TopK takes K < 3840
MAX_TOPK = 3839

#: the smallest normal float32: the union's floor (see _pairwise)
_FLT_MIN = 1.1754943508222875e-38


def _pairwise(boxes: Tensor, scores: Tensor, classes: Tensor, order: Tensor, iou_threshold: float
              ) -> tuple[Tensor, Tensor]:
    """The precedence matrix ``P [B, N, N]`` (float 0/1: row i comes before column j in a stable descending sort of
    the scores, ``order [B or 1, N]`` breaking ties: lower first) and the suppression matrix ``S [B, N, N]`` (float
    0/1: i precedes j, same class, IoU > threshold).

    Invalid candidates need no mask here: a row of ``S`` or ``P`` only counts through ``keep_i``, which is 0 for them.
    """
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]  # [B, N] each
    area = (x2 - x1) * (y2 - y1)
    # rows i, columns j; the same operations in the same order as torchvision's CPU nms kernel, so the IoU is the
    # same float and the threshold decisions agree bit for bit
    w = (torch.min(x2[:, :, None], x2[:, None, :]) - torch.max(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    h = (torch.min(y2[:, :, None], y2[:, None, :]) - torch.max(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = w * h
    union = area[:, :, None] + area[:, None, :] - inter
    # two zero-area boxes give 0/0, which torchvision's NaN turns into "not suppressed"; clamping the union at the
    # smallest normal float gives IoU 0, the same decision, with no NaN in the graph and one op instead of a Where.
    # It changes no IoU unless both boxes have an area under 1.2e-38 px^2
    iou = inter / union.clamp(min=_FLT_MIN)
    s_i, s_j = scores[:, :, None], scores[:, None, :]
    prec = (s_i > s_j) | ((s_i == s_j) & (order[:, :, None] < order[:, None, :]))
    same = classes[:, :, None] == classes[:, None, :]
    supp = (iou > iou_threshold) & prec & same
    return prec.to(boxes.dtype), supp.to(boxes.dtype)


def _cluster_nms(boxes: Tensor, scores: Tensor, classes: Tensor, order: Tensor, valid: Tensor, iou_threshold: float,
                 iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """``keep [B, N]`` float 0/1, ``converged [B]`` bool, ``P [B, N, N]`` float (see :func:`_pairwise`)."""
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    prec, supp = _pairwise(boxes, scores, classes, order, iou_threshold)
    valid_f = valid.to(boxes.dtype)
    keep = prev = valid_f  # iteration 1 is Fast NMS: every valid candidate suppresses
    for _ in range(int(iterations)):
        prev = keep
        suppressed_by = torch.matmul(keep[:, None, :], supp)[:, 0, :]  # [B, N]: kept earlier boxes over threshold
        keep = valid_f * (suppressed_by < 0.5).to(boxes.dtype)
    converged = (keep - prev).abs().amax(dim=1) == 0
    return keep, converged, prec


def _check(boxes: Tensor, scores: Tensor, classes: Tensor) -> None:
    # under the exporter's tracer a size is a tensor: comparing one would bake a constant (and warn); ranks are fine
    wrong_last = not torch.jit.is_tracing() and boxes.shape[-1] != 4
    if boxes.dim() != 3 or wrong_last or scores.dim() != 2 or classes.dim() != 2:
        raise ValueError(f"expected boxes [B, N, 4], scores [B, N], classes [B, N]; got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(classes.shape)}")


def _valid(boxes: Tensor, scores: Tensor, score_thresh: float | None, min_size: float | None) -> Tensor:
    # `>` as torchvision's postprocess_detections (scores > box_score_thresh); -inf and NaN never pass
    valid = scores > (float("-inf") if score_thresh is None else float(score_thresh))
    if min_size is not None:  # torchvision's remove_small_boxes: keep w >= min_size and h >= min_size
        valid = valid & (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)
    return valid


def _positions(scores: Tensor) -> Tensor:
    """``[1, N]`` int64 0..N-1 (a Range on N, so N stays dynamic in the graph): the tie-break of a stable sort."""
    return torch.arange(scores.shape[1], device=scores.device)[None]


def static_batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float,
                       iterations: int = DEFAULT_ITERATIONS, *, score_thresh: float | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Class-aware NMS with fixed shapes (Cluster-NMS, unrolled ``iterations`` times).

    Args:
        boxes: ``[B, N, 4]`` float, ``(x1, y1, x2, y2)`` with ``x2 >= x1``, ``y2 >= y1``.
        scores: ``[B, N]`` float. A candidate is valid iff its score is above ``score_thresh`` (any score but -inf
            and NaN when it is None); invalid ones (pad with ``-inf``) are never kept and suppress nothing.
        classes: ``[B, N]`` int; suppression only within one class.
        iou_threshold: a candidate is suppressed by an earlier kept one of its class with IoU ``>`` this
            (torchvision's rule).
        iterations: unrolled Cluster-NMS iterations, >= 1 (1 = Fast NMS).
        score_thresh: see ``scores``.

    Returns:
        ``keep [B, N]`` bool: the candidates greedy NMS (``torchvision.ops.batched_nms`` per image) keeps, exactly
        when ``converged``; ``converged [B]`` bool: the last iteration changed nothing (then ``keep`` is the fixed
        point, i.e. greedy NMS; when False, more iterations are needed, and ``keep`` may hold a few extra or missing
        candidates at the ends of long suppression chains).

    Cost: about 25 element-wise passes over ``[B, N, N]`` plus one ``[1, N] x [N, N]`` MatMul per iteration.
    """
    _check(boxes, scores, classes)
    valid = _valid(boxes, scores, score_thresh, None)
    keep, converged, _ = _cluster_nms(boxes, scores, classes, _positions(scores), valid, iou_threshold, iterations)
    return keep > 0.5, converged


class StaticDetections(torch.nn.Module):
    """:func:`static_detections` as a module (for ``torch.onnx.export``): inputs ``boxes [B, N, 4]``, ``scores
    [B, N]``, ``classes [B, N]``; outputs as the function's."""

    def __init__(self, score_thresh: float, iou_threshold: float, max_detections: int,
                 iterations: int = DEFAULT_ITERATIONS, min_size: float | None = None,
                 pre_nms_top_n: int | None = None):
        super().__init__()
        self.kw = dict(score_thresh=score_thresh, iou_threshold=iou_threshold, max_detections=max_detections,
                       iterations=iterations, min_size=min_size, pre_nms_top_n=pre_nms_top_n)

    def forward(self, boxes: Tensor, scores: Tensor, classes: Tensor):
        return static_detections(boxes, scores, classes, **self.kw)


def _pad_rows(x: Tensor, rows: int, value: float = 0.0) -> Tensor:
    """``x [B, N, ...]`` with ``rows`` rows of ``value`` appended along dim 1: lets TopK(k) run for any N, N < k
    included, with shapes from N and constants only."""
    return torch.cat([x, torch.full((x.shape[0], rows) + tuple(x.shape[2:]), value, dtype=x.dtype,
                                    device=x.device)], dim=1)


def static_detections(boxes: Tensor, scores: Tensor, classes: Tensor, *, score_thresh: float, iou_threshold: float,
                      max_detections: int, iterations: int = DEFAULT_ITERATIONS, min_size: float | None = None,
                      pre_nms_top_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Score threshold, class-aware NMS and top-K with fixed shapes: EfficientNMS_TRT's output contract.

    The same detections as torchvision's ``postprocess_detections`` per image (``scores > score_thresh``, optionally
    ``remove_small_boxes(min_size)``, ``batched_nms``, first ``max_detections``) whenever ``converged``.

    Args:
        boxes: ``[B, N, 4]`` float ``(x1, y1, x2, y2)``; scores: ``[B, N]`` float (pad with ``-inf``);
        classes: ``[B, N]`` int.
        score_thresh: candidates need ``score > score_thresh``.
        iou_threshold: NMS IoU threshold (suppress when IoU ``>`` it).
        max_detections: K, 1 <= K < 3840 (TensorRT's TopK limit).
        iterations: unrolled Cluster-NMS iterations (see :func:`static_batched_nms`).
        min_size: drop boxes narrower or lower than this before NMS (torchvision's detectors use 1e-2); None: keep.
        pre_nms_top_n: M: run the NMS on the M best-scored valid candidates only (one TopK; M < 3840), so its
            ``[M, M]`` cost no longer grows with N. Exact whenever at most M candidates are valid or the M best
            already hold K detections (greedy NMS decides each candidate from higher-scored ones only, so the first
            K it keeps lie among the M best); ``converged`` is False otherwise. None: all N.

    Returns:
        ``num_detections [B, 1]`` int32 (<= K); ``boxes [B, K, 4]``, ``scores [B, K]`` (input dtype) and
        ``classes [B, K]`` int32: the first ``num_detections`` slots hold the detections in descending score (ties:
        lower input index first), the rest are 0; ``converged [B]`` bool: the detections are exactly torchvision's
        (the Cluster-NMS iterations reached their fixed point, and ``pre_nms_top_n`` cut nothing that mattered).
    """
    _check(boxes, scores, classes)
    k = int(max_detections)
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"max_detections must be in [1, {MAX_TOPK}] (TensorRT's TopK), got {max_detections}")
    valid = _valid(boxes, scores, score_thresh, min_size)
    order = _positions(scores)
    if pre_nms_top_n is not None:
        m = int(pre_nms_top_n)
        if not 1 <= m <= MAX_TOPK:
            raise ValueError(f"pre_nms_top_n must be in [1, {MAX_TOPK}] (TensorRT's TopK), got {pre_nms_top_n}")
        masked = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        scores, sel = _pad_rows(masked, m, float("-inf")).topk(m, dim=1)  # [B, M], indices into the padded N + M
        n_valid = valid.to(boxes.dtype).sum(dim=1)
        valid = scores > float("-inf")  # a valid score is above score_thresh, so it was not masked
        boxes = torch.gather(_pad_rows(boxes, m), 1, sel[:, :, None].expand(-1, -1, 4))
        classes = torch.gather(_pad_rows(classes, m), 1, sel)
        # ties keep torchvision's order (original index) whatever order the runtime's TopK gives tied scores
        order = sel
    keep, converged, prec = _cluster_nms(boxes, scores, classes, order, valid, iou_threshold, iterations)
    # rank among the kept detections = how many kept ones precede it; key = count - rank is in [1, count] for kept
    # ones (distinct integers, exact in float) and 0 for the rest, so TopK's tie order never matters for a detection
    rank = torch.matmul(keep[:, None, :], prec)[:, 0, :]
    count = keep.sum(dim=1, keepdim=True)
    if pre_nms_top_n is not None:
        converged = converged & ((n_valid <= m) | (count[:, 0] >= k))
    top, idx = _pad_rows(keep * (count - rank), k).topk(k, dim=1)  # [B, K]
    slot = top > 0.5  # a detection, not padding
    out_boxes = torch.gather(_pad_rows(boxes, k), 1, idx[:, :, None].expand(-1, -1, 4))
    out_boxes = torch.where(slot[:, :, None], out_boxes, torch.zeros_like(out_boxes))
    out_scores = torch.gather(_pad_rows(scores, k), 1, idx)
    out_scores = torch.where(slot, out_scores, torch.zeros_like(out_scores))
    out_classes = torch.gather(_pad_rows(classes, k), 1, idx).to(torch.int32)
    out_classes = torch.where(slot, out_classes, torch.zeros_like(out_classes))
    num = slot.to(boxes.dtype).sum(dim=1, keepdim=True).to(torch.int32)  # float ReduceSum: every TensorRT has it
    return num, out_boxes, out_scores, out_classes, converged


# ----------------------------------------------------------------------------------------------------------------
# measurements behind the numbers in the module docstring: python -m gkd.export.static_nms [--images N]


def _detector_like(gen: torch.Generator, proposals: int = 100, num_classes: int = 6, objects: tuple[int, int] = (1, 12),
                   size: float = 800.0) -> tuple[Tensor, Tensor, Tensor]:
    """One image's candidates as a trained two-stage detector emits them (torchvision's Faster R-CNN head:
    ``proposals`` x ``num_classes`` per-class boxes and softmax scores, flattened to ``N = proposals * num_classes``).

    Most proposals are jittered copies of a few objects; each class's regressed box moves the proposal part of the way
    to the object (further for the object's class), and the softmax scores fall with the proposal's distance to the
    object; the rest are background proposals. Returns ``boxes [N, 4]``, ``scores [N]``, ``classes [N]``."""
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    def iou(a: Tensor, b: Tensor) -> Tensor:
        lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        return inter / ((a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter)

    n_obj = int(torch.randint(objects[0], objects[1] + 1, (), generator=gen))
    wh = u(n_obj, 2, lo=24, hi=320)
    xy = u(n_obj, 2) * (size - wh)
    obj = torch.cat([xy, xy + wh], 1)
    obj_cls = torch.randint(0, num_classes, (n_obj,), generator=gen)
    n_fg = int(proposals * float(u(lo=0.5, hi=0.9)))
    which = torch.randint(0, n_obj, (n_fg,), generator=gen)
    ow = obj[which, 2:] - obj[which, :2]
    ctr = (obj[which, :2] + obj[which, 2:]) / 2 + torch.randn(n_fg, 2, generator=gen) * 0.15 * ow
    pwh = ow * torch.exp(torch.randn(n_fg, 2, generator=gen) * 0.2)
    bg_wh = u(proposals - n_fg, 2, lo=16, hi=300)
    bg_xy = u(proposals - n_fg, 2) * (size - bg_wh)
    prop = torch.cat([torch.cat([ctr - pwh / 2, ctr + pwh / 2], 1), torch.cat([bg_xy, bg_xy + bg_wh], 1)])
    target = torch.cat([obj[which], prop[n_fg:]])  # background proposals regress to themselves
    q = torch.cat([iou(prop[:n_fg], obj[which]), torch.zeros(proposals - n_fg)])
    tcls = torch.cat([obj_cls[which], torch.randint(0, num_classes, (proposals - n_fg,), generator=gen)])
    # logits: background falls with the overlap, the object's class rises with it, a look-alike class sometimes too
    logits = torch.randn(proposals, num_classes + 1, generator=gen) * 0.7
    logits[:, 0] += 4.0 * (1 - q) + 0.5
    rows = torch.arange(proposals)
    logits[rows, 1 + tcls] += 6.0 * q
    alike = (tcls + 1) % num_classes
    logits[rows, 1 + alike] += 3.0 * q * u(proposals)
    prob = logits.softmax(1)[:, 1:]  # [P, C]
    step = u(proposals, num_classes, lo=0.2, hi=0.6)
    step[rows, tcls] = u(proposals, lo=0.5, hi=0.95)
    boxes = prop[:, None, :] + (target - prop)[:, None, :] * step[:, :, None]
    pwh_all = (prop[:, None, 2:] - prop[:, None, :2]).repeat(1, 1, 2)  # [P, 1, 4]
    boxes = boxes + torch.randn(proposals, num_classes, 4, generator=gen) * 0.02 * pwh_all
    boxes = torch.cat([boxes[..., :2].clamp(0, size), boxes[..., 2:].clamp(0, size)], -1)
    classes = torch.arange(num_classes).repeat(proposals, 1)
    return boxes.reshape(-1, 4), prob.reshape(-1), classes.reshape(-1)


def _iterations_needed(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, score_thresh: float,
                       greedy: Tensor) -> tuple[int, int]:
    """(first t whose keep_t equals greedy NMS, first t at which ``converged`` is True) for one image."""
    valid = _valid(boxes[None], scores[None], score_thresh, None)
    _, supp = _pairwise(boxes[None], scores[None], classes[None], _positions(scores[None]), iou_threshold)
    keep = valid.float()
    right = converged = None
    for t in range(1, boxes.shape[0] + 2):
        prev = keep
        keep = valid.float() * ((keep[:, None, :] @ supp)[:, 0, :] < 0.5).float()
        if right is None and torch.equal(keep[0] > 0.5, greedy):
            right = t
        if torch.equal(keep, prev):
            converged = t
            break
    return right, converged


def _measure_convergence(images: int, seed: int = 0, iou_threshold: float = 0.5, score_thresh: float = 0.05,
                         k: int = 100, **scene) -> dict:
    import torchvision

    gen = torch.Generator().manual_seed(seed)
    rights, convs, kept, cands, top_m = [], [], [], [], []
    for _ in range(images):
        b, s, c = _detector_like(gen, **scene)
        idx = torch.nonzero(s > score_thresh)[:, 0]
        greedy = torch.zeros(b.shape[0], dtype=torch.bool)
        greedy[idx[torchvision.ops.batched_nms(b[idx], s[idx], c[idx], iou_threshold)]] = True
        r, cv = _iterations_needed(b, s, c, iou_threshold, score_thresh, greedy)
        rights.append(r)
        convs.append(cv)
        kept.append(int(greedy.sum()))
        cands.append(len(idx))
        # the smallest pre_nms_top_n that keeps the top-K exact: all valid ones, or up to the K-th detection
        order = torch.sort(torch.where(s > score_thresh, s, float("-inf")), descending=True, stable=True)[1]
        pos = torch.nonzero(greedy[order[: len(idx)]])[:, 0]
        top_m.append(len(idx) if len(pos) < k else int(pos[k - 1]) + 1)
    out = {"images": images, "N": int(b.shape[0]), "candidates_above_thresh_mean": sum(cands) / images,
           "kept_mean": sum(kept) / images, "max_iterations_to_converge": max(convs),
           "max_iterations_to_be_right": max(rights)}
    for t in (2, 3, 5, 10):
        out[f"not_converged_at_{t}"] = sum(cv > t for cv in convs) / images
        out[f"wrong_at_{t}"] = sum(r > t for r in rights) / images
    out["pre_nms_top_n_needed_max"] = max(top_m)
    for m in (150, 300):
        out[f"inexact_with_pre_nms_top_n_{m}"] = sum(x > m for x in top_m) / images
    return out


def _onnx_nms_baseline(path: str, num_classes: int, iou_threshold: float, score_thresh: float, k: int) -> None:
    """One ``NonMaxSuppression`` node, per-class scores ``[1, C, N]`` (a candidate's score in its class's row, 0
    elsewhere, so the score threshold removes it from the other classes): ONNX's own class-aware NMS."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "thr"], ["selected"],
                              center_point_box=0)]
    init = [helper.make_tensor("max_out", TensorProto.INT64, [1], [k]),
            helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou_threshold]),
            helper.make_tensor("thr", TensorProto.FLOAT, [1], [score_thresh])]
    graph = helper.make_graph(nodes, "nms", [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, "N", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, num_classes, "N"])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, ["S", 3])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


class _TorchvisionPost(torch.nn.Module):
    """torchvision's postprocess_detections tail for one image: score mask, batched_nms, first K."""

    def __init__(self, score_thresh: float, iou_threshold: float, k: int):
        super().__init__()
        self.score_thresh, self.iou_threshold, self.k = score_thresh, iou_threshold, k

    def forward(self, boxes: Tensor, scores: Tensor, classes: Tensor):
        import torchvision

        idx = torch.where(scores[0] > self.score_thresh)[0]
        b, s, c = boxes[0, idx], scores[0, idx], classes[0, idx]
        keep = torchvision.ops.batched_nms(b, s, c, self.iou_threshold)[: self.k]
        return b[keep], s[keep], c[keep]


def _measure_speed(sizes: tuple[int, ...] = (600, 1000), iterations: tuple[int, ...] = (3, 5, 10), runs: int = 50,
                   iou_threshold: float = 0.5, score_thresh: float = 0.05, k: int = 100, pre_nms_top_n: int = 300
                   ) -> dict:
    import statistics
    import tempfile
    import time
    import warnings
    from pathlib import Path

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1

    def session(module: torch.nn.Module | None, args: tuple, path: Path, feeds: dict | None = None):
        names = ["boxes", "scores", "classes"]
        if module is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                                  dynamic_axes={n: {1: "N"} for n in names})
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), (
            feeds or {n: a.numpy() for n, a in zip(names, args)})

    def timed(sessions: dict) -> dict:
        # round robin over all graphs, so that load from other processes on a shared CPU hits them alike; the
        # minimum is the cost without interference, the median what a loaded machine gives
        ts: dict = {name: [] for name in sessions}
        for _ in range(3):
            for sess, feeds in sessions.values():
                sess.run(None, feeds)
        for _ in range(runs):
            for name, (sess, feeds) in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, feeds)
                ts[name].append(time.perf_counter() - t0)
        return {name: f"{min(t) * 1e3:.3f} / {statistics.median(t) * 1e3:.3f}" for name, t in ts.items()}

    class Keep(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, boxes, scores, classes):
            return static_batched_nms(boxes, scores, classes, iou_threshold, self.t, score_thresh=score_thresh)

    gen = torch.Generator().manual_seed(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in sizes:
            b, s, c = (x[None] for x in _detector_like(gen, proposals=n // 6))
            graphs = {}
            for t in iterations:
                graphs[f"static_batched_nms T={t}"] = session(Keep(t), (b, s, c), tmp / f"keep{t}.onnx")
            graphs[f"static_detections T={DEFAULT_ITERATIONS}"] = session(
                StaticDetections(score_thresh, iou_threshold, k), (b, s, c), tmp / "det.onnx")
            graphs[f"static_detections T={DEFAULT_ITERATIONS} pre_nms_top_n={pre_nms_top_n}"] = session(
                StaticDetections(score_thresh, iou_threshold, k, pre_nms_top_n=pre_nms_top_n), (b, s, c),
                tmp / "pre.onnx")
            _onnx_nms_baseline(str(tmp / "nms.onnx"), 6, iou_threshold, score_thresh, k)
            per_class = torch.where(c[:, None, :] == torch.arange(6)[None, :, None], s[:, None, :], 0.0)
            graphs["NonMaxSuppression node (scores [1, 6, N])"] = session(
                None, (), tmp / "nms.onnx", {"boxes": b.numpy(), "scores": per_class.numpy()})
            graphs["torchvision's tail: NonZero mask + batched_nms + [:K]"] = session(
                _TorchvisionPost(score_thresh, iou_threshold, k), (b, s, c), tmp / "tv.onnx")
            row = timed(graphs)
            out[f"N={n} ({int((s > score_thresh).sum())} above score_thresh)"] = row
    return out


if __name__ == "__main__":
    import argparse
    import json
    import subprocess

    ap = argparse.ArgumentParser(description="convergence and speed of the fixed-shape NMS")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--no-speed", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True
                                                                       ).stdout.splitlines()
                if ln.startswith("Model name")), "unknown")
    res = {"cpu": cpu,
           "convergence (1-12 objects)": _measure_convergence(a.images),
           "convergence (crowded: 20-40 objects)": _measure_convergence(a.images // 4, seed=1, objects=(20, 40)),
           "convergence (score_thresh 0.001, COCO-eval setting)": _measure_convergence(a.images // 4, seed=2,
                                                                                       score_thresh=0.001)}
    if not a.no_speed:
        res["speed ms (onnxruntime CPU, 1 thread, min / median)"] = _measure_speed()
    print(json.dumps(res, indent=1))
