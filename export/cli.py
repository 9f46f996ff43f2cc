"""``gkd export``: a checkpoint to ONNX (FP32/FP16/INT8) and TensorRT engines, each run and compared before it is
called good. The work is :func:`gkd.export.pipeline.export_checkpoint`; this module only parses options."""
from __future__ import annotations

from pathlib import Path

import click

__all__ = ["export"]

_PATH = click.Path(path_type=Path)


def _precisions(ctx, param, value: str) -> tuple[str, ...]:
    from .pipeline import PRECISIONS

    items = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in PRECISIONS]
    if bad or not items:
        raise click.BadParameter(f"unknown precision '{bad[0] if bad else value}'; expected a comma-separated list "
                                 f"of {', '.join(PRECISIONS)}")
    return items


@click.command("export", context_settings={"max_content_width": 110})
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--precision", "precisions", default="fp32", show_default=True, callback=_precisions,
              help="Comma-separated precisions to export: fp32, fp16, int8 (FP32 is always written: the others are "
                   "made from it).")
@click.option("--calib-data", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="COCO JSON whose images calibrate INT8 (use the training split). Required for int8.")
@click.option("--val-data", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="COCO JSON whose images (and annotations, for the mAP level) are used for parity; default: the "
                   "calibration data.")
@click.option("--out", type=_PATH, default=Path("export"), show_default=True,
              help="Output folder: model.<precision>.onnx, model.json (pre-processing contract), parity.json/.md, "
                   "export.json (manifest), and model.<precision>.engine(.json) where TensorRT exists.")
@click.option("--opset", type=click.IntRange(16, 20), default=17, show_default=True, help="ONNX opset.")
@click.option("--calib-images", type=click.IntRange(1, None), default=64, show_default=True,
              help="Calibration images (a seeded random subset of --calib-data).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"], case_sensitive=False),
              default="minmax", show_default=True, help="onnxruntime calibration method for activation ranges.")
@click.option("--int8-target", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="With annotated --val-data: INT8 may lose at most (1 - this) of FP32's mAP beyond chance (a paired "
                   "bootstrap over the images); while it loses more, the layers that add the most quantization "
                   "noise are kept in float. 0 disables the search.")
@click.option("--int8-floor", type=click.FloatRange(0, 1), default=0.90, show_default=True,
              help="Share of Conv/Gemm multiply-accumulates that must run in INT8 for the file to be called INT8 "
                   "(read back from the file); below it the export names the float layers and does not verify it.")
@click.option("--int8-format", type=click.Choice(["onnxruntime", "tensorrt"], case_sensitive=False),
              default="onnxruntime", show_default=True,
              help="INT8 Q/DQ format: onnxruntime (uint8 asymmetric activations, int32 bias) or tensorrt (int8 "
                   "symmetric activations, zero point 0, float bias: what TensorRT accepts).")
@click.option("--accuracy-images", type=click.IntRange(1, None), default=500, show_default=True,
              help="The mAP level and the INT8 search use every annotated image of --val-data up to this many.")
@click.option("--static/--no-static", default=True, show_default=True,
              help="Also write the static, TensorRT-ready graph at every precision (model.static-<precision>.onnx: "
                   "fixed-size outputs num_detections / detection_boxes / detection_scores / detection_classes, no "
                   "NonZero, NMS or RoiAlign, INT8 in TensorRT's format); TensorRT engines are built from it.")
@click.option("--speed-rounds", type=click.IntRange(0, None), default=20, show_default=True,
              help="Rounds of the side-by-side INT8 / FP32 latency record in export.json (0: not timed).")
@click.option("--parity-images", type=click.IntRange(1, None), default=16, show_default=True,
              help="Images compared between PyTorch and each exported model.")
@click.option("--atol", type=click.FloatRange(0, None), default=None,
              help="Tensor-level absolute tolerance (boxes in px, scores); default per precision (docs/export.md).")
@click.option("--rtol", type=click.FloatRange(0, None), default=None, help="Tensor-level relative tolerance.")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=None,
              help="Detection level: fraction of reference detections that must be matched (default per precision).")
@click.option("--min-map-ratio", type=click.FloatRange(0, 1), default=None,
              help="mAP level: candidate mAP / reference mAP that must hold (default per precision).")
