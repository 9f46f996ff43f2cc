"""DistillationTask on tiny detectors: gradients, alignment of instances / logits / weights, state, bad input."""
import copy
import dataclasses

import pytest
import torch

import gkd.kd.distill.task as task_mod
from gkd.core.errors import GkdError
from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
from gkd.kd.config import ModelConfig
from gkd.kd.distill.config import DistillConfig, PGMConfig, TeacherConfig
from gkd.kd.distill.ops import prototype_project
from gkd.kd.distill.robust import robust_weights
from gkd.kd.distill.run import load_teacher
from gkd.kd.distill.task import DistillationTask
from gkd.kd.models.detectors import build_detector
from tests.helpers import TEST_THREADS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine, OpenMP with 2 threads under load is several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)

CLASSES = ["a", "b", "c"]


def model_cfg(arch="faster_rcnn", backbone="resnet18"):
    return ModelConfig(arch=arch, backbone=backbone, min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128),
                       rois_per_image=64)


def tiny_data(n=4):
    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(n):
        boxes = torch.tensor([[2, 2, 30, 30.0], [30, 20, 62, 55], [4, 36, 26, 60]])[: 2 + i % 2]
        labels = torch.tensor([1, 2, 3])[: 2 + i % 2]
        data.append((torch.rand(3, 64, 64, generator=g), {"boxes": boxes, "labels": labels}))
    return data


def make_task(arch="faster_rcnn", method="gkd", teacher=None, student_backbone="resnet18", seed=0):
    torch.manual_seed(seed)
    student = build_detector(model_cfg(arch, student_backbone), 3)
    if teacher is None:
        teacher = build_detector(model_cfg(arch), 3)
    data = tiny_data()
    cfg = DistillConfig(method=method, pgm=PGMConfig(num_prototypes=2, min_box_size=10, batch_size=4))
    task = DistillationTask(student, teacher, cfg, epochs=4, classes=CLASSES,
                            pgm_annotations=[(t["boxes"], t["labels"]) for _, t in data],
                            pgm_load=lambda i: data[i], seed=0)
    task.on_epoch_start(0, {"device": torch.device("cpu")})
    task.train()
    return task, data


def batch(data, idx=(0, 1)):
    return [data[i][0] for i in idx], [data[i][1] for i in idx]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_gradients_reach_student_and_adapters_never_teacher(arch):
    task, data = make_task(arch)
    out = task(*batch(data))
    for key in ("loss_kd_fg", "loss_kd_bg", "loss_kd_soft", "loss_kd_global"):
        assert key in out and torch.isfinite(out[key])
    assert out["loss"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k.startswith("loss_")))
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.adapters.parameters())
    assert task.detector.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert not task.teacher.training and task.detector.training
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in task.teacher.parameters()}


def test_global_loss_alone_moves_student_features_not_adapters():
    task, data = make_task(method="pkd+global")
    out = task(*batch(data))
    assert set(k for k in out if k.startswith("loss_kd")) == {"loss_kd_global", "loss_kd_pkd"}
    grads = torch.autograd.grad(out["loss_kd_global"], task.detector.backbone.fpn.layer_blocks[0][0].weight)
    assert grads[0].abs().sum() > 0
    assert task.adapters is None


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_teacher_logits_aligned_with_student_instances(arch):
    # teacher = exact copy of the student: at the same RoIs / anchors their logits must be identical
    torch.manual_seed(0)
    student = build_detector(model_cfg(arch), 3)
    task, data = make_task(arch, method="local", teacher=copy.deepcopy(student))
    task.detector.load_state_dict(student.state_dict())
    seen = {}
    real = task_mod.soft_label_kl
    task_mod.soft_label_kl = lambda zs, zt, w, t: seen.update(zs=zs, zt=zt) or real(zs, zt, w, t)
    for m in task.detector.modules():  # BatchNorm on running statistics, as the teacher's (eval mode)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        out = task(*batch(data))
    finally:
        task_mod.soft_label_kl = real
    assert seen["zs"].shape[0] > 0
    torch.testing.assert_close(seen["zs"], seen["zt"], rtol=1e-4, atol=1e-4)
    assert out["loss_kd_soft"].item() == pytest.approx(0.0, abs=1e-6)


