"""The method's own measurements over a finished run, read back from its ``metrics.jsonl``."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["training_diagnostics"]


def training_diagnostics(run_dir: Path) -> dict[str, float]:
    """The method's own measurements over a run (``metrics.jsonl``'s ``train/kd_*`` and ``robust_weight_mean``),
    averaged over its epochs: instances per level and step (``instances_s4``), robust weight means per level and
    per class (``rw_s4``, ``rw_c1``: a logged sum over its logged count), ``global_discrepancy``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    epochs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = sorted({k for e in epochs for k in e if k.startswith("train/kd_") or k == "train/robust_weight_mean"})
    mean = {k[len("train/"):]: statistics.fmean(e.get(k, 0.0) for e in epochs) for k in keys}
    out = {}
    for k, v in mean.items():
        if k.startswith("kd_instances_"):
            out[f"instances_{k[len('kd_instances_'):]}"] = v
        elif k.startswith("kd_rw_sum_"):
            n = mean.get("kd_rw_n_" + k[len("kd_rw_sum_"):], 0.0)
            if n > 0:
                out[f"rw_{k[len('kd_rw_sum_'):]}"] = v / n
        elif k in ("kd_global_discrepancy", "robust_weight_mean"):
            out[k.removeprefix("kd_")] = v
    return out
