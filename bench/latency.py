"""``gkd bench latency``: PyTorch eager vs onnxruntime FP32 vs INT8 (and FP16 where a provider runs it natively),
batch 1, in one run: latency percentiles and the COCO mAP of each on the same validation images.

Protocol (printed in the report): every runner gets the same decoded images as float32 ``[1, 3, H, W]`` in [0, 1];
resize, normalisation, NMS and box rescaling are inside each model (export contract), so the timed region is the
whole model, pre/post-processing included ("end-to-end model latency", image decoding excluded). Runners are timed
round-robin, one call each per round with the order rotating, so that load changes on a shared machine hit all of
them alike. Warm-up calls are not timed. The same thread count is given to PyTorch and onnxruntime.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import torch

from ._machine import cpu_name

__all__ = ["latency", "latency_stats", "measure_latency", "run_latency_benchmark"]


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """trtexec/optimum-style summary: count, mean, std, min, p50, p90, p95, p99, max (ms), CoV and images/s.

    Percentiles use linear interpolation between closest ranks (numpy's default).
    """
    xs = sorted(float(t) for t in times_ms)
    if not xs:
        raise ValueError("no timings")

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"count": len(xs), "mean": mean, "std": std, "min": xs[0], "p50": pct(50), "p90": pct(90),
            "p95": pct(95), "p99": pct(99), "max": xs[-1], "cov": std / mean if mean > 0 else 0.0,
            "throughput_ips": 1000.0 / mean if mean > 0 else 0.0, "unit": "ms"}


def measure_latency(calls: dict[str, Callable[[int], Any]], *, warmup: int, iterations: int,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time several callables round-robin.

    Args:
        calls: name -> ``fn(i)`` running iteration ``i`` (e.g. on image ``i % n``).
        warmup: untimed calls of each before timing.
        iterations: timed calls of each.
        clock: seconds clock (injectable for tests).

    Returns:
        name -> per-call milliseconds (``iterations`` values each).
    """
    names = list(calls)
    for i in range(warmup):
        for name in names:
            calls[name](i)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iterations):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate the order: no runner always runs right after another
            t0 = clock()
            calls[name](i)
            times[name].append((clock() - t0) * 1000.0)
    return times


