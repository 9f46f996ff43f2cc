"""``gkd eval MODEL... --data COCO_JSON``: the accuracy of checkpoints, ONNX files and TensorRT engines under one
protocol, with the delta to a reference and a gate.

The protocol (printed with every result, and stored in the JSON):

- images: decoded as the training loader decodes them (EXIF orientation applied, 8-bit RGB), float32 in [0, 1],
  at their original size, batch 1; resize, normalisation, NMS and the mapping back to image pixels happen inside
  the model (for a checkpoint: the same :class:`gkd.export.adapters.ExportWrapper` the export traces), so every
  artifact gets byte-identical inputs. Images that fail to decode are counted, listed and left out for every model.
- score threshold and detections per image: the model's own (from the checkpoint's config, or the contract stored
  in the ONNX metadata / next to the engine), printed per model.
- scorer: COCO bbox evaluation (faster-coco-eval when installed, else pycocotools; the same numbers), ``maxDets``
  raised to the most objects any image holds when that exceeds 100 (``--max-dets`` to set it).
- categories: label ``i`` of the model is its ``category_ids[i-1]``; the dataset's categories must be the model's
  (ids and names), else the model is refused in one line (a mAP in another label space is a wrong number).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from gkd.core.errors import GkdError

from .artifacts import (ModelSpec, Unavailable, check_device_request, check_distinct_files, model_kind, open_runner,
                        runner_label)

__all__ = ["evaluate_models", "label_space", "format_eval_table", "evaluate", "unique_names"]


@dataclass
class LabelSpace:
    classes: list[str] | None
    category_ids: list[int] | None
    score_thresh: float | None
    detections_per_img: int | None


def label_space(spec: ModelSpec, runner: Any) -> LabelSpace:
    """Classes, category ids and post-processing settings of an opened model, read from the model itself."""
    if spec.kind == "pytorch":
        from gkd.export.adapters import preprocess_contract

        info = runner.info
        contract = preprocess_contract(runner.wrapper.model)
        return LabelSpace(info.get("classes"), info.get("category_ids"),
                          contract["in_graph"]["postprocess"]["score_thresh"],
                          contract["in_graph"]["postprocess"]["detections_per_img"])
    contract: dict[str, Any] = {}
    if spec.kind in ("onnx", "openvino"):  # an ONNX file, whichever runtime runs it
        from gkd.export.onnx import read_metadata

        contract = read_metadata(spec.path).get("contract") or {}
    elif spec.kind == "tensorrt":
        from gkd.export.trt import load_stamp

        contract = load_stamp(spec.path).get("contract") or {}
        sidecar = spec.path.parent / "model.json"
        if not contract and sidecar.is_file():
            contract = json.loads(sidecar.read_text()).get("contract") or {}
    post = (contract.get("in_graph") or {}).get("postprocess") or {}
    return LabelSpace(contract.get("classes"), contract.get("category_ids"), post.get("score_thresh"),
                      post.get("detections_per_img"))


def grouped(group: str, label: str) -> str:
    """``distilled/onnxruntime-int8`` (or the bare label when there is no group)."""
    return f"{group}/{label}" if group else label


def unique_names(names: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Table labels, one per model and never two alike: ``onnxruntime-int8``, or, when models share a label, each
    with the shortest tail of its path that tells them apart: ``pytorch-fp32 (a/checkpoints/model.pt)`` and
    ``pytorch-fp32 (b/checkpoints/model.pt)``. Results are keyed by these labels, so two files of the same name
    (two runs' ``best.pt``) stay two rows.

    Raises:
        GkdError: the same file given twice.
    """
    resolved = check_distinct_files(paths)
    out = list(names)
    for name in set(names):
        group = [i for i, n in enumerate(names) if n == name]
        if len(group) == 1:
            continue
        depth = 1
        while len({resolved[i].parts[-depth:] for i in group}) < len(group):
            depth += 1
        for i in group:
            out[i] = f"{name} ({Path(*resolved[i].parts[-depth:]).as_posix()})"
    return out


def _check_labels(spec: ModelSpec, labels: LabelSpace, images) -> list[int]:
    from gkd.export.integrity import require_label_space

    what = {"pytorch": "checkpoint", "tensorrt": "engine"}.get(spec.kind, "ONNX model")
    require_label_space(spec.path, labels.classes, labels.category_ids, what)
    ids = labels.category_ids or images.category_ids
    same_ids = [int(c) for c in ids] == [int(c) for c in images.category_ids]
    same_names = labels.classes is None or list(labels.classes) == list(images.classes)
    if not (same_ids and same_names):
        raise GkdError(f"{images.path}: categories {list(images.classes)} (ids {list(images.category_ids)}) do not "
                       f"match the {what}'s classes {labels.classes} (ids {list(ids)}) of {spec.path}; evaluate it "
                       f"on data labelled with its classes")
    return [int(c) for c in ids]


