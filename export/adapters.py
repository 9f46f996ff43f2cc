"""Turn a torchvision detector into an exportable module with one fixed output order, and describe its contract.

torchvision detectors take a list of images and return a list of dicts whose key order differs by type (Faster
R-CNN: boxes, labels, scores; RetinaNet: boxes, scores, labels). :class:`ExportWrapper` reads the dict by key and
always returns ``(boxes, scores, labels)``, so every runtime and every ONNX file has the same named outputs.

What the exported graph contains (checked on torchvision 0.29 with the legacy TorchScript exporter): the whole
``GeneralizedRCNNTransform`` is traced into it: normalisation with the model's mean/std, the aspect-keeping resize
to ``min_size``/``max_size`` (bilinear, with the scale computed from the runtime H/W, so it stays dynamic), and
zero padding to a multiple of ``size_divisible``; and so is the post-processing: box decoding, score threshold,
NMS (standard ONNX ``NonMaxSuppression`` inside an ``If``), top-k and the mapping of boxes back to the input
image's pixels. A runtime therefore only feeds the decoded RGB image as float32 in [0, 1]; :func:`preprocess_contract`
records exactly that (and the parameters applied inside) in the ONNX metadata and the sidecar JSON.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gkd.core.errors import GkdError

__all__ = ["ExportWrapper", "INPUT_NAME", "OUTPUT_NAMES", "NETWORK_SCOPES", "detector_kind", "preprocess_contract",
           "CONTRACT_VERSION"]

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
CONTRACT_VERSION = 1

#: ONNX node-name prefixes (module scopes under the wrapper's ``model`` attribute) of the learned layers: backbone,
#: FPN and heads. Everything else (resize/normalise, anchors, box decoding, RoIAlign, NMS) is geometry on pixel
#: coordinates up to ~1000 px, where FP16's 0.5 px resolution and INT8 would move boxes: it stays FP32.
NETWORK_SCOPES = ("/model/backbone/", "/model/rpn/head/", "/model/roi_heads/box_head/",
                  "/model/roi_heads/box_predictor/", "/model/head/")


def detector_kind(model: nn.Module) -> str:
    """``"faster_rcnn"`` or ``"retinanet"`` for a torchvision detector; GkdError for anything else."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, GeneralizedRCNN):
        return "faster_rcnn"
    raise GkdError(f"cannot export a {type(model).__name__}; expected a torchvision FasterRCNN or RetinaNet")


class ExportWrapper(nn.Module):
    """A detector as ``image [1, 3, H, W] -> (boxes [N, 4], scores [N], labels [N])``.

    The batch is fixed at 1: torchvision detectors trace a Python list of images, so an exported graph has one image
    input. Run images one at a time (each may have its own H and W).

    Args:
        detector: a torchvision FasterRCNN or RetinaNet in eval mode.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.kind = detector_kind(detector)
        self.model = detector
        # torch.onnx.export restores the wrapper's mode afterwards, recursively: start (and so end) in eval mode
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one image.

        Args:
            image: ``[1, 3, H, W]`` float32 RGB in [0, 1].

        Returns:
            ``boxes [N, 4]`` float32 xyxy in the input image's pixels, ``scores [N]`` float32 (descending),
            ``labels [N]`` int64 in 1..K.
        """
        out = self.model([image[0]])[0]
        # by key, never by position: the two detector types order their dicts differently
        return out["boxes"], out["scores"], out["labels"]


def preprocess_contract(detector: nn.Module, *, classes: list[str] | None = None,
                        category_ids: list[int] | None = None) -> dict[str, Any]:
    """The pre/post-processing contract of an exported detector (what a runtime must feed and gets back).

    Args:
        detector: the torchvision detector being exported.
        classes: class names, label ``i + 1`` -> ``classes[i]``.
        category_ids: COCO category id of each class.

    Returns:
        A JSON-serialisable dict (stored in ONNX ``metadata_props["gkd.contract"]`` and the sidecar JSON).
    """
    kind = detector_kind(detector)
    t = detector.transform
    if kind == "retinanet":
        post = {"score_thresh": float(detector.score_thresh), "nms_thresh": float(detector.nms_thresh),
                "detections_per_img": int(detector.detections_per_img),
                "topk_candidates": int(detector.topk_candidates)}
    else:
        rh = detector.roi_heads
        post = {"score_thresh": float(rh.score_thresh), "nms_thresh": float(rh.nms_thresh),
                "detections_per_img": int(rh.detections_per_img)}
    min_size = t.min_size[-1] if isinstance(t.min_size, (list, tuple)) else t.min_size
    return {
        "contract_version": CONTRACT_VERSION,
        "arch": kind,
        "input": {"name": INPUT_NAME, "shape": [1, 3, "height", "width"], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB", "range": [0.0, 1.0],
                  "caller_does": "decode the image, apply EXIF orientation, convert to RGB, divide uint8 by 255; "
                                 "no resize, no normalisation, no padding (all inside the graph)"},
        "in_graph": {
            "normalize": {"mean": [float(v) for v in t.image_mean], "std": [float(v) for v in t.image_std],
                          "formula": "(x - mean) / std per channel"},
            "resize": {"min_size": int(min_size), "max_size": int(t.max_size),
                       "rule": "scale = min(min_size / min(H, W), max_size / max(H, W)); bilinear, "
                               "align_corners=False, aspect ratio kept (torchvision GeneralizedRCNNTransform)"},
            "pad": {"size_divisible": int(t.size_divisible), "value": 0.0, "where": "bottom and right"},
            "postprocess": post,
        },
        "outputs": {"boxes": "[N, 4] float32 x1, y1, x2, y2 in the input image's pixels",
                    "scores": "[N] float32, descending",
                    "labels": "[N] int64, 1..K (label i + 1 is classes[i]; 0 = background is never emitted)"},
        "batch": "fixed at 1 (one image per call; H and W are dynamic)",
        "classes": list(classes) if classes is not None else None,
        "category_ids": [int(c) for c in category_ids] if category_ids is not None else None,
    }
