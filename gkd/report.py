"""What ``gkd run`` tells its user: the deployment table, the accuracy gate, report.md / report.json and the plots.

Everything here reads the manifest's stage records (plain dicts); nothing trains or measures. The headline is the
**deployment table**: for each exported precision, the val mAP of the baseline student (no distillation) and of
the distilled one measured on their exported files, the gain, and the p50/p90 latency of those files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["accuracy_gate", "deployment_rows", "int8_lines", "tensorrt_lines", "render_report", "report_json",
           "summary_table", "summary_text", "write_plots", "STUDENTS", "ROW_LABELS"]

#: the students gkd run ships and compares: stage name -> the group label its models carry in the bench reports
STUDENTS = {"distill": "distilled", "baseline": "baseline"}
RUNTIME = {"fp32": "onnxruntime-fp32", "fp16": "onnxruntime-fp16", "int8": "onnxruntime-int8"}


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def deployment_rows(bench: dict[str, Any] | None, precisions: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """One row per exported precision: baseline / distilled mAP on the exported files, the gain, their latency.

    ``bench`` is the bench stage's record (``runners``: label -> p50_ms, p90_ms, bbox_mAP, verified; ``skipped``:
    label -> why it was not timed). Latency is the distilled file's (the baseline's, same architecture, is in
    ``baseline_p50_ms``); a precision not timed here carries the reason in ``latency_note``.
    """
    runners = (bench or {}).get("runners") or {}
    skipped = (bench or {}).get("skipped") or {}
    rows = []
    for p in precisions:
        name = RUNTIME.get(p, f"onnxruntime-{p}")
        dist, base = runners.get(f"distilled/{name}") or {}, runners.get(f"baseline/{name}") or {}
        d_map, b_map = dist.get("bbox_mAP"), base.get("bbox_mAP")
        rows.append({"precision": p, "baseline_mAP": b_map, "distilled_mAP": d_map,
                     "gain": None if d_map is None or b_map is None else d_map - b_map,
                     "p50_ms": dist.get("p50_ms"), "p90_ms": dist.get("p90_ms"),
                     "baseline_p50_ms": base.get("p50_ms"), "verified": dist.get("verified"),
                     "latency_note": skipped.get(f"distilled/{name}", "")})
    qad = runners.get("qad/onnxruntime-int8")
    if qad is not None:  # the quantization-aware distilled student's INT8 file (gkd run qad=...)
        rows.append({"precision": "int8-qad", "baseline_mAP": None, "distilled_mAP": qad.get("bbox_mAP"),
                     "gain": None, "p50_ms": qad.get("p50_ms"), "p90_ms": qad.get("p90_ms"), "baseline_p50_ms": None,
                     "verified": qad.get("verified"), "latency_note": skipped.get("qad/onnxruntime-int8", "")})
    return rows


#: how the deployment table names a row's precision
ROW_LABELS = {"int8": "int8 (PTQ)", "int8-qad": "int8 (QAD)"}


def accuracy_gate(bench: dict[str, Any] | None, min_ratio: float, export: dict[str, Any] | None = None,
                  max_int8_latency_ratio: float = 0.0, qad_export: dict[str, Any] | None = None) -> dict[str, Any]:
    """The deployment gate on the shipped (distilled) student, from the bench and export stages' records.

    Checks, each stated in ``checked`` (and, when it fails, in ``failures``):

    * its FP32 export detects (val mAP > 0: a model that detects nothing passes no gate);
    * every file it ships is verified (parity against PyTorch passed; the export stage's record);
    * its INT8 file is INT8 (at least the export's floor of multiply-accumulates at INT8, read from the file) and
      its mAP verdict against FP32 passed: at most ``1 - min_ratio`` of FP32's mAP lost beyond chance, judged by
      the export on the whole val split with a paired bootstrap (the numbers, images and interval are quoted);
    * with ``max_int8_latency_ratio`` > 0: INT8 p50 <= that x FP32 p50 (bench stage, side by side, one run);
    * with a quantization-aware student (``qad_export``): its files verified, its INT8 file INT8.

    Returns ``{"min_ratio", "max_int8_latency_ratio", "passed": True | False | None (not checked), "checked" (the
    checks that passed), "failures"}``. ``min_ratio`` 0 turns the gate off.
    """
    out: dict[str, Any] = {"min_ratio": min_ratio, "max_int8_latency_ratio": max_int8_latency_ratio,
                           "passed": None, "checked": [], "failures": []}
    if min_ratio <= 0:
        out["reason"] = "gate off (gate_min_ratio=0)"
        return out
    runners = (bench or {}).get("runners") or {}
    ref_name = "distilled/onnxruntime-fp32" if "distilled/onnxruntime-fp32" in runners else "distilled/pytorch-fp32"
    ref = (runners.get(ref_name) or {}).get("bbox_mAP")
    if ref is None:
        out["reason"] = "no mAP measured (no bench stage, or a val split without annotations)"
        return out

    def check(ok: bool, what: str, failure: str) -> None:
        """A passed check is listed under ``checked``, a failed one under ``failures`` only (never both)."""
        if ok:
            out["checked"].append(what)
        else:
            out["failures"].append(failure)

    check(ref > 0, f"{ref_name} detects (mAP {ref:.4f})",
          f"{ref_name} has mAP {ref:.4f} on the val split: a model that detects nothing passes no gate")
    files = ((export or {}).get("outputs") or {}).get("files") or {}
    parity = (export or {}).get("parity") or {}
    for p, f in files.items():
        fails = (parity.get(p) or {}).get("failures") or []
        check(bool(f.get("verified")), f"distilled {p} export verified against PyTorch",
              f"distilled {p} export is NOT verified: {'; '.join(fails) or 'parity failed'}")
    level = (parity.get("int8") or {}).get("map")
    record = (export or {}).get("int8") or {}
    if "int8" in files and record:
        share = record.get("macs_int8_share")
        check(bool(record.get("is_int8")), f"distilled int8 file is INT8: {_pct(share)}% of its Conv/Gemm MACs "
              f"(floor {_pct(record.get('floor'))}%)", f"distilled int8 file is not INT8: only {_pct(share)}% of "
              f"its MACs run in INT8 (floor {_pct(record.get('floor'))}%)")
    if level:
        check(bool(level["passed"]), f"distilled int8 vs fp32 (gate_min_ratio={min_ratio:g}): {level['summary']}",
              f"distilled int8 loses more than {1 - min_ratio:.1%} of fp32's mAP beyond chance: {level['summary']}")
    qad_files = ((qad_export or {}).get("outputs") or {}).get("files") or {}
    for p, f in qad_files.items():  # a shipped quantization-aware student: its files are verified too
        fails = (((qad_export or {}).get("parity") or {}).get(p) or {}).get("failures") or []
        check(bool(f.get("verified")), f"qad {p} export verified against the fake-quantized PyTorch student",
              f"qad {p} export is NOT verified: {'; '.join(fails) or 'parity failed'}")
    qad_record = (qad_export or {}).get("int8") or {}
    if qad_record:
        check(bool(qad_record.get("is_int8")), f"qad int8 file is INT8: {_pct(qad_record.get('macs_int8_share'))}% "
              "of its Conv/Gemm MACs", f"qad int8 file is not INT8: {_pct(qad_record.get('macs_int8_share'))}% of "
              "its MACs")
    if max_int8_latency_ratio > 0:
        _latency_check(check, runners, (bench or {}).get("samples_ms") or {}, max_int8_latency_ratio)
    out["passed"] = not out["failures"]
    return out


def _latency_check(check, runners: dict[str, Any], samples: dict[str, list[float]], max_ratio: float) -> None:
    """INT8 p50 against FP32 p50 of the shipped student (one round-robin measurement): failed only when INT8 is
    slower than ``max_ratio`` x FP32 beyond chance (the whole paired 95% interval of the ratio above it), as the mAP
    check fails only on a loss beyond chance; the ratio, its interval and the rounds are quoted either way."""
    from gkd.bench.stats import median_ratio_interval

    names = [f"distilled/onnxruntime-{p}" for p in ("fp32", "int8")]
    fp32, int8 = ((runners.get(n) or {}).get("p50_ms") for n in names)
    if not fp32 or not int8:
        return
    ratio = f"p50 {int8:.1f} ms / fp32 {fp32:.1f} ms = {int8 / fp32:.2f}"
    low = high = int8 / fp32
    if all(samples.get(n) for n in names):  # the rounds both were timed in: how much the ratio moves by chance
        ci = median_ratio_interval(samples[names[1]], samples[names[0]])
        low, high = ci["low"], ci["high"]
        ratio += f" (95% interval [{low:.2f}, {high:.2f}] over {ci['rounds']} rounds)"
    limit = f"gate_max_int8_latency_ratio={max_ratio:g}"
    verdict = f"<= {limit}" if high <= max_ratio else f": {limit} is inside the interval, within chance"
    check(low <= max_ratio, f"distilled int8 {ratio} {verdict}",
          f"distilled int8 is slower than allowed beyond chance: {ratio} > {limit}")


def _train_map(rec: dict | None, key: str = "val/bbox_mAP") -> str:
    return _pct((rec or {}).get("metrics", {}).get(key))


def summary_table(m: dict[str, Any]) -> list[str]:
    """The deployment table (markdown lines), or [] when nothing was benchmarked."""
    bench = m["stages"].get("bench")
    if not bench:
        return []
    rows = deployment_rows(bench, m["config"].get("precisions") or ())
    lines = ["| precision | baseline mAP | distilled mAP | gain | p50 ms | p90 ms | verified |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        latency = (_ms(r["p50_ms"]), _ms(r["p90_ms"])) if r["p50_ms"] is not None else ("not timed", "")
        verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
        label = ROW_LABELS.get(r["precision"], r["precision"]) if "int8-qad" in {x["precision"] for x in rows} \
            else r["precision"]
        lines.append(f"| {label} | {_pct(r['baseline_mAP'])} | {_pct(r['distilled_mAP'])} | "
                     f"{_pct(r['gain'], signed=True)} | {latency[0]} | {latency[1]} | {verified} |")
    notes = sorted({r["latency_note"] for r in rows if r["latency_note"]})
    lines += [f"\nNot timed: {n}" for n in notes]
    return lines


def _gate_lines(m: dict[str, Any]) -> list[str]:
    gate = m.get("gate") or {}
    if not gate:
        return []
    verdict = {True: "PASS", False: "FAILED", None: "not checked"}[gate.get("passed")]
    lines = [f"## Accuracy gate: {verdict}", ""]
    lines += [f"- passed: {c}" for c in gate.get("checked", [])]
    lines += [f"- **failed**: {f}" for f in gate.get("failures", [])]
    if gate.get("reason"):
        lines.append(f"- {gate['reason']}")
    return lines


def int8_lines(m: dict[str, Any]) -> list[str]:
    """What the shipped INT8 file holds (read back from it by the export) and its latency against FP32."""
    export = m["stages"].get("export") or {}
    rec = export.get("int8")
    if not rec:
        return []
    counts = rec.get("counts") or {}
    acts, weights = rec.get("activations") or {}, rec.get("weights") or {}
    fmt = (f"{acts.get('dtype', '?')} {'symmetric' if acts.get('symmetric') else 'asymmetric'} "
           f"{acts.get('granularity', '')} activations, {weights.get('dtype', '?')} {weights.get('granularity', '')} "
           f"weights, {rec.get('bias') or 'no'} bias") if acts else "no INT8 layer"
    lines = [f"INT8 file (read back from it): {counts.get('int8', 0)} of {counts.get('weighted', 0)} weighted layers "
             f"INT8, {_pct(rec.get('macs_int8_share'))}% of their multiply-accumulates (floor "
             f"{_pct(rec.get('floor'))}%: {'INT8' if rec.get('is_int8') else 'NOT INT8'}); {fmt}"]
    speed = export.get("speed")
    if speed:
        cpu = speed["machine"]
        dot = ", ".join(cpu["int8_dot_product"]) or "no integer dot-product instructions"
        lines.append(f"INT8 / FP32 latency at export, side by side: p50 {speed['p50_ms']['int8']:.1f} / "
                     f"{speed['p50_ms']['fp32']:.1f} ms = {speed['ratio']['int8/fp32']:.2f} (onnxruntime CPU, "
                     f"{speed['threads']} thread(s), {cpu['cpu']}, {cpu['vector']}, {dot})")
    return lines


def tensorrt_lines(export: dict[str, Any]) -> list[str]:
    """What TensorRT-RTX built of the shipped student's static graph (version, precisions, build time, engine size),
    what TensorRT proper did here, and the trtexec commands a TensorRT 10/11 user runs."""
    lines = []
    rtx = export.get("tensorrt_rtx") or {}
    if rtx.get("ran"):
        builds = []
        for key, r in (rtx.get("results") or {}).items():
            b = r.get("build") or {}
            if b.get("ok"):
                builds.append(f"{key} ({b['seconds']:.1f} s, {b['engine_bytes'] / 2**20:.1f} MB)")
            else:
                builds.append(f"{key}: {(rtx.get('summary') or {}).get(key, 'not built')}")
        version = next((r.get("tensorrt_rtx") for r in rtx["results"].values() if r.get("tensorrt_rtx")), "?")
        lines.append(f"TensorRT-RTX {version} parsed and built on the CPU (engines not run: no GPU here): "
                     + "; ".join(builds))
    elif rtx:
        lines.append(f"TensorRT-RTX: not checked ({rtx.get('reason', '?')})")
    trt = export.get("tensorrt") or {}
    if isinstance(trt, dict) and trt.get("reason"):
        lines.append(f"TensorRT: no engine built here ({trt['reason']})")
    commands = export.get("trtexec") or {}
    if commands:
        lines += ["", "Build and time the engines with TensorRT 10/11 (on the machine that will run them):", "",
                  "```bash"] + [f"{cmd}" for cmd in commands.values()] + ["```"]
    return lines


def summary_text(m: dict[str, Any]) -> str:
    """What ``gkd run`` prints at the end: the models' mAP, the deployment table, the student's speed, the gate."""
    st = m["stages"]
    lines = ["val mAP after training: " + ", ".join(
        f"{label} {_train_map(st[stage])}" for stage, label in (("teacher", "teacher"), ("baseline", "baseline"),
                                                               ("distill", "distilled"), ("qad", "qad (fake INT8)"))
        if stage in st), ""]
    lines += summary_table(m)
    lines += ([""] + int8_lines(m)) if int8_lines(m) else []
    speed = (st.get("bench") or {}).get("speed") or {}
    if speed:
        lines += ["", f"the distilled student is {speed['teacher_over_student_p50']:.2f}x faster than the teacher "
                      f"(PyTorch p50 {speed['student_p50_ms']:.1f} vs {speed['teacher_p50_ms']:.1f} ms)"]
    return "\n".join(lines + [""] + _gate_lines(m))


def render_report(m: dict[str, Any]) -> str:
    """``runs/<name>/report.md``: what was shipped, how it measured, and what this invocation did."""
    st = m["stages"]
    lines = [f"# gkd run report: {m['config']['name']}", "", f"Command (this invocation): `{' '.join(m['command'])}`"]
    table = summary_table(m)
    bench = st.get("bench") or {}
    if table:
        lines += ["", "## Deployment: what distillation bought, per exported precision", "",
                  "COCO bbox mAP (%) on the val split, measured on the exported ONNX files; latency of the distilled "
                  f"student's file at batch 1 on {bench.get('device', 'cpu')}, {bench.get('threads', 1)} thread(s).",
                  ""] + table
        speed = bench.get("speed") or {}
        if speed.get("teacher_over_student_p50"):
            lines += ["", f"Student speed: the teacher (PyTorch) takes {speed['teacher_p50_ms']:.1f} ms p50, the "
                          f"distilled student (PyTorch) {speed['student_p50_ms']:.1f} ms: "
                          f"**{speed['teacher_over_student_p50']:.2f}x faster**, measured side by side."]
    lines += ["", "## Stages", "", "| stage | this invocation | why | seconds | made by |", "|---|---|---|---|---|"]
    for o in m.get("invocation", []):
        made_by = " ".join(st.get(o["stage"], {}).get("command", []))
        lines.append(f"| {o['stage']} | {o['action']} | {o['reason']} | {o['seconds']:.0f} | `{made_by}` |")
    lines += ["", "## Accuracy during training (COCO bbox AP %, val split, PyTorch)", "",
              "| model | mAP | AP50 | AP75 |", "|---|---|---|---|"]
    for stage, label in (("teacher", "teacher"), ("baseline", "student, no distillation (baseline)"),
                         ("distill", "student, global-knowledge distillation (shipped)"),
                         ("qad", "student, quantization-aware distillation (fake INT8)")):
        if stage in st:
            lines.append(f"| {label} | {_train_map(st[stage])} | {_train_map(st[stage], 'val/bbox_mAP_50')} "
                         f"| {_train_map(st[stage], 'val/bbox_mAP_75')} |")
    subsets = bench.get("subsets") or {}
    if subsets:
        names = list(next(iter(subsets.values())))
        lines += ["", "## Hard cases (AP % on the val objects tagged so by the generator)", "",
                  "| model | all | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for model, aps in subsets.items():
            overall = (bench.get("runners", {}).get(model) or {}).get("bbox_mAP")
            lines.append(f"| {model} | {_pct(overall)} | " + " | ".join(
                _pct(aps[n]) if aps[n] >= 0 else "none" for n in names) + " |")
    if "export" in st:
        lines += ["", "## Exports (parity against the PyTorch student on real val images)", "",
                  "| student | precision | file | verified | sha256 |", "|---|---|---|---|---|"]
        for stage, student in (("export", "distilled"), ("export-baseline", "baseline"), ("export-qad", "qad")):
            for p, f in (st.get(stage) or {}).get("outputs", {}).get("files", {}).items():
                lines.append(f"| {student} | {p} | {f['onnx']['path']} | {'yes' if f['verified'] else 'NO'} | "
                             f"{f['onnx']['sha256'][:16]} |")
        lines += ([""] + [f"- {ln}" for ln in int8_lines(m)]) if int8_lines(m) else []
        lines += [""] + tensorrt_lines(st["export"])
    if bench.get("runners"):
        lines += ["", "## Every runner (batch 1, latency and val mAP)", "",
                  "| runner | runs on | p50 ms | p90 ms | mAP |", "|---|---|---|---|---|"]
        for n, r in bench["runners"].items():
            lines.append(f"| {n} | {r.get('provider') or '-'} | {_ms(r.get('p50_ms'))} | {_ms(r.get('p90_ms'))} | "
                         f"{_pct(r.get('bbox_mAP'))} |")
    lines += [""] + _gate_lines(m) if m.get("gate") else []
    plots = m.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}", ""]
    return "\n".join(lines)


def report_json(m: dict[str, Any]) -> dict[str, Any]:
    """``report.json``: the report's numbers for scripts (the manifest holds the full records)."""
    st = m["stages"]
    bench = st.get("bench") or {}
    return {"format": "gkd-run-report", "version": 1, "name": m["config"]["name"],
            "deployment": deployment_rows(bench, m["config"].get("precisions") or ()) if bench else [],
            "speed": bench.get("speed") or {}, "gate": m.get("gate"),
            "training": {s: st[s].get("metrics", {}) for s in ("teacher", "baseline", "distill", "qad") if s in st},
            "hard_cases": bench.get("subsets") or {}, "per_class_AP": bench.get("per_class") or {},
            "runners": bench.get("runners") or {}, "plots": m.get("plots") or {},
            "invocation": m.get("invocation", [])}


def write_plots(m: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """The report's PNGs in ``run_dir`` (name -> path); a plot without data is left out."""
    from gkd.bench import plots

    st = m["stages"]
    out: dict[str, Path | None] = {}
    curves = {name: run_dir / name / "metrics.csv" for name in ("teacher", "baseline", "distill") if name in st}
    out["training curves"] = plots.training_curves(curves, run_dir / "training_curves.png")
    bench = st.get("bench") or {}
    if bench:
        out["per-class AP"] = plots.per_class_ap(bench.get("per_class") or {}, run_dir / "per_class_ap.png")
        out["latency"] = plots.latency_distribution(bench.get("samples_ms") or {}, run_dir / "latency.png")
        points = {n: (r["p90_ms"], r["bbox_mAP"]) for n, r in (bench.get("runners") or {}).items()
                  if r.get("p90_ms") is not None and r.get("bbox_mAP") is not None}
        out["mAP vs p90 latency"] = plots.map_vs_latency(points, run_dir / "map_vs_latency.png")
    return {k: str(v) for k, v in out.items() if v is not None}
