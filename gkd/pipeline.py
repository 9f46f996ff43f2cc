"""``gkd run``: the one-command pipeline, data -> teacher -> student -> export -> bench -> report.

Each stage writes into ``runs/<name>/<stage>/`` and is recorded in ``runs/<name>/manifest.json`` (artifact paths with
SHA-256, tool versions, the exact command, seeds, timings). Rerunning the same command after a kill skips finished
stages and resumes an interrupted training stage from its last epoch, so nothing already computed is lost.
"""
from __future__ import annotations

import hashlib
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
    student_config: str = str(CONFIG_DIR / "student.yaml")
    #: overrides (nested mapping) for the teacher / student run configs, e.g. {"train": {"epochs": 2}}
    teacher: Any = field(default_factory=dict)
    student: Any = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return {"path": str(path), "sha256": sha256(path)}


def _stage(manifest: Manifest, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    if manifest.done(name):
        log.info("stage %s: already done, skipped (see %s)", name, manifest.path)
        return
    log.info("stage %s: starting", name)
    t0 = time.perf_counter()
    info = fn()
    manifest.record(name, seconds=round(time.perf_counter() - t0, 1), **info)
    log.info("stage %s: done in %.0f s", name, time.perf_counter() - t0)


def _train_stage(cfg: PipelineConfig, config_path: str, overrides: dict, stage: str) -> dict[str, Any]:
    from kd.config import flatten_overrides, load_config
    from kd.train import train_detector

    base = [f"runs_dir={cfg.run_dir}", f"name={stage}", f"seed={cfg.seed}", f"data.root={cfg.data_root}"]
    run_cfg = load_config(config_path, base + flatten_overrides(overrides))
    resume = (run_cfg.run_dir / "checkpoints" / "last.pt").exists()
    record = train_detector(run_cfg, resume=resume)
    model = run_cfg.run_dir / "checkpoints" / "model.pt"
    return {"checkpoint": _artifact(model), "metrics": {k: v for k, v in record.items() if k.startswith("val/")}}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage not yet done; return the manifest dict."""
    from kd.data import generate_synthetic

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir / "manifest.json", cfg)
    data_root = Path(cfg.data_root)

    def data_stage():
        if not (data_root / "train.json").exists():
            generate_synthetic(data_root, n_images=cfg.synth_images, seed=cfg.seed, image_size=cfg.synth_size,
                               val_fraction=0.2)
        return {"train": _artifact(data_root / "train.json"), "val": _artifact(data_root / "val.json")}

    _stage(manifest, "data", data_stage)
    _stage(manifest, "teacher", lambda: _train_stage(cfg, cfg.teacher_config, cfg.teacher, "teacher"))
    _stage(manifest, "student", lambda: _train_stage(cfg, cfg.student_config, cfg.student, "student"))
    return manifest.data


@click.command("run")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A few-minute smoke version: small dataset, short schedules.")
def run(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Run the whole pipeline on the embedded synthetic dataset (or your own, via data_root=...).

    \b
    Stages, each recorded in runs/<name>/manifest.json and skipped when already done:
      data     generate the synthetic dataset in data_root (if it has no train.json)
      teacher  train the teacher           -> runs/<name>/teacher/
      student  train the student           -> runs/<name>/student/
    Rerun the same command after an interruption: it continues where it stopped.

    \b
    Examples:
      gkd run
      gkd run --quick name=smoke
      gkd run teacher.train.epochs=4 student.model.backbone=mobilenet_v3_large
    """
    from kd.cli import split_config_and_overrides
    from kd.config import load_config
    from kd.logs import setup_console_logging

    setup_console_logging()
    config, overrides = split_config_and_overrides(config, overrides)
    pre = list(QUICK_OVERRIDES) if quick else []
    cfg = load_config(config, pre + overrides, cls=PipelineConfig)
    manifest = run_pipeline(cfg)
    click.echo(f"done: {cfg.run_dir}  (manifest {cfg.run_dir / 'manifest.json'})")
    for stage, rec in manifest["stages"].items():
        metrics = rec.get("metrics") or {}
        extra = f"  bbox_mAP {metrics['val/bbox_mAP']:.4f}" if "val/bbox_mAP" in metrics else ""
        click.echo(f"  {stage:<8} {rec.get('seconds', 0):>7.0f} s{extra}")


#: the --quick preset: a small dataset and short schedules (overrides applied before the user's)
QUICK_OVERRIDES = (
    "name=quick", "data_root=data/synth-quick", "synth_images=120", "synth_size=128",
    "teacher.train.epochs=2", "teacher.model.min_size=128", "teacher.model.max_size=128",
    "student.train.epochs=2", "student.model.min_size=128", "student.model.max_size=128",
)

