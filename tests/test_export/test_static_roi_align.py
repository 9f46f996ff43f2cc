"""export/static_roi_align.py against torchvision's MultiScaleRoIAlign / roi_align (CPU kernel), in eager PyTorch and
exported to ONNX.

Tolerance: max abs error <= 1e-5 in float32 against torchvision, on N(0, 1) features (``TOL``); the formulation
computes the sample points, taps and weights with torchvision's own expressions, so the measured errors are a few
1e-7 (float summation order only). Level assignment is compared exactly (integers).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from gkd.export.static_roi_align import (FORBIDDEN_OPS, StaticMultiScaleRoIAlign, infer_scales, multiscale_roi_align,
                                         roi_levels)

TOL = 1e-5
STRIDES = (4, 8, 16, 32)
NAMES = ["0", "1", "2", "3"]
#: sqrt(area) ranges (input pixels) that torchvision's LevelMapper (224, level 4, k_min 2, k_max 5) sends to each
#: pooled level: < 112, [112, 224), [224, 448), >= 448; kept away from the edges so the case is unambiguous
LEVEL_SIDES = ((2.0, 100.0), (120.0, 210.0), (235.0, 430.0), (470.0, 900.0))


def _features(b: int, h: int, w: int, c: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """FPN-like levels of an ``h x w`` input: ceil(h / stride) x ceil(w / stride), N(0, 1) values."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES]


def _xyxy(cx, cy, bw, bh) -> torch.Tensor:
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)


