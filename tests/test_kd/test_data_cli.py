"""`gkd data synth | convert voc | convert yolo | check` through the real CLI entry point (kd/data/cli.py)."""
import json

import pytest

from gkd.cli import main
from tests.test_kd.test_convert import make_voc, make_yolo
from tests.test_kd.test_data_coco import make_dataset


def run(capsys, *args):
    rc = main(["data", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *fragments):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("gkd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_synth_then_check(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    rc, out, _ = run(capsys, "synth", "--out", out_dir, "--images", 5, "--seed", 2, "--size", 64, "--val-fraction",
                     0.4, "--no-progress")
    assert rc == 0 and "train 3 images" in out and "val 2 images" in out
    meta = json.loads((out_dir / "meta.json").read_text())
    assert (meta["seed"], meta["n_images"], meta["image_size"]) == (2, 5, 64)
    rc, out, _ = run(capsys, "check", out_dir / "train.json")
    assert rc == 0 and out.strip().endswith("ok")
    assert "3 images (64x64" in out and "circle" in out and "star" in out
    assert "all present, decodable" in out


def test_check_reports_dropped_boxes_and_classes(tmp_path, capsys):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 100, 5, 5]},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [30, 20, 16, 24], "iscrowd": 1}]
    path = make_dataset(tmp_path, anns)
    rc, out, _ = run(capsys, "check", path)
    assert rc == 0
    assert "2 images" in out and "1 instances, 1 crowd, 1 dropped boxes" in out and "1 without boxes" in out
    cat_row = next(ln for ln in out.splitlines() if " cat " in ln).split()
    assert cat_row == ["1", "3", "cat", "1", "0"]  # label, category id, name, instances, crowd


def test_check_bad_json_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    rc, _, err = run(capsys, "check", path)
    assert_user_error(rc, err, str(path), "malformed or truncated JSON")


def test_check_missing_image_exits_2_unless_no_images(tmp_path, capsys):
    path = make_dataset(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    rc, _, err = run(capsys, "check", path)
    assert_user_error(rc, err, str(tmp_path / "images" / "b.png"), "image file not found")
    rc, out, _ = run(capsys, "check", path, "--no-images")
    assert rc == 0 and "not checked" in out


def test_check_with_images_folder_option(tmp_path, capsys):
    path = make_dataset(tmp_path)
    (tmp_path / "images").rename(tmp_path / "pics")
    rc, _, err = run(capsys, "check", path)
    assert_user_error(rc, err, "a.png: image file not found")
    rc, out, _ = run(capsys, "check", path, "--images", tmp_path / "pics")
    assert rc == 0 and f"image root: {tmp_path / 'pics'}" in out


def test_convert_voc_and_yolo(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc")
    out_voc = tmp_path / "voc.json"
    rc, out, _ = run(capsys, "convert", "voc", voc, "--out", out_voc, "--split", "train", "--classes",
                     "cat,dog,bird", "--difficult", "KEEP")
    assert rc == 0 and f"--images {voc / 'JPEGImages'}" in out
    coco = json.loads(out_voc.read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "bird"] and len(coco["images"]) == 2

    yolo = make_yolo(tmp_path / "yolo")
    out_yolo = tmp_path / "yolo.json"
    rc, out, _ = run(capsys, "convert", "yolo", yolo / "images", yolo / "labels", "--names", yolo / "data.yaml",
                     "--out", out_yolo)
    assert rc == 0 and "3 images" in out and "4 instances" in out
    rc, out, _ = run(capsys, "check", out_yolo, "--images", yolo / "images")
    assert rc == 0 and out.strip().endswith("ok")


def test_convert_bad_label_line_exits_2(tmp_path, capsys):
    yolo = make_yolo(tmp_path / "yolo")
    label = yolo / "labels" / "sub" / "img_a.txt"
    label.write_text(label.read_text() + "0 0.5 0.5\n")
    out_json = tmp_path / "y.json"
    rc, _, err = run(capsys, "convert", "yolo", yolo / "images", yolo / "labels", "--names", yolo / "names.txt",
                     "--out", out_json)
    assert_user_error(rc, err, f"{label}:3:", "3 values")
    assert not out_json.exists()  # nothing half-written


@pytest.mark.parametrize("args", [[], ["synth"], ["convert"], ["convert", "voc"], ["convert", "yolo"], ["check"]])
def test_help_for_every_data_command(capsys, args):
    rc, out, _ = run(capsys, *args, "--help")
    assert rc == 0 and "Usage: gkd data" in out and ("Example" in out or "Commands" in out)


def test_split_command_makes_a_folder_gkd_run_reads(tmp_path, capsys):
    from gkd.kd.data import generate_synthetic

    generate_synthetic(tmp_path / "src", n_images=10, seed=0, image_size=64)
    assert main(["data", "split", str(tmp_path / "src" / "train.json"), "--out", str(tmp_path / "mine"),
                 "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "gkd run data_root=" in out and (tmp_path / "mine" / "images").is_dir()
    assert main(["data", "check", str(tmp_path / "mine" / "val.json")]) == 0
