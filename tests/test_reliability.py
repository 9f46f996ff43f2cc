"""gkd run and the small commands around it lose nothing: a pipeline never deletes a run folder it did not make, an
unset name stops it before any stage, ``gkd bench op`` refuses an empty workload in one line, and ``gkd data split``
says which classes reach one split only."""
from __future__ import annotations

import json

import pytest

from gkd.cli import main
from gkd.core.errors import GkdError


def _users_run(folder):
    """What ``gkd train kd/configs/teacher.yaml runs_dir=R`` leaves in ``R/teacher`` (no stage key file)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 the user's trained teacher")
    (folder / "config.yaml").write_text("name: teacher\n")
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_gkd_run_with_an_unset_name_stops_before_any_stage(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "R"
    before = _users_run(runs / "teacher")
    monkeypatch.setattr("gkd.pipeline.run_pipeline", lambda cfg: pytest.fail(f"the pipeline started in {cfg.run_dir}"))
    rc = main(["run", "name=", f"runs_dir={runs}", f"data_root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "'name' must be one folder name inside runs_dir" in err
    assert {p: p.read_bytes() for p in (runs / "teacher").rglob("*") if p.is_file()} == before
    assert not (tmp_path / "data").exists()  # not even the data stage ran


def test_a_training_stage_leaves_a_folder_it_did_not_make(tmp_path):
    from gkd.kd.config import load_config
    from gkd.kd.resume import prepare_stage_run

    folder = tmp_path / "R" / "teacher"
    before = _users_run(folder)
    cfg = load_config(None, [f"runs_dir={tmp_path / 'R'}", "name=teacher"])
    with pytest.raises(GkdError, match="holds files this pipeline did not make"):
        prepare_stage_run(cfg, "a-stage-key")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_training_stage_still_replaces_its_own_superseded_folder(tmp_path):
    from gkd.kd.config import load_config
    from gkd.kd.resume import STAGE_KEY_FILE, prepare_stage_run

    folder = tmp_path / "R" / "teacher"
    _users_run(folder)
    (folder / STAGE_KEY_FILE).write_text("an-older-key\n")
    cfg = load_config(None, [f"runs_dir={tmp_path / 'R'}", "name=teacher"])
    assert prepare_stage_run(cfg, "the-new-key") is False
    assert sorted(p.name for p in folder.iterdir()) == [STAGE_KEY_FILE]


def test_bench_op_refuses_zero_instances_in_one_line(capsys):
    rc = main(["bench", "op", "--instances", "0", "--image-size", "32", "32", "--channels", "4", "--prototypes", "2",
               "--repeats", "1", "--reference-repeats", "0", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--instances" in err and "0 is not in the range x>=1" in err


def test_data_split_names_the_classes_that_reach_one_split_only(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "common"}, {"id": 2, "name": "rare"}]}
    for i in range(1, 11):
        Image.new("RGB", (32, 32)).save(images / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        cats = [1] + ([2] if i == 1 else [])  # 'rare' is on image 1 only
        for c in cats:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": c,
                                        "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0})
    src = tmp_path / "all.json"
    src.write_text(json.dumps(coco))
    assert main(["data", "split", str(src), "--out", str(tmp_path / "split")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 class(es) only in train.json, none in val.json: rare" in err


def test_gkd_run_refuses_a_folder_holding_a_users_training_run(tmp_path, capsys, monkeypatch):
    """``gkd run name=teacher runs_dir=R`` where ``gkd train`` made ``R/teacher``: refused in one line before any
    stage, and nothing is written into the user's run."""
    runs = tmp_path / "R"
    before = _users_run(runs / "teacher")
    rc = main(["run", "name=teacher", f"runs_dir={runs}", f"data_root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a training run (config.yaml, checkpoints) that gkd run did not make" in err
    assert {p: p.read_bytes() for p in (runs / "teacher").rglob("*") if p.is_file()} == before
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("override,message", [("methods=[foo]", "methods: unknown method 'foo'"),
                                              ("seeds=[]", "seeds: empty"),
                                              ("control_methods=[gdk]", "control_methods: unknown method 'gdk'")])
def test_gkd_study_refuses_an_unknown_method_or_no_seed_before_any_stage(tmp_path, capsys, override, message):
    rc = main(["study", override, f"runs_dir={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_int8_quantization_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """onnxruntime reports a write cut short by a full disk as a corrupt protobuf: the export says what happened."""
    import onnxruntime.quantization as ort_q
    import torch

    import gkd.core.io as kio
    from gkd.export.quantize import quantize_int8

    def truncated(*args, **kwargs):
        raise RuntimeError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")

    src = tmp_path / "m.onnx"
    _tiny_conv_onnx(src)
    monkeypatch.setattr(ort_q, "quantize_static", truncated)
    monkeypatch.setattr(kio, "nearly_full", lambda folder, below=0: True)
    with pytest.raises(GkdError, match="No space left on device during INT8 quantization"):
        quantize_int8(src, tmp_path / "out" / "m.int8.onnx", [torch.rand(3, 16, 16)], scopes=("/",),
                      keep_head_outputs=False)
    monkeypatch.setattr(kio, "nearly_full", lambda folder, below=0: False)
    with pytest.raises(GkdError, match="INT8 quantization failed: Error parsing message"):
        quantize_int8(src, tmp_path / "out" / "m.int8.onnx", [torch.rand(3, 16, 16)], scopes=("/",),
                      keep_head_outputs=False)
    assert not any((tmp_path / "out").iterdir())  # nothing half-written is left


def _tiny_conv_onnx(path):
    """One named Conv reading ``image`` (the shape of a quantizable layer)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image):
            return self.conv(image)

    torch.onnx.export(Net(), (torch.rand(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"])


def test_convert_and_bench_op_never_replace_a_file_of_the_users(tmp_path, capsys):
    """``--out`` / ``--json`` naming a file gkd did not write: refused in one line before any work; a file gkd wrote
    is replaced."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.new("RGB", (32, 24)).save(tmp_path / "img" / "a.jpg")
    (tmp_path / "lab" / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (tmp_path / "names.txt").write_text("thing\n")
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "annotations"}')
    convert = ["data", "convert", "yolo", str(tmp_path / "img"), str(tmp_path / "lab"), "--names",
               str(tmp_path / "names.txt"), "--out"]
    rc = main(convert + [str(mine)])
    assert rc == 2 and "mine.json: exists and was not written by gkd (--out)" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "annotations"}'
    ours = tmp_path / "ours.json"
    assert main(convert + [str(ours)]) == 0 and main(convert + [str(ours)]) == 0  # gkd's own: replaced
    notes = tmp_path / "op.json"
    notes.write_text("my notes")
    rc = main(["bench", "op", "--json", str(notes), "--instances", "1"])
    assert rc == 2 and "op.json: exists and was not written by gkd (--json)" in capsys.readouterr().err
    assert notes.read_text() == "my notes"


def test_training_on_a_split_without_a_single_box_is_refused(tmp_path, capsys):
    """A train.json whose images carry no annotation trains to mAP 0 in silence otherwise; gkd data check warns."""
    from gkd.kd.data import generate_synthetic

    generate_synthetic(tmp_path / "d", n_images=6, seed=0, image_size=64)
    data = json.loads((tmp_path / "d" / "train.json").read_text())
    (tmp_path / "d" / "empty.json").write_text(json.dumps({**data, "annotations": []}))
    assert main(["data", "check", str(tmp_path / "d" / "empty.json")]) == 0
    assert "warning: no annotated object" in capsys.readouterr().out
    rc = main(["train", f"data.root={tmp_path / 'd'}", "data.train=empty.json", f"runs_dir={tmp_path / 'runs'}",
               "train.epochs=1", "model.min_size=64", "model.max_size=64"])
    err = capsys.readouterr().err
    assert rc == 2 and "empty.json: holds no annotated object" in err
