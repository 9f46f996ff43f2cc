"""Latency statistics: the trtexec-style summary and MLPerf's early-stopping percentile estimate.

Everything here is a pure function of a list of per-call times in milliseconds, so it is tested on synthetic series
with known answers (``tests/test_bench/test_stats.py``).

The headline at batch 1 follows MLPerf Inference's SingleStream scenario: the 90th-percentile latency. When the run
is long enough it is MLPerf's *early-stopping estimate* at 99% confidence (MLCommons inference rules, "Early
stopping"; the implementation is loadgen's ``results.cc`` / ``early_stopping.cc``):

- treat each query as a trial that is "over-latency" with probability ``1 - p`` (``p = 0.9``);
- for ``t`` over-latency queries, ``h(t)`` is the smallest number of other queries for which the binomial
  probability of at most ``t`` over-latency queries among ``h + t`` is below ``1 - c`` (``c = 0.99``);
- the estimate discards the ``t - 1`` slowest queries for the largest ``t`` with ``h(t) + t <= n`` and reports the
  latency at sorted index ``n - t`` (0-based); it needs ``n >= h(1) + 1`` queries (64 for p90 at 99%).

With fewer queries the headline is the plain p90 of the sample, labelled so (``"p90 (plain: too few queries for
early stopping)"``). The estimate is conservative: it is at least the sample p90.
"""
from __future__ import annotations

import math
import statistics
from functools import lru_cache
from typing import Any, Sequence

__all__ = ["latency_stats", "percentile", "early_stopping_min_queries", "early_stopping_estimate", "headline",
           "median_ratio_interval", "COV_WARN_THRESHOLD"]

#: trtexec warns "GPU compute time is unstable" above a coefficient of variation of 1% (seen in TensorRT 10.9's
#: trtexec output: a warning at CoV 1.087%); gkd uses the same threshold for every runner.
COV_WARN_THRESHOLD = 0.01


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of an ascending sequence, linear between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def latency_stats(times_ms: Sequence[float]) -> dict[str, Any]:
    """trtexec/optimum-style summary: count, mean, std, min, p50, p90, p95, p99, max (ms), CoV and images/s.

    Percentiles use linear interpolation between closest ranks (numpy's default); ``std`` is the sample standard
    deviation; ``cov`` = std / mean; ``throughput_ips`` = 1000 / mean (batch 1, one call at a time).
    """
    xs = sorted(float(t) for t in times_ms)
    if not xs:
        raise ValueError("no timings")
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"count": len(xs), "mean": mean, "std": std, "min": xs[0], "p50": percentile(xs, 50),
            "p90": percentile(xs, 90), "p95": percentile(xs, 95), "p99": percentile(xs, 99), "max": xs[-1],
            "cov": std / mean if mean > 0 else 0.0, "throughput_ips": 1000.0 / mean if mean > 0 else 0.0,
            "unit": "ms"}


def _binom_cdf(k: int, n: int, q: float) -> float:
    """P(X <= k) for X ~ Binomial(n, q), summed in log space (n up to millions, no scipy)."""
    if k >= n:
        return 1.0
    log_q, log_p = math.log(q), math.log1p(-q)
    lg_n1 = math.lgamma(n + 1)
    terms = [lg_n1 - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * log_q + (n - x) * log_p for x in range(k + 1)]
    top = max(terms)
    return math.exp(top) * math.fsum(math.exp(t - top) for t in terms)


@lru_cache(maxsize=4096)
def _min_passing(t: int, p: float, confidence: float) -> int:
    """Smallest ``h`` with P(at most ``t`` over-latency queries among ``h + t``) <= 1 - confidence (loadgen's
    ``MinPassingQueriesFinder`` with tolerance 0)."""
    def passes(h: int) -> bool:
        return _binom_cdf(t, h + t, 1.0 - p) <= 1.0 - confidence

    lo, hi = 1, max(2, math.ceil(math.log(1 - confidence) / math.log(p)))
    while not passes(hi):  # grow an upper bound, then bisect
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def early_stopping_min_queries(p: float = 0.9, confidence: float = 0.99) -> int:
    """Queries needed before an early-stopping estimate exists (64 for p90 at 99%, as loadgen prints)."""
    return _min_passing(1, p, confidence) + 1


def early_stopping_estimate(times_ms: Sequence[float], p: float = 0.9,
                            confidence: float = 0.99) -> dict[str, Any] | None:
    """MLPerf's early-stopping estimate of the ``p`` quantile; None when there are too few queries.

    Returns ``{"value": ms, "discarded": t - 1, "queries": n, "min_queries": ..., "percentile": p,
    "confidence": c}``; ``discarded`` is the number loadgen prints as "Would discard N highest latency queries".
    """
    xs = sorted(float(t) for t in times_ms)
    n = len(xs)
    need = early_stopping_min_queries(p, confidence)
    if n < need:
        return None
    # h(t) + t grows with t: bisect for the largest t with h(t) + t <= n (loadgen scans t = 2, 3, ... linearly)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _min_passing(mid, p, confidence) + mid <= n:
            lo = mid
        else:
            hi = mid - 1
    t = lo
    return {"value": xs[n - t], "discarded": t - 1, "queries": n, "min_queries": need, "percentile": p,
            "confidence": confidence}


def headline(times_ms: Sequence[float]) -> dict[str, Any]:
    """The batch-1 headline number: MLPerf SingleStream p90 (early-stopping estimate at 99% when the run is long
    enough, else the plain sample p90, labelled as such)."""
    est = early_stopping_estimate(times_ms)
    if est is not None:
        return {"value": est["value"], "label": "p90 (MLPerf early-stopping estimate, 99% confidence)",
                "early_stopping": est}
    need = early_stopping_min_queries()
    return {"value": latency_stats(times_ms)["p90"],
            "label": f"p90 (plain: {len(times_ms)} queries, early stopping needs {need})", "early_stopping": None}


def median_ratio_interval(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``median(a) / median(b)`` for two runners timed in the same rounds (sample ``i`` of each in round ``i``, as
    the harness times them round-robin), with a paired bootstrap interval over the rounds: how much the ratio moves
    by chance on this machine in this measurement. Returns ``{"ratio", "low", "high", "rounds", "confidence"}``."""
    import random

    n = min(len(a_ms), len(b_ms))
    if n == 0:
        raise ValueError("median_ratio_interval needs at least one round of each runner")
    a, b = list(a_ms[:n]), list(b_ms[:n])
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    ratios.sort()
    tail = (1 - confidence) / 2
    return {"ratio": statistics.median(a) / statistics.median(b), "low": percentile(ratios, tail * 100),
            "high": percentile(ratios, (1 - tail) * 100), "rounds": n, "confidence": confidence}
