"""Latency statistics on synthetic series with known answers, and MLPerf's early-stopping estimate checked against
the numbers loadgen itself printed in published SingleStream runs."""
import random

import pytest

from gkd.bench.stats import early_stopping_estimate, early_stopping_min_queries, headline, latency_stats


def test_stats_on_known_values():
    s = latency_stats([10.0, 20.0, 30.0, 40.0, 50.0])
    assert s["count"] == 5 and s["mean"] == 30.0 and s["min"] == 10.0 and s["max"] == 50.0
    assert s["p50"] == 30.0 and s["p90"] == pytest.approx(46.0) and s["p95"] == pytest.approx(48.0)
    assert s["p99"] == pytest.approx(49.6)
    assert s["std"] == pytest.approx(15.8113883)
    assert s["cov"] == pytest.approx(15.8113883 / 30) and s["throughput_ips"] == pytest.approx(1000 / 30)
    assert s["unit"] == "ms"
    with pytest.raises(ValueError):
        latency_stats([])


def test_percentiles_of_a_uniform_grid():
    """1..1000 ms shuffled: the q-th percentile is 1 + 999 q / 100 (linear between closest ranks)."""
    xs = [float(i) for i in range(1, 1001)]
    random.Random(0).shuffle(xs)
    s = latency_stats(xs)
    for q in (50, 90, 95, 99):
        assert s[f"p{q}"] == pytest.approx(1 + 999 * q / 100)
    assert s["mean"] == pytest.approx(500.5)


@pytest.mark.parametrize("queries, discarded", [(2048, 172), (2116, 178), (2145, 181), (7469, 685)])
def test_early_stopping_matches_loadgen(queries, discarded):
    """loadgen's SingleStream summaries print "Processed at least 64 queries (N). Would discard D highest latency
    queries." for p90 at 99% confidence; the estimate is the latency at sorted index N - (D + 1)."""
    assert early_stopping_min_queries() == 64
    xs = [float(i) for i in range(queries)]  # sorted index == value
    random.Random(queries).shuffle(xs)
    est = early_stopping_estimate(xs)
    assert est["discarded"] == discarded and est["queries"] == queries
    assert est["value"] == queries - (discarded + 1)
    assert est["value"] >= latency_stats(xs)["p90"]  # conservative: never below the sample p90


def test_headline_is_plain_p90_below_64_queries_and_labelled_so():
    few = [float(i) for i in range(63)]
    h = headline(few)
    assert h["early_stopping"] is None and h["value"] == latency_stats(few)["p90"] and "plain" in h["label"]
    h = headline(few + [63.0])
    assert h["early_stopping"] is not None and "early-stopping" in h["label"]
    assert h["value"] == 63.0  # 64 queries: the estimate is the slowest (t = 1, nothing discarded)


def test_median_ratio_interval_on_known_series():
    from gkd.bench.stats import median_ratio_interval

    a = [10.0, 11.0, 12.0, 13.0, 50.0]
    same = median_ratio_interval(a, a)
    assert (same["ratio"], same["low"], same["high"], same["rounds"]) == (1.0, 1.0, 1.0, 5)
    half = median_ratio_interval(a, [2 * x for x in a])  # paired by round: every resample's ratio is 0.5
    assert half["ratio"] == half["low"] == half["high"] == 0.5
    noisy = median_ratio_interval([10.0, 30.0, 10.0, 30.0, 20.0], [20.0] * 5)
    assert noisy["low"] < noisy["ratio"] == 1.0 < noisy["high"]
