"""What a stage records about a file it made or read: its path and SHA-256, as one frozen value.

A stage's record in ``runs/<name>/manifest.json`` holds such ``{"path", "sha256"}`` pairs; the stages after it are
keyed on the SHA-256, and a stage is reused only while its files still have the recorded one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gkd.core.io import file_sha256

__all__ = ["Artifact", "artifacts_in", "RUNNER_FIELDS", "result_fields"]


@dataclass(frozen=True)
class Artifact:
    """A file and the SHA-256 of its content when it was recorded."""

    path: Path
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> "Artifact":
        """The file at ``path`` as it is now."""
        return cls(Path(path), file_sha256(path))

    @classmethod
    def from_record(cls, record: dict[str, str]) -> "Artifact":
        return cls(Path(record["path"]), record["sha256"])

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def artifacts_in(record: Any) -> list[Artifact]:
    """Every ``{"path", "sha256"}`` pair recorded anywhere in a (JSON) stage record."""
    if isinstance(record, dict):
        if set(record) == {"path", "sha256"}:
            return [Artifact.from_record(record)]
        return [a for v in record.values() for a in artifacts_in(v)]
    if isinstance(record, list):
        return [a for v in record for a in artifacts_in(v)]
    return []


#: what the stage runner writes into every record beside a result's own fields (gkd.runner)
RUNNER_FIELDS = ("status", "key", "inputs", "command", "seconds")


def result_fields(record: dict[str, Any], *own: str) -> dict[str, Any]:
    """A stage record's fields that are neither the runner's (:data:`RUNNER_FIELDS`) nor those named in ``own`` (the
    ones a result's ``from_record`` reads itself): what it keeps as its other details."""
    skip = set(RUNNER_FIELDS) | set(own)
    return {k: v for k, v in record.items() if k not in skip}
