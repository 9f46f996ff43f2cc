"""INT8 as explicit Q/DQ ONNX (onnxruntime static quantization) calibrated on real images, with a per-layer
sensitivity search that keeps the costliest layers in FP32 until an accuracy target holds.

Choices (why):

* **QDQ format**, per-channel symmetric INT8 weights, asymmetric UINT8 activations: the format TensorRT 10/11 and
  onnxruntime both consume (TensorRT 11 has no other INT8 path); onnxruntime fuses DQ -> Conv -> Q into QLinearConv
  on the CPU.
* Only the learned layers (:data:`gkd.export.adapters.NETWORK_SCOPES`) are quantized; the geometry (resize, anchors,
  box decoding, RoIAlign, NMS) stays FP32, as in :mod:`gkd.export.fp16`, and so do the last layer of each head
  (:func:`head_output_nodes`), whose outputs are box deltas and class logits.
* Calibration runs the FP32 model on images from the user's dataset (never random tensors) at their real sizes;
  the method (MinMax, Entropy or Percentile) and image count are recorded in the file's metadata.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gkd.kd.errors import GkdError

from ._lazy import lazy_import
from .adapters import INPUT_NAME, NETWORK_SCOPES
from .onnx import load_onnx, read_metadata, save_onnx

__all__ = ["quantize_int8", "search_int8", "rank_sensitivity", "quantizable_nodes", "head_output_nodes", "count_qdq",
           "CALIB_METHODS",
           "INT8_OPS"]

CALIB_METHODS = ("minmax", "entropy", "percentile")
#: op types given Q/DQ: the compute-heavy ones; onnxruntime folds the Relu that follows a quantized Conv
INT8_OPS = ("Conv", "Gemm", "MatMul")


def _reader(images: Sequence[torch.Tensor]):
    """An onnxruntime ``CalibrationDataReader`` over ``[3, H, W]`` images."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Images(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(images):
                return None
            self.i += 1
            return {INPUT_NAME: images[self.i - 1].unsqueeze(0).numpy()}

        def rewind(self):
            self.i = 0

    return _Images()


def quantizable_nodes(model, scopes: tuple[str, ...] = NETWORK_SCOPES, op_types: Sequence[str] = INT8_OPS
                      ) -> list[str]:
    """Names of the nodes that INT8 quantization may touch (learned layers of the given op types)."""
    return [n.name for n in model.graph.node if n.name.startswith(scopes) and n.op_type in op_types]


def head_output_nodes(model, scopes: tuple[str, ...] = NETWORK_SCOPES, op_types: Sequence[str] = INT8_OPS
                      ) -> list[str]:
    """Quantizable nodes whose output leaves the network for the geometry (class logits, box deltas).

    Quantizing them would put their *outputs* on a 256-level grid (the QDQ pattern quantizes a Conv's output for
    fusion): box deltas would move by ~1-2 px and logits by ~0.05. They are kept FP32 by default.
    """
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def leaves_network(tensor: str, seen: set) -> bool:
        """Does ``tensor`` reach the geometry through in-scope data movement (reshape, permute, concat...)?"""
        if tensor in graph_outputs:
            return True
        for r in readers.get(tensor, []):
            if r.op_type in ("Shape", "Size") or r.name in seen:
                continue
            if r.op_type == "RoiAlign" and r.input[0] == tensor:
                continue  # pools feature values (not coordinates): like any other activation
            if not r.name.startswith(scopes):
                return True
            if r.op_type in op_types:
                continue  # feeds another learned layer: an ordinary activation
            seen.add(r.name)
            if any(leaves_network(o, seen) for o in r.output):
                return True
        return False

    return [n.name for n in model.graph.node if n.name.startswith(scopes) and n.op_type in op_types
            and any(leaves_network(o, set()) for o in n.output)]


