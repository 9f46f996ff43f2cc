"""The timing harness with fake runners and a fake clock: warm-up until steady, bounds by duration and count,
round-robin order, phases and runner-measured samples."""
import pytest

from gkd.bench.harness import TimingPolicy, measure


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def runner(clock, costs, order=None, name=None):
    """A call whose i-th invocation costs ``costs(k)`` seconds, k counting every call (warm-up included)."""
    calls = [0]

    def call(i):
        if order is not None:
            order.append(name)
        clock.now += costs(calls[0])
        calls[0] += 1
    return call


def test_round_robin_with_fake_clock():
    clock, order = FakeClock(), []
    times = measure({"a": runner(clock, lambda k: 0.010, order, "a"), "b": runner(clock, lambda k: 0.030, order, "b")},
                    TimingPolicy.fixed(2, 4), clock=clock)
    assert times["a"].samples_ms == pytest.approx([10.0] * 4) and times["b"].samples_ms == pytest.approx([30.0] * 4)
    assert order[:4] == ["a", "a", "b", "b"]  # each warmed up on its own, untimed
    assert order[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotating order
    assert times["a"].warmup_calls == 2 and times["a"].steady is None  # fixed warm-up: not tested


def test_warm_up_lasts_until_steady():
    """A runner whose first calls are slow and settle (caches, allocator, JIT: 10 ms + 40 ms x 0.8^k) is warmed up
    past the settling: every timed sample is within 5% of the steady 10 ms, and the warm-up count shows where it
    settled (a fixed 5-call warm-up would have timed 13-24 ms calls)."""
    clock = FakeClock()
    settling = runner(clock, lambda k: 0.010 + 0.040 * 0.8 ** k)
    t = measure({"x": settling}, TimingPolicy(warmup_s=0.0, warmup_min_calls=5, steady_window=5,
                                               duration_s=0.0, min_iterations=20), clock=clock)["x"]
    assert t.steady is True and t.warmup_calls > 10
    assert max(t.samples_ms) < 10.5 and min(t.samples_ms) > 10.0


def test_never_steady_is_reported_not_hidden():
    clock = FakeClock()
    drifting = runner(clock, lambda k: 0.010 * (1.2 ** (k % 40)))  # keeps changing by 20% per call
    t = measure({"x": drifting}, TimingPolicy(warmup_s=0.0, warmup_max_s=1.0, duration_s=0.0, min_iterations=3),
                clock=clock)["x"]
    assert t.steady is False and t.warmup_s >= 1.0 and len(t.samples_ms) == 3


def test_timed_phase_is_bounded_by_duration_and_count():
    clock = FakeClock()
    fast = runner(clock, lambda k: 1 / 128)  # binary-exact, so the fake clock adds up exactly
    # 3 s at 7.8125 ms a call: the duration dominates the minimum count
    t = measure({"x": fast}, TimingPolicy(warmup_s=0.0, warmup_min_calls=0, warmup_max_s=0.0, duration_s=3.0,
                                          min_iterations=10), clock=clock)["x"]
    assert len(t.samples_ms) == 384
    clock2 = FakeClock()
    slow = runner(clock2, lambda k: 1.0)
    t = measure({"x": slow}, TimingPolicy(warmup_s=0.0, warmup_min_calls=0, warmup_max_s=0.0, duration_s=3.0,
                                          min_iterations=10), clock=clock2)["x"]
    assert len(t.samples_ms) == 10  # the count dominates
    clock3 = FakeClock()
    t = measure({"x": runner(clock3, lambda k: 0.010)},
                TimingPolicy(warmup_s=0.0, warmup_min_calls=0, warmup_max_s=0.0, duration_s=3.0, min_iterations=10,
                             max_iterations=50), clock=clock3)["x"]
    assert len(t.samples_ms) == 50  # the cap


def test_phases_and_runner_measured_samples_are_kept_apart():
    clock = FakeClock()

    def call(i):
        clock.now += 0.004
        return {"sample": 2.5, "decode": 1.0, "compute": 2.5}
    t = measure({"x": call}, TimingPolicy.fixed(0, 3), clock=clock)["x"]
    assert t.samples_ms == [2.5] * 3  # e.g. CUDA events: the runner's own time replaces the wall clock
    assert t.phases_ms == {"decode": [1.0] * 3, "compute": [2.5] * 3}


def test_policy_rejects_impossible_bounds():
    with pytest.raises(ValueError):
        TimingPolicy(min_iterations=10, max_iterations=5)


def test_overhead_benchmark_runs_and_reports_both_ratios(tmp_path):
    """Plumbing of gkd bench overhead on a tiny random-init ONNX model (the ratio itself is measured in
    docs/results.md, never asserted: timing in a unit test is noise on a shared machine)."""
    import torch

    from gkd.bench.overhead import measure_overhead
    from gkd.export.onnx import export_onnx
    from gkd.kd.config import ModelConfig
    from gkd.kd.models.detectors import build_detector
    from tests.detectors import make_rect_dataset

    torch.manual_seed(0)
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=2, min_size=64, max_size=64,
                      anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=64)
    data = make_rect_dataset(tmp_path / "d", 2, seed=0)
    model = build_detector(cfg).eval()
    onnx_path = export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 64, 64), metadata={"precision": "fp32"})
    r = measure_overhead(onnx_path or tmp_path / "m.onnx", data, calls=3, blocks=2, images=2)
    assert r["ratio_wall"] > 0 and r["ratio_reported"] > 0 and r["bare_ms_per_call"] > 0
    assert r["provider"] == "CPUExecutionProvider" and r["calls_per_block"] == 3
    assert r["bookkeeping_us_per_call"] >= 0 and r["overhead_fraction"] >= 0
