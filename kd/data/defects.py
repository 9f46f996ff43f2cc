"""Defective copies of a training split: the study's positive controls (a teacher trained on one should be noticed
by the robust distillation module). Each is written beside the study's runs, never over the user's data."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gkd.core.errors import GkdError
from gkd.core.io import atomic_write_json
from gkd.core.records import Artifact, result_fields

__all__ = ["DefectSpec", "DefectiveSplit", "make_defective_split", "corrupt_labels", "blind_labels"]


@dataclass(frozen=True)
class DefectSpec:
    """``kind`` "labels": ``fraction`` of class ``target``'s boxes get another class's label ("" = the first
    class); "blind": ``fraction`` of the boxes tagged ``target`` (small, occluded, blurred...) are deleted."""

    kind: Literal["labels", "blind"]
    train_json: Path
    out_json: Path
    target: str
    fraction: float
    seed: int


@dataclass(frozen=True)
class DefectiveSplit:
    """The defective training split and what was changed."""

    train: Artifact
    changes: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {**self.changes, "outputs": {"train": self.train.record()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "DefectiveSplit":
        changes = result_fields(record, "outputs")
        return cls(Artifact.from_record(record["outputs"]["train"]), changes)


def make_defective_split(spec: DefectSpec) -> DefectiveSplit:
    """Write ``spec.out_json``, the defective copy of ``spec.train_json``."""
    make = blind_labels if spec.kind == "blind" else corrupt_labels
    changes = make(spec.train_json, spec.out_json, spec.target, spec.fraction, spec.seed)
    return DefectiveSplit(Artifact.of(spec.out_json), changes)


def corrupt_labels(train_json: Path, out_json: Path, class_name: str, fraction: float, seed: int) -> dict[str, Any]:
    """The positive control's training split: ``fraction`` of the annotations of class ``class_name`` ("" = the
    first category) get another class's id, drawn uniformly from the others (seeded); every other annotation and
    every image is as in ``train_json``. Writes ``out_json`` atomically; returns what was changed."""
    data = json.loads(train_json.read_text())
    cats = data["categories"]
    names = [c["name"] for c in cats]
    name = class_name or names[0]
    if name not in names:
        raise GkdError(f"control_class: '{name}' is not a class of {train_json}; expected one of {', '.join(names)}")
    target = cats[names.index(name)]["id"]
    others = [c["id"] for c in cats if c["id"] != target]
    rng = random.Random(seed)
    mine = [a for a in data["annotations"] if a["category_id"] == target]
    flipped = rng.sample(range(len(mine)), round(fraction * len(mine))) if others else []
    for i in flipped:
        mine[i]["category_id"] = rng.choice(others)
    atomic_write_json(out_json, data)
    return {"class": name, "category_id": target, "annotations": len(mine), "relabelled": len(flipped)}


def blind_labels(train_json: Path, out_json: Path, tag: str, fraction: float, seed: int) -> dict[str, Any]:
    """The blind positive control's training split: ``fraction`` of the annotations whose ``attributes[tag]`` is
    true (written by ``gkd data synth``: small, occluded, blurred, ...) are deleted, drawn at random (seeded). The
    images stay, so a teacher trained on it learns those objects as background. Writes ``out_json`` atomically;
    returns what was changed (``images_left_empty``: images that lost every box and now teach background only)."""
    data = json.loads(train_json.read_text())
    anns = data["annotations"]
    known = sorted({k for a in anns for k, v in (a.get("attributes") or {}).items() if isinstance(v, bool)})
    if tag not in known:
        raise GkdError(f"control_tag: '{tag}' is not a tag of {train_json}'s annotations; expected one of "
                       f"{', '.join(known)}" if known else
                       f"control_tag: {train_json}'s annotations carry no 'attributes' tags; the blind control needs "
                       f"a split made by `gkd data synth` (or annotations with boolean 'attributes')")
    tagged = [i for i, a in enumerate(anns) if (a.get("attributes") or {}).get(tag) is True]
    deleted = set(random.Random(seed).sample(tagged, round(fraction * len(tagged))))
    before = {a["image_id"] for a in anns}
    data["annotations"] = [a for i, a in enumerate(anns) if i not in deleted]
    after = {a["image_id"] for a in data["annotations"]}
    atomic_write_json(out_json, data)
    return {"kind": "blind", "tag": tag, "annotations": len(tagged), "deleted": len(deleted),
            "images_left_empty": len(before - after)}
