"""Detector builder: every arch x backbone builds, trains one step, and exposes FPN and head outputs via hooks."""
import pytest
import torch

from kd.config import ModelConfig
from kd.models import OutputRecorder, build_detector

TARGET = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "mobilenet_v3_large"])
def test_build_train_and_record(arch, backbone):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, backbone=backbone, min_size=64, max_size=64, rois_per_image=16)
    model = build_detector(cfg, 3)
    strides = model.gkd_meta["strides"]
    head = model.roi_heads.box_predictor if arch == "faster_rcnn" else model.head.classification_head
    with OutputRecorder(model.backbone) as fpn, OutputRecorder(head) as logits:
        losses = model([torch.rand(3, 64, 64)], TARGET)
    assert all(torch.isfinite(v) for v in losses.values())
    feats = fpn.outputs[-1]
    assert list(feats) == model.gkd_meta["levels"]
    for name, f in feats.items():
        assert f.shape[:2] == (1, 256) and f.requires_grad
        assert 64 // strides[name] == f.shape[-1] or 64 // strides[name] == 0
    out = logits.outputs[-1]
    k = out[0].shape[-1] if arch == "faster_rcnn" else out.shape[-1]  # RetinaNet: [B, anchors, K + 1]
    assert k == 4  # 3 classes + background
    # the hook is gone after the block
    model([torch.rand(3, 64, 64)], TARGET)
    assert len(fpn.outputs) == 1


def test_resnet50_and_101_strides_and_class_count():
    for bb in ("resnet50", "resnet101"):
        m = build_detector(ModelConfig(backbone=bb, min_size=64, max_size=64), 7)
        assert dict(m.gkd_meta["strides"]) == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
        assert m.roi_heads.box_predictor.cls_score.out_features == 8


def test_mobilenet_fpn_has_two_stride_32_levels():
    m = build_detector(ModelConfig(backbone="mobilenet_v3_large", min_size=64, max_size=64), 2)
    assert dict(m.gkd_meta["strides"]) == {"0": 32, "1": 32, "pool": 64}
