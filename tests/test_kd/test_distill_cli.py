"""`gkd distill` end to end on a tiny synthetic dataset: every menu entry for both detector types, the student-only
checkpoint, resume mid-run, and bad input. Tiny on purpose: 64 px images, 2 steps per epoch."""
import json
import shutil

import pytest
import torch

from gkd.cli import main
from gkd.kd.checkpoint import detector_checkpoint, load_checkpoint, load_detector, save_checkpoint
from gkd.kd.config import ModelConfig
from gkd.kd.data import generate_synthetic, load_coco
from gkd.kd.models.detectors import build_detector
from tests.helpers import TEST_THREADS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine, OpenMP with 2 threads under load is several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)

METHODS = ["none", "local", "robust", "gkd", "pkd", "pkd+global"]
KD_TERMS = {"none": set(), "local": {"loss_kd_fg", "loss_kd_bg", "loss_kd_soft"},
            "robust": {"loss_kd_fg", "loss_kd_bg", "loss_kd_soft"},
            "gkd": {"loss_kd_fg", "loss_kd_bg", "loss_kd_soft", "loss_kd_global"},
            "pkd": {"loss_kd_pkd"}, "pkd+global": {"loss_kd_pkd", "loss_kd_global"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset (8 train + 2 val images of 64 px) and random-init teachers of both kinds, saved as gkd checkpoints."""
    root = tmp_path_factory.mktemp("distill")
    generate_synthetic(root / "data", n_images=10, seed=0, image_size=64, val_fraction=0.2)
    index = load_coco(root / "data" / "train.json")
    teachers = {}
    for arch in ("faster_rcnn", "retinanet"):
        cfg = ModelConfig(arch=arch, backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
        torch.manual_seed(0)
        teachers[arch] = root / f"teacher_{arch}.pt"
        save_checkpoint(detector_checkpoint(build_detector(cfg, len(index.classes)), cfg, index.classes,
                                            index.category_ids), teachers[arch])
    return {"root": root, "data": root / "data", "teachers": teachers, "classes": index.classes,
            "category_ids": index.category_ids}


@pytest.fixture(autouse=True)
def drop_runs_after_test(world):
    """Each test's runs are its own and hold ~450 MB of checkpoints: delete them when the test ends, failed or not,
    so the module's disk footprint is one test's, not twenty's (this module alone once took 6 GB)."""
    yield
    shutil.rmtree(world["root"] / "runs", ignore_errors=True)


def write_config(world, name, arch="faster_rcnn", backbone="resnet18", method="gkd", epochs=1, extra=""):
    text = f"""
name: {name}
runs_dir: {world['root'] / 'runs'}
data: {{root: {world['data']}}}
model: {{arch: {arch}, backbone: {backbone}, min_size: 64, max_size: 64, anchor_sizes: [8, 16, 32, 64, 128],
        rois_per_image: 64}}
train: {{epochs: {epochs}, batch_size: 2, lr: 0.002, warmup_iters: 0, max_steps_per_epoch: 2, threads: {TEST_THREADS},
         grad_clip: 10.0}}
eval: {{batch_size: 2}}
distill:
  method: {method}
  teacher: {{checkpoint: {world['teachers'][arch]}, arch: {arch}, backbone: resnet18}}
  pgm: {{num_prototypes: 3, min_box_size: 8, max_images_per_class: 4, batch_size: 4}}
{extra}"""
    path = world["root"] / f"{name}.yaml"
    path.write_text(text)
    return path


def distill(*args):
    return main(["distill", *map(str, args), "--no-progress"])


def records(world, name):
    return [json.loads(line) for line in (world["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_end_to_end(world, arch, method):
    name = f"{arch}_{method.replace('+', '_')}"
    assert distill(write_config(world, name, arch, method=method)) == 0
    (rec,) = records(world, name)
    terms = {k[len("train/"):] for k in rec if k.startswith("train/loss_kd")}
    assert terms == KD_TERMS[method]
    assert all(torch.isfinite(torch.tensor(rec[f"train/{t}"])) for t in terms)
    assert "val/bbox_mAP" in rec
    if method in ("robust", "gkd", "pkd+global"):
        assert rec["task/pgm_prototypes"] > 0 and rec["task/pgm_time_s"] > 0
        assert 0.0 <= rec["train/robust_weight_mean"] <= 1.0
    # the student-only checkpoint: loads into a bare detector with no key surgery, holds no teacher or adapter
    ckpt_path = world["root"] / "runs" / name / "checkpoints" / "model.pt"
    model, info = load_detector(ckpt_path)
    assert info["classes"] == world["classes"] and model.gkd_meta["arch"] == arch
    keys = load_checkpoint(ckpt_path)["model"].keys()
    assert set(keys) == set(build_detector(info["model_config"]).state_dict().keys())
    assert not any(k.startswith(("teacher", "adapters")) for k in keys)
    last = load_checkpoint(world["root"] / "runs" / name / "checkpoints" / "last.pt")
    assert ("adapters" in last["extra"]) == (method in ("local", "robust", "gkd"))
    assert ("prototypes" in last["extra"]) == (method in ("robust", "gkd", "pkd+global"))


def test_mobilenet_student_distils_common_strides_and_says_which(world):
    cfg = write_config(world, "mbv3", backbone="mobilenet_v3_large")
    assert distill(cfg) == 0
    log = (world["root"] / "runs" / "mbv3" / "log.txt").read_text()
    assert "strides [32, 64]" in log and "student level '1' (stride 32) not distilled" in log
    assert "teacher level '0' (stride 4) not used" in log


def test_resume_mid_run_matches_uninterrupted(world):
    full = write_config(world, "full", epochs=2)
    assert distill(full) == 0
    part = write_config(world, "part", epochs=2)
    assert distill(part, "train.epochs=1") == 0
    assert distill(part, "--resume") == 0
    a = load_checkpoint(world["root"] / "runs" / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(world["root"] / "runs" / "part" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["extra"]["adapters"]:
        assert torch.equal(a["extra"]["adapters"][k], b["extra"]["adapters"][k]), k
    for space in ("student", "teacher", "labels"):
        for k, v in a["extra"]["prototypes"][space].items():
            assert torch.equal(v, b["extra"]["prototypes"][space][k]), (space, k)
    ra, rb = records(world, "full"), records(world, "part")
    assert [r["train/loss"] for r in ra] == [r["train/loss"] for r in rb]


def test_mismatched_classes_and_wrong_declared_architecture(world, capsys):
    bad = world["root"] / "teacher_other_classes.pt"
    cfg = ModelConfig(backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    other = [f"x{i}" for i in range(len(world["classes"]))]
    save_checkpoint(detector_checkpoint(build_detector(cfg, len(other)), cfg, other, world["category_ids"]), bad)
    assert distill(write_config(world, "badcls"), f"distill.teacher.checkpoint={bad}") == 2
    err = capsys.readouterr().err
    assert "share the label space" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert distill(write_config(world, "badarch"), "distill.teacher.backbone=resnet50") == 2
    assert "distill.teacher.backbone declares 'resnet50'" in capsys.readouterr().err
    assert distill(write_config(world, "badmethod"), "distill.method=fgd") == 2
    assert "distill.method" in capsys.readouterr().err


def test_class_without_large_instances_is_warned_and_training_goes_on(world):
    assert distill(write_config(world, "nolarge"), "distill.pgm.min_box_size=1000") == 0
    log = (world["root"] / "runs" / "nolarge" / "log.txt").read_text()
    assert f"class '{world['classes'][0]}' has no box larger than 1000 px" in log
    (rec,) = records(world, "nolarge")
    assert rec["task/pgm_prototypes"] == 0 and rec["train/robust_weight_mean"] == 1.0
    assert rec["train/loss_kd_global"] == 0.0


def test_non_finite_loss_names_term_and_step_after_saving(world, capsys):
    assert distill(write_config(world, "nan"), "distill.bg_weight=.nan") == 2
    err = capsys.readouterr().err
    assert "non-finite loss 'loss_kd_bg'" in err and "at step 0" in err
    saved = list((world["root"] / "runs" / "nan" / "checkpoints").glob("last_good_step0.pt"))
    assert saved and "adapters" in load_checkpoint(saved[0])["extra"]


def test_resume_with_another_teacher_file_is_refused(world, tmp_path, capsys):
    """The teacher is read on the run's behalf: a resumed run checks it is the file it started with (SHA-256)."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(world["teachers"]["faster_rcnn"], teacher)
    cfg = write_config(world, "swap", epochs=2)
    assert distill(cfg, "train.epochs=1", f"distill.teacher.checkpoint={teacher}") == 0
    state = torch.load(teacher, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, teacher)
    capsys.readouterr()
    assert distill(cfg, "--resume", f"distill.teacher.checkpoint={teacher}") == 2
    err = capsys.readouterr().err
    assert "is not the file this run started with" in err and "Traceback" not in err


def test_quantization_aware_student_from_a_trained_one(world, capfd):
    """quant.int8_format: the student starts from model.weights with post-training scales, trains with fake INT8
    against the teacher (QAD; method none is QAT, the same code without the teacher), keeps BatchNorm statistics,
    and its checkpoints carry the learned scales; --resume continues it exactly."""
    method, fmt = "gkd", "tensorrt"
    base = write_config(world, "fp32")
    assert distill(base) == 0
    fp32 = world["root"] / "runs" / "fp32" / "checkpoints" / "model.pt"
    keys = [f"model.weights={fp32}", f"quant.int8_format={fmt}", "quant.calib_images=4",
            f"quant.adapters_from={fp32.parent / 'last.pt'}"]
    cfg = write_config(world, "qat", method=method, epochs=2)
    capfd.readouterr()
    assert distill(cfg, *keys) == 0
    err = capfd.readouterr().err
    assert "adapters initialised from" in err and "quantization-aware: fake INT8 (tensorrt format)" in err
    ckpt = load_checkpoint(world["root"] / "runs" / "qat" / "checkpoints" / "model.pt")
    assert ckpt["fake_quant"]["format"] == fmt
    start = load_checkpoint(fp32)["model"]
    bn = [k for k in start if k.endswith("running_mean")]
    assert bn and all(torch.equal(start[k], ckpt["model"][k]) for k in bn)  # frozen BatchNorm statistics
    scales = ckpt["model"]["gkd_fake_quant.scale"]
    assert scales.numel() == len(ckpt["fake_quant"]["points"]) and bool((scales > 0).all())
    model, _ = load_detector(world["root"] / "runs" / "qat" / "checkpoints" / "model.pt")
    from gkd.kd.fake_quant import fake_quant_state

    assert fake_quant_state(model) is not None and torch.equal(fake_quant_state(model).scale.detach(), scales)
    part = write_config(world, "qat_part", method=method, epochs=2)
    assert distill(part, *keys, "train.epochs=1") == 0
    assert distill(part, *keys, "--resume") == 0
    a = load_checkpoint(world["root"] / "runs" / "qat" / "checkpoints" / "last.pt")
    b = load_checkpoint(world["root"] / "runs" / "qat_part" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
