import pytest
import torch

from gkd.core.errors import GkdError
from gkd.kd.config import TrainConfig
from gkd.kd.distributed import select_device
from gkd.kd.engine import EpochSampler, build_lr_lambda


def test_warmup_then_steps():
    f = build_lr_lambda(TrainConfig(epochs=4, warmup_iters=10, warmup_ratio=0.1, steps=(2, 3), gamma=0.1), 10)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert f(10) == pytest.approx(1.0) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)


def test_cosine_reaches_zero_at_end():
    f = build_lr_lambda(TrainConfig(epochs=2, warmup_iters=0, schedule="cosine"), 5)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert all(f(i) >= f(i + 1) for i in range(10))


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(4)
    torch.manual_seed(123)  # global RNG state must not matter
    order = list(a)
    for e in range(4):  # b has "run" other epochs first
        b.set_epoch(e)
        list(b)
    b.set_epoch(4)
    assert list(b) == order and sorted(order) == list(range(50))
    a.set_epoch(5)
    assert list(a) != order


def test_device_selection():
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda" and select_device("auto").type == "cuda"
    else:
        with pytest.raises(GkdError, match="no CUDA GPU"):
            select_device("cuda")
        assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
