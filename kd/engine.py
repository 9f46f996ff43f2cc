"""The training loop shared by ``gkd train`` and ``gkd distill``.

``fit`` trains a task (see ``kd/task.py``) epoch by epoch and keeps ``runs/<name>/`` up to date (its files:
``kd/run_folder.py``; whether it may be resumed: ``kd/resume.py``). The loop's parts, each with one concern:

* :func:`_start_run`: the device, rank 0's verdict on the folder, the seeded task wrapped for DDP, the train loader,
  the optimisation (:class:`_Optimisation`: optimizer, lr schedule, AMP scaler), and a resumed run's state;
* :func:`_train_epoch` / :func:`_train_step`: the steps of one epoch (AMP, finite-loss check, grad clip);
* :func:`_check_replicas`: in a process group, that every rank holds the same trainable state;
* :class:`_Evaluation`: COCO evaluation on val every ``train.eval_interval`` epochs and after the last;
* :func:`_save_epoch`: the epoch's metrics and checkpoints (rank 0, :class:`gkd.kd.run_folder.RunRecords`).

Reproducibility: the data order of epoch ``e`` is a permutation drawn from ``seed + e``, augmentations are decided by
(seed, epoch, index) in the dataset, and the torch / Python RNG states are saved with every checkpoint, so a run
killed and resumed with ``--resume`` reaches the same weights and metrics as an uninterrupted run (on CPU).

Under torchrun (a process group initialised by :func:`gkd.kd.distributed.process_group`) the same loop runs on every
rank: DDP over the trainable modules only, a ``DistributedSampler`` per rank seeded by ``seed + epoch``, per-process
batches (global batch = world size x ``train.batch_size``), sharded evaluation gathered on rank 0, loss averages over
all ranks, and only rank 0 writes the run folder (it alone holds its lock). A single process is unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from gkd.core.errors import GkdError

from .checkpoint import save_checkpoint
from .config import RunConfig
from .distributed import (DistContext, ShardedBatchSampler, SharedRankError, all_gather_objects, all_reduce_sums,
                          any_rank, current_context, effective_lr, evaluate_sharded, run_on_main, select_rank_device,
                          state_sha256, sync_buffers, verify_identical, wrap_trainable)
from .resume import data_fingerprint
from .run_folder import RunRecords, open_run, restore_rng, rng_state, take_run_folder

__all__ = ["fit", "seed_everything", "EpochSampler", "build_optimizer", "build_lr_lambda", "make_loader"]

log = logging.getLogger("gkd")


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA). numpy is not used in training paths."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffled order per epoch drawn from ``seed + epoch``: independent of how many epochs ran in this process."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset, batch_size: int, num_workers: int, sampler=None, shuffle: bool = False):
    from .data import collate

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                                       num_workers=num_workers, collate_fn=collate, drop_last=False,
                                       persistent_workers=False)


def build_optimizer(params: list[nn.Parameter], tcfg, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, at ``lr`` (default ``tcfg.lr``)."""
    lr = tcfg.lr if lr is None else lr
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=tcfg.weight_decay)


def build_lr_lambda(tcfg, iters_per_epoch: int):
    """Multiplier of the base lr at global iteration ``it``: linear warmup, then step or cosine decay by epoch."""
    total = max(1, tcfg.epochs * iters_per_epoch)

    def factor(it: int) -> float:
        warm = 1.0
        if tcfg.warmup_iters > 0 and it < tcfg.warmup_iters:
            alpha = it / tcfg.warmup_iters
            warm = tcfg.warmup_ratio * (1 - alpha) + alpha
        if tcfg.schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
        epoch = it // max(1, iters_per_epoch)
        return warm * tcfg.gamma ** sum(1 for s in tcfg.steps if epoch >= s)

    return factor


