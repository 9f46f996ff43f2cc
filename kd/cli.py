"""``gkd train`` and ``gkd eval``."""
from __future__ import annotations

from pathlib import Path

import click

__all__ = ["train", "config_overrides_argument", "split_config_and_overrides"]

OVERRIDES_HELP = ("Override any config key as key=value (dotted for nested sections), e.g. train.epochs=2 "
                  "model.backbone=resnet18 data.root=data/mine. Values are parsed as YAML.")


def config_overrides_argument(f):
    return click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)


def split_config_and_overrides(config: Path | None, overrides: tuple[str, ...]) -> tuple[Path | None, list[str]]:
    """CONFIG is optional: when the first argument looks like KEY=VALUE (and is no file), it is an override."""
    text = str(config) if config is not None else ""
    if "=" in text and "/" not in text.split("=", 1)[0] and not config.exists():
        return None, [text, *overrides]
    return config, list(overrides)


@click.command("train")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@config_overrides_argument
@click.option("--resume", is_flag=True, help="Continue the run runs/<name>/ from its last finished epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def train(config: Path | None, overrides: tuple[str, ...], resume: bool, no_progress: bool, verbose: bool) -> None:
    """Train a detector from a YAML CONFIG (a teacher, or a student without distillation).

    \b
    CONFIG is a YAML file (see kd/configs/teacher.yaml); keys left out take their defaults and any key can be
    overridden after it as KEY=VALUE. The run lives in runs/<name>/: config.yaml, metrics.jsonl/.csv,
    checkpoints/last.pt (full state, for --resume), checkpoints/model.pt and best.pt (detector only, for
    `gkd eval` and `gkd export`).

    \b
    Examples:
      gkd train kd/configs/teacher.yaml
      gkd train kd/configs/student.yaml train.epochs=2 name=quick
      gkd train kd/configs/teacher.yaml --resume      # after a kill: continues where it stopped
    """
    from .config import load_config
    from .logs import setup_console_logging
    from .train import train_detector

    setup_console_logging(verbose)
    cfg = load_config(*split_config_and_overrides(config, overrides))
    record = train_detector(cfg, resume=resume, progress=not no_progress)
    click.echo(_summary(cfg.run_dir, record))


def _summary(run_dir: Path, record: dict) -> str:
    if "val/bbox_mAP" in record:
        return (f"done: {run_dir}  bbox_mAP {record['val/bbox_mAP']:.4f}  mAP_50 {record['val/bbox_mAP_50']:.4f}  "
                f"checkpoint {run_dir / 'checkpoints' / 'model.pt'}")
    return f"done: {run_dir}  checkpoint {run_dir / 'checkpoints' / 'model.pt'}"
