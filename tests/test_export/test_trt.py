"""TensorRT logic without TensorRT: profiles, stamps, precision verification from (fake) inspector output.
The real build is tested only where TensorRT and a GPU exist."""
import json

import pytest

from gkd.core.errors import GkdError
from gkd.export.trt import (check_stamp, compute_profile, dominant_precision, load_stamp, make_stamp, onnx_for_build,
                            parse_shapes, stamp_path, summarize_layer_precisions, verify_precision, write_stamp)

CONTRACT = {"in_graph": {"resize": {"min_size": 256, "max_size": 320}}}
MACHINE = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_parse_shapes_trtexec_syntax():
    assert parse_shapes("image:1x3x320x480") == {"image": (1, 3, 320, 480)}
    assert parse_shapes(None) == {}
    for bad in ("image=1x3x3x3", "1x3x32x32", "image:1x3xAx32"):
        with pytest.raises(GkdError, match="trtexec shape syntax"):
            parse_shapes(bad, "--min-shapes")


def test_profile_defaults_and_overrides():
    prof = compute_profile(CONTRACT)["image"]
    assert prof == {"min": [1, 3, 32, 32], "opt": [1, 3, 256, 320], "max": [1, 3, 1280, 1280]}
    prof = compute_profile(CONTRACT, opt_shapes="image:1x3x480x640", max_shapes="image:1x3x1080x1920")["image"]
    assert prof["opt"] == [1, 3, 480, 640] and prof["max"] == [1, 3, 1080, 1920]


@pytest.mark.parametrize("kwargs,match", [
    ({"min_shapes": "image:1x3x400x400", "opt_shapes": "image:1x3x300x300"}, "min <= opt <= max"),
    ({"opt_shapes": "image:2x3x320x320"}, "batch fixed at 1"),
    ({"opt_shapes": "input:1x3x320x320"}, "unknown input 'input'"),
    ({"min_shapes": "image:1x3x8x8"}, "at least 16"),
])
def test_profile_errors(kwargs, match):
    with pytest.raises(GkdError, match=match):
        compute_profile(CONTRACT, **kwargs)


def _fake_info(kinds):
    """Engine-inspector JSON in TensorRT's DETAILED layout, one layer per entry of ``kinds``."""
    fmt = {"FP32": "Row major linear FP32", "FP16": "Channel major FP16 format where channel % 8 == 0",
           "INT8": "Channel major INT8 format where channel % 32 == 0", "INT64": "Row major linear Int64"}
    layers = [{"Name": f"l{i}", "LayerType": "CaskConvolution",
               "Inputs": [{"Name": "x", "Format/Datatype": fmt[k]}],
               "Outputs": [{"Name": "y", "Format/Datatype": fmt[k]}]}
              for i, k in enumerate(kinds)]
    return json.dumps({"Layers": layers, "Bindings": ["image", "boxes", "scores", "labels"]})


def test_layer_precisions_from_inspector():
    counts = summarize_layer_precisions(_fake_info(["FP32", "FP16", "FP16", "INT8", "INT64"]))
    assert counts == {"FP32": 1, "FP16": 2, "INT8": 1, "other": 1}
    assert dominant_precision(counts) == "int8"
    with pytest.raises(GkdError, match="DETAILED"):
        summarize_layer_precisions(json.dumps({"Layers": ["conv1", "conv2"]}))


def test_silent_fp32_engine_is_caught():
    """The TensorRT 11 trap: an FP16 request that built an all-FP32 engine must not pass."""
    counts = summarize_layer_precisions(_fake_info(["FP32"] * 5))
    ok, why = verify_precision("fp16", counts)
    assert not ok and "no FP16 layer" in why and "built at fp32" in why
    ok, why = verify_precision("fp16", summarize_layer_precisions(_fake_info(["FP32", "FP16", "FP16"])))
    assert ok and "2/3 layers FP16" in why
    assert not verify_precision("fp32", {"FP32": 3, "FP16": 1})[0]
    assert verify_precision("int8", {"INT8": 4, "FP32": 1})[0]


