"""COCO loading, validation and the CocoDetection dataset (kd/data/coco.py, kd/data/transforms.py)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.core.errors import GkdError
from gkd.kd.data import CocoDetection, collate, load_coco, load_image
from gkd.kd.data.transforms import flip_decision, resize_scale

# --------------------------------------------------------------------------------------------------------------
# helpers (also used by test_data_cli.py)


def write_image(path, width, height, colour=(90, 90, 90), mode="RGB", boxes=()):
    """A flat image with optional solid red rectangles (xywh) so tests can find where content went."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = colour
    for x, y, w, h in boxes:
        arr[int(y):int(y + h), int(x):int(x + w)] = (255, 0, 0)
    img = Image.fromarray(arr, "RGB")
    if mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)  # the default web palette would change the colours
    elif mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_dataset(root, anns=None, images=None, categories=None, write_images=True):
    """A small COCO dataset in ``root``: images/a.png (64x48), images/b.png (32x40), categories 7=dog, 3=cat."""
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 32, "height": 40},
    ]
    categories = categories if categories is not None else [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    if anns is None:
        anns = [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10], "area": 200.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 20, 16, 24], "area": 384.0, "iscrowd": 0},
        ]
    if write_images:
        for img in images:
            own = [a["bbox"] for a in anns if a.get("image_id") == img["id"]]
            write_image(root / "images" / img["file_name"], img["width"], img["height"], boxes=own)
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def gkd_log():
    """Records of the "gkd" logger, whether or not the CLI already set propagate=False on it."""
    h = _Records()
    logger = logging.getLogger("gkd")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h.records
    logger.removeHandler(h)
    logger.setLevel(old)


# --------------------------------------------------------------------------------------------------------------
# validation and cleaning


def test_categories_map_to_contiguous_labels_by_ascending_id(tmp_path):
    index = load_coco(make_dataset(tmp_path))
    assert index.classes == ["cat", "dog"] and index.category_ids == [3, 7]
    assert index.image_root == tmp_path / "images"
    labels = {a["id"]: a["label"] for a in index.anns_by_image[1]}
    assert labels == {1: 1, 2: 2}  # cat (id 3) -> 1, dog (id 7) -> 2
    assert index.anns_by_image[2] == []  # an image without boxes is allowed


def test_crowd_kept_for_evaluation_and_excluded_from_training(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 20, 16, 24], "iscrowd": 1}]
    index = load_coco(make_dataset(tmp_path, anns))
    assert [a["iscrowd"] for a in index.gt_json["annotations"]] == [0, 1]
    for train in (True, False):
        ds = CocoDetection(index, train=train, min_size=48, max_size=64, hflip=0.0)
        _, target = ds[0]
        assert target["labels"].tolist() == [1]
        assert target["boxes"].tolist() == [[4.0, 6.0, 24.0, 16.0]]


def test_boxes_clipped_and_empty_ones_dropped_with_one_warning(tmp_path, gkd_log):
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [-5, 40, 20, 20]},  # clipped to [0, 40, 15, 8]
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [70, 0, 10, 10]},  # right of the image: dropped
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 10]},  # zero width: dropped
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [2, 2, -4, 5]}]  # negative width: dropped
    path = make_dataset(tmp_path, anns)
    index = load_coco(path)
    assert index.dropped == 3
    assert [a["bbox"] for a in index.gt_json["annotations"]] == [[0.0, 40.0, 15.0, 8.0]]
    assert index.gt_json["annotations"][0]["area"] == 120.0  # filled from the clipped box
    warnings = [r for r in gkd_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert str(path) in msg and "dropped 3" in msg and "\n" not in msg


def test_missing_fields_are_filled_so_pycocotools_scores_it(tmp_path):
    anns = [{"image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10]},
            {"image_id": 1, "category_id": 7, "bbox": [30, 20, 16, 24], "id": 5}]
    index = load_coco(make_dataset(tmp_path, anns))
    gt = index.gt_json
    assert sorted(a["id"] for a in gt["annotations"]) == [5, 6]
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in gt["annotations"])
    from gkd.kd.evaluation import CocoEvaluator

    ev = CocoEvaluator(gt, index.category_ids)
    outputs = [{"boxes": torch.tensor([[4.0, 6, 24, 16], [30, 20, 46, 44]]), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([1, 2])}, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                  "labels": torch.zeros(0, dtype=torch.int64)}]
    ev.process([{"image_id": 1}, {"image_id": 2}], outputs)
    assert ev.evaluate()["bbox_mAP"] == pytest.approx(1.0)


def _json(tmp_path, text):
    p = tmp_path / "bad.json"
    p.write_text(text)
    return p


GOOD_IMG = {"id": 1, "file_name": "a.png", "width": 10, "height": 10}
GOOD_CAT = {"id": 1, "name": "thing"}


def _doc(images=(GOOD_IMG,), anns=(), cats=(GOOD_CAT,)):
    return json.dumps({"images": list(images), "annotations": list(anns), "categories": list(cats)})


def _ann(**kw):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}
    a.update(kw)
    return a


