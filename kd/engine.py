"""The training loop shared by ``gkd train`` and ``gkd distill``.

``fit`` trains a task (see ``kd/task.py``) epoch by epoch and keeps ``runs/<name>/`` up to date:

* ``config.yaml``        the resolved config
* ``checkpoints/last.pt`` full state after the last finished epoch (model, task extra state, optimizer, scheduler,
  AMP scaler, RNG states, epoch, config); written atomically
* ``checkpoints/model.pt`` detector-only checkpoint of the last epoch (what ``gkd eval`` / ``gkd export`` take);
  ``checkpoints/best.pt`` the same for the best val ``bbox_mAP``
* ``metrics.jsonl`` / ``metrics.csv``: one record per epoch (train loss terms, lr, time, task metrics, COCO metrics)
* ``log.txt``

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
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gkd.core.config import dump_config, to_dict
from gkd.core.errors import GkdError
from gkd.core.io import append_jsonl, atomic_write_text

from .checkpoint import detector_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import DistContext, ShardedBatchSampler, SharedRankError, any_rank, current_context, run_on_main
from .resume import data_fingerprint, refuse_foreign_files, state_to_resume

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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(st):
    # (version, tuple_of_625_ints, gauss_next): plain ints/tuples survive weights_only loading.
    return [st[0], list(st[1]), st[2]]


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def fit(task: nn.Module, cfg: RunConfig, train_set, val_set, *, resume: bool = False,
        classes: list[str], category_ids: list[int], gt_json: dict | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Train ``task`` according to ``cfg`` and keep ``cfg.run_dir`` up to date, owning the folder while it does.

    The folder is locked (``.lock``, see :class:`gkd.core.io.RunLock`): a second run into it is refused with the
    owner's pid. Temporary files left by a process killed mid-write are removed first. In a process group only
    rank 0 takes the lock and writes; the other ranks get its verdict (or its error) and train alongside it.
    """
    from gkd.core.io import RunLock, ensure_writable_folder, remove_stale_temporaries


    ctx = current_context()
    with contextlib.ExitStack() as stack:
        def own_folder() -> None:
            if not resume:  # before anything is written there
                refuse_foreign_files(cfg.run_dir)
            stack.enter_context(RunLock(cfg.run_dir))
            ensure_writable_folder(cfg.run_dir / "checkpoints", "the checkpoint folder")  # before an epoch is spent
            for folder in (cfg.run_dir, cfg.run_dir / "checkpoints"):
                for stale in remove_stale_temporaries(folder):
                    log.info("removed %s (left by a process killed while writing it)", stale)

        run_on_main(own_folder, ctx)
        return _fit(task, cfg, train_set, val_set, resume=resume, classes=classes, category_ids=category_ids,
                    gt_json=gt_json, progress=progress, ctx=ctx)


def _open_run(cfg: RunConfig, resume: bool, world_size: int) -> dict[str, Any] | None:
    """Rank 0's checks and first writes: the resumable state (None for a fresh run), config.yaml, log.txt."""
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


