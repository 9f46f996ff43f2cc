"""Runners share one interface and report what actually ran."""
import pytest
import torch

from gkd.core.errors import GkdError
from gkd.export.runtime import OrtRunner, TorchRunner


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


#: OpenVINO runs in a child process: loaded into the pytest process, its libraries left that process to die of a
#: segmentation fault minutes later (in CPython's GIL hand-over while waiting on an unrelated subprocess)
OV_CHILD = """
import sys, torch
from gkd.export.images import load_image_set
from gkd.export.parity import collect_outputs
from gkd.export.runtime import OvRunner
from gkd.core.errors import GkdError
what, model, arg, out = sys.argv[1:5]
if what == "outputs":
    with OvRunner(model) as r:
        outputs = collect_outputs(r, load_image_set(arg).images)
        torch.save({"provider": r.provider, "precision": r.precision, "outputs": outputs}, out)
else:
    errors = []
    for path in (model, arg):
        try:
            OvRunner(path).activate()
            errors.append("no error")
        except GkdError as e:
            errors.append(str(e))
    torch.save(errors, out)
"""


def _in_openvino_child(tmp_path, *args):
    import subprocess
    import sys

    out = tmp_path / "ov_child.pt"
    p = subprocess.run([sys.executable, "-c", OV_CHILD, *map(str, args), str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_openvino_runs_the_onnx_files_with_parity_against_pytorch(exported, trained, rect_data, arch, tmp_path):
    """OpenVINO's CPU plugin runs the same ONNX files (FP32 at FP32 even on CPUs with bf16 units) and finds what
    the reference finds: the FP32 file what PyTorch finds, at the product's FP32 detection tolerances; the INT8 file
    what onnxruntime finds on the same file, at its INT8 ones. (The INT8 file against PyTorch measures the tiny
    detector's quantization error, not the runtime: on an AVX-512 VNNI EPYC the tiny Faster R-CNN's INT8 file gave a
    mean score delta of 0.064 on onnxruntime and 0.060 on OpenVINO against PyTorch, 0.034 between the two.)"""
    pytest.importorskip("openvino")
    from gkd.export.images import load_image_set
    from gkd.export.parity import DEFAULT_TOLERANCES, collect_outputs, compare_outputs
    from tests.detectors import FIT_SCORE

    images = load_image_set(rect_data["val"]).images
    with OrtRunner(exported[arch]["int8"]) as ort_int8:
        refs = {"fp32": collect_outputs(TorchRunner(trained[arch]["model"]), images),
                "int8": collect_outputs(ort_int8, images)}
    for precision in ("fp32", "int8"):
        got = _in_openvino_child(tmp_path, "outputs", exported[arch][precision], rect_data["val"])
        assert got["provider"].startswith("OpenVINO ") and got["precision"] == precision
        tol = DEFAULT_TOLERANCES[precision].replace(score_floor=FIT_SCORE, tensor_gate=False)
        rep = compare_outputs(refs[precision], got["outputs"], tol)
        assert rep["passed"], (precision, rep["failures"])
        assert rep["detection"]["matched"] > 0
        if precision == "fp32":
            assert rep["tensor"]["boxes"]["max_abs"] < 0.05 and rep["detection"]["max_score_delta"] < 1e-3


def test_openvino_bad_file_is_one_line(tmp_path):
    pytest.importorskip("openvino")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    corrupt, missing = _in_openvino_child(tmp_path, "errors", bad, tmp_path / "missing.onnx")
    assert "OpenVINO cannot load this model" in corrupt and "\n" not in corrupt
    assert "ONNX file not found" in missing