@pytest.mark.parametrize("text, expected", [
    ('{"images": [{"id": 1, "file_na', "malformed or truncated JSON"),
    ("[1, 2]", "expected a COCO object"),
    (_doc(images=()), "empty dataset"),
    (_doc(cats=()), "'categories' is empty"),
    (json.dumps({"images": [GOOD_IMG], "annotations": []}), "missing 'categories'"),
    (_doc(anns=[_ann(image_id=9)]), "image_id 9, which is not in 'images'"),
    (_doc(anns=[_ann(category_id=4)]), "category_id 4, which is not in 'categories'"),
    (_doc(anns=[_ann(bbox=[1, 2, 3])]), "bbox is [1, 2, 3]; expected 4 finite numbers"),
    (_doc(anns=[_ann(bbox=["1", 2, 3, 4])]), "expected 4 finite numbers"),
    (_doc(anns=[_ann(bbox=[1, 2, True, 4])]), "expected 4 finite numbers"),
    (_doc(anns=[_ann(iscrowd=2)]), "iscrowd is 2; expected 0 or 1"),
    (_doc(anns=[_ann(area="big")]), "area is 'big'"),
    (_doc(anns=[_ann(), _ann()]), "annotation id 1 appears twice"),
    (_doc(images=[GOOD_IMG, GOOD_IMG]), "image id 1 appears twice"),
    (_doc(images=[{**GOOD_IMG, "width": "10"}]), "expected positive integers"),
    (_doc(images=[{**GOOD_IMG, "file_name": 3}]), "file_name is 3"),
    (_doc(cats=[GOOD_CAT, {"id": 2, "name": "thing"}]), "used by several category ids"),
    (json.dumps({"images": {"id": 1}, "annotations": [], "categories": [GOOD_CAT]}), "'images' is a dict"),
])
def test_bad_json_is_one_line_error_naming_the_file(tmp_path, text, expected):
    path = _json(tmp_path, text)
    with pytest.raises(GkdError) as exc:
        load_coco(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)) and expected in msg and "\n" not in msg


