"""``gkd predict``: what a model detects on your images, as COCO results and as pictures with the boxes drawn.

Any model ``gkd eval`` and ``gkd export`` deal in: a gkd checkpoint (PyTorch) or an exported ONNX file (onnxruntime),
run through the same runners as parity and benchmarks, so a checkpoint and its export give the same detections.
Images load as everywhere in gkd (EXIF orientation applied, converted to RGB) and are given at their own size: the
model resizes them itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from gkd.kd.errors import GkdError

__all__ = ["predict", "predict_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: one colour per class (cycled), readable on photos
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def _images(inputs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise GkdError(f"{p}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise GkdError(f"{p}: no such image file or folder")
    return files


def _runner(model: Path):
    """``(runner, classes, category_ids)`` for a checkpoint (.pt) or an ONNX file."""
    from .runtime import OrtRunner, TorchRunner

    if model.suffix.lower() == ".onnx":
        from .onnx import read_metadata

        contract = read_metadata(model).get("contract") or {}
        if not contract:
            raise GkdError(f"{model}: no gkd metadata in this ONNX file (export it with gkd export)")
        return OrtRunner(model), contract.get("classes"), contract.get("category_ids")
    from gkd.kd.checkpoint import load_detector

    detector, info = load_detector(model)
    return TorchRunner(detector), info.get("classes"), info.get("category_ids")


def predict_images(model: str | Path, inputs: Sequence[str | Path], out: str | Path, *, score_thresh: float = 0.3,
                   draw: bool = True, image_format: str = "jpg") -> dict[str, Any]:
    """Run ``model`` on every image of ``inputs`` (files or folders); write ``out/detections.json`` (COCO results),
    ``out/images.json`` (the image ids, files and sizes) and, with ``draw``, ``out/drawn/<name>.<image_format>``.

    Returns:
        ``{"images": [...], "detections": [...], "drawn": [paths]}``.
    """
    import numpy as np
    import torch

    from gkd.kd.data.coco import load_image
    from gkd.kd.io import atomic_write_json

    model, out = Path(model), Path(out)
    files = _images([Path(p) for p in inputs])
    runner, classes, category_ids = _runner(model)
    n_classes = len(classes) if classes else None
    images, detections, drawn = [], [], []
    with runner:
        for image_id, path in enumerate(files, start=1):
            pil = load_image(path)
            tensor = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
            result = runner.detect(tensor.float().div_(255.0))
            keep = result["scores"] >= score_thresh
            boxes, scores, labels = result["boxes"][keep], result["scores"][keep], result["labels"][keep]
            images.append({"id": image_id, "file_name": str(path), "width": pil.width, "height": pil.height})
            for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                lab = int(lab)
                det = {"image_id": image_id, "category_id": category_ids[lab - 1] if category_ids else lab,
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
                if classes and n_classes and 1 <= lab <= n_classes:
                    det["class"] = classes[lab - 1]
                detections.append(det)
            if draw:
                drawn.append(_draw(pil, boxes, scores, labels, classes, out / "drawn" / f"{path.stem}.{image_format}"))
    atomic_write_json(out / "detections.json", detections, indent=None)
    atomic_write_json(out / "images.json", {"model": str(model), "score_thresh": score_thresh, "images": images})
    return {"images": images, "detections": detections, "drawn": drawn}


def _draw(pil, boxes, scores, labels, classes, path: Path) -> Path:
    """The image with each box, its class name and score drawn; written atomically."""
    from PIL import ImageDraw

    from gkd.kd.io import atomic_write

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
              help="Output folder [default: predictions/ next to MODEL].")
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
    OUT/images.json (which image each id is) and OUT/drawn/<image>.jpg with the boxes, class names and scores.

    \b
    Examples:
      gkd predict runs/distill/checkpoints/model.pt photos/
      gkd predict runs/default/export/model.int8.onnx street.jpg --score-thresh 0.5
    """
    out = out or model.parent / "predictions"
    rep = predict_images(model, images, out, score_thresh=score_thresh, draw=not no_draw,
                         image_format=image_format.lower())
    click.echo(f"{len(rep['detections'])} detection(s) >= {score_thresh:g} on {len(rep['images'])} image(s): "
               f"{out / 'detections.json'}" + (f", drawn in {out / 'drawn'}" if rep["drawn"] else ""))
