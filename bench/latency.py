"""``gkd bench latency MODEL...``: the latency of checkpoints, ONNX files and TensorRT engines under one protocol.

Protocol (printed, and stored in every report):

- **Inputs**: real images of a COCO JSON (``--data``), cycled; batch 1, original size (the exported graph resizes).
- **Two views, never mixed.** *compute*: the runtime call on a prepared input (a tensor already on the device, a
  NumPy array for onnxruntime; on a GPU timed with CUDA events). *e2e*: from the image file: decode, host-to-device,
  compute, device-to-host, each phase kept apart.
- **Warm-up until steady, then a timed phase bounded by duration and count** (:mod:`gkd.bench.harness`), runners
  round-robin with a rotating order. Every per-call time is kept in the JSON report.
- **Statistics** (:mod:`gkd.bench.stats`): count, mean, std, min, p50, p90, p95, p99, max, CoV, throughput; the
  headline at batch 1 is MLPerf SingleStream's p90 (early-stopping estimate at 99% confidence when >= 64 queries).
- **Stamp** before and after: CPU, cores, threads, libraries, GPU name, driver, clocks and throttle reasons (NVML);
  the precision and provider actually used, read back from each runtime. Warnings when the CoV exceeds 1%
  (trtexec's threshold), when warm-up never became steady, or when the GPU throttled.
- **trtexec** (``--trtexec``, when it is on PATH) times TensorRT engines itself; its ``--exportTimes`` per-iteration
  times go through the same statistics.

``run_latency_benchmark`` is the pipeline's form: a checkpoint and its export folder, with the mAP of each model.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import torch

from gkd.core.errors import GkdError

from .artifacts import (ModelSpec, Unavailable, check_device_request, check_distinct_files, model_kind, open_runner,
                        runner_label)
from .harness import TimingPolicy, Timings, measure
from .stamp import machine_stamp, throttle_warnings
from .stats import COV_WARN_THRESHOLD, headline, latency_stats

__all__ = ["latency", "untimed_on_cpu", "latency_stats", "benchmark_models", "run_latency_benchmark", "format_report",
           "trtexec_times", "compute_call", "e2e_call"]

VIEWS = ("compute", "e2e")


def untimed_on_cpu(kind: str, precision: str) -> str | None:
    """Why a model is not timed on the CPU (None: it is). onnxruntime's CPU provider has no FP16 convolution
    kernels on x86: it inserts casts and computes in FP32, so an FP16 timing there measures casts, not FP16 (its
    accuracy is measured all the same)."""
    if kind == "onnx" and precision.endswith("fp16"):
        return ("onnxruntime's CPU provider has no FP16 kernels on x86 (it runs through casts): FP16 is timed on a "
                "GPU only")
    return None


def _cuda_timed(runner, fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run ``fn``; on a CUDA runner also time it with CUDA events (ms), else None."""
    dev = getattr(runner, "device", None)
    if dev is None or getattr(dev, "type", "cpu") != "cuda":
        return fn(), None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def compute_call(runner, images: Sequence[torch.Tensor]):
    """The compute view: ``fn(i)`` runs the runtime on prepared input ``i % n`` (prepared once, outside timing)."""
    prepared = [runner.prepare(im.unsqueeze(0).float().contiguous()) for im in images]

    def call(i: int):
        _, ms = _cuda_timed(runner, lambda: runner.compute(prepared[i % len(prepared)]))
        return None if ms is None else {"sample": ms}

    return call


def e2e_call(runner, files: Sequence[Path], clock: Callable[[], float] = time.perf_counter):
    """The end-to-end view: ``fn(i)`` decodes image file ``i % n`` and runs it through; phase times in ms."""
    from gkd.kd.data.coco import load_image_tensor

    def call(i: int):
        t0 = clock()
        x = load_image_tensor(files[i % len(files)]).unsqueeze(0)  # [1, 3, H, W], handed over as decoded (HWC order)
        t1 = clock()
        p = runner.prepare(x)
        t2 = clock()
        raw, ms = _cuda_timed(runner, lambda: runner.compute(p))
        t3 = clock()
        runner.finish(raw)
        t4 = clock()
        return {"decode": (t1 - t0) * 1e3, "h2d": (t2 - t1) * 1e3, "compute": ms if ms is not None else (t3 - t2) * 1e3,
                "d2h": (t4 - t3) * 1e3}

    return call


