"""Detector builder: every arch x backbone builds, trains one step, and exposes FPN and head outputs via hooks."""
import pytest
import torch

from gkd.kd.config import ModelConfig
from gkd.kd.models import build_detector
from tests.helpers import OutputRecorder

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


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_narrow_fpn_and_box_head(arch, tmp_path):
    """fpn_channels / box_head_dim reach every level, the heads and a checkpoint round trip; strides unchanged."""
    from gkd.kd.checkpoint import detector_checkpoint, load_detector, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, backbone="resnet18", min_size=64, max_size=64, rois_per_image=16,
                      fpn_channels=64, box_head_dim=128)
    model = build_detector(cfg, 3)
    wide = build_detector(ModelConfig(arch=arch, backbone="resnet18", min_size=64, max_size=64), 3)
    assert model.gkd_meta["channels"] == 64 and wide.gkd_meta["channels"] == 256
    assert model.gkd_meta["strides"] == wide.gkd_meta["strides"]
    with OutputRecorder(model.backbone) as fpn:
        losses = model([torch.rand(3, 64, 64)], TARGET)
    assert all(f.shape[1] == 64 for f in fpn.outputs[-1].values())
    sum(losses.values()).backward()
    if arch == "faster_rcnn":
        assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
        assert model.roi_heads.box_predictor.cls_score.in_features == 128
    # trainable_layers still freezes the stem when the FPN is swapped for a narrower one
    frozen = build_detector(ModelConfig(arch=arch, backbone="resnet18", min_size=64, max_size=64,
                                        fpn_channels=64, trainable_layers=3), 3)
    assert not frozen.backbone.body.conv1.weight.requires_grad
    assert frozen.backbone.body.layer4[0].conv1.weight.requires_grad
    path = tmp_path / "m.pt"
    save_checkpoint(detector_checkpoint(model, cfg, ["a", "b", "c"], [1, 2, 3]), path)
    loaded, _ = load_detector(path)
    model.eval()
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert torch.equal(model.backbone(x[0][None])["0"], loaded.backbone(x[0][None])["0"])


def test_mobilenet_fpn_width_is_fixed():
    from gkd.core.errors import GkdError

    with pytest.raises(GkdError, match="model.fpn_channels"):
        build_detector(ModelConfig(backbone="mobilenet_v3_large", min_size=64, max_size=64, fpn_channels=128), 2)
    for key in ("fpn_channels", "box_head_dim"):
        with pytest.raises(GkdError, match=f"model.{key} must be a positive width, got 0"):
            build_detector(ModelConfig(backbone="resnet18", min_size=64, max_size=64, **{key: 0}), 2)


def test_roi_pooling_scales_do_not_depend_on_the_first_image():
    """torchvision guesses MultiScaleRoIAlign's scales from the first image it sees and keeps them: a landscape
    first image made level '0' 1/2 instead of 1/4 (every RoI pooled from the wrong place). They are set at build."""
    import torch

    from gkd.kd.config import ModelConfig
    from gkd.kd.models.detectors import build_detector

    model = build_detector(ModelConfig(backbone="resnet18", min_size=64, max_size=64, fpn_channels=64,
                                       box_head_dim=64), 2).eval()
    with torch.no_grad():
        model([torch.rand(3, 427, 1280)])  # resized to 21x64, padded to 32x64: torchvision would infer 1/2 ... 1/16
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert (model.roi_heads.box_roi_pool.map_levels.k_min, model.roi_heads.box_roi_pool.map_levels.k_max) == (2, 5)


def test_backbone_width_scales_every_resnet_stage_and_keeps_torchvision_layout(tmp_path):
    """backbone_width=0.5 halves every stage (32/64/128/256) and the FPN reads those widths; at 1.0 the rebuilt
    ResNet has exactly torchvision's parameter names and shapes (so the slim one is torchvision's, only narrower);
    a checkpoint of a slim model loads back; MobileNetV3 and out-of-range widths are refused by name."""
    from torchvision.models import resnet18, resnet50

    from gkd.core.config import from_dict
    from gkd.core.errors import GkdError
    from gkd.kd.checkpoint import detector_checkpoint, load_detector, save_checkpoint
    from gkd.kd.models.detectors import slim_resnet, stage_widths

    for name, ref in (("resnet18", resnet18), ("resnet50", resnet50)):
        theirs = {k: v.shape for k, v in ref(weights=None).state_dict().items() if not k.startswith("fc.")}
        ours = {k: v.shape for k, v in slim_resnet(name, 1.0, torch.nn.BatchNorm2d).state_dict().items()}
        assert ours == theirs, name
    assert stage_widths(0.5) == (32, 64, 128, 256) and stage_widths(0.3) == (16, 32, 64, 128)
    cfg = ModelConfig(backbone="resnet18", backbone_width=0.5, min_size=64, max_size=64, rois_per_image=16,
                      fpn_channels=64, box_head_dim=128)
    torch.manual_seed(0)
    slim = build_detector(cfg, 3)
    full = build_detector(ModelConfig(backbone="resnet18", min_size=64, max_size=64, fpn_channels=64), 3)
    assert [b[0].in_channels for b in slim.backbone.fpn.inner_blocks] == [32, 64, 128, 256]
    assert slim.gkd_meta["strides"] == full.gkd_meta["strides"] and slim.gkd_meta["backbone_width"] == 0.5
    body = sum(p.numel() for p in slim.backbone.body.parameters())
    assert body < 0.3 * sum(p.numel() for p in full.backbone.body.parameters())  # ~1/4 of the weights
    losses = slim([torch.rand(3, 64, 64)], TARGET)
    sum(losses.values()).backward()
    path = tmp_path / "slim.pt"
    save_checkpoint(detector_checkpoint(slim, cfg, ["a", "b", "c"], [1, 2, 3]), path)
    loaded, _ = load_detector(path)
    assert loaded.gkd_meta["backbone_width"] == 0.5
    with pytest.raises(GkdError, match="model.backbone_width: only ResNet backbones"):
        build_detector(ModelConfig(backbone="mobilenet_v3_large", backbone_width=0.5, min_size=64, max_size=64), 2)
    with pytest.raises(GkdError, match="backbone_width"):
        from_dict(ModelConfig, {"backbone_width": 0}, "model")
