"""``gkd predict``: what a model detects on your images, as COCO results and as pictures with the boxes drawn.

Any model ``gkd eval`` and ``gkd export`` deal in: a gkd checkpoint (PyTorch) or an exported ONNX file (onnxruntime),
opened as ``gkd eval`` opens it (:func:`gkd.export.model_files.open_model`) and run through the same runners as parity
and benchmarks, so a checkpoint and its export give the same detections.
Images load as everywhere in gkd (EXIF orientation applied, converted to RGB) and are given at their own size: the
model resizes them itself.

What it writes, and what it never touches:

- ``OUT/detections.json`` (COCO results), ``OUT/images.json`` (which image each id is, the drawn file of each, the
  model and its SHA-256, the images that could not be read) and ``OUT/drawn/`` (every readable image, with or
  without detections: a user checks the misses too).
- Every drawn file has its own name, also for two inputs called ``x.png`` in two folders or ``x.jpg`` beside
  ``x.png``.
- The outputs of one invocation are written into a hidden staging folder inside ``OUT`` and put in place only
  once every image is done, so an interrupted prediction never leaves drawings of one model beside the JSON of another.
- Only files an earlier ``gkd predict`` made (those its ``images.json`` lists) are replaced or removed; a
  ``detections.json``, ``images.json`` or drawn file of the user's own in ``OUT`` stops the command before any work.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import click

from gkd.core.errors import GkdError

__all__ = ["predict", "predict_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
#: one colour per class (cycled), readable on photos
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
#: ``images.json``'s mark: the outputs it lists were made by gkd predict (and may be replaced by the next one)
MADE_BY = "gkd predict"
_STAGING = ".gkd-predict-"


def _images(inputs: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The image files of ``inputs`` (files, or folders read one level deep), each once, and what was passed over
    (a line per folder: its sub-folders and files that are not images)."""
    files: list[Path] = []
    passed_over: list[str] = []
    for p in inputs:
        if p.is_dir():
            entries = sorted(p.iterdir())
            found = [f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
            if not found:
                raise GkdError(f"{p}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            folders = [f.name for f in entries if f.is_dir()]
            others = [f.name for f in entries if f.is_file() and f not in found]
            if folders or others:
                what = [f"{len(folders)} sub-folder(s) (not searched: give them as inputs)" if folders else "",
                        f"{len(others)} file(s) that are not images ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''})" if others else ""]
                passed_over.append(f"{p}: passed over {' and '.join(w for w in what if w)}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise GkdError(f"{p}: no such image file or folder")
    unique: dict[Path, Path] = {}
    for f in files:  # a file named twice (itself and through its folder) is one image
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), passed_over


def drawn_names(files: Sequence[Path], image_format: str) -> list[str]:
    """One distinct file name per image for ``drawn/``: ``x.<format>``, or, where stems collide (``a/x.png`` and
    ``b/x.png``, or ``x.jpg`` beside ``x.png``), the original name with as many parent folders as tell them apart
    (``a__x.png.<format>``). Compared case-insensitively (a case-insensitive file system would merge ``X`` and
    ``x``)."""
    resolved = [Path(f).resolve() for f in files]
    names = [f"{f.stem}.{image_format}" for f in resolved]
    stems: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        stems.setdefault(n.lower(), []).append(i)
    for group in (g for g in stems.values() if len(g) > 1):
        depth = 0
        while True:
            labels = ["__".join([*resolved[i].parent.parts[len(resolved[i].parent.parts) - depth:], resolved[i].name])
                      for i in group]
            if len({lab.lower() for lab in labels}) == len(group) or depth > max(len(resolved[i].parts) for i in group):
                break
            depth += 1
        for i, lab in zip(group, labels):
            names[i] = f"{lab}.{image_format}"
    taken: set[str] = set()
    for i, n in enumerate(names):  # a disambiguated name may equal another image's plain one: number it
        k, base = 2, n
        while n.lower() in taken:
            stem, _, ext = base.rpartition(".")
            n, k = f"{stem}-{k}.{ext}", k + 1
        names[i] = n
        taken.add(n.lower())
    return names


def _open(model: Path):
    """``(runner, classes, category_ids)`` for a checkpoint (.pt, .pth) or an ONNX file, opened on the CPU as
    ``gkd eval`` opens it; the runner is activated (deactivate it when done).

    Raises:
        GkdError: not a checkpoint or an ONNX file, or an ONNX file whose labels mean nothing known.
    """
    from .integrity import require_label_space
    from .model_files import model_kind, open_model

    kind = model_kind(model)
    if kind not in ("pytorch", "onnx"):
        raise GkdError(f"{model}: gkd predict runs checkpoints (.pt, .pth) and ONNX files (.onnx), not TensorRT "
                       f"engines; gkd eval and gkd bench latency run engines")
    # on the CPU provider asked for here the only possible note is that FP16 times are not FP16 times: not ours
    runner, _ = open_model(model, kind)
    if kind == "pytorch":
        return runner, runner.info.get("classes"), runner.info.get("category_ids")
    from .onnx import read_metadata

    contract = read_metadata(model).get("contract") or {}
    try:
        require_label_space(model, contract.get("classes"), contract.get("category_ids"))
    except GkdError:
        runner.deactivate()
        raise
    return runner, contract.get("classes"), contract.get("category_ids")


def _earlier_outputs(out: Path) -> set[str] | None:
    """The files (relative to ``out``) an earlier gkd predict made there, from its ``images.json``; an empty set
    when there is none; None when ``images.json`` exists but is not gkd predict's."""
    index = out / "images.json"
    if not index.exists():
        return set()
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    images = [im for im in data["images"] if isinstance(im, dict)]
    if data.get("made_by") == MADE_BY:
        drawn = {f"drawn/{im['drawn']}" for im in images if isinstance(im.get("drawn"), str)}
    elif set(data) == {"model", "score_thresh", "images"}:  # written before images.json named its maker
        drawn = {f"drawn/{Path(str(im.get('file_name', ''))).stem}.{ext}" for im in images for ext in ("jpg", "png")}
    else:
        return None
    return {"images.json", "detections.json"} | drawn


def _check_outputs(out: Path, names: Sequence[str]) -> set[str]:
    """Before any work: ``out`` is writable and nothing this prediction writes would replace a file gkd predict did
    not make there. Returns the earlier prediction's files (replaced or removed when this one is put in place)."""
    from gkd.core.io import ensure_writable_folder

    ensure_writable_folder(out, "--out folder")
    earlier = _earlier_outputs(out)
    if earlier is None:
        raise GkdError(f"{out / 'images.json'}: not written by gkd predict; it is left as it is: choose another --out "
                       f"for the predictions")
    mine = ["detections.json", "images.json", *(f"drawn/{n}" for n in names)]
    foreign = [rel for rel in mine if (out / rel).exists() and rel not in earlier]
    if foreign:
        raise GkdError(f"{out / foreign[0]}: exists and was not written by gkd predict"
                       f"{f' ({len(foreign) - 1} more)' if len(foreign) > 1 else ''}; it is left as it is: choose "
                       f"another --out for the predictions")
    if (out / "drawn").exists() and not (out / "drawn").is_dir():
        raise GkdError(f"{out / 'drawn'}: a file where the drawn images' folder goes; choose another --out")
    return earlier


def _remove_abandoned_staging(out: Path) -> None:
    """Staging folders of predictions killed before they finished (their process is gone): ours, never put in
    place."""
    from gkd.core.io import process_alive

    for folder in out.glob(f"{_STAGING}*"):
        pid = folder.name[len(_STAGING):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _put_in_place(staging: Path, out: Path, earlier: set[str], drawn: Sequence[str]) -> None:
    """Replace the earlier prediction's files by this one's: its drawings first, the JSON files last (atomic
    renames), then remove what the earlier one drew and this one did not."""
    if drawn:
        (out / "drawn").mkdir(exist_ok=True)
    for name in drawn:
        os.replace(staging / "drawn" / name, out / "drawn" / name)
    for name in ("detections.json", "images.json"):
        os.replace(staging / name, out / name)
    for rel in sorted(earlier - {"detections.json", "images.json", *(f"drawn/{n}" for n in drawn)}):
        (out / rel).unlink(missing_ok=True)


def predict_images(model: str | Path, inputs: Sequence[str | Path], out: str | Path, *, score_thresh: float = 0.3,
                   draw: bool = True, image_format: str = "jpg", log=print) -> dict[str, Any]:
    """Run ``model`` on every image of ``inputs`` (files or folders); write ``out/detections.json`` (COCO results),
    ``out/images.json`` (the image ids, files, sizes and drawn files; the model and its SHA-256; the images that
    could not be read) and, with ``draw``, ``out/drawn/<name>.<image_format>`` for every readable image.

    Images that cannot be decoded are skipped and listed (as ``gkd eval`` does); none readable is an error.

    Returns:
        ``{"images": [...], "detections": [...], "drawn": [paths], "failed": [...], "passed_over": [...]}``.
    """
    import tempfile

    from gkd.core.io import file_sha256

    model, out = Path(model), Path(out)
    files, passed_over = _images([Path(p) for p in inputs])
    for line in passed_over:
        log(line)
    names = drawn_names(files, image_format) if draw else [""] * len(files)
    earlier = _check_outputs(out, [n for n in names if n])
    runner, classes, category_ids = _open(model)
    _remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=out))
    try:
        try:
            rep = _predict_all(runner, files, names, classes, category_ids, score_thresh, staging, log)
        finally:
            runner.deactivate()  # _open hands it over activated: entering it again would load the model twice
        record = {"made_by": MADE_BY, "model": str(model), "model_sha256": file_sha256(model),
                  "score_thresh": score_thresh, "images": rep["images"], "failed": rep["failed"]}
        _write_json(staging / "detections.json", rep["detections"], indent=None)
        _write_json(staging / "images.json", record, indent=2)
        drawn = [im["drawn"] for im in rep["images"] if im.get("drawn")]
        _put_in_place(staging, out, earlier, drawn)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**rep, "drawn": [out / "drawn" / n for n in drawn], "passed_over": passed_over}