def test_retinanet_soft_weights_aligned_with_logits_in_a_batch():
    """Batch of 2: each positive anchor's soft-label weight is the robust weight of that anchor's own box."""
    from torchvision.ops import box_iou

    task, data = make_task("retinanet", method="robust")
    seen = {}
    real = task_mod.soft_label_kl
    task_mod.soft_label_kl = lambda zs, zt, w, t: seen.update(zs=zs, w=w) or real(zs, zt, w, t)
    try:
        task(*batch(data, (1, 2)))
    finally:
        task_mod.soft_label_kl = real
    # recompute independently: transform, matching, anchor levels, robust weights box by box
    s, t = task.detector, task.teacher
    with torch.no_grad():
        x, tg = s.transform(*batch(data, (1, 2)))
        fs, ft = s.backbone(x.tensors), t.backbone(x.tensors)
        flist = list(fs.values())
        anchors = s.anchor_generator(x, flist)
        head = s.head(flist)
        a = s.anchor_generator.num_anchors_per_location()[0]
        counts = torch.tensor([f.shape[-1] * f.shape[-2] * a for f in flist])
        ends = counts.cumsum(0)
        rows, weights = [], []
        for i in range(2):
            m = s.proposal_matcher(box_iou(tg[i]["boxes"], anchors[i]))
            for j in (m >= 0).nonzero().squeeze(1).tolist():
                lvl = int((ends <= j).sum())
                key = f"s{s.gkd_meta['strides'][list(fs)[lvl]]}"
                box = torch.cat([torch.tensor([float(i)]), anchors[i][j]]).view(1, 5)
                name_t = [p.teacher for p in task.pairs if p.key == key][0]
                _, cs = prototype_project(fs[list(fs)[lvl]], box, int(key[1:]), task.bank.student[key])
                _, ct = prototype_project(ft[name_t], box, int(key[1:]), task.bank.teacher[key])
                w, _ = robust_weights(cs, ct, tg[i]["labels"][m[j]].view(1), task.bank.labels[key])
                weights.append(float(w))
                rows.append(head["cls_logits"][i, j, 1:])
    assert len(weights) == seen["w"].numel() > 2
    torch.testing.assert_close(seen["w"], torch.tensor(weights), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["zs"].detach(), torch.stack(rows), rtol=1e-5, atol=1e-5)
    assert len(set(round(w, 6) for w in weights)) > 1  # the check would be vacuous if all weights were equal


def test_none_is_the_detectors_own_training_step():
    torch.manual_seed(0)
    student = build_detector(model_cfg(), 3)
    twin = copy.deepcopy(student)
    task = DistillationTask(student, None, DistillConfig(method="none"), epochs=1, classes=CLASSES)
    data = tiny_data()
    torch.manual_seed(1)
    out = task(*batch(data))
    torch.manual_seed(1)
    ref = twin(*batch(data))
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in ref.values()), rel=1e-6)
    assert task.extra_state() == {"method": "none"}


def test_extra_state_round_trip_gives_the_same_losses():
    task, data = make_task(method="gkd")
    state = task.extra_state()
    assert set(state) == {"method", "adapters", "prototypes", "steps_done"}
    other, _ = make_task(method="gkd", seed=1)  # different adapters and prototypes
    other.detector.load_state_dict(task.detector.state_dict())
    other.teacher.load_state_dict(task.teacher.state_dict())
    other.load_extra_state(state)
    torch.manual_seed(5)
    a = task(*batch(data))
    torch.manual_seed(5)
    b = other(*batch(data))
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5, abs=1e-7), k
    with pytest.raises(GkdError, match="distill.method"):
        other.load_extra_state({**state, "method": "robust"})


def test_attenuation_and_refresh_interval():
    task, data = make_task()
    assert task.attenuation() == 1.0
    m = task.on_epoch_start(1, {"device": torch.device("cpu")})
    assert m["kd_attenuation"] == pytest.approx(0.75) and m["pgm_refreshed"] == 1.0
    task.cfg = dataclasses.replace(task.cfg, pgm=dataclasses.replace(task.cfg.pgm, interval=2))
    assert task.on_epoch_start(3, {"device": torch.device("cpu")})["pgm_refreshed"] == 0.0


def test_scale_dependent_defaults_follow_the_input_size():
    from gkd.kd.distill.config import resolve_scale

    coco = resolve_scale(DistillConfig(), 800)
    assert coco.level_canonical_size == 56.0 and coco.pgm.min_box_size == 30.0  # the reference's constants
    small = resolve_scale(DistillConfig(), 160)
    assert small.level_canonical_size == pytest.approx(11.2) and small.pgm.min_box_size == pytest.approx(6.0)
    kept = resolve_scale(DistillConfig(level_canonical_size=40.0, pgm=PGMConfig(min_box_size=16)), 160)
    assert kept.level_canonical_size == 40.0 and kept.pgm.min_box_size == 16
    task, _ = make_task()  # the task resolves them from its student's transform (64 px)
    assert task.cfg.level_canonical_size == pytest.approx(56 * 64 / 800)


