"""The latency protocol: warm up until steady, then time every runner round-robin for a bounded duration and count.

Warm-up (per runner, untimed, as trtexec does it by time with a minimum call count): at least ``warmup_min_calls``
calls and ``warmup_s`` seconds, then until *steady*: the median of the last ``steady_window`` calls is within
``steady_tolerance`` of the median of the window before it. A runner that is not steady after ``warmup_max_s`` is
timed anyway and reported with ``steady: false`` (a warning, never a silent pass). ``warmup_max_s = 0`` means a
fixed warm-up of ``warmup_min_calls`` calls, steadiness not tested (``steady: null``).

Timed phase (all runners together): rounds of one call per runner, the order rotating each round so that load
changes on a shared machine hit every runner alike. It ends when every runner has ``min_iterations`` calls *and*
``duration_s`` seconds of timed calls (trtexec's ``--iterations`` / ``--duration``), or when one reaches
``max_iterations``. Every per-call time is kept (like trtexec's ``--exportTimes``).

A call is ``fn(i) -> None | dict``: the harness times it with ``clock``; a returned dict may carry phase times in ms
(``decode``, ``h2d``, ``compute``, ``d2h``) that are kept apart, and ``"sample"``: a time measured by the runner itself
(CUDA events on a GPU) that replaces the wall-clock sample. The clock is injectable, so tests use a fake one.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["TimingPolicy", "Timings", "measure", "sync"]

Call = Callable[[int], "dict[str, float] | None"]


def sync(device: Any) -> None:
    """Wait for the work queued on a CUDA ``device`` (a clock read after it then measures that work); a no-op on a
    CPU. The one device barrier of every timing in gkd bench."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and to time (defaults: trtexec's 200 ms warm-up and 3 s / 10 iterations)."""

    warmup_s: float = 0.2
    warmup_min_calls: int = 5
    warmup_max_s: float = 20.0
    steady_window: int = 5
    steady_tolerance: float = 0.05
    duration_s: float = 3.0
    min_iterations: int = 10
    max_iterations: int | None = None

    def __post_init__(self):
        if self.warmup_min_calls < 0 or self.min_iterations < 1 or self.steady_window < 1:
            raise ValueError("warmup_min_calls >= 0, min_iterations >= 1 and steady_window >= 1 are required")
        if self.max_iterations is not None and self.max_iterations < self.min_iterations:
            raise ValueError(f"max_iterations={self.max_iterations} < min_iterations={self.min_iterations}")

    @classmethod
    def fixed(cls, warmup: int, iterations: int) -> "TimingPolicy":
        """Exactly ``warmup`` untimed and ``iterations`` timed calls (no time bounds, no steadiness test)."""
        return cls(warmup_s=0.0, warmup_min_calls=warmup, warmup_max_s=0.0, duration_s=0.0,
                   min_iterations=iterations, max_iterations=iterations)


@dataclass
class Timings:
    """What :func:`measure` recorded for one runner."""

    samples_ms: list[float] = field(default_factory=list)
    phases_ms: dict[str, list[float]] = field(default_factory=dict)
    warmup_calls: int = 0
    warmup_s: float = 0.0
    steady: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _steady(times: list[float], window: int, tol: float) -> bool:
    if len(times) < 2 * window:
        return False
    last = statistics.median(times[-window:])
    before = statistics.median(times[-2 * window:-window])
    return before > 0 and abs(last - before) / before <= tol


def _warm_up(call: Call, policy: TimingPolicy, clock: Callable[[], float]) -> tuple[int, float, bool | None]:
    start = clock()
    times: list[float] = []
    while True:
        elapsed = clock() - start
        enough = len(times) >= policy.warmup_min_calls and elapsed >= policy.warmup_s
        if enough and policy.warmup_max_s <= 0:
            return len(times), elapsed, None  # fixed warm-up: steadiness not tested
        if enough and _steady(times, policy.steady_window, policy.steady_tolerance):
            return len(times), elapsed, True
        if enough and elapsed >= policy.warmup_max_s:
            return len(times), elapsed, False
        t0 = clock()
        call(-1 - len(times))
        times.append((clock() - t0) * 1000.0)


def measure(calls: dict[str, Call], policy: TimingPolicy, *,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, Timings]:
    """Warm up each call, then time them all round-robin (see the module docstring).

    Args:
        calls: name -> ``fn(i)``; ``i >= 0`` is the timed iteration (pick input ``i % n``), negative in warm-up.
        policy: the bounds.
        clock: seconds clock.

    Returns:
        name -> :class:`Timings`.
    """
    names = list(calls)
    out = {n: Timings() for n in names}
    for name in names:
        t = out[name]
        t.warmup_calls, t.warmup_s, t.steady = _warm_up(calls[name], policy, clock)
    spent = {n: 0.0 for n in names}
    i = 0
    while True:
        done = all(len(out[n].samples_ms) >= policy.min_iterations and spent[n] >= policy.duration_s * 1000.0
                   for n in names)
        capped = policy.max_iterations is not None and i >= policy.max_iterations
        if done or capped:
            return out
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate: no runner always runs right after another
            t0 = clock()
            phases = calls[name](i)
            wall = (clock() - t0) * 1000.0
            sample = float(phases.get("sample", wall)) if phases else wall
            rec = out[name]
            rec.samples_ms.append(sample)
            spent[name] += wall
            for phase, ms in (phases or {}).items():
                if phase != "sample":
                    rec.phases_ms.setdefault(phase, []).append(float(ms))
        i += 1
