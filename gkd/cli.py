"""The ``gkd`` command: a thin root group that lazily loads each stage's commands.

Each package owns its commands (``kd/cli.py``, ``kd/data/cli.py``, ``export/cli.py``, ``bench/cli.py``); this group
only gathers them by import path, so ``gkd --help`` stays fast and ``kd`` never imports ``export`` or ``bench``.
User errors (``gkd.kd.GkdError``) are printed as one line, ``gkd: error: ...``, with exit status 2.
"""
from __future__ import annotations

import sys

import click

from gkd.kd.lazy_cli import LazyGroup

__all__ = ["cli", "main"]

# name -> ("module:attribute", one-line help shown by `gkd --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("gkd.kd.data.cli:data", "Generate the embedded synthetic dataset or convert VOC / YOLO labels to COCO JSON."),
    "train": ("gkd.kd.cli:train", "Train a detector (a teacher, or a student without distillation) from a YAML config."),
    "eval": ("gkd.bench.accuracy:evaluate", "COCO mAP of checkpoints, ONNX files and TensorRT engines: one protocol, a gate."),
    "distill": ("gkd.kd.distill.cli:distill", "Train a student from a teacher with global-knowledge distillation."),
    "export": ("gkd.export.cli:export", "Export a checkpoint to ONNX (FP32/FP16/INT8) and TensorRT, with parity checks."),
    "predict": ("gkd.export.predict:predict", "Detect objects in images with a checkpoint or ONNX file; draw the boxes."),
    "bench": ("gkd.bench.cli:bench", "Benchmarks: latency and accuracy of exported models, the custom operator, KD steps."),
    "study": ("gkd.study:study", "Compare distillation methods over seeds on equal budgets (the paper's tables)."),
    "run": ("gkd.pipeline:run", "The whole pipeline in one command: data -> teacher -> distill -> export -> bench."),
}


#: what an interrupted user can do next (printed on Ctrl-C)
RESUME_HINT = ("Checkpoints already written are kept: `gkd train|distill CONFIG --resume` continues a training run "
               "from its last finished epoch, and the same `gkd run` command continues the pipeline.")


@click.group(cls=LazyGroup, commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="gkd", prog_name="gkd")
def cli() -> None:
    """gkd: distill object detectors with global knowledge, then ship them.

    \b
    Typical use on the embedded synthetic dataset (everything runs offline on a CPU):
      gkd data synth --out data/synth            # make a small COCO-format dataset
      gkd train kd/configs/teacher.yaml           # train a teacher
      gkd eval runs/teacher/checkpoints/last.pt --data data/synth/val.json
      gkd run                                     # or the whole pipeline in one command

    Every command has its own --help. Config values can be overridden on the command line as key=value,
    e.g. `gkd train CONFIG train.epochs=2 model.backbone=resnet18`.
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gkd`` console script."""
    from gkd.kd.errors import GkdError

    try:
        rv = cli.main(args=argv, prog_name="gkd", standalone_mode=False)
    except GkdError as exc:
        click.echo(f"gkd: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:  # click turns Ctrl-C into Abort
        click.echo(f"gkd: interrupted. {RESUME_HINT}", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo(f"gkd: interrupted. {RESUME_HINT}", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
