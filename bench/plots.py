"""PNG plots of a run's report: training curves, per-class AP, latency distributions, accuracy against latency.

Each function takes plain numbers (what the reports hold) and writes one PNG; matplotlib is imported inside them,
with the Agg backend, so that a headless machine works and ``import gkd.bench`` stays light. A plot whose data is
missing (no val metrics, no latency samples) is not drawn: the function returns None instead of a path.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["training_curves", "per_class_ap", "latency_distribution", "map_vs_latency", "pareto_front"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: render to files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    from gkd.core.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _read_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def training_curves(metrics_csv: Mapping[str, Path], out: Path) -> Path | None:
    """Training loss and val mAP against the step, one line per run (``{"teacher": .../metrics.csv, ...}``)."""
    runs = {name: _read_csv(p) for name, p in metrics_csv.items() if Path(p).is_file()}
    runs = {n: r for n, r in runs.items() if r}
    if not runs:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows if "train/loss" in r]
        ax_loss.plot(steps, [r["train/loss"] for r in rows if "train/loss" in r], marker="o", ms=3, label=name)
        val = [(r["step"], 100 * r["val/bbox_mAP"]) for r in rows if "val/bbox_mAP" in r]
        if val:
            ax_map.plot(*zip(*val), marker="o", ms=3, label=name)
    ax_loss.set(xlabel="step", ylabel="train loss (epoch mean, with any distillation terms)", title="training loss")
    ax_map.set(xlabel="step", ylabel="val mAP (%)", title="val COCO mAP")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def per_class_ap(per_model: Mapping[str, Mapping[str, float]], out: Path) -> Path | None:
    """Grouped bars: AP (%) of each class for each model (``{"teacher": {"circle": 0.31, ...}, ...}``).

    Classes without ground truth (AP -1) are left out."""
    per_model = {m: {c: v for c, v in aps.items() if v >= 0} for m, aps in per_model.items()}
    classes = list(dict.fromkeys(c for aps in per_model.values() for c in aps))
    if not classes:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(classes) * max(1, len(per_model)) / 2), 3.8))
    width = 0.8 / len(per_model)
    for i, (model, aps) in enumerate(per_model.items()):
        xs = [k + (i - (len(per_model) - 1) / 2) * width for k in range(len(classes))]
        ax.bar(xs, [100 * aps.get(c, 0.0) for c in classes], width, label=model)
    ax.set_xticks(range(len(classes)), classes)
    ax.set(ylabel="AP (%)", title="per-class COCO AP (val)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def latency_distribution(samples_ms: Mapping[str, Sequence[float]], out: Path, title: str = "") -> Path | None:
    """One box (with every sample drawn over it) per runner: the spread behind the p50/p90 of the tables."""
    samples_ms = {n: list(s) for n, s in samples_ms.items() if s}
    if not samples_ms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(samples_ms)), 4))
    names = list(samples_ms)
    ax.boxplot([samples_ms[n] for n in names], whis=(10, 90), showfliers=False)
    for k, n in enumerate(names, start=1):
        s = samples_ms[n]
        ax.scatter([k + 0.25 * ((i % 7) / 6 - 0.5) for i in range(len(s))], s, s=6, alpha=0.4)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="latency per image (ms)", title=title or "latency at batch 1 (whiskers: p10-p90)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(latency, accuracy)`` that no other point beats on both (lower latency and higher
    accuracy, one of them strictly), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def map_vs_latency(points: Mapping[str, tuple[float, float]], out: Path) -> Path | None:
    """mAP (%) against p90 latency (ms) for every model and precision, the Pareto front joined by a line.

    ``points``: label -> (p90 ms, mAP in [0, 1]). Labels ``group/runtime-precision`` get one colour per group
    (teacher, distilled, baseline) and one marker per runtime and precision."""
    if not points:
        return None
    plt = _pyplot()
    names = list(points)
    xy = [points[n] for n in names]
    groups = list(dict.fromkeys(n.split("/")[0] if "/" in n else "" for n in names))
    kinds = list(dict.fromkeys(n.split("/")[-1] for n in names))
    markers = "osD^vP*X"
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (x, y) in zip(names, xy):
        g, k = (n.split("/")[0] if "/" in n else ""), n.split("/")[-1]
        ax.scatter([x], [100 * y], s=40, color=colours[groups.index(g) % len(colours)],
                   marker=markers[kinds.index(k) % len(markers)], label=n, zorder=3)
    front = pareto_front(xy)
    ax.plot([xy[i][0] for i in front], [100 * xy[i][1] for i in front], "--", lw=1, color="grey",
            label="Pareto front", zorder=2)
    ax.set(xlabel="p90 latency at batch 1 (ms)", ylabel="val mAP (%)", title="accuracy against latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out)
