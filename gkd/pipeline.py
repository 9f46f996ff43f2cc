"""``gkd run``: the one-command pipeline, data -> teacher -> student -> export -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json`` (artifact paths with
SHA-256, tool versions, the exact command, seeds, timings). Rerunning the same command after a kill skips finished
stages and resumes an interrupted training stage from its last epoch, so nothing already computed is lost.
"""
from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

__all__ = ["PipelineConfig", "run_pipeline", "run"]

log = logging.getLogger("gkd")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "kd" / "configs"


@dataclass(frozen=True)
class PipelineConfig:
    """What ``gkd run`` does. Stage sections are overrides applied on top of the stage's own YAML config."""

    name: str = "default"
    runs_dir: str = "runs"
    seed: int = 0
    #: dataset folder; generated with the synthetic generator when it holds no train.json
    data_root: str = "data/synth"
    synth_images: int = 800
    synth_size: int = 160
    teacher_config: str = str(CONFIG_DIR / "teacher.yaml")
    student_config: str = str(CONFIG_DIR / "distill_gkd.yaml")
    #: an existing teacher checkpoint (gkd or torchvision format) instead of training one
    teacher_checkpoint: str = ""
    #: overrides (nested mapping) for the teacher / student run configs, e.g. {"train": {"epochs": 2}}
    teacher: Any = field(default_factory=dict)
    student: Any = field(default_factory=dict)
    #: also train the student without distillation (same schedule) to report what distillation bought
    baseline: bool = False
    #: export precisions, and whether to benchmark latency/mAP of the exports
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    bench: bool = True
    bench_iterations: int = 30

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("gkd", "torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "pycocotools", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import subprocess

        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class Manifest:
    """``runs/<name>/manifest.json``: stage records, rewritten atomically after every stage."""

    def __init__(self, path: Path, cfg: PipelineConfig):
        from kd.config import to_dict
        from kd.io import read_json

        self.path = path
        self.data: dict[str, Any] = read_json(path, "manifest") if path.exists() else {}
        self.data.update({"format": "gkd-manifest", "version": 1, "command": sys.argv,
                          "config": to_dict(cfg), "versions": _versions()})
        self.data.setdefault("stages", {})

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def record(self, stage: str, **info: Any) -> None:
        from kd.io import atomic_write_json

        self.data["stages"][stage] = {"status": "done", **info}
        atomic_write_json(self.path, self.data)


def _artifact(path: Path) -> dict[str, str]:
    from kd.io import file_sha256

    return {"path": str(path), "sha256": file_sha256(path)}


def _stage(manifest: Manifest, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    if manifest.done(name):
        log.info("stage %s: already done, skipped (see %s)", name, manifest.path)
        return
    log.info("stage %s: starting", name)
    t0 = time.perf_counter()
    info = fn()
    manifest.record(name, seconds=round(time.perf_counter() - t0, 1), **info)
    log.info("stage %s: done in %.0f s", name, time.perf_counter() - t0)


def _overrides(cfg: PipelineConfig, stage: str, extra: dict) -> list[str]:
    from kd.config import flatten_overrides

    return [f"runs_dir={cfg.run_dir}", f"name={stage}", f"seed={cfg.seed}", f"data.root={cfg.data_root}",
            *flatten_overrides(extra)]


def _result(run_dir: Path, record: dict) -> dict[str, Any]:
    return {"checkpoint": _artifact(run_dir / "checkpoints" / "model.pt"),
            "metrics": {k: v for k, v in record.items() if k.startswith("val/")}}


def _teacher_stage(cfg: PipelineConfig) -> dict[str, Any]:
    from kd.config import load_config
    from kd.train import train_detector

    run_cfg = load_config(cfg.teacher_config, _overrides(cfg, "teacher", cfg.teacher))
    record = train_detector(run_cfg, resume=(run_cfg.run_dir / "checkpoints" / "last.pt").exists())
    return _result(run_cfg.run_dir, record)


def _student_stage(cfg: PipelineConfig, teacher_ckpt: str, method: str, stage: str) -> dict[str, Any]:
    from kd.config import load_config
    from kd.distill.config import DistillRunConfig
    from kd.distill.run import run_distillation

    extra = ["distill.teacher.arch=null", "distill.teacher.backbone=null"] if not cfg.teacher_checkpoint else []
    run_cfg = load_config(cfg.student_config, _overrides(cfg, stage, cfg.student) + extra + [
        f"distill.teacher.checkpoint={teacher_ckpt}", f"distill.method={method}"], cls=DistillRunConfig)
    record = run_distillation(run_cfg, resume=(run_cfg.run_dir / "checkpoints" / "last.pt").exists())
    return {**_result(run_cfg.run_dir, record), "method": method}


def _export_stage(cfg: PipelineConfig, student_ckpt: Path) -> dict[str, Any]:
    from export.pipeline import ExportOptions, export_checkpoint

    out = cfg.run_dir / "export"
    data = Path(cfg.data_root)
    manifest = export_checkpoint(ExportOptions(checkpoint=student_ckpt, out=out, precisions=tuple(cfg.precisions),
                                               calib_data=data / "train.json", val_data=data / "val.json",
                                               seed=cfg.seed), log=log.info)
    files = {p: {"onnx": _artifact(out / f["onnx"]), "verified": f["verified"]} for p, f in manifest["files"].items()}
    return {"dir": str(out), "files": files, "parity": manifest["parity"]["results"],
            "tensorrt": manifest.get("tensorrt")}


def _bench_stage(cfg: PipelineConfig, student_ckpt: Path) -> dict[str, Any]:
    from bench.latency import format_report, run_latency_benchmark
    from kd.io import atomic_write_json, atomic_write_text

    out = cfg.run_dir / "bench"
    rep = run_latency_benchmark(student_ckpt, Path(cfg.data_root) / "val.json", cfg.run_dir / "export",
                                calib_data=None, warmup=5, iterations=cfg.bench_iterations, threads=1,
                                map_images=None, latency_images=16, log=log.info)
    atomic_write_json(out / "latency.json", rep)
    atomic_write_text(out / "latency.md", format_report(rep) + "\n")
    return {"report": _artifact(out / "latency.json"), "ratios": rep["ratios"], "targets": rep["targets"],
            "runners": {n: {"p50_ms": r["latency"]["p50"], "bbox_mAP": (r["accuracy"] or {}).get("bbox_mAP"),
                            "provider": r["provider"], "verified": r["verified"]} for n, r in rep["runners"].items()}}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage not yet done; return the manifest dict (also in ``runs/<name>/manifest.json``)."""
    from kd.data import generate_synthetic

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir / "manifest.json", cfg)
    data_root = Path(cfg.data_root)

    def data_stage():
        if not (data_root / "train.json").exists():
            generate_synthetic(data_root, n_images=cfg.synth_images, seed=cfg.seed, image_size=cfg.synth_size,
                               val_fraction=0.2, progress=True)
        return {"train": _artifact(data_root / "train.json"), "val": _artifact(data_root / "val.json")}

    _stage(manifest, "data", data_stage)
    if cfg.teacher_checkpoint:
        _stage(manifest, "teacher", lambda: {"checkpoint": _artifact(Path(cfg.teacher_checkpoint)), "metrics": {}})
    else:
        _stage(manifest, "teacher", lambda: _teacher_stage(cfg))
    teacher_ckpt = manifest.data["stages"]["teacher"]["checkpoint"]["path"]
    _stage(manifest, "distill", lambda: _student_stage(cfg, teacher_ckpt, "gkd", "distill"))
    if cfg.baseline:
        _stage(manifest, "baseline", lambda: _student_stage(cfg, teacher_ckpt, "none", "baseline"))
    student_ckpt = Path(manifest.data["stages"]["distill"]["checkpoint"]["path"])
    if cfg.precisions:
        _stage(manifest, "export", lambda: _export_stage(cfg, student_ckpt))
        if cfg.bench:
            _stage(manifest, "bench", lambda: _bench_stage(cfg, student_ckpt))
    report = render_report(manifest.data)
    from kd.io import atomic_write_text

    atomic_write_text(cfg.run_dir / "report.md", report)
    return manifest.data


def _map(rec: dict | None, key: str = "val/bbox_mAP") -> str:
    v = (rec or {}).get("metrics", {}).get(key)
    return "-" if v is None else f"{100 * v:.1f}"


def render_report(m: dict[str, Any]) -> str:
    """``runs/<name>/report.md``: what was shipped and how it measured."""
    st = m["stages"]
    lines = [f"# gkd run report: {m['config']['name']}", "", f"Command: `{' '.join(m['command'])}`", "",
             "## Accuracy (COCO bbox AP %, val split)", "", "| model | mAP | AP50 | AP75 |", "|---|---|---|---|"]
    for stage, label in (("teacher", "teacher"), ("baseline", "student, no distillation"),
                         ("distill", "student, global-knowledge distillation (shipped)")):
        if stage in st:
            lines.append(f"| {label} | {_map(st[stage])} | {_map(st[stage], 'val/bbox_mAP_50')} "
                         f"| {_map(st[stage], 'val/bbox_mAP_75')} |")
    if "export" in st:
        lines += ["", "## Exports (parity against the PyTorch student on real val images)", "",
                  "| precision | file | verified | sha256 |", "|---|---|---|---|"]
        for p, f in st["export"]["files"].items():
            lines.append(f"| {p} | {f['onnx']['path']} | {'yes' if f['verified'] else 'NO'} | "
                         f"{f['onnx']['sha256'][:16]} |")
        trt = st["export"].get("tensorrt") or {}
        if isinstance(trt, dict) and trt.get("status"):
            lines += ["", f"TensorRT: {trt['status']}"]
    if "bench" in st:
        lines += ["", "## Latency (batch 1, CPU, 1 thread) and mAP of each runtime", "",
                  "| runner | runs on | p50 ms | mAP |", "|---|---|---|---|"]
        for n, r in st["bench"]["runners"].items():
            mp = "-" if r["bbox_mAP"] is None else f"{100 * r['bbox_mAP']:.1f}"
            lines.append(f"| {n} | {r['provider']} | {r['p50_ms']:.1f} | {mp} |")
    lines += ["", "Stage times: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in st.items()),
              f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}", ""]
    return "\n".join(lines)


@click.command("run")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A few-minute smoke version: small dataset, short schedules.")
def run(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Run the whole pipeline on the embedded synthetic dataset (or your own, via data_root=...).

    \b
    Stages, each recorded in runs/<name>/manifest.json and skipped when already done:
      data      generate the synthetic dataset in data_root (if it has no train.json)
      teacher   train the teacher (or use teacher_checkpoint=PATH)   -> runs/<name>/teacher/
      distill   distill the student with global knowledge            -> runs/<name>/distill/
      baseline  (baseline=true) the student without distillation     -> runs/<name>/baseline/
      export    ONNX FP32/FP16/INT8 (+ TensorRT where present), parity -> runs/<name>/export/
      bench     latency and mAP of PyTorch vs each export            -> runs/<name>/bench/
    A summary goes to runs/<name>/report.md. Rerun the same command after an interruption: it continues where it
    stopped (finished stages are skipped, a training stage resumes from its last epoch).

    \b
    Examples:
      gkd run
      gkd run --quick name=smoke
      gkd run teacher.train.epochs=4 student.model.backbone=resnet34 baseline=true
      gkd run teacher_checkpoint=my_teacher.pt data_root=data/mine
    """
    from kd.cli import split_config_and_overrides
    from kd.config import load_config
    from kd.logs import setup_console_logging

    setup_console_logging()
    config, overrides = split_config_and_overrides(config, overrides)
    pre = list(QUICK_OVERRIDES) if quick else []
    cfg = load_config(config, pre + overrides, cls=PipelineConfig)
    run_pipeline(cfg)
    click.echo((cfg.run_dir / "report.md").read_text())
    click.echo(f"done: {cfg.run_dir}  (report.md, manifest.json)")


#: the --quick preset: a small dataset and short schedules (overrides applied before the user's)
QUICK_OVERRIDES = (
    "name=quick", "data_root=data/synth-quick", "synth_images=60", "synth_size=128",
    "teacher.train.epochs=2", "teacher.model.min_size=128", "teacher.model.max_size=128",
    "teacher.model.backbone=resnet34", "student.train.epochs=2", "student.train.max_steps_per_epoch=3",
    "student.model.min_size=128", "student.model.max_size=128", "student.distill.pgm.min_box_size=8",
    "bench_iterations=5",
)

