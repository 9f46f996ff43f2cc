"""A decoded image becomes the model's input in one place (``gkd.kd.data.coco.image_to_tensor``), and every entry
point that feeds a model gives it the tensor it always gave: the training/evaluation dataset, the image sets of
parity, calibration and benchmarks, ``gkd predict`` and the end-to-end latency view.

The reference is the conversion each of them wrote out before it had one home: uint8 HWC array, copied, permuted to
CHW, float32, divided by 255. Tensors are compared bit for bit, with their dtype, shape and memory layout.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.kd.data.coco import load_image

#: file name -> (width, height): a JPEG photo (non-square, larger than the model size), a grayscale PNG, an RGBA PNG
IMAGES = {"photo.jpg": (640, 427), "gray.png": (300, 200), "rgba.png": (257, 131)}


def _reference(pil: Image.Image) -> torch.Tensor:
    """What each entry point computed on its own: ``[3, H, W]`` float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 with what makes a photo: smooth gradients, a few flat objects with edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 100 * y / height, 140 + 60 * x / width, 200 - 80 * y / height], axis=-1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        w, h = rng.integers(20, width // 3), rng.integers(20, height // 3)
        sky[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return np.clip(sky + rng.normal(0, 6, sky.shape), 0, 255).astype(np.uint8)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape and actual.stride() == expected.stride()
    assert torch.equal(actual, expected)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``{"json": COCO file, "files": {name: path}}``: the three images and a COCO file listing them."""
    root = tmp_path_factory.mktemp("photos")
    (root / "images").mkdir()
    files = {}
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        pixels = _photo_like(w, h, i)
        if name == "gray.png":
            image = Image.fromarray(pixels).convert("L")
        elif name == "rgba.png":
            alpha = np.linspace(0, 255, w * h).reshape(h, w).astype(np.uint8)  # every opacity, transparent to opaque
            image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
        else:
            image = Image.fromarray(pixels)
        files[name] = root / "images" / name
        image.save(files[name], **({"quality": 90} if name.endswith(".jpg") else {}))
    images = [{"id": i, "file_name": name, "width": w, "height": h}
              for i, (name, (w, h)) in enumerate(IMAGES.items(), start=1)]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [100, 80, 200, 150], "area": 30000.0, "iscrowd": 0}]
    path = root / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 3, "name": "box"}]}))
    return {"json": path, "files": files}


def test_the_sample_images_cover_the_modes_they_are_meant_to(photos):
    modes = {name: Image.open(path).mode for name, path in photos["files"].items()}
    assert modes == {"photo.jpg": "RGB", "gray.png": "L", "rgba.png": "RGBA"}
    assert [load_image(p).size for p in photos["files"].values()] == list(IMAGES.values())


def test_image_to_tensor_is_the_old_conversion(photos):
    from gkd.kd.data.coco import image_to_tensor, load_image_tensor

    for path in photos["files"].values():
        pil = load_image(path)
        expected = _reference(pil)
        _assert_same(image_to_tensor(pil), expected)
        _assert_same(load_image_tensor(path), expected)
        assert expected.shape == (3, pil.height, pil.width) and 0.0 <= expected.min() and expected.max() <= 1.0


def test_dataset_items_are_unchanged_in_eval_and_train_mode(photos):
    from gkd.kd.data import CocoDetection, load_coco
    from gkd.kd.data.transforms import hflip, resize

    index = load_coco(photos["json"])
    evaluation = CocoDetection(index, train=False, min_size=64, max_size=96)
    train = CocoDetection(index, train=True, min_size=200, max_size=333, hflip=1.0)
    for i, path in enumerate(photos["files"].values()):
        _assert_same(evaluation[i][0], _reference(load_image(path)))
        resized, boxes, _ = resize(load_image(path), np.zeros((0, 4), np.float32), 200, 333)
        _assert_same(train[i][0], _reference(hflip(resized, boxes)[0]))


@pytest.mark.parametrize("lazy", [False, True])
def test_image_sets_are_unchanged(photos, lazy):
    from gkd.export.images import load_image_set

    images = load_image_set(photos["json"], lazy=lazy).images
    assert len(images) == len(IMAGES)
    for (_, tensor), path in zip(images, photos["files"].values()):
        _assert_same(tensor, _reference(load_image(path)))


def test_predict_feeds_the_model_unchanged(photos, tmp_path, monkeypatch):
    from gkd.export import runtime
    from gkd.export.predict import predict_images
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import CATEGORY_IDS, CLASSES, tiny_model_config

    cfg = tiny_model_config("faster_rcnn")
    model = save_checkpoint(detector_checkpoint(build_detector(cfg), cfg, CLASSES, CATEGORY_IDS), tmp_path / "m.pt")
    fed = []

    def record(self, feed):
        fed.append(feed["image"])
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}

    monkeypatch.setattr(runtime.Runner, "infer", record)
    predict_images(model, list(photos["files"].values()), tmp_path / "out", draw=False, log=lambda s: None)
    assert len(fed) == len(IMAGES)
    for tensor, path in zip(fed, photos["files"].values()):  # files are read in the order given
        _assert_same(tensor, _reference(load_image(path)).unsqueeze(0))


def test_end_to_end_latency_view_feeds_the_runner_unchanged(photos):
    from gkd.bench.latency import e2e_call

    class Recorder:
        def __init__(self):
            self.prepared = []

        def prepare(self, x):
            self.prepared.append(x)
            return x

        def compute(self, x):
            return x

        def finish(self, raw):
            return raw

    runner, files = Recorder(), list(photos["files"].values())
    call = e2e_call(runner, files)
    for i in range(len(files)):
        call(i)
    for tensor, path in zip(runner.prepared, files):
        _assert_same(tensor, _reference(load_image(path)).unsqueeze(0))
