"""Fixtures for the export tests: a tiny COCO dataset of drawn rectangles and two tiny trained detectors.

The detectors (ResNet-18 Faster R-CNN and RetinaNet at 64 px) train for a few dozen SGD steps, once per session:
enough for confident, well-separated detections (random weights give near-tied scores or none at all), small
enough to keep the whole export suite within a couple of minutes on two cores.

Whether 30 steps suffice depends on the initialisation (a change in torchvision's initialisation order once left the
Faster R-CNN detecting nothing), and training on is no cure: from scratch at this size, 40-50 steps make the RetinaNet
saturate to 100 detections at score 1.0 or collapse to none (measured). So the fixture checks that each model detects
on most parity images and fails the session with that message otherwise: parity tests on a model that detects
nothing would compare empty outputs and prove nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.checkpoint import detector_checkpoint, save_checkpoint
from kd.config import ModelConfig

CLASSES = ["red", "blue"]
CATEGORY_IDS = [3, 7]  # deliberately not 1..K: the label -> category id mapping must be honoured
IMAGE_SIZE = (56, 72)  # H, W: not square, not a multiple of 32
MODEL_SIZE = 64
STEPS = {"faster_rcnn": 30, "retinanet": 30}
DETECTS_SCORE = 0.3  # the parity checks' score floor: detections below it are not compared


def assert_detects_on_most_images(arch: str, model, val_json: Path) -> None:
    """Fail (with the reason) unless ``model`` scores a detection >= DETECTS_SCORE on at least half the images."""
    model.eval()
    with torch.no_grad():
        outputs = model([im for im, _ in _load_split(val_json)])
    hits = sum(bool((o["scores"] >= DETECTS_SCORE).any()) for o in outputs)
    if 2 * hits < len(outputs):
        pytest.fail(f"the tiny {arch} fixture detects (score >= {DETECTS_SCORE}) on only {hits} of {len(outputs)} "
                    f"images of {val_json.name} after {STEPS[arch]} steps: the export parity tests need a detector "
                    f"that detects; change STEPS or the seed in tests/test_export/conftest.py")


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


def _load_split(json_path: Path):
    from PIL import Image

    data = json.loads(json_path.read_text())
    label_of = {c: i + 1 for i, c in enumerate(CATEGORY_IDS)}
    items = []
    for im in data["images"]:
        arr = np.asarray(Image.open(json_path.parent / "images" / im["file_name"]).convert("RGB"))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in data["annotations"] if a["image_id"] == im["id"]]
        labels = [label_of[a["category_id"]] for a in data["annotations"] if a["image_id"] == im["id"]]
        items.append((torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255,
                      {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return items


def train_tiny(arch: str, train_json: Path, steps: int, seed: int = 0):
    """Train a ResNet-18 ``arch`` detector at 64 px for ``steps`` SGD steps (batch 4); returns (model, cfg)."""
    from kd.models.detectors import build_detector

    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, backbone="resnet18", num_classes=len(CLASSES), min_size=MODEL_SIZE,
                      max_size=MODEL_SIZE, anchor_sizes=(16, 32, 64, 128, 256), score_thresh=0.05)
    model = build_detector(cfg)
    if arch == "faster_rcnn":  # fewer sampled proposals/RoIs: the 1024-wide box head dominates a CPU step
        model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 300, 100
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    items = _load_split(train_json)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(items), (4,), generator=g).tolist()
        losses = model([items[i][0] for i in idx], [items[i][1] for i in idx])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        for grp in opt.param_groups:  # linear warmup: from-scratch detectors diverge at full lr on step 1
            grp["lr"] = 0.02 * min(1.0, (step + 1) / 8)
        opt.step()
    model.eval()
    return model, cfg


@pytest.fixture(scope="session")
def rect_data(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset: ``train`` (calibration + training) and ``val`` (parity) COCO JSON files with PNG images."""
    root = tmp_path_factory.mktemp("rects")
    return {"train": make_rect_dataset(root, 24, seed=1, name="train.json"),
            "val": make_rect_dataset(root, 6, seed=2, name="val.json")}


@pytest.fixture(scope="session")
def trained(rect_data, tmp_path_factory) -> dict[str, dict]:
    """Tiny trained Faster R-CNN and RetinaNet: ``{arch: {"model", "cfg", "checkpoint"}}``."""
    torch.set_num_threads(1)  # the machine's two cores are shared: one thread is faster than two contended ones
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for arch, steps in STEPS.items():
        model, cfg = train_tiny(arch, rect_data["train"], steps)
        assert_detects_on_most_images(arch, model, rect_data["val"])
        path = save_checkpoint(detector_checkpoint(model, cfg, CLASSES, CATEGORY_IDS), root / f"{arch}.pt")
        if arch == "faster_rcnn":  # in-memory model only: 100 proposals keep each CPU inference ~0.1 s
            model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 200, 100
        out[arch] = {"model": model, "cfg": cfg, "checkpoint": path}
    return out


@pytest.fixture(scope="session")
def exported(trained, rect_data, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """FP32, FP16 and INT8 ONNX files of both tiny detectors: ``{arch: {precision: path}}``."""
    from export.adapters import preprocess_contract
    from export.fp16 import convert_fp16
    from export.images import load_image_set
    from export.onnx import export_onnx, load_onnx, save_onnx
    from export.quantize import quantize_int8

    root = tmp_path_factory.mktemp("onnx")
    calib = [im for _, im in load_image_set(rect_data["train"], limit=4).images]
    sample = load_image_set(rect_data["val"], limit=1).images[0][1].unsqueeze(0)
    out = {}
    for arch, t in trained.items():
        meta = {"contract": preprocess_contract(t["model"], classes=CLASSES, category_ids=CATEGORY_IDS),
                "precision": "fp32"}
        paths = {p: root / f"{arch}.{p}.onnx" for p in ("fp32", "fp16", "int8")}
        export_onnx(t["model"], paths["fp32"], sample, metadata=meta)
        m16, _ = convert_fp16(load_onnx(paths["fp32"]))
        save_onnx(m16, paths["fp16"], {**meta, "precision": "fp16"})
        quantize_int8(paths["fp32"], paths["int8"], calib, metadata={**meta, "precision": "int8"})
        out[arch] = paths
    return out
