"""The static (TensorRT-ready) graph: torchvision's detections with fixed-size outputs, no data-dependent shape,
accepted whole by a TensorRT builder."""
from __future__ import annotations

import collections

import pytest
import torch

from gkd.export.images import load_image_set
from gkd.export.onnx import export_onnx, load_onnx
from gkd.export.parity import DEFAULT_TOLERANCES, collect_outputs, compare_outputs
from gkd.export.runtime import OrtRunner, TorchRunner
from gkd.export.static_graph import STATIC_OUTPUT_NAMES, StaticDetector, static_head_outputs, to_detections
from tests.detectors import FIT_SCORE
from tests.test_export.test_real_sizes import as_photo

ARCHS = ("faster_rcnn", "retinanet")
#: ops a TensorRT builder rejects or runs with data-dependent shapes (TensorRT-RTX has no kernel for the first
#: three; RoiAlign is a plugin; Loop / If / Scatter* are what data-dependent post-processing exports to)
FORBIDDEN = {"NonZero", "NonMaxSuppression", "RoiAlign", "ScatterND", "ScatterElements", "Loop", "If"}
PHOTO_SIZES = [(427, 640), (1080, 1920), (40, 50), (879, 710)]


@pytest.fixture(scope="module")
def static_files(trained, rect_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    sample = load_image_set(rect_data["val"], limit=1).images[0][1].unsqueeze(0)
    out = {}
    for arch in ARCHS:
        path = root / f"{arch}.static.onnx"
        export_onnx(trained[arch]["model"], path, sample, static=True, metadata={"precision": "fp32"})
        out[arch] = path
    return out


def _same_detections(ref: dict, got: dict, box_atol: float = 1e-3, score_atol: float = 1e-5) -> None:
    """Equal detection sets in the same order (the static graph keeps torchvision's ranking)."""
    assert got["labels"].tolist() == ref["labels"].tolist()
    assert torch.allclose(got["boxes"], ref["boxes"], atol=box_atol), (got["boxes"] - ref["boxes"]).abs().max()
    assert torch.allclose(got["scores"], ref["scores"], atol=score_atol)


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_static_detector_gives_torchvisions_detections(trained, rect_data, arch):
    """Masks instead of selections change nothing: the same detections as torchvision's own inference path, on
    the parity images and on photos of the sizes users feed in (large, not square, smaller than the model)."""
    model = trained[arch]["model"].eval()
    static = StaticDetector(model)
    images = [im for _, im in load_image_set(rect_data["val"]).images]
    images += [as_photo(images[0], size, seed=i) for i, size in enumerate(PHOTO_SIZES)]
    found = 0
    with torch.no_grad():
        for im in images:
            outs = static(im[None])
            assert bool(outs[4].all())  # NMS converged
            got, ref = to_detections(outs), model([im])[0]
            _same_detections(ref, got)
            found += int((ref["scores"] >= FIT_SCORE).sum())
    assert found >= len(images) - len(PHOTO_SIZES)  # the models detect: matching empty outputs proves nothing


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_static_graph_has_no_data_dependent_op_and_matches_pytorch(static_files, trained, rect_data, arch):
    model = load_onnx(static_files[arch])
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert not FORBIDDEN & set(ops), FORBIDDEN & set(ops)
    assert [o.name for o in model.graph.output] == list(STATIC_OUTPUT_NAMES)
    images = load_image_set(rect_data["val"]).images
    images += [(100 + i, as_photo(images[0][1], size, seed=i)) for i, size in enumerate(PHOTO_SIZES)]
    ref = collect_outputs(TorchRunner(trained[arch]["model"]), images)
    with OrtRunner(static_files[arch]) as r:
        out = collect_outputs(r, images)
    rep = compare_outputs(ref, out, DEFAULT_TOLERANCES["fp32"].replace(score_floor=FIT_SCORE))
    assert rep["passed"], rep["failures"]
    assert rep["detection"]["reference_detections"] >= len(images) - len(PHOTO_SIZES)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_equals_two_single_runs(static_files, rect_data, arch):
    """The static graph takes a batch (one size for all its images); each image's detections are its own."""
    import onnxruntime as ort

    images = [im for _, im in load_image_set(rect_data["val"]).images[:3]]
    same = [im for im in images if im.shape == images[0].shape][:2]
    assert len(same) == 2
    sess = ort.InferenceSession(str(static_files[arch]), providers=["CPUExecutionProvider"])
    batch = sess.run(None, {"image": torch.stack(same).numpy()})
    assert batch[0].shape == (2, 1) and batch[1].shape[0] == 2
    for i, im in enumerate(same):
        single = to_detections(sess.run(None, {"image": im[None].numpy()}))
        _same_detections(single, to_detections(batch, i), box_atol=1e-4)
    empty = batch[0][:, 0].tolist()
    for i, n in enumerate(empty):  # padding after num_detections is zero
        assert not batch[1][i, n:].any() and not batch[2][i, n:].any() and not batch[3][i, n:].any()


def test_head_outputs_of_the_static_graph(static_files):
    names = static_head_outputs(load_onnx(static_files["faster_rcnn"]))
    assert any("/box_predictor/bbox_pred" in n for n in names) and any("/head/cls_logits" in n for n in names)
    assert not any("/box_head/" in n or "/backbone/" in n for n in names)
    retina = static_head_outputs(load_onnx(static_files["retinanet"]))
    assert retina and all("cls_logits" in n or "bbox_reg" in n for n in retina)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensorrt_rtx_builds_the_whole_static_graph(static_files, rect_data, tmp_path, arch):
    """TensorRT-RTX (the TensorRT builder that installs without a GPU) parses the complete graph (resize and
    normalise, backbone, FPN, heads, post-processing) with no rejected node and builds an engine, at INT8 in
    TensorRT's format (int8 symmetric activations, float bias) and, for Faster R-CNN, at FP32. Engines are not run
    here: no GPU."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (the trt-rtx extra)",
                        exc_type=ImportError)
    from gkd.export.quantize import quantize_int8
    from gkd.export.static_graph import STATIC_SCOPES
    from gkd.export.trt_rtx import check_files

    int8 = tmp_path / "static.int8.onnx"
    calib = [im for _, im in load_image_set(rect_data["val"], limit=2).images]
    info = quantize_int8(static_files[arch], int8, calib, int8_format="tensorrt", scopes=STATIC_SCOPES,
                         head_outputs=static_head_outputs(load_onnx(static_files[arch])))
    assert info["is_int8"] and info["activations"]["zero_points"] == [0] and info["bias"] == "float"
    profile = {"image": {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [2, 3, 256, 256]}}
    # RetinaNet's FP32 and FP16 builds run through gkd export in test_trt_rtx.py; here its INT8 only
    files = {"fp32": static_files[arch], "int8": int8} if arch == "faster_rcnn" else {"int8": int8}
    results = check_files(files, profile)
    assert set(results) == set(files)
    for precision, r in results.items():
        assert r.get("parsed") and not r["rejected"], (precision, r)
        assert r["build"]["ok"] and r["build"]["engine_bytes"] > 0, (precision, r["build"])
