"""Runners share one interface and report what actually ran."""
import pytest
import torch

from gkd.export.runtime import OrtRunner, TorchRunner
from gkd.kd.errors import GkdError


def test_provider_is_read_back_not_requested(exported):
    # asking for CUDA first on a machine without a usable GPU silently falls back: the runner must say CPU
    with OrtRunner(exported["retinanet"]["fp32"], providers=("CUDAExecutionProvider", "CPUExecutionProvider")) as r:
        expected = r.session.get_providers()[0]
        assert r.provider == expected
        if not torch.cuda.is_available():
            assert r.provider == "CPUExecutionProvider"
        assert r.precision == "fp32"  # read from the file's metadata


def test_same_interface(exported, trained):
    image = torch.rand(3, 56, 72)
    outs = []
    for runner in (TorchRunner(trained["retinanet"]["model"]), OrtRunner(exported["retinanet"]["fp32"])):
        with runner:
            o = runner.infer({"image": image[None]})
        assert set(o) == {"boxes", "scores", "labels"}
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        outs.append(o)
    assert outs[0]["boxes"].shape == outs[1]["boxes"].shape


@pytest.mark.parametrize("shape", [(3, 56, 72), (2, 3, 56, 72), (1, 1, 56, 72)])
def test_bad_feed_is_one_line_error(exported, shape):
    with OrtRunner(exported["retinanet"]["fp32"]) as r:
        with pytest.raises(GkdError, match=r"must be \[1, 3, H, W\]"):
            r.infer({"image": torch.rand(*shape)})


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_openvino_runs_the_onnx_files_with_parity_against_pytorch(exported, trained, rect_data, arch):
    """OpenVINO's CPU plugin runs the same ONNX files (FP32 at FP32 even on CPUs with bf16 units) and finds what
    PyTorch finds: FP32 at the product's FP32 detection tolerances, INT8 at its INT8 ones."""
    pytest.importorskip("openvino")
    from gkd.export.images import load_image_set
    from gkd.export.parity import DEFAULT_TOLERANCES, collect_outputs, compare_outputs
    from gkd.export.runtime import OvRunner
    from tests.detectors import FIT_SCORE

    images = load_image_set(rect_data["val"]).images
    ref = collect_outputs(TorchRunner(trained[arch]["model"]), images)
    for precision in ("fp32", "int8"):
        with OvRunner(exported[arch][precision]) as r:
            assert r.provider.startswith("OpenVINO ") and r.precision == precision
            out = collect_outputs(r, images)
        tol = DEFAULT_TOLERANCES[precision].replace(score_floor=FIT_SCORE, tensor_gate=False)
        rep = compare_outputs(ref, out, tol)
        assert rep["passed"], (precision, rep["failures"])
        if precision == "fp32":
            assert rep["tensor"]["boxes"]["max_abs"] < 0.05 and rep["detection"]["max_score_delta"] < 1e-3


def test_openvino_bad_file_is_one_line(tmp_path):
    pytest.importorskip("openvino")
    from gkd.export.runtime import OvRunner

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(GkdError, match="OpenVINO cannot load this model"):
        OvRunner(bad).activate()
    with pytest.raises(GkdError, match="ONNX file not found"):
        OvRunner(tmp_path / "missing.onnx").activate()