def evaluate_models(models: Sequence[str | Path], data: str | Path, *, image_root: str | Path | None = None,
                    max_dets: int | None = None, device: str = "cpu", provider: str | None = None,
                    threads: int = 1, limit: int | None = None, backend: str | None = None,
                    groups: Sequence[str] | None = None, subsets: Sequence[str] = (),
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model on the same decoded images; the first evaluated model is the reference for deltas.

    ``groups`` (one per model) prefixes the labels (``baseline/onnxruntime-int8``); ``subsets`` names annotation
    attributes (``small``, ``occluded``, ``blurred``: the synthetic data's hard cases) to score each model on
    too, from the same detections (COCO metrics on the ground truth whose ``attributes[name]`` is true).

    Returns the report: ``protocol``, ``images`` (count, failed), ``models`` (name -> path, kind, provider,
    precision, metrics, per_class, subsets, detections, delta_map), ``skipped`` (name -> why).
    """
    from gkd.export.images import load_image_set
    from gkd.export.parity import collect_outputs
    from gkd.kd.evaluation import CocoEvaluator, default_backend, max_objects_per_image

    specs = [ModelSpec(Path(m), model_kind(m)) for m in models]  # every path checked before any work
    check_distinct_files([s.path for s in specs])
    images = load_image_set(data, limit=limit, image_root=image_root, skip_unreadable=True)
    if images.failed:
        log(f"{len(images.failed)} of {len(images.failed) + len(images.images)} image(s) could not be decoded and "
            f"are left out for every model: " + "; ".join(why for _, why in images.failed[:5])
            + (" ..." if len(images.failed) > 5 else ""))
    if not images.images:
        raise GkdError(f"{data}: none of its images could be decoded")
    if not images.has_annotations:
        raise GkdError(f"{data}: its images hold no annotations; COCO mAP needs ground truth")
    most = max_objects_per_image(images.gt_json)
    cap = max_dets or max(100, most)
    backend = backend or default_backend()
    protocol = {
        "input": "decoded RGB float32 [1, 3, H, W] in [0, 1], original size, batch 1 (resize/normalise/NMS in the "
                 "model)",
        "scorer": backend, "iou_type": "bbox", "max_dets": cap, "most_objects_per_image": most,
        "category_mapping": "label i -> the model's category_ids[i-1]; must equal the dataset's categories",
        "images": len(images.images), "data": str(data), "device": device, "threads": threads,
    }
    log(f"protocol: {len(images.images)} image(s) of {data}, batch 1, original size; scorer {backend}, "
        f"maxDets {cap}" + (f" (raised: an image holds {most} objects)" if cap > 100 else "") + f"; device {device}")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    names: list[str] = []
    opened = []
    for i, spec in enumerate(specs):
        try:
            runner, note = open_runner(spec, device=device, provider=provider, threads=threads)
        except Unavailable as exc:
            skipped[str(spec.path)] = str(exc)
            log(f"skipped: {exc}")
            continue
        if note:
            log(note)
        opened.append((spec, runner, note))
        names.append(grouped(groups[i] if groups else "", runner_label(spec, runner)))
    try:
        labels_by_name = unique_names(names, [s.path for s, _, _ in opened])
        ref_map = None
        for name, (spec, runner, note) in zip(labels_by_name, opened):
            labels = label_space(spec, runner)
            ids = _check_labels(spec, labels, images)
            log(f"eval: {name} ({spec.path}) on {runner.provider}, score_thresh {labels.score_thresh}, "
                f"{labels.detections_per_img} detections/image")
            outs = collect_outputs(runner, images.images)
            ev = CocoEvaluator(images.gt_json, ids, cap, backend=backend)
            ev.process([{"image_id": o["image_id"]} for o in outs], outs)
            metrics = ev.evaluate()
            per_class = {cls: ev.per_class.get(cid, -1.0) for cls, cid in zip(images.classes, ids)}
            hard = {attr: ev.evaluate(ann_filter=lambda a, k=attr: bool((a.get("attributes") or {}).get(k)))
                    for attr in subsets}
            if ref_map is None:
                ref_map = metrics["bbox_mAP"]
            results[name] = {"path": str(spec.path), "kind": spec.kind, "provider": runner.provider,
                             "precision": runner.precision, "note": note, "score_thresh": labels.score_thresh,
                             "detections_per_img": labels.detections_per_img, "metrics": metrics,
                             "per_class_AP": per_class, "subsets": hard, "detections": ev.detections,
                             "delta_map": metrics["bbox_mAP"] - ref_map,
                             "relative_map": metrics["bbox_mAP"] / ref_map if ref_map and ref_map > 0 else None}
    finally:  # closed even when a later model is refused (its label space, say)
        for _, runner, _ in opened:
            runner.__exit__(None, None, None)
    if not results:
        raise GkdError("no model could be evaluated here: " + "; ".join(skipped.values()))
    return {"report": "eval", "report_version": 1, "protocol": protocol,
            "images": {"evaluated": len(images.images), "failed": [{"file": f, "reason": r} for f, r in images.failed]},
            "reference": next(iter(results)), "models": results, "skipped": skipped}


def format_eval_table(rep: dict[str, Any]) -> str:
    """Markdown: the 12 COCO numbers' headline six, the delta to the reference, then per-class AP."""
    ref = rep["reference"]
    lines = [f"| model | runs on | mAP | AP50 | AP75 | APs | APm | APl | AR100 | delta vs {ref} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rep["models"].items():
        m = r["metrics"]
        rel = f" ({r['relative_map']:.1%})" if r["relative_map"] is not None else ""
        lines.append(f"| {name} | {r['provider']} | {m['bbox_mAP']:.4f} | {m['bbox_mAP_50']:.4f} | "
                     f"{m['bbox_mAP_75']:.4f} | {m['bbox_mAP_s']:.4f} | {m['bbox_mAP_m']:.4f} | {m['bbox_mAP_l']:.4f} "
                     f"| {m['bbox_AR_100']:.4f} | {r['delta_map']:+.4f}{rel} |")
    for path, why in rep["skipped"].items():
        lines.append(f"| {path} | skipped: {why} | | | | | | | | |")
    classes = list(next(iter(rep["models"].values()))["per_class_AP"])
    lines += ["", "| per-class AP | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, r in rep["models"].items():
        lines.append(f"| {name} | " + " | ".join("-" if v < 0 else f"{v:.4f}" for v in r["per_class_AP"].values())
                     + " |")
    return "\n".join(lines)


def default_eval_dir(first: Path) -> Path:
    """``<run>/eval/<model stem>`` for a model in ``<run>/checkpoints/``, else ``eval/<stem>`` beside it."""
    parent = first.parent.parent if first.parent.name == "checkpoints" else first.parent
    return parent / "eval" / first.stem


#: the files ``gkd eval`` writes into its folder (besides ``detections.<i>.<file>.json`` of the other models)
EVAL_FILES = ("metrics.json", "detections.json", "eval.json", "eval.md")


def _earlier_eval_files(out: Path) -> set[str] | None:
    """The files an earlier ``gkd eval`` wrote in ``out`` (from its eval.json), an empty set when there is no
    eval.json, None when eval.json is not gkd eval's."""
    index = out / "eval.json"
    if not index.exists():
        return set()
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("report") != "eval":
        return None
    listed = data.get("files")
    if isinstance(listed, list):
        return {str(f) for f in listed}
    return set(EVAL_FILES) | {p.name for p in out.glob("detections.*.json")}  # an eval.json that listed none


def check_eval_out(out: Path) -> set[str]:
    """Before any work: ``out`` is writable, and holds no metrics.json, detections.json, eval.json or eval.md that
    gkd eval did not write. Returns the earlier evaluation's files (replaced, or removed when not written again).

    Raises:
        GkdError: naming the first file of the user's own that the evaluation would replace.
    """
    from gkd.core.io import ensure_writable_folder

    ensure_writable_folder(out, "--out folder")
    earlier = _earlier_eval_files(out)
    if earlier is None:
        raise GkdError(f"{out / 'eval.json'}: not written by gkd eval; it is left as it is: choose another --out")
    foreign = [name for name in EVAL_FILES if (out / name).exists() and name not in earlier]
    if foreign:
        raise GkdError(f"{out / foreign[0]}: exists and was not written by gkd eval; it is left as it is: choose "
                       f"another --out")
    return earlier


def write_eval_outputs(rep: dict[str, Any], first: Path, data: Path, out: Path | None = None) -> Path:
    """metrics.json + detections.json of the reference (the single-model layout), detections.<i>.<file>.json of
    the others, eval.json (everything but detections, and the files written) and eval.md; returns the folder.
    Files an earlier evaluation wrote there and this one does not are removed (two evaluations never mix)."""
    from gkd.core.io import atomic_write_json, atomic_write_text

    out = Path(out) if out is not None else default_eval_dir(Path(first))
    earlier = check_eval_out(out)
    ref = rep["models"][rep["reference"]]
    # the reference is the first model evaluated (a first model skipped here, e.g. an engine, is not it)
    atomic_write_json(out / "metrics.json", {"checkpoint": ref["path"], "model": rep["reference"], "data": str(data),
                                             **ref["metrics"]})
    atomic_write_json(out / "detections.json", ref["detections"], indent=None)
    written = list(EVAL_FILES)
    for i, (name, r) in enumerate(rep["models"].items()):
        if i:
            extra = f"detections.{i}.{Path(r['path']).name}.json"
            atomic_write_json(out / extra, r["detections"], indent=None)
            written.append(extra)
    slim = {**rep, "models": {n: {k: v for k, v in r.items() if k != "detections"} for n, r in rep["models"].items()},
            "files": written}
    atomic_write_json(out / "eval.json", slim)
    atomic_write_text(out / "eval.md", format_eval_table(rep) + "\n")
    for name in sorted(earlier - set(written)):
        if "/" not in name and name.startswith("detections."):
            (out / name).unlink(missing_ok=True)
    return out


def gate_failures(rep: dict[str, Any], min_relative_map: float | None) -> list[str]:
    """One line per model whose mAP is below ``min_relative_map`` x the reference's (empty: all pass)."""
    if min_relative_map is None:
        return []
    ref = rep["models"][rep["reference"]]["metrics"]["bbox_mAP"]
    out = []
    for name, r in rep["models"].items():
        m = r["metrics"]["bbox_mAP"]
        if ref <= 0:
            out.append(f"{name}: the reference {rep['reference']} has mAP {ref:.4f}; a relative gate on a model "
                       f"that detects nothing proves nothing")
        elif m < min_relative_map * ref:
            out.append(f"{name}: mAP {m:.4f} is {m / ref:.1%} of {rep['reference']}'s {ref:.4f}, below the gate "
                       f"--min-relative-map {min_relative_map}")
    return out


@click.command("eval", context_settings={"max_content_width": 110})
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="COCO instances JSON to evaluate on (e.g. data/synth/val.json).")
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder the JSON's file_name entries are relative to [default: 'images' next to the JSON].")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where metrics.json, eval.json and the detections go [default: eval/ next to the first model's "
                   "run].")
@click.option("--max-dets", type=click.IntRange(1), default=None,
              help="pycocotools maxDets for AP [default: 100, raised to the most objects any image holds].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"], case_sensitive=False), default="auto",
              show_default=True, help="Where checkpoints run; ONNX models use the matching onnxruntime provider.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="onnxruntime execution provider for ONNX models [default: from --device].")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="CPU threads per model.")
@click.option("--min-relative-map", type=click.FloatRange(0, 10), default=None,
              help="Exit 1 when a model's mAP is below this fraction of the reference's (the first model), e.g. 0.99.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate on this many images (seeded subset).")
@click.option("--no-progress", is_flag=True, hidden=True)
def evaluate(models, data, images, out, max_dets, device, provider, threads, min_relative_map, limit, no_progress):
    """Evaluate MODELS (checkpoints .pt, ONNX files, TensorRT engines) on a COCO-format dataset, one protocol.

    Prints the protocol, the 12 COCO box metrics of every model (mmdet names: bbox_mAP, bbox_mAP_50, ...), the
    delta to the first model and per-class AP; writes metrics.json (the first model's), eval.json (all of them)
    and detections.json per model (COCO results format).

    \b
    Examples:
      gkd eval runs/student/checkpoints/best.pt --data data/synth/val.json
      gkd eval student.pt export/model.fp32.onnx export/model.int8.onnx --data val.json --min-relative-map 0.99
    """
    import torch

    from gkd.core.logs import setup_console_logging
    from gkd.kd.evaluation import STAT_NAMES

    setup_console_logging()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_request(device, provider)
    out = Path(out) if out is not None else default_eval_dir(Path(models[0]))
    check_eval_out(out)  # an unwritable --out, or files of the user's own there, stop it before the work
    rep = evaluate_models(models, data, image_root=images, max_dets=max_dets, device=device, provider=provider,
                          threads=threads, limit=limit, log=lambda s: click.echo(s, err=True))
    out = write_eval_outputs(rep, models[0], data, out)
    ref = rep["models"][rep["reference"]]
    for name in STAT_NAMES:
        click.echo(f"{name:<13} {ref['metrics'][name]:.4f}")
    click.echo(format_eval_table(rep))
    click.echo(f"wrote {out / 'detections.json'}, {out / 'metrics.json'} and {out / 'eval.json'}")
    failures = gate_failures(rep, min_relative_map)
    for line in failures:
        click.echo(f"gkd: gate failed: {line}", err=True)
    if failures:
        raise click.exceptions.Exit(1)  # a failed gate, not a usage error (2)