def test_per_level_and_per_class_weight_sums_add_up():
    task, data = make_task()
    out = task(*batch(data))
    keys = [p.key for p in task.pairs]
    assert sum(out[f"kd_instances_{k}"].item() for k in keys) == out["kd_instances"].item() > 0
    by_level = sum(out[f"kd_rw_sum_{k}"].item() for k in keys)
    by_class = sum(out[f"kd_rw_sum_c{c}"].item() for c in (1, 2, 3))
    assert by_level == pytest.approx(by_class) and 0 < by_level <= out["kd_instances"].item()
    assert sum(out[f"kd_rw_n_c{c}"].item() for c in (1, 2, 3)) == out["kd_instances"].item()
    # a coarser canonical size moves instances to finer levels
    task.cfg = dataclasses.replace(task.cfg, level_canonical_size=1000.0)
    fine = task(*batch(data))
    assert fine[f"kd_instances_{keys[0]}"].item() == fine["kd_instances"].item()


def test_global_discrepancy_is_monitored_without_changing_local():
    task, data = make_task(method="local")
    plain = copy.deepcopy(task)
    task.cfg = dataclasses.replace(task.cfg, monitor_global=True)
    task.uses_bank = True
    task.pgm = task_mod.PrototypeGenerator(task.cfg.pgm, task.pairs, CLASSES, [(t["boxes"], t["labels"])
                                           for _, t in data], lambda i: data[i], 0)
    task.on_epoch_start(0, {"device": torch.device("cpu")})
    task.train()
    torch.manual_seed(2)
    a = task(*batch(data))
    torch.manual_seed(2)
    b = plain(*batch(data))
    assert "loss_kd_global" not in a and a["kd_global_discrepancy"].item() > 0
    assert not a["kd_global_discrepancy"].requires_grad
    for k in ("loss_kd_fg", "loss_kd_bg", "loss_kd_soft", "loss"):  # the weights are measured, not applied
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6), k
    g, _ = make_task(method="gkd")
    out = g(*batch(data))
    assert out["kd_global_discrepancy"].item() > 0


def test_refresh_every_n_steps_and_resume_on_the_same_schedule():
    task, data = make_task()
    task.cfg = dataclasses.replace(task.cfg, pgm=dataclasses.replace(task.cfg.pgm, interval_steps=2))
    refreshed = [task(*batch(data))["pgm_refreshed"].item() for _ in range(5)]
    assert refreshed == [0.0, 0.0, 1.0, 0.0, 1.0] and task.steps_done == 5 and task.detector.training
    assert task.on_epoch_start(1, {"device": torch.device("cpu")})["pgm_refreshed"] == 0.0  # steps decide now
    state = task.extra_state()
    other, _ = make_task(seed=1)
    other.cfg = task.cfg
    other.load_extra_state(state)
    assert other.steps_done == 5
    assert [other(*batch(data))["pgm_refreshed"].item() for _ in range(2)] == [0.0, 1.0]