class _Progress:
    """tqdm bar with total loss and whole-run ETA (steps still to run x mean step time so far)."""

    def __init__(self, total_steps_left: int, enabled: bool):
        self.left = total_steps_left
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.done = 0

    def wrap(self, iterable, epoch: int, epochs: int, n: int):
        if not self.enabled:
            return iterable
        from tqdm import tqdm

        self.bar = tqdm(iterable, total=n, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, leave=True)
        return self.bar

    def step(self, loss: float, lr: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        rate = (time.perf_counter() - self.t0) / self.done
        eta = max(0, self.left - self.done) * rate
        self.bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} run ETA {_fmt_s(eta)}", refresh=False)


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fit(task: nn.Module, cfg: RunConfig, train_set, val_set, *, resume: bool = False,
        classes: list[str], category_ids: list[int], gt_json: dict | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Train ``task`` according to ``cfg`` and keep ``cfg.run_dir`` up to date, owning the folder while it does.

    The folder is locked (``.lock``, see :class:`gkd.core.io.RunLock`): a second run into it is refused with the
    owner's pid. Temporary files left by a process killed mid-write are removed first. In a process group only
    rank 0 takes the lock and writes; the other ranks get its verdict (or its error) and train alongside it.

    Args:
        task: see ``kd/task.py``; ``task.detector`` is evaluated and saved.
        cfg: the resolved run config (``cfg.model`` must carry the dataset's class count).
        train_set / val_set: datasets with ``set_epoch`` (train) yielding ``(image, target)``.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        classes / category_ids: dataset class names and COCO ids (saved in checkpoints).
        gt_json: the val split's COCO dict for evaluation (None: no evaluation).
        progress: show a progress bar (rank 0 only).

    Returns:
        The last epoch's metrics record (the same on every rank).
    """
    ctx = current_context()
    with contextlib.ExitStack() as stack:
        run_on_main(lambda: take_run_folder(cfg.run_dir, resume, stack), ctx)
        run = _start_run(task, cfg, train_set, resume=resume, classes=classes, category_ids=category_ids, ctx=ctx)
        evaluation = _Evaluation.build(val_set, gt_json, category_ids, cfg, ctx)
        bar = _Progress((cfg.train.epochs - run.start_epoch) * run.iters_per_epoch, progress and ctx.is_main)
        record = run.last_record
        for epoch in range(run.start_epoch, cfg.train.epochs):
            record = _train_epoch(run, epoch, bar)
            if run.view is not None:
                _check_replicas(run, epoch, record)
            if evaluation is not None and evaluation.due(epoch):
                evaluation.add_metrics(run, record)
            _log_epoch(record, epoch, cfg.train.epochs)
            _save_epoch(run, epoch, record)
        return record


def _log_epoch(record: dict[str, Any], epoch: int, epochs: int) -> None:
    loss = record.get("train/loss", float("nan"))
    if "val/bbox_mAP" in record:  # evaluated this epoch
        log.info("epoch %d/%d  loss %.4f  val bbox_mAP %.4f  mAP_50 %.4f", epoch + 1, epochs, loss,
                 record["val/bbox_mAP"], record["val/bbox_mAP_50"])
    else:
        log.info("epoch %d/%d  loss %.4f", epoch + 1, epochs, loss)


@dataclass
class _Optimisation:
    """The optimizer, its lr schedule and the AMP grad scaler over the task's trainable parameters."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    grad_clip: float | None
    amp: bool

    @classmethod
    def build(cls, task: nn.Module, tcfg, ctx: DistContext, iters_per_epoch: int, amp: bool) -> _Optimisation:
        """At ``train.lr``, scaled linearly with the global batch in a process group when configured."""
        params = [p for p in task.parameters() if p.requires_grad]
        lr = effective_lr(tcfg, ctx.world_size)
        if ctx.enabled or lr != tcfg.lr:
            log.info("%d process(es) x batch %d = global batch %d; lr %g%s", ctx.world_size, tcfg.batch_size,
                     ctx.world_size * tcfg.batch_size, lr,
                     f" (linear scaling of {tcfg.lr:g} for base batch {tcfg.base_batch_size})" if lr != tcfg.lr
                     else "")
        optimizer = build_optimizer(params, tcfg, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(tcfg, iters_per_epoch))
        return cls(params, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=amp), tcfg.grad_clip, amp)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled under AMP), clip, step the optimizer, the scaler and the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP: gradients are averaged over the ranks here
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The run checkpoint's ``optimizer``, ``scheduler`` and ``scaler`` entries (``{}``: no AMP)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class _Run:
    """What the epochs of one run share."""

    task: nn.Module
    cfg: RunConfig
    ctx: DistContext
    device: torch.device
    threads: int
    #: what a step calls: the task, with its trainable modules wrapped in DDP in a process group
    model: nn.Module
    #: the trainable modules DDP wraps (None in a single process)
    view: nn.Module | None
    train_set: Any
    sampler: Any
    loader: torch.utils.data.DataLoader
    iters_per_epoch: int
    optimisation: _Optimisation
    records: RunRecords
    start_epoch: int = 0
    global_step: int = 0
    #: the metrics of the last finished epoch: what a resumed run with no epoch left returns, as the full run did
    last_record: dict[str, Any] = field(default_factory=dict)