@click.option("--score-floor", type=click.FloatRange(0, 1), default=None,
              help="Detections scoring below this neither need a match nor count as extra (default 0.3).")
@click.option("--min-shapes", default=None, help="TensorRT profile minimum, trtexec syntax: image:1x3x32x32.")
@click.option("--opt-shapes", default=None, help="TensorRT profile optimum (default: the model's resize size).")
@click.option("--max-shapes", default=None, help="TensorRT profile maximum (default: 4x the model's max_size).")
@click.option("--tensorrt", type=click.Choice(["auto", "on", "off"], case_sensitive=False), default="auto",
              show_default=True, help="Build engines: auto = when TensorRT and a GPU exist; on = fail if they don't.")
@click.option("--workspace-gib", type=click.FloatRange(0.1, None), default=4.0, show_default=True,
              help="TensorRT builder workspace.")
@click.option("--tensorrt-rtx-check", type=click.Choice(["auto", "on", "off"], case_sensitive=False),
              default="auto", show_default=True,
              help="Parse and build each ONNX with TensorRT-RTX (no GPU needed; engines are not run) and record "
                   "which nodes it rejects: auto = when tensorrt-rtx is installed (the trt-rtx extra).")
@click.option("--threads", type=click.IntRange(1, None), default=1, show_default=True,
              help="CPU threads for PyTorch and onnxruntime during parity.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for image subsets.")
def export(checkpoint, precisions, calib_data, val_data, out, opset, calib_images, calib_method, int8_target,
           int8_floor, int8_format, accuracy_images, static, speed_rounds, parity_images, atol, rtol, min_recall,
           min_map_ratio, score_floor, min_shapes, opt_shapes, max_shapes, tensorrt, workspace_gib,
           tensorrt_rtx_check, threads, seed):
    """Export CHECKPOINT (a gkd detector checkpoint) to ONNX and, where available, TensorRT.

    \b
    Each file is run with onnxruntime on real images and compared with the PyTorch checkpoint (tensors and
    matched detections on --parity-images, mAP with its noise on up to --accuracy-images); export.json marks it
    verified only if parity passes, and the command exits with status 1 when any requested file fails (the static
    graph's too). What an INT8 file holds (INT8 and float layers, formats, share of MACs at INT8) is read back from the file.
    \b
    Example:
      gkd export runs/student/checkpoints/model.pt --precision fp32,fp16,int8 \\
          --calib-data data/synth/train.json --val-data data/synth/val.json --out runs/student/export
    """
    from .pipeline import ExportOptions, export_checkpoint, unverified_files
    from .trt import parse_shapes

    # shape syntax errors before the slow work (min <= opt <= max needs the model: checked before the engine build)
    for spec, name in ((min_shapes, "--min-shapes"), (opt_shapes, "--opt-shapes"), (max_shapes, "--max-shapes")):
        parse_shapes(spec, name)
    overrides = {"atol": atol, "rtol": rtol, "min_recall": min_recall, "min_map_ratio": min_map_ratio,
                 "score_floor": score_floor}
    opts = ExportOptions(checkpoint=checkpoint, out=out, precisions=precisions, calib_data=calib_data,
                         val_data=val_data, calib_images=calib_images, calib_method=calib_method.lower(),
                         parity_images=parity_images, opset=opset, min_shapes=min_shapes, opt_shapes=opt_shapes,
                         max_shapes=max_shapes, tolerance_overrides={k: v for k, v in overrides.items()
                                                                     if v is not None},
                         int8_target=int8_target, int8_floor=int8_floor, int8_format=int8_format.lower(),
                         accuracy_images=accuracy_images, static=static, speed_rounds=speed_rounds,
                         tensorrt=tensorrt.lower(), workspace_gib=workspace_gib,
                         tensorrt_rtx=tensorrt_rtx_check.lower(), threads=threads, seed=seed)
    manifest = export_checkpoint(opts, log=lambda s: click.echo(s, err=True))
    failed = unverified_files(manifest)
    if failed:
        click.echo(f"gkd export: parity FAILED for {', '.join(failed)}: these files are NOT verified "
                   f"(details in {out / 'parity.json'})", err=True)
        raise click.exceptions.Exit(1)  # not a usage error (2): the files exist but are not verified
    click.echo(f"gkd export: {', '.join(precisions)} written to {out} and verified against PyTorch")