def test_batch_statistics_leave_running_statistics_untouched():
    from gkd.kd.distill.pgm import batch_statistics

    model = build_detector(model_cfg(), 3).backbone.eval()
    x = torch.rand(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eval_out = model(x)["0"]
    with batch_statistics(model):
        batch_out = model(x)["0"]
    assert not torch.allclose(eval_out, batch_out)  # a fresh model's running statistics are not the batch's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_incompatible_teacher_is_a_clear_error():
    student = build_detector(model_cfg(), 3)
    with pytest.raises(GkdError, match="share the label space"):
        DistillationTask(student, build_detector(model_cfg(), 4), DistillConfig(method="local"), epochs=1,
                         classes=CLASSES)
    with pytest.raises(GkdError, match="same detector kind"):
        DistillationTask(student, build_detector(model_cfg("retinanet"), 3), DistillConfig(method="local"),
                         epochs=1, classes=CLASSES)
    with pytest.raises(GkdError, match="needs a teacher"):
        DistillationTask(student, None, DistillConfig(method="pkd"), epochs=1, classes=CLASSES)


def test_load_teacher_checks_architecture_and_classes(tmp_path):
    cfg = model_cfg()
    teacher = build_detector(cfg, 3)
    path = tmp_path / "teacher.pt"
    save_checkpoint(detector_checkpoint(teacher, cfg, CLASSES, [1, 2, 3]), path)
    loaded = load_teacher(TeacherConfig(checkpoint=str(path), arch="faster_rcnn", backbone="resnet18"), CLASSES, cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    with pytest.raises(GkdError, match=r"is a faster_rcnn/resnet18 model, but distill.teacher.backbone declares"):
        load_teacher(TeacherConfig(checkpoint=str(path), backbone="resnet50"), CLASSES, cfg)
    with pytest.raises(GkdError, match="share the label space"):
        load_teacher(TeacherConfig(checkpoint=str(path)), ["a", "b", "x"], cfg)
    # a plain state dict: the declared architecture is required, and checked against the weights
    plain = tmp_path / "plain.pt"
    torch.save(teacher.state_dict(), plain)
    with pytest.raises(GkdError, match="distill.teacher.arch and distill.teacher.backbone"):
        load_teacher(TeacherConfig(checkpoint=str(plain)), CLASSES, cfg)
    with pytest.raises(GkdError, match=r"distill.teacher \(faster_rcnn/resnet50\)"):
        load_teacher(TeacherConfig(checkpoint=str(plain), arch="faster_rcnn", backbone="resnet50"), CLASSES, cfg)
    with pytest.raises(GkdError, match="class count differs"):
        load_teacher(TeacherConfig(checkpoint=str(plain), arch="faster_rcnn", backbone="resnet18"), ["a", "b"], cfg)
    assert load_teacher(TeacherConfig(checkpoint=str(plain), arch="faster_rcnn", backbone="resnet18"), CLASSES,
                        cfg).gkd_meta["backbone"] == "resnet18"
    with pytest.raises(GkdError, match="distill.teacher.checkpoint: not set"):
        load_teacher(TeacherConfig(), CLASSES, cfg)


def test_plain_teacher_state_dict_keeps_its_own_backbone_width(tmp_path):
    """A plain state dict records no config: its backbone width is read off the weights, never the student's (a
    half-width student beside a full-width torchvision-style teacher, and the other way round)."""
    slim_cfg = dataclasses.replace(model_cfg(), backbone_width=0.5)
    for teacher_cfg, student_cfg in ((model_cfg(), slim_cfg), (slim_cfg, model_cfg())):
        teacher = build_detector(teacher_cfg, 3)
        plain = tmp_path / "plain.pt"
        torch.save(teacher.state_dict(), plain)
        loaded = load_teacher(TeacherConfig(checkpoint=str(plain), arch="faster_rcnn", backbone="resnet18"),
                              CLASSES, student_cfg)
        assert loaded.gkd_meta["backbone_width"] == teacher_cfg.backbone_width
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))


def test_narrow_student_fpn_is_adapted_to_the_teacher_width():
    """A 64-wide student FPN against a 128-wide teacher: the adapters map 64 -> 128; PKD (no adapter) refuses."""
    student = build_detector(dataclasses.replace(model_cfg(), fpn_channels=64, box_head_dim=128), 3)
    teacher = build_detector(dataclasses.replace(model_cfg(), fpn_channels=128), 3)
    task, data = make_task(method="gkd", teacher=teacher)
    task = DistillationTask(student, teacher, task.cfg, epochs=4, classes=CLASSES,
                            pgm_annotations=[(t["boxes"], t["labels"]) for _, t in data],
                            pgm_load=lambda i: data[i], seed=0)
    task.on_epoch_start(0, {"device": torch.device("cpu")})
    task.train()
    conv = next(iter(task.adapters.convs.values()))
    assert (conv.in_channels, conv.out_channels) == (64, 128)
    out = task(*batch(data))
    assert torch.isfinite(out["loss"]) and out["loss_kd_global"] > 0
    out["loss"].backward()
    with pytest.raises(GkdError, match="fpn_channels must match"):
        DistillationTask(student, teacher, DistillConfig(method="pkd"), epochs=1, classes=CLASSES)


@pytest.mark.parametrize("method", ["robust", "gkd"])
def test_half_precision_robust_weights_mix_with_float32(method, monkeypatch):
    """Under CUDA autocast the prototype cosines, hence the robust weights, come out in float16; writing them into
    the float32 soft-label weights crashed the robust methods on the first GPU run. The CPU op refuses half
    precision, so the half weights are injected here."""
    task, data = make_task(method=method)
    monkeypatch.setattr(task_mod, "robust_weights", lambda *a: tuple(
        t.half() if t.is_floating_point() else t for t in robust_weights(*a)))
    out = task(*batch(data))
    assert torch.isfinite(out["loss"]) and out["robust_weight_mean"] > 0
