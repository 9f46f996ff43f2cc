"""torchvision's COCO detection weights for another dataset: map the 91 COCO class slots to the dataset's classes.

torchvision's COCO detectors (``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``, ...) predict 91 class slots:
slot ``i`` is COCO category id ``i`` (0 is background; ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused "N/A"
slots), so the class heads are 91 rows (Faster R-CNN: ``cls_score`` 91 rows and ``bbox_pred`` 91 x 4 rows;
RetinaNet: ``cls_logits`` 91 rows per anchor). gkd's detectors have K + 1 (background + the dataset's K classes).

When the dataset's categories are COCO's, found by name (case and ``_``/space insensitive: ``traffic_light``; VOC's
names as aliases: ``motorbike``), the rows of those slots are kept in the dataset's order and every weight
transfers. Otherwise the class heads cannot transfer: as an initialisation they are re-initialised (and the
report says so); as a teacher the checkpoint is refused, since a teacher must predict the student's classes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gkd.core.errors import GkdError

__all__ = ["COCO_SLOTS", "coco_slots_for", "remap_coco_heads", "COCO_HEAD_KEYS"]

#: state-dict keys of the class-dependent head tensors, per detector type
COCO_HEAD_KEYS = {
    "faster_rcnn": ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"),
    "retinanet": ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"),
}
COCO_SLOTS = 91


def _coco_names() -> list[str]:
    from torchvision.models._meta import _COCO_CATEGORIES  # torchvision's own list: slot i -> name

    return list(_COCO_CATEGORIES)


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


#: names other datasets give COCO categories (Pascal VOC's, mostly)
ALIASES = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv",
           "tv monitor": "tv", "diningtable": "dining table", "pottedplant": "potted plant",
           "mobile phone": "cell phone", "hand bag": "handbag"}


def coco_slots_for(classes: Sequence[str]) -> tuple[list[int] | None, str]:
    """The COCO slot of each dataset class by name, and how they were found; ``(None, why)`` without a mapping.

    Names are compared case-, ``_``- and space-insensitively, with VOC's names as aliases (``motorbike``). Ids are
    not used: most datasets number their own categories 1..K, which would map onto COCO's person, bicycle, car ...
    """
    names = _coco_names()
    by_name = {_norm(n): i for i, n in enumerate(names) if n not in ("__background__", "N/A")}

    def slot(c: str) -> int | None:
        key = _norm(c)
        return by_name.get(key, by_name.get(ALIASES.get(key, "")))

    slots = [slot(c) for c in classes]
    if classes and all(s is not None for s in slots):
        return slots, "by name"
    missing = [c for c, s in zip(classes, slots) if s is None]
    return None, f"no COCO category named {missing[:3]}{' ...' if len(missing) > 3 else ''}"


def _rows(arch: str, key: str, tensor: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Rows of ``tensor`` for the kept slots (``keep`` includes slot 0, background)."""
    if arch == "faster_rcnn" and "bbox_pred" in key:
        idx = torch.tensor([4 * s + j for s in keep for j in range(4)])
        return tensor[idx].clone()
    if arch == "retinanet":  # rows are anchor-major: anchor a, slot s -> a * 91 + s
        anchors = tensor.shape[0] // COCO_SLOTS
        idx = torch.tensor([a * COCO_SLOTS + s for a in range(anchors) for s in keep])
        return tensor[idx].clone()
    return tensor[torch.tensor(keep)].clone()


def is_coco_head(arch: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has torchvision's 91-slot COCO class heads."""
    key = COCO_HEAD_KEYS[arch][0]
    if key not in state:
        return False
    rows = state[key].shape[0]
    return rows == COCO_SLOTS if arch == "faster_rcnn" else rows % COCO_SLOTS == 0 and rows // COCO_SLOTS in (9, 1)


def remap_coco_heads(state: dict[str, torch.Tensor], arch: str, classes: Sequence[str] | None, source: str, *,
                     teacher: bool) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with its 91-slot class heads cut to the dataset's classes, and a one-line report.

    Without a mapping: an initialisation drops the class heads (the model keeps its fresh ones), a teacher is
    refused. ``state`` is returned unchanged when it has no COCO heads.
    """
    if not is_coco_head(arch, state):
        return state, ""
    total = len(state)
    slots, how = coco_slots_for(classes) if classes else (None, "the dataset's class names are unknown here")
    if slots is None:
        if teacher:
            raise GkdError(f"{source}: a torchvision COCO detector (91 class slots) cannot teach these classes "
                           f"({how}); a teacher must predict the student's classes: fine-tune it on your data first "
                           f"(gkd train with model.weights={source})")
        out = {k: v for k, v in state.items() if k not in COCO_HEAD_KEYS[arch]}
        heads = ", ".join(k for k in COCO_HEAD_KEYS[arch] if k in state)
        return out, (f"transferred {len(out)} of {total} tensors from {source}; re-initialised: {heads} "
                     f"({how})")
    keep = [0] + slots
    out = dict(state)
    for key in COCO_HEAD_KEYS[arch]:
        if key in out:
            out[key] = _rows(arch, key, out[key], keep)
    return out, (f"transferred {total} of {total} tensors from {source}; class heads cut from COCO's 91 slots to "
                 f"the dataset's {len(slots)} classes ({how}); re-initialised: none")
