"""The stages ``gkd run`` and ``gkd study`` are made of, and the one scheme that keys, reuses and records them.

**Content-keyed stages.** Every stage has a key: the SHA-256 of what its result depends on (its resolved config,
the SHA-256 of its input files, gkd's version). A stage is reused only when its recorded key matches and its output
files are still there with the recorded SHA-256. Otherwise it runs again ("changed: student.train.lr 0.02 -> 0.01",
"interrupted earlier", "output modified since it was made: ..."), and so do the stages after it (their inputs
changed). A runner made with ``on_change="refuse"`` (the study: hours of compute whose table must never mix two
designs) stops with a one-line error instead of rerunning a stage whose key changed.

**Records.** ``runs/<name>/manifest.json`` holds one record per stage (status, key, inputs, outputs with their
SHA-256, seconds, metrics), rewritten atomically whenever a stage starts or ends.

**Training stages** (:func:`train_teacher`, :func:`train_student`) run in the stage's own run folder and resume an
interrupted run of exactly the same config (its ``last.pt`` records it); a folder made with another config is a
superseded result of the same stage and is removed first.

**Side by side.** :meth:`StageRunner.run_parallel` runs independent stages in spawned worker processes, each with
its share of the cores, recording each one as it finishes.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["UNKEYED", "Job", "Manifest", "Outcome", "Progress", "StageRunner", "artifact", "content_key",
           "data_stage", "format_seconds", "free_cores", "output_sha", "train_images", "train_student",
           "train_teacher", "train_teacher_processes", "training_inputs", "training_work", "versions",
           "with_threads"]

log = logging.getLogger("gkd")
#: config keys that do not change a training stage's result (they are left out of its key)
UNKEYED = ("train.threads", "data.num_workers", "train.dist_timeout_s")
#: the key of the stage running in this process (a training stage resumes only a run of the same key)
_STAGE_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("gkd_stage_key", default="")
#: the file in a training stage's run folder that names the stage key it was started for
KEY_FILE = "stage_key.txt"


# ----------------------------------------------------------------------------------------------------------------
# keys and records


def versions() -> dict[str, str]:
    """The software a result was made with (recorded, not keyed: gkd's own version is in every key)."""
    import importlib.metadata as md
    import subprocess

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("gkd", "torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "pycocotools", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def artifact(path: Path) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file a stage made or read: what later stages key on."""
    from gkd.core.io import file_sha256

    return {"path": str(path), "sha256": file_sha256(path)}


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def output_sha(record: dict[str, Any], *path: str) -> str:
    """The SHA-256 of the artifact at ``record["outputs"][path...]``."""
    node: Any = record["outputs"]
    for p in path:
        node = node[p]
    return node["sha256"]


def _artifacts_in(record: Any) -> list[dict]:
    """Every ``{"path", "sha256"}`` artifact recorded anywhere in a stage record."""
    if isinstance(record, dict):
        if set(record) == {"path", "sha256"}:
            return [record]
        return [a for v in record.values() for a in _artifacts_in(v)]
    if isinstance(record, list):
        return [a for v in record for a in _artifacts_in(v)]
    return []


@dataclass
class Outcome:
    """What one stage did in this invocation."""

    stage: str
    action: str  # "reused" | "ran"
    reason: str
    seconds: float = 0.0


class Manifest:
    """``runs/<name>/manifest.json``: one record per stage (key, inputs, outputs), rewritten atomically.

    ``config`` is the command's own resolved config (recorded, not keyed: each stage keys what it depends on)."""

    VERSION = 2

    def __init__(self, path: Path, config: dict[str, Any]):
        from gkd.core.io import read_json

        self.path = path
        old = read_json(path, "manifest") if path.exists() else {}
        stages = old.get("stages") if isinstance(old, dict) and old.get("version") == self.VERSION else None
        # an older manifest's records carry no keys: its stages run again
        self.data: dict[str, Any] = {"format": "gkd-manifest", "version": self.VERSION, "command": sys.argv,
                                     "config": config, "versions": versions(),
                                     "stages": stages if isinstance(stages, dict) else {}}

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def write(self, stage: str, record: dict[str, Any]) -> None:
        self.stages[stage] = record
        self.save()

    def save(self) -> None:
        from gkd.core.io import atomic_write_json

        atomic_write_json(self.path, self.data)


def _config_changes(old: dict, inputs: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    from gkd.core.config import config_differences

    return config_differences(old.get("inputs", {}), inputs)


def _why_run(old: dict | None, key: str, inputs: dict[str, Any], prefix: str = "") -> str | None:
    """Why a stage must run (None: its recorded result can be reused).

    ``prefix`` is how the user spells the stage's config keys (``student.`` for ``student.train.lr``)."""
    from gkd.core.io import file_sha256

    if not old:
        return "not run before"
    if old.get("key") != key:
        shown = [f"{prefix}{k.removeprefix('config.')} {a!r} -> {b!r}" if k.startswith("config.")
                 else f"input {k.split('.')[0]!r}" for k, a, b in _config_changes(old, inputs)]
        shown = list(dict.fromkeys(shown))  # one line per changed input, however many of its hashes changed
        more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
        return "changed: " + ", ".join(shown[:3]) + more
    if old.get("status") != "done":
        return "interrupted earlier (a training stage resumes from its last finished epoch)"
    for art in _artifacts_in(old.get("outputs", {})):
        p = Path(art["path"])
        if not p.is_file():
            return f"output missing: {p}"
        if file_sha256(p) != art["sha256"]:
            return f"output modified since it was made: {p}"
    return None


def format_seconds(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Progress:
    """One line per stage: ``[3/7] distill: running (why); 160 steps; ETA ...``, then its time and the run's."""

    def __init__(self, stages: list[str]):
        self.stages = stages
        self.t0 = time.perf_counter()

    def tag(self, stage: str) -> str:
        n = self.stages.index(stage) + 1 if stage in self.stages else 0
        return f"[{n}/{len(self.stages)}] {stage}"

    def start(self, stage: str, reason: str, work: str, old: dict | None) -> None:
        # the best estimate before a step has run: this stage's last run (a changed key rarely changes its cost)
        eta = f"; ETA ~{format_seconds(old['seconds'])} (its last run)" if (old or {}).get("seconds") else ""
        log.info("%s: running (%s)%s%s", self.tag(stage), reason, f"; {work}" if work else "", eta)

    def done(self, stage: str, seconds: float) -> None:
        log.info("%s: done in %s (run so far %s)", self.tag(stage), format_seconds(seconds),
                 format_seconds(time.perf_counter() - self.t0))


# ----------------------------------------------------------------------------------------------------------------
# the runner


@dataclass
class _Pending:
    """A stage whose key is computed: ``reason`` None means its recorded result is reused."""

    stage: str
    key: str
    inputs: dict[str, Any]
    old: dict | None
    reason: str | None


@dataclass(frozen=True)
class Job:
    """A stage for :meth:`StageRunner.run_parallel`: ``fn(*args)`` returns its record's content (``outputs``,
    ``metrics``, ...). ``fn`` must be importable by name (it runs in a spawned process); ``threads(n)`` gives the
    args for a process of ``n`` threads (None: ``args`` as they are)."""

    stage: str
    inputs: dict[str, Any]
    fn: Callable[..., dict[str, Any]]
    args: tuple = ()
    prefix: str = ""
    work: str = ""
    threads: Callable[[int], tuple] | None = None


class StageRunner:
    """Reuses, runs and records the stages of one command invocation in one manifest.

    Args:
        manifest: where the records live.
        planned: every stage name this invocation may run, in order (for the ``[n/N]`` progress lines).
        on_change: ``"rerun"`` a stage whose key changed (gkd run), or ``"refuse"`` with a one-line error that
            names the stage folder and the changed keys (gkd study).
        refuse_hint: what the error tells the user to do instead.
    """

    def __init__(self, manifest: Manifest, planned: list[str], on_change: str = "rerun", refuse_hint: str = ""):
        self.manifest = manifest
        self.outcomes: list[Outcome] = []
        self.progress = Progress(planned)
        self.on_change = on_change
        self.refuse_hint = refuse_hint
        self._held: list[str] = []

    def invocation(self) -> list[dict[str, Any]]:
        """What each stage did in this invocation, in the planned order (side-by-side stages end in any order)."""
        order = {name: i for i, name in enumerate(self.progress.stages)}
        return [dataclasses.asdict(o) for o in sorted(self.outcomes, key=lambda o: order.get(o.stage, len(order)))]

    def flush(self) -> None:
        """Print the held "reused" lines (a refusing runner prints them when a stage starts, or at the end)."""
        for line in self._held:
            log.info("%s", line)
        self._held.clear()

    def plan(self, stage: str, inputs: dict[str, Any], prefix: str = "") -> _Pending:
        """Key ``stage`` by its inputs and decide whether it runs (a reused stage is logged and counted here)."""
        from gkd import __version__
        from gkd.core.errors import GkdError

        inputs = {**inputs, "gkd": __version__}
        key = content_key(inputs)
        old = self.manifest.stages.get(stage)
        reason = _why_run(old, key, inputs, prefix)
        if reason is None:
            self._held.append(f"{self.progress.tag(stage)}: reused (key {key[:12]}, unchanged)")
            if self.on_change != "refuse":  # a refusing runner holds them: a refusal is then its only line
                self.flush()
            self.outcomes.append(Outcome(stage, "reused", "unchanged"))
        elif reason.startswith("changed:") and self.on_change == "refuse":
            diffs = [f"{k.removeprefix('config.')}={a!r} there, {b!r} asked" if k.startswith("config.")
                     else f"input {k.split('.')[0]!r} differs" for k, a, b in _config_changes(old, inputs)]
            diffs = list(dict.fromkeys(diffs))
            raise GkdError(f"{self.manifest.path.parent / stage} was made with another config "
                           f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}){self.refuse_hint}")
        return _Pending(stage, key, inputs, old, reason)

    def run(self, stage: str, inputs: dict[str, Any], fn: Callable[[], dict[str, Any]], prefix: str = "",
            work: str = "") -> dict[str, Any]:
        """Reuse or run ``stage`` in this process; returns its record (``outputs``, ``metrics``, ...)."""
        job = self.plan(stage, inputs, prefix)
        if job.reason is None:
            return job.old
        self._started(job, work)
        t0 = time.perf_counter()
        token = _STAGE_KEY.set(job.key)
        try:
            info = fn()
        finally:
            _STAGE_KEY.reset(token)
        return self._finished(job, info, time.perf_counter() - t0)

    def run_parallel(self, jobs: list[Job], workers: int, threads: int = 1,
                     then: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """Reuse or run independent stages, ``workers`` at a time in spawned processes of ``threads`` threads each
        (one after the other in this process, with ``args`` as given, when ``workers`` < 2 or only one must run). Every key is checked before any stage starts; each
        stage is recorded as it finishes, so a run killed meanwhile keeps the finished ones.

        ``then(stage, record)`` runs in this process when a stage finishes while others still run (work that
        needs its result and a free core, e.g. exporting a student while the other one trains).

        Returns:
            ``{stage: record}`` for every job, in the order given.
        """
        planned = [(self.plan(j.stage, j.inputs, j.prefix), j) for j in jobs]
        records = {p.stage: p.old for p, _ in planned if p.reason is None}
        todo = [(p, j) for p, j in planned if p.reason is not None]
        if workers < 2 or len(todo) < 2:
            for pending, job in todo:
                self._started(pending, job.work)
                t0 = time.perf_counter()
                token = _STAGE_KEY.set(pending.key)
                try:
                    info = job.fn(*job.args)
                finally:
                    _STAGE_KEY.reset(token)
                records[pending.stage] = self._finished(pending, info, time.perf_counter() - t0)
            return {j.stage: records[j.stage] for j in jobs}
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        workers = min(workers, len(todo))
        queue, running = list(todo), {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            while queue or running:
                while queue and len(running) < workers:  # a stage is started when a worker is free for it
                    pending, job = queue.pop(0)
                    args = job.threads(threads) if job.threads else job.args
                    self._started(pending, job.work, f"; side by side, {workers} at a time, {threads} thread(s) each")
                    future = pool.submit(_in_worker, job.fn, args, pending.stage, pending.key)
                    running[future] = (pending, time.perf_counter())
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    pending, t0 = running.pop(future)
                    records[pending.stage] = self._finished(pending, future.result(), time.perf_counter() - t0)
                    if then is not None and (running or queue):
                        then(pending.stage, records[pending.stage])
        return {j.stage: records[j.stage] for j in jobs}

    def _started(self, job: _Pending, work: str, note: str = "") -> None:
        self.flush()
        self.progress.start(job.stage, job.reason + note, work, job.old)
        # the last run's seconds stay in the record while it runs: a run killed now still has an ETA next time
        self.manifest.write(job.stage, {"status": "running", "key": job.key, "inputs": job.inputs,
                                        "command": sys.argv,
                                        **({"seconds": job.old["seconds"]} if (job.old or {}).get("seconds") else {})})

    def _finished(self, job: _Pending, info: dict[str, Any], seconds: float) -> dict[str, Any]:
        seconds = round(seconds, 1)
        record = {"status": "done", "key": job.key, "inputs": job.inputs, "command": sys.argv, "seconds": seconds,
                  **info}
        self.manifest.write(job.stage, record)
        self.outcomes.append(Outcome(job.stage, "ran", job.reason, seconds))
        self.progress.done(job.stage, seconds)
        return record


def free_cores() -> int:
    """Cores not in use by other processes now (measured over half a second; see :mod:`gkd.kd.cpu_share`)."""
    from gkd.kd.cpu_share import auto_threads

    return auto_threads(window_s=0.5)[0]


def _in_worker(fn: Callable[..., dict[str, Any]], args: tuple, tag: str, key: str) -> dict[str, Any]:
    for handler in logging.getLogger("gkd").handlers:  # this stage's lines, told apart from the other's
        handler.setFormatter(logging.Formatter(f"gkd [{tag}]: %(message)s"))
    _STAGE_KEY.set(key)
    return fn(*args)


def _worker_init() -> None:
    """In a spawned stage process: console logging, and exit with the parent (no orphan keeps writing a run folder
    after the command was killed)."""
    import ctypes
    import signal

    from gkd.core.logs import setup_console_logging

    setup_console_logging()
    try:  # Linux: SIGTERM this process when its parent dies
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# the stages


def _generated_here(root: Path) -> dict | None:
    """The generator's meta.json of ``root`` (None when the data there is not gkd's synthetic data)."""
    meta = root / "meta.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "gkd.synth" else None


def data_stage(root: Path, synthetic: dict[str, Any]) -> dict[str, Any]:
    """Generate the synthetic dataset (``synthetic``: :func:`gkd.kd.data.generate_synthetic`'s keyword arguments)
    into ``root`` when it holds none; otherwise use what is there. Outputs: train.json and val.json."""
    from gkd.core.errors import GkdError
    from gkd.kd.data import generate_synthetic

    if not (root / "train.json").is_file():
        generate_synthetic(root, **synthetic, progress=True)
    else:
        meta = _generated_here(root)
        other = {k: meta.get(k) for k in synthetic if meta.get(k) != synthetic[k]} if meta else {}
        log.info("data: using the dataset in %s%s", root, f" (generated with {other}; synth_* apply to an empty "
                 f"data_root only)" if other else "")
    if not (root / "val.json").is_file():
        raise GkdError(f"{root}: holds train.json but no val.json; both are needed (and images/)")
    return {"outputs": {"train": artifact(root / "train.json"), "val": artifact(root / "val.json")}}


def train_images(train_json: Path) -> int | None:
    """How many images the training split holds (None when it cannot be read: the stage itself says why)."""
    from gkd.core.errors import GkdError
    from gkd.kd.data.coco import load_coco

    try:
        return len(load_coco(train_json).images)
    except GkdError:
        return None


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


def training_inputs(run_cfg, **inputs: Any) -> dict[str, Any]:
    """A training stage's key inputs: its resolved config less :data:`UNKEYED`, and ``inputs`` (files' SHA-256)."""
    from gkd.core.config import to_dict

    config = to_dict(run_cfg)
    for dotted in UNKEYED:
        section, key = dotted.split(".")
        config.get(section, {}).pop(key, None)
    if config.get("quant", {}).get("int8_format", None) is None:
        config.pop("quant", None)  # a float student: keyed as before quantization-aware training existed
    return {"config": config, **inputs}


def with_threads(run_cfg, threads: int):
    """``run_cfg`` with ``train.threads`` set (a process's share of the cores; not keyed)."""
    return dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, threads=threads))


def _prepare_run_dir(run_cfg) -> bool:
    """Whether the stage's run folder holds an interrupted run of exactly this stage (then resume it).

    Exactly this stage: started for the same stage key (:data:`KEY_FILE`: the same config *and* inputs, e.g. the
    same teacher file; a run of the same config beside another teacher is another stage) and of the same config.
    Anything else in the folder (another key, or no finished epoch) belongs to a superseded result of this same
    stage: it is removed, so that the stage starts clean, and the folder is marked with the key it now runs for.
    """
    from gkd.core.config import config_differences, to_dict
    from gkd.core.io import atomic_write_text
    from gkd.kd.checkpoint import load_checkpoint

    key = _STAGE_KEY.get()
    last = run_cfg.run_dir / "checkpoints" / "last.pt"
    marked = run_cfg.run_dir / KEY_FILE
    started_for = marked.read_text().strip() if marked.is_file() else None
    _refuse_foreign_folder(run_cfg.run_dir, marked)
    if last.is_file() and key and started_for != key:
        log.info("removing %s: made for another stage key (its inputs changed)", run_cfg.run_dir)
    elif last.is_file():
        saved = load_checkpoint(last, need="run")["config"]
        wanted = to_dict(run_cfg)
        if not wanted["model"]["num_classes"]:  # 0 = the dataset's class count, which the run recorded
            wanted["model"]["num_classes"] = saved.get("model", {}).get("num_classes", 0)
        diffs = [k for k, _, _ in config_differences(saved, wanted) if k not in UNKEYED]
        if not diffs:
            log.info("resuming the interrupted run in %s", run_cfg.run_dir)
            return True
        log.info("removing %s: made with another config (%s)", run_cfg.run_dir, ", ".join(diffs[:3]))
    if run_cfg.run_dir.exists():
        shutil.rmtree(run_cfg.run_dir)
    if key:
        atomic_write_text(marked, key + "\n")
    return False


def _refuse_foreign_folder(run_dir: Path, marked: Path) -> None:
    """A stage replaces only a folder a stage made (marked with :data:`KEY_FILE` before anything else is written
    there). Anything else in its place, e.g. the user's own ``gkd train`` run under the same ``runs_dir``, stays:
    a one-line error instead of deleting it."""
    from gkd.core.errors import GkdError

    if not run_dir.is_dir() or marked.is_file():
        return
    # (a temporary file of the marker's own atomic write, left by a kill, is this pipeline's)
    contents = sorted(p.name for p in run_dir.iterdir() if not (p.name.startswith(f".{KEY_FILE}.")
                                                                 and p.name.endswith(".tmp")))
    if contents:
        raise GkdError(f"{run_dir}: holds files this pipeline did not make ({', '.join(contents[:3])}"
                       f"{', ...' if len(contents) > 3 else ''}; no {KEY_FILE}), e.g. a run of your own; it is left "
                       f"as it is: move it away, or give this run another name=... or runs_dir=...")


def _training_result(run_cfg, record: dict[str, Any]) -> dict[str, Any]:
    return {"outputs": {"checkpoint": artifact(run_cfg.run_dir / "checkpoints" / "model.pt")},
            "metrics": {k: v for k, v in record.items() if k.startswith("val/")}}


def train_teacher(run_cfg, progress: bool = True) -> dict[str, Any]:
    """``gkd train`` of ``run_cfg`` (a teacher, or the study's student initialisation) as a stage."""
    from gkd.kd.train import train_detector

    return _training_result(run_cfg, train_detector(run_cfg, resume=_prepare_run_dir(run_cfg), progress=progress))


def train_teacher_processes(run_cfg, processes: int) -> dict[str, Any]:
    """:func:`train_teacher` in ``processes`` local processes of one thread each (torchrun, Gloo on a CPU), or in
    this process when ``processes`` is 1. ``run_cfg.train.batch_size`` is per process.

    Why: on a 2-core CPU two 1-thread processes get ~20% more training through than one 2-thread process (measured:
    40 steps of 8 images in 32.6 s against 40.1 s, the teacher recipe). The resolved config travels as a YAML file
    (written, never rebuilt from ``key=value`` text); the child job is ended with this process."""
    if processes <= 1:
        return train_teacher(run_cfg)
    import signal
    import subprocess

    from gkd.core.config import dump_config
    from gkd.core.errors import GkdError
    from gkd.kd.distributed import torchrun_command

    resume = _prepare_run_dir(run_cfg)
    run_cfg = with_threads(run_cfg, 1)
    spec = run_cfg.run_dir.parent / f".{run_cfg.name}.resolved.yaml"
    dump_config(run_cfg, spec)
    argv = torchrun_command(processes, ["train", str(spec), *(["--resume"] if resume else [])])
    log.info("%s: %d processes x 1 thread: %s", run_cfg.name, processes, " ".join(argv))

    def die_with_parent() -> None:  # Linux: torchrun (and so its workers) ends when this process does
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    rc = subprocess.call(argv, preexec_fn=die_with_parent)
    if rc != 0:
        raise GkdError(f"{run_cfg.name}: the {processes}-process training exited with status {rc} (its errors are "
                       f"above; the log is {run_cfg.run_dir / 'log.txt'})")
    spec.unlink(missing_ok=True)
    lines = (run_cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return _training_result(run_cfg, json.loads(lines[-1]) if lines else {})  # the last epoch's record


def train_student(run_cfg, progress: bool = True) -> dict[str, Any]:
    """``gkd distill`` of ``run_cfg`` (``distill.method=none``: the baseline) as a stage."""
    from gkd.kd.distill.run import run_distillation

    record = run_distillation(run_cfg, resume=_prepare_run_dir(run_cfg), progress=progress)
    return {**_training_result(run_cfg, record), "method": run_cfg.distill.method}
