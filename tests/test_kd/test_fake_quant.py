"""Fake INT8 for quantization-aware training: its arithmetic against onnxruntime's QuantizeLinear/DequantizeLinear,
the BatchNorm-fold equivariance the export relies on, where it quantizes, and what checkpoints keep."""
import numpy as np
import pytest
import torch
from torch import nn

from gkd.core.errors import GkdError
from gkd.kd.checkpoint import detector_checkpoint, load_detector, save_checkpoint
from gkd.kd.config import ModelConfig
from gkd.kd.fake_quant import (QFORMATS, activation_fake_quant, calibrate_fake_quant, fake_quant_disabled,
                               fake_quant_state, freeze_batchnorm, head_output_layers, quantized_layers,
                               resolve_onnx_layer, weight_fake_quant)
from gkd.kd.models.detectors import build_detector


def ort_qdq(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(x))`` run by onnxruntime: the reference the file's arithmetic is."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.asarray(zero_point, dtype), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("fmt,zero_point,dtype", [("tensorrt", 0, np.int8), ("onnxruntime", 37, np.uint8)])
def test_activation_fake_quant_is_onnx_quantize_dequantize(fmt, zero_point, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 7, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([100.0, -100.0, 0.05, 0.15])  # saturation on both sides and half-way points
    scale = 0.1
    ours = activation_fake_quant(x, torch.tensor(scale), torch.tensor(float(zero_point)), QFORMATS[fmt])
    ref = ort_qdq(x.numpy(), scale, zero_point, dtype)
    np.testing.assert_array_equal(ours.detach().numpy(), ref)


def test_scale_learns_and_input_gradient_passes_straight_through():
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    scale = torch.tensor(0.05, requires_grad=True)
    y = activation_fake_quant(x, scale, torch.tensor(0.0), QFORMATS["tensorrt"])
    y.sum().backward()
    assert scale.grad is not None and scale.grad != 0
    inside = x.detach().abs() < 127 * 0.05
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))


def test_weight_quant_is_equivariant_to_a_folded_batchnorm():
    """The export quantizes the BatchNorm-folded weight ``a_c * w_c``; training quantizes ``w_c``. Per-channel
    symmetric max-abs quantization makes them the same: q(a w) = a q(w), for negative factors too."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=g)
    a = torch.randn(16, generator=g) * 2  # some negative
    a[a.abs() < 0.1] = 0.5
    folded = weight_fake_quant(w * a.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded, a.view(-1, 1, 1, 1) * weight_fake_quant(w), rtol=1e-5, atol=1e-6)
    levels = (weight_fake_quant(w) / (w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)).round()
    assert levels.abs().max() <= 127


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128),
                      fpn_channels=32, box_head_dim=64, backbone_width=0.5)
    return build_detector(cfg, 2).eval(), cfg


def images(n=3):
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, 48 + 8 * i, 72, generator=g) for i in range(n)]


def test_calibration_finds_shared_tensors_per_level_calls_and_keeps_heads_float():
    model, _ = tiny("faster_rcnn")
    state = calibrate_fake_quant(model, images(), "tensorrt")
    points = set(state.index)
    assert {("rpn.head.conv.0.0", k) for k in range(5)} <= points  # one scale per FPN level
    assert not any(name in head_output_layers(model) for name, _ in points)
    assert {name for name, _ in points} == set(quantized_layers(model))
    # a block's input feeds its first convolution and its downsample: one tensor, one scale
    shared = state.index[("backbone.body.layer2.0.conv1", 0)]
    assert state.index[("backbone.body.layer2.0.downsample.0", 0)] == shared
    assert state.index[("backbone.body.layer2.0.conv2", 0)] != shared
    assert bool((state.scale > 0).all()) and bool((state.zero_point == 0).all())


def test_initial_scales_are_minmax_calibration():
    model, _ = tiny("retinanet")
    ims = images()
    seen = {}

    def grab(module, args):
        x = args[0]
        seen["max"] = max(seen.get("max", 0.0), float(x.abs().max()))

    h = model.backbone.body.conv1.register_forward_pre_hook(grab)
    with torch.no_grad():
        for im in ims:
            model([im])
    h.remove()
    state = calibrate_fake_quant(model, ims, "tensorrt")
    got = float(state.scale.detach()[state.index[("backbone.body.conv1", 0)]])
    assert got == pytest.approx(seen["max"] / 127, rel=1e-6)


def test_checkpoint_keeps_the_quantized_student_and_float_init_drops_scales(tmp_path):
    model, cfg = tiny("faster_rcnn")
    state = calibrate_fake_quant(model, images(), "onnxruntime")
    with torch.no_grad():
        state.scale.mul_(1.25)  # "learned": not what a recalibration would give
    path = save_checkpoint(detector_checkpoint(model, cfg, ["a", "b"], [1, 2]), tmp_path / "qat.pt")
    loaded, _ = load_detector(path)
    got = fake_quant_state(loaded)
    assert got is not None and got.points == state.points and got.fmt.name == "onnxruntime"
    assert torch.equal(got.scale, state.scale)
    im = images(1)
    with torch.no_grad():
        a, b = model(im)[0], loaded(im)[0]
        with fake_quant_disabled(loaded):
            c = loaded(im)[0]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])
    assert not (c["scores"].shape == b["scores"].shape and torch.equal(c["scores"], b["scores"]))
    # as initial weights (model.weights=) a quantization-aware checkpoint gives its float weights
    from gkd.kd.checkpoint import detector_weights, load_checkpoint

    weights = detector_weights(load_checkpoint(path), path)
    plain, _ = tiny("faster_rcnn")
    plain.load_state_dict(weights)


def test_frozen_batchnorm_stays_in_eval_mode_and_scales_get_gradients():
    model, _ = tiny("faster_rcnn")
    state = calibrate_fake_quant(model, images(), "tensorrt")
    assert freeze_batchnorm(model) > 0
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    ims = images(2)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])} for _ in ims]
    losses = model(ims, targets)
    sum(losses.values()).backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    assert state.scale.grad is not None and int((state.scale.grad != 0).sum()) > len(state.points) // 2


def test_a_layer_called_more_often_than_calibrated_is_refused():
    model, _ = tiny("faster_rcnn")
    calibrate_fake_quant(model, images(1), "tensorrt")
    conv = model.backbone.body.conv1
    x = torch.rand(1, 3, 32, 32)
    conv(x)
    with pytest.raises(GkdError, match="backbone.body.conv1 ran 2 time"):
        conv(x)


def test_onnx_node_names_resolve_to_layers_and_calls():
    model, _ = tiny("faster_rcnn")
    assert resolve_onnx_layer("/model/backbone/body/layer1/layer1.0/conv1/Conv", model) == (
        "backbone.body.layer1.0.conv1", 0)
    assert resolve_onnx_layer("/model/rpn/head/conv/conv.0/conv.0.0_3/Conv", model) == ("rpn.head.conv.0.0", 3)
    assert resolve_onnx_layer("/head/conv/conv.0/conv.0.0_2/Conv", model) == ("rpn.head.conv.0.0", 2)
    assert resolve_onnx_layer("/box_head/fc6/Gemm", model) == ("roi_heads.box_head.fc6", 0)
    with pytest.raises(GkdError, match="no layer"):
        resolve_onnx_layer("/model/nowhere/Conv", model)
