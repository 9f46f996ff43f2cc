"""``gkd export`` end to end on the tiny RetinaNet, and its bad-input paths (one line, nothing left behind)."""
import json

import pytest
import torch

from gkd.cli import main


def _run(args, capsys):
    rc = main(["export", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_export_all_precisions(trained, rect_data, tmp_path, capsys):
    """Every precision verified. INT8 goes through the accuracy search (the default), which keeps layers in float
    only while INT8 loses more than 1% of FP32's mAP beyond chance (how many depends on the weights, and so on the
    CPU that trained them). The manifest's INT8 record is the file's own, and the mAP level states its noise."""
    out = tmp_path / "exp"
    rc, stdout, err = _run([trained["retinanet"]["checkpoint"], "--precision", "fp32,fp16,int8",
                            "--calib-data", rect_data["train"], "--val-data", rect_data["val"], "--out", out,
                            "--calib-images", 4, "--parity-images", 4, "--no-static"], capsys)
    assert rc == 0, err
    assert "verified against PyTorch" in stdout
    assert "tensorrt: skipped" in err or "tensorrt" in err
    man = json.loads((out / "export.json").read_text())
    for p in ("fp32", "fp16", "int8"):
        assert (out / f"model.{p}.onnx").is_file()
        assert man["files"][p]["verified"] is True and man["files"][p]["runs_on"] == "CPUExecutionProvider"
        level = man["parity"]["results"][p]["map"]
        assert level["images"] == 6 and level["ci95"][0] <= level["delta"] <= level["ci95"][1] and level["passed"]
    int8 = man["files"]["int8"]["details"]
    assert int8["request"]["calibration_images"] == 4
    search = int8["search"]
    assert search["met"] is True and search["rounds"][0]["kept_float"] == 0 and search["sensitivity"]
    from gkd.export.int8_record import read_int8_record
    from gkd.export.onnx import load_onnx

    from_file = read_int8_record(load_onnx(out / "model.int8.onnx"))
    assert from_file["layers"] == int8["layers"] and from_file["activations"] == int8["activations"]
    assert int8["is_int8"] and int8["macs_int8_share"] >= 0.9 and man["speed"]["ratio"]["int8/fp32"] > 0
    assert man["contract"]["category_ids"] == [3, 7]
    from gkd.export.onnx import EXPORTER, read_metadata

    assert man["exporter"] == EXPORTER and read_metadata(out / "model.int8.onnx")["exporter"] == EXPORTER
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["contract"]["in_graph"]["resize"]["min_size"] == 64
    assert "| int8 |" in (out / "parity.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _args(trained, rect_data, out, *extra):
    return [trained["retinanet"]["checkpoint"], "--val-data", rect_data["val"], "--out", out, "--parity-images", 2,
            "--no-static", "--speed-rounds", 0, *extra]


def test_export_never_replaces_files_it_did_not_make(trained, rect_data, tmp_path, capsys):
    """An --out holding the user's own model.json / parity.json (no export.json): refused before any work, the files
    untouched; a folder holding gkd's export is replaced, and the files of precisions not made again are removed
    with a word."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.json").write_text("my notes")
    (out / "parity.json").write_text("{}")
    rc, _, err = _run(_args(trained, rect_data, out), capsys)
    assert rc == 2 and "no export.json, so gkd did not make them" in err and "model.json" in err
    assert (out / "model.json").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == [
        "model.json", "parity.json"]
    ours = tmp_path / "ours"
    assert _run(_args(trained, rect_data, ours, "--precision", "fp32,fp16"), capsys)[0] == 0
    rc, _, err = _run(_args(trained, rect_data, ours), capsys)
    assert rc == 0 and "removed model.fp16.onnx" in err and not (ours / "model.fp16.onnx").exists()


def test_a_killed_export_leaves_no_file_without_its_record(trained, rect_data, tmp_path, capsys, monkeypatch):
    """Files are staged in a hidden folder and moved into place at the end: an export that dies halfway (here: in
    the mAP level) leaves nothing beside the user's files, and the next export removes what a kill -9 would leave."""
    from gkd.export import pipeline

    out = tmp_path / "exp"
    out.mkdir()
    (out / ".gkd-export-99999").mkdir()  # what a killed export leaves
    (out / ".gkd-export-99999" / "model.fp32.onnx").write_text("half")
    (out / ".gkd-calib-abc").mkdir()

    def boom(*a, **k):
        raise pipeline.GkdError("simulated failure halfway")

    monkeypatch.setattr(pipeline, "map_comparison", boom)
    rc, _, err = _run(_args(trained, rect_data, out), capsys)
    assert rc == 2 and "simulated failure halfway" in err
    assert list(out.iterdir()) == []


def test_failed_parity_exits_1(trained, rect_data, tmp_path, capsys):
    out = tmp_path / "exp"
    rc, _, err = _run([trained["retinanet"]["checkpoint"], "--val-data", rect_data["val"], "--out", out,
                       "--parity-images", 2, "--no-static", "--atol", 0, "--rtol", 0, "--score-floor", 0.0,
                       "--min-recall", 1.0, "--min-map-ratio", 1.0], capsys)
    man = json.loads((out / "export.json").read_text())
    if man["files"]["fp32"]["verified"]:
        pytest.skip("FP32 happened to be bit-exact on these images; nothing to fail")
    assert rc == 1 and "parity FAILED for fp32" in err


@pytest.mark.parametrize("case", ["not_detector", "state_dict", "precision", "int8_no_calib", "unwritable",
                                  "no_images", "bad_profile", "other_classes"])
def test_bad_inputs_are_one_line(case, trained, rect_data, tmp_path, capsys):
    ckpt = trained["retinanet"]["checkpoint"]
    out = tmp_path / "out"
    args = [ckpt, "--val-data", rect_data["val"], "--out", out]
    if case == "not_detector":
        bad = tmp_path / "notes.pt"
        torch.save({"format": "gkd-checkpoint", "version": 1, "kind": "run-notes"}, bad)
        args[0], match = bad, "holds no detector"
    elif case == "state_dict":
        bad = tmp_path / "sd.pt"
        torch.save({"w": torch.zeros(2)}, bad)
        args[0], match = bad, "carries no architecture"
    elif case == "precision":
        args += ["--precision", "fp32,int4"]
        match = "unknown precision 'int4'"
    elif case == "int8_no_calib":
        args += ["--precision", "int8"]
        match = "needs --calib-data"
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"  # a folder below a file: cannot be created, even as root
        args[args.index(tmp_path / "out")] = out
        match = "output folder is not writable"
    elif case == "bad_profile":
        args += ["--opt-shapes", "image:1x3x20x20", "--min-shapes", "image:1x3x64x64"]
        match = "min <= opt <= max"
    elif case == "other_classes":  # annotated parity images of another label space: an error, not a skipped mAP
        data = json.loads(rect_data["val"].read_text())
        data["categories"] = [{"id": c["id"], "name": c["name"] + "_other"} for c in data["categories"]]
        other = rect_data["val"].parent / "val_other_classes.json"
        other.write_text(json.dumps(data))
        args[2], match = other, "are not the checkpoint's"
    else:
        args = [ckpt, "--out", out]
        match = "parity needs real images"
    rc, stdout, err = _run(args, capsys)
    assert rc == 2, (stdout, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert match in err and "Traceback" not in err
    assert len(lines) <= 3  # click's usage header at most, then one error line
    assert not out.exists() or list(out.iterdir()) == []


def test_any_requested_file_that_fails_parity_fails_the_export():
    """The exit status counts every graph's files (a static INT8 file in TensorRT's format can fail where the
    onnxruntime one passes) and the engines; a file written but not requested (FP32 beside FP16 only) does not."""
    from gkd.export.pipeline import unverified_files

    def f(requested, verified):
        return {"requested": requested, "verified": verified}

    man = {"files": {"fp32": f(True, True), "int8": f(True, True), "static-fp32": f(True, True),
                     "static-int8": f(True, False)}, "tensorrt": {"engines": {"fp16": {"good": False}}}}
    assert unverified_files(man) == ["static-int8", "fp16 engine"]
    man = {"files": {"fp32": f(False, False), "fp16": f(True, True)}, "tensorrt": {}}
    assert unverified_files(man) == []
