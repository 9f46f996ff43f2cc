"""Pairing teacher and student FPN levels by stride, and assigning instances to levels.

Teacher and student may have different backbones, so their FPNs need not expose the same levels. A level is
distilled only where both detectors have a level of that stride. torchvision's MobileNetV3 FPN taps two stride-32
layers ('0' and '1'); when a detector has several levels of one stride, the **first** one (in the FPN's output order)
is paired: in torchvision's FPN it is the one the top-down path has summed the deeper level into (so imitation on it
trains both backbone stages), and for Faster R-CNN it is the level the RoI head pools from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gkd.core.errors import GkdError

__all__ = ["LevelPair", "pair_levels", "assign_levels", "level_histogram"]


@dataclass(frozen=True)
class LevelPair:
    """One distilled level: the student's and the teacher's FPN key of the same ``stride``."""

    stride: int
    student: str
    teacher: str

    @property
    def key(self) -> str:
        """A name usable as a module / state key (``s8``)."""
        return f"s{self.stride}"


def _first_by_stride(strides: dict[str, int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, s in strides.items():
        out.setdefault(int(s), name)
    return out


def pair_levels(student_strides: dict[str, int], teacher_strides: dict[str, int],
                wanted: tuple[int, ...] | list[int] = ()) -> tuple[list[LevelPair], list[str]]:
    """Pair the levels of two FPNs by stride.

    Args:
        student_strides / teacher_strides: ``{level name: stride}`` in FPN order (``model.gkd_meta["strides"]``).
        wanted: strides to distill (empty: all common ones); each must be common to both.

    Returns:
        ``(pairs sorted by stride, notes)``: notes are human-readable lines for the run log (levels left out and why).
    """
    s_by, t_by = _first_by_stride(student_strides), _first_by_stride(teacher_strides)
    common = sorted(set(s_by) & set(t_by))
    notes = []
    for name, s in student_strides.items():
        if s_by[s] != name:
            notes.append(f"student level '{name}' (stride {s}) not distilled: level '{s_by[s]}' has the same stride")
        elif s not in t_by:
            notes.append(f"student level '{name}' (stride {s}) not distilled: the teacher has no stride-{s} level")
    for name, s in teacher_strides.items():
        if t_by[s] == name and s not in s_by:
            notes.append(f"teacher level '{name}' (stride {s}) not used: the student has no stride-{s} level")
    if wanted:
        bad = [s for s in wanted if s not in common]
        if bad:
            raise GkdError(f"distill.strides: {bad} not available; strides both detectors have: {common}")
        dropped = [s for s in common if s not in wanted]
        if dropped:
            notes.append(f"strides {dropped} not distilled (distill.strides = {list(wanted)})")
        common = sorted(set(wanted))
    if not common:
        raise GkdError(f"teacher and student FPNs share no stride (student {dict(student_strides)}, teacher "
                       f"{dict(teacher_strides)}); nothing to distill")
    return [LevelPair(s, s_by[s], t_by[s]) for s in common], notes


def assign_levels(boxes: torch.Tensor, num_levels: int, canonical: float = 56.0) -> torch.Tensor:
    """The reference's level of each box among ``num_levels`` levels, finest first (mmdet ``_map_roi_levels``).

    ``lvl = floor(log2(sqrt((w + 1)(h + 1)) / canonical + 1e-6))`` clamped to ``[0, num_levels - 1]``: boxes under
    ``2 * canonical`` px go to the finest distilled level, each doubling of scale one level coarser. mmdet's
    ``canonical`` is 56 px at COCO's ~1333x800; ``distill.level_canonical_size`` scales it to the input size.

    Args:
        boxes: ``[N, 4]`` xyxy pixels (model-input coordinates).
        canonical: the canonical size in the same pixels.

    Returns:
        ``[N]`` int64 level indices.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1).clamp_min(0) * (boxes[:, 3] - boxes[:, 1] + 1).clamp_min(0))
    lvl = torch.floor(torch.log2(scale / canonical + 1e-6))
    return lvl.clamp(0, num_levels - 1).long()


def level_histogram(train_json: Path, runs: list[dict[str, Any]], run_cfg: Any) -> dict[str, Any]:
    """How the level rule spreads the training split's boxes over the distilled levels (finest first), under the
    canonical size of the student runs (``run_cfg``'s, resolved for its input size) and under mmdet's 56 px:
    ``{"canonical", "levels", "gt", "gt_at_56", "positives_per_step"}``, the last the positive RoIs per step and
    level that a main `gkd` run logged."""
    from .config import resolve_scale

    canonical = resolve_scale(run_cfg.distill, run_cfg.model.min_size).level_canonical_size
    data = json.loads(train_json.read_text())
    # the detector's resize: the short side to min_size, unless the long side would pass max_size
    scale = {im["id"]: min(run_cfg.model.min_size / min(im["height"], im["width"]),
                           run_cfg.model.max_size / max(im["height"], im["width"])) for im in data["images"]}
    boxes = torch.tensor([[0.0, 0.0, a["bbox"][2] * scale[a["image_id"]], a["bbox"][3] * scale[a["image_id"]]]
                          for a in data["annotations"]]).reshape(-1, 4)
    diag = next((r.get("diagnostics", {}) for r in runs if r.get("method") == "gkd" and r.get("kind") == "main"), {})
    levels = sorted((k[len("instances_"):] for k in diag if k.startswith("instances_")), key=lambda k: int(k[1:]))
    n = len(levels) or 5
    count = lambda c: torch.bincount(assign_levels(boxes, n, c), minlength=n).tolist()  # noqa: E731
    return {"canonical": canonical, "levels": levels or [f"level {i}" for i in range(n)], "gt": count(canonical),
            "gt_at_56": count(56.0), "positives_per_step": {k: diag[f"instances_{k}"] for k in levels}}
