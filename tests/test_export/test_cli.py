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
    """Every precision verified. INT8 goes through the accuracy search (the default), which keeps layers in FP32
    until INT8 reaches 99% of FP32 mAP: how many it needs depends on the weights (and so on the CPU that trained
    them); with no search, INT8 of the tiny fixture passed on one CPU's weights and failed on another's."""
    out = tmp_path / "exp"
    rc, stdout, err = _run([trained["retinanet"]["checkpoint"], "--precision", "fp32,fp16,int8",
                            "--calib-data", rect_data["train"], "--val-data", rect_data["val"], "--out", out,
                            "--calib-images", 4, "--parity-images", 4], capsys)
    assert rc == 0, err
    assert "verified against PyTorch" in stdout
    assert "tensorrt: skipped" in err or "tensorrt" in err
    man = json.loads((out / "export.json").read_text())
    for p in ("fp32", "fp16", "int8"):
        assert (out / f"model.{p}.onnx").is_file()
        assert man["files"][p]["verified"] is True and man["files"][p]["runs_on"] == "CPUExecutionProvider"
        assert man["parity"]["results"][p]["map"] is not None
    assert man["files"]["int8"]["details"]["calibration_images"] == 4
    search = man["files"]["int8"]["details"]["search"]
    assert search["met"] is True and search["final_ratio"] >= 0.99 and search["rounds"][0]["excluded"] == 0
    assert man["contract"]["category_ids"] == [3, 7]
    from gkd.export.onnx import EXPORTER, read_metadata

    assert man["exporter"] == EXPORTER and read_metadata(out / "model.int8.onnx")["exporter"] == EXPORTER
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["contract"]["in_graph"]["resize"]["min_size"] == 64
    assert "| int8 |" in (out / "parity.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_failed_parity_exits_1(trained, rect_data, tmp_path, capsys):
    out = tmp_path / "exp"
    rc, _, err = _run([trained["retinanet"]["checkpoint"], "--val-data", rect_data["val"], "--out", out,
                       "--parity-images", 2, "--atol", 0, "--rtol", 0, "--score-floor", 0.0, "--min-recall", 1.0,
                       "--min-map-ratio", 1.0], capsys)
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
