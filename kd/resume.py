"""Whether a training run folder is resumed, started fresh, replaced or refused: the one home of that rule.

Two callers ask it:

* the training loop (``gkd train`` / ``gkd distill``, see ``kd/engine.py``): with ``--resume`` the run's
  ``checkpoints/last.pt`` must exist and have been made with the same config (less :data:`RESUMABLE_KEYS`), on the
  same data and at the same process count; without it the folder must hold no finished epoch and nothing that is
  not a gkd run's (:func:`state_to_resume`, :func:`refuse_foreign_files`);
* a pipeline's training stage (:func:`prepare_stage_run`): it resumes an interrupted run of exactly the same stage,
  and removes a folder it made for a superseded result of that stage.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from gkd.core.config import config_differences, to_dict
from gkd.core.errors import GkdError
from gkd.core.io import atomic_write_text

from .checkpoint import load_checkpoint
from .config import RunConfig

__all__ = ["RESUMABLE_KEYS", "DATA_LOCATION_KEYS", "RESULT_NEUTRAL_KEYS", "RUN_FOLDER_ENTRIES", "STAGE_KEY_FILE",
           "data_fingerprint", "check_resumable", "state_to_resume", "refuse_foreign_files", "prepare_stage_run"]

log = logging.getLogger("gkd")

#: config keys that may differ between a run and its resume (everything else must match); ``runs_dir`` and
#: ``name`` say where the run folder is, not what it computes: a run moved to another folder resumes there
RESUMABLE_KEYS = ("train.epochs", "train.eval_interval", "train.threads", "data.num_workers", "train.device",
                  "train.dist_backend", "train.dist_timeout_s", "train.find_unused_parameters", "runs_dir", "name")
#: where the data is may change on resume when the run recorded its data's SHA-256 and the data still has it
DATA_LOCATION_KEYS = ("data.root", "data.train", "data.val", "data.images")
#: config keys that do not change a training result: left out of a pipeline stage's content key, and a stage's run
#: folder made with other values of them is still the same stage's
RESULT_NEUTRAL_KEYS = ("train.threads", "data.num_workers", "train.dist_timeout_s")
#: the file in a pipeline stage's run folder that names the stage key it was started for
STAGE_KEY_FILE = "stage_key.txt"
#: what a run folder holds (gkd's own files: a fresh run may write over those an attempt killed early left)
RUN_FOLDER_ENTRIES = ("config.yaml", "log.txt", "metrics.jsonl", "metrics.csv", "checkpoints", ".lock",
                      STAGE_KEY_FILE, "eval", "export", "predictions", "prototypes")


# ----------------------------------------------------------------------------------------------------------------
# gkd train / gkd distill [--resume]


def data_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """The SHA-256 of the run's train and val JSON: recorded in ``last.pt`` and compared on ``--resume`` (a run
    continued on other data would mix two datasets without a word)."""
    from gkd.core.io import file_sha256

    return {split: file_sha256(cfg.data.path(split)) for split in ("train", "val") if cfg.data.path(split).is_file()}


def state_to_resume(cfg: RunConfig, resume: bool, world_size: int) -> dict[str, Any] | None:
    """The training state in ``cfg.run_dir/checkpoints/last.pt`` to continue from, or None for a fresh run.

    With ``resume`` the file must exist and pass :func:`check_resumable`; without it, a finished epoch there means
    the run exists already: each refusal is a one-line :class:`GkdError` that says what to do instead.
    """
    last_path = cfg.run_dir / "checkpoints" / "last.pt"
    if resume:
        if not last_path.exists():
            raise GkdError(f"{last_path}: nothing to resume: no epoch of '{cfg.name}' finished (it was stopped before "
                           f"its first checkpoint, or never ran); run the same command without --resume")
        state = load_checkpoint(last_path, need="run")
        check_resumable(state, cfg, last_path, world_size)
        return state
    if last_path.exists():
        raise GkdError(f"{cfg.run_dir}: a run named '{cfg.name}' already exists; pass --resume to continue it, or "
                       f"choose another name (name=...)")
    return None


def check_resumable(state: dict[str, Any], cfg: RunConfig, path: Path, world_size: int) -> None:
    """Refuse to continue the run state ``state`` (read from ``path``) with ``cfg`` on ``world_size`` processes
    unless the data, the config (less :data:`RESUMABLE_KEYS`) and the process count are the run's own."""
    _check_resume_data(state, cfg, path)
    _check_resume_config(state["config"], cfg, path, data_checked=isinstance(state.get("data_sha256"), dict))
    _check_resume_world(state, world_size, path)


