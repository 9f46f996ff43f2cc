"""Atomic file writes and safe loads: nothing the user made is lost or half-written.

Every file the toolkit writes goes to a temporary file in the same folder first and is renamed over the target
(``os.replace`` is atomic on POSIX), so a killed process leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["nearly_full", "refuse_foreign_file", "json_field_is", "ensure_writable_folder", "created_folders",
           "remove_empty_created_folders", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "atomic_torch_save", "append_jsonl", "read_text", "read_json"]


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), since setting it to read it
    briefly changes the mode of files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only portable way to read it is to set it; restored on the next line
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: the existing file's, else 0o666 minus umask.

    ``mkstemp`` creates its file 0o600, which would make every checkpoint, config and report private to its owner
    on a shared machine."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_current_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``.

    Args:
        path: final destination; its parent folder is created if missing.
        writer: writes the complete content to the temporary path it is given.

    Returns:
        The destination path.
    """
    from .errors import GkdError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise GkdError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, _final_mode(path))
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = _out_of_space(exc, path)  # judged before the partial file is deleted and gives its space back
        tmp_path.unlink(missing_ok=True)
        if full:
            raise GkdError(f"{path}: No space left on device while writing it (the previous version, if any, is "
                           f"unchanged); free some space and run the command again (a training run: with --resume, "
                           f"from its last finished epoch)") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise GkdError(f"{path}: cannot write here ({exc.strerror})") from None
        raise
    return path


#: what torch.save's zip writer says when a write fails (a RuntimeError without errno): "file write failed",
#: "basic_ios::clear: iostream error", "[enforce fail at inline_container.cc] . unexpected pos N vs M"
_TORCH_WRITE_ERRORS = ("write failed", "iostream error", "basic_ios", "unexpected pos")


def refuse_foreign_file(path: str | Path, option: str, ours: Callable[[Path], bool]) -> None:
    """Before any work: an output file that exists is replaced only if gkd wrote it (``ours(path)``: its content
    carries gkd's mark); a file the user made is never replaced. Raises a one-line GkdError otherwise."""
    from .errors import GkdError

    path = Path(path)
    if not path.exists():
        return
    try:
        mine = path.is_file() and ours(path)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        mine = False
    if not mine:
        raise GkdError(f"{path}: exists and was not written by gkd ({option}); it is left as it is: choose another "
                       f"{option} path or remove the file")


def json_field_is(key: str, value: Any) -> Callable[[Path], bool]:
    """``ours`` for :func:`refuse_foreign_file`: the file is a JSON object whose ``key`` is ``value``."""
    def check(path: Path) -> bool:
        data = json.loads(path.read_text(encoding="utf-8"))
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node == value if not callable(value) else bool(value(node))
    return check


def nearly_full(folder: str | Path, below: int = 64 * 2 ** 20) -> bool:
    """Whether the file system of ``folder`` has less than ``below`` bytes free (False when it cannot be asked):
    what a writer that reports no errno (onnxruntime's protobuf, torch's zip writer) failed on."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < below
    except OSError:
        return False


def _out_of_space(exc: BaseException, path: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain, or a write error of torch.save's zip writer (which carries
    no errno) while the file system is nearly full."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    if not any(isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_ERRORS) for e in chain):
        return False
    return nearly_full(path.parent)


#: folders :func:`ensure_writable_folder` created in this process (deepest last): an error's cleanup removes those
#: still empty, so that a command refused after its first check leaves no empty output folder behind
_CREATED: list[Path] = []


def ensure_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any work starts (one line
    otherwise: a run that would train an epoch and then fail to save it stops at once)."""
    from .errors import GkdError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GkdError(f"{folder}: {what} is a file; expected a folder (or a path that does not exist yet)")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(reversed(missing))
        fd, probe = tempfile.mkstemp(prefix=".gkd-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GkdError(f"{folder}: {what} is not writable ({exc.strerror or exc})") from None
    return folder


def created_folders() -> int:
    """How many folders :func:`ensure_writable_folder` has created in this process (a mark for
    :func:`remove_empty_created_folders`)."""
    return len(_CREATED)


def remove_empty_created_folders(since: int = 0) -> list[Path]:
    """Remove the folders :func:`ensure_writable_folder` created after the mark ``since`` that are still empty
    (deepest first); returns them. A folder that holds anything, or that existed before, is never touched."""
    removed = []
    while len(_CREATED) > since:
        folder = _CREATED.pop()
        try:
            folder.rmdir()  # only an empty folder can go
            removed.append(folder)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (a crash can at worst lose the line being written, never earlier ones)."""
    from .errors import GkdError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if _out_of_space(exc, path):
            raise GkdError(f"{path}: No space left on device while appending to it (earlier lines are kept); free "
                           f"some space and resume the run") from None
        raise GkdError(f"{path}: cannot append to it ({exc.strerror or exc})") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content; a missing or unreadable file is a one-line ``GkdError`` naming it and ``what``
    it was expected to be."""
    from .errors import GkdError

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GkdError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GkdError(f"{path}: cannot read {what} ({exc})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, turning every failure into a one-line ``GkdError`` naming the file."""
    from .errors import GkdError

    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GkdError(f"{path}: malformed or truncated JSON at line {exc.lineno} column {exc.colno}: "
                       f"{exc.msg}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB chunks (checkpoints, ONNX files, engines, manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when its process is killed mid-write
    (``.<name>.<random>.tmp``) in ``folder``; returns them. Only call this while owning the folder (see
    :class:`RunLock`): another writer's temporary file would be in use."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class RunLock:
    """``<folder>/.lock``: the process (pid, host, start time) that owns a run folder while it writes there.

    A second process asking for the same folder gets a one-line GkdError naming the owner, instead of both writing
    into one metrics file and one checkpoint. A lock whose process is gone (killed, crashed) is stale and taken over.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._mine = False

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        import socket
        import time

        from .errors import GkdError

        host = socket.gethostname()
        ensure_writable_folder(self.folder, "the run folder")
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and holder["pid"] != os.getpid() and (holder.get("host") != host or _alive(holder["pid"])):
                    where = "" if holder.get("host") == host else f" on host {holder.get('host')}"
                    raise GkdError(f"{self.folder}: in use by process {holder['pid']}{where} since "
                                   f"{holder.get('since', '?')}; wait for it to finish or choose another name "
                                   f"(name=...); if that process is gone, delete {self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone (or it is this process's own)
                continue
            except OSError as exc:
                raise GkdError(f"{self.folder}: cannot write here ({exc.strerror or exc})") from None
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
            self._mine = True
            return self
        raise GkdError(f"{self.path}: could not take the run folder's lock (another process keeps taking it)")

    def __exit__(self, *exc) -> None:
        if self._mine and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._mine = False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
