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
