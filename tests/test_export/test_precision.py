"""FP16 and INT8 ONNX files: what they really contain, and that they still detect what PyTorch detects."""
import onnx
import pytest

from gkd.export.adapters import NETWORK_SCOPES
from gkd.export.fp16 import convert_fp16, count_tensor_types
from gkd.export.images import load_image_set
from gkd.export.onnx import load_onnx, read_metadata
from gkd.export.parity import DEFAULT_TOLERANCES, collect_outputs, compare_outputs
from gkd.export.quantize import count_qdq, quantizable_nodes, quantize_int8, rank_sensitivity
from gkd.export.runtime import OrtRunner, TorchRunner
from gkd.kd.errors import GkdError
from tests.detectors import FIT_SCORE

ARCHS = ["faster_rcnn", "retinanet"]


def _parity(exported, trained, rect_data, arch, precision):
    """The product's parity at ``precision``, from the fixture's FIT_SCORE: every object is detected at >= 0.6 by
    construction, while how FP16 / INT8 move the fixture's weaker detections (0.3-0.5) across the product's 0.3
    floor depends on the weights, and so on the CPU that trained them (seen on an Intel Xeon: FP16 at floor 0.3, 2
    weak detections of 62 on each side, recall 0.968 against 0.97)."""
    images = load_image_set(rect_data["val"]).images
    ref = collect_outputs(TorchRunner(trained[arch]["model"]), images)
    with OrtRunner(exported[arch][precision]) as runner:
        assert runner.provider == "CPUExecutionProvider"
        out = collect_outputs(runner, images)
    return compare_outputs(ref, out, DEFAULT_TOLERANCES[precision].replace(score_floor=FIT_SCORE))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_file_has_fp16_weights_and_fp32_io(exported, arch):
    model = onnx.load(str(exported[arch]["fp16"]))
    onnx.checker.check_model(model, full_check=True)
    types = count_tensor_types(model)
    assert types.get("FLOAT16", 0) > types.get("FLOAT", 0), types  # conv weights are FP16
    inits = {i.name: i.data_type for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(inits.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in convs)
    assert any(n.op_type == "Cast" for n in model.graph.node)
    # the contract is unchanged: FP32 image in, FP32 boxes/scores and INT64 labels out
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [1, 1, 7]
    assert read_metadata(model)["precision"] == "fp16"


def test_fp16_keeps_geometry_fp32(exported):
    model, info = convert_fp16(load_onnx(exported["faster_rcnn"]["fp32"]))
    # nodes computing on FP16 data (Shape only reads a tensor's dimensions, whatever its type)
    half = {n.name for n in model.graph.node if n.op_type not in ("Shape", "Size") and
            any(i.endswith("__fp16") for i in n.input)}
    assert not any(n.startswith(("/model/transform/", "/model/rpn/anchor_generator/", "/model/roi_heads/box_roi_pool"))
                   for n in half)
    assert info["fp16_op_types"]["Conv"] > 10 and info["casts_inserted"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_parity(exported, trained, rect_data, arch):
    rep = _parity(exported, trained, rect_data, arch, "fp16")
    assert rep["passed"], rep["failures"]


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_file_has_qdq(exported, arch):
    model = onnx.load(str(exported[arch]["int8"]))
    onnx.checker.check_model(model, full_check=True)
    q = count_qdq(model)
    assert q["QuantizeLinear"] > 0 and q["DequantizeLinear"] > 0 and q["int8_initializers"] > 0, q
    meta = read_metadata(model)
    assert meta["precision"] == "int8"
    assert meta["int8"]["calibration_method"] == "minmax" and meta["int8"]["calibration_images"] == 12
    # geometry is never quantized: outside the learned layers, dequantized tensors are only read for their shape or
    # as RoIAlign's feature map (never as coordinates); head outputs (logits, box deltas) stay FP32
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    outside = {(n.op_type, k) for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
               and not n.name.startswith(NETWORK_SCOPES) for k, i in enumerate(n.input) if i in dq_out}
    assert outside <= {("Shape", 0), ("RoiAlign", 0)}, outside
    assert meta["int8"]["head_outputs_fp32"]


def _confident_recall(ref, out) -> float:
    """Share of PyTorch's detections at the fixture's FIT_SCORE (>= 0.6: every object, by construction) that have a
    twin (same label, IoU >= 0.5) at the product's detection floor (0.3) or above."""
    from gkd.export.parity import match_detections
    from tests.detectors import DETECTS_SCORE

    confident = found = 0
    for r, o in zip(ref, out):
        twins = {ri: ci for ri, ci, _ in match_detections(r, o)}
        for ri in (r["scores"] >= FIT_SCORE).nonzero().flatten().tolist():
            confident += 1
            found += ri in twins and float(o["scores"][twins[ri]]) >= DETECTS_SCORE
    assert confident >= len(ref), (confident, len(ref))  # every image holds at least one object
    return found / confident


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_parity(exported, trained, rect_data, arch, tmp_path):
    """INT8 as the product makes it finds the confident detections PyTorch finds: every layer quantized, then, while
    below the target, the most sensitive layers kept FP32 (search_int8). Quantizing every layer alone is not always
    enough: on an Intel Xeon 3 of 24 confident faster_rcnn detections had no INT8 twin above 0.3 (0.875), on an AMD
    EPYC every one had; the search must then keep layers FP32 until the target is met."""
    from gkd.export.quantize import search_int8

    images = load_image_set(rect_data["val"]).images
    ref = collect_outputs(TorchRunner(trained[arch]["model"]), images)

    def recall(path):
        with OrtRunner(path) as runner:
            return _confident_recall(ref, collect_outputs(runner, images))

    target = DEFAULT_TOLERANCES["int8"].min_recall
    every_layer = recall(exported[arch]["int8"])
    calib = [im for _, im in load_image_set(rect_data["train"]).images]
    info = search_int8(exported[arch]["fp32"], tmp_path / "q.onnx", calib, recall, 1.0, target_ratio=target)
    assert info["search"]["met"] and recall(tmp_path / "q.onnx") >= target, info["search"]
    first = info["search"]["rounds"][0]
    assert first["excluded"] == 0 and first["score"] == pytest.approx(every_layer)  # the same calibration
    assert (len(info["search"]["rounds"]) == 1) == (every_layer >= target)  # layers kept FP32 only when needed


def test_excluded_layers_stay_fp32(exported, rect_data, tmp_path):
    src = exported["retinanet"]["fp32"]
    calib = [im for _, im in load_image_set(rect_data["train"], limit=2).images]
    keep = quantizable_nodes(load_onnx(src))[:2]
    info = quantize_int8(src, tmp_path / "q.onnx", calib, exclude=keep)
    assert info["excluded_nodes"] == sorted(keep)
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in keep:  # weight still a float initializer, not a DequantizeLinear output
            assert inits.get(node.input[1]) == onnx.TensorProto.FLOAT


def test_sensitivity_ranking(exported, rect_data):
    images = [im for _, im in load_image_set(rect_data["val"], limit=2).images]
    ranked = rank_sensitivity(exported["retinanet"]["fp32"], exported["retinanet"]["int8"], images)
    assert len(ranked) == len(quantizable_nodes(load_onnx(exported["retinanet"]["fp32"])))
    noise = [r["added_noise"] for r in ranked]
    assert noise == sorted(noise, reverse=True)
    assert all(r["sqnr_out_db"] is None or r["sqnr_out_db"] > 0 for r in ranked)


def test_search_tries_every_ranked_layer_before_giving_up_and_says_so(exported, rect_data, tmp_path):
    """A target INT8 cannot meet: the search doubles the layers kept FP32 up to all ranked ones (it used to stop at
    the last power of two below their number) and reports the target as missed."""
    from gkd.export.quantize import search_int8

    src = exported["retinanet"]["fp32"]
    calib = [im for _, im in load_image_set(rect_data["train"], limit=2).images]
    info = search_int8(src, tmp_path / "q.onnx", calib, lambda path: 0.0, 1.0, target_ratio=1.0)
    ranked = len(quantizable_nodes(load_onnx(src)))
    excluded = [r["excluded"] for r in info["search"]["rounds"]]
    assert excluded[-1] == ranked and excluded == sorted(excluded) and len(set(excluded)) == len(excluded)
    assert info["search"]["met"] is False and len(info["search"]["kept_fp32"]) == ranked


def test_int8_bad_inputs(exported, tmp_path):
    with pytest.raises(GkdError, match="needs calibration images"):
        quantize_int8(exported["retinanet"]["fp32"], tmp_path / "q.onnx", [])
    with pytest.raises(GkdError, match="calibration method 'kl' is unknown"):
        quantize_int8(exported["retinanet"]["fp32"], tmp_path / "q.onnx", [None], method="kl")
    assert not (tmp_path / "q.onnx").exists()