def count_qdq(model) -> dict[str, int]:
    """Number of QuantizeLinear / DequantizeLinear nodes and INT8 weight initializers in a model."""
    from onnx import TensorProto

    ops = [n.op_type for n in model.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "int8_initializers": sum(i.data_type in (TensorProto.INT8, TensorProto.UINT8)
                                     for i in model.graph.initializer)}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_images: Sequence[torch.Tensor], *,
                  method: str = "minmax", per_channel: bool = True, exclude: Sequence[str] = (),
                  cache_path: str | Path | None = None, metadata: dict[str, Any] | None = None,
                  keep_head_outputs: bool = True) -> dict[str, Any]:
    """Write an explicit Q/DQ INT8 ONNX of ``fp32_path`` (atomically) and return what was done.

    Args:
        fp32_path: the FP32 ONNX from :func:`gkd.export.onnx.export_onnx`.
        out_path: where to write the INT8 ONNX.
        calib_images: ``[3, H, W]`` float32 images in [0, 1] from the calibration dataset.
        method: ``minmax``, ``entropy`` or ``percentile`` (onnxruntime's calibrators).
        per_channel: per-output-channel weight scales (recommended for convolutions).
        exclude: node names kept in FP32 (from :func:`search_int8`).
        keep_head_outputs: keep :func:`head_output_nodes` in FP32 too.
        cache_path: calibration ranges cache (reused when it exists, so a search calibrates once).
        metadata: base gkd metadata to extend and store in the file.

    Returns:
        Info dict: method, image count, quantized/excluded nodes, Q/DQ counts.
    """
    onnx = lazy_import("onnx", "INT8 quantization")
    ort_q = lazy_import("onnxruntime.quantization", "INT8 quantization")
    if method not in CALIB_METHODS:
        raise GkdError(f"calibration method '{method}' is unknown; expected one of {', '.join(CALIB_METHODS)}")
    if not calib_images:
        raise GkdError("INT8 quantization needs calibration images; give --calib-data with at least one image")
    out_path = Path(out_path)
    model = load_onnx(fp32_path)
    heads = head_output_nodes(model) if keep_head_outputs else []
    nodes = [n for n in quantizable_nodes(model) if n not in set(exclude) and n not in set(heads)]
    calib = {"minmax": ort_q.CalibrationMethod.MinMax, "entropy": ort_q.CalibrationMethod.Entropy,
             "percentile": ort_q.CalibrationMethod.Percentile}[method]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gkd-int8-", dir=out_path.parent) as tmp:
        tmp_out = Path(tmp) / "model.int8.onnx"
        quiet = logging.getLogger()  # onnxruntime logs a pre-processing hint on the root logger on every call
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            ort_q.quantize_static(
                str(fp32_path), str(tmp_out), _reader(list(calib_images)), quant_format=ort_q.QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OPS), per_channel=per_channel, reduce_range=False,
                activation_type=ort_q.QuantType.QUInt8, weight_type=ort_q.QuantType.QInt8,
                nodes_to_quantize=nodes, calibrate_method=calib,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                calibration_cache_path=str(cache_path) if cache_path else None)
        except GkdError:
            raise
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GkdError(f"{out_path}: INT8 quantization failed: {msg[:300]}") from None
        finally:
            quiet.setLevel(level)
        qmodel = onnx.load(str(tmp_out))
    info = {"format": "QDQ", "calibration_method": method, "calibration_images": len(calib_images),
            "per_channel": per_channel, "activations": "uint8 asymmetric", "weights": "int8 symmetric",
            "quantized_nodes": len(nodes), "excluded_nodes": sorted(exclude), "head_outputs_fp32": heads,
            **count_qdq(qmodel)}
    meta = dict(metadata if metadata is not None else read_metadata(model))
    meta.update(precision="int8", int8=info)
    save_onnx(qmodel, out_path, meta)
    return info


def _with_outputs(model, names: Sequence[str]):
    """A copy of ``model`` that also outputs the tensors ``names``."""
    import copy

    from onnx import helper

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return m


