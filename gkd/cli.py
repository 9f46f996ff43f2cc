"""The ``gkd`` command: a thin root group that lazily loads each stage's commands.

Each package owns its commands (``kd/cli.py``, ``kd/data/cli.py``, ``export/cli.py``, ``bench/cli.py``); this group
only gathers them by import path, so ``gkd --help`` stays fast and ``kd`` never imports ``export`` or ``bench``.
User errors (``gkd.kd.GkdError``) are printed as one line, ``gkd: error: ...``, with exit status 2.
"""
from __future__ import annotations

import sys

import click

from gkd.core.cli import LazyGroup

__all__ = ["cli", "main", "interrupt_hint"]

# name -> ("module:attribute", one-line help shown by `gkd --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("gkd.kd.data.cli:data", "Generate the embedded synthetic dataset or convert VOC / YOLO labels to COCO JSON."),
    "train": ("gkd.kd.cli:train", "Train a detector (a teacher, or a student without distillation) from a YAML config."),
    "eval": ("gkd.bench.accuracy:evaluate", "COCO mAP of checkpoints, ONNX files and TensorRT engines: one protocol, a gate."),
    "distill": ("gkd.kd.distill.cli:distill", "Train a student from a teacher with global-knowledge distillation."),
    "export": ("gkd.export.cli:export", "Export a checkpoint to ONNX (FP32/FP16/INT8) and TensorRT, with parity checks."),
    "predict": ("gkd.export.predict:predict", "Detect objects in images with a checkpoint or ONNX file; draw the boxes."),
    "bench": ("gkd.bench.cli:bench", "Benchmarks: latency and accuracy of exported models, the custom operator, KD steps."),
    "study": ("gkd.commands:study", "Compare distillation methods over seeds on equal budgets (the paper's tables)."),
    "run": ("gkd.commands:run", "The whole pipeline in one command: data -> teacher -> distill -> export -> bench."),
}


#: what an interrupted user can do next, per command (printed on Ctrl-C and on SIGTERM)
RESUME_HINTS: dict[str, str] = {
    "train": "Checkpoints already written are kept: the same command with --resume continues the run from its last "
             "finished epoch.",
    "distill": "Checkpoints already written are kept: the same command with --resume continues the run from its last "
               "finished epoch.",
    "run": "Finished stages are kept: the same gkd run command reuses them and resumes the interrupted training stage "
           "from its last finished epoch.",
    "study": "Finished runs are kept: the same gkd study command reuses them and resumes the interrupted one.",
}
#: commands that train nothing: their files are written whole or not at all, and the same command redoes the work
OTHER_HINT = "Files are written whole or not at all; run the same command again to redo the work."


def interrupt_hint(argv: list[str] | None) -> str:
    """What to do after an interruption of the command in ``argv`` (the first word that names a command)."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    command = next((w for w in words if w in COMMANDS), None)
    return RESUME_HINTS.get(command or "", OTHER_HINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that what is being written is cleaned up the same way."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


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
    import os
    import signal
    import threading

    from gkd.core.errors import GkdError
    from gkd.core.io import created_folders, remove_empty_created_folders

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    mark = created_folders()
    try:
        rv = cli.main(args=argv, prog_name="gkd", standalone_mode=False)
    except GkdError as exc:
        remove_empty_created_folders(since=mark)  # an output folder made for work that was then refused
        click.echo(f"gkd: error: {exc}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        terminated = isinstance(exc, Terminated) or isinstance(exc.__context__, Terminated)
        if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, not one per process
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            click.echo(f"gkd: {what}. {interrupt_hint(argv)}", err=True)
        return 143 if terminated else 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
