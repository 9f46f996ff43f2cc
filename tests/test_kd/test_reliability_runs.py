"""Training runs and checkpoints lose nothing and never go on silently wrong: a full disk is one line, every reader of
a checkpoint applies the same version and content checks, a resume on other data is refused, a run's name stays a
folder inside runs_dir, and a run moved to another folder resumes there.

The few tiny trainings here only make run folders; no assertion depends on the numbers they reach.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gkd.cli import main
from gkd.core.errors import GkdError
from gkd.kd.checkpoint import detector_checkpoint, load_checkpoint, load_detector, save_checkpoint
from gkd.kd.config import ModelConfig, load_config
from gkd.kd.data import generate_synthetic
from tests.helpers import TEST_THREADS

TINY = ["model.backbone=resnet18", "model.backbone_width=0.25", "model.fpn_channels=16", "model.box_head_dim=32",
        "model.min_size=64", "model.max_size=64", "model.anchor_sizes=[8,16,32,64,128]", "model.rois_per_image=16",
        "train.batch_size=4", "train.max_steps_per_epoch=1", "train.warmup_iters=1", f"train.threads={TEST_THREADS}",
        "train.epochs=1", "eval.batch_size=8"]
CFG = ModelConfig(arch="faster_rcnn", backbone="resnet18", backbone_width=0.25, fpn_channels=16, box_head_dim=32,
                  min_size=64, max_size=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, n_images=10, seed=0, image_size=64, val_fraction=0.2)
    return root


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, data_dir):
    """A finished 1-epoch run (one step): ``runs/r`` with its last.pt; tests copy it before changing anything."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "--no-progress", *TINY, f"runs_dir={runs}", "name=r", f"data.root={data_dir}"]) == 0
    return runs / "r"


def _classes(data_dir) -> list[str]:
    return [c["name"] for c in json.loads((data_dir / "train.json").read_text())["categories"]]


def _detector_file(path, data_dir, **changes):
    from gkd.kd.models.detectors import build_detector

    classes = _classes(data_dir)
    torch.manual_seed(0)
    model = build_detector(CFG, len(classes))
    ckpt = detector_checkpoint(model, CFG, classes, list(range(1, len(classes) + 1)))
    ckpt.update(changes)
    return save_checkpoint(ckpt, path)