def run_latency_benchmark(checkpoint: Path, data: Path, export_dir: Path, *, calib_data: Path | None,
                          warmup: int, iterations: int, threads: int, map_images: int | None, latency_images: int,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """The benchmark behind ``gkd bench latency``; returns the report dict (see docs/export.md)."""
    from gkd.export.images import load_image_set
    from gkd.export.parity import coco_map, collect_outputs
    from gkd.export.pipeline import ExportOptions, export_checkpoint
    from gkd.export.runtime import OrtRunner, TorchRunner
    from gkd.kd.checkpoint import load_detector
    from gkd.kd.errors import GkdError
    from gkd.kd.io import read_json

    torch.set_num_threads(threads)
    manifest_path = export_dir / "export.json"
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "export manifest")
        check_export_matches(manifest, checkpoint, export_dir)
        log(f"using the export in {export_dir} (checked: it is this checkpoint's, files unchanged)")
    else:
        if calib_data is None:
            raise GkdError(f"{export_dir}: holds no export (export.json); give --calib-data to export FP32/INT8 "
                           f"there first, or run gkd export")
        manifest = export_checkpoint(ExportOptions(checkpoint=checkpoint, out=export_dir, precisions=("fp32", "int8"),
                                                   calib_data=calib_data, val_data=data, threads=threads), log=log)
    model, info = load_detector(checkpoint)
    val = load_image_set(data, limit=map_images)
    category_ids = info.get("category_ids") or val.category_ids
    if val.has_annotations:  # mAP of another label space would be a wrong number, not a missing one
        from gkd.export.pipeline import check_label_space

        check_label_space(data, val, info.get("classes"), category_ids)
    runners: dict[str, Any] = {"pytorch-fp32": TorchRunner(model)}
    skipped = {}
    for p in ("fp32", "fp16", "int8"):
        f = manifest["files"].get(p)
        if not f:
            continue
        runner = OrtRunner(export_dir / f["onnx"], threads=threads, precision=p).__enter__()
        if p == "fp16" and runner.provider == "CPUExecutionProvider":
            # onnxruntime's CPU provider has no FP16 convolution kernels on x86: it inserts casts and computes in
            # FP32, so an FP16 timing here would measure casts, not FP16 (its accuracy is in the export's parity)
            skipped["onnxruntime-fp16"] = "CPUExecutionProvider has no native FP16 kernels on x86 (runs via casts)"
            continue
        runners[f"onnxruntime-{p}"] = runner
    feeds = [{"image": im.unsqueeze(0)} for _, im in val.images[:latency_images]]
    log(f"latency: {len(runners)} runners, {warmup} warm-up + {iterations} timed calls each, round-robin over "
        f"{len(feeds)} image(s), {threads} thread(s)")
    times = measure_latency({n: (lambda i, r=r: r.infer(feeds[i % len(feeds)])) for n, r in runners.items()},
                            warmup=warmup, iterations=iterations)
    results = {}
    for name, runner in runners.items():
        log(f"mAP: {name} on {len(val.images)} image(s)")
        outs = collect_outputs(runner, val.images)
        m = coco_map(outs, val.gt_json, category_ids) if val.has_annotations else None
        prec = runner.precision if name != "pytorch-fp32" else "fp32"
        verified = True if name == "pytorch-fp32" else bool(manifest["files"][prec]["verified"])
        results[name] = {"precision": prec, "provider": runner.provider, "verified": verified,
                         "latency": latency_stats(times[name]), "accuracy": m}
    lat = {n: r["latency"]["mean"] for n, r in results.items()}
    p50 = {n: r["latency"]["p50"] for n, r in results.items()}
    mp = {n: (r["accuracy"] or {}).get("bbox_mAP") for n, r in results.items()}
    ratios = {}
    if "onnxruntime-fp32" in lat:
        ratios["ort_fp32_vs_pytorch_p50"] = p50["onnxruntime-fp32"] / p50["pytorch-fp32"]
        ratios["ort_fp32_vs_pytorch_mean"] = lat["onnxruntime-fp32"] / lat["pytorch-fp32"]
    if "onnxruntime-int8" in lat and "onnxruntime-fp32" in lat:
        ratios["ort_int8_vs_ort_fp32_p50"] = p50["onnxruntime-int8"] / p50["onnxruntime-fp32"]
        if mp.get("onnxruntime-fp32"):
            ratios["int8_map_vs_fp32"] = mp["onnxruntime-int8"] / mp["onnxruntime-fp32"]
    targets = {"ort_fp32_at_most_0.8x_pytorch": ratios.get("ort_fp32_vs_pytorch_p50", math.inf) <= 0.8,
               "int8_faster_than_fp32": ratios.get("ort_int8_vs_ort_fp32_p50", math.inf) < 1.0,
               "int8_map_at_least_99pct_fp32": ratios.get("int8_map_vs_fp32", 0.0) >= 0.99}
    return {
        "benchmark": "latency", "report_version": 1, "checkpoint": str(checkpoint), "data": str(data),
        "export_dir": str(export_dir),
        "device": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "threads": threads,
                   "torch": torch.__version__},
        "protocol": {"batch": 1, "input": "decoded RGB float32 [1, 3, H, W] in [0, 1], original size",
                     "timed": "whole model incl. in-graph resize/normalise/NMS; image decoding excluded",
                     "warmup": warmup, "iterations": iterations, "latency_images": len(feeds),
                     "order": "round-robin, rotating", "map_images": len(val.images),
                     "map": "COCO bbox mAP (pycocotools) on the same images for every runner"},
        "runners": results, "skipped": skipped, "ratios": ratios, "targets": targets,
        "raw_times_ms": times,
    }


