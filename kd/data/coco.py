"""COCO instances JSON: validation, the cleaned index, and the torch ``Dataset`` the trainers use.

Conventions (see docs/data.md):

* Categories map to contiguous labels ``1..K`` in ascending category-id order (0 is background, as in torchvision).
* ``bbox`` is COCO ``[x, y, width, height]`` in pixels of the *displayed* image, i.e. after EXIF orientation.
  The JSON ``width``/``height`` must be that displayed size; a mismatch with the real file is an error naming both,
  because every box would otherwise be silently wrong.
* Boxes are clipped to the image; a box with non-positive width or height after clipping is dropped and counted,
  with one warning line per file (logger ``"gkd"``).
* Crowd annotations (``iscrowd=1``) are excluded from training targets and kept in ``gt_json`` for evaluation,
  where pycocotools treats them as "ignore" regions.
* Images without any annotation are allowed.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gkd.core.errors import GkdError
from gkd.core.io import read_json

from .transforms import flip_decision, hflip, resize

__all__ = ["CocoIndex", "CocoDetection", "load_coco", "load_image", "image_to_tensor", "load_image_tensor",
           "image_size", "collate", "default_image_root", "check_image_files", "summarize"]

log = logging.getLogger("gkd")

#: EXIF orientation values that swap width and height (rotations by 90 or 270 degrees)
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass
class CocoIndex:
    """A validated COCO dataset.

    Attributes:
        path: the JSON file.
        image_root: folder the ``file_name`` entries are relative to.
        classes: category names; ``classes[i]`` is label ``i + 1``.
        category_ids: COCO category id of each label; ``category_ids[i]`` is label ``i + 1``.
        images: per image ``{"id", "file_name", "width", "height"}``, in file order.
        anns_by_image: image id -> clean annotations (``id, image_id, category_id, bbox [x, y, w, h] clipped, area,
            iscrowd, label``, plus any extra fields such as ``attributes``); every image has an entry.
        gt_json: the cleaned COCO dict for pycocotools (crowd annotations kept with ``iscrowd=1``).
        dropped: number of annotations dropped (no area left after clipping to the image).
    """

    path: Path
    image_root: Path
    classes: list[str]
    category_ids: list[int]
    images: list[dict]
    anns_by_image: dict[int, list[dict]]
    gt_json: dict
    dropped: int = 0
    dropped_ids: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_path(self, image: dict) -> Path:
        """Path of an entry of ``images`` (``file_name`` joined to ``image_root``; absolute names are kept)."""
        return self.image_root / image["file_name"]


def default_image_root(json_path: str | os.PathLike) -> Path:
    """Where images are looked for when no folder is given: ``images/`` next to the JSON if it exists, else the
    JSON's own folder."""
    parent = Path(json_path).parent
    return parent / "images" if (parent / "images").is_dir() else parent


