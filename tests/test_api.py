"""The public Python API (gkd.api): each stage from a mapping or a YAML path plus overrides, returning paths and
metrics; the same results as the commands (checked on what does not depend on what the tiny models learn)."""
import json

import pytest

from gkd.api import RunResult, distill, evaluate, export, run, synth, train
from gkd.core.errors import GkdError
from tests.helpers import TEST_THREADS

MODEL = {"backbone": "resnet18", "min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128],
         "rois_per_image": 32, "fpn_channels": 64, "box_head_dim": 128, "proposals_test": 100}
TRAIN = {"epochs": 1, "batch_size": 2, "warmup_iters": 0, "lr": 0.002, "threads": TEST_THREADS,
         "max_steps_per_epoch": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    meta = synth(root / "data", n_images=10, image_size=64)
    assert meta["n_images"] == 10 and (root / "data" / "train.json").is_file()
    return {"runs_dir": str(root / "runs"), "data": {"root": str(root / "data")}, "model": MODEL, "train": TRAIN,
            "eval": {"batch_size": 4}}


def test_train_distill_evaluate_export(world, tmp_path):
    teacher = train(world, {"name": "teacher"})
    assert isinstance(teacher, RunResult) and teacher.checkpoint.is_file() and teacher.best.is_file()
    assert teacher.config.name == "teacher" and "val/bbox_mAP" in teacher.metrics
    student = distill(world, ["name=student", f"distill.teacher.checkpoint={teacher.checkpoint}",
                              "distill.pgm.min_box_size=4", "distill.pgm.num_prototypes=2"])
    assert student.config.distill.method == "gkd" and student.run_dir.name == "student"
    assert any(k.startswith("train/loss_kd") for k in student.metrics)
    metrics = evaluate(student.checkpoint, world["data"]["root"] + "/val.json")
    # the same number the training loop recorded for the same weights
    assert metrics["bbox_mAP"] == pytest.approx(student.metrics["val/bbox_mAP"], abs=1e-9)
    assert (student.run_dir / "eval" / "model" / "metrics.json").is_file()
    manifest = export(student.checkpoint, tmp_path / "exp", val_data=world["data"]["root"] + "/val.json",
                      parity_images=2, static=False)
    assert set(manifest["files"]) == {"fp32"} and (tmp_path / "exp" / "model.fp32.onnx").is_file()
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["checkpoint_sha256"]


def test_a_yaml_path_with_overrides_and_errors_stay_one_line(world, tmp_path):
    from gkd.kd import CONFIG_DIR

    with pytest.raises(GkdError, match=r"unknown key 'train.epochz'; did you mean 'train.epochs'\?"):
        train(CONFIG_DIR / "teacher.yaml", ["train.epochz=1"])
    with pytest.raises(GkdError, match="COCO annotation file not found"):
        train(CONFIG_DIR / "teacher.yaml", {"data": {"root": str(tmp_path / "nothing")}})


def test_run_is_the_pipeline(world, tmp_path):
    manifest = run({"name": "api", "runs_dir": str(tmp_path / "runs"), "data_root": world["data"]["root"],
                    "precisions": [], "teacher": {"model": MODEL, "train": TRAIN},
                    "student": {"model": MODEL, "train": TRAIN, "distill": {"pgm": {"min_box_size": 4}}}})
    assert [o["stage"] for o in manifest["invocation"]] == ["data", "teacher", "distill", "baseline"]
    assert (tmp_path / "runs" / "api" / "report.md").is_file()
