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


def test_eval_interval_zero_leaves_the_evaluation_to_the_caller(tmp_path, data_dir, monkeypatch):
    """``train.eval_interval=0`` (what gkd study sets: it evaluates each checkpoint once itself, with subsets):
    no epoch evaluates, not even the last; the checkpoint is still written."""
    import gkd.kd.evaluation as evaluation

    calls = []
    real = evaluation.evaluate_detector
    monkeypatch.setattr(evaluation, "evaluate_detector", lambda *a, **k: calls.append(1) or real(*a, **k))
    record = train_detector(cfg_for(tmp_path, data_dir, "noeval", "train.epochs=2", "train.max_steps_per_epoch=1",
                                    "train.eval_interval=0"), progress=False)
    assert calls == [] and not any(k.startswith("val/") for k in record)
    lines = (tmp_path / "noeval" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("val/bbox_mAP" not in json.loads(line) for line in lines)
    assert (tmp_path / "noeval" / "checkpoints" / "model.pt").is_file()
    # the same run with the default interval does evaluate (the patch above would have seen it)
    train_detector(cfg_for(tmp_path, data_dir, "witheval", "train.epochs=1", "train.max_steps_per_epoch=1"),
                   progress=False)
    assert calls == [1]


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


def test_a_run_folder_has_one_owner(tmp_path, data_dir, capsys):
    """A second training into a folder another live process is writing to is refused, naming it; a lock left by
    a dead process is taken over, and released at the end."""
    import json as _json
    import subprocess
    import sys

    args = ["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=owned", f"data.root={data_dir}",
            "train.epochs=1", "train.max_steps_per_epoch=1"]
    lock = tmp_path / "owned" / ".lock"
    lock.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock.write_text(_json.dumps({"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}))
        assert main(args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("gkd: error:")]
        assert len(errors) == 1 and f"in use by process {other.pid}" in errors[0] and "Traceback" not in err
        assert not (tmp_path / "owned" / "checkpoints").exists()  # nothing written
    finally:
        other.kill()
        other.wait()
    assert main(args) == 0  # its process is gone: the stale lock is taken over
    assert not lock.exists()


def test_leftovers_of_a_killed_write_are_cleaned_and_not_counted(tmp_path, data_dir):
    """A temporary file from a kill -9 during a checkpoint write is removed on the next run, and a fresh run after
    a kill before the first checkpoint does not keep the killed attempt's metrics rows."""
    run = tmp_path / "again"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train/loss": 9.9}\n')
    train_detector(cfg_for(tmp_path, data_dir, "again", "train.epochs=1", "train.max_steps_per_epoch=1"),
                   progress=False)
    assert not stale.exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["train/loss"] != 9.9
    assert (run / "metrics.csv").read_text().count("\n0,") == 1


def test_an_unwritable_checkpoint_folder_stops_before_any_step(tmp_path, data_dir, monkeypatch):
    from gkd.core.errors import GkdError

    steps = []
    original = DetectionTask.forward
    monkeypatch.setattr(DetectionTask, "forward", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    run = tmp_path / "blocked"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the folder should be")  # unwritable even for root
    with pytest.raises(GkdError, match="checkpoints: the checkpoint folder is a file; expected a folder"):
        train_detector(cfg_for(tmp_path, data_dir, "blocked", "train.epochs=1"), progress=False)
    assert steps == [] and not (run / ".lock").exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_what_to_do(tmp_path, data_dir, capsys):
    (tmp_path / "early" / "checkpoints").mkdir(parents=True)
    args = ["train", "--no-progress", *BASE, f"runs_dir={tmp_path}", "name=early", f"data.root={data_dir}",
            "train.epochs=1", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nothing to resume: no epoch of 'early' finished" in err and "without --resume" in err
