"""Split one COCO JSON into ``train.json`` and ``val.json`` in the layout ``gkd run data_root=`` reads.

The split is seeded and stratified by class: every image is assigned to the rarest class it holds (images without
boxes form a group of their own), and each group sends ``round(val_fraction * n)`` of its images, drawn with the
seed, to val. So a class with a handful of images still lands in both splits (when it has at least two), and the
same seed gives the same files. A class on a single image cannot reach both: the result names every class that
is in one split only (the command prints it as a warning). ``images/`` next to the two files links to the image
folder, so the output folder is a complete ``data_root``.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from gkd.core.errors import GkdError

__all__ = ["split_coco"]


def split_coco(json_path: str | os.PathLike, out_dir: str | os.PathLike, *, val_fraction: float = 0.2,
               seed: int = 0, image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``out_dir/train.json``, ``out_dir/val.json`` and the ``out_dir/images`` link; returns counts.

    Raises:
        GkdError: bad fraction, an unreadable JSON, or ``out_dir`` already holding a train.json / val.json.
    """
    from gkd.core.io import atomic_write_json, read_json

    from .coco import load_coco

    if not 0.0 < val_fraction < 1.0:
        raise GkdError(f"--val-fraction is {val_fraction!r}; expected a number strictly between 0 and 1")
    index = load_coco(json_path, image_root=image_root)  # validates the file and finds its image folder
    data = read_json(json_path, "COCO annotation file")
    out_dir = Path(out_dir)
    for name in ("train.json", "val.json"):
        if (out_dir / name).exists():
            raise GkdError(f"{out_dir / name}: already exists; choose an empty --out folder (nothing is overwritten)")
    counts = Counter(a["category_id"] for a in data.get("annotations", []) if not a.get("iscrowd", 0))
    by_image: dict[int, list[int]] = {}
    for a in data.get("annotations", []):
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a["category_id"])
    groups: dict[Any, list[int]] = {}
    for im in data["images"]:
        cats = by_image.get(im["id"], [])
        key = min(cats, key=lambda c: (counts[c], c)) if cats else "no boxes"
        groups.setdefault(key, []).append(im["id"])
    rng = random.Random(seed)
    val_ids: set[int] = set()
    for key in sorted(groups, key=str):
        ids = sorted(groups[key])
        rng.shuffle(ids)
        n_val = round(val_fraction * len(ids))
        if len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)  # both splits see every class that has two images
        val_ids.update(ids[:n_val])
    if not val_ids or len(val_ids) == len(data["images"]):
        raise GkdError(f"{json_path}: {len(data['images'])} image(s) cannot be split into non-empty train and val")

    def subset(ids: set[int], split: str) -> dict[str, Any]:
        return {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
                "info": {**data.get("info", {}), "split": split, "split_from": str(json_path), "seed": seed},
                "images": [im for im in data["images"] if im["id"] in ids],
                "annotations": [a for a in data.get("annotations", []) if a["image_id"] in ids]}

    train_ids = {im["id"] for im in data["images"]} - val_ids
    out_dir.mkdir(parents=True, exist_ok=True)
    link = out_dir / "images"
    target = Path(index.image_root).resolve()
    if link.resolve() != target:
        if link.exists() or link.is_symlink():
            raise GkdError(f"{link}: already exists and is not the image folder {target}; choose another --out")
        try:
            link.symlink_to(target, target_is_directory=True)
        except OSError as exc:
            raise GkdError(f"{link}: cannot link it to the image folder {target} ({exc.strerror or exc})") from None
    atomic_write_json(out_dir / "val.json", subset(val_ids, "val"), indent=None)
    atomic_write_json(out_dir / "train.json", subset(train_ids, "train"), indent=None)
    names = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
    seen = {split: {c for i in ids for c in by_image.get(i, [])} for split, ids in (("train", train_ids),
                                                                                     ("val", val_ids))}
    return {"train": len(train_ids), "val": len(val_ids), "images": str(link), "image_root": str(target),
            # classes that reach one split only (a class on one image cannot reach both): said, not silently kept
            "train_only": [names.get(c, str(c)) for c in sorted(seen["train"] - seen["val"])],
            "val_only": [names.get(c, str(c)) for c in sorted(seen["val"] - seen["train"])]}