def _start_run(task: nn.Module, cfg: RunConfig, train_set, *, resume: bool, classes: list[str],
               category_ids: list[int], ctx: DistContext) -> _Run:
    """Everything the first epoch needs, a resumed run's state restored (rank 0 holds the folder's lock)."""
    tcfg = cfg.train
    device = select_rank_device(tcfg.device, ctx)
    threads = _choose_threads(tcfg.threads, device, ctx)
    # rank 0 reads last.pt (or checks that no run is there) and every rank gets the same state: the other ranks
    # need not see the run folder (a node with its own disk)
    state = run_on_main(lambda: open_run(cfg, resume, ctx.world_size), ctx)
    data_sha = data_fingerprint(cfg) if ctx.is_main else {}  # recorded in last.pt by rank 0, checked on --resume
    seed_everything(cfg.seed)
    task.to(device)
    # DDP over student + adapters only (the frozen teacher stays a plain replica on each rank). gkd's detectors
    # and adapters give every trainable parameter a gradient in every step, so find_unused_parameters stays off
    # unless configured (it walks the autograd graph after each forward).
    model, view = wrap_trainable(task, device, sync_bn=tcfg.sync_bn and ctx.enabled,
                                 find_unused_parameters=tcfg.find_unused_parameters)
    if tcfg.sync_bn and not ctx.enabled:
        log.info("train.sync_bn: one process, nothing to synchronise; plain BatchNorm")
    sampler = _train_sampler(train_set, cfg.seed, ctx)
    loader = make_loader(train_set, tcfg.batch_size, cfg.data.num_workers, sampler=sampler)
    iters_per_epoch = len(loader) if tcfg.max_steps_per_epoch is None else min(len(loader), tcfg.max_steps_per_epoch)
    # (built after the DDP wrap: with sync_bn it replaces the BatchNorm layers, and so their parameters)
    optimisation = _Optimisation.build(task, tcfg, ctx, iters_per_epoch, amp=tcfg.amp and device.type == "cuda")
    run = _Run(task, cfg, ctx, device, threads, model, view, train_set, sampler, loader, iters_per_epoch,
               optimisation, RunRecords(cfg, classes, category_ids, data_sha))
    if resume:
        _restore(run, state)
    return run


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Continue from ``last.pt``'s state: weights, task state, optimisation, this rank's RNG, epoch, best mAP."""
    run.task.detector.load_state_dict(state["model"])
    run.task.load_extra_state(state.get("extra", {}))
    run.optimisation.load_state_dict(state)
    restore_rng(state["rng_ranks"][run.ctx.rank] if "rng_ranks" in state else state["rng"])
    run.records.best = float(state.get("best", -1.0))
    run.start_epoch = int(state["epoch"]) + 1
    run.global_step = run.start_epoch * run.iters_per_epoch
    run.last_record = dict(state.get("metrics", {}))
    epochs = run.cfg.train.epochs
    log.info("resuming '%s' at epoch %d/%d", run.cfg.name, run.start_epoch + 1, epochs)
    if run.start_epoch >= epochs:
        log.info("run already finished %d epochs; nothing to do (raise train.epochs to continue)", epochs)


def _train_epoch(run: _Run, epoch: int, bar: _Progress) -> dict[str, Any]:
    """The training steps of ``epoch``; returns its record: step, lr, loss terms averaged over every rank's steps,
    the task's metrics, time."""
    t_epoch = time.perf_counter()
    task, cfg = run.task, run.cfg
    task.train()
    context = {"epoch": epoch, "device": run.device, "run_dir": cfg.run_dir, "train_set": run.train_set, "cfg": cfg,
               "dist": run.ctx}
    task_metrics = task.on_epoch_start(epoch, context) or {}
    task.train()  # (the hook may leave modules in eval mode: the prototype refresh runs the student in it)
    run.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):
        run.train_set.set_epoch(epoch)
    sums: dict[str, float] = {}
    n_steps = 0
    for step, (images, targets) in enumerate(bar.wrap(run.loader, epoch, cfg.train.epochs, run.iters_per_epoch)):
        if step >= run.iters_per_epoch:
            break
        out = _train_step(run, images, targets, epoch)
        n_steps += 1
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.step(float(out["loss"].detach()), run.optimisation.lr)
    sums = all_reduce_sums(sums, run.device)  # every rank's steps count: the averages are the job's, not rank 0's
    record = {"epoch": epoch, "step": run.global_step, "lr": run.optimisation.lr,
              **{f"train/{k}": v / max(1, n_steps * run.ctx.world_size) for k, v in sums.items()},
              **{f"task/{k}": v for k, v in task_metrics.items()}}
    record["time/train_s"] = round(time.perf_counter() - t_epoch, 3)
    record["time/threads"] = run.threads
    return record


def _train_step(run: _Run, images, targets, epoch: int) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (autocast under AMP); returns the task's loss dict."""
    device = run.device
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=run.optimisation.amp):
        out = run.model(images, targets)
    _check_finite(out, run, epoch)
    run.optimisation.step(out["loss"])
    run.global_step += 1
    return out


