"""INT8 as explicit Q/DQ ONNX (onnxruntime static quantization) calibrated on real images, with a per-layer
sensitivity search that keeps a layer in float only when the evidence says INT8 costs accuracy.

Choices (why):

* **QDQ format** with per-channel symmetric INT8 weights, in one of two activation formats (:data:`INT8_FORMATS`):
  ``onnxruntime`` (asymmetric UINT8 activations, INT32 bias: what onnxruntime's CPU kernels run fastest) or
  ``tensorrt`` (symmetric INT8 activations with zero point 0, float bias: the only INT8 TensorRT 10/11 accepts).
* Only the learned layers (:data:`gkd.export.adapters.NETWORK_SCOPES`) are quantized; the geometry (resize, anchors,
  box decoding, RoIAlign, NMS) stays FP32, as in :mod:`gkd.export.fp16`, and so do the last layer of each head
  (:func:`head_output_nodes`), whose outputs are box deltas and class logits.
* Calibration runs the FP32 model on images from the user's dataset (never random tensors) at their real sizes;
  the method (MinMax, Entropy or Percentile) and image count are recorded in the file's metadata.
* What the written file holds (which layers are INT8, the formats, the share of multiply-accumulates at INT8) is
  read back from it (:mod:`gkd.export.int8_record`) and recorded; the request is never taken for the result.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gkd.core.errors import GkdError

from ._lazy import lazy_import
from .adapters import INPUT_NAME, NETWORK_SCOPES
from .int8_record import INT8_MAC_FLOOR, activation_qparams, read_int8_record
from .onnx import load_onnx, read_metadata, save_onnx

__all__ = ["quantize_int8", "search_int8", "learned_scales", "rank_sensitivity", "quantizable_nodes",
           "head_output_nodes", "count_qdq",
           "CALIB_METHODS", "INT8_OPS", "INT8_FORMATS"]

CALIB_METHODS = ("minmax", "entropy", "percentile")
#: op types given Q/DQ: the compute-heavy ones; onnxruntime folds the Relu that follows a quantized Conv
INT8_OPS = ("Conv", "Gemm", "MatMul")
#: the INT8 formats, named by the runtime they are for: activation type and symmetry, and whether the bias is
#: quantized (TensorRT rejects an INT32-bias DequantizeLinear and any non-zero zero point)
INT8_FORMATS = {
    "onnxruntime": {"activations": "uint8 asymmetric", "activation_type": "QUInt8", "activation_symmetric": False,
                    "quantize_bias": True},
    "tensorrt": {"activations": "int8 symmetric (zero point 0)", "activation_type": "QInt8",
                 "activation_symmetric": True, "quantize_bias": False},
}


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
                  keep_head_outputs: bool = True, int8_format: str = "onnxruntime",
                  count_image: torch.Tensor | None = None, floor: float = INT8_MAC_FLOOR,
                  scopes: tuple[str, ...] = NETWORK_SCOPES, head_outputs: Sequence[str] | None = None,
                  learned_from=None) -> dict[str, Any]:
    """Write an explicit Q/DQ INT8 ONNX of ``fp32_path`` (atomically) and return what the written file holds.

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
        int8_format: a key of :data:`INT8_FORMATS`.
        count_image: ``[3, H, W]``: the image multiply-accumulates are counted on (default: the first calibration
            image).
        floor: the share of MACs at INT8 from which the file is INT8 (else its metadata says ``mixed``).
        scopes: node-name prefixes of the learned layers (the static graph's are
            :data:`gkd.export.static_graph.STATIC_SCOPES`).
        head_outputs: the head-output layers to keep float (None: found by :func:`head_output_nodes`).
        learned_from: a quantization-aware detector (:mod:`gkd.kd.fake_quant`): the file takes the activation scales
            it learned (:func:`learned_scales`), not calibrated ones, and only its quantized layers' inputs are
            quantized (no Q/DQ on layer outputs), which is the arithmetic it trained with. ``calib_images`` then
            only satisfy onnxruntime's API (its ranges are replaced; one image is used).

    Returns:
        The request (calibration, format, excluded layers) under ``"request"`` and everything else read back from the
        written file (:func:`gkd.export.int8_record.read_int8_record`): which layers are INT8 and which float, the
        formats, the INT8 share of weights and MACs, ``is_int8``.
    """
    onnx = lazy_import("onnx", "INT8 quantization")
    ort_q = lazy_import("onnxruntime.quantization", "INT8 quantization")
    if method not in CALIB_METHODS:
        raise GkdError(f"calibration method '{method}' is unknown; expected one of {', '.join(CALIB_METHODS)}")
    if int8_format not in INT8_FORMATS:
        raise GkdError(f"INT8 format '{int8_format}' is unknown; expected one of {', '.join(INT8_FORMATS)}")
    if not calib_images:
        raise GkdError("INT8 quantization needs calibration images; give --calib-data with at least one image")
    fmt = INT8_FORMATS[int8_format]
    out_path = Path(out_path)
    model = load_onnx(fp32_path)
    heads = (list(head_outputs) if head_outputs is not None else head_output_nodes(model, scopes)
             ) if keep_head_outputs else []
    nodes = [n for n in quantizable_nodes(model, scopes) if n not in set(exclude) and n not in set(heads)]
    learned = None
    extra = {}
    if learned_from is not None:
        learned = learned_scales(model, learned_from, nodes)
        extra = {"OpTypesToExcludeOutputQuantization": list(INT8_OPS)}
        calib_images = list(calib_images)[:1]
    calib = {"minmax": ort_q.CalibrationMethod.MinMax, "entropy": ort_q.CalibrationMethod.Entropy,
             "percentile": ort_q.CalibrationMethod.Percentile}[method]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not nodes:
        # onnxruntime reads an empty nodes_to_quantize as "every node": with nothing left to quantize the file is
        # the FP32 graph, and its record says so
        qmodel = model
    else:
        with tempfile.TemporaryDirectory(prefix=".gkd-int8-", dir=out_path.parent) as tmp:
            tmp_out = Path(tmp) / "model.int8.onnx"
            quiet = logging.getLogger()  # onnxruntime logs a pre-processing hint on the root logger on every call
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                ort_q.quantize_static(
                    str(fp32_path), str(tmp_out), _reader(list(calib_images)), quant_format=ort_q.QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OPS), per_channel=per_channel, reduce_range=False,
                    activation_type=getattr(ort_q.QuantType, fmt["activation_type"]),
                    weight_type=ort_q.QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=calib,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": fmt["activation_symmetric"],
                                   "QuantizeBias": fmt["quantize_bias"], **extra},
                    calibration_cache_path=str(cache_path) if cache_path else None)
            except GkdError:
                raise
            except OSError as exc:
                raise GkdError(f"{out_path}: INT8 quantization could not write its files: {exc.strerror or exc}"
                               ) from None
            except Exception as exc:
                from gkd.core.io import nearly_full

                if nearly_full(out_path.parent):  # onnxruntime reports a truncated write as a corrupt protobuf
                    raise GkdError(f"{out_path}: No space left on device during INT8 quantization (nothing was "
                                   f"kept); free some space and run the command again") from None
                msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GkdError(f"{out_path}: INT8 quantization failed: {msg[:300]}") from None
            finally:
                quiet.setLevel(level)
            qmodel = onnx.load(str(tmp_out))
            if learned is not None:
                _apply_learned(qmodel, learned)
    image = count_image if count_image is not None else list(calib_images)[0]
    record = read_int8_record(qmodel, image, floor=floor)
    if learned is not None:  # read back: the file holds the trained scales, nothing recalibrated
        written = activation_qparams(qmodel)
        diff = max((abs(written[t][0] - s) / s + abs(written[t][1] - z) for t, (s, z) in learned.items()
                    if t in written), default=0.0)
        if set(written) != set(learned) or diff > 1e-6:
            raise GkdError(f"{out_path}: the written INT8 file does not hold the learned scales (tensors "
                           f"{len(written)} vs {len(learned)}, largest relative difference {diff:.2g})")
        record["learned_scales"] = {"tensors": len(written), "max_relative_difference": diff}
    request = {"format": "QDQ", "int8_format": int8_format,
               "scales": "learned in quantization-aware training" if learned is not None else "calibrated",
               "calibration_method": None if learned is not None else method,
               "calibration_images": 0 if learned is not None else len(calib_images), "per_channel": per_channel,
               "excluded": sorted(exclude),
               "head_outputs_fp32": heads, "asked_to_quantize": len(nodes)}
    info = {**record, "request": request}
    meta = dict(metadata if metadata is not None else read_metadata(model))
    meta.update(precision="int8" if record["is_int8"] else "mixed", int8={k: v for k, v in info.items()
                                                                          if k != "layer_macs"})
    save_onnx(qmodel, out_path, meta)
    return info


def learned_scales(model, detector, nodes: Sequence[str]) -> dict[str, tuple[float, int]]:
    """The activation scales a quantization-aware detector learned, by the ONNX tensor each applies to.

    Each node of ``nodes`` (quantizable layers of the exported ``model``) is traced back to its detector layer and
    call (:func:`gkd.kd.fake_quant.resolve_onnx_layer`); its input tensor gets that point's ``(scale, zero point)``.

    Raises:
        GkdError: a node the training did not quantize, a tensor two trained scales claim, or a trained point that no
            node of the file reads (the file would not compute what the student trained to compute).
    """
    from gkd.kd.fake_quant import fake_quant_state, resolve_onnx_layer

    state = fake_quant_state(detector)
    if state is None:
        raise GkdError("learned INT8 scales: the checkpoint is not a quantization-aware student")
    by_name = {n.name: n for n in model.graph.node}
    out: dict[str, tuple[float, int]] = {}
    owner: dict[str, int] = {}
    used = set()
    for name in nodes:
        point = resolve_onnx_layer(name, detector)
        i = state.index.get(point)
        if i is None:
            raise GkdError(f"learned INT8 scales: ONNX node {name} ({point[0]}, call {point[1]}) was not quantized in "
                           f"training")
        tensor = by_name[name].input[0]
        if owner.setdefault(tensor, i) != i:
            raise GkdError(f"learned INT8 scales: tensor {tensor} is read by layers trained with different scales")
        out[tensor] = (float(state.scale[i].detach()), int(state.zero_point[i]))
        used.add(i)
    missing = [state.points[i][0] for i in range(len(state.points)) if i not in used]
    if missing:
        raise GkdError(f"learned INT8 scales: {len(missing)} trained point(s) have no layer in the file, e.g. "
                       f"{missing[0][0]} call {missing[0][1]}")
    return out


def _apply_learned(qmodel, learned: dict[str, tuple[float, int]]) -> None:
    """Set every activation QuantizeLinear / DequantizeLinear pair of ``qmodel`` to the learned scale and zero point
    of its tensor, and route the readers of the dequantized tensor that are not quantized layers back to the float
    tensor (training quantized a layer's input for that layer only)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    prod = {o: n for n in qmodel.graph.node for o in n.output}
    qlayers = set()
    for n in qmodel.graph.node:
        if n.op_type in INT8_OPS and n.input and n.input[0] in prod and prod[n.input[0]].op_type == "DequantizeLinear":
            qlayers.add(n.name)
    done = set()
    for q in list(qmodel.graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        tensor = q.input[0]
        if tensor not in learned:
            raise GkdError(f"learned INT8 scales: the quantizer put a Q/DQ pair on tensor {tensor}, which no trained "
                           f"layer reads")
        scale, zp = learned[tensor]
        for name, value in ((q.input[1], np.float32(scale)), (q.input[2], zp)):
            old = numpy_helper.to_array(inits[name])
            new = numpy_helper.from_array(np.asarray(value, dtype=old.dtype).reshape(old.shape), name)
            inits[name].CopyFrom(new)
        done.add(tensor)
        for dq in [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and q.output[0] in n.input]:
            for reader in qmodel.graph.node:
                if reader.name in qlayers:
                    continue
                for k, inp in enumerate(reader.input):
                    if inp == dq.output[0]:
                        reader.input[k] = tensor
    missing = sorted(set(learned) - done)
    if missing:
        raise GkdError(f"learned INT8 scales: {len(missing)} trained tensor(s) were not quantized, e.g. {missing[0]}")


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
                     threads: int = 1, scopes: tuple[str, ...] = NETWORK_SCOPES) -> list[dict[str, Any]]:
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
    eligible = set(quantizable_nodes(fp32, scopes))
    layers = [(n.name, n.op_type, n.input[0], n.output[0]) for n in fp32.graph.node
              if n.name in eligible and n.name in qnodes]
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


def _shares(macs: dict[str, int], int8_layers: Sequence[str], kept_float: Sequence[str]) -> float:
    """The share of MACs at INT8 when ``kept_float`` of the ``int8_layers`` go back to float."""
    total = sum(macs.values())
    kept = set(kept_float)
    return sum(macs[n] for n in int8_layers if n not in kept) / total if total else 0.0


def search_int8(fp32_path: str | Path, out_path: str | Path, calib_images: Sequence[torch.Tensor],
                compare: Callable[[Path], dict[str, Any]], *, method: str = "minmax", per_channel: bool = True,
                rank_images: int = 8, threads: int = 1, metadata: dict[str, Any] | None = None,
                int8_format: str = "onnxruntime", floor: float = INT8_MAC_FLOOR,
                count_image: torch.Tensor | None = None, log: Callable[[str], None] = lambda s: None,
                scopes: tuple[str, ...] = NETWORK_SCOPES, head_outputs: Sequence[str] | None = None
                ) -> dict[str, Any]:
    """Quantize every eligible layer; keep layers in float only while the evidence says INT8 costs accuracy.

    The procedure is monotone and calibrates once: the layers are ranked by the quantization noise each adds
    (:func:`rank_sensitivity`, on ``rank_images`` calibration images; recorded whatever happens), and while
    ``compare`` fails the written file, the 1, 2, 4, ... most sensitive layers (each set holding the one before)
    are kept in float. A set that would leave less than ``floor`` of the multiply-accumulates at INT8 is not tried:
    the largest set within the floor is tried last, and if that still fails, the search stops, names the layers
    that block INT8, and the file is not verified.

    Args:
        fp32_path, out_path, calib_images, method, per_channel, int8_format, count_image, scopes, head_outputs: as
            :func:`quantize_int8`.
        compare: ``path -> {"passed": bool, ...}``: the accuracy verdict of an INT8 file against FP32, which must
            never fail a model on a difference smaller than its own noise (e.g.
            :func:`gkd.export.parity.map_comparison`: a paired bootstrap of the mAP difference).
        floor: the INT8 share of Conv/Gemm multiply-accumulates below which the model is not INT8.

    Returns:
        The final :func:`quantize_int8` info plus ``search``: every round (layers kept float, MAC share, the
        verdict), ``met``, the layers kept float, the per-layer ``sensitivity`` and, when the floor stopped it,
        ``blocking``.
    """
    out_path = Path(out_path)
    kw = dict(method=method, per_channel=per_channel, metadata=metadata, int8_format=int8_format,
              count_image=count_image, floor=floor, scopes=scopes, head_outputs=head_outputs)
    rounds = []

    def attempt(kept: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        info = quantize_int8(fp32_path, out_path, calib_images, exclude=kept, cache_path=cache, **kw)
        verdict = compare(out_path)
        rounds.append({"kept_float": len(kept), "int8_layers": info["counts"]["int8"],
                       "macs_int8_share": info["macs_int8_share"], "verdict": verdict})
        log(f"int8 search: {len(kept)} layer(s) kept float, {info['counts']['int8']} INT8 "
            f"({_pct(info['macs_int8_share'])} of MACs) -> {verdict.get('summary', verdict['passed'])}")
        return info, verdict

    blocking: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".gkd-calib-", dir=out_path.parent) as tmp:
        cache = Path(tmp) / "calibration.json"
        info, verdict = attempt([])
        int8_layers = list(info["layers"]["int8"])
        ranking = rank_sensitivity(fp32_path, out_path, list(calib_images)[:rank_images], threads, scopes)
        macs = info["layer_macs"] or {}
        for r in ranking:
            r["macs"] = macs.get(r["node"])
        ranked = [r["node"] for r in ranking if r["node"] in set(int8_layers)]
        kept: list[str] = []
        k = 1
        while not verdict["passed"] and ranked:
            within = [j for j in range(1, len(ranked) + 1) if _shares(macs, int8_layers, ranked[:j]) >= floor]
            most = max(within, default=0)
            if most <= len(kept):
                blocking = ranked[len(kept):]
                log(f"int8 search: keeping more layers float would leave less than {floor:.0%} of the MACs at "
                    f"INT8; {len(blocking)} layer(s) block INT8: {', '.join(blocking[:5])}"
                    f"{' ...' if len(blocking) > 5 else ''}")
                break
            kept = ranked[:min(k, most)]
            info, verdict = attempt(kept)
            k *= 2
    info["search"] = {"floor": floor, "met": bool(verdict["passed"]), "rounds": rounds, "kept_float": kept,
                      "rank_images": min(rank_images, len(calib_images)), "sensitivity": ranking,
                      "blocking": blocking}
    return info


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"
