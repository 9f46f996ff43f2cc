"""A training run's folder ``runs/<name>/``: taking it, opening it, and what each epoch writes there.

* ``config.yaml``        the resolved config
* ``checkpoints/last.pt`` full state after the last finished epoch (model, task extra state, optimizer, scheduler,
  AMP scaler, RNG states, epoch, config, data SHA-256); written atomically
* ``checkpoints/model.pt`` detector-only checkpoint of the last epoch (what ``gkd eval`` / ``gkd export`` take);
  ``checkpoints/best.pt`` the same for the best val ``bbox_mAP``
* ``checkpoints/last_good_step<N>.pt`` the state before a step whose loss was not finite
* ``metrics.jsonl`` / ``metrics.csv``: one record per epoch (train loss terms, lr, time, task metrics, COCO metrics)
* ``log.txt``

Only rank 0 of a process group calls these (it alone holds the folder's lock); whether the folder may be resumed or
written at all is :mod:`gkd.kd.resume`'s rule.
"""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.core.config import dump_config, to_dict
from gkd.core.io import append_jsonl, atomic_write_text

from .checkpoint import detector_checkpoint, save_checkpoint
from .config import RunConfig
from .resume import refuse_foreign_files, state_to_resume

__all__ = ["take_run_folder", "open_run", "RunRecords", "rng_state", "restore_rng"]

log = logging.getLogger("gkd")


def take_run_folder(run_dir: Path, resume: bool, stack: contextlib.ExitStack) -> None:
    """Own ``run_dir`` until ``stack`` closes: lock it (``.lock``, see :class:`gkd.core.io.RunLock`: a second run
    into it is refused with the owner's pid), check that checkpoints can be written there before an epoch is spent,
    and remove the temporary files a process killed mid-write left. A fresh run first refuses a folder holding
    files that are not a run's."""
    from gkd.core.io import RunLock, ensure_writable_folder, remove_stale_temporaries

    if not resume:  # before anything is written there
        refuse_foreign_files(run_dir)
    stack.enter_context(RunLock(run_dir))
    ensure_writable_folder(run_dir / "checkpoints", "the checkpoint folder")
    for folder in (run_dir, run_dir / "checkpoints"):
        for stale in remove_stale_temporaries(folder):
            log.info("removed %s (left by a process killed while writing it)", stale)


def open_run(cfg: RunConfig, resume: bool, world_size: int) -> dict[str, Any] | None:
    """The checks and first writes of a run: returns the state to resume (None for a fresh run, see
    :func:`gkd.kd.resume.state_to_resume`), drops the metrics of epochs the state does not hold, writes
    config.yaml and sends the log to log.txt."""
    state = state_to_resume(cfg, resume, world_size)
    metrics_path = cfg.run_dir / "metrics.jsonl"
    if state is not None:
        _truncate_metrics(metrics_path, int(state["epoch"]))
    else:  # a fresh run: records of an earlier attempt killed before its first checkpoint are not this run's
        metrics_path.unlink(missing_ok=True)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, cfg.run_dir / "config.yaml")
    _attach_log_file(cfg.run_dir / "log.txt")
    return state


@dataclass
class RunRecords:
    """Rank 0's writes of a run's results: every epoch's metrics and checkpoints, and the state to resume from.

    ``optimisation`` arguments are objects whose ``state_dict()`` returns the ``optimizer``, ``scheduler`` and
    ``scaler`` entries of a run checkpoint.
    """

    cfg: RunConfig
    classes: list[str]
    category_ids: list[int]
    #: the train and val data's SHA-256, recorded in last.pt so that ``--resume`` can check it
    data_sha: dict[str, str]
    #: the best val bbox_mAP so far (-1: none yet); ``best.pt`` holds its epoch
    best: float = -1.0

    def training_state(self, task: nn.Module, optimisation, epoch: int) -> dict[str, Any]:
        """The run checkpoint of ``task`` after ``epoch`` (-1: before the first): what ``--resume`` continues."""
        ckpt = detector_checkpoint(task.detector, self.cfg.model, self.classes, self.category_ids)
        ckpt.update({"kind": "run", "epoch": epoch, "config": to_dict(self.cfg), "extra": task.extra_state(),
                     **optimisation.state_dict(), "rng": rng_state()})
        return ckpt

    def save_epoch(self, task: nn.Module, optimisation, epoch: int, record: dict[str, Any],
                   rng_ranks: list[dict[str, Any]] | None) -> None:
        """After an epoch: its metrics, ``model.pt``, ``best.pt`` when val mAP improved, and ``last.pt`` written
        last (a kill before it leaves the previous one, whose resume drops this epoch's metrics and runs the epoch
        again). ``rng_ranks``: every rank's RNG state in a process group, else None."""
        ckpt_dir = self.cfg.run_dir / "checkpoints"
        metrics_path = self.cfg.run_dir / "metrics.jsonl"
        append_jsonl(metrics_path, record)
        _write_csv(metrics_path, self.cfg.run_dir / "metrics.csv")
        det = detector_checkpoint(task.detector, self.cfg.model, self.classes, self.category_ids)
        det["metrics"] = record
        save_checkpoint(det, ckpt_dir / "model.pt")
        if record.get("val/bbox_mAP", -1.0) > self.best:
            self.best = record["val/bbox_mAP"]
            save_checkpoint(det, ckpt_dir / "best.pt")
        full = self.training_state(task, optimisation, epoch)
        full["best"] = self.best
        full["metrics"] = record
        full["data_sha256"] = self.data_sha
        if rng_ranks is not None:  # each rank resumes with its own RNG stream; rank 0's stays under "rng"
            full["rng_ranks"] = rng_ranks
            full["world_size"] = len(rng_ranks)
        save_checkpoint(full, ckpt_dir / "last.pt")


def rng_state() -> dict[str, Any]:
    """This process's torch, Python (and CUDA) RNG states, as a checkpoint stores them."""
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(st):
    # (version, tuple_of_625_ints, gauss_next): plain ints/tuples survive weights_only loading.
    return [st[0], list(st[1]), st[2]]


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_csv(jsonl: Path, csv_path: Path) -> None:
    import csv
    import io
    import json

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(csv_path, buf.getvalue())


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop records of epochs after the checkpoint (a kill between writing metrics and the checkpoint)."""
    import json

    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", -1) <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _attach_log_file(path: Path) -> None:
    for h in log.handlers:  # (a handler whose file was deleted since would write nowhere: it is replaced)
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() and path.exists():
            return
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