def _fit(task: nn.Module, cfg: RunConfig, train_set, val_set, *, resume: bool, classes: list[str],
         category_ids: list[int], gt_json: dict | None, progress: bool, ctx) -> dict[str, Any]:
    """The training loop of :func:`fit` (rank 0 holds the run folder's lock).

    Args:
        task: see ``kd/task.py``; ``task.detector`` is evaluated and saved.
        cfg: the resolved run config (``cfg.model`` must carry the dataset's class count).
        train_set / val_set: datasets with ``set_epoch`` (train) yielding ``(image, target)``.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        classes / category_ids: dataset class names and COCO ids (saved in checkpoints).
        gt_json: the val split's COCO dict for evaluation (None: no evaluation).
        progress: show a progress bar (rank 0 only).
        ctx: this process's :class:`gkd.kd.distributed.DistContext`.

    Returns:
        The last epoch's metrics record (the same on every rank).
    """
    from . import distributed as D
    from .evaluation import CocoEvaluator, evaluate_detector

    run_dir = cfg.run_dir
    device = D.select_rank_device(cfg.train.device, ctx)
    threads = _choose_threads(cfg.train.threads, device, ctx)
    tcfg = cfg.train
    use_amp = tcfg.amp and device.type == "cuda"

    # rank 0 reads last.pt (or checks that no run is there) and every rank gets the same state: the other ranks
    # need not see the run folder (a node with its own disk)
    state = D.run_on_main(lambda: _open_run(cfg, resume, ctx.world_size), ctx)
    data_sha = data_fingerprint(cfg) if ctx.is_main else {}  # recorded in last.pt by rank 0, checked on --resume
    start_epoch = int(state["epoch"]) + 1 if resume else 0
    seed_everything(cfg.seed)
    task.to(device)
    # DDP over student + adapters only (the frozen teacher stays a plain replica on each rank). gkd's detectors
    # and adapters give every trainable parameter a gradient in every step, so find_unused_parameters stays off
    # unless configured (it walks the autograd graph after each forward).
    model, view = D.wrap_trainable(task, device, sync_bn=tcfg.sync_bn and ctx.enabled,
                                   find_unused_parameters=tcfg.find_unused_parameters)
    if tcfg.sync_bn and not ctx.enabled:
        log.info("train.sync_bn: one process, nothing to synchronise; plain BatchNorm")

    sampler = _train_sampler(train_set, cfg.seed, ctx)
    loader = make_loader(train_set, tcfg.batch_size, cfg.data.num_workers, sampler=sampler)
    iters_per_epoch = len(loader) if tcfg.max_steps_per_epoch is None else min(len(loader), tcfg.max_steps_per_epoch)
    params = [p for p in task.parameters() if p.requires_grad]
    lr = D.effective_lr(tcfg, ctx.world_size)
    if ctx.enabled or lr != tcfg.lr:
        log.info("%d process(es) x batch %d = global batch %d; lr %g%s", ctx.world_size, tcfg.batch_size,
                 ctx.world_size * tcfg.batch_size, lr,
                 f" (linear scaling of {tcfg.lr:g} for base batch {tcfg.base_batch_size})" if lr != tcfg.lr else "")
    optimizer = build_optimizer(params, tcfg, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(tcfg, iters_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    best = -1.0
    if resume:
        task.detector.load_state_dict(state["model"])
        task.load_extra_state(state.get("extra", {}))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng_ranks"][ctx.rank] if "rng_ranks" in state else state["rng"])
        best = float(state.get("best", -1.0))
        log.info("resuming '%s' at epoch %d/%d", cfg.name, start_epoch + 1, tcfg.epochs)
        if start_epoch >= tcfg.epochs:
            log.info("run already finished %d epochs; nothing to do (raise train.epochs to continue)", tcfg.epochs)

    evaluates = gt_json is not None and tcfg.eval_interval > 0  # 0: the caller evaluates the checkpoint itself
    val_loader = _val_loader(val_set, cfg, ctx) if evaluates else None
    evaluator = CocoEvaluator(gt_json, category_ids, cfg.eval.max_dets) if evaluates else None
    bar = _Progress((tcfg.epochs - start_epoch) * iters_per_epoch, progress and ctx.is_main)
    # a resumed run with no epoch left returns the metrics of its last epoch, as an uninterrupted run did
    record: dict[str, Any] = dict(state.get("metrics", {})) if resume else {}
    global_step = start_epoch * iters_per_epoch
    for epoch in range(start_epoch, tcfg.epochs):
        t_epoch = time.perf_counter()
        task.train()
        context = {"epoch": epoch, "device": device, "run_dir": run_dir, "train_set": train_set, "cfg": cfg,
                   "dist": ctx}
        task_metrics = task.on_epoch_start(epoch, context) or {}
        task.train()
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        sums: dict[str, float] = {}
        n_steps = 0
        for step, (images, targets) in enumerate(bar.wrap(loader, epoch, tcfg.epochs, iters_per_epoch)):
            if step >= iters_per_epoch:
                break
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=use_amp):
                out = model(images, targets)
            _check_finite(out, global_step, epoch, task, cfg, optimizer, scheduler, scaler, classes, category_ids,
                          ctx, device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()  # DDP: gradients are averaged over the ranks here
            if tcfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            n_steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.step(float(out["loss"].detach()), optimizer.param_groups[0]["lr"])
        sums = D.all_reduce_sums(sums, device)  # every rank's steps count: the averages are the job's, not rank 0's
        record = {"epoch": epoch, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train/{k}": v / max(1, n_steps * ctx.world_size) for k, v in sums.items()},
                  **{f"task/{k}": v for k, v in task_metrics.items()}}
        record["time/train_s"] = round(time.perf_counter() - t_epoch, 3)
        record["time/threads"] = threads
        if view is not None:
            D.sync_buffers(view)
            D.verify_identical(f"trainable parameters and buffers after epoch {epoch + 1}",
                               D.state_sha256(view.state_dict()))
            record["world_size"] = ctx.world_size
        if evaluator is not None and ((epoch + 1) % tcfg.eval_interval == 0 or epoch + 1 == tcfg.epochs):
            t_eval = time.perf_counter()
            if ctx.enabled:
                metrics = D.evaluate_sharded(task.detector, val_loader, evaluator, device)
            else:
                metrics = evaluate_detector(task.detector, val_loader, evaluator, device)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            record["time/eval_s"] = round(time.perf_counter() - t_eval, 3)
            log.info("epoch %d/%d  loss %.4f  val bbox_mAP %.4f  mAP_50 %.4f", epoch + 1, tcfg.epochs,
                     record.get("train/loss", float("nan")), metrics["bbox_mAP"], metrics["bbox_mAP_50"])
        else:
            log.info("epoch %d/%d  loss %.4f", epoch + 1, tcfg.epochs, record.get("train/loss", float("nan")))
        rng_ranks = D.all_gather_objects(_rng_state()) if ctx.enabled else None  # (a collective: every rank)
        if ctx.is_main:
            best = _save_epoch(task, cfg, optimizer, scheduler, scaler, classes, category_ids, epoch, record, best,
                               rng_ranks, data_sha)
    return record


def _save_epoch(task, cfg, optimizer, scheduler, scaler, classes, category_ids, epoch, record, best,
                rng_ranks, data_sha: dict[str, str]) -> float:
    """Rank 0's writes after an epoch: metrics, ``model.pt``, ``best.pt`` when improved, ``last.pt``. Returns
    the best val mAP so far."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    metrics_path = cfg.run_dir / "metrics.jsonl"
    append_jsonl(metrics_path, record)
    _write_csv(metrics_path, cfg.run_dir / "metrics.csv")
    det = detector_checkpoint(task.detector, cfg.model, classes, category_ids)
    det["metrics"] = record
    save_checkpoint(det, ckpt_dir / "model.pt")
    if record.get("val/bbox_mAP", -1.0) > best:
        best = record["val/bbox_mAP"]
        save_checkpoint(det, ckpt_dir / "best.pt")
    full = _full_state(task, cfg, optimizer, scheduler, scaler, classes, category_ids, epoch)
    full["best"] = best
    full["metrics"] = record
    full["data_sha256"] = data_sha
    if rng_ranks is not None:  # each rank resumes with its own RNG stream; rank 0's stays under "rng"
        full["rng_ranks"] = rng_ranks
        full["world_size"] = len(rng_ranks)
    save_checkpoint(full, ckpt_dir / "last.pt")
    return best


def _full_state(task, cfg, optimizer, scheduler, scaler, classes, category_ids, epoch) -> dict[str, Any]:
    ckpt = detector_checkpoint(task.detector, cfg.model, classes, category_ids)
    ckpt.update({"kind": "run", "epoch": epoch, "config": to_dict(cfg), "extra": task.extra_state(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": _rng_state()})
    return ckpt


def _check_finite(out, step, epoch, task, cfg, optimizer, scheduler, scaler, classes, category_ids,
                  ctx=None, device=None) -> None:
    """Stop at a non-finite loss term after saving the last good state. In a process group every rank learns that
    one rank's loss is bad (one small all-reduce per step) and all stop together; rank 0 saves."""

    ctx = ctx or DistContext()
    bad = [k for k, v in out.items() if "loss" in k and not torch.isfinite(v.detach()).all()]
    if not any_rank(bool(bad), device or torch.device("cpu")):
        return
    path = cfg.run_dir / "checkpoints" / f"last_good_step{step}.pt"
    if ctx.is_main:  # the weights are still those before this step (identical on every rank): the last good state
        state = _full_state(task, cfg, optimizer, scheduler, scaler, classes, category_ids, epoch - 1)
        save_checkpoint(state, path)
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()  # the file exists before any rank reports it
    if not bad:
        raise SharedRankError(f"non-finite loss on another rank at step {step} (epoch {epoch + 1}); last good state "
                              f"saved to {path}")
    term = next((k for k in bad if k != "loss"), bad[0])
    raise GkdError(f"non-finite loss '{term}' ({float(out[term].detach())}) at step {step} (epoch {epoch + 1}); "
                   f"last good state saved to {path}; try a lower train.lr or train.grad_clip")


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
