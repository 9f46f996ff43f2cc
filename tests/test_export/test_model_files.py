"""A model file is opened in one place (``gkd.export.model_files``): its kind, the refusals of files that are not what
their name says (one line naming the file), and the runner, for ``gkd eval``, ``gkd bench latency`` and
``gkd predict`` alike.

The models are untrained detectors of the tiny test architecture: what they detect does not matter here.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from gkd.cli import main
from gkd.core.errors import GkdError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import CATEGORY_IDS, CLASSES, tiny_model_config

    cfg = tiny_model_config("faster_rcnn")
    torch.manual_seed(0)
    return save_checkpoint(detector_checkpoint(build_detector(cfg), cfg, CLASSES, CATEGORY_IDS),
                           tmp_path_factory.mktemp("ckpt") / "model.pt")


def _bad_files(tmp_path, checkpoint):
    """``[(file, what its one-line refusal says)]``."""
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "renamed.pt").write_bytes(b"\x08\x07onnx-protobuf")
    (tmp_path / "zip.onnx").write_bytes(checkpoint.read_bytes())
    (tmp_path / "empty.engine").write_bytes(b"")
    return [(tmp_path / "weights.bin", "unknown model kind (suffix '.bin')"),
            (tmp_path / "renamed.pt", "not a PyTorch checkpoint"),
            (tmp_path / "zip.onnx", "a zip archive (a PyTorch checkpoint?), not an ONNX model"),
            (tmp_path / "empty.engine", "empty file, not a TensorRT engine"),
            (tmp_path / "missing.onnx", "model file not found")]


def test_model_kind_from_the_name_checked_against_the_content(checkpoint, tmp_path):
    from gkd.export.model_files import model_kind

    assert model_kind(checkpoint) == "pytorch"
    for path, expected in _bad_files(tmp_path, checkpoint):
        with pytest.raises(GkdError) as err:
            model_kind(path)
        assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_bench_opens_models_through_export():
    from gkd.bench import artifacts
    from gkd.export import model_files

    assert artifacts.model_kind is model_files.model_kind
    assert artifacts.Unavailable is model_files.Unavailable
    assert artifacts.KINDS is model_files.KINDS and artifacts.ORT_PROVIDERS is model_files.ORT_PROVIDERS


def test_a_checkpoint_opens_activated_with_its_info_and_leaves_torch_threads_alone(checkpoint):
    from gkd.export.model_files import open_model
    from gkd.export.runtime import TorchRunner

    before = torch.get_num_threads()
    runner, note = open_model(checkpoint, "pytorch", threads=before + 1)
    assert isinstance(runner, TorchRunner) and note == "" and runner.precision == "fp32"
    assert runner.info["category_ids"] == [3, 7] and runner.info["classes"] == ["red", "blue"]
    assert torch.get_num_threads() == before, "torch's thread count is the process's: the caller sets it"
    runner.deactivate()


def test_bench_sets_torch_threads_for_a_checkpoint(checkpoint):
    from gkd.bench.artifacts import ModelSpec, open_runner

    before = torch.get_num_threads()
    try:
        runner, _ = open_runner(ModelSpec(checkpoint, "pytorch"), threads=before + 1)
        assert torch.get_num_threads() == before + 1
        runner.deactivate()
    finally:
        torch.set_num_threads(before)


def test_an_unknown_kind_is_refused_in_one_line(checkpoint):
    from gkd.export.model_files import open_model

    with pytest.raises(GkdError, match=rf"^{checkpoint}: unknown model kind 'keras'$"):
        open_model(checkpoint, "keras")


def test_predict_refuses_bad_model_files_in_one_line(checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(image)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x01\x02engine bytes")
    cases = [*_bad_files(tmp_path, checkpoint), (engine, "gkd predict runs checkpoints (.pt, .pth) and ONNX files")]
    for path, expected in cases:
        assert main(["predict", str(path), str(image), "--out", str(tmp_path / "p")]) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{path}: " in err[0] and expected in err[0], err
