"""gkd run and the small commands around it lose nothing: a pipeline never deletes a run folder it did not make, an
unset name stops it before any stage, ``gkd bench op`` refuses an empty workload in one line, and ``gkd data split``
says which classes reach one split only."""
from __future__ import annotations

import json

import pytest

from gkd.cli import main
from gkd.kd.errors import GkdError


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
    from gkd import stages
    from gkd.kd.config import load_config

    folder = tmp_path / "R" / "teacher"
    before = _users_run(folder)
    cfg = load_config(None, [f"runs_dir={tmp_path / 'R'}", "name=teacher"])
    token = stages._STAGE_KEY.set("a-stage-key")
    try:
        with pytest.raises(GkdError, match="holds files this pipeline did not make"):
            stages._prepare_run_dir(cfg)
    finally:
        stages._STAGE_KEY.reset(token)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_training_stage_still_replaces_its_own_superseded_folder(tmp_path):
    from gkd import stages
    from gkd.kd.config import load_config

    folder = tmp_path / "R" / "teacher"
    _users_run(folder)
    (folder / stages.KEY_FILE).write_text("an-older-key\n")
    cfg = load_config(None, [f"runs_dir={tmp_path / 'R'}", "name=teacher"])
    token = stages._STAGE_KEY.set("the-new-key")
    try:
        assert stages._prepare_run_dir(cfg) is False
    finally:
        stages._STAGE_KEY.reset(token)
    assert sorted(p.name for p in folder.iterdir()) == [stages.KEY_FILE]


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
