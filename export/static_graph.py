"""A TensorRT-ready detector graph: the whole torchvision Faster R-CNN or RetinaNet with fixed-size outputs and no
data-dependent shape anywhere.

torchvision's inference path selects boxes with boolean masks (``NonZero`` in ONNX) and ends in ``batched_nms``
(``NonMaxSuppression`` inside an ``If``), and Faster R-CNN pools with ``RoiAlign`` per pyramid level merged by
``ScatterND``. TensorRT-RTX rejects all of those; full TensorRT runs NonZero and NMS with data-dependent shapes
(slow) and RoiAlign only as a plugin. :class:`StaticDetector` computes the same detections with masks instead of
selections:

* a candidate that torchvision would drop (score under the threshold, a box too small, a padded slot) keeps its
  place with a score of -1, below every real score, and can neither suppress nor be kept;
* every ``topk`` has a constant ``k``: a level with fewer candidates than ``k`` (a small input) is padded with such
  invalid slots first;
* NMS is :func:`gkd.export.static_nms.static_batched_nms` (Cluster-NMS, a fixed number of iterations, and a flag
  saying whether it reached greedy NMS's answer), RoIAlign is :func:`gkd.export.static_roi_align.multiscale_roi_align`
  (one Gather over all levels);
* the outputs are the fixed-size contract TensorRT users consume (NVIDIA's EfficientNMS_TRT plugin's):
  ``num_detections [B, 1]`` int32, ``detection_boxes [B, K, 4]`` (x1, y1, x2, y2 in the input image's pixels),
  ``detection_scores [B, K]``, ``detection_classes [B, K]`` int32 (the model's labels, 1..C), zero-padded after
  ``num_detections``, plus ``nms_converged [B]`` bool.

The resize and normalisation stay inside the graph (as in :mod:`gkd.export.adapters`): the input is ``[B, 3, H, W]``
float32 RGB in [0, 1], every image of a batch the same size; H and W are dynamic (shape arithmetic only).

Where the result can differ from torchvision's: the final NMS runs on the ``pre_nms_candidates`` (300) best valid
candidates (torchvision's runs on all of them: up to 600 for the default student, 5000 for RetinaNet; an IoU matrix
of that size costs more than the network); that is exact whenever the 300 best already hold the K detections or no
more are valid, and ``nms_converged`` is False when the cut mattered (or when the unrolled Cluster-NMS had not
reached greedy NMS's answer). Near-equal scores may order differently. ``gkd export`` measures both on real images
(parity) and the report gives how often ``nms_converged`` was False.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .adapters import detector_kind

__all__ = ["StaticDetector", "STATIC_OUTPUT_NAMES", "DEFAULT_NMS_ITERATIONS", "STATIC_SCOPES", "static_head_outputs",
           "to_detections"]

STATIC_OUTPUT_NAMES = ("num_detections", "detection_boxes", "detection_scores", "detection_classes",
                       "nms_converged")
#: Cluster-NMS iterations unrolled in the graph (gkd.export.static_nms measured how many real detector outputs need)
DEFAULT_NMS_ITERATIONS = 10
#: candidates (best scores) entering the final NMS: exact whenever at most this many are valid or the best ones
#: already hold the K detections, and ``nms_converged`` says False when the cut mattered
FINAL_NMS_CANDIDATES = 300
_INVALID = -1.0
#: ONNX node-name prefixes of the learned layers in the static graph (its modules are called directly, so their
#: scopes have no ``/model/`` prefix): what FP16 and INT8 may touch
STATIC_SCOPES = ("/backbone/", "/head/", "/box_head/", "/box_predictor/")
#: the last layer of each head: class logits and box deltas, kept float by INT8 (and FP32 by FP16's rules)
_HEAD_OUTPUT = re.compile(r"/(cls_logits|bbox_pred|cls_score|bbox_reg)(_\d+)?/(Conv|Gemm)$")


def static_head_outputs(model) -> list[str]:
    """Names of the static graph's head-output layers (class logits and box deltas of the RPN, the box predictor
    and RetinaNet's heads)."""
    return [n.name for n in model.graph.node if n.name.startswith(STATIC_SCOPES) and _HEAD_OUTPUT.search(n.name)]