# ---------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    """torch's zip writer reports a full file system as 'basic_ios::clear: iostream error' and then, from its
    __exit__, 'unexpected pos N vs M' (no errno): the user gets "No space left on device" and the earlier file."""
    import collections

    import gkd.core.io as io

    path = tmp_path / "model.pt"
    save_checkpoint({"format": "gkd-checkpoint", "version": 1, "epoch": 0}, path)
    before = path.read_bytes()

    def full_disk_save(obj, f):
        open(f, "wb").write(b"PK\x03\x04partial")
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3951680 vs 3951576")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(5 << 20, 5 << 20, 0))
    with pytest.raises(GkdError, match="No space left on device") as err:
        io.atomic_torch_save({"epoch": 1}, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before  # the earlier checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # and no partial file is left


def test_a_torch_write_error_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import collections

    import gkd.core.io as io

    def failing_save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        io.atomic_torch_save({"epoch": 1}, tmp_path / "model.pt")


# ------------------------------------------------------------------- one set of checks for every checkpoint reader


def _readers(data_dir, tmp_path):
    """Every way gkd reads a detector checkpoint the user names: eval/export/predict/bench (load_detector), a
    teacher (distill.teacher.checkpoint=) and initial weights (model.weights=)."""
    from gkd.kd.distill.config import TeacherConfig
    from gkd.kd.distill.run import load_teacher
    from gkd.kd.train import build_model

    classes = _classes(data_dir)

    def as_weights(path):
        cfg = load_config(None, TINY + [f"runs_dir={tmp_path}", f"data.root={data_dir}", f"model.weights={path}"])
        build_model(cfg, len(classes), classes)

    return {"load_detector": lambda p: load_detector(p),
            "distill.teacher.checkpoint": lambda p: load_teacher(TeacherConfig(checkpoint=str(p)), classes, CFG),
            "model.weights": as_weights}


@pytest.mark.parametrize("reader", ["load_detector", "distill.teacher.checkpoint", "model.weights"])
def test_every_reader_refuses_a_newer_checkpoint_format(reader, data_dir, tmp_path):
    path = _detector_file(tmp_path / "future.pt", data_dir, version=2)
    with pytest.raises(GkdError, match=r"format version 2 is newer than this gkd understands \(1\); upgrade gkd"):
        _readers(data_dir, tmp_path)[reader](path)


@pytest.mark.parametrize("reader", ["load_detector", "distill.teacher.checkpoint", "model.weights"])
def test_every_reader_refuses_a_checkpoint_without_a_detector(reader, data_dir, tmp_path):
    path = _detector_file(tmp_path / "empty.pt", data_dir)
    ckpt = load_checkpoint(path)
    del ckpt["model"]
    save_checkpoint(ckpt, path)
    with pytest.raises(GkdError, match="holds no detector"):
        _readers(data_dir, tmp_path)[reader](path)


def test_resume_refuses_a_newer_last_pt(one_epoch_run, data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["version"] = 2
    save_checkpoint(state, last)
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={tmp_path}", "name=r", f"data.root={data_dir}",
               "train.epochs=2", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "format version 2 is newer" in err and str(last) in err


def test_resume_refuses_a_detector_only_checkpoint_as_last_pt(one_epoch_run, data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    shutil.copy(run / "checkpoints" / "model.pt", run / "checkpoints" / "last.pt")
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={tmp_path}", "name=r", f"data.root={data_dir}",
               "train.epochs=2", "--resume"])
    assert rc == 2 and "not a resumable gkd run checkpoint" in capsys.readouterr().err


def test_the_pipeline_stage_reader_applies_the_same_checks(one_epoch_run, tmp_path):
    from gkd.kd.resume import STAGE_KEY_FILE, prepare_stage_run

    run = tmp_path / "r"
    shutil.copytree(one_epoch_run, run)
    (run / STAGE_KEY_FILE).write_text("k\n")
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["version"] = 2
    save_checkpoint(state, last)
    cfg = load_config(run / "config.yaml", [f"runs_dir={tmp_path}"])
    with pytest.raises(GkdError, match="newer than this gkd understands"):
        prepare_stage_run(cfg, "k")
    assert last.is_file()


# ------------------------------------------------------------------------------------------ resume and its data


def test_resume_on_changed_data_is_refused(one_epoch_run, data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "runs" / "r"
    shutil.copytree(one_epoch_run, run)
    args = ["train", "--no-progress", *TINY, f"runs_dir={tmp_path / 'runs'}", "name=r", f"data.root={data}",
            "train.epochs=2", "--resume"]
    train = json.loads((data / "train.json").read_text())
    train["images"] = train["images"][:4]
    train["annotations"] = [{**a, "category_id": train["categories"][0]["id"]} for a in train["annotations"]
                            if a["image_id"] in {im["id"] for im in train["images"]}]
    (data / "train.json").write_text(json.dumps(train))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.json: cannot resume 'r'" in err and "not the data the run started on" in err
    assert err.strip().splitlines()[-1].startswith("gkd: error: ")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0  # the run is untouched


def test_a_run_moved_to_another_folder_resumes_there(one_epoch_run, data_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(one_epoch_run, moved / "renamed")
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={moved}", "name=renamed", f"data.root={data_dir}",
               "train.epochs=2", "--resume"])
    assert rc == 0
    assert load_checkpoint(moved / "renamed" / "checkpoints" / "last.pt")["epoch"] == 1


def test_a_run_resumes_with_its_data_moved(one_epoch_run, data_dir, tmp_path):
    data = tmp_path / "moved-data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "runs" / "r"
    shutil.copytree(one_epoch_run, run)
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={tmp_path / 'runs'}", "name=r", f"data.root={data}",
               "train.epochs=2", "--resume"])
    assert rc == 0  # data.root changed, and the data's SHA-256 says it is the same data


# -------------------------------------------------------------------------------------------- the run's folder


@pytest.mark.parametrize("name", ["", ".", "..", "../escaped", "a/b"])
def test_a_run_name_is_one_folder_inside_runs_dir(name, data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={runs}", f"name={name}", f"data.root={data_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "'name' must be one folder name inside runs_dir" in err and repr(name) in err
    assert list(runs.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_run_name_from_the_api_is_checked_too():
    with pytest.raises(GkdError, match="one folder name inside runs_dir"):
        load_config(None, updates={"name": " padded"})


def test_a_fresh_run_leaves_a_folder_of_the_users_own_alone(data_dir, tmp_path, capsys):
    mine = tmp_path / "runs" / "notes"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("my own: config\n")
    (mine / "todo.txt").write_text("mine\n")
    rc = main(["train", "--no-progress", *TINY, f"runs_dir={tmp_path / 'runs'}", "name=notes",
               f"data.root={data_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds files that are not a gkd run's (todo.txt)" in err
    assert (mine / "config.yaml").read_text() == "my own: config\n" and sorted(p.name for p in mine.iterdir()) == [
        "config.yaml", "todo.txt"]


def test_a_missing_base_config_names_the_file_that_refers_to_it(tmp_path):
    copied = tmp_path / "mine.yaml"
    copied.write_text("_base_: teacher.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(GkdError) as err:
        load_config(copied)
    msg = str(err.value)
    assert str(tmp_path / "teacher.yaml") in msg and f"the _base_ of {copied}" in msg