def check_export_matches(manifest: dict[str, Any], checkpoint: Path, export_dir: Path) -> None:
    """Refuse an export folder made from another checkpoint, or whose files changed since export.json was written
    (by content: SHA-256), instead of benchmarking the wrong model without a word."""
    from gkd.kd.errors import GkdError
    from gkd.kd.io import file_sha256

    want = manifest.get("checkpoint_sha256")
    have = file_sha256(checkpoint)
    if want != have:
        raise GkdError(f"{export_dir}: holds the export of another checkpoint ({manifest.get('checkpoint')}, sha256 "
                       f"{str(want)[:12]}), not of {checkpoint} (sha256 {have[:12]}); export this checkpoint there "
                       f"again or give its own --export-dir")
    for precision, info in manifest.get("files", {}).items():
        path = export_dir / info["onnx"]
        if not path.is_file():
            raise GkdError(f"{path}: listed in {export_dir / 'export.json'} but missing; export again")
        if file_sha256(path) != info["sha256"]:
            raise GkdError(f"{path}: changed since it was exported and verified (sha256 differs from "
                           f"export.json); export again")


def format_report(rep: dict[str, Any]) -> str:
    """Side-by-side markdown table with ratios against PyTorch eager."""
    base = rep["runners"]["pytorch-fp32"]["latency"]["p50"]
    lines = ["| runner | runs on | p50 ms | p90 | p95 | p99 | mean +- std | CoV | img/s | vs eager (p50) | mAP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rep["runners"].items():
        s = r["latency"]
        m = r["accuracy"]["bbox_mAP"] if r["accuracy"] else None
        flag = "" if r.get("verified", True) else " (parity NOT verified)"
        lines.append(f"| {name}{flag} | {r['provider']} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p95']:.1f} "
                     f"| {s['p99']:.1f} "
                     f"| {s['mean']:.1f} +- {s['std']:.1f} | {s['cov']:.1%} | {s['throughput_ips']:.2f} "
                     f"| {s['p50'] / base:.2f}x | {'-' if m is None else format(m, '.4f')} |")
    for name, why in rep["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
    return "\n".join(lines)


@click.command("latency", context_settings={"max_content_width": 110})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--data", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="COCO JSON of the validation split: latency inputs and mAP for every runner.")
@click.option("--export-dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder of a gkd export (export.json); exported there first (FP32 + INT8) when it holds none.")
@click.option("--calib-data", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Training-split COCO JSON for INT8 calibration when --export-dir holds no export yet.")
@click.option("--warmup", type=click.IntRange(0, None), default=5, show_default=True, help="Untimed calls per runner.")
@click.option("--iterations", type=click.IntRange(2, None), default=50, show_default=True,
              help="Timed calls per runner.")
@click.option("--threads", type=click.IntRange(1, None), default=1, show_default=True,
              help="CPU threads for PyTorch and onnxruntime alike.")
@click.option("--latency-images", type=click.IntRange(1, None), default=16, show_default=True,
              help="Validation images cycled through while timing (latency depends on the content).")
@click.option("--map-images", type=click.IntRange(1, None), default=None,
              help="Validation images for mAP (default: all).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the JSON report here (default: <export-dir>/latency.json).")
def latency(checkpoint, data, export_dir, calib_data, warmup, iterations, threads, latency_images, map_images, out):
    """Latency and mAP of CHECKPOINT in PyTorch eager vs its ONNX exports on onnxruntime, batch 1, one run."""
    from gkd.kd.io import atomic_write_json

    rep = run_latency_benchmark(checkpoint, data, export_dir, calib_data=calib_data, warmup=warmup,
                                iterations=iterations, threads=threads, map_images=map_images,
                                latency_images=latency_images, log=lambda s: click.echo(s, err=True))
    path = out or export_dir / "latency.json"
    atomic_write_json(path, rep)
    click.echo(format_report(rep))
    click.echo(f"ratios: {', '.join(f'{k} {v:.3f}' for k, v in rep['ratios'].items())}")
    click.echo(f"report: {path}")
