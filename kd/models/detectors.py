"""Build torchvision detectors (Faster R-CNN, RetinaNet) with an FPN on ResNet-18/34/50/101 or MobileNetV3-Large.

Nothing of torchvision is copied or edited: the detectors are torchvision's own classes, assembled from its public
backbone helpers. Labels follow torchvision's convention: 0 is background, dataset classes are 1..K, and
``num_classes`` passed to torchvision is K + 1 for both detector types (RetinaNet's class 0 is simply never positive).

FPN levels (keys of ``model.backbone(x)`` and their strides):

=====================  ================================  ===========================
detector               ResNet backbones                  MobileNetV3-Large
=====================  ================================  ===========================
Faster R-CNN           '0' '1' '2' '3' 'pool': 4..64     '0' '1' 'pool': 32, 32, 64
RetinaNet              '0' '1' '2' 'p6' 'p7': 8..128     '0' '1' 'p6' 'p7': 32, 32, 64, 128
=====================  ================================  ===========================

(torchvision's MobileNetV3 FPN taps two stride-32 layers: fast, but coarse for small objects.) The measured strides
are in ``model.gkd_meta["strides"]``.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from gkd.core.errors import GkdError

from ..config import ModelConfig

__all__ = ["build_detector", "head_parameter_prefixes", "slim_resnet", "stage_widths"]


def _backbone(cfg: ModelConfig, retinanet: bool) -> nn.Module:
    from torchvision.models import mobilenet_v3_large, resnet
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
    from torchvision.ops import misc as misc_ops
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

    if cfg.backbone.startswith("resnet"):
        if not 0 <= cfg.trainable_layers <= 5:
            raise GkdError(f"model.trainable_layers must be in 0..5 for ResNet, got {cfg.trainable_layers}")
        norm = misc_ops.FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d
        if cfg.backbone_width == 1.0:  # torchvision's own constructor: a given seed gives the same weights as ever
            body = getattr(resnet, cfg.backbone)(weights=None, norm_layer=norm)
        else:
            body = slim_resnet(cfg.backbone, cfg.backbone_width, norm)
        c = cfg.fpn_channels
        if retinanet:
            fpn = _resnet_fpn_extractor(body, cfg.trainable_layers, returned_layers=[2, 3, 4],
                                        extra_blocks=LastLevelP6P7(c, c))
        else:
            fpn = _resnet_fpn_extractor(body, cfg.trainable_layers)
        if c != 256:  # torchvision hard-codes 256: swap in the same FPN at the requested width (freezing is kept)
            inner = [block[0].in_channels for block in fpn.fpn.inner_blocks]
            extra = LastLevelP6P7(c, c) if retinanet else LastLevelMaxPool()
            fpn.fpn = FeaturePyramidNetwork(inner, c, extra_blocks=extra)
            fpn.out_channels = c
        return fpn
    if cfg.backbone_width != 1.0:
        raise GkdError(f"model.backbone_width: only ResNet backbones have a width option, got {cfg.backbone_width} "
                       f"for {cfg.backbone}")
    if cfg.fpn_channels != 256:
        raise GkdError(f"model.fpn_channels: MobileNetV3 FPNs are 256 wide in torchvision, got {cfg.fpn_channels}")
    if not 0 <= cfg.trainable_layers <= 6:
        raise GkdError(f"model.trainable_layers must be in 0..6 for MobileNetV3, got {cfg.trainable_layers}")
    # torchvision's own MobileNetV3 BatchNorm settings when it trains
    norm = misc_ops.FrozenBatchNorm2d if cfg.norm == "frozen_bn" else partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    body = mobilenet_v3_large(weights=None, norm_layer=norm)
    if retinanet:
        return _mobilenet_extractor(body, True, cfg.trainable_layers, extra_blocks=LastLevelP6P7(256, 256))
    return _mobilenet_extractor(body, True, cfg.trainable_layers)


_RESNET_LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                  "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def stage_widths(width: float) -> tuple[int, ...]:
    """The four ResNet stage widths (planes) at a width multiplier: torchvision's 64/128/256/512 x ``width``, the
    first rounded to a multiple of 8 (at least 8) and the others doubling from it, so that the stem's width alone
    tells the multiplier back (a plain state dict records nothing else)."""
    base = max(8, int(round(64 * width / 8)) * 8)
    return base, 2 * base, 4 * base, 8 * base


def slim_resnet(name: str, width: float, norm_layer) -> nn.Module:
    """torchvision's ResNet (same blocks, depths, strides and initialisation) with every stage ``width`` x as wide.

    torchvision offers no width multiplier for ResNet-18/34 (``width_per_group`` exists for bottlenecks only), so the
    stem and the four stages are rebuilt here with torchvision's own ``_make_layer``; the classifier is dropped (the
    FPN extractor never uses it). The FPN reads the stage widths from the returned model (``inplanes``).
    """
    from torchvision.models import resnet

    kind, depths = _RESNET_LAYOUT[name]
    block = resnet.BasicBlock if kind == "basic" else resnet.Bottleneck
    planes = stage_widths(width)
    body = resnet.ResNet.__new__(resnet.ResNet)
    nn.Module.__init__(body)
    body._norm_layer, body.dilation, body.groups, body.base_width = norm_layer, 1, 1, 64
    body.inplanes = planes[0]
    body.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = norm_layer(planes[0])
    body.relu = nn.ReLU(inplace=True)
    body.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for i, (p, n) in enumerate(zip(planes, depths)):
        setattr(body, f"layer{i + 1}", body._make_layer(block, p, n, stride=1 if i == 0 else 2))
    body.avgpool, body.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Identity()
    for m in body.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return body


def _anchor_generator(cfg: ModelConfig, n_levels: int, retinanet: bool):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if cfg.anchor_sizes:
        base = tuple(cfg.anchor_sizes)
    else:
        base = (32, 64, 128, 256, 512)  # torchvision's defaults
    if len(base) < n_levels:
        raise GkdError(f"model.anchor_sizes needs at least {n_levels} sizes (one per FPN level), got {list(base)}")
    base = base[-n_levels:] if n_levels < len(base) else base
    if retinanet:  # three octave scales per level, as torchvision's RetinaNet
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base)
    else:
        sizes = tuple((s,) for s in base)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n_levels)


def build_detector(cfg: ModelConfig, num_classes: int | None = None) -> nn.Module:
    """Build a randomly initialised detector.

    Args:
        cfg: the model section of a run config.
        num_classes: number of dataset classes K (background excluded); overrides ``cfg.num_classes``.

    Returns:
        A torchvision ``FasterRCNN`` or ``RetinaNet`` with ``num_classes = K + 1``. Its ``gkd_meta`` attribute holds
        the FPN level names and strides.
    """
    from torchvision.models.detection import FasterRCNN, RetinaNet

    k = num_classes if num_classes is not None else cfg.num_classes
    if k is None or k < 1:
        raise GkdError(f"model.num_classes must be at least 1 (the dataset's class count), got {k}")
    if cfg.min_size < 32 or cfg.max_size < cfg.min_size:
        raise GkdError(f"model.min_size/max_size must satisfy 32 <= min_size <= max_size, "
                       f"got {cfg.min_size}/{cfg.max_size}")
    for key in ("fpn_channels", "box_head_dim"):
        if getattr(cfg, key) < 1:
            raise GkdError(f"model.{key} must be a positive width, got {getattr(cfg, key)}")
    retinanet = cfg.arch == "retinanet"
    backbone = _backbone(cfg, retinanet)
    strides = _level_strides(backbone)
    names = list(strides)
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    anchors = _anchor_generator(cfg, len(names), retinanet)
    if retinanet:
        model = RetinaNet(backbone, k + 1, anchor_generator=anchors, score_thresh=cfg.score_thresh,
                          detections_per_img=cfg.detections_per_img, **common)
    else:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.ops import MultiScaleRoIAlign

        roi_levels = [n for n in names if n != "pool"][:4]
        # torchvision builds a 1024-wide head itself; letting it do so keeps its initialisation order, so a given
        # seed gives the same weights as before the option existed
        heads = {} if cfg.box_head_dim == 1024 else {
            "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, cfg.box_head_dim),
            "box_predictor": FastRCNNPredictor(cfg.box_head_dim, k + 1)}
        model = FasterRCNN(backbone, None if heads else k + 1, rpn_anchor_generator=anchors, **heads,
                           box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2),
                           box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
                           box_batch_size_per_image=cfg.rois_per_image,
                           rpn_pre_nms_top_n_test=cfg.proposals_test, rpn_post_nms_top_n_test=cfg.proposals_test,
                           rpn_pre_nms_top_n_train=cfg.proposals_train,
                           rpn_post_nms_top_n_train=cfg.proposals_train,
                           **common)
        _fix_roi_pool_scales(model.roi_heads.box_roi_pool, [strides[n] for n in roi_levels])
    model.gkd_meta = {"arch": cfg.arch, "backbone": cfg.backbone, "backbone_width": cfg.backbone_width,
                      "num_classes": k, "levels": names, "strides": strides, "channels": backbone.out_channels}
    return model


def _fix_roi_pool_scales(pool: nn.Module, strides: list[int]) -> None:
    """Set MultiScaleRoIAlign's level scales from the measured strides, once, instead of letting it guess them.

    Why: torchvision infers each level's scale at the pooler's first forward as ``feature height / largest image
    height`` rounded to a power of two, and caches it for the model's life. A landscape first image is resized to,
    e.g., 42x64 and padded to 64x64, so level '0' (16 px high) gives 16/42 -> 1/2 instead of 1/4: every RoI is then
    pooled from the wrong place for the rest of the run, in training, evaluation, parity and export alike (the
    exported graph bakes the scales in). Square images (the synthetic data) never showed it; real photos do.
    """
    from torchvision.ops.poolers import _setup_scales

    side = 1024  # any size divisible by the coarsest stride: the scales come out as exactly 1 / stride
    feats = [torch.empty(1, 1, side // s, side // s) for s in strides]
    pool.scales, pool.map_levels = _setup_scales(feats, [(side, side)], pool.canonical_scale, pool.canonical_level)


def _level_strides(backbone: nn.Module) -> dict[str, int]:
    """Measure each FPN level's stride with one dummy forward (the truth, whatever torchvision's layout)."""
    size = 128  # divisible by the coarsest stride (128, RetinaNet's P7)
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        out = backbone(torch.zeros(1, 3, size, size))
        backbone.train(was)
    return OrderedDict((name, size // feat.shape[-1]) for name, feat in out.items())


def head_parameter_prefixes(arch: str) -> tuple[str, ...]:
    """State-dict prefixes whose shapes depend on the class count (for clear mismatch errors)."""
    if arch == "retinanet":
        return ("head.classification_head.cls_logits.",)
    return ("roi_heads.box_predictor.",)
