"""The data stage of ``gkd run`` and ``gkd study``: a dataset folder, generated when empty, as a frozen result."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.core.errors import GkdError
from gkd.core.records import Artifact

__all__ = ["DatasetSpec", "Dataset", "prepare_dataset", "count_images"]

log = logging.getLogger("gkd")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset folder (``train.json``, ``val.json``, ``images/``) and the synthetic dataset to generate there
    when it holds none (``synthetic``: :func:`gkd.kd.data.generate_synthetic`'s keyword arguments)."""

    root: Path
    synthetic: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    """The splits a stage trained and evaluated on; the stages after it are keyed on their SHA-256."""

    train: Artifact
    val: Artifact

    def shas(self) -> dict[str, str]:
        """What later stages key on: ``{"train.json": sha, "val.json": sha}``."""
        return {"train.json": self.train.sha256, "val.json": self.val.sha256}

    def record(self) -> dict[str, Any]:
        return {"outputs": {"train": self.train.record(), "val": self.val.record()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Dataset":
        out = record["outputs"]
        return cls(Artifact.from_record(out["train"]), Artifact.from_record(out["val"]))


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


def prepare_dataset(spec: DatasetSpec) -> Dataset:
    """Generate the synthetic dataset into ``spec.root`` when it holds none; otherwise use what is there."""
    from . import generate_synthetic

    root = Path(spec.root)
    if not (root / "train.json").is_file():
        generate_synthetic(root, **spec.synthetic, progress=True)
    else:
        meta = _generated_here(root)
        other = {k: meta.get(k) for k in spec.synthetic if meta.get(k) != spec.synthetic[k]} if meta else {}
        log.info("data: using the dataset in %s%s", root, f" (generated with {other}; synth_* apply to an empty "
                 f"data_root only)" if other else "")
    if not (root / "val.json").is_file():
        raise GkdError(f"{root}: holds train.json but no val.json; both are needed (and images/)")
    return Dataset(Artifact.of(root / "train.json"), Artifact.of(root / "val.json"))


def count_images(split_json: Path) -> int | None:
    """How many images a split holds (None when it cannot be read: the stage that reads it says why)."""
    from .coco import load_coco

    try:
        return len(load_coco(split_json).images)
    except GkdError:
        return None