def _write_json(path: Path, obj: Any, indent: int | None) -> None:
    from gkd.core.io import atomic_write_json

    atomic_write_json(path, obj, indent=indent)


def _predict_all(runner, files, names, classes, category_ids, score_thresh, staging: Path, log) -> dict[str, Any]:
    """Detections of every readable image (drawn into ``staging/drawn`` when it has a name); unreadable ones are
    listed in ``failed``."""
    from gkd.kd.data.coco import image_to_tensor, load_image

    n_classes = len(classes) if classes else None
    images, detections, failed = [], [], []
    for image_id, (path, name) in enumerate(zip(files, names), start=1):
        try:
            pil = load_image(path)
        except GkdError as exc:
            failed.append({"file": str(path), "reason": str(exc)})
            log(f"skipped: {exc}")
            continue
        result = runner.detect(image_to_tensor(pil))  # [3, H, W]
        keep = result["scores"] >= score_thresh
        boxes, scores, labels = result["boxes"][keep], result["scores"][keep], result["labels"][keep]
        entry = {"id": image_id, "file_name": str(path), "width": pil.width, "height": pil.height,
                 "detections": int(keep.sum())}
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            lab = int(lab)
            det = {"image_id": image_id, "category_id": category_ids[lab - 1] if category_ids else lab,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
            if classes and n_classes and 1 <= lab <= n_classes:
                det["class"] = classes[lab - 1]
            detections.append(det)
        if name:  # every readable image is drawn, with or without detections: the misses are worth a look too
            _draw(pil, boxes, scores, labels, classes, staging / "drawn" / name)
            entry["drawn"] = name
        images.append(entry)
    if not images:
        raise GkdError(f"none of the {len(files)} image(s) could be read: "
                       + "; ".join(f["reason"] for f in failed[:3]))
    return {"images": images, "detections": detections, "failed": failed}


def _draw(pil, boxes, scores, labels, classes, path: Path) -> Path:
    """The image with each box, its class name and score drawn; written atomically."""
    from PIL import ImageDraw

    from gkd.core.io import atomic_write

    canvas = pil.convert("RGB").copy()
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 300))
    for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        colour = PALETTE[(int(lab) - 1) % len(PALETTE)]
        name = classes[int(lab) - 1] if classes and 1 <= int(lab) <= len(classes) else str(int(lab))
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{name} {s:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        y = max(0.0, y1 - (bottom - top) - 2)
        pen.rectangle([x1, y, x1 + (right - left) + 4, y + (bottom - top) + 2], fill=colour)
        pen.text((x1 + 2, y), text, fill=(0, 0, 0))
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return atomic_write(path, lambda tmp: canvas.save(tmp, format=fmt, quality=92))


@click.command("predict", context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder [default: predictions/ next to MODEL]. Files of your own there are never replaced.")
@click.option("--score-thresh", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Keep (and draw) detections scoring at least this.")
@click.option("--no-draw", is_flag=True, help="Only the JSON files, no drawn images.")
@click.option("--format", "image_format", type=click.Choice(["jpg", "png"], case_sensitive=False), default="jpg",
              show_default=True, help="Format of the drawn images.")
def predict(model: Path, images: tuple[Path, ...], out: Path | None, score_thresh: float, no_draw: bool,
            image_format: str) -> None:
    """Detect objects in IMAGES (files or folders) with MODEL (a gkd checkpoint .pt or an exported .onnx).

    \b
    Writes OUT/detections.json (COCO results: image_id, category_id, bbox [x, y, w, h], score, class),
    OUT/images.json (which image each id is, and its drawn file) and OUT/drawn/<image>.jpg with the boxes, class
    names and scores (every image, also those with no detection). A folder is read one level deep; images that
    cannot be decoded are skipped and listed.
    \b
    Examples:
      gkd predict runs/distill/checkpoints/model.pt photos/
      gkd predict runs/default/export/model.int8.onnx street.jpg --score-thresh 0.5
    """
    out = out or model.parent / "predictions"
    rep = predict_images(model, images, out, score_thresh=score_thresh, draw=not no_draw,
                         image_format=image_format.lower(), log=lambda s: click.echo(s, err=True))
    failed = f"; {len(rep['failed'])} unreadable image(s) skipped (listed in images.json)" if rep["failed"] else ""
    click.echo(f"{len(rep['detections'])} detection(s) >= {score_thresh:g} on {len(rep['images'])} image(s){failed}: "
               f"{out / 'detections.json'}" + (f", drawn in {out / 'drawn'}" if rep["drawn"] else ""))
