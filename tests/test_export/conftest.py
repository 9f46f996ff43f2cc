"""Fixtures for the export tests: a tiny COCO dataset of drawn rectangles and two tiny detectors that detect it.

The detectors (ResNet-18 Faster R-CNN and RetinaNet at 64 px) are trained until they find every box of the parity
images at a score with a margin over the parity floor, not for a fixed number of steps: see tests/detectors.py for
why, and for the criterion. ``trained`` fails the test run, naming the numbers, if either does not get there.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
from tests.detectors import CATEGORY_IDS, CLASSES, assert_detects, fit_until_confident, make_rect_dataset, subset_json

ARCHS = ("faster_rcnn", "retinanet")


@pytest.fixture(scope="session")
def rect_data(tmp_path_factory) -> dict[str, Path]:
    """``train`` (12 images: calibration and the detectors' fit set) and ``val`` (parity: its first 6 images)."""
    root = tmp_path_factory.mktemp("rects")
    train = make_rect_dataset(root, 12, seed=1, name="train.json")
    return {"train": train, "val": subset_json(train, 6, "val.json")}


@pytest.fixture(scope="session")
def trained(rect_data, tmp_path_factory) -> dict[str, dict]:
    """Tiny Faster R-CNN and RetinaNet that detect every rectangle: ``{arch: {"model", "cfg", "checkpoint", ...}}``."""
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for arch in ARCHS:
        model, cfg, steps, min_score = fit_until_confident(arch, rect_data["train"])
        assert_detects(arch, model, rect_data["val"])
        path = save_checkpoint(detector_checkpoint(model, cfg, CLASSES, CATEGORY_IDS), root / f"{arch}.pt")
        out[arch] = {"model": model, "cfg": cfg, "checkpoint": path, "steps": steps, "min_score": min_score}
    return out


@pytest.fixture(scope="session")
def exported(trained, rect_data, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """FP32, FP16 and INT8 ONNX files of both tiny detectors: ``{arch: {precision: path}}``."""
    from gkd.export.adapters import preprocess_contract
    from gkd.export.fp16 import convert_fp16
    from gkd.export.images import load_image_set
    from gkd.export.onnx import export_onnx, load_onnx, save_onnx
    from gkd.export.quantize import quantize_int8

    root = tmp_path_factory.mktemp("onnx")
    calib = [im for _, im in load_image_set(rect_data["train"]).images]
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
