"""Training as a content-keyed stage of ``gkd run`` and ``gkd study``: a typed spec in, a frozen result out.

:func:`train_stage` is ``gkd train`` (a teacher, a student initialisation; in several local processes when asked),
:func:`distill_stage` is ``gkd distill`` (a student, ``distill.method=none`` the baseline). Both run in the stage's
own run folder and resume an interrupted run of exactly the same stage key and config
(:func:`gkd.kd.resume.prepare_stage_run`); a folder made for another key is a superseded result and is removed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from gkd.core.config import to_dict
from gkd.core.errors import GkdError
from gkd.core.records import Artifact, result_fields

from .resume import RESULT_NEUTRAL_KEYS, prepare_stage_run

__all__ = ["TrainSpec", "TrainedModel", "train_stage", "distill_stage", "training_inputs", "training_work",
           "with_threads", "per_process"]

log = logging.getLogger("gkd")


@dataclass(frozen=True)
class TrainSpec:
    """One training stage.

    ``config`` is the resolved run config (:class:`gkd.kd.config.RunConfig` to train,
    :class:`gkd.kd.distill.config.DistillRunConfig` to distill); ``key`` the stage's content key (a run folder
    started for another key is never resumed); ``processes`` local torchrun processes of one thread each, with
    ``config.train.batch_size`` per process (:func:`per_process`)."""

    config: Any
    key: str
    processes: int = 1
    progress: bool = True


@dataclass(frozen=True)
class TrainedModel:
    """What a training stage made: its detector checkpoint (``model.pt``), the last epoch's ``val/*`` metrics, and
    what else its caller recorded with it (``extra``: e.g. the distillation method)."""

    checkpoint: Artifact
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"outputs": {"checkpoint": self.checkpoint.record()}, "metrics": self.metrics, **self.extra}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TrainedModel":
        extra = result_fields(record, "outputs", "metrics")
        return cls(Artifact.from_record(record["outputs"]["checkpoint"]), record.get("metrics") or {}, extra)


def _trained(run_cfg, last_epoch: dict[str, Any], **extra: Any) -> TrainedModel:
    return TrainedModel(Artifact.of(run_cfg.run_dir / "checkpoints" / "model.pt"),
                        {k: v for k, v in last_epoch.items() if k.startswith("val/")}, extra)


def train_stage(spec: TrainSpec) -> TrainedModel:
    """``gkd train`` of ``spec.config`` as a stage, in this process or in ``spec.processes`` local processes."""
    if spec.processes > 1:
        return _train_processes(spec)
    from .train import train_detector

    resume = prepare_stage_run(spec.config, spec.key)
    return _trained(spec.config, train_detector(spec.config, resume=resume, progress=spec.progress))


def distill_stage(spec: TrainSpec) -> TrainedModel:
    """``gkd distill`` of ``spec.config`` as a stage (``distill.method=none``: the student without distillation)."""
    from .distill.run import run_distillation

    resume = prepare_stage_run(spec.config, spec.key)
    record = run_distillation(spec.config, resume=resume, progress=spec.progress)
    return _trained(spec.config, record, method=spec.config.distill.method)


def _train_processes(spec: TrainSpec) -> TrainedModel:
    """``gkd train`` under torchrun on ``spec.processes`` local processes of one thread each (Gloo on a CPU).

    Why: on a 2-core CPU two 1-thread processes get ~20% more training through than one 2-thread process (measured:
    40 steps of 8 images in 32.6 s against 40.1 s, the teacher recipe). The resolved config travels as a YAML file
    (written, never rebuilt from ``key=value`` text); the child job is ended with this process."""
    import signal
    import subprocess

    from gkd.core.config import dump_config

    from .distributed import torchrun_command

    resume = prepare_stage_run(spec.config, spec.key)
    run_cfg = with_threads(spec.config, 1)
    config_file = run_cfg.run_dir.parent / f".{run_cfg.name}.resolved.yaml"
    dump_config(run_cfg, config_file)
    argv = torchrun_command(spec.processes, ["train", str(config_file), *(["--resume"] if resume else [])])
    log.info("%s: %d processes x 1 thread: %s", run_cfg.name, spec.processes, " ".join(argv))

    def die_with_parent() -> None:  # Linux: torchrun (and so its workers) ends when this process does
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    rc = subprocess.call(argv, preexec_fn=die_with_parent)
    if rc != 0:
        raise GkdError(f"{run_cfg.name}: the {spec.processes}-process training exited with status {rc} (its errors "
                       f"are above; the log is {run_cfg.run_dir / 'log.txt'})")
    config_file.unlink(missing_ok=True)
    lines = (run_cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return _trained(run_cfg, json.loads(lines[-1]) if lines else {})  # the last epoch's record


def training_inputs(run_cfg, **inputs: Any) -> dict[str, Any]:
    """A training stage's key inputs: its resolved config less the keys that do not change its result
    (:data:`gkd.kd.resume.RESULT_NEUTRAL_KEYS`), and ``inputs`` (its input files' SHA-256)."""
    config = to_dict(run_cfg)
    for dotted in RESULT_NEUTRAL_KEYS:
        section, key = dotted.split(".")
        config.get(section, {}).pop(key, None)
    if config.get("quant", {}).get("int8_format", None) is None:
        config.pop("quant", None)  # a float student: keyed as before quantization-aware training existed
    return {"config": config, **inputs}


def training_work(run_cfg, n_images: int | None, processes: int = 1) -> str:
    """``"3 epochs x 80 steps of 8 images"`` (the steps per epoch capped by ``max_steps_per_epoch``; with
    ``processes``, ``batch_size`` is per process: ``"... of 2 x 4 images, 2 processes x 1 thread"``)."""
    if n_images is None:
        return ""
    batch = run_cfg.train.batch_size * processes
    per_epoch = math.ceil(n_images / batch)
    if run_cfg.train.max_steps_per_epoch:
        per_epoch = min(per_epoch, run_cfg.train.max_steps_per_epoch)
    of = f"{batch} images" if processes == 1 else (f"{processes} x {run_cfg.train.batch_size} images, "
                                                   f"{processes} processes x 1 thread")
    return f"{run_cfg.train.epochs} epochs x {per_epoch} steps of {of}"


def with_threads(run_cfg, threads: int):
    """``run_cfg`` with ``train.threads`` set (a process's share of the cores; not keyed)."""
    return dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, threads=threads))


def per_process(run_cfg, processes: int, option: str, key_prefix: str = ""):
    """``run_cfg`` for one of ``processes`` local processes: ``train.batch_size`` split between them (the global
    batch, and so the lr's meaning, stay the config's), one thread each. ``option`` names the setting that asked
    for the processes (in the error)."""
    if processes <= 1:
        return run_cfg
    batch = run_cfg.train.batch_size
    if batch % processes:
        raise GkdError(f"{key_prefix}train.batch_size {batch} cannot be split between {option}={processes} "
                       f"processes; give a multiple of {processes}, or {option}=1")
    return with_threads(dataclasses.replace(run_cfg, train=dataclasses.replace(
        run_cfg.train, batch_size=batch // processes)), 1)
