"""A model is its file, never its file's name: ``gkd eval`` and ``gkd bench latency`` keep two runs' ``model.pt``
(or two folders' ``model.fp32.onnx``) apart; an ONNX file that cannot say what its labels mean, or that changed since
its export folder vouched for it, is refused; an output folder is checked before the work, and files of the user's
own in it are never replaced.

Uses the export fixtures (conftest.py): a Faster R-CNN that detects every rectangle, and its ONNX files.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gkd.cli import main

ARCH = "faster_rcnn"


def _untrained_copy(trained, path):
    """A checkpoint of the same architecture and classes with fresh weights: it detects (next to) nothing."""
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import CATEGORY_IDS, CLASSES

    torch.manual_seed(123)
    cfg = trained[ARCH]["cfg"]
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(detector_checkpoint(build_detector(cfg), cfg, CLASSES, CATEGORY_IDS), path)


def test_two_runs_model_pt_are_two_models_and_the_gate_sees_the_regression(trained, rect_data, tmp_path, capsys):
    a = tmp_path / "runs" / "a" / "checkpoints" / "model.pt"
    a.parent.mkdir(parents=True)
    shutil.copy(trained[ARCH]["checkpoint"], a)
    b = _untrained_copy(trained, tmp_path / "runs" / "b" / "checkpoints" / "model.pt")
    out = tmp_path / "ev"
    rc = main(["eval", str(a), str(b), "--data", str(rect_data["val"]), "--out", str(out),
               "--min-relative-map", "0.99"])
    cap = capsys.readouterr()
    assert rc == 1, "b detects nothing: the gate must fail"
    rep = json.loads((out / "eval.json").read_text())
    names = list(rep["models"])
    assert names == ["pytorch-fp32 (a/checkpoints/model.pt)", "pytorch-fp32 (b/checkpoints/model.pt)"]
    assert [rep["models"][n]["path"] for n in names] == [str(a), str(b)]
    assert rep["models"][names[0]]["metrics"]["bbox_mAP"] > 0.5 > rep["models"][names[1]]["metrics"]["bbox_mAP"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(a) and metrics["bbox_mAP"] == rep["models"][names[0]]["metrics"]["bbox_mAP"]
    assert "gate failed: pytorch-fp32 (b/checkpoints/model.pt)" in cap.err
    assert cap.out.count("| pytorch-fp32 (") == 4  # two rows in each of the two tables


def test_two_folders_model_fp32_onnx_are_two_rows(exported, rect_data, tmp_path):
    files = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        files.append(shutil.copy(exported[ARCH]["fp32"], tmp_path / run / "model.fp32.onnx"))
    assert main(["eval", *map(str, files), "--data", str(rect_data["val"]), "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert list(rep["models"]) == ["onnxruntime-fp32 (a/model.fp32.onnx)", "onnxruntime-fp32 (b/model.fp32.onnx)"]


def test_one_file_given_twice_is_refused(trained, rect_data, tmp_path, capsys):
    ckpt = trained[ARCH]["checkpoint"]
    twice = ckpt.parent / ".." / ckpt.parent.name / ckpt.name
    assert main(["eval", str(ckpt), str(twice), "--data", str(rect_data["val"]), "--out", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_latency_times_both_files_of_the_same_name(exported, rect_data, tmp_path):
    files = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        files.append(shutil.copy(exported[ARCH]["fp32"], tmp_path / run / "model.fp32.onnx"))
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", *map(str, files), "--data", str(rect_data["val"]), "--warmup", "1",
               "--warmup-max", "0", "--duration", "0", "--iterations", "2", "--latency-images", "1",
               "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert list(rep["runners"]) == ["onnxruntime-fp32 (a/model.fp32.onnx)", "onnxruntime-fp32 (b/model.fp32.onnx)"]
    assert [r["path"] for r in rep["runners"].values()] == [str(f) for f in files]


def test_an_onnx_without_gkd_metadata_is_refused(exported, rect_data, tmp_path, capsys):
    import onnx

    model = onnx.load(str(exported[ARCH]["fp32"]))
    del model.metadata_props[:]  # what some ONNX optimisers do
    stripped = tmp_path / "optimised.onnx"
    onnx.save(model, str(stripped))
    for argv in (["eval", str(stripped), "--data", str(rect_data["val"]), "--out", str(tmp_path / "ev")],
                 ["predict", str(stripped), str(rect_data["val"].parent / "images"), "--out", str(tmp_path / "p")]):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "carries no gkd metadata" in err and str(stripped) in err, argv[0]
    assert not (tmp_path / "ev" / "metrics.json").exists()


def _export_folder_with_a_changed_file(exported, tmp_path):
    """An export folder whose export.json records the original SHA-256 of a file since changed in place (one
    weight flipped: the protobuf stays valid)."""
    import onnx
    from onnx import numpy_helper

    from gkd.core.io import file_sha256

    folder = tmp_path / "export"
    folder.mkdir()
    path = shutil.copy(exported[ARCH]["fp32"], folder / "model.fp32.onnx")
    manifest = {"checkpoint": "model.pt", "checkpoint_sha256": "0" * 64,
                "files": {"fp32": {"onnx": "model.fp32.onnx", "sha256": file_sha256(path), "verified": True}}}
    (folder / "export.json").write_text(json.dumps(manifest))
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = -arr.flat[0] + 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    return path


def test_an_onnx_changed_inside_its_export_folder_is_refused(exported, rect_data, tmp_path, capsys):
    path = _export_folder_with_a_changed_file(exported, tmp_path)
    images = rect_data["val"].parent / "images"
    for argv in (["eval", str(path), "--data", str(rect_data["val"]), "--out", str(tmp_path / "ev")],
                 ["predict", str(path), str(images), "--out", str(tmp_path / "p")],
                 ["bench", "latency", str(path), "--data", str(rect_data["val"]), "--out", str(tmp_path / "l.json")]):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "changed since gkd export wrote and verified it" in err and "export.json" in err, argv[0]


def test_a_provider_without_a_gpu_is_refused_before_any_work(trained, rect_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    for provider in ("tensorrt", "cuda"):
        for argv in (["eval", str(trained[ARCH]["checkpoint"]), "--data", str(rect_data["val"]), "--out",
                      str(tmp_path / "ev")],
                     ["bench", "latency", str(trained[ARCH]["checkpoint"]), "--data", str(rect_data["val"])]):
            assert main([*argv, "--provider", provider]) == 2, (argv[0], provider)
            err = capsys.readouterr().err
            assert f"--provider {provider}" in err and "protocol" not in err and "latency (" not in err


def test_eval_checks_its_out_folder_before_the_work(trained, rect_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["eval", str(trained[ARCH]["checkpoint"]), "--data", str(rect_data["val"]), "--out",
               str(blocker / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and "protocol:" not in err


def test_eval_never_replaces_a_file_of_the_users_own(trained, rect_data, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    rc = main(["eval", str(trained[ARCH]["checkpoint"]), "--data", str(rect_data["val"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "metrics.json: exists and was not written by gkd eval" in err and "protocol:" not in err
    assert (out / "metrics.json").read_text() == '{"mine": 1}'


def test_a_second_eval_replaces_the_first_and_leaves_none_of_its_files(trained, exported, rect_data, tmp_path):
    out = tmp_path / "ev"
    ckpt, onnx = trained[ARCH]["checkpoint"], exported[ARCH]
    assert main(["eval", str(ckpt), str(onnx["fp32"]), str(onnx["int8"]), "--data", str(rect_data["val"]),
                 "--out", str(out)]) == 0
    assert main(["eval", str(ckpt), "--data", str(rect_data["val"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "eval.json", "eval.md", "metrics.json"]


def test_latency_never_replaces_a_latency_json_of_the_users_own(exported, rect_data, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latency.json").write_text("my own notes")
    rc = main(["bench", "latency", str(exported[ARCH]["fp32"]), "--data", str(rect_data["val"])])
    err = capsys.readouterr().err
    assert rc == 2 and "latency.json: exists and was not written by gkd (--out)" in err and "latency (" not in err
    assert (tmp_path / "latency.json").read_text() == "my own notes"
    # a path the user names is protected the same way, the CSV too: nothing is timed, nothing replaced
    for option, name in (("--out", "mine.json"), ("--csv", "mine.csv")):
        (tmp_path / name).write_text("my own numbers")
        fresh = ["--out", "fresh.json"] if option == "--csv" else []
        rc = main(["bench", "latency", str(exported[ARCH]["fp32"]), "--data", str(rect_data["val"]), option, name,
                   *fresh])
        err = capsys.readouterr().err
        assert rc == 2 and f"{name}: exists and was not written by gkd ({option})" in err, err
        assert (tmp_path / name).read_text() == "my own numbers"
