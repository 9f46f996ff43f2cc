"""``gkd train`` and ``gkd eval``."""
from __future__ import annotations

from pathlib import Path

import click

from gkd.core.cli import config_overrides_argument, split_config_and_overrides

__all__ = ["train", "nproc_option", "launch_or_run",
           "command_argv", "echo_on_rank0", "run_summary"]

def nproc_option(f):
    return click.option("--nproc", type=click.IntRange(1), default=None, metavar="N",
                        help="Run on N processes of this machine (N GPUs, or N CPU processes with Gloo): starts "
                             "torchrun --standalone --nproc_per_node=N. batch_size is per process. Several "
                             "machines: run torchrun yourself (docs/distributed.md).")(f)


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


def command_argv(command: str, config: Path | None, overrides: tuple[str, ...], **flags: bool) -> list[str]:
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
    from gkd.core.logs import setup_console_logging

    from .config import load_config
    from .train import train_detector

    setup_console_logging(verbose)
    cfg = load_config(*split_config_and_overrides(config, overrides))

    def work() -> None:
        record = train_detector(cfg, resume=resume, progress=not no_progress)
        echo_on_rank0(run_summary(cfg.run_dir, record))

    return launch_or_run(nproc, command_argv("train", config, overrides, resume=resume, no_progress=no_progress,
                                      verbose=verbose), work)


def echo_on_rank0(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(text)


def run_summary(run_dir: Path, record: dict) -> str:
    if "val/bbox_mAP" in record:
        return (f"done: {run_dir}  bbox_mAP {record['val/bbox_mAP']:.4f}  mAP_50 {record['val/bbox_mAP_50']:.4f}  "
                f"checkpoint {run_dir / 'checkpoints' / 'model.pt'}")
    return f"done: {run_dir}  checkpoint {run_dir / 'checkpoints' / 'model.pt'}"
