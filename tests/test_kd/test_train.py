"""End to end on CPU: tiny synthetic data -> gkd train -> gkd eval, kill-and-resume equivalence, bad input."""
import json

import pytest
import torch

from gkd.cli import main
from gkd.kd.checkpoint import load_checkpoint
from gkd.kd.config import load_config
from gkd.kd.data import generate_synthetic
from gkd.kd.task import DetectionTask
from gkd.kd.train import train_detector
from tests.helpers import TEST_THREADS

BASE = ["model.backbone=resnet18", "model.min_size=64", "model.max_size=64",
        "model.anchor_sizes=[8,16,32,64,128]",
        "model.rois_per_image=64", "train.batch_size=4", "train.warmup_iters=2", "train.lr=0.01", f"train.threads={TEST_THREADS}",
        "eval.batch_size=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, n_images=15, seed=0, image_size=64, val_fraction=0.2)
    return root


def cfg_for(tmp_path, data_dir, name, *extra):
    return load_config(None, BASE + [f"runs_dir={tmp_path}", f"name={name}", f"data.root={data_dir}", *extra])


def test_train_then_eval_cli(tmp_path, data_dir, capsys):
    rc = main(["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=t", f"data.root={data_dir}",
               "train.epochs=1"])
    assert rc == 0
    run = tmp_path / "t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 0
    assert {"train/loss", "train/loss_classifier", "val/bbox_mAP", "val/bbox_mAP_s"} <= set(records[0])
    assert (run / "metrics.csv").read_text().startswith("epoch,")
    assert load_config(run / "config.yaml").train.epochs == 1  # resolved config saved
    rc = main(["eval", str(run / "checkpoints" / "model.pt"), "--data", str(data_dir / "val.json"),
               "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert f"bbox_mAP      {metrics['bbox_mAP']:.4f}" in out
    # the same number as the training loop's own evaluation of the same weights
    assert metrics["bbox_mAP"] == pytest.approx(records[0]["val/bbox_mAP"], abs=1e-9)
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(d) for d in dets)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    steps = "train.max_steps_per_epoch=2"
    full = train_detector(cfg_for(tmp_path, data_dir, "full", "train.epochs=2", steps), progress=False)

    original = DetectionTask.on_epoch_start

    def kill_at_second_epoch(self, epoch, context):
        if epoch == 1:
            raise Killed  # the process dies after epoch 0's checkpoint was written
        return original(self, epoch, context)

    monkeypatch.setattr(DetectionTask, "on_epoch_start", kill_at_second_epoch)
    cfg = cfg_for(tmp_path, data_dir, "killed", "train.epochs=2", steps)
    with pytest.raises(Killed):
        train_detector(cfg, progress=False)
    monkeypatch.setattr(DetectionTask, "on_epoch_start", original)
    torch.manual_seed(999)  # the resumed process starts with another RNG state: the checkpoint must restore it
    resumed = train_detector(cfg, resume=True, progress=False)

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train/loss"] == full["train/loss"] and resumed["val/bbox_mAP"] == full["val/bbox_mAP"]
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_existing_run_needs_resume_and_resume_needs_same_config(tmp_path, data_dir, capsys):
    args = ["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=r", f"data.root={data_dir}",
            "train.epochs=1", "train.max_steps_per_epoch=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume: 'train.lr' was 0.01" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["train.epochz=1"], "unknown key 'train.epochz'"),
    (["model.backbone=resnet19"], "'model.backbone' must be one of"),
    (["data.train=missing.json"], "missing.json: COCO annotation file not found"),
    (["model.num_classes=3"], "model.num_classes is 3 but the dataset has"),
])
def test_bad_input_is_one_line_error(tmp_path, data_dir, capsys, extra, message):
    rc = main(["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=b", f"data.root={data_dir}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_checkpoint_of_other_class_count_refused(tmp_path, data_dir, capsys):
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector

    cfg = cfg_for(tmp_path, data_dir, "x")
    other = tmp_path / "other.pt"
    save_checkpoint(detector_checkpoint(build_detector(cfg.model, 2), cfg.model, ["a", "b"], [1, 2]), other)
    rc = main(["eval", str(other), "--data", str(data_dir / "val.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "do not match the checkpoint's classes ['a', 'b']" in err
    rc = main(["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=w", f"data.root={data_dir}",
               f"model.weights={other}"])
    err = capsys.readouterr().err
    assert rc == 2 and "class count differs" in err