def _run(model, names: Sequence[str], images: Sequence[torch.Tensor], threads: int) -> list[dict[str, Any]]:
    ort = lazy_import("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [dict(zip(names, sess.run(list(names), {INPUT_NAME: im.unsqueeze(0).numpy()}))) for im in images]


def _sqnr_db(ref, test) -> float:
    import numpy as np

    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    if ref.shape != test.shape:
        return float("nan")
    noise = float(((ref - test) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(max(float((ref ** 2).sum()), 1e-30) / noise)


def rank_sensitivity(fp32_path: str | Path, int8_path: str | Path, images: Sequence[torch.Tensor],
                     threads: int = 1) -> list[dict[str, Any]]:
    """Rank quantized layers by the accuracy they cost, most costly first.

    For each quantized node, the signal-to-quantization-noise ratio (dB) of the INT8 model's tensors against the
    FP32 model's is measured at the node's input and output on real images; the relative noise power the node adds
    (``10^(-SQNR_out/10) - 10^(-SQNR_in/10)``: its input's and weights' quantization, not the error it inherits) is
    its own contribution. Nodes whose tensors differ in shape
    between the two models (per-RoI layers after different proposals) are ranked first: their cost cannot be measured
    that way and the box head is the usual suspect.

    Returns:
        ``[{"node", "op", "sqnr_in_db", "sqnr_out_db", "added_noise"}]`` sorted by decreasing ``added_noise``.
    """
    fp32 = load_onnx(fp32_path)
    int8 = load_onnx(int8_path)
    qnodes = {n.name for n in int8.graph.node}
    layers = [(n.name, n.op_type, n.input[0], n.output[0]) for n in fp32.graph.node
              if n.name in quantizable_nodes(fp32) and n.name in qnodes]
    names = sorted({t for _, _, i, o in layers for t in (i, o)})
    ref = _run(_with_outputs(fp32, names), names, images, threads)
    test = _run(_with_outputs(int8, names), names, images, threads)
    ranked = []
    for node, op, inp, out in layers:
        s_in = [_sqnr_db(r[inp], t[inp]) for r, t in zip(ref, test)]
        s_out = [_sqnr_db(r[out], t[out]) for r, t in zip(ref, test)]
        s_in = [v for v in s_in if not math.isnan(v)]
        s_out = [v for v in s_out if not math.isnan(v)]
        if not s_out:
            ranked.append({"node": node, "op": op, "sqnr_in_db": None, "sqnr_out_db": None, "added_noise": math.inf})
            continue
        si = sum(s_in) / len(s_in) if s_in else math.inf
        so = sum(s_out) / len(s_out)
        added = 10 ** (-so / 10) - (10 ** (-si / 10) if math.isfinite(si) else 0.0)
        ranked.append({"node": node, "op": op, "sqnr_in_db": si if math.isfinite(si) else None, "sqnr_out_db": so,
                       "added_noise": added})
    ranked.sort(key=lambda d: -d["added_noise"])
    return ranked


def search_int8(fp32_path: str | Path, out_path: str | Path, calib_images: Sequence[torch.Tensor],
                evaluate: Callable[[Path], float], reference_score: float, *, target_ratio: float = 0.99,
                method: str = "minmax", per_channel: bool = True, rank_images: int = 4, threads: int = 1,
                metadata: dict[str, Any] | None = None, log: Callable[[str], None] = lambda s: None
                ) -> dict[str, Any]:
    """Quantize; while the INT8 score is below ``target_ratio * reference_score``, keep the most costly layers
    (:func:`rank_sensitivity`) in FP32, doubling their number each round (1, 2, 4, ...), calibrating only once.

    Args:
        fp32_path, out_path, calib_images, method, per_channel: as :func:`quantize_int8`.
        evaluate: ``path -> score`` (e.g. COCO mAP of the ONNX on annotated validation images).
        reference_score: the FP32 score the target is relative to.
        target_ratio: e.g. 0.99 = "at least 99% of FP32" (MLPerf's wording).
        rank_images: calibration images used to rank layers.

    Returns:
        The final :func:`quantize_int8` info plus ``search``: target, rounds (excluded count, score, ratio),
        ``met`` and the excluded layers.
    """
    out_path = Path(out_path)
    target = target_ratio * reference_score
    rounds = []
    with tempfile.TemporaryDirectory(prefix=".gkd-calib-", dir=out_path.parent) as tmp:
        cache = Path(tmp) / "calibration.json"
        info = quantize_int8(fp32_path, out_path, calib_images, method=method, per_channel=per_channel,
                             cache_path=cache, metadata=metadata)
        score = evaluate(out_path)
        rounds.append({"excluded": 0, "score": score})
        log(f"int8 search: all {info['quantized_nodes']} layers INT8 -> {score:.4f} (target {target:.4f})")
        excluded = []
        k = 1
        ranking = (rank_sensitivity(fp32_path, out_path, list(calib_images)[:rank_images], threads)
                   if score < target else [])
        # doubling, and the last round keeps every ranked layer FP32 (then INT8 is FP32): the target is reached
        while score < target and len(excluded) < len(ranking):
            excluded = [r["node"] for r in ranking[:k]]
            info = quantize_int8(fp32_path, out_path, calib_images, method=method, per_channel=per_channel,
                                 exclude=excluded, cache_path=cache, metadata=metadata)
            score = evaluate(out_path)
            rounds.append({"excluded": len(excluded), "score": score})
            log(f"int8 search: {len(excluded)} layer(s) kept FP32 -> {score:.4f}")
            k *= 2
    ratio = score / reference_score if reference_score > 0 else 1.0
    info["search"] = {"target_ratio": target_ratio, "reference_score": reference_score, "final_score": score,
                      "final_ratio": ratio, "met": score >= target, "rounds": rounds,
                      "kept_fp32": [r for r in ranking if r["node"] in set(excluded)]}
    return info
