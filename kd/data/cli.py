"""``gkd data``: synth | convert voc | convert yolo | split | check."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import SYNTH_PRESETS

__all__ = ["data"]

_PATH_DIR = click.Path(path_type=Path, file_okay=False)
_PATH_FILE = click.Path(path_type=Path, dir_okay=False)


@click.group("data")
def data() -> None:
    """Datasets: generate the embedded synthetic one, import VOC / YOLO labels, split, check a COCO JSON.

    \b
    gkd works on COCO instances JSON (images + boxes + categories). Every command here either writes such a
    file or checks one, and a dataset that passes `gkd data check` trains and evaluates without surprises.

    \b
    Examples:
      gkd data synth --out data/synth                       # 800 images, 256 px, 6 shape classes
      gkd data convert voc ~/VOC2007 --split trainval --out data/voc/trainval.json
      gkd data convert yolo ds/images/train ds/labels/train --names ds/data.yaml --out data/mine/train.json
      gkd data split data/mine/all.json --out data/mine-split       # train.json + val.json + images/
      gkd data check data/synth/val.json
    """


@data.command("synth")
@click.option("--out", type=_PATH_DIR, required=True, help="Folder to write the dataset to (created).")
@click.option("--images", "n_images", type=click.IntRange(2), default=800, show_default=True,
              help="Number of images, train + val.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Dataset seed: the same seed and options give byte-identical files.")
@click.option("--size", "image_size", type=click.IntRange(64, 4096), default=256, show_default=True,
              help="Side of the square images, in pixels.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of the images that go to val.json.")
@click.option("--preset", type=click.Choice(SYNTH_PRESETS), default="clean", show_default=True,
              help="The world: clean (smooth backgrounds, 12% of draws small; what gkd run trains on), cluttered "
                   "(distractor blobs and lines, 25% small; the first world, byte-identical) or quick (1-3 large "
                   "solid shapes of 3 classes, no hard cases; what gkd run --quick trains on).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def synth(out: Path, n_images: int, seed: int, image_size: int, val_fraction: float, preset: str,
          no_progress: bool) -> None:
    """Generate the embedded synthetic dataset: PNG images + COCO train/val JSON.

    \b
    Six shape classes (circle, square, triangle, ring, cross, star) with random colours and textures on
    smooth (or, --preset cluttered, cluttered) backgrounds, 3-8 objects per image, including small objects,
    partial occlusion, blur, noise and low contrast. Each annotation carries "attributes" (small, occluded, blurred, noisy, low_contrast, visible)
    so results can be reported on these hard cases. Writes OUT/images/*.png, OUT/train.json, OUT/val.json,
    OUT/meta.json and OUT/README.txt.

    \b
    Example:
      gkd data synth --out data/synth --images 800 --seed 0
    """
    from gkd.core.logs import setup_console_logging

    from .synth import generate_synthetic

    setup_console_logging()
    meta = generate_synthetic(out, n_images=n_images, seed=seed, image_size=image_size, val_fraction=val_fraction,
                              progress=not no_progress, preset=preset)
    tr, va = meta["stats"]["train"], meta["stats"]["val"]
    click.echo(f"wrote {out}: train {tr['images']} images / {tr['objects']} objects, val {va['images']} images / "
               f"{va['objects']} objects in {meta['seconds']:.1f} s")
    frac = tr["fractions"]
    click.echo("hard cases (train): " + ", ".join(f"{k} {v:.0%}" for k, v in frac.items()))


@data.group("convert")
def convert() -> None:
    """Convert Pascal VOC or YOLO labels to COCO instances JSON.

    The JSON's file_name entries are relative to the image folder (VOC: VOC_ROOT/JPEGImages, YOLO: IMAGES_DIR):
    pass that folder as --images to `gkd eval` / `gkd data check`, or as data.images in a training config.
    """


@convert.command("voc")
@click.argument("voc_root", type=_PATH_DIR, required=False)
@click.option("--annotations", "annotations_dir", type=_PATH_DIR, default=None,
              help="Folder of the .xml files [default: VOC_ROOT/Annotations].")
@click.option("--images", "images_dir", type=_PATH_DIR, default=None,
              help="Folder of the images [default: VOC_ROOT/JPEGImages].")
@click.option("--out", type=_PATH_FILE, required=True, help="COCO JSON file to write.")
@click.option("--split", default=None,
              help="Convert only the ids in VOC_ROOT/ImageSets/Main/<split>.txt (e.g. trainval, test) "
                   "[default: every file in Annotations/].")
@click.option("--classes", default=None,
              help="Comma-separated class names, in label order (e.g. the 20 VOC classes) [default: the sorted "
                   "names found]. Objects of other names are an error.")
@click.option("--difficult", type=click.Choice(["ignore", "keep", "drop"], case_sensitive=False), default="ignore",
              show_default=True,
              help="Objects marked difficult: 'ignore' = iscrowd=1 (not trained on, not counted as misses, as in "
                   "VOC's own evaluation), 'keep' = ordinary objects, 'drop' = left out.")
def convert_voc(voc_root: Path | None, annotations_dir: Path | None, images_dir: Path | None, out: Path,
                split: str | None, classes: str | None, difficult: str) -> None:
    """Convert Pascal VOC XML labels to COCO JSON: a VOC folder (Annotations/ + JPEGImages/), or any two folders
    given as --annotations and --images (e.g. annotations/*.xml + images/*.jpg).

    VOC's 1-based pixel coordinates become COCO's 0-based ones (x = xmin - 1, width = xmax - xmin + 1).

    \b
    Examples:
      gkd data convert voc ~/VOCdevkit/VOC2007 --split trainval --out data/voc07/trainval.json
      gkd data convert voc --annotations mine/annotations --images mine/images --out mine/all.json
    """
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json
    from gkd.core.logs import setup_console_logging

    from .convert import voc_to_coco

    setup_console_logging()
    if voc_root is None and (annotations_dir is None or images_dir is None):
        raise GkdError("gkd data convert voc: give VOC_ROOT, or both --annotations and --images")
    _check_out(out)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    coco = voc_to_coco(voc_root, split=split, classes=names, difficult=difficult.lower(),
                       annotations_dir=annotations_dir, images_dir=images_dir)
    atomic_write_json(out, coco, indent=None)
    _after_convert(out, images_dir or voc_root / "JPEGImages")


@convert.command("yolo")
@click.argument("images_dir", type=_PATH_DIR)
@click.argument("labels_dir", type=_PATH_DIR)
@click.option("--names", type=_PATH_FILE, required=True,
              help="Class names: a names.txt (one per line) or an Ultralytics data.yaml ('names:').")
@click.option("--out", type=_PATH_FILE, required=True, help="COCO JSON file to write.")
def convert_yolo(images_dir: Path, labels_dir: Path, names: Path, out: Path) -> None:
    """Convert YOLO txt labels (class cx cy w h, normalised) to COCO JSON.

    IMAGES_DIR is searched recursively; the label of IMAGES_DIR/a/b.jpg is LABELS_DIR/a/b.txt (an image with no
    label file has no objects). Image sizes are read from the images (EXIF orientation applied).

    \b
    Example:
      gkd data convert yolo ds/images/val ds/labels/val --names ds/data.yaml --out data/mine/val.json
    """
    from gkd.core.io import atomic_write_json
    from gkd.core.logs import setup_console_logging

    from .convert import yolo_to_coco

    setup_console_logging()
    _check_out(out)
    coco = yolo_to_coco(images_dir, labels_dir, names=names)
    atomic_write_json(out, coco, indent=None)
    _after_convert(out, images_dir)


def _check_out(out: Path) -> None:
    """An existing --out is replaced only if gkd data convert wrote it (its info says "converted from ...")."""
    from gkd.core.io import json_field_is, refuse_foreign_file

    refuse_foreign_file(out, "--out", json_field_is(
        "info.description", lambda d: isinstance(d, str) and d.startswith("converted from ")))


def _after_convert(out: Path, image_root: Path) -> None:
    from .coco import load_coco

    index = load_coco(out, image_root=image_root)  # the same validation training will do
    click.echo(f"wrote {out}")
    click.echo(format_summary(index))
    where = image_root.resolve()  # absolute: data.images is read relative to data.root otherwise
    click.echo(f"images are relative to {where}: use --images {where} (or data.images={where}), or make a "
               f"dataset folder for gkd run with: gkd data split {out} --images {where} --out DIR")


@data.command("split")
@click.argument("file", type=_PATH_FILE)
@click.option("--out", type=_PATH_DIR, required=True,
              help="Folder for train.json, val.json and the images/ link (the layout gkd run data_root= reads).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of the images that go to val.json.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="The same seed, the same split.")
@click.option("--images", type=_PATH_DIR, default=None,
              help="Folder FILE's file_name entries are relative to [default: 'images' next to FILE if it exists, "
                   "else FILE's folder].")
def split(file: Path, out: Path, val_fraction: float, seed: int, images: Path | None) -> None:
    """Split one COCO JSON into OUT/train.json and OUT/val.json, seeded and stratified by class.

    
    Every image goes with the rarest class it holds, and each class's share of images is split by --val-fraction,
    so rare classes reach both splits. OUT/images links to the image folder: OUT is a complete dataset folder.

    
    Example:
      gkd data convert voc --annotations mine/annotations --images mine/images --out mine/all.json
      gkd data split mine/all.json --out data/mine && gkd run data_root=data/mine
    """
    from gkd.core.logs import setup_console_logging

    from .split import split_coco

    setup_console_logging()
    rep = split_coco(file, out, val_fraction=val_fraction, seed=seed, image_root=images)
    click.echo(f"wrote {out / 'train.json'} ({rep['train']} images) and {out / 'val.json'} ({rep['val']} images); "
               f"{rep['images']} -> {rep['image_root']}")
    for split_name, other, classes in (("train", "val", rep["train_only"]), ("val", "train", rep["val_only"])):
        if classes:
            click.echo(f"warning: {len(classes)} class(es) only in {split_name}.json, none in {other}.json: "
                       f"{', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''} (a class needs boxes on at "
                       f"least two images to reach both splits); {other} has no ground truth for "
                       f"{'them' if len(classes) > 1 else 'it'}", err=True)
    click.echo(f"use it with: gkd run data_root={out}  (or data.root={out} in a training config)")


@data.command("check")
@click.argument("file", type=_PATH_FILE)
@click.option("--images", type=_PATH_DIR, default=None,
              help="Folder the file_name entries are relative to [default: 'images' next to FILE if it exists, "
                   "else FILE's folder].")
@click.option("--no-images", is_flag=True, help="Validate the JSON only; do not open the images.")
def check(file: Path, images: Path | None, no_images: bool) -> None:
    """Validate a COCO instances JSON and its images, and print a summary.

    \b
    Checks: JSON syntax and field types, references to unknown images or categories, duplicate ids, boxes
    outside their image (clipped; dropped and counted when nothing is left), and unless --no-images that every
    image exists, decodes, and has the width/height the JSON says (after EXIF rotation).
    Prints images, instances per class, crowd and dropped boxes, and the box-size distribution.
    Exit status 0 when the dataset is usable, 2 with a one-line error otherwise.

    \b
    Example:
      gkd data check data/synth/train.json
    """
    from gkd.core.logs import setup_console_logging

    from .coco import check_image_files, load_coco

    setup_console_logging()
    index = load_coco(file, image_root=images)
    if not no_images:
        check_image_files(index)
    click.echo(format_summary(index))
    click.echo("images: " + ("all present, decodable and of the stated size" if not no_images else "not checked"))
    objects = sum(a.get("iscrowd", 0) == 0 for anns in index.anns_by_image.values() for a in anns)
    if not objects:  # usable as images to predict on, not to train or evaluate on
        click.echo("warning: no annotated object: nothing to train on or to measure mAP against")
    click.echo("ok")


def format_summary(index) -> str:
    """The human-readable summary of :func:`gkd.kd.data.coco.summarize`."""
    from .coco import summarize

    s = summarize(index)
    w, h = s["image_width"], s["image_height"]
    size = f"{w[0]}x{h[0]}" if w[0] == w[1] and h[0] == h[1] else f"width {w[0]}-{w[1]}, height {h[0]}-{h[1]}"
    lines = [f"{index.path}: {s['images']} images ({size}; {s['images_without_boxes']} without boxes), "
             f"{s['instances']} instances, {s['crowd']} crowd, {s['dropped']} dropped boxes",
             f"image root: {index.image_root}",
             f"{'label':>5}  {'category_id':>11}  {'class':<20} {'instances':>9} {'crowd':>6}"]
    for i, (name, cid) in enumerate(zip(index.classes, index.category_ids)):
        c = s["per_class"][name]
        lines.append(f"{i + 1:>5}  {cid:>11}  {name:<20} {c['instances']:>9} {c['crowd']:>6}")
    lines.append("box sizes (area): " + ", ".join(f"{k} {v}" for k, v in s["sizes"].items()))
    if s["box_side"]:
        b = s["box_side"]
        lines.append(f"box side sqrt(w*h): min {b['min']:.1f}, median {b['median']:.1f}, max {b['max']:.1f} px")
    if s["attributes"]:
        lines.append("attributes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["attributes"].items())))
    return "\n".join(lines)
