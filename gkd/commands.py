"""``gkd run`` and ``gkd study``: the two commands that chain stages (:mod:`gkd.pipeline`, :mod:`gkd.study`).

Their help is read without importing torch (``gkd --help`` lists them lazily); the work is imported when they run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["run", "study"]


@click.command("run")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A few-minute smoke version: small dataset, short schedules.")
def run(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Run the whole pipeline on the embedded synthetic dataset (or your own, via data_root=...).

    \b
    Stages, each recorded in runs/<name>/manifest.json:
      data             generate the synthetic dataset in data_root (if it has no train.json)
      teacher          train the teacher, its own seed, in 2 processes where 2 cores exist (or
                       teacher_checkpoint=PATH)                             -> runs/<name>/teacher/
      distill          distill the student with global knowledge            -> runs/<name>/distill/
      baseline         the same student without distillation (baseline=false: skip), trained at the same time
                       in a second process (side_by_side=false: after it)   -> runs/<name>/baseline/
      export           the distilled student: ONNX FP32/FP16/INT8, parity   -> runs/<name>/export/
      export-baseline  the baseline student, the same way                   -> runs/<name>/export-baseline/
      eval-teacher, eval-baseline   val mAP of the teacher and of the baseline's exports (on the free core
                       while the distilled student trains)                  -> runs/<name>/bench/
      bench            latency side by side (teacher, students, exports) and val mAP of the distilled exports
    The report (runs/<name>/report.md, report.json, PNG plots) opens with the deployment table: per precision,
    the baseline's and the distilled student's mAP on their exported files, the gain, p50/p90 latency. The
    gate makes the command exit 1 when it fails, naming the model and the numbers: the shipped student's FP32
    file detects, every file it ships is verified, its INT8 file is INT8 (>= 90% of the MACs) and loses at most
    1 - gate_min_ratio (default 0.99) of FP32's mAP beyond chance (paired bootstrap on the val split), and its
    INT8 p50 is not above gate_max_int8_latency_ratio (default 1.0) x FP32 p50 beyond chance (paired bootstrap over
    the timing rounds). gate_min_ratio=0 turns it off.

    \b
    Rerunning is cheap and safe. Each stage is keyed by what it depends on (its config, its inputs' SHA-256, gkd's
    version): an unchanged stage is reused, a changed one runs again with every stage after it, and a training
    stage interrupted by a kill resumes from its last finished epoch. The report says what ran and why. Every key
    is checked before any stage runs: a misspelt one is an error naming the closest valid key.

    \b
    Examples:
      gkd run
      gkd run --quick name=smoke
      gkd run teacher.train.epochs=4 student.model.backbone=resnet34 baseline=false
      gkd run teacher_checkpoint=my_teacher.pt data_root=data/mine
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.logs import setup_console_logging
    from gkd.pipeline import run_pipeline
    from gkd.report import summary_text
    from gkd.run_config import load_pipeline_config

    setup_console_logging()
    config, overrides = split_config_and_overrides(config, overrides)
    cfg = load_pipeline_config(config, overrides, quick)
    manifest = run_pipeline(cfg)
    click.echo(summary_text(manifest))
    click.echo(f"done: {cfg.run_dir}  (report.md with the plots, report.json, manifest.json)")
    gate = manifest.get("gate") or {}
    for line in gate.get("failures", []):
        click.echo(f"gkd run: gate failed: {line}", err=True)
    if gate.get("passed") is False:
        raise click.exceptions.Exit(1)  # the run finished and its files are kept; what it shipped fails the gate


@click.command("study")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--quick", is_flag=True, help="A small version (<= 20 minutes on 2 cores) to try the study out.")
def study(config: Path | None, overrides: tuple[str, ...], quick: bool) -> None:
    """Compare every distillation method on the embedded dataset, over several seeds, with ablations.

    \b
    Trains the teacher once, then a student per (method, seed) on an identical schedule, evaluates each on the val
    split (overall and on small / occluded / blurred objects) and writes a Markdown table in the paper's shape
    (docs/study.md by default) plus runs/<name>/study.json. Rerunning continues an interrupted study; a cached
    run made with another config is refused (use a new name=). Deltas are paired by seed.

    \b
    Examples:
      gkd study --quick
      gkd study seeds=[0,1,2] jobs=2
      gkd study methods=[none,gkd] seeds=[0] teacher_checkpoint=runs/teacher/checkpoints/best.pt
      gkd study name=study-blind control=blind control_fraction=1   # a control teacher blind to blurred objects
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.config import load_config
    from gkd.core.logs import setup_console_logging
    from gkd.study import run_study
    from gkd.study_config import QUICK_OVERRIDES, StudyConfig

    setup_console_logging()
    config, rest = split_config_and_overrides(config, overrides)
    cfg = load_config(config, (list(QUICK_OVERRIDES) if quick else []) + rest, cls=StudyConfig)
    result = run_study(cfg, command=" ".join(["gkd", *sys.argv[1:]]))
    click.echo(f"wrote {cfg.report} and {cfg.run_dir / 'study.json'} ({result['wall_s'] / 60:.1f} min)")