def test_missing_json_file(tmp_path):
    with pytest.raises(GkdError, match="not found"):
        load_coco(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------------------
# images: bad files, modes, EXIF


def test_missing_image_named_at_load_and_with_check_images(tmp_path):
    path = make_dataset(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    index = load_coco(path)  # not checked by default
    ds = CocoDetection(index, train=False, min_size=32, max_size=64)
    ds[0]
    with pytest.raises(GkdError, match=r"b\.png: image file not found"):
        ds[1]
    with pytest.raises(GkdError, match=r"b\.png: image file not found"):
        load_coco(path, check_images=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named(tmp_path, damage):
    path = make_dataset(tmp_path)
    img = tmp_path / "images" / "a.png"
    data = img.read_bytes()
    img.write_bytes(b"this is not a png" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(GkdError) as exc:
        load_coco(path, check_images=True)
    assert str(img) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(GkdError, match="a.png"):
        CocoDetection(load_coco(path), train=True, min_size=32, max_size=64)[0]


def test_size_mismatch_with_json_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}]
    path = make_dataset(tmp_path, anns=[], images=images)
    write_image(tmp_path / "images" / "a.png", 48, 64)  # the file is portrait, the JSON says landscape
    with pytest.raises(GkdError, match=r"a\.png: image is 48x64 .* says 64x48"):
        CocoDetection(load_coco(path), train=False, min_size=32, max_size=64)[0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    p = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((5, 7), 128 * 257, np.uint16)).save(p)  # 16-bit grey at half scale
    else:
        write_image(p, 7, 5, colour=(128, 128, 128), mode=mode)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (7, 5)
    arr = np.asarray(img).astype(int)
    assert np.abs(arr - 128).max() <= 3, f"{mode}: {arr[0, 0]}"


def test_palette_with_transparency_and_rgba_keep_colours(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png"))[0, 0].tolist() == [10, 200, 30]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [250, 20, 20]


def _exif_rotated_jpeg(path):
    """Stored 40x20 (w x h): left half red, right half blue, with EXIF orientation 6 (display rotated 90 deg CW)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_rotated_jpeg_is_displayed_upright(tmp_path):
    p = _exif_rotated_jpeg(tmp_path / "images" / "r.jpg")
    img = np.asarray(load_image(p))
    assert img.shape == (40, 20, 3)  # rotated: 20 wide, 40 tall
    assert img[5, 10, 0] > 200 and img[5, 10, 2] < 60  # rotating CW brings the stored left (red) half to the top
    assert img[35, 10, 2] > 200 and img[35, 10, 0] < 60
    ok = make_dataset(tmp_path, anns=[], images=[{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}],
                      write_images=False)
    image, _ = CocoDetection(load_coco(ok, check_images=True), train=False, min_size=8, max_size=64)[0]
    assert image.shape == (3, 40, 20)
    bad = make_dataset(tmp_path, anns=[], images=[{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}],
                       write_images=False)
    with pytest.raises(GkdError, match="after EXIF rotation"):
        load_coco(bad, check_images=True)


# --------------------------------------------------------------------------------------------------------------
# the dataset: eval mode, resize, flip, determinism


def test_eval_mode_returns_original_pixels_and_boxes(tmp_path):
    index = load_coco(make_dataset(tmp_path))
    ds = CocoDetection(index, train=False, min_size=200, max_size=300, hflip=1.0)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    expected = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / "a.png").convert("RGB")).copy())
    assert torch.equal(image, expected.permute(2, 0, 1).float() / 255)
    assert target["boxes"].tolist() == [[4.0, 6.0, 24.0, 16.0], [30.0, 20.0, 46.0, 44.0]]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["scale"] == 1.0 and target["orig_size"] == (48, 64) and target["image_id"] == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


@pytest.mark.parametrize("w, h, min_size, max_size", [(64, 48, 96, 1000), (64, 48, 200, 100), (32, 40, 64, 64)])
def test_train_resize_follows_torchvision_rule(tmp_path, w, h, min_size, max_size):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10]}]
    path = make_dataset(tmp_path, anns, images=[{"id": 1, "file_name": "a.png", "width": w, "height": h}])
    ds = CocoDetection(load_coco(path), train=True, min_size=min_size, max_size=max_size, hflip=0.0)
    image, target = ds[0]
    scale = min(min_size / min(w, h), max_size / max(w, h))
    assert target["scale"] == pytest.approx(scale) == resize_scale(h, w, min_size, max_size)
    assert image.shape == (3, round(h * scale), round(w * scale))
    sx, sy = image.shape[2] / w, image.shape[1] / h
    assert target["boxes"][0].tolist() == pytest.approx([4 * sx, 6 * sy, 24 * sx, 16 * sy], abs=1e-4)
    # torchvision's own transform sends the original image to the same size (its scale rule is the one we copy)
    tv = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
    tv.eval()
    original = CocoDetection(load_coco(path), train=False, min_size=min_size, max_size=max_size)[0][0]
    assert tuple(tv([original])[0].image_sizes[0]) == tuple(image.shape[1:])


def test_hflip_moves_boxes_with_the_content(tmp_path):
    index = load_coco(make_dataset(tmp_path))
    image, target = CocoDetection(index, train=True, min_size=48, max_size=64, hflip=1.0)[0]
    assert image.shape == (3, 48, 64)  # scale 1: only the flip acts
    assert target["boxes"].tolist() == [[64 - 24.0, 6.0, 64 - 4.0, 16.0], [64 - 46.0, 20.0, 64 - 30.0, 44.0]]
    red = (image[0] > 0.9) & (image[1] < 0.1)
    for x1, y1, x2, y2 in target["boxes"].round().long().tolist():
        assert red[y1:y2, x1:x2].all()  # the drawn rectangles are exactly where the flipped boxes say
    assert red.sum() == sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in target["boxes"].long().tolist())


def test_flip_depends_only_on_seed_epoch_and_index(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 48]}]
    images = [{"id": i, "file_name": "a.png", "width": 64, "height": 48} for i in range(1, 33)]
    anns = [dict(anns[0], id=i, image_id=i) for i in range(1, 33)]
    index = load_coco(make_dataset(tmp_path, anns, images=images))

    def flips(ds, epoch, order):
        ds.set_epoch(epoch)
        return {i: ds[i][1]["boxes"][0, 0].item() > 0 for i in order}

    a = CocoDetection(index, train=True, min_size=48, max_size=64, hflip=0.5, seed=3)
    b = CocoDetection(index, train=True, min_size=48, max_size=64, hflip=0.5, seed=3)
    torch.manual_seed(0)
    np.random.seed(0)
    first = flips(a, 2, range(32))
    flips(b, 0, range(32))  # b has "run" another epoch, and reads in another order
    torch.manual_seed(1)
    assert flips(b, 2, reversed(range(32))) == first
    assert 4 < sum(first.values()) < 28
    assert flips(a, 3, range(32)) != first
    c = CocoDetection(index, train=True, min_size=48, max_size=64, hflip=0.5, seed=4)
    assert flips(c, 2, range(32)) != first
    assert {i: flip_decision(3, 2, i, 0.5) for i in range(32)} == first
    rate = np.mean([flip_decision(0, e, i, 0.3) for e in range(10) for i in range(200)])
    assert 0.26 < rate < 0.34


def test_items_identical_with_loader_workers(tmp_path):
    index = load_coco(make_dataset(tmp_path))
    ds = CocoDetection(index, train=True, min_size=40, max_size=80, hflip=0.5, seed=1)
    ds.set_epoch(5)
    direct = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)
    via_workers = [(imgs[0], tgts[0]) for imgs, tgts in loader]
    for (i1, t1), (i2, t2) in zip(direct, via_workers):
        assert torch.equal(i1, i2) and torch.equal(t1["boxes"], t2["boxes"])


def test_collate_and_keep_empty(tmp_path):
    index = load_coco(make_dataset(tmp_path))
    ds = CocoDetection(index, train=True, min_size=32, max_size=64)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]
    assert len(CocoDetection(index, train=True, min_size=32, max_size=64, keep_empty=False)) == 1
    assert len(CocoDetection(index, train=False, min_size=32, max_size=64, keep_empty=False)) == 2  # eval: all