def _check_resume_data(state: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    saved = state.get("data_sha256")
    if not isinstance(saved, dict):  # a run saved before gkd recorded its data: its config check still applies
        return
    now = data_fingerprint(cfg)
    for split, sha in saved.items():
        if now.get(split) != sha:
            have = f"sha256 {now[split][:12]}" if split in now else "missing"
            raise GkdError(f"{cfg.data.path(split)}: cannot resume '{cfg.name}' from {path}: the {split} data is not "
                           f"the data the run started on ({have}, was sha256 {sha[:12]}); restore it, or start a new "
                           f"run (name=...)")


def _check_resume_config(saved: dict, cfg: RunConfig, path: Path, data_checked: bool = False) -> None:
    defaults = to_dict(type(cfg)())
    allowed = RESUMABLE_KEYS + (DATA_LOCATION_KEYS if data_checked else ())
    for key, va, vb in config_differences(saved, to_dict(cfg)):
        if _absent(saved, key) and vb == _lookup(defaults, key):
            continue  # a key added to gkd after the run started, left at its default: the run's own behaviour
        if key not in allowed:
            raise GkdError(f"{path}: cannot resume: '{key}' was {va!r} in the interrupted run, now {vb!r} "
                           f"(only {', '.join(allowed)} may change on resume)")


def _check_resume_world(state: dict[str, Any], world_size: int, path: Path) -> None:
    """Resuming is refused at another process count: the per-rank data order, the steps per epoch (and so the lr
    schedule's position) and the per-rank RNG states all depend on it."""
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise GkdError(f"{path}: cannot resume on {world_size} process(es): the run was trained on {saved}, and its "
                       f"data order, steps per epoch and lr schedule depend on the process count; resume with "
                       f"{saved} process(es) (torchrun --nnodes x --nproc_per_node = {saved}, or gkd --nproc "
                       f"{saved}), or start a new run (name=...)")


def _lookup(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _absent(d: dict, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(d, dict) or part not in d:
            return True
        d = d[part]
    return not isinstance(d, dict) or last not in d


def refuse_foreign_files(run_dir: Path) -> None:
    """A fresh run writes config.yaml, log.txt and metrics.* into its folder: refuse a folder that holds anything
    else (a folder of the user's own given as runs_dir/name) rather than replace the user's files there."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_FOLDER_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        raise GkdError(f"{run_dir}: holds files that are not a gkd run's ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); a run writes config.yaml, log.txt, metrics.* and "
                       f"checkpoints/ there: choose another name=... or runs_dir=...")


# ----------------------------------------------------------------------------------------------------------------
# a pipeline's training stage


def prepare_stage_run(run_cfg: RunConfig, stage_key: str) -> bool:
    """Whether the stage's run folder holds an interrupted run of exactly this stage (then resume it).

    Exactly this stage: started for the same ``stage_key`` (:data:`STAGE_KEY_FILE`: the same config *and* inputs,
    e.g. the same teacher file; a run of the same config beside another teacher is another stage) and of the same
    config (less :data:`RESULT_NEUTRAL_KEYS`). Anything else in the folder (another key, or no finished epoch)
    belongs to a superseded result of this same stage: it is removed, so that the stage starts clean, and the folder
    is marked with the key it now runs for. An empty ``stage_key`` (none known) neither refuses another key nor
    marks the folder. A folder that holds files but no :data:`STAGE_KEY_FILE` was not made by a stage: refused.

    Returns:
        True to resume the run in ``run_cfg.run_dir``, False to start it fresh (the folder is then empty but for
        the marker).
    """
    last = run_cfg.run_dir / "checkpoints" / "last.pt"
    marked = run_cfg.run_dir / STAGE_KEY_FILE
    started_for = marked.read_text().strip() if marked.is_file() else None
    _refuse_unmarked_folder(run_cfg.run_dir, marked)
    if last.is_file() and stage_key and started_for != stage_key:
        log.info("removing %s: made for another stage key (its inputs changed)", run_cfg.run_dir)
    elif last.is_file():
        saved = load_checkpoint(last, need="run")["config"]
        wanted = to_dict(run_cfg)
        if not wanted["model"]["num_classes"]:  # 0 = the dataset's class count, which the run recorded
            wanted["model"]["num_classes"] = saved.get("model", {}).get("num_classes", 0)
        diffs = [k for k, _, _ in config_differences(saved, wanted) if k not in RESULT_NEUTRAL_KEYS]
        if not diffs:
            log.info("resuming the interrupted run in %s", run_cfg.run_dir)
            return True
        log.info("removing %s: made with another config (%s)", run_cfg.run_dir, ", ".join(diffs[:3]))
    if run_cfg.run_dir.exists():
        shutil.rmtree(run_cfg.run_dir)
    if stage_key:
        atomic_write_text(marked, stage_key + "\n")
    return False


def _refuse_unmarked_folder(run_dir: Path, marked: Path) -> None:
    """A stage replaces only a folder a stage made (marked with :data:`STAGE_KEY_FILE` before anything else is
    written there). Anything else in its place, e.g. the user's own ``gkd train`` run under the same ``runs_dir``,
    stays: a one-line error instead of deleting it."""
    if not run_dir.is_dir() or marked.is_file():
        return
    # (a temporary file of the marker's own atomic write, left by a kill, is this pipeline's)
    contents = sorted(p.name for p in run_dir.iterdir() if not (p.name.startswith(f".{STAGE_KEY_FILE}.")
                                                                 and p.name.endswith(".tmp")))
    if contents:
        raise GkdError(f"{run_dir}: holds files this pipeline did not make ({', '.join(contents[:3])}"
                       f"{', ...' if len(contents) > 3 else ''}; no {STAGE_KEY_FILE}), e.g. a run of your own; it is "
                       f"left as it is: move it away, or give this run another name=... or runs_dir=...")
