"""Test helpers: a tiny COCO dataset of drawn rectangles, and tiny detectors that detect it by construction.

Why not "train N steps": a few dozen SGD steps from scratch end in a different place on every CPU (AVX2 vs AVX-512
kernels, MKL paths, thread counts). A fixture that detected after 30 steps on one machine detected on 2 of 6 images
on another and failed 38 tests there. So the detectors here are not trained for a number of steps but *until a
criterion holds*, on a task chosen so that the criterion is always reached:

* the task is trivially separable (saturated red or blue rectangles on a dim noisy background) and the detector is
  fit to exactly the images it is checked on: every parity image is a training image;
* training is full-batch (every step sees every image), so BatchNorm's statistics are those of the whole set and the
  path is far smoother than with batches of four;
* before each check BatchNorm's running statistics are recomputed on the fit set ("precise BN"), so eval-mode
  outputs are those of the trained weights, not of a lagging running average;
* the criterion has a margin: every ground-truth box is found (right label, IoU >= 0.5) at score >= FIT_SCORE (0.6),
  twice the parity tests' floor DETECTS_SCORE (0.3).

The number of steps it takes differs between machines; the state it ends in does not. If the criterion is not met
within MAX_STEPS, the fixture fails with the numbers instead of handing a detector that detects nothing to tests
that would then compare empty outputs and prove nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd.kd.config import ModelConfig

CLASSES = ["red", "blue"]
CATEGORY_IDS = [3, 7]  # deliberately not 1..K: the label -> category id mapping must be honoured
IMAGE_SIZE = (56, 72)  # H, W: not square, not a multiple of 32
MODEL_SIZE = 64
DETECTS_SCORE = 0.3  # the parity checks' score floor: detections below it are not compared
FIT_SCORE = 0.6  # training stops once every ground-truth box is found at this score (a margin over DETECTS_SCORE)
CHECK_EVERY, MIN_STEPS, MAX_STEPS = 10, 30, 400


def make_rect_dataset(root: Path, n_images: int, seed: int, name: str = "data.json",
                      size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """Write ``root/images/*.png`` (noisy background, 1-3 filled rectangles) and a COCO JSON; returns its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    for i in range(n_images):
        img = (rng.random((h, w, 3)) * 60 + 60).astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            label = int(rng.integers(0, 2))
            img[y:y + bh, x:x + bw] = (220, 40, 40) if label == 0 else (40, 60, 220)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[label],
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        fname = f"{name.split('.')[0]}_{i:03d}.png"
        Image.fromarray(img).save(root / "images" / fname)
        images.append({"id": i + 1, "file_name": fname, "width": w, "height": h})
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASSES)]
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def subset_json(src: Path, n_images: int, name: str) -> Path:
    """A COCO JSON beside ``src`` holding its first ``n_images`` images (same files) and their annotations."""
    data = json.loads(src.read_text())
    keep = {im["id"] for im in data["images"][:n_images]}
    out = {**data, "images": [im for im in data["images"] if im["id"] in keep],
           "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    path = src.parent / name
    path.write_text(json.dumps(out))
    return path


def load_split(json_path: Path) -> list[tuple[torch.Tensor, dict]]:
    """``[(image [3,H,W] float in [0,1], {"boxes" [N,4] xyxy, "labels" [N] 1..K})]`` read with the eval loader."""
    from gkd.kd.data import CocoDetection, load_coco

    index = load_coco(json_path, image_root=json_path.parent / "images")
    dataset = CocoDetection(index, train=False, min_size=MODEL_SIZE, max_size=MODEL_SIZE)
    return [(image, {"boxes": target["boxes"].float(), "labels": target["labels"]}) for image, target in dataset]


def tiny_model_config(arch: str) -> ModelConfig:
    """ResNet-18 at 64 px with a narrow FPN (64) and box head (128): a CPU step of the full batch takes ~0.3 s.

    ``proposals_test`` stays torchvision's 1000, more than these small images ever have after the RPN's NMS: with a
    cut at 100, proposals of near-equal objectness swap places at the cut between PyTorch and onnxruntime and turn
    into different low-score detections (measured), which would blur what the exact FP32 parity tests check."""
    return ModelConfig(arch=arch, backbone="resnet18", num_classes=len(CLASSES), min_size=MODEL_SIZE,
                       max_size=MODEL_SIZE, anchor_sizes=(16, 32, 64, 128, 256), score_thresh=0.05,
                       fpn_channels=64, box_head_dim=128, rois_per_image=64, proposals_test=1000)


def recompute_batchnorm(model: torch.nn.Module, items) -> None:
    """Set every BatchNorm's running statistics to the exact statistics of ``items`` under the current weights."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass over the whole set gives its statistics exactly
    model.train()
    with torch.no_grad():
        model([im for im, _ in items], [t for _, t in items])
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.eval()


def found_at_score(model: torch.nn.Module, items) -> torch.Tensor:
    """Per ground-truth box, the highest score of a detection of its label with IoU >= 0.5 (0 when none)."""
    from torchvision.ops import box_iou

    model.eval()
    with torch.no_grad():
        outputs = model([im for im, _ in items])
    best = []
    for out, (_, target) in zip(outputs, items):
        iou = box_iou(target["boxes"], out["boxes"])  # [G, D]
        hit = (iou >= 0.5) & (target["labels"][:, None] == out["labels"][None, :])
        scores = torch.where(hit, out["scores"][None, :], torch.zeros_like(iou))
        best.append(scores.max(dim=1).values if scores.numel() else torch.zeros(len(target["boxes"])))
    return torch.cat(best)


def fit_until_confident(arch: str, fit_json: Path, seed: int = 0):
    """Train a tiny ``arch`` detector on every image of ``fit_json`` until it finds every box at FIT_SCORE.

    Returns:
        ``(model, cfg, steps, min_score)``: the model in eval mode, its config, the steps it took, and the lowest
        per-box score at the end (>= FIT_SCORE).
    """
    from gkd.kd.models.detectors import build_detector

    items = load_split(fit_json)
    torch.manual_seed(seed)
    cfg = tiny_model_config(arch)
    model = build_detector(cfg)
    if arch == "faster_rcnn":  # fewer training proposals: the fit set's few boxes need no more, and steps get cheaper
        model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 300, 100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    images, targets = [im for im, _ in items], [t for _, t in items]
    found = torch.zeros(1)
    for step in range(1, MAX_STEPS + 1):
        model.train()
        for group in opt.param_groups:  # linear warm-up: from-scratch detectors diverge at full lr on step 1
            group["lr"] = 1e-3 * min(1.0, step / 10)
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if step >= MIN_STEPS and step % CHECK_EVERY == 0:
            recompute_batchnorm(model, items)
            found = found_at_score(model, items)
            if float(found.min()) >= FIT_SCORE:
                return model, cfg, step, float(found.min())
    pytest.fail(f"the tiny {arch} test detector did not converge on {fit_json.name} within {MAX_STEPS} full-batch "
                f"steps: {int((found >= FIT_SCORE).sum())} of {len(found)} boxes found at score >= {FIT_SCORE} "
                f"(lowest {float(found.min()):.3f}); see tests/detectors.py")


def assert_detects(arch: str, model: torch.nn.Module, json_path: Path, score: float = DETECTS_SCORE) -> None:
    """Fail (with the reason) unless ``model`` finds every box of ``json_path`` at ``score`` or more."""
    found = found_at_score(model, load_split(json_path))
    if not bool((found >= score).all()):
        pytest.fail(f"the tiny {arch} test detector finds only {int((found >= score).sum())} of {len(found)} boxes "
                    f"of {json_path.name} at score >= {score}: parity tests on it would prove nothing")
