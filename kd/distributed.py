"""Many processes, GPUs and machines: ``torch.distributed`` launched by ``torchrun`` (see docs/distributed.md).

Everything here is PyTorch's own machinery (``init_process_group``, ``DistributedDataParallel``,
``DistributedSampler``, ``SyncBatchNorm``, the object collectives); this module only decides *when* to use it and
keeps the single-process path exactly as it was: without ``torchrun`` (no ``WORLD_SIZE`` in the environment), every
helper is a no-op and :func:`current_context` is rank 0 of a world of 1.

* :func:`process_group`: init (NCCL on GPUs, Gloo on CPU) with a collective timeout, so a dead rank ends the job
  instead of hanging it; errors name the rank (``rank 1: <cause>``); teardown.
* Rank helpers: :func:`current_context`, :func:`run_on_main` (rank 0 does it, every rank gets its result or its
  error), :func:`broadcast_object`, :func:`gather_objects`, :func:`all_reduce_sums`.
* :func:`wrap_trainable`: DDP over the task's trainable children only (student + adapters); a frozen teacher stays a
  plain replica on every rank.
* :func:`shard_batches`: batch-aligned sharding, so that a sharded evaluation or prototype extraction computes each
  batch exactly as one process would, and the gathered result equals the single-process one.
* :func:`state_sha256` / :func:`verify_identical`: a checksum of tensors compared across ranks and logged per rank.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from gkd.core.errors import GkdError

__all__ = ["DistContext", "select_device", "SharedRankError", "current_context", "launched_by_torchrun", "process_group",
           "select_rank_device", "run_on_main", "broadcast_object", "gather_objects", "all_gather_objects",
           "all_reduce_sums", "any_rank", "sync_buffers", "TrainableView", "wrap_trainable", "shard_batches",
           "ShardedBatchSampler", "state_sha256", "verify_identical", "torchrun_command", "relaunch",
           "effective_lr", "evaluate_sharded",
           "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV"]

log = logging.getLogger("gkd")

#: collective timeout when neither ``train.dist_timeout_s`` nor the environment sets one (torch's own default)
DEFAULT_TIMEOUT_S = 1800
#: environment variable that overrides ``train.dist_timeout_s`` (seconds), e.g. for a quick failure on a cluster
TIMEOUT_ENV = "GKD_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. ``world_size == 1`` (the default) is the plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class SharedRankError(GkdError):
    """An error rank 0 found and shared with every rank (run folder in use, nothing to resume, ...). Rank 0 prints
    it; the other ranks exit with the same status without printing it again."""


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher with its environment) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current_context() -> DistContext:
    """The initialised process group's rank and size; rank 0 of 1 when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       dist.get_backend())