def _boxes(kind: str, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` boxes of one kind, in input pixels."""
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    if kind == "random":  # proposals: inside the image, sides log-uniform 2 px .. the image
        side = torch.exp(math.log(2.0) + u(n, 2) * math.log(max(h, w) / 2.0))
        return _xyxy(u(n) * w, u(n) * h, side[:, 0], side[:, 1]).clamp(min=0).minimum(torch.tensor([w, h, w, h]))
    if kind == "levels":  # n // 4 boxes on each level (the larger ones reach far beyond the image)
        out = []
        for j, (lo, hi) in enumerate(LEVEL_SIDES):
            m = n // 4 + (j < n % 4)
            s = lo + u(m) * (hi - lo)
            aspect = torch.exp((u(m) - 0.5) * math.log(4.0))  # 1:2 .. 2:1
            out.append(_xyxy(u(m) * w, u(m) * h, s * aspect.sqrt(), s / aspect.sqrt()))
        return torch.cat(out)
    if kind == "borders":  # at, across and beyond every border, up to fully outside the image
        x1 = torch.cat([torch.zeros(4), -u(4) * 40, w - u(4) * 30, w + 8 + u(4) * 20])
        y1 = torch.cat([-u(4) * 40, torch.zeros(4), -30 - u(4) * 20, h - u(4) * 30])
        x2 = torch.cat([torch.full((4,), float(w)), w + u(4) * 40, torch.full((4,), w + 40.0), w + 30 + u(4) * 20])
        y2 = torch.cat([h + u(4) * 40, torch.full((4,), float(h)), -u(4) * 3, torch.full((4,), h + 25.0)])
        b = torch.stack([x1, y1, x2, y2], dim=-1)
        b = torch.cat([b, torch.tensor([[0.0, 0.0, w, h], [-1.0, -1.0, w + 1.0, h + 1.0]])])
        return b[torch.arange(n) % len(b)]
    if kind == "tiny":  # under one input pixel, down to zero width and height, anywhere incl. on the borders
        side = u(n, 2) * 0.9
        side[: n // 4] = 0.0
        cx, cy = u(n) * (w + 2) - 1, u(n) * (h + 2) - 1
        cx[n // 4: n // 2] = float(w)
        return _xyxy(cx, cy, side[:, 0], side[:, 1])
    raise ValueError(kind)


def _batch_boxes(kinds, b: int, r: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    per_kind = [_boxes(k, b * r, h, w, g) for k in kinds]
    mixed = torch.cat(per_kind)[torch.randperm(b * r * len(kinds), generator=g)[: b * r]]
    return mixed.reshape(b, r, 4)


def _torchvision(features, boxes, image_shapes, scales=None) -> torch.Tensor:
    pool = MultiScaleRoIAlign(NAMES, output_size=7, sampling_ratio=2)
    if scales is not None:
        from torchvision.ops.poolers import _setup_scales

        side = 1024
        pool.scales, pool.map_levels = _setup_scales([torch.empty(1, 1, int(side * s), int(side * s))
                                                      for s in scales],
                                                     [(side, side)], 224, 4)
    return pool(OrderedDict(zip(NAMES, features)), list(boxes), image_shapes)


def _torchvision_levels(boxes: torch.Tensor) -> torch.Tensor:
    return LevelMapper(2, 5)([boxes.reshape(-1, 4)])


CASES = {
    # name: (B, image H, W, per-image (H, W) or None for all equal, box kinds)
    "b1_square_random": (1, 160, 160, None, ("random",)),
    "b1_every_level": (1, 160, 160, None, ("levels",)),
    "b2_nonsquare_borders": (2, 150, 203, [(150, 203), (121, 190)], ("borders", "random")),
    "b3_odd_tiny": (3, 97, 70, None, ("tiny", "random")),
    "b2_odd_everything": (2, 75, 131, [(60, 131), (75, 100)], ("levels", "borders", "tiny", "random")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torchvision(case):
    """Random features and boxes of each kind; every level hit where the case says so; B = 1 and B > 1; non-square
    sizes that are not multiples of the strides; scales inferred from the sizes as torchvision infers them."""
    b, h, w, shapes, kinds = CASES[case]
    r = 48
    seed = list(CASES).index(case)
    feats = _features(b, h, w, seed=seed)
    boxes = _batch_boxes(kinds, b, r, h, w, seed=100 + seed)
    shapes = shapes or [(h, w)] * b
    ref = _torchvision(feats, boxes, shapes)
    pool = StaticMultiScaleRoIAlign(NAMES, 7, 2)
    out = pool(OrderedDict(zip(NAMES, feats)), boxes, shapes)
    assert out.shape == (b * r, 8, 7, 7) == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= TOL, f"{case}: max abs error {err:.2e}"
    # the list-of-tensors form (torchvision's own argument) gives the same
    assert torch.equal(pool(OrderedDict(zip(NAMES, feats)), list(boxes), shapes), out)
    if "levels" in kinds:  # by construction, RoIs on all four levels
        assert set(_torchvision_levels(boxes).tolist()) == {0, 1, 2, 3}
    if "borders" in kinds:  # some RoIs are entirely beyond the map (their samples past -1 / H count as zeros)
        assert (ref.flatten(1).abs().amax(1) == 0).any() and (out.flatten(1).abs().amax(1) == 0).any()


def test_every_level_and_edge_case_in_one_batch_against_roi_align():
    """Each RoI against torchvision.ops.roi_align on the level torchvision's LevelMapper picks: the per-level
    reference, independent of MultiScaleRoIAlign's merge."""
    b, h, w = 2, 130, 170
    feats = _features(b, h, w, c=5, seed=3)
    boxes = _batch_boxes(("levels", "borders", "tiny"), b, 40, h, w, seed=4)
    out = multiscale_roi_align(feats, boxes, (h, w))
    levels = _torchvision_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    rois = torch.cat([torch.arange(b).repeat_interleave(40)[:, None].float(), boxes.reshape(-1, 4)], dim=1)
    for lv, s in enumerate(STRIDES):
        sel = levels == lv
        ref = roi_align(feats[lv], rois[sel], output_size=7, spatial_scale=1 / s, sampling_ratio=2, aligned=False)
        assert (out[sel] - ref).abs().max().item() <= TOL


def test_level_assignment_is_torchvisions_exactly():
    """Integers, compared exactly, including sides exactly on the level boundaries (112, 224, 448) and below 1 px."""
    sides = torch.tensor([0.0, 0.3, 1.0, 111.99, 112.0, 112.01, 223.99, 224.0, 448.0, 449.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=-1)
    g = torch.Generator().manual_seed(5)
    boxes = torch.cat([boxes, _boxes("levels", 200, 160, 160, g), _boxes("tiny", 50, 160, 160, g)])
    assert torch.equal(roi_levels(boxes, 2, 5), _torchvision_levels(boxes))


def test_scale_inference_and_fixed_scales():
    """Scales inferred from the height as torchvision does; a pooler whose scales were fixed (as gkd's detectors fix
    them) is reproduced by from_torchvision, even for an input torchvision's guess would get wrong."""
    assert infer_scales([(40, 40), (20, 20), (10, 10), (5, 5)], (160, 160)) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert infer_scales([(25, 18), (13, 9), (7, 5), (4, 3)], (97, 70)) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    # a landscape input resized to 21 x 64 and padded to 32 x 64: 8 px high at stride 4, which a guess from the
    # 21 px height would call 1/2
    feats = _features(1, 32, 64, seed=6)
    boxes = _batch_boxes(("random",), 1, 30, 21, 64, seed=7)
    tv = MultiScaleRoIAlign(NAMES, output_size=7, sampling_ratio=2)
    tv(OrderedDict(zip(NAMES, _features(1, 64, 64))), [boxes[0]], [(64, 64)])  # fixes tv's scales from a square input
    assert tv.scales == scales
    ref = tv(OrderedDict(zip(NAMES, feats)), [boxes[0]], [(21, 64)])
    ours = StaticMultiScaleRoIAlign.from_torchvision(tv)
    assert ours.scales == scales
    out = ours(OrderedDict(zip(NAMES, feats)), boxes, [(21, 64)])
    assert (out - ref).abs().max().item() <= TOL


def test_inverted_box_is_pooled_from_the_finest_level():
    """x2 < x1 is outside torchvision's contract (its level is NaN there); here it is pooled from level 0, with
    roi_align's 1-pixel minimum size, instead of an undefined table row."""
    feats = _features(1, 64, 64, seed=9)
    boxes = torch.tensor([[[30.0, 20.0, 10.0, 40.0], [5.0, 50.0, 60.0, 2.0]]])
    out = multiscale_roi_align(feats, boxes, (64, 64))
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], dim=1)
    ref = roi_align(feats[0], rois, output_size=7, spatial_scale=1 / 4, sampling_ratio=2, aligned=False)
    assert (out - ref).abs().max().item() <= TOL


def test_refuses_what_a_static_graph_cannot_do():
    feats = _features(2, 64, 64)
    with pytest.raises(ValueError, match="same number of boxes"):
        StaticMultiScaleRoIAlign(NAMES)(OrderedDict(zip(NAMES, feats)), [torch.zeros(3, 4), torch.zeros(2, 4)],
                                        [(64, 64)] * 2)
    with pytest.raises(ValueError, match="sampling_ratio"):
        multiscale_roi_align(feats, torch.zeros(2, 3, 4), (64, 64), sampling_ratio=0)
    with pytest.raises(ValueError, match="consecutive"):
        multiscale_roi_align(feats[::2], torch.zeros(2, 3, 4), (64, 64))


# ---------------------------------------------------------------------------------------------------------------
# exported to ONNX


class _Pooler(torch.nn.Module):
    """The pooler with four named feature inputs and ``[B, R, 4]`` boxes; scales fixed, as gkd's detectors have."""

    def __init__(self):
        super().__init__()
        self.pool = StaticMultiScaleRoIAlign(NAMES, 7, 2, scales=[1 / s for s in STRIDES])

    def forward(self, f0, f1, f2, f3, boxes):
        return self.pool(OrderedDict(zip(NAMES, (f0, f1, f2, f3))), boxes, None)


INPUTS = ["f0", "f1", "f2", "f3", "boxes"]
B_EXPORT, R_EXPORT, C_EXPORT = 2, 40, 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The pooler exported with the legacy exporter, opset 17, dynamic H/W of every level (traced at 64 x 96)."""
    onnx = pytest.importorskip("onnx")
    path = tmp_path_factory.mktemp("static_roi_align") / "pool.onnx"
    feats = _features(B_EXPORT, 64, 96, c=C_EXPORT)
    boxes = _batch_boxes(("random",), B_EXPORT, R_EXPORT, 64, 96, seed=8)
    dynamic = {f"f{i}": {2: f"h{i}", 3: f"w{i}"} for i in range(4)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation warning
        torch.onnx.export(_Pooler().eval(), (*feats, boxes), str(path), dynamo=False, opset_version=17,
                          input_names=INPUTS, output_names=["pooled"], dynamic_axes=dynamic)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def test_onnx_graph_uses_no_forbidden_op(exported):
    import onnx

    model = onnx.load(str(exported))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & FORBIDDEN_OPS, sorted(ops & FORBIDDEN_OPS)
    assert not ops & {"NonZero", "RoiAlign", "ScatterND", "ScatterElements", "NonMaxSuppression", "Loop", "If"}
    assert {"Gather", "MatMul"} <= ops
    assert {d.domain for d in model.opset_import} <= {"", "ai.onnx"} and model.opset_import[0].version == 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param  # H and W stayed dynamic


@pytest.mark.parametrize("size", [(160, 160), (150, 203), (97, 70)])
def test_onnxruntime_matches_torch_and_torchvision(exported, size):
    """At input sizes other than the traced one (the level sizes and offsets come from the graph's shapes)."""
    ort = pytest.importorskip("onnxruntime")
    h, w = size
    feats = _features(B_EXPORT, h, w, c=C_EXPORT, seed=h)
    boxes = _batch_boxes(("levels", "borders", "tiny", "random"), B_EXPORT, R_EXPORT, h, w, seed=w)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(exported), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {name: t.numpy() for name, t in zip(INPUTS, (*feats, boxes))})
    with torch.no_grad():
        torch_out = _Pooler()(*feats, boxes)
    ref = _torchvision(feats, boxes, [(h, w)] * B_EXPORT, scales=[1 / s for s in STRIDES])
    assert got.shape == (B_EXPORT * R_EXPORT, C_EXPORT, 7, 7)
    assert abs(got - torch_out.numpy()).max() <= TOL
    assert abs(got - ref.numpy()).max() <= TOL


def test_tensorrt_rtx_parses_and_builds(exported):
    """TensorRT-RTX (builds on the CPU, never runs) accepts every node and builds the dynamic-H/W profile; the check
    runs in a child process (gkd.export.trt_rtx.check_files -> check_file), as gkd export does."""
    pytest.importorskip("tensorrt_rtx", exc_type=ImportError,
                        reason="tensorrt_rtx is not importable (pip install tensorrt-rtx, or the trt-rtx extra)")
    from gkd.export import trt_rtx

    profile = {f"f{i}": {"min": [B_EXPORT, C_EXPORT, 1, 1],
                         "opt": [B_EXPORT, C_EXPORT, 160 // s, 160 // s],
                         "max": [B_EXPORT, C_EXPORT, 1024 // s, 1024 // s]} for i, s in enumerate(STRIDES)}
    (result,) = trt_rtx.check_files({"pool": exported}, profile).values()
    assert "error" not in result, result
    assert result["parsed"] and result["rejected"] == [], result
    assert result["build"]["ok"], result["build"]
