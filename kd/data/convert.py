"""Import Pascal VOC XML folders and YOLO txt label folders as COCO instances JSON (the canonical format).

Both converters return a COCO dict whose ``file_name`` entries are relative to the image folder (VOC:
``<root>/JPEGImages``; YOLO: the ``IMAGES_DIR`` given), so the JSON is used with that folder as ``--images`` /
``data.images``. Conventions (docs/data.md):

* **VOC** pixel coordinates are 1-based and inclusive: ``xmin=1, xmax=W`` spans the whole image. They become COCO
  ``x = xmin - 1``, ``width = xmax - xmin + 1`` (detectron2's convention), so a box written back as
  ``xmin = x + 1, xmax = x + width`` round-trips exactly. ``difficult`` objects are by default marked
  ``iscrowd=1``: like VOC's own evaluation and mmdet they neither train nor count as misses (pycocotools ignores
  crowd regions); ``difficult="keep"`` makes them ordinary objects, ``"drop"`` leaves them out. Every annotation
  records ``attributes: {difficult, truncated, occluded}``.
* **YOLO** lines are ``class cx cy w h`` normalised to ``[0, 1]`` of the displayed image (EXIF orientation applied,
  as Ultralytics does); the image size is read from each image's header. Segment lines (``class x1 y1 x2 y2 ...``)
  become their bounding box. An image without a label file has no objects (a background image). Category ids are
  ``class index + 1``.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from gkd.core.config import parse_yaml
from gkd.core.errors import GkdError
from gkd.core.io import read_text

from .coco import image_size

__all__ = ["voc_to_coco", "yolo_to_coco", "read_class_names", "IMAGE_EXTENSIONS", "DIFFICULT_POLICIES"]

log = logging.getLogger("gkd")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DIFFICULT_POLICIES = ("ignore", "keep", "drop")
#: normalised YOLO values may exceed [0, 1] by this much (float round-off in exporters) before it is an error
_YOLO_TOLERANCE = 1e-3


def _coco(images: list[dict], anns: list[dict], classes: Sequence[str], description: str) -> dict[str, Any]:
    return {"info": {"description": description}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(classes)]}


# ----------------------------------------------------------------------------------------------------------------
# Pascal VOC


def _text(elem: ET.Element, tag: str, xml: Path, where: str) -> str:
    node = elem.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise GkdError(f"{xml}: {where}: missing <{tag}>; expected a Pascal VOC annotation")
    return node.text.strip()


def _number(text: str, xml: Path, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GkdError(f"{xml}: {where}: '{text}' is not a number") from None


def _flag(obj: ET.Element, tag: str, xml: Path, where: str) -> bool:
    node = obj.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return False
    try:
        return bool(int(float(node.text)))
    except ValueError:
        raise GkdError(f"{xml}: {where}: <{tag}> is '{node.text.strip()}'; expected 0 or 1") from None


def _parse_voc_xml(xml: Path, image_dir: Path) -> tuple[str, int, int, list[dict]]:
    """``(file_name, width, height, objects)`` of one VOC annotation file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise GkdError(f"{xml}: malformed XML at line {line} column {col + 1}") from None
    except OSError as exc:
        raise GkdError(f"{xml}: cannot read ({exc.strerror or exc})") from None
    if root.tag != "annotation":
        raise GkdError(f"{xml}: root element is <{root.tag}>; expected <annotation> (Pascal VOC)")
    file_name = (root.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
    img_path = image_dir / file_name
    if not img_path.is_file():
        raise GkdError(f"{xml}: its image {img_path} does not exist")
    w_txt, h_txt = root.findtext("size/width"), root.findtext("size/height")
    try:
        width, height = int(float(w_txt)), int(float(h_txt))
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:  # some exporters write 0 or omit <size>: ask the image
        width, height = image_size(img_path)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", xml, f"object {k + 1}")
        where = f"object {k + 1} ('{name}')"
        box = obj.find("bndbox")
        if box is None:
            raise GkdError(f"{xml}: {where}: missing <bndbox>; expected xmin, ymin, xmax, ymax")
        xmin, ymin, xmax, ymax = (_number(_text(box, t, xml, where), xml, f"{where} <{t}>")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append({"name": name, "box": (xmin, ymin, xmax, ymax),
                        "difficult": _flag(obj, "difficult", xml, where),
                        "truncated": _flag(obj, "truncated", xml, where),
                        "occluded": _flag(obj, "occluded", xml, where)})
    return file_name, width, height, objects


def _voc_files(root: Path | None, split: str | None, ann_dir: Path) -> list[Path]:
    if not ann_dir.is_dir():
        if root is not None and ann_dir == root / "Annotations":
            raise GkdError(f"{root}: no Annotations/ folder; expected a Pascal VOC root (Annotations/, JPEGImages/), "
                           f"or give --annotations and --images")
        raise GkdError(f"{ann_dir}: not a folder; expected the folder of the VOC .xml files")
    if split is None:
        files = sorted(ann_dir.glob("*.xml"))
        if not files:
            raise GkdError(f"{ann_dir}: no .xml files; expected Pascal VOC annotations")
        return files
    if root is None:
        raise GkdError(f"--split {split}: needs VOC_ROOT (it reads VOC_ROOT/ImageSets/Main/{split}.txt); without one, "
                       f"convert everything and use gkd data split")
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [ln.split()[0] for ln in listing.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise GkdError(f"{listing}: split file not found; expected ImageSets/Main/{split}.txt (or no --split)") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GkdError(f"{listing}: cannot read ({exc})") from None
    if not ids:
        raise GkdError(f"{listing}: empty split; expected one image id per line")
    files = []
    for lineno, image_id in enumerate(ids, 1):
        xml = ann_dir / f"{image_id}.xml"
        if not xml.is_file():
            raise GkdError(f"{listing}:{lineno}: image id '{image_id}' has no annotation file {xml}")
        files.append(xml)
    return files


def voc_to_coco(root: str | os.PathLike | None, *, split: str | None = None, classes: Sequence[str] | None = None,
                difficult: str = "ignore", annotations_dir: str | os.PathLike | None = None,
                images_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Convert a Pascal VOC folder to a COCO dict.

    Args:
        root: folder with ``Annotations/*.xml`` and ``JPEGImages/`` (and optionally ``ImageSets/Main/<split>.txt``).
        split: read only the image ids listed in ``ImageSets/Main/<split>.txt``; None: every XML file.
        classes: category names in label order; None: the sorted set of names found. With a list, an object
            whose name is not in it is an error.
        difficult: ``"ignore"`` (iscrowd=1, the default), ``"keep"`` or ``"drop"``; see the module docstring.

        annotations_dir, images_dir: the two folders when they are not VOC's (``annotations/*.xml`` and
            ``images/*.jpg``, say); each defaults to ``root``'s.

    Returns:
        A COCO instances dict; ``file_name`` is relative to the image folder.
    """
    if difficult not in DIFFICULT_POLICIES:
        raise GkdError(f"difficult is '{difficult}'; expected one of {', '.join(DIFFICULT_POLICIES)}")
    root = Path(root) if root is not None else None
    if root is None and (annotations_dir is None or images_dir is None):
        raise GkdError("voc: give the VOC root, or both the annotations and the images folders")
    ann_dir = Path(annotations_dir) if annotations_dir is not None else root / "Annotations"
    image_dir = Path(images_dir) if images_dir is not None else root / "JPEGImages"
    parsed = [(xml, *_parse_voc_xml(xml, image_dir)) for xml in _voc_files(root, split, ann_dir)]
    if classes is None:
        classes = sorted({o["name"] for *_, objs in parsed for o in objs})
        if not classes:
            raise GkdError(f"{ann_dir}: no objects in any annotation file; pass --classes to convert anyway")
    label = {n: i + 1 for i, n in enumerate(classes)}
    images, anns = [], []
    for image_id, (xml, file_name, width, height, objects) in enumerate(parsed, 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for k, o in enumerate(objects):
            if o["name"] not in label:
                raise GkdError(f"{xml}: object {k + 1} is '{o['name']}', not one of the classes "
                               f"{', '.join(classes)}")
            if o["difficult"] and difficult == "drop":
                continue
            xmin, ymin, xmax, ymax = o["box"]
            x, y, w, h = xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label[o["name"]],
                         "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(o["difficult"] and difficult == "ignore"),
                         "attributes": {"difficult": o["difficult"], "truncated": o["truncated"],
                                        "occluded": o["occluded"]}})
    return _coco(images, anns, classes, f"converted from Pascal VOC {root or ann_dir}" + (f" ({split})" if split else ""))


# ----------------------------------------------------------------------------------------------------------------
# YOLO


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a ``names.txt`` (one per line) or an Ultralytics ``data.yaml`` (``names:`` list or
    ``{index: name}`` map; ``nc`` checked when present)."""
    path = Path(path)
    text = read_text(path, "class-name file")
    if path.suffix.lower() in (".yaml", ".yml"):
        names = _names_from_yaml(text, path)
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise GkdError(f"{path}: no class names; expected one name per line or a data.yaml with 'names'")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GkdError(f"{path}: class name(s) {dup} appear more than once; expected unique names")
    return names


def _names_from_yaml(text: str, path: Path) -> list[str]:
    data = parse_yaml(text, path)
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise GkdError(f"{path}: 'names' keys are {keys}; expected the class indices 0..{len(keys) - 1}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
        raise GkdError(f"{path}: 'names' is {names!r:.60}; expected a list of class names or {{index: name}}")
    names = [str(n) for n in names]
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise GkdError(f"{path}: nc is {nc} but 'names' has {len(names)} entries; expected them to agree")
    return names


def _yolo_line(tokens: list[str], where: str, n_classes: int) -> tuple[int, float, float, float, float]:
    """``(class, x1, y1, x2, y2)`` normalised, from a box or segment line."""
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise GkdError(f"{where}: '{' '.join(tokens)}' has a non-number; expected 'class cx cy w h'") from None
    n = len(values)
    if not (n == 5 or (n >= 7 and n % 2 == 1)):
        raise GkdError(f"{where}: {n} values; expected 'class cx cy w h' (5 numbers) or a segment "
                       f"'class x1 y1 x2 y2 x3 y3 ...'")
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < n_classes:
        raise GkdError(f"{where}: class '{tokens[0]}' is not a class index 0..{n_classes - 1}")
    coords = values[1:]
    if any(not (-_YOLO_TOLERANCE <= v <= 1 + _YOLO_TOLERANCE) for v in coords):
        raise GkdError(f"{where}: coordinates {' '.join(tokens[1:])} are not normalised to [0, 1]; expected "
                       f"YOLO's cx cy w h as fractions of the image size")
    if n == 5:
        cx, cy, w, h = coords
        return int(cls), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    xs, ys = coords[0::2], coords[1::2]
    return int(cls), min(xs), min(ys), max(xs), max(ys)


def _read_label_file(path: Path, n_classes: int) -> list[tuple[int, float, float, float, float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GkdError(f"{path}: cannot read label file ({exc})") from None
    return [_yolo_line(line.split(), f"{path}:{lineno}", n_classes)
            for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]


def yolo_to_coco(images_dir: str | os.PathLike, labels_dir: str | os.PathLike, *,
                 names: Sequence[str] | str | os.PathLike) -> dict[str, Any]:
    """Convert a YOLO dataset (images + one ``.txt`` per image) to a COCO dict.

    Args:
        images_dir: folder of images (searched recursively); ``file_name`` is relative to it.
        labels_dir: folder of label files mirroring ``images_dir`` (``a/b.jpg`` -> ``a/b.txt``).
        names: class names in index order, or a ``names.txt`` / ``data.yaml`` path.

    Returns:
        A COCO instances dict; category id = class index + 1.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    classes = read_class_names(names) if isinstance(names, (str, os.PathLike)) else [str(n) for n in names]
    if not classes:
        raise GkdError("names is empty; expected at least one class name")
    for d, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not d.is_dir():
            raise GkdError(f"{d}: {what} folder not found")
    files = sorted((p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(images_dir).as_posix())
    if not files:
        raise GkdError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); expected the YOLO images folder")
    images, anns, used_labels = [], [], set()
    for image_id, img in enumerate(files, 1):
        rel = img.relative_to(images_dir)
        width, height = image_size(img)
        images.append({"id": image_id, "file_name": rel.as_posix(), "width": width, "height": height})
        label_file = labels_dir / rel.with_suffix(".txt")
        if not label_file.is_file():
            continue  # YOLO convention: no label file = background image
        used_labels.add(label_file.resolve())
        for cls, x1, y1, x2, y2 in _read_label_file(label_file, len(classes)):
            x, y, w, h = x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    orphans = [p for p in labels_dir.rglob("*.txt") if p.resolve() not in used_labels and p.name != "classes.txt"]
    if orphans:
        log.warning("%s: %d label file(s) have no image in %s and were skipped (e.g. %s)", labels_dir, len(orphans),
                    images_dir, orphans[0].name)
    return _coco(images, anns, classes, f"converted from YOLO labels {labels_dir} (images {images_dir})")