def _check_replicas(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """In a process group: every rank holds the same trainable parameters and buffers after ``epoch`` (BatchNorm
    statistics are rank 0's), or the job stops naming the first rank that differs."""
    sync_buffers(run.view)
    verify_identical(f"trainable parameters and buffers after epoch {epoch + 1}", state_sha256(run.view.state_dict()))
    record["world_size"] = run.ctx.world_size


@dataclass
class _Evaluation:
    """COCO evaluation of ``task.detector`` on the val split, every ``train.eval_interval`` epochs and after the
    last; sharded over the ranks in a process group and gathered on rank 0."""

    loader: torch.utils.data.DataLoader
    evaluator: Any
    interval: int
    epochs: int

    @classmethod
    def build(cls, val_set, gt_json: dict | None, category_ids: list[int], cfg: RunConfig,
              ctx: DistContext) -> _Evaluation | None:
        """None when the run does not evaluate: no ``gt_json``, or ``train.eval_interval`` 0 (the caller evaluates
        the checkpoint itself)."""
        if gt_json is None or cfg.train.eval_interval <= 0:
            return None
        from .evaluation import CocoEvaluator

        return cls(_val_loader(val_set, cfg, ctx), CocoEvaluator(gt_json, category_ids, cfg.eval.max_dets),
                   cfg.train.eval_interval, cfg.train.epochs)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.interval == 0 or epoch + 1 == self.epochs

    def add_metrics(self, run: _Run, record: dict[str, Any]) -> None:
        """Evaluate and add ``val/<metric>`` and ``time/eval_s`` to ``record``."""
        t_eval = time.perf_counter()
        if run.ctx.enabled:
            metrics = evaluate_sharded(run.task.detector, self.loader, self.evaluator, run.device)
        else:
            from .evaluation import evaluate_detector

            metrics = evaluate_detector(run.task.detector, self.loader, self.evaluator, run.device)
        record.update({f"val/{k}": v for k, v in metrics.items()})
        record["time/eval_s"] = round(time.perf_counter() - t_eval, 3)


def _save_epoch(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """Rank 0 writes the epoch's metrics and checkpoints, with every rank's RNG state in a process group."""
    rng_ranks = all_gather_objects(rng_state()) if run.ctx.enabled else None  # (a collective: every rank)
    if run.ctx.is_main:
        run.records.save_epoch(run.task, run.optimisation, epoch, record, rng_ranks)


def _check_finite(out: dict[str, torch.Tensor], run: _Run, epoch: int) -> None:
    """Stop at a non-finite loss term after saving the last good state. In a process group every rank learns that
    one rank's loss is bad (one small all-reduce per step) and all stop together; rank 0 saves."""
    bad = [k for k, v in out.items() if "loss" in k and not torch.isfinite(v.detach()).all()]
    if not any_rank(bool(bad), run.device):
        return
    step = run.global_step
    path = run.cfg.run_dir / "checkpoints" / f"last_good_step{step}.pt"
    if run.ctx.is_main:  # the weights are still those before this step (identical on every rank): the last good state
        save_checkpoint(run.records.training_state(run.task, run.optimisation, epoch - 1), path)
    if run.ctx.enabled:
        import torch.distributed as dist

        dist.barrier()  # the file exists before any rank reports it
    if not bad:
        raise SharedRankError(f"non-finite loss on another rank at step {step} (epoch {epoch + 1}); last good state "
                              f"saved to {path}")
    term = next((k for k in bad if k != "loss"), bad[0])
    raise GkdError(f"non-finite loss '{term}' ({float(out[term].detach())}) at step {step} (epoch {epoch + 1}); "
                   f"last good state saved to {path}; try a lower train.lr or train.grad_clip")


def _train_sampler(train_set, seed: int, ctx):
    """One shuffled order per epoch from ``seed + epoch``; in a process group each rank takes its share of it
    (``DistributedSampler`` draws the same permutation as :class:`EpochSampler`, then deals it out)."""
    if not ctx.enabled:
        return EpochSampler(len(train_set), seed)
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)


def _val_loader(val_set, cfg: RunConfig, ctx):
    """All of the val split for one process; in a process group this rank's batches (:func:`shard_batches`)."""
    if not ctx.enabled:
        return make_loader(val_set, cfg.eval.batch_size, cfg.data.num_workers)
    from .data import collate

    sampler = ShardedBatchSampler(len(val_set), cfg.eval.batch_size, ctx.rank, ctx.world_size)
    return torch.utils.data.DataLoader(val_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       collate_fn=collate)


def _choose_threads(asked: int, device: torch.device, ctx) -> int:
    """``train.threads``, or (0) what :func:`gkd.kd.cpu_share.auto_threads` leaves other processes; set for torch."""
    if asked:
        torch.set_num_threads(asked)
        return asked
    if device.type != "cpu" or ctx.enabled:  # GPU training, or torchrun (which sets OMP_NUM_THREADS per rank)
        return torch.get_num_threads()
    from .cpu_share import auto_threads

    threads, why = auto_threads()
    torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s; train.threads=N fixes it)", threads, why)
    return threads
