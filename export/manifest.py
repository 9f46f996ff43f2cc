"""The export manifest (``<export dir>/export.json``) read through one typed loader.

``gkd export`` writes the manifest (:func:`gkd.export.pipeline.export_checkpoint`); everything that reads it (the
latency benchmark, ``gkd run``'s stages, a verdict for an ONNX file handed to ``gkd bench latency``) goes through
:func:`load_export_manifest`, which checks the fields it relies on and answers in one line when they are missing,
instead of a ``KeyError`` three modules away.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.core.errors import GkdError

__all__ = ["ExportedFile", "ExportManifest", "load_export_manifest", "parity_verdict", "MANIFEST_NAME"]

MANIFEST_NAME = "export.json"


@dataclass(frozen=True)
class ExportedFile:
    """One exported ONNX file: its precision, absolute path, SHA-256 and parity verdict."""

    precision: str
    path: Path
    sha256: str
    verified: bool
    runs_on: str = ""


@dataclass(frozen=True)
class ExportManifest:
    """What ``export.json`` says (``raw`` keeps the whole dict for reports)."""

    dir: Path
    checkpoint: str
    checkpoint_sha256: str
    files: dict[str, ExportedFile]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def check_matches(self, checkpoint: Path) -> None:
        """Refuse an export made from another checkpoint, or whose files changed since it was verified (by content:
        SHA-256), instead of measuring the wrong model without a word."""
        from gkd.core.io import file_sha256

        have = file_sha256(checkpoint)
        if self.checkpoint_sha256 != have:
            raise GkdError(f"{self.dir}: holds the export of another checkpoint ({self.checkpoint}, sha256 "
                           f"{self.checkpoint_sha256[:12]}), not of {checkpoint} (sha256 {have[:12]}); export this "
                           f"checkpoint there again or give its own --export-dir")
        for f in self.files.values():
            if not f.path.is_file():
                raise GkdError(f"{f.path}: listed in {self.dir / MANIFEST_NAME} but missing; export again")
            if file_sha256(f.path) != f.sha256:
                raise GkdError(f"{f.path}: changed since it was exported and verified (sha256 differs from "
                               f"{MANIFEST_NAME}); export again")

    def entry_for(self, path: Path) -> ExportedFile | None:
        """The entry of ``path`` if this manifest lists that very file (same name and SHA-256), else None."""
        from gkd.core.io import file_sha256

        path = Path(path)
        for f in self.files.values():
            if f.path.name == path.name and path.is_file() and file_sha256(path) == f.sha256:
                return f
        return None


def load_export_manifest(export_dir: str | Path) -> ExportManifest:
    """Read and check ``export_dir/export.json``; one-line GkdError when it is missing, unreadable or incomplete."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise GkdError(f"{export_dir}: holds no gkd export ({MANIFEST_NAME} missing); run gkd export first")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GkdError(f"{path}: not a readable export manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise GkdError(f"{path}: not an export manifest (expected a JSON object)")
    for key in ("checkpoint_sha256", "files"):
        if key not in raw:
            raise GkdError(f"{path}: export manifest without '{key}'; export again with this gkd")
    files = {}
    for precision, info in raw["files"].items():
        missing = [k for k in ("onnx", "sha256", "verified") if k not in info]
        if missing:
            raise GkdError(f"{path}: files.{precision} lacks {', '.join(missing)}; export again with this gkd")
        files[precision] = ExportedFile(precision, export_dir / info["onnx"], str(info["sha256"]),
                                        bool(info["verified"]), str(info.get("runs_on", "")))
    return ExportManifest(export_dir, str(raw.get("checkpoint", "?")), str(raw["checkpoint_sha256"]), files, raw)


def parity_verdict(path: str | Path) -> bool | None:
    """An ONNX file's parity verdict from the export.json next to it, if that manifest lists this very file (by
    SHA-256); None when nothing vouches for it (no manifest, an unreadable one, or another file of that name)."""
    from gkd.core.errors import GkdError

    path = Path(path)
    if not (path.parent / MANIFEST_NAME).is_file():
        return None
    try:
        entry = load_export_manifest(path.parent).entry_for(path)
    except GkdError:
        return None
    return None if entry is None else entry.verified