def _timeout_s(tcfg) -> int:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return int(getattr(tcfg, "dist_timeout_s", DEFAULT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise GkdError(f"{TIMEOUT_ENV}: must be a whole number of seconds >= 1, got {raw!r}")
    return value


def _backend(tcfg) -> str:
    """``train.dist_backend``: auto -> NCCL when the run uses CUDA, else Gloo. NCCL without a GPU is refused."""
    want = getattr(tcfg, "dist_backend", "auto")
    device = getattr(tcfg, "device", "auto")
    cuda = torch.cuda.is_available() and device != "cpu"
    if want == "nccl" and not torch.cuda.is_available():
        raise GkdError("train.dist_backend: 'nccl' needs CUDA GPUs, and torch sees none on this machine; use 'gloo' "
                       "(or 'auto', which picks Gloo on CPU)")
    if want == "nccl" and device == "cpu":
        raise GkdError("train.dist_backend: 'nccl' runs on GPUs, but train.device is 'cpu'; use 'gloo' or 'auto'")
    if want == "auto":
        return "nccl" if cuda else "gloo"
    return want


def select_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for ``cuda`` without a GPU is a user error naming
    ``option`` (the key or command-line option the user set)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GkdError(f"{option}: 'cuda' requested but torch sees no CUDA GPU on this machine; use 'auto' or 'cpu'")
    return torch.device(name)


def select_rank_device(name: str, ctx: DistContext, option: str = "train.device") -> torch.device:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` (made current) when the run uses CUDA, else the CPU."""
    device = select_device(name, option)
    if not ctx.enabled or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise GkdError(f"rank {ctx.rank}: local rank {ctx.local_rank} has no GPU of its own (this machine has "
                       f"{count}); start at most {count} processes per machine (--nproc_per_node)")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


class _RankLogFilter(logging.Filter):
    """Ranks other than 0 print only warnings, errors and the lines meant for every rank (``extra={"all_ranks":
    True}``, e.g. checksums); those lines and every non-zero rank's lines name the rank."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        every = getattr(record, "all_ranks", False)
        if self.rank != 0 and not every and record.levelno < logging.WARNING:
            return False
        if (every or self.rank != 0) and not str(record.msg).startswith("rank "):
            record.msg = f"rank {self.rank}: {record.msg}"
        return True


@contextlib.contextmanager
def process_group(tcfg) -> Iterator[DistContext]:
    """Join the job's process group when torchrun started this process; a plain no-op otherwise.

    Collectives time out after ``train.dist_timeout_s`` (or ``$GKD_DIST_TIMEOUT_S``) seconds, so a rank that died or
    hangs ends the job with an error instead of blocking the others for ever. Any error leaving the block names
    this process's rank; a collective that failed because another rank stopped says so.

    Args:
        tcfg: the ``train`` section (``dist_backend``, ``dist_timeout_s``, ``device``).

    Yields:
        The :class:`DistContext` of this process.
    """
    import torch.distributed as dist

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        yield current_context()
        return
    rank = int(os.environ["RANK"])
    try:
        backend = _backend(tcfg)
        timeout = datetime.timedelta(seconds=_timeout_s(tcfg))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
        dist.init_process_group(backend=backend, timeout=timeout)
    except GkdError as exc:
        raise GkdError(f"rank {rank}: {exc}") from None
    ctx = current_context()
    filt = _RankLogFilter(ctx.rank)
    log.addFilter(filt)
    ok = False
    try:
        yield ctx
        ok = True
    except SharedRankError:
        raise
    except GkdError as exc:
        raise GkdError(str(exc) if str(exc).startswith("rank ") else f"rank {ctx.rank}: {exc}") from None
    except Exception as exc:
        if not _collective_failure(exc):
            # A programming error keeps its traceback; this line says which rank it came from.
            log.error("rank %d: %s: %s", ctx.rank, type(exc).__name__, _first_line(exc), extra={"all_ranks": True})
            raise
        first = _first_line(exc)
        raise GkdError(f"rank {ctx.rank}: a collective operation failed or timed out (another rank probably stopped "
                       f"first: see its error): {first}") from None
    finally:
        log.removeFilter(filt)
        if ok:
            dist.destroy_process_group()


#: what Gloo / NCCL / c10d put in the RuntimeError of a collective whose peer died or that timed out
_COLLECTIVE_SIGNS = ("gloo", "nccl", "c10d", "processgroup", "connection closed by peer", "connection reset",
                     "timed out", "broken pipe")


def _collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _COLLECTIVE_SIGNS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).encode("ascii", "ignore").decode().strip()  # (Gloo's message ends in an emoji)
    return text.splitlines()[0].strip() if text else type(exc).__name__


def run_on_main(fn: Callable[[], Any], ctx: DistContext | None = None) -> Any:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises its :class:`GkdError` (as
    :class:`SharedRankError` on the other ranks, which then do not print it again)."""
    ctx = ctx or current_context()
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except GkdError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise GkdError(error) if ctx.is_main else SharedRankError(error)
    return result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; tensors inside come back on the CPU)."""
    import torch.distributed as dist

    if not current_context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
    import torch.distributed as dist

    ctx = current_context()
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    ctx = current_context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum per-key floats over the ranks (every rank must hold the same keys)."""
    import torch.distributed as dist

    if not current_context().enabled or not sums:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss: all ranks stop together)."""
    import torch.distributed as dist

    if not current_context().enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward, and each rank's last forward then updates its own copy, so
    after an epoch they differ slightly; evaluation shards and checkpoints need the same model on every rank."""
    import torch.distributed as dist

    if not current_context().enabled:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


class TrainableView(nn.Module):
    """The children of ``task`` that train (student, adapters) as one module whose forward is ``task``'s.

    DistributedDataParallel wraps this view, not the task: a frozen child (the teacher: no parameter requires a
    gradient) is not registered here, so DDP neither broadcasts nor buckets it; it stays a plain replica on each
    rank, used by ``task.forward`` under ``no_grad``.
    """

    def __init__(self, task: nn.Module):
        super().__init__()
        for name, child in task.named_children():
            if any(p.requires_grad for p in child.parameters()):
                self.add_module(name, child)
        object.__setattr__(self, "_task", task)  # not a submodule: its frozen parts stay outside DDP

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self._task(images, targets)


def wrap_trainable(task: nn.Module, device: torch.device, *, sync_bn: bool = False,
                   find_unused_parameters: bool = False) -> tuple[nn.Module, TrainableView | None]:
    """``task`` for a single process; DDP over its :class:`TrainableView` in a process group.

    Returns:
        ``(module to call for a training step, the view or None)``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not current_context().enabled:
        return task, None
    view = TrainableView(task)
    if sync_bn:
        if device.type != "cuda":
            raise GkdError("train.sync_bn: torch's SyncBatchNorm runs on GPUs only; set train.sync_bn=false for a "
                           "CPU run")
        # Converted in place inside the student (the view's children are the task's own modules).
        for name, child in list(view.named_children()):
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            setattr(view, name, converted)
            setattr(task, name, converted)
    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(view, device_ids=ids, find_unused_parameters=find_unused_parameters)
    return ddp, view


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """Batch-aligned shard: the batches ``[0, b), [b, 2b), ...`` of ``range(n)`` dealt round-robin to the ranks.

    Each batch holds exactly the images one process would batch together, so its outputs are the same (same
    padding, same kernels), and putting the batches back in order reproduces the single-process result.

    Returns:
        ``[(global batch index, indices)]`` of this rank.
    """
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, max(1, batch_size))]
    return [(i, b) for i, b in enumerate(batches) if i % world_size == rank]


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """The batches of :func:`shard_batches` for a DataLoader's ``batch_sampler`` (no padding, no repeats)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        self.shard = shard_batches(n, batch_size, rank, world_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([b for _, b in self.shard])

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def batch_ids(self) -> list[int]:
        return [i for i, _ in self.shard]


def state_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (in sorted name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_identical(what: str, digest: str) -> None:
    """Log ``what``'s checksum on every rank and stop the job if the ranks disagree (they never should: a mismatch
    means the ranks train different models)."""
    ctx = current_context()
    if not ctx.enabled:
        return
    log.info("%s: sha256 %s", what, digest, extra={"all_ranks": True})
    digests = all_gather_objects(digest)
    if len(set(digests)) != 1:
        where = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise RuntimeError(f"{what} differs between ranks ({where})")


def effective_lr(tcfg, world_size: int) -> float:
    """``train.lr``, or with ``train.lr_scaling=linear`` the linear scaling rule (Goyal et al. 2017):
    ``lr * world_size * batch_size / base_batch_size`` (the global batch against the one ``lr`` was tuned for)."""
    if getattr(tcfg, "lr_scaling", "none") == "linear":
        return tcfg.lr * world_size * tcfg.batch_size / tcfg.base_batch_size
    return tcfg.lr


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that starts ``gkd <argv>`` on ``nproc`` processes of this machine through torchrun
    (``python -m torch.distributed.run --standalone``: a local rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "gkd", *argv]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``gkd <argv>`` under torchrun on ``nproc`` local processes and return its exit status.

    Raises:
        GkdError: already inside a torchrun job.
    """
    import subprocess

    if launched_by_torchrun():
        raise GkdError("--nproc: this process was already started by torchrun; drop --nproc (torchrun's "
                       "--nproc_per_node sets the process count)")
    log.info("starting %d processes: %s", nproc, " ".join(torchrun_command(nproc, argv)))
    return subprocess.call(torchrun_command(nproc, argv))


@torch.no_grad()
def evaluate_sharded(model: nn.Module, loader, evaluator, device: torch.device) -> dict[str, float]:
    """COCO metrics of ``model`` over the whole val split, each rank detecting on its batches only.

    ``loader`` batches through a :class:`ShardedBatchSampler`. Rank 0 gathers every rank's detections, puts them back
    in global batch order (the order one process would have produced them) and runs COCOeval once; the metrics
    reach every rank. With the same checkpoint, batch size and kernels this equals the single-process evaluation.

    Returns:
        The 12 named COCO metrics (see :class:`gkd.kd.evaluation.CocoEvaluator`), on every rank.
    """
    model.eval()
    evaluator.reset()
    chunks: list[tuple[int, list[dict]]] = []
    image_ids: list[int] = []
    for b, (images, targets) in zip(loader.batch_sampler.batch_ids, loader):
        start = len(evaluator.detections)
        evaluator.process(targets, model([im.to(device, non_blocking=True) for im in images]))
        chunks.append((b, evaluator.detections[start:]))
        image_ids += [int(t["image_id"]) for t in targets]
    parts = gather_objects((chunks, image_ids))
    metrics = None
    if parts is not None:
        ordered = sorted((c for rank_chunks, _ in parts for c in rank_chunks), key=lambda c: c[0])
        evaluator.detections = [d for _, dets in ordered for d in dets]
        metrics = evaluator.evaluate(image_ids=[i for _, ids in parts for i in ids])
    return broadcast_object(metrics)