# ----------------------------------------------------------------------------------------------------------------
# images


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (grayscale replicated, alpha dropped, palette expanded, 16-bit scaled down)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        # PIL warns when a palette image with transparency goes straight to RGB; via RGBA is the documented path.
        return im.convert("RGBA").convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16/32-bit grayscale: convert("RGB") would clip everything above 255 to white.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr * (255.0 / 65535.0)
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image as 8-bit RGB with its EXIF orientation applied.

    Grayscale, RGBA, palette, CMYK and 16-bit images are converted. Every failure is a one-line ``GkdError``
    naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            # exif_transpose returns a new, fully decoded image (a copy when there is no orientation tag), so a
            # truncated file fails here, inside the try.
            return _to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise GkdError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise GkdError(f"{path}: is a folder, expected an image file") from None
    except PermissionError:
        raise GkdError(f"{path}: cannot read image file (permission denied)") from None
    except UnidentifiedImageError:
        raise GkdError(f"{path}: not a readable image (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise GkdError(f"{path}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise GkdError(f"{path}: corrupt or truncated image ({exc})") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded 8-bit RGB image (:func:`load_image`) -> the detector's input: ``[3, H, W]`` float32 in [0, 1].

    The one conversion every model input goes through: the dataset's items, the image sets of parity, calibration,
    evaluation and benchmarks, ``gkd predict`` and the end-to-end latency view. A checkpoint and its ONNX, OpenVINO
    and TensorRT files all take this float tensor (the exported graph resizes and normalises it itself), so no
    caller keeps uint8 input of its own: the bit-identical input is what makes their outputs comparable.

    The result keeps the image's HWC memory order (strides ``(1, 3W, 3)``, not C-contiguous), as every caller had it:
    :meth:`gkd.export.runtime.Runner.infer` and the compute latency view make it contiguous before the runtime sees
    it, while the end-to-end latency view hands it over as it is, so the layout copy stays inside the timed runner
    phases there and out of the decode phase. Add the batch dimension with ``unsqueeze(0)`` (a view, no copy).
    """
    arr = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    # the copy owns its memory: torch.from_numpy refuses (warns on) PIL's read-only buffer
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An image file as the detector's input: :func:`load_image` then :func:`image_to_tensor`, ``[3, H, W]`` float32
    in [0, 1]. Failures are :func:`load_image`'s one-line ``GkdError`` naming the file."""
    return image_to_tensor(load_image(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the displayed image (EXIF rotation applied) from the header, without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:  # a broken EXIF block only loses the orientation, as in PIL's exif_transpose
                orientation = None
    except FileNotFoundError:
        raise GkdError(f"{path}: image file not found") from None
    except PermissionError:
        raise GkdError(f"{path}: cannot read image file (permission denied)") from None
    except UnidentifiedImageError:
        raise GkdError(f"{path}: not a readable image (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise GkdError(f"{path}: corrupt image ({exc})") from None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _check_size(path: Path, actual: tuple[int, int], info: dict, json_path: Path) -> None:
    if actual != (info["width"], info["height"]):
        raise GkdError(
            f"{path}: image is {actual[0]}x{actual[1]} (width x height, after EXIF rotation) but {json_path} says "
            f"{info['width']}x{info['height']} for image id {info['id']}; expected the JSON width/height to be the "
            f"displayed image's size (boxes are in its pixels)")


# ----------------------------------------------------------------------------------------------------------------
# JSON validation


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _as_int(v: Any) -> int | None:
    """An int, or an integral float (some tools write 640.0); None for anything else (bool included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _list_field(data: dict, key: str, path: Path, required: bool = True) -> list:
    if key not in data:
        if required:
            raise GkdError(f"{path}: missing '{key}'; expected a COCO instances JSON with 'images', 'annotations' "
                           f"and 'categories' lists")
        return []
    value = data[key]
    if not isinstance(value, list):
        raise GkdError(f"{path}: '{key}' is a {type(value).__name__}; expected a list")
    return value


def _parse_categories(raw: list, path: Path) -> tuple[list[str], list[int]]:
    if not raw:
        raise GkdError(f"{path}: 'categories' is empty; expected at least one category {{'id': int, 'name': str}}")
    seen: dict[int, str] = {}
    for i, cat in enumerate(raw):
        if not isinstance(cat, dict):
            raise GkdError(f"{path}: categories[{i}] is {_short(cat)}; expected an object with 'id' and 'name'")
        cid = _as_int(cat.get("id"))
        if cid is None:
            raise GkdError(f"{path}: categories[{i}].id is {_short(cat.get('id'))}; expected an integer")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise GkdError(f"{path}: categories[{i}].name is {_short(name)}; expected a non-empty string")
        if cid in seen:
            raise GkdError(f"{path}: categories[{i}]: category id {cid} appears twice; expected unique ids")
        seen[cid] = name
    names = [seen[c] for c in sorted(seen)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GkdError(f"{path}: category name(s) {dup} used by several category ids; expected unique names")
    return names, sorted(seen)


def _parse_images(raw: list, path: Path) -> list[dict]:
    if not raw:
        raise GkdError(f"{path}: 'images' is empty (an empty dataset); expected at least one image")
    images, seen = [], set()
    for i, img in enumerate(raw):
        if not isinstance(img, dict):
            raise GkdError(f"{path}: images[{i}] is {_short(img)}; expected an object with id, file_name, width, "
                           f"height")
        iid = _as_int(img.get("id"))
        if iid is None:
            raise GkdError(f"{path}: images[{i}].id is {_short(img.get('id'))}; expected an integer")
        if iid in seen:
            raise GkdError(f"{path}: images[{i}]: image id {iid} appears twice; expected unique ids")
        seen.add(iid)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise GkdError(f"{path}: images[{i}] (id {iid}).file_name is {_short(name)}; expected a non-empty string")
        w, h = _as_int(img.get("width")), _as_int(img.get("height"))
        if w is None or h is None or w <= 0 or h <= 0:
            raise GkdError(f"{path}: images[{i}] (id {iid}): width/height are {_short(img.get('width'))}/"
                           f"{_short(img.get('height'))}; expected positive integers (the displayed image size)")
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
    return images


def _parse_annotation(i: int, ann: Any, path: Path, sizes: dict[int, tuple[int, int]],
                      label_of: dict[int, int]) -> dict | None:
    """One validated, clipped annotation, or None when clipping leaves no area."""
    if not isinstance(ann, dict):
        raise GkdError(f"{path}: annotations[{i}] is {_short(ann)}; expected an object")
    where = f"annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
    image_id = _as_int(ann.get("image_id"))
    if image_id is None:
        raise GkdError(f"{path}: {where}.image_id is {_short(ann.get('image_id'))}; expected an integer")
    if image_id not in sizes:
        raise GkdError(f"{path}: {where} refers to image_id {image_id}, which is not in 'images'")
    cat = _as_int(ann.get("category_id"))
    if cat is None:
        raise GkdError(f"{path}: {where}.category_id is {_short(ann.get('category_id'))}; expected an integer")
    if cat not in label_of:
        raise GkdError(f"{path}: {where} refers to category_id {cat}, which is not in 'categories' "
                       f"(known: {sorted(label_of)})")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise GkdError(f"{path}: {where}.bbox is {_short(bbox)}; expected 4 finite numbers [x, y, width, height]")
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):  # True/False compare equal to 1/0 and are accepted
        raise GkdError(f"{path}: {where}.iscrowd is {_short(crowd)}; expected 0 or 1")
    area = ann.get("area")
    if area is not None and not (_is_number(area) and area >= 0):
        raise GkdError(f"{path}: {where}.area is {_short(area)}; expected a non-negative number")
    if "id" in ann and _as_int(ann["id"]) is None:
        raise GkdError(f"{path}: annotations[{i}].id is {_short(ann['id'])}; expected an integer")

    w_img, h_img = sizes[image_id]
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), w_img), min(max(y, 0.0), h_img)
    x2, y2 = min(max(x + w, 0.0), w_img), min(max(y + h, 0.0), h_img)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    clean = {k: v for k, v in ann.items() if k != "segmentation"}  # bbox-only toolkit: skip polygon payloads
    clean.update(image_id=image_id, category_id=cat, bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(crowd),
                 area=float(area) if area is not None else (x2 - x1) * (y2 - y1), label=label_of[cat])
    if "id" in clean:
        clean["id"] = _as_int(clean["id"])
    return clean


def load_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
              check_images: bool = False) -> CocoIndex:
    """Read and validate a COCO instances JSON.

    Args:
        path: the JSON file.
        image_root: folder ``file_name`` is relative to; default :func:`default_image_root` (``images/`` next to the
            JSON if present, else the JSON's folder).
        check_images: also open and fully decode every image and compare its displayed size with the JSON (slow on
            big datasets; training checks each image when it loads it anyway).

    Returns:
        The :class:`CocoIndex`.

    Raises:
        GkdError: one line naming the file and what is wrong: malformed/truncated JSON, missing or mistyped fields,
            unknown image or category references, duplicate ids, no images; with ``check_images`` a missing,
            unreadable or corrupt image or a size mismatch.
    """
    path = Path(path)
    data = read_json(path, "COCO annotation file")
    if not isinstance(data, dict):
        raise GkdError(f"{path}: top level is a {type(data).__name__}; expected a COCO object with 'images', "
                       f"'annotations' and 'categories'")
    classes, category_ids = _parse_categories(_list_field(data, "categories", path), path)
    images = _parse_images(_list_field(data, "images", path), path)
    raw_anns = _list_field(data, "annotations", path, required=False)
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    sizes = {img["id"]: (img["width"], img["height"]) for img in images}

    anns: list[dict] = []
    dropped_ids: list = []
    for i, raw in enumerate(raw_anns):
        ann = _parse_annotation(i, raw, path, sizes, label_of)
        if ann is None:
            dropped_ids.append(raw.get("id", f"#{i}"))
        else:
            anns.append(ann)
    _assign_ids(anns, path)
    if dropped_ids:
        log.warning("%s: dropped %d box(es) with no area inside their image (outside it, or width/height <= 0); "
                    "first annotation ids: %s", path, len(dropped_ids), ", ".join(map(str, dropped_ids[:5])))

    anns_by_image: dict[int, list[dict]] = {img["id"]: [] for img in images}
    for ann in anns:
        anns_by_image[ann["image_id"]].append(ann)
    gt_json = {
        "info": data.get("info") if isinstance(data.get("info"), dict) else {},
        "licenses": data.get("licenses") if isinstance(data.get("licenses"), list) else [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cid, "name": name, "supercategory": _supercategory(data, cid)}
                       for cid, name in zip(category_ids, classes)],
    }
    root = Path(image_root) if image_root is not None else default_image_root(path)
    index = CocoIndex(path=path, image_root=root, classes=classes, category_ids=category_ids, images=images,
                      anns_by_image=anns_by_image, gt_json=gt_json, dropped=len(dropped_ids), dropped_ids=dropped_ids)
    if check_images:
        check_image_files(index)
    return index


def _supercategory(data: dict, cid: int) -> str:
    for cat in data["categories"]:
        if _as_int(cat.get("id")) == cid and isinstance(cat.get("supercategory"), str):
            return cat["supercategory"]
    return ""


def _assign_ids(anns: list[dict], path: Path) -> None:
    """pycocotools indexes annotations by id: ids must exist and be unique. Missing ones are numbered after the max."""
    seen: set[int] = set()
    for ann in anns:
        if "id" in ann:
            if ann["id"] in seen:
                raise GkdError(f"{path}: annotation id {ann['id']} appears twice; expected unique annotation ids")
            seen.add(ann["id"])
    nxt = max(seen, default=0) + 1
    for ann in anns:
        if "id" not in ann:
            ann["id"] = nxt
            nxt += 1


def check_image_files(index: CocoIndex) -> None:
    """Open and decode every image of ``index``; raise a ``GkdError`` at the first missing, corrupt or mis-sized one."""
    for info in index.images:
        p = index.image_path(info)
        img = load_image(p)
        _check_size(p, img.size, info, index.path)


def summarize(index: CocoIndex) -> dict[str, Any]:
    """Counts for ``gkd data check``: images, instances per class, crowd, dropped, box sizes, attribute flags.

    Box sizes use COCO's ranges on the annotation ``area`` (small < 32^2 <= medium < 96^2 <= large) plus the count
    under 16^2; ``box_side`` is the min / median / max of sqrt(box width * height) over non-crowd boxes.
    """
    anns = [a for lst in index.anns_by_image.values() for a in lst]
    normal = [a for a in anns if not a["iscrowd"]]
    per_class = {name: {"instances": 0, "crowd": 0} for name in index.classes}
    for a in anns:
        per_class[index.classes[a["label"] - 1]]["crowd" if a["iscrowd"] else "instances"] += 1
    sides = sorted(math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in normal)
    areas = [a["area"] for a in normal]
    flags: dict[str, int] = {}
    for a in normal:
        attrs = a.get("attributes")
        if isinstance(attrs, dict):
            for k, v in attrs.items():
                if isinstance(v, bool):
                    flags[k] = flags.get(k, 0) + int(v)
    widths = [img["width"] for img in index.images]
    heights = [img["height"] for img in index.images]
    return {
        "images": len(index.images),
        "images_without_boxes": sum(1 for lst in index.anns_by_image.values()
                                    if not any(not a["iscrowd"] for a in lst)),
        "instances": len(normal), "crowd": len(anns) - len(normal), "dropped": index.dropped,
        "per_class": per_class,
        "sizes": {"tiny (<16^2)": sum(1 for v in areas if v < 16 ** 2),
                  "small (<32^2)": sum(1 for v in areas if v < 32 ** 2),
                  "medium": sum(1 for v in areas if 32 ** 2 <= v < 96 ** 2),
                  "large (>=96^2)": sum(1 for v in areas if v >= 96 ** 2)},
        "box_side": ({"min": sides[0], "median": sides[len(sides) // 2], "max": sides[-1]} if sides else {}),
        "image_width": (min(widths), max(widths)), "image_height": (min(heights), max(heights)),
        "attributes": flags,
    }


# ----------------------------------------------------------------------------------------------------------------
# the Dataset


class CocoDetection(torch.utils.data.Dataset):
    """Images and detection targets of a :class:`CocoIndex`.

    Args:
        index: the validated dataset.
        train: training mode (resize + random flip, crowd boxes dropped; ``keep_empty`` applies) or evaluation mode
            (original size, ``scale`` 1.0, every image kept).
        min_size, max_size: train-mode resize (torchvision's rule: ``scale = min(min_size / short_side,
            max_size / long_side)``).
        hflip: probability of a horizontal flip in train mode.
        seed: the run's seed; the flip of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``.
        keep_empty: in train mode, keep images without any non-crowd box (they teach the background).

    ``__getitem__(i)`` returns ``(image, target)``: ``image`` FloatTensor ``[3, H, W]`` in ``[0, 1]``; ``target``
    ``{"boxes": Float[n, 4] xyxy in the returned image's pixels, "labels": Int64[n] in 1..K, "image_id": int,
    "orig_size": (h, w), "scale": float}``.
    """

    def __init__(self, index: CocoIndex, *, train: bool, min_size: int, max_size: int, hflip: float = 0.5,
                 seed: int = 0, keep_empty: bool = True):
        if min_size <= 0 or max_size <= 0:
            raise GkdError(f"min_size/max_size are {min_size}/{max_size}; expected positive integers")
        if not 0.0 <= hflip <= 1.0:
            raise GkdError(f"hflip is {hflip}; expected a probability in [0, 1]")
        self.index, self.train = index, bool(train)
        self.min_size, self.max_size, self.hflip, self.seed = int(min_size), int(max_size), float(hflip), int(seed)
        self.epoch = 0
        self.classes = index.classes
        self.images = [img for img in index.images
                       if not train or keep_empty or any(not a["iscrowd"] for a in index.anns_by_image[img["id"]])]
        if not self.images:
            raise GkdError(f"{index.path}: no image has a (non-crowd) box, and keep_empty is false; nothing to "
                           f"train on")

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def target_boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes of sample ``i`` in original pixels: ``(boxes [n, 4] xyxy float32, labels [n] int64)``."""
        anns = [a for a in self.index.anns_by_image[self.images[i]["id"]] if not a["iscrowd"]]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes, np.array([a["label"] for a in anns], dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[i]
        path = self.index.image_path(info)
        img = load_image(path)
        _check_size(path, img.size, info, self.index.path)
        boxes, labels = self.target_boxes(i)
        scale = 1.0
        if self.train:
            img, boxes, scale = resize(img, boxes, self.min_size, self.max_size)
            if flip_decision(self.seed, self.epoch, i, self.hflip):
                img, boxes = hflip(img, boxes)
        image = image_to_tensor(img)  # [3, H, W]
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": info["id"],
                  "orig_size": (info["height"], info["width"]), "scale": float(scale)}
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in box count."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