def to_detections(outputs: list, batch_index: int = 0) -> dict[str, torch.Tensor]:
    """One image's detections from the static outputs (arrays or tensors, in :data:`STATIC_OUTPUT_NAMES` order):
    ``{"boxes" [n, 4], "scores" [n], "labels" [n] int64}``, the padding dropped."""
    num, boxes, scores, classes = (torch.as_tensor(o) for o in outputs[:4])
    n = int(num[batch_index].reshape(-1)[0])
    return {"boxes": boxes[batch_index, :n].float().reshape(-1, 4), "scores": scores[batch_index, :n].float(),
            "labels": classes[batch_index, :n].long()}


def _pad_topk(scores: torch.Tensor, k: int, *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk(k)`` along dim 1 with a constant ``k`` even when dim 1 is shorter: ``k`` invalid slots are appended.

    Args:
        scores: ``[B, N]`` (N may be below ``k``).

    Returns:
        ``(values [B, k], indices [B, k])``; an index >= N points at a padded slot (its value is -inf).
    """
    pad = torch.full((scores.shape[0], k), float("-inf"), dtype=scores.dtype, device=scores.device)
    return torch.cat([scores, pad], dim=1).topk(k, dim=1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]`` at ``idx [B, k]`` (clamped into range: padded slots read row N-1 and are masked by the
    caller) -> ``[B, k, D]``."""
    idx = idx.clamp(max=x.shape[1] - 1)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _clip(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Clip ``boxes [..., 4]`` to ``size = [h, w]`` (float tensor), as torchvision's clip_boxes_to_image."""
    h, w = size[0], size[1]
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    x = torch.min(x, w)
    y = torch.min(y, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _big_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """torchvision's remove_small_boxes as a mask: both sides >= ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


class StaticDetector(nn.Module):
    """A torchvision FasterRCNN or RetinaNet (eval mode) as ``image [B, 3, H, W] -> fixed-size detections``.

    Args:
        detector: the torchvision detector (its learned layers are used as they are).
        nms_iterations: Cluster-NMS iterations unrolled in the graph.
        pre_nms_candidates: candidates (best valid scores) entering the final NMS (``pre_nms_top_n`` of
            :func:`gkd.export.static_nms.static_detections`).
    """

    def __init__(self, detector: nn.Module, nms_iterations: int = DEFAULT_NMS_ITERATIONS,
                 pre_nms_candidates: int = FINAL_NMS_CANDIDATES):
        super().__init__()
        self.kind = detector_kind(detector)
        self.model = detector
        self.nms_iterations = int(nms_iterations)
        self.pre_nms_candidates = int(pre_nms_candidates)
        t = detector.transform
        self.min_size = float(t.min_size[-1] if isinstance(t.min_size, (list, tuple)) else t.min_size)
        self.max_size = float(t.max_size)
        self.size_divisible = int(t.size_divisible)
        self.register_buffer("mean", torch.tensor(t.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.detections = int(detector.detections_per_img if self.kind == "retinanet"
                              else detector.roi_heads.detections_per_img)
        self.roi_scales = self._roi_scales() if self.kind == "faster_rcnn" else None
        self.eval()

    @torch.no_grad()
    def _roi_scales(self) -> list[float]:
        """Each pooled level's ``1 / stride``, as torchvision infers it (from one probe of the backbone: the strides
        are the architecture's, constants of the graph)."""
        import math

        side = 4 * self.size_divisible
        was = self.model.training
        self.model.eval()
        feats = self.model.backbone(torch.zeros(1, 3, side, side))
        self.model.train(was)
        return [2.0 ** round(math.log2(feats[n].shape[-1] / side)) for n in self.model.roi_heads.box_roi_pool.featmap_names]

    # ------------------------------------------------------------------------------------------------------------
    # pre-processing

    def _preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise, resize as torchvision (scale and size computed in float64, as eager PyTorch does) and zero-pad
        bottom/right to a multiple of ``size_divisible``.

        Returns:
            ``(padded [B, 3, Hp, Wp], resized size [2] float32 (h, w), input size [2] float32 (H, W))``.
        """
        x = (image - self.mean) / self.std
        shape = torch._shape_as_tensor(image)[2:].to(torch.float64)  # [2]: H, W (a tensor when traced)
        limits = torch.tensor([self.min_size, self.max_size], dtype=torch.float64)
        scale = torch.div(limits, torch.stack([shape.min(), shape.max()])).min()
        size = torch.floor(shape * scale).to(torch.int64)
        x = torch._C._nn.upsample_bilinear2d(x, [size[0], size[1]], False, None)
        d = self.size_divisible
        padded = torch.div(size + (d - 1), d, rounding_mode="floor") * d
        pad = padded - size
        x = nn.functional.pad(x, [0, pad[1], 0, pad[0]])
        return x, size.to(torch.float32), shape.to(torch.float32)

    # ------------------------------------------------------------------------------------------------------------
    # the two architectures

    def _anchors(self, x: torch.Tensor, feats: list[torch.Tensor], generator) -> list[torch.Tensor]:
        """Anchors per level ``[H_l * W_l * A, 4]`` (the same for every image of the batch)."""
        from torchvision.models.detection.image_list import ImageList

        anchors = generator(ImageList(x[:1], [(int(x.shape[-2]), int(x.shape[-1]))]), feats)[0]
        sizes = [f.shape[-2] * f.shape[-1] * a for f, a in zip(feats, generator.num_anchors_per_location())]
        return list(anchors.split(sizes, 0))

    def _rpn(self, x: torch.Tensor, feats: list[torch.Tensor], size: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals ``[B, P, 4]``, their validity ``[B, P]`` and whether the RPN's NMS converged ``[B]``
        (torchvision's RPN with masks)."""
        from .static_nms import static_batched_nms

        rpn = self.model.rpn
        objectness, deltas = rpn.head(feats)
        anchors = self._anchors(x, feats, rpn.anchor_generator)
        k = int(rpn._pre_nms_top_n["testing"])
        boxes, scores, keeps, converged = [], [], [], None
        for obj, dlt, anc in zip(objectness, deltas, anchors):
            b, a = obj.shape[0], obj.shape[1]
            obj = obj.permute(0, 2, 3, 1).reshape(b, -1)  # [B, H*W*A], torchvision's order
            dlt = dlt.view(b, a, 4, dlt.shape[-2], dlt.shape[-1]).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
            logits, idx = _pad_topk(obj, k)
            d = _gather_rows(dlt, idx)  # [B, k, 4]
            an = _gather_rows(anc.unsqueeze(0).expand(b, -1, -1), idx)
            level_boxes = _clip(rpn.box_coder.decode_single(d.reshape(-1, 4), an.reshape(-1, 4)).view(b, k, 4), size)
            prob = torch.sigmoid(logits)
            valid = torch.isfinite(logits) & _big_enough(level_boxes, rpn.min_size) & (prob >= rpn.score_thresh)
            level_scores = torch.where(valid, prob, torch.full_like(prob, _INVALID))
            # torchvision's NMS is per level: one [k, k] IoU matrix a level instead of one over all levels
            keep, conv = static_batched_nms(level_boxes, level_scores, torch.zeros_like(idx), rpn.nms_thresh,
                                            self.nms_iterations, score_thresh=_INVALID)
            converged = conv if converged is None else converged & conv
            boxes.append(level_boxes)
            scores.append(level_scores)
            keeps.append(keep & valid)
        boxes, scores, keep = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(keeps, 1)
        kept = torch.where(keep, scores, torch.full_like(scores, _INVALID))
        top, idx = kept.topk(int(rpn._post_nms_top_n["testing"]), dim=1)
        return _gather_rows(boxes, idx), top > _INVALID, converged

    def _faster_rcnn(self, x, feats, size):
        """Candidate detections ``(boxes [B, N, 4], scores [B, N] (-1 = invalid), labels [B, N])`` of Faster R-CNN."""
        from .static_roi_align import multiscale_roi_align

        heads = self.model.roi_heads
        pool = heads.box_roi_pool
        proposals, proposal_ok, converged = self._rpn(x, list(feats.values()), size)  # [B, P, 4], [B, P], [B]
        b, p = proposals.shape[0], proposals.shape[1]
        pooled = multiscale_roi_align([feats[n] for n in pool.featmap_names], proposals, output_size=pool.output_size,
                                      sampling_ratio=pool.sampling_ratio, scales=self.roi_scales)  # [B*P, C, 7, 7]
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        n_cls = logits.shape[-1]
        boxes = heads.box_coder.decode_single(regression.reshape(b * p, n_cls, 4).reshape(-1, 4),
                                              proposals.reshape(b * p, 1, 4).expand(-1, n_cls, -1).reshape(-1, 4))
        boxes = _clip(boxes.view(b, p, n_cls, 4)[:, :, 1:], size).reshape(b, -1, 4)
        scores = torch.softmax(logits, -1).view(b, p, n_cls)[:, :, 1:].reshape(b, -1)
        labels = torch.arange(1, n_cls, device=x.device).view(1, 1, -1).expand(b, p, -1).reshape(b, -1)
        ok = proposal_ok.unsqueeze(-1).expand(-1, -1, n_cls - 1).reshape(b, -1)
        valid = ok & (scores > heads.score_thresh) & _big_enough(boxes, 1e-2)
        return boxes, torch.where(valid, scores, torch.full_like(scores, _INVALID)), labels, heads.nms_thresh, converged

    def _retinanet(self, x, feats, size):
        """Candidate detections of RetinaNet (see :meth:`_faster_rcnn`): up to ``topk_candidates`` a level."""
        m = self.model
        feat_list = list(feats.values())
        out = m.head(feat_list)
        per_level = [f.shape[-2] * f.shape[-1] * m.anchor_generator.num_anchors_per_location()[i]
                     for i, f in enumerate(feat_list)]
        logits_all = out["cls_logits"].split(per_level, 1)  # [B, N_l, C] each
        regression_all = out["bbox_regression"].split(per_level, 1)
        anchors = self._anchors(x, feat_list, m.anchor_generator)
        boxes, scores, labels = [], [], []
        for logits, reg, anc in zip(logits_all, regression_all, anchors):
            b, c = logits.shape[0], logits.shape[-1]
            s = torch.sigmoid(logits).reshape(b, -1)  # [B, N_l * C], torchvision's flatten order
            s = torch.where(s > m.score_thresh, s, torch.full_like(s, _INVALID))
            top, idx = _pad_topk(s, int(m.topk_candidates))
            anchor_idx = torch.div(idx, c, rounding_mode="floor")
            d = _gather_rows(reg, anchor_idx)
            an = _gather_rows(anc.unsqueeze(0).expand(b, -1, -1), anchor_idx)
            decoded = m.box_coder.decode_single(d.reshape(-1, 4), an.reshape(-1, 4)).view(b, -1, 4)
            boxes.append(_clip(decoded, size))
            scores.append(torch.where(top > _INVALID, top, torch.full_like(top, _INVALID)))
            labels.append(idx % c)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)
        converged = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        return boxes, scores, labels, m.nms_thresh, converged

    # ------------------------------------------------------------------------------------------------------------

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Detect.

        Args:
            image: ``[B, 3, H, W]`` float32 RGB in [0, 1] (one size for the whole batch).

        Returns:
            ``num_detections [B, 1]`` int32, ``detection_boxes [B, K, 4]`` float32 (input-image pixels),
            ``detection_scores [B, K]`` float32 (descending), ``detection_classes [B, K]`` int32 (labels 1..C),
            ``nms_converged [B]`` bool; entries after ``num_detections`` are zero.
        """
        from .static_nms import static_detections

        x, size, original = self._preprocess(image)
        feats = self.model.backbone(x)
        step = self._faster_rcnn if self.kind == "faster_rcnn" else self._retinanet
        boxes, scores, labels, iou, converged = step(x, feats, size)
        num, boxes, scores, classes, final = static_detections(
            boxes, scores, labels, score_thresh=_INVALID, iou_threshold=iou, max_detections=self.detections,
            iterations=self.nms_iterations, pre_nms_top_n=min(self.pre_nms_candidates, scores.shape[1]))
        ratio = (original / size).flip(0).repeat(2)  # (w, h, w, h): back to the input image's pixels
        return num, boxes * ratio, scores, classes, converged & final

    def describe(self) -> dict[str, Any]:
        """The graph's settings, recorded with the export."""
        return {"outputs": list(STATIC_OUTPUT_NAMES), "max_detections": self.detections,
                "nms": f"Cluster-NMS, {self.nms_iterations} iterations unrolled",
                "pre_nms_candidates": self.pre_nms_candidates}
