"""``gkd eval`` and ``gkd bench latency`` on every artifact kind, on the CPU, with detectors that detect.

Uses the export fixtures (conftest.py): a Faster R-CNN trained until it finds every rectangle, and its FP32 / INT8
ONNX files. TensorRT engines cannot run here (no tensorrt, no GPU): the tests check that an engine is reported as
skipped with the reason, and time a fake one through a fake ``trtexec`` that writes ``--exportTimes`` like the real
one, so the parsing and the statistics are exercised; a real engine's numbers are not verified on this machine.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat

import pytest

from gkd.cli import main

ARCH = "faster_rcnn"


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "model.fp16.engine"
    path.write_bytes(b"ftrt" + bytes(60))  # not a zip, not empty: passes the kind check, cannot be deserialised
    return path


def test_every_artifact_kind_through_gkd_eval(trained, exported, rect_data, fake_engine, tmp_path, capsys):
    ckpt, onnx = trained[ARCH]["checkpoint"], exported[ARCH]
    out = tmp_path / "ev"
    rc = main(["eval", str(ckpt), str(onnx["fp32"]), str(onnx["int8"]), str(fake_engine), "--data",
               str(rect_data["val"]), "--out", str(out), "--min-relative-map", "0.9"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads((out / "eval.json").read_text())
    assert list(rep["models"]) == ["pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    assert rep["reference"] == "pytorch-fp32" and rep["protocol"]["images"] == 6
    ref = rep["models"]["pytorch-fp32"]["metrics"]["bbox_mAP"]
    assert ref > 0.5  # the fixture detects every rectangle: a real number, not a model that finds nothing
    assert abs(rep["models"]["onnxruntime-fp32"]["delta_map"]) < 0.01
    assert rep["models"]["onnxruntime-int8"]["precision"] == "int8"
    assert rep["models"]["onnxruntime-fp32"]["provider"] == "CPUExecutionProvider"
    assert set(rep["models"]["pytorch-fp32"]["per_class_AP"]) == {"red", "blue"}
    if not _tensorrt_importable():
        (why,) = rep["skipped"].values()
        assert "tensorrt Python package" in why and f"skipped: {fake_engine}" in cap.err
    assert "protocol: 6 image(s)" in cap.err and "| per-class AP | red | blue |" in cap.out
    # the reference's files keep the single-model layout; every other model gets its own detections file
    assert json.loads((out / "metrics.json").read_text())["bbox_mAP"] == ref
    assert (out / "detections.json").is_file() and (out / f"detections.1.{onnx['fp32'].name}.json").is_file()


def test_gate_fails_naming_the_model_and_the_numbers(trained, rect_data, tmp_path, capsys):
    """A student with random weights against the trained reference: mAP far below 99% of it -> exit 1."""
    import torch

    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import CATEGORY_IDS, CLASSES

    cfg = trained[ARCH]["cfg"]
    torch.manual_seed(0)
    untrained = save_checkpoint(detector_checkpoint(build_detector(cfg), cfg, CLASSES, CATEGORY_IDS),
                                tmp_path / "untrained.pt")
    rc = main(["eval", str(trained[ARCH]["checkpoint"]), str(untrained), "--data", str(rect_data["val"]),
               "--out", str(tmp_path / "ev"), "--min-relative-map", "0.99"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("gkd: gate failed:"))
    assert "pytorch-fp32 (untrained.pt)" in line and "below the gate --min-relative-map 0.99" in line
    import dataclasses

    blind_cfg = dataclasses.replace(cfg, score_thresh=0.999)  # random weights never score that high: no detections
    blind = save_checkpoint(detector_checkpoint(build_detector(blind_cfg), blind_cfg, CLASSES, CATEGORY_IDS),
                            tmp_path / "blind.pt")
    rc = main(["eval", str(blind), str(trained[ARCH]["checkpoint"]), "--data", str(rect_data["val"]),
               "--out", str(tmp_path / "ev2"), "--min-relative-map", "0.99"])
    # a reference that detects nothing cannot vouch for anything: refused, never a pass
    assert rc == 1 and "detects nothing proves nothing" in capsys.readouterr().err


def test_undecodable_images_are_counted_and_left_out_for_every_model(trained, exported, rect_data, tmp_path,
                                                                     capsys):
    data = tmp_path / "data"
    shutil.copytree(rect_data["val"].parent / "images", data / "images")
    shutil.copy(rect_data["val"], data / "val.json")
    first = json.loads((data / "val.json").read_text())["images"][0]["file_name"]
    (data / "images" / first).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc = main(["eval", str(trained[ARCH]["checkpoint"]), str(exported[ARCH]["fp32"]), "--data",
               str(data / "val.json"), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "1 of 6 image(s) could not be decoded and are left out for every model" in err and first in err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["images"]["evaluated"] == 5 and len(rep["images"]["failed"]) == 1
    assert rep["protocol"]["images"] == 5


def test_bad_models_are_refused_in_one_line(exported, rect_data, tmp_path, capsys):
    other = tmp_path / "other.json"
    data = json.loads(rect_data["val"].read_text())
    data["categories"] = [{"id": c["id"], "name": c["name"] + "_x"} for c in data["categories"]]
    other.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(rect_data["val"].parent / "images")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    renamed = tmp_path / "model.pt"
    shutil.copy(exported[ARCH]["fp32"], renamed)
    for args, expected in (
        ([str(exported[ARCH]["fp32"]), "--data", str(other)], "do not match the ONNX model's classes"),
        ([str(weights), "--data", str(rect_data["val"])], "unknown model kind (suffix '.bin')"),
        ([str(renamed), "--data", str(rect_data["val"])], "not a PyTorch checkpoint"),
        ([str(tmp_path / "missing.onnx"), "--data", str(rect_data["val"])], "model file not found"),
    ):
        assert main(["eval", *args, "--out", str(tmp_path / "ev")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("gkd: error:") and expected in err[-1], err
        assert not any("Traceback" in ln for ln in err)


def test_bench_latency_any_mix_both_views_json_and_csv(trained, exported, rect_data, fake_engine, tmp_path,
                                                       capsys):
    ckpt, onnx = trained[ARCH]["checkpoint"], exported[ARCH]
    rc = main(["bench", "latency", str(ckpt), str(onnx["fp32"]), str(onnx["int8"]), str(fake_engine),
               "--data", str(rect_data["val"]), "--view", "both", "--warmup", "1", "--warmup-max", "0",
               "--duration", "0", "--iterations", "3", "--latency-images", "2", "--json",
               "--out", str(tmp_path / "lat.json"), "--csv", str(tmp_path / "lat.csv")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert rep == json.loads((tmp_path / "lat.json").read_text())
    names = ["pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    for view in ("compute", "e2e"):
        assert list(rep["views"][view]) == names
        for r in rep["views"][view].values():
            assert len(r["raw_times_ms"]) == 3 == r["latency"]["count"] and r["latency"]["p50"] > 0
            assert r["headline"]["early_stopping"] is None and "plain" in r["headline"]["label"]
            assert r["view"] == view
    assert set(rep["views"]["e2e"]["onnxruntime-fp32"]["phases"]) == {"decode", "h2d", "compute", "d2h"}
    assert rep["views"]["compute"]["onnxruntime-fp32"]["phases"] == {}
    assert rep["views"]["compute"]["onnxruntime-int8"]["provider"] == "CPUExecutionProvider"
    assert rep["stamp"]["before"]["cpu"] and rep["stamp"]["after"]["versions"]["torch"]
    assert rep["protocol"]["policy"]["min_iterations"] == 3
    if not _tensorrt_importable():
        assert list(rep["skipped"]) == [str(fake_engine)]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "lat.csv").read_text())))
    assert [(r["view"], r["runner"]) for r in rows] == [(v, n) for v in ("compute", "e2e") for n in names]


def test_bench_latency_times_an_engine_through_trtexec(exported, rect_data, fake_engine, tmp_path, capsys,
                                                       monkeypatch):
    """A fake trtexec that checks its arguments and writes an --exportTimes trace like TensorRT's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "trtexec"
    script.write_text("""#!/usr/bin/env python3
import json, sys
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
assert args["shapes"].startswith("image:1x3x"), args
trace = [{"h2dMs": 0.1, "computeMs": 1.0 + i / 100, "d2hMs": 0.2, "latencyMs": 1.3 + i / 100} for i in range(100)]
json.dump(trace, open(args["exportTimes"], "w"))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc = main(["bench", "latency", str(fake_engine), str(exported[ARCH]["fp32"]), "--data", str(rect_data["val"]),
               "--trtexec", "--warmup", "1", "--warmup-max", "0", "--duration", "0", "--iterations", "2",
               "--latency-images", "1", "--out", str(tmp_path / "lat.json")])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "lat.json").read_text())["views"]["compute"]["trtexec-engine"]
    assert r["latency"]["count"] == 100 and r["latency"]["min"] == pytest.approx(1.0)
    assert r["headline"]["early_stopping"]["discarded"] == 2  # 100 queries: loadgen's rule discards 2
    assert set(r["phases"]) == {"latency", "h2d", "d2h"} and r["provider"].startswith("trtexec")


def test_bench_latency_without_any_runnable_model_says_why(fake_engine, rect_data, capsys):
    if _tensorrt_importable():
        pytest.skip("tensorrt is installed here: the engine would be opened, not skipped")
    assert main(["bench", "latency", str(fake_engine), "--data", str(rect_data["val"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gkd: error: no model can run here:") and "tensorrt Python package" in err[-1]


def test_gkd_eval_on_large_non_square_photos(trained, exported, rect_data, tmp_path, capsys):
    """What users feed in: the parity images as 427x640 / 640x427 / 1080x1920 JPEG photos (annotations scaled with
    them). The exported graph and the checkpoint resize them alike: same mAP, and the model still detects."""
    from PIL import Image

    from tests.test_export.test_real_sizes import as_photo

    src = json.loads(rect_data["val"].read_text())
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    sizes = [(427, 640), (640, 427), (1080, 1920)]
    images, anns = [], []
    from gkd.export.images import load_image_set

    decoded = dict(load_image_set(rect_data["val"]).images)
    for k, im in enumerate(src["images"][:3]):
        h, w = sizes[k]
        sy, sx = h / im["height"], w / im["width"]
        photo = as_photo(decoded[im["id"]], (h, w), seed=k)
        name = f"photo_{k}.jpg"
        Image.fromarray((photo * 255).round().byte().permute(1, 2, 0).numpy()).save(root / "images" / name,
                                                                                    quality=95)
        images.append({"id": im["id"], "file_name": name, "width": w, "height": h})
        for a in src["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, bw, bh = a["bbox"]
                anns.append({**a, "bbox": [x * sx, y * sy, bw * sx, bh * sy], "area": bw * sx * bh * sy})
    data = root / "val.json"
    data.write_text(json.dumps({"images": images, "annotations": anns, "categories": src["categories"]}))
    rc = main(["eval", str(trained[ARCH]["checkpoint"]), str(exported[ARCH]["fp32"]), "--data", str(data),
               "--out", str(tmp_path / "ev"), "--min-relative-map", "0.99"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["models"]["pytorch-fp32"]["metrics"]["bbox_mAP"] > 0
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    # it detects on every photo (test_real_sizes' criterion): the comparison means something
    assert {d["image_id"] for d in dets if d["score"] >= 0.3} == {im["id"] for im in images}
    assert abs(rep["models"]["onnxruntime-fp32"]["delta_map"]) < 0.01
