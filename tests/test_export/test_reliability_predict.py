"""``gkd predict`` loses nothing and mixes nothing: every image gets its own drawing (also two ``x.png`` in two
folders, or ``x.jpg`` beside ``x.png``), an unreadable image is skipped and listed, an interrupted prediction leaves
the earlier one whole, and files of the user's own in ``--out`` are never replaced.

The models are untrained detectors of the tiny test architecture: what they detect does not matter here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two checkpoints of the tiny architecture with different fresh weights: ``{"a": path, "b": path}``."""
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import CATEGORY_IDS, CLASSES, tiny_model_config

    root = tmp_path_factory.mktemp("models")
    cfg = tiny_model_config("faster_rcnn")
    out = {}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        out[name] = save_checkpoint(detector_checkpoint(build_detector(cfg), cfg, CLASSES, CATEGORY_IDS),
                                    root / name / "model.pt")
    return out


def _photo(path, seed: int, fmt: str | None = None):
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _index(out):
    return json.loads((out / "images.json").read_text())


def test_same_names_in_two_folders_and_two_formats_are_all_drawn(models, tmp_path, capsys):
    _photo(tmp_path / "a" / "x.png", 0)
    _photo(tmp_path / "a" / "x.jpg", 1, "JPEG")
    _photo(tmp_path / "b" / "x.png", 2)
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                 "--score-thresh", "0"]) == 0
    assert "on 3 image(s)" in capsys.readouterr().out
    index = _index(out)["images"]
    drawn = [im["drawn"] for im in index]
    assert len(set(drawn)) == 3 and sorted(p.name for p in (out / "drawn").iterdir()) == sorted(drawn)
    assert [im["file_name"] for im in index] == [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "x.png"),
                                                 str(tmp_path / "b" / "x.png")]


def test_an_unreadable_image_is_skipped_and_listed(models, tmp_path, capsys):
    _photo(tmp_path / "photos" / "good.png", 0)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    index = _index(out)
    assert [im["file_name"].rsplit("/", 1)[-1] for im in index["images"]] == ["good.png"]
    assert [f["file"].rsplit("/", 1)[-1] for f in index["failed"]] == ["broken.png"]
    assert "broken.png" in cap.err and "1 unreadable image(s) skipped" in cap.out


def test_gifs_are_read_and_what_a_folder_holds_besides_images_is_said(models, tmp_path, capsys):
    _photo(tmp_path / "photos" / "anim.gif", 0, "GIF")
    _photo(tmp_path / "photos" / "nested" / "deeper.png", 1)
    (tmp_path / "photos" / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert [im["file_name"].rsplit("/", 1)[-1] for im in _index(out)["images"]] == ["anim.gif"]
    assert "1 sub-folder(s)" in err and "notes.txt" in err


def test_an_image_without_detections_is_drawn_too(models, tmp_path):
    _photo(tmp_path / "photos" / "empty.png", 0)
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(out), "--score-thresh",
                 "1"]) == 0
    assert _index(out)["images"][0]["detections"] == 0 and (out / "drawn" / "empty.jpg").is_file()


def test_an_interrupted_prediction_leaves_the_earlier_one_whole(models, tmp_path, monkeypatch):
    from gkd.export.runtime import TorchRunner

    for i in range(3):
        _photo(tmp_path / "photos" / f"p{i}.png", i)
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(out), "--score-thresh",
                 "0"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    real = TorchRunner.detect

    def fails_on_the_second_image(self, image):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(self, image)

    monkeypatch.setattr(TorchRunner, "detect", fails_on_the_second_image)
    with pytest.raises(RuntimeError, match="went away"):
        main(["predict", str(models["b"]), str(tmp_path / "photos"), "--out", str(out), "--score-thresh", "0"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the earlier model's drawings and JSON, together; no staging folder left
    assert _index(out)["model"] == str(models["a"])


def test_a_new_prediction_replaces_every_file_of_the_earlier_one(models, tmp_path):
    for i in range(2):
        _photo(tmp_path / "photos" / f"p{i}.png", i)
    out = tmp_path / "out"
    assert main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(out)]) == 0
    (tmp_path / "photos" / "p1.png").unlink()
    assert main(["predict", str(models["b"]), str(tmp_path / "photos"), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "drawn").iterdir()) == ["p0.jpg"]
    assert _index(out)["model"] == str(models["b"]) and len(_index(out)["model_sha256"]) == 64


@pytest.mark.parametrize("mine", ["detections.json", "images.json", "drawn/p0.jpg"])
def test_predict_into_the_photo_folder_never_replaces_the_users_files(models, tmp_path, capsys, mine):
    photos = tmp_path / "photos"
    _photo(photos / "p0.png", 0)
    (photos / mine).parent.mkdir(exist_ok=True)
    (photos / mine).write_text("the user's own")
    rc = main(["predict", str(models["a"]), str(photos), "--out", str(photos)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{photos / mine}: " in err and "not written by gkd predict" in err
    assert (photos / mine).read_text() == "the user's own"
    assert not [p for p in photos.iterdir() if p.name.startswith(".gkd")]


def test_predict_checks_its_out_folder_before_the_work(models, tmp_path, capsys, monkeypatch):
    from gkd.export.runtime import TorchRunner

    _photo(tmp_path / "photos" / "p0.png", 0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(TorchRunner, "detect", lambda *a: pytest.fail("ran the model before checking --out"))
    rc = main(["predict", str(models["a"]), str(tmp_path / "photos"), "--out", str(blocker / "out")])
    assert rc == 2 and "not writable" in capsys.readouterr().err
