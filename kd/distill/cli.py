"""``gkd distill``: train a student from a teacher with global-knowledge distillation (or another menu entry)."""
from __future__ import annotations

from pathlib import Path

import click

from gkd.core.cli import config_overrides_argument

from ..cli import nproc_option

__all__ = ["distill"]


@click.command("distill")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@config_overrides_argument
@click.option("--resume", is_flag=True, help="Continue the run runs/<name>/ from its last finished epoch "
                                             "(same adapters and prototypes).")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@nproc_option
def distill(config: Path | None, overrides: tuple[str, ...], resume: bool, no_progress: bool, verbose: bool,
            nproc: int | None) -> int | None:
    """Distill a student detector from a trained teacher, as configured in CONFIG.

    \b
    CONFIG is a YAML file (see kd/configs/distill_gkd.yaml): `model` is the student, `distill.teacher.checkpoint`
    the teacher (a checkpoint from `gkd train`), `distill.method` one of:
      none        the student trained alone (baseline)
      local       decoupled fg/bg feature imitation + soft labels (no prototypes)
      robust      the authors' released config: robust weights on the local terms, no global loss
      gkd         the full method: robust local terms + global-knowledge loss (default)
      pkd         Pearson-correlation feature imitation (PKD)
      pkd+global  PKD + the global-knowledge loss
    Any key can be overridden after CONFIG as KEY=VALUE (without CONFIG: the built-in defaults).
    The run lives in runs/<name>/ like `gkd train`; checkpoints/model.pt and best.pt hold the
    student only (for `gkd eval` and `gkd export`).

    \b
    Examples:
      gkd distill kd/configs/distill_gkd.yaml
      gkd distill kd/configs/distill_gkd.yaml distill.method=robust name=robust
      gkd distill kd/configs/distill_gkd.yaml --resume
      gkd distill kd/configs/distill_gkd.yaml --nproc 8      # 8 GPUs of this machine (torchrun)
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.logs import setup_console_logging

    from ..cli import command_argv, echo_on_rank0, launch_or_run, run_summary
    from ..config import load_config
    from .config import DistillRunConfig
    from .run import run_distillation

    setup_console_logging(verbose)
    config, overrides = split_config_and_overrides(config, overrides)
    cfg = load_config(config, overrides, cls=DistillRunConfig)

    def work() -> None:
        record = run_distillation(cfg, resume=resume, progress=not no_progress)
        echo_on_rank0(run_summary(cfg.run_dir, record))

    return launch_or_run(nproc, command_argv("distill", config, overrides, resume=resume, no_progress=no_progress,
                                      verbose=verbose), work)