def trtexec_times(engine: Path, policy: TimingPolicy, shape: Sequence[int], *, exe: str = "trtexec",
                  timeout_s: float = 600.0) -> dict[str, list[float]]:
    """Time a TensorRT engine with trtexec; returns its per-iteration ``latency`` / ``compute`` / ``h2d`` / ``d2h``
    (ms) read from ``--exportTimes``. trtexec's ``Latency`` is H2D + compute + D2H of one query."""
    with tempfile.TemporaryDirectory() as tmp:
        times_file = Path(tmp) / "times.json"
        cmd = [exe, f"--loadEngine={engine}", f"--shapes=image:{'x'.join(str(int(d)) for d in shape)}",
               f"--warmUp={int(policy.warmup_s * 1000)}", f"--duration={max(0, math.ceil(policy.duration_s))}",
               f"--iterations={policy.min_iterations}", f"--exportTimes={times_file}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GkdError(f"{engine}: trtexec did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not times_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GkdError(f"{engine}: trtexec failed (exit {proc.returncode}): {tail[0][:300]}")
        trace = json.loads(times_file.read_text())
    keys = {"latency": "latencyMs", "compute": "computeMs", "h2d": "h2dMs", "d2h": "d2hMs"}
    return {k: [float(t[v]) for t in trace if v in t] for k, v in keys.items()}


def _verified(spec: ModelSpec) -> bool | None:
    """An ONNX file's parity verdict (:func:`gkd.export.manifest.parity_verdict`); the PyTorch checkpoint is the
    reference (None)."""
    from gkd.export.manifest import parity_verdict

    return parity_verdict(spec.path) if spec.kind == "onnx" else None


def _summarise(t: Timings, view: str) -> dict[str, Any]:
    stats = latency_stats(t.samples_ms)
    warnings = []
    if stats["cov"] > COV_WARN_THRESHOLD:
        warnings.append(f"unstable: CoV {stats['cov']:.1%} > {COV_WARN_THRESHOLD:.0%} (trtexec's threshold); a "
                        f"quiet machine, pinned clocks or more iterations make the numbers comparable")
    if t.steady is False:
        warnings.append(f"warm-up did not become steady within {t.warmup_s:.1f} s ({t.warmup_calls} calls)")
    return {"view": view, "latency": stats, "headline": headline(t.samples_ms),
            "phases": {k: latency_stats(v) for k, v in t.phases_ms.items()},
            "warmup": {"calls": t.warmup_calls, "seconds": t.warmup_s, "steady": t.steady}, "warnings": warnings}


def _time_view(view, labels, opened, tensors, files, policy, threads, notes, verified, log) -> dict[str, Any]:
    """One view's timings of every opened model: name -> report entry."""
    calls = {}
    for name, (spec, runner) in zip(labels, opened):
        if runner is not None:
            calls[name] = compute_call(runner, tensors) if view == "compute" else e2e_call(runner, files)
    warm = (f"a fixed warm-up of {policy.warmup_min_calls} call(s)" if policy.warmup_max_s <= 0 else
            f"warm-up >= {policy.warmup_min_calls} calls / {policy.warmup_s:g} s until steady")
    log(f"latency ({view} view): {len(calls)} runner(s), {len(tensors)} image(s), {threads} thread(s); {warm}, "
        f"then >= {policy.min_iterations} calls and {policy.duration_s:g} s each, round-robin")
    timings = measure(calls, policy) if calls else {}
    entries = {}
    for name, (spec, runner) in zip(labels, opened):
        if runner is not None:
            entry = _summarise(timings[name], view)
            entry.update({"path": str(spec.path), "kind": spec.kind, "precision": runner.precision,
                          "provider": runner.provider, "note": notes.get(id(runner), ""),
                          "verified": verified[id(spec)], "raw_times_ms": timings[name].samples_ms})
        elif view == "compute":  # a TensorRT engine timed by trtexec (it has no e2e view)
            t = trtexec_times(spec.path, policy, [1, *tensors[0].shape])
            entry = _summarise(Timings(samples_ms=t["compute"],
                                       phases_ms={k: v for k, v in t.items() if k != "compute"}), view)
            entry.update({"path": str(spec.path), "kind": spec.kind, "precision": "see engine stamp",
                          "provider": "trtexec (--exportTimes)", "note": "", "verified": None,
                          "raw_times_ms": t["compute"]})
        else:
            continue
        entries[name] = entry
    return entries


def benchmark_models(specs: Sequence[ModelSpec], data: Path, *, views: Sequence[str] = ("compute",),
                     device: str = "cpu", provider: str | None = None, threads: int = 1,
                     policy: TimingPolicy = TimingPolicy(), latency_images: int = 16, trtexec: bool = False,
                     groups: Sequence[str] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every model in every view; returns the report (``views[view][name]``, ``stamp``, ``skipped``...).

    ``groups`` (one per spec) prefixes each runner's label, ``teacher/pytorch-fp32``, so that models of the same
    runtime and precision (two students' INT8 files) are told apart in one round-robin measurement."""
    from gkd.export.images import load_image_set
    from gkd.kd.data.coco import load_coco

    check_distinct_files([s.path for s in specs])  # before any work
    torch.set_num_threads(threads)
    image_set = load_image_set(data, limit=latency_images, skip_unreadable=True)
    if not image_set.images:
        raise GkdError(f"{data}: none of its images could be decoded")
    index = load_coco(data)
    by_id = {int(im["id"]): index.image_path(im) for im in index.images}
    files = [by_id[i] for i, _ in image_set.images]
    tensors = [im for _, im in image_set.images]
    opened, skipped, notes, group_of = [], {}, {}, {}
    for i, spec in enumerate(specs):
        group_of[id(spec)] = groups[i] if groups else ""
        if spec.kind == "tensorrt" and trtexec:
            opened.append((spec, None))
            continue
        try:
            runner, note = open_runner(spec, device=device, provider=provider, threads=threads)
        except Unavailable as exc:
            skipped[str(spec.path)] = str(exc)
            log(f"skipped: {exc}")
            continue
        if note:
            log(note)
        opened.append((spec, runner))
        notes[id(runner)] = note
    if not opened:
        raise GkdError("no model can run here: " + "; ".join(skipped.values()))
    from .accuracy import grouped, unique_names

    labels = unique_names([grouped(group_of[id(s)], runner_label(s, r) if r is not None else "trtexec-engine")
                           for s, r in opened], [s.path for s, _ in opened])
    verified = {id(spec): _verified(spec) for spec, _ in opened}  # hashes each file once, not once per view
    try:
        before = machine_stamp(threads)
        report_views = {view: _time_view(view, labels, opened, tensors, files, policy, threads, notes, verified, log)
                        for view in views}
        after = machine_stamp(threads)
    finally:  # every runner opened here is closed here, whatever happened
        for _, runner in opened:
            if runner is not None:
                runner.__exit__(None, None, None)
    gpu_warnings = throttle_warnings(before, after)
    return {
        "benchmark": "latency", "report_version": 2,
        "protocol": {"batch": 1, "input": "decoded RGB float32 [1, 3, H, W] in [0, 1], original size",
                     "views": {"compute": "runtime call on a prepared input (CUDA events on GPU)",
                               "e2e": "decode + host-to-device + compute + device-to-host, phases apart"},
                     "policy": {k: getattr(policy, k) for k in policy.__dataclass_fields__},
                     "latency_images": len(tensors), "order": "round-robin, rotating", "device": device,
                     "threads": threads,
                     "headline": "p90 at batch 1 (MLPerf SingleStream; early-stopping estimate at 99% when >= 64 "
                                 "queries)"},
        "stamp": {"before": before, "after": after}, "warnings": gpu_warnings,
        "images_failed": [{"file": f, "reason": r} for f, r in image_set.failed],
        "views": report_views, "runners": report_views[views[0]], "skipped": skipped,
    }


def run_latency_benchmark(checkpoint: Path, data: Path, export_dir: Path, *, calib_data: Path | None,
                          warmup: int, iterations: int, threads: int, map_images: int | None, latency_images: int,
                          log: Callable[[str], None] = print, policy: TimingPolicy | None = None) -> dict[str, Any]:
    """A checkpoint and its gkd export folder: latency (compute view) and mAP of each, with ratios.

    The export folder is checked by content against the checkpoint; when it holds no export yet and
    ``calib_data`` is given, FP32 + INT8 are exported there first.
    """
    from gkd.export.manifest import MANIFEST_NAME, load_export_manifest
    from gkd.export.pipeline import ExportOptions, export_checkpoint

    if (export_dir / MANIFEST_NAME).is_file():
        manifest = load_export_manifest(export_dir)
        manifest.check_matches(checkpoint)
        log(f"using the export in {export_dir} (checked: it is this checkpoint's, files unchanged)")
    else:
        if calib_data is None:
            raise GkdError(f"{export_dir}: holds no export (export.json); give --calib-data to export FP32/INT8 "
                           f"there first, or run gkd export")
        export_checkpoint(ExportOptions(checkpoint=checkpoint, out=export_dir, precisions=("fp32", "int8"),
                                        calib_data=calib_data, val_data=data, threads=threads), log=log)
        manifest = load_export_manifest(export_dir)
    specs = [ModelSpec(checkpoint, "pytorch")]
    skipped = {}
    for p, f in manifest.files.items():
        why = untimed_on_cpu("onnx", p)
        if why:  # its accuracy is in the export's parity
            skipped[f"onnxruntime-{p}"] = why
            continue
        specs.append(ModelSpec(f.path, "onnx"))
    rep = benchmark_models(specs, data, threads=threads, policy=policy or TimingPolicy.fixed(warmup, iterations),
                           latency_images=latency_images, log=log)
    rep["skipped"].update(skipped)
    rep.update({"checkpoint": str(checkpoint), "data": str(data), "export_dir": str(export_dir)})
    _add_accuracy(rep, [checkpoint] + [Path(r["path"]) for n, r in rep["runners"].items() if r["kind"] == "onnx"],
                  data, map_images, threads, log)
    for name, r in rep["runners"].items():
        if r["kind"] == "onnx":
            r["verified"] = manifest.files[r["precision"]].verified
        elif r["kind"] == "pytorch":
            r["verified"] = True  # the reference
    rep["ratios"], rep["targets"] = _ratios(rep["runners"])
    return rep


def _add_accuracy(rep: dict[str, Any], models: list[Path], data: Path, limit: int | None, threads: int, log) -> None:
    """The mAP of every timed model through the one evaluation path (``gkd eval``'s)."""
    from gkd.kd.data.coco import load_coco

    from .accuracy import evaluate_models

    if not any(load_coco(data).anns_by_image.values()):
        for r in rep["runners"].values():
            r["accuracy"] = None
        return

    acc = evaluate_models(models, data, threads=threads, limit=limit, log=log)
    for name, r in rep["runners"].items():
        r["accuracy"] = (acc["models"].get(name) or {}).get("metrics")


def _ratios(runners: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    p50 = {n: r["latency"]["p50"] for n, r in runners.items()}
    mean = {n: r["latency"]["mean"] for n, r in runners.items()}
    mp = {n: (r.get("accuracy") or {}).get("bbox_mAP") for n, r in runners.items()}
    ratios = {}
    if "onnxruntime-fp32" in p50 and "pytorch-fp32" in p50:
        ratios["ort_fp32_vs_pytorch_p50"] = p50["onnxruntime-fp32"] / p50["pytorch-fp32"]
        ratios["ort_fp32_vs_pytorch_mean"] = mean["onnxruntime-fp32"] / mean["pytorch-fp32"]
    if "onnxruntime-int8" in p50 and "onnxruntime-fp32" in p50:
        ratios["ort_int8_vs_ort_fp32_p50"] = p50["onnxruntime-int8"] / p50["onnxruntime-fp32"]
        if mp.get("onnxruntime-fp32"):
            ratios["int8_map_vs_fp32"] = mp["onnxruntime-int8"] / mp["onnxruntime-fp32"]
    targets = {"ort_fp32_at_most_0.8x_pytorch": ratios.get("ort_fp32_vs_pytorch_p50", math.inf) <= 0.8,
               "int8_faster_than_fp32": ratios.get("ort_int8_vs_ort_fp32_p50", math.inf) < 1.0,
               "int8_map_at_least_99pct_fp32": ratios.get("int8_map_vs_fp32", 0.0) >= 0.99}
    return ratios, targets


def format_report(rep: dict[str, Any], view: str | None = None) -> str:
    """Side-by-side markdown table of one view, with ratios against the first model (p50)."""
    view = view or next(iter(rep.get("views", {"compute": None})))
    runners = rep["views"][view] if "views" in rep else rep["runners"]
    base = next(iter(runners.values()))["latency"]["p50"] if runners else 1.0
    lines = [f"{view} view ({rep['protocol']['views'].get(view, '')})", "",
             "| runner | runs on | headline p90 ms | p50 | p95 | p99 | mean +- std | CoV | img/s | vs first (p50) "
             "| mAP |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runners.items():
        s = r["latency"]
        acc = r.get("accuracy")
        m = acc["bbox_mAP"] if acc else None
        flag = " (parity NOT verified)" if r.get("verified") is False else ""
        star = "" if r["headline"]["early_stopping"] else "*"
        lines.append(f"| {name}{flag} | {r['provider']} | {r['headline']['value']:.1f}{star} | {s['p50']:.1f} "
                     f"| {s['p95']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} +- {s['std']:.1f} | {s['cov']:.1%} "
                     f"| {s['throughput_ips']:.2f} | {s['p50'] / base:.2f}x | {'-' if m is None else format(m, '.4f')} |")
    for name, why in rep["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
    lines.append("")
    lines.append("headline: MLPerf SingleStream p90, early-stopping estimate at 99% confidence; * = plain sample p90 "
                 "(fewer than 64 timed calls)")
    phases = [(n, r["phases"]) for n, r in runners.items() if r.get("phases")]
    if phases:
        lines += ["", "| runner | " + " | ".join(f"{k} p50 ms" for k in phases[0][1]) + " |",
                  "|---|" + "---|" * len(phases[0][1])]
        for name, ph in phases:
            lines.append(f"| {name} | " + " | ".join(f"{v['p50']:.2f}" for v in ph.values()) + " |")
    return "\n".join(lines)


#: the first columns of the CSV report (how a CSV gkd wrote is recognised before it is replaced)
CSV_HEADER = "view,runner,path,provider,precision,headline_ms,headline"


def report_csv(rep: dict[str, Any]) -> str:
    """One row per (view, runner): the statistics and the headline."""
    buf = io.StringIO()
    cols = ["count", "mean", "std", "min", "p50", "p90", "p95", "p99", "max", "cov", "throughput_ips"]
    w = csv.writer(buf)
    w.writerow(CSV_HEADER.split(",") + cols)
    for view, runners in rep["views"].items():
        for name, r in runners.items():
            w.writerow([view, name, r["path"], r["provider"], r["precision"], f"{r['headline']['value']:.6g}",
                        r["headline"]["label"], *(f"{r['latency'][c]:.6g}" for c in cols)])
    return buf.getvalue()


def _check_report_path(path: Path, option: str) -> None:
    """Before the timing: the report's folder is writable, and an existing file there is replaced only if it is a
    gkd latency report (JSON) or CSV (a file of the user's is never replaced, named or not)."""
    from gkd.core.io import ensure_writable_folder, json_field_is, refuse_foreign_file

    ensure_writable_folder(path.parent if str(path.parent) else Path("."), "the report's folder")
    if option == "--csv":
        refuse_foreign_file(path, option, lambda p: p.read_text(encoding="utf-8").startswith(CSV_HEADER))
    else:
        refuse_foreign_file(path, option, json_field_is("benchmark", "latency"))


@click.command("latency", context_settings={"max_content_width": 110})
@click.argument("models", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="COCO JSON whose images are the inputs (and, with annotations, the mAP of every model).")
@click.option("--export-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A gkd export folder (export.json): its ONNX files join MODELS, checked by content against the "
                   "checkpoint given; exported there first (FP32 + INT8) when it holds none and --calib-data is set.")
@click.option("--calib-data", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Training-split COCO JSON for INT8 calibration when --export-dir holds no export yet.")
@click.option("--view", type=click.Choice(["compute", "e2e", "both"]), default="compute", show_default=True,
              help="compute: the runtime call on prepared inputs; e2e: from the image file, phases apart.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="onnxruntime execution provider for ONNX models [default: from --device].")
@click.option("--threads", type=click.IntRange(1, None), default=1, show_default=True,
              help="CPU threads for PyTorch and onnxruntime alike.")
@click.option("--warmup", type=click.IntRange(0, None), default=5, show_default=True,
              help="Minimum untimed warm-up calls per runner.")
@click.option("--warmup-time", type=click.FloatRange(0, None), default=0.2, show_default=True,
              help="Minimum warm-up seconds per runner (trtexec --warmUp).")
@click.option("--warmup-max", type=click.FloatRange(0, None), default=20.0, show_default=True,
              help="Give up waiting for a steady warm-up after this many seconds (0: fixed warm-up, not tested).")
@click.option("--duration", type=click.FloatRange(0, None), default=3.0, show_default=True,
              help="Minimum timed seconds per runner (trtexec --duration).")
@click.option("--iterations", type=click.IntRange(1, None), default=10, show_default=True,
              help="Minimum timed calls per runner (trtexec --iterations).")
@click.option("--max-iterations", type=click.IntRange(1, None), default=None, help="Stop timing at this many calls.")
@click.option("--latency-images", type=click.IntRange(1, None), default=16, show_default=True,
              help="Images cycled through while timing (latency depends on the content).")
@click.option("--map-images", type=click.IntRange(1, None), default=None,
              help="Images for mAP (default: all; only with --export-dir).")
@click.option("--trtexec", "use_trtexec", is_flag=True, help="Time TensorRT engines with trtexec (must be on PATH).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the JSON report here [default: <export-dir>/latency.json, else ./latency.json].")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of the tables.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write one CSV row per view and runner.")
def latency(models, data, export_dir, calib_data, view, device, provider, threads, warmup, warmup_time, warmup_max,
            duration, iterations, max_iterations, latency_images, map_images, use_trtexec, out, as_json, csv_path):
    """Latency of MODELS (checkpoints .pt, ONNX files, TensorRT engines), batch 1, side by side in one run.

    \b
    Examples:
      gkd bench latency runs/student/checkpoints/model.pt --export-dir runs/student/export --data val.json
      gkd bench latency a.onnx b.onnx --data val.json --view both --duration 10 --csv lat.csv
    """
    from gkd.core.io import atomic_write_json, atomic_write_text

    if max_iterations is not None and max_iterations < iterations:
        raise GkdError(f"--max-iterations {max_iterations} is below --iterations {iterations}")
    check_device_request(device, provider)
    if use_trtexec and shutil.which("trtexec") is None:
        raise GkdError("--trtexec: trtexec is not on PATH (it ships with TensorRT: add its bin/ folder to PATH)")
    policy = TimingPolicy(warmup_s=warmup_time, warmup_min_calls=warmup, warmup_max_s=warmup_max,
                          duration_s=duration, min_iterations=iterations, max_iterations=max_iterations)
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    specs = [ModelSpec(Path(m), model_kind(m)) for m in models]
    path = out or (export_dir / "latency.json" if export_dir is not None else Path("latency.json"))
    _check_report_path(path, "--out")
    if csv_path is not None:
        _check_report_path(csv_path, "--csv")
    if export_dir is not None:
        ckpts = [s for s in specs if s.kind == "pytorch"]
        if len(ckpts) != 1 or len(specs) != 1:
            raise GkdError("--export-dir: give exactly one checkpoint (the export's source) as MODEL")
        rep = run_latency_benchmark(ckpts[0].path, data, export_dir, calib_data=calib_data, warmup=warmup,
                                    iterations=iterations, threads=threads, map_images=map_images,
                                    latency_images=latency_images, log=log, policy=policy)
    else:
        if not specs:
            raise GkdError("give at least one MODEL (or a checkpoint and --export-dir)")
        views = VIEWS if view == "both" else (view,)
        rep = benchmark_models(specs, data, views=views, device=device, provider=provider, threads=threads,
                               policy=policy, latency_images=latency_images, trtexec=use_trtexec, log=log)
    atomic_write_json(path, rep)
    if csv_path is not None:
        atomic_write_text(csv_path, report_csv(rep))
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        for v in rep["views"]:
            click.echo(format_report(rep, v))
            click.echo("")
        if rep.get("ratios"):
            click.echo(f"ratios: {', '.join(f'{k} {v:.3f}' for k, v in rep['ratios'].items())}")
    for name, r in ((n, r) for v in rep["views"].values() for n, r in v.items()):
        for w in r["warnings"] + ([r["note"]] if r.get("note") else []):
            click.echo(f"warning: {name} ({r['view']}): {w}", err=True)
    for w in rep["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"report: {path}", err=as_json)
