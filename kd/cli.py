"""``gkd train`` and ``gkd eval``."""
from __future__ import annotations

from pathlib import Path

import click

__all__ = ["train", "evaluate", "config_overrides_argument", "split_config_and_overrides", "nproc_option",
           "launch_or_run"]

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


def nproc_option(f):
    return click.option("--nproc", type=click.IntRange(1), default=None, metavar="N",
                        help="Run on N processes of this machine (N GPUs, or N CPU processes with Gloo): starts "
                             "torchrun --standalone --nproc_per_node=N. batch_size is per process. Several "
                             "machines: run torchrun yourself (README, 'Many processes').")(f)


def launch_or_run(nproc: int | None, argv: list[str], work):
    """``work()`` in this process, or, with ``--nproc N`` (N > 1), the same command under torchrun.

    Returns:
        ``work``'s result, or torchrun's exit status.
    """
    from .distributed import SharedRankError, relaunch

    if nproc is not None and nproc > 1:
        return relaunch(nproc, argv)
    try:
        return work()
    except SharedRankError:
        raise SystemExit(2) from None  # rank 0 prints this error; the other ranks only stop


def _argv(command: str, config: Path | None, overrides: tuple[str, ...], **flags: bool) -> list[str]:
    """The command line again (for the processes torchrun starts), without ``--nproc``."""
    return [command, *([str(config)] if config is not None else []), *overrides,
            *(f"--{name.replace('_', '-')}" for name, on in flags.items() if on)]


@click.command("train")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@config_overrides_argument
@click.option("--resume", is_flag=True, help="Continue the run runs/<name>/ from its last finished epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@nproc_option
def train(config: Path | None, overrides: tuple[str, ...], resume: bool, no_progress: bool, verbose: bool,
          nproc: int | None) -> int | None:
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
      gkd train kd/configs/teacher.yaml --nproc 4     # 4 GPUs of this machine (torchrun)
    """
    from .config import load_config
    from .logs import setup_console_logging
    from .train import train_detector

    setup_console_logging(verbose)
    cfg = load_config(*split_config_and_overrides(config, overrides))

    def work() -> None:
        record = train_detector(cfg, resume=resume, progress=not no_progress)
        _echo_on_rank0(_summary(cfg.run_dir, record))

    return launch_or_run(nproc, _argv("train", config, overrides, resume=resume, no_progress=no_progress,
                                      verbose=verbose), work)


def _echo_on_rank0(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(text)


def _summary(run_dir: Path, record: dict) -> str:
    if "val/bbox_mAP" in record:
        return (f"done: {run_dir}  bbox_mAP {record['val/bbox_mAP']:.4f}  mAP_50 {record['val/bbox_mAP_50']:.4f}  "
                f"checkpoint {run_dir / 'checkpoints' / 'model.pt'}")
    return f"done: {run_dir}  checkpoint {run_dir / 'checkpoints' / 'model.pt'}"


@click.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="COCO instances JSON to evaluate on (e.g. data/synth/val.json).")
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder the JSON's file_name entries are relative to [default: 'images' next to the JSON].")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where detections.json and metrics.json go [default: eval/ next to the checkpoint's run].")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-dets", type=click.IntRange(1), default=100, show_default=True,
              help="pycocotools maxDets for AP; raise it for images with more than 100 objects.")
@click.option("--size", type=click.IntRange(32), default=None,
              help="Evaluate at this input size (shorter and longer side) instead of the trained one.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"], case_sensitive=False), default="auto",
              show_default=True)
@click.option("--no-progress", is_flag=True)
def evaluate(checkpoint: Path, data: Path, images: Path | None, out: Path | None, batch_size: int, max_dets: int,
             size: int | None, device: str, no_progress: bool) -> None:
    """Evaluate a detector CHECKPOINT on a COCO-format dataset.

    Prints the 12 COCO box metrics (mmdet names: bbox_mAP, bbox_mAP_50, ..., bbox_mAP_s/m/l) and writes
    detections.json (COCO results format) and metrics.json. Takes checkpoints written by `gkd train` and
    `gkd distill` (checkpoints/model.pt, best.pt or last.pt).

    \b
    Example:
      gkd eval runs/teacher/checkpoints/best.pt --data data/synth/val.json
    """
    from .evaluation import STAT_NAMES
    from .logs import setup_console_logging
    from .train import evaluate_checkpoint

    setup_console_logging()
    if out is None:
        parent = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        out = parent / "eval" / checkpoint.stem
    metrics = evaluate_checkpoint(checkpoint, data, images, out, batch_size=batch_size, max_dets=max_dets,
                                  device=device, min_size=size, max_size=size, progress=not no_progress)
    for name in STAT_NAMES:
        click.echo(f"{name:<13} {metrics[name]:.4f}")
    click.echo(f"wrote {out / 'detections.json'} and {out / 'metrics.json'}")
