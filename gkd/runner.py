"""The one scheme that keys, reuses and records the stages of ``gkd run`` and ``gkd study``.

**Content-keyed stages.** Every stage has a key: the SHA-256 of what its result depends on (its resolved config,
the SHA-256 of its input files, gkd's version). A stage is reused only when its recorded key matches and its output
files are still there with the recorded SHA-256. Otherwise it runs again ("changed: student.train.lr 0.02 -> 0.01",
"interrupted earlier", "output modified since it was made: ..."), and so do the stages after it (their inputs
changed). A runner made with ``on_change="refuse"`` (the study: hours of compute whose table must never mix two
designs) stops with a one-line error instead of rerunning a stage whose key changed.

**Records.** ``runs/<name>/manifest.json`` holds one record per stage (status, key, inputs, outputs with their
SHA-256, seconds, metrics), rewritten atomically whenever a stage starts or ends.

**Typed stages.** A stage is a function of the package that owns it (:func:`gkd.kd.stage.train_stage`,
:func:`gkd.export.stage.export_stage`, :func:`gkd.bench.stage.bench_stage`...) that takes a typed spec and returns a
frozen result with ``record()`` / ``from_record()``: the runner writes the record and, when it reuses a stage, gives
back the result read from it. A training stage gets its content key in its spec (it resumes only a run folder
started for the same key: :func:`gkd.kd.resume.prepare_stage_run`).

**Side by side.** :meth:`StageRunner.run_parallel` runs independent stages in spawned worker processes, each with
its share of the cores, recording each one as it finishes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

__all__ = ["Job", "Manifest", "Outcome", "Progress", "StageRunner", "content_key", "format_seconds", "free_cores",
           "versions"]

log = logging.getLogger("gkd")


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


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


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
    from gkd.core.records import artifacts_in

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
    for art in artifacts_in(old.get("outputs", {})):
        if not art.path.is_file():
            return f"output missing: {art.path}"
        if file_sha256(art.path) != art.sha256:
            return f"output modified since it was made: {art.path}"
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


class Result(Protocol):
    """A stage's frozen result: ``record()`` is what the manifest keeps; its class's ``from_record`` reads it back."""

    def record(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Job:
    """A stage for :meth:`StageRunner.run_parallel`: ``fn(spec(key, threads))`` returns its result (a ``result``).
    ``fn`` must be importable by name (it may run in a spawned process); ``spec`` builds its typed spec for its
    content key and a process of ``threads`` threads (None: one after the other in this process, as configured)."""

    stage: str
    inputs: dict[str, Any]
    fn: Callable[[Any], Result]
    spec: Callable[[str, int | None], Any]
    result: type
    prefix: str = ""
    work: str = ""


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

    def run(self, stage: str, inputs: dict[str, Any], fn: Callable[[str], Result], result: type,
            prefix: str = "", work: str = "") -> Any:
        """Reuse or run ``stage`` in this process: ``fn(key)`` returns its result (``result.from_record`` of its
        record when it is reused)."""
        job = self.plan(stage, inputs, prefix)
        if job.reason is None:
            return result.from_record(job.old)
        self._started(job, work)
        t0 = time.perf_counter()
        return self._finished(job, fn(job.key), time.perf_counter() - t0)

    def record(self, stage: str) -> dict[str, Any]:
        """The manifest's record of ``stage`` (what the command writes down, e.g. the study's table)."""
        return self.manifest.stages[stage]

    def run_parallel(self, jobs: list[Job], workers: int, threads: int = 1,
                     then: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Reuse or run independent stages, ``workers`` at a time in spawned processes of ``threads`` threads each
        (one after the other in this process when ``workers`` < 2 or only one must run). Every key is checked before
        any stage starts; each stage is recorded as it finishes, so a run killed meanwhile keeps the finished ones.

        ``then(stage, result)`` runs in this process when a stage finishes while others still run (work that
        needs its result and a free core, e.g. exporting a student while the other one trains).

        Returns:
            ``{stage: result}`` for every job, in the order given.
        """
        planned = [(self.plan(j.stage, j.inputs, j.prefix), j) for j in jobs]
        results = {p.stage: j.result.from_record(p.old) for p, j in planned if p.reason is None}
        todo = [(p, j) for p, j in planned if p.reason is not None]
        if workers < 2 or len(todo) < 2:
            for pending, job in todo:
                self._started(pending, job.work)
                t0 = time.perf_counter()
                results[pending.stage] = self._finished(pending, job.fn(job.spec(pending.key, None)),
                                                        time.perf_counter() - t0)
            return {j.stage: results[j.stage] for j in jobs}
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        workers = min(workers, len(todo))
        queue, running = list(todo), {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            while queue or running:
                while queue and len(running) < workers:  # a stage is started when a worker is free for it
                    pending, job = queue.pop(0)
                    self._started(pending, job.work, f"; side by side, {workers} at a time, {threads} thread(s) each")
                    future = pool.submit(_in_worker, job.fn, job.spec(pending.key, threads), pending.stage)
                    running[future] = (pending, time.perf_counter())
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    pending, t0 = running.pop(future)
                    results[pending.stage] = self._finished(pending, future.result(), time.perf_counter() - t0)
                    if then is not None and (running or queue):
                        then(pending.stage, results[pending.stage])
        return {j.stage: results[j.stage] for j in jobs}

    def _started(self, job: _Pending, work: str, note: str = "") -> None:
        self.flush()
        self.progress.start(job.stage, job.reason + note, work, job.old)
        # the last run's seconds stay in the record while it runs: a run killed now still has an ETA next time
        self.manifest.write(job.stage, {"status": "running", "key": job.key, "inputs": job.inputs,
                                        "command": sys.argv,
                                        **({"seconds": job.old["seconds"]} if (job.old or {}).get("seconds") else {})})

    def _finished(self, job: _Pending, result: Result, seconds: float) -> Any:
        seconds = round(seconds, 1)
        self.manifest.write(job.stage, {"status": "done", "key": job.key, "inputs": job.inputs, "command": sys.argv,
                                        "seconds": seconds, **result.record()})
        self.outcomes.append(Outcome(job.stage, "ran", job.reason, seconds))
        self.progress.done(job.stage, seconds)
        return result


def free_cores() -> int:
    """Cores not in use by other processes now (measured over half a second; see :mod:`gkd.kd.cpu_share`)."""
    from gkd.kd.cpu_share import auto_threads

    return auto_threads(window_s=0.5)[0]


def _in_worker(fn: Callable[[Any], Result], spec: Any, tag: str) -> Result:
    for handler in logging.getLogger("gkd").handlers:  # this stage's lines, told apart from the other's
        handler.setFormatter(logging.Formatter(f"gkd [{tag}]: %(message)s"))
    return fn(spec)


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
