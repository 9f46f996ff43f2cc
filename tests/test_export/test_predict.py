"""gkd predict: a checkpoint and its ONNX export give the same detections on a photo, written as COCO results and
drawn on the image."""
import json

from PIL import Image

from gkd.cli import main
from tests.detectors import DETECTS_SCORE
from tests.test_export.test_real_sizes import as_photo


def test_checkpoint_and_onnx_predict_the_same_and_draw_it(trained, exported, rect_data, tmp_path, capsys):
    from gkd.export.images import load_image_set

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (_, im) in enumerate(load_image_set(rect_data["val"], limit=2).images):
        pixels = (as_photo(im, (427, 640), seed=i) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(photos / f"p{i}.jpg", quality=95)
    results = {}
    for kind, model in (("pt", trained["faster_rcnn"]["checkpoint"]), ("onnx", exported["faster_rcnn"]["fp32"])):
        out = tmp_path / kind
        assert main(["predict", str(model), str(photos), "--out", str(out), "--score-thresh", str(DETECTS_SCORE)]) == 0
        results[kind] = json.loads((out / "detections.json").read_text())
        index = json.loads((out / "images.json").read_text())["images"]
        assert [im["file_name"].rsplit("/", 1)[-1] for im in index] == ["p0.jpg", "p1.jpg"]
        assert index[0]["width"] == 640 and index[0]["height"] == 427
        drawn = Image.open(out / "drawn" / "p0.jpg")
        assert drawn.size == (640, 427)
    pt, onnx = results["pt"], results["onnx"]
    assert pt and len(pt) == len(onnx), "the model detects on the photos, and both runtimes find the same set"
    assert {d["category_id"] for d in pt} <= {3, 7} and all(d["class"] in ("red", "blue") for d in pt)
    key = sorted(((d["image_id"], d["category_id"]) for d in pt))
    assert key == sorted(((d["image_id"], d["category_id"]) for d in onnx))
    for a, b in zip(sorted(pt, key=lambda d: (d["image_id"], -d["score"])),
                    sorted(onnx, key=lambda d: (d["image_id"], -d["score"]))):
        assert abs(a["score"] - b["score"]) < 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 0.05
    assert "detection(s) >= 0.3 on 2 image(s)" in capsys.readouterr().out


def test_missing_images_are_one_line(trained, tmp_path, capsys):
    assert main(["predict", str(trained["faster_rcnn"]["checkpoint"]), str(tmp_path / "nope.jpg")]) == 2
    err = capsys.readouterr().err
    assert "nope.jpg: no such image file or folder" in err and len(err.strip().splitlines()) == 1
