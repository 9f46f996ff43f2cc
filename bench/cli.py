"""``gkd bench``: benchmarks. Each subcommand lives in its own module and is imported only when invoked."""
from __future__ import annotations

import click

from gkd.core.cli import LazyGroup

__all__ = ["bench"]

# name -> ("module:attribute", short help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "op": ("gkd.bench.op:op", "Time the prototype-projection operator: C++/CUDA extension vs the PyTorch versions."),
    "distill": ("gkd.bench.distill_step:distill_step", "Time a training step: student alone, + teacher forward, gkd."),
    "latency": ("gkd.bench.latency:latency", "Latency of checkpoints, ONNX files and engines: one protocol, two views."),
    "train": ("gkd.bench.train_step:train_step", "Seconds per training step and inference img/s: teacher vs student."),
    "overhead": ("gkd.bench.overhead:overhead", "What the latency harness adds over a bare session.run loop."),
}


@click.group(cls=LazyGroup, commands=SUBCOMMANDS)
def bench() -> None:
    """Benchmarks that print side-by-side timings and ratios measured in one run (never timed unit tests)."""