def test_onnx_choice_per_tensorrt_major(tmp_path):
    paths = {p: tmp_path / f"model.{p}.onnx" for p in ("fp32", "fp16", "int8")}
    assert onnx_for_build("fp16", 10, paths) == paths["fp32"]  # weak typing: FP32 graph + FP16 flag
    assert onnx_for_build("fp16", 11, paths) == paths["fp16"]  # strong typing: precision from the graph
    assert onnx_for_build("int8", 10, paths) == paths["int8"] == onnx_for_build("int8", 11, paths)


@pytest.fixture
def engine(tmp_path):
    eng = tmp_path / "model.fp16.engine"
    eng.write_bytes(b"serialized engine bytes")
    src = tmp_path / "model.fp16.onnx"
    src.write_bytes(b"onnx bytes")
    from gkd.export.onnx import file_sha256

    stamp = make_stamp(MACHINE, precision_requested="fp16", layer_precisions={"FP16": 10, "FP32": 2},
                       typing="weak", onnx_sha256=file_sha256(src), engine_sha256=file_sha256(eng),
                       profile={"min": [1, 3, 32, 32], "opt": [1, 3, 256, 256], "max": [1, 3, 1024, 1024]})
    write_stamp(eng, stamp)
    return eng, src


def test_stamp_round_trip_and_match(engine):
    eng, src = engine
    stamp = load_stamp(eng)
    assert stamp_path(eng).name == "model.fp16.engine.json"
    assert stamp["precision_built"] == "fp16" and stamp["typing"] == "weak"
    check_stamp(stamp, MACHINE, eng, src)  # same machine, same files: accepted


@pytest.mark.parametrize("key,value,match", [
    ("tensorrt_version", "11.0.0", "built for TensorRT version 10.3.0, this machine has 11.0.0"),
    ("gpu_name", "NVIDIA A100-SXM4-40GB", "built for GPU NVIDIA H100"),
    ("compute_capability", "8.7", "compute capability 9.0"),
])
def test_stamp_mismatch_refused(engine, key, value, match):
    eng, _ = engine
    with pytest.raises(GkdError, match=match) as exc:
        check_stamp(load_stamp(eng), {**MACHINE, key: value}, eng)
    assert "\n" not in str(exc.value)


def test_modified_engine_or_onnx_refused(engine):
    eng, src = engine
    stamp = load_stamp(eng)
    src.write_bytes(b"a newer export")
    with pytest.raises(GkdError, match="built from another version"):
        check_stamp(stamp, MACHINE, eng, src)
    eng.write_bytes(b"tampered")
    with pytest.raises(GkdError, match="does not match its stamp"):
        check_stamp(stamp, MACHINE, eng)


def test_missing_or_corrupt_stamp(tmp_path):
    eng = tmp_path / "x.engine"
    eng.write_bytes(b"e")
    with pytest.raises(GkdError, match="no stamp"):
        load_stamp(eng)
    stamp_path(eng).write_text("{not json")
    with pytest.raises(GkdError, match="malformed"):
        load_stamp(eng)
    stamp_path(eng).write_text(json.dumps({"stamp_version": 1}))
    with pytest.raises(GkdError, match="lacks 'tensorrt_version'"):
        load_stamp(eng)


def test_real_engine_build(exported, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs NVIDIA's index and a GPU)",
                              exc_type=ImportError)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    from gkd.export.onnx import read_metadata
    from gkd.export.runtime import TrtRunner
    from gkd.export.trt import build_engine, trt_major

    major = trt_major(trt)
    contract = read_metadata(exported["retinanet"]["fp32"])["contract"]
    prof = compute_profile(contract)
    for p in ("fp32", "fp16"):
        eng = tmp_path / f"model.{p}.engine"
        stamp = build_engine(onnx_for_build(p, major, exported["retinanet"]), eng, precision=p, profile=prof)
        assert stamp["verified"], stamp["verification"]
        with TrtRunner(eng) as runner:
            out = runner.detect(torch.rand(3, 56, 72))
        assert out["boxes"].shape[1] == 4
