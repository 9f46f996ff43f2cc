"""Does an exported ONNX parse and build under a TensorRT builder? Checked with TensorRT-RTX, which needs no GPU.

``tensorrt-rtx`` (PyPI; the ``trt-rtx`` extra) parses ONNX and builds engines on a CPU-only machine; it cannot run
them (deserialising an engine needs a GPU). It is the only TensorRT builder that installs on the project's machines,
so it is the first TensorRT code that ever touches gkd's graphs. What a pass proves is limited: TensorRT-RTX builds
a graph into one "compiler backend" node and compiles kernels only when the engine first runs, so a successful build
shows that every layer is supported and the optimisation profile is valid, not that the engine computes correctly.
What it rejects is real: measured on gkd's detectors (see docs/export.md): ``NonZero`` (torchvision's
post-processing; the builder has no NonZero layer), ``RoiAlign`` (its plugin cannot even be created without a GPU, so
this one is unverified either way), ``NonMaxSuppression`` (parsed, but no build runner implements it), and INT8 Q/DQ
with uint8 activations or int32 bias (TensorRT takes symmetric int8 only).

Each file is checked in a child process (``python -m gkd.export.trt_rtx``): the builder has been seen to crash
(segmentation fault) after a failed plugin lookup, and a crash must not take ``gkd export`` down with it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["available", "check_files", "check_file", "BackgroundCheck"]

#: how many rejected nodes are cut out one by one to find the next (a detector has ~10-100 of them)
MAX_CUTS = 300


def available() -> bool:
    """Whether ``tensorrt_rtx`` can be imported (without importing it here)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx") is not None


class BackgroundCheck:
    """One file's check running in a child process (started at once; :meth:`result` waits for it), so that a caller
    can go on with other work on another core meanwhile."""

    def __init__(self, path: str | Path, profile: dict[str, dict[str, list[int]]], timeout: float = 600.0):
        self.timeout = timeout
        cmd = [sys.executable, "-m", "gkd.export.trt_rtx", str(path), json.dumps(profile)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, Any]:
        """:func:`check_file`'s result, or ``{"error": ...}`` when the child failed, crashed or timed out."""
        try:
            stdout, stderr = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"error": f"no answer within {self.timeout:.0f} s"}
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
            return {"error": f"the check process exited with status {self.proc.returncode}: {tail}"}
        return json.loads(lines[-1])


def check_files(paths: dict[str, Path], profile: dict[str, dict[str, list[int]]], timeout: float = 600.0
                ) -> dict[str, Any]:
    """Check each ``{precision: onnx path}`` in a child process, one after the other; returns ``{precision:
    result}`` (see :func:`check_file`) or ``{precision: {"error": ...}}`` when the child failed or crashed."""
    return {precision: BackgroundCheck(path, profile, timeout).result() for precision, path in paths.items()}


def summarize(result: dict[str, Any]) -> str:
    """One line: ``parses and builds (0.4 s, 46.9 MB engine)`` or ``rejects NonZero x8, RoiAlign x4``."""
    if "error" in result:
        return f"not checked ({result['error']})"
    if result["parsed"]:
        b = result["build"]
        return (f"parses and builds ({b['seconds']:.1f} s, {b['engine_bytes'] / 1e6:.1f} MB engine)" if b["ok"]
                else f"parses; build fails: {b['errors'][:1]}")
    ops: dict[str, int] = {}
    for r in result["rejected"]:
        ops[r["op"]] = ops.get(r["op"], 0) + 1
    more = "" if result["scan_complete"] else " (scan incomplete)"
    return "rejects " + ", ".join(f"{op} x{n}" for op, n in ops.items()) + more


# ----------------------------------------------------------------------------------------------------------------
# the child process (imports tensorrt_rtx)


def check_file(path: str | Path, profile: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Parse ``path``; list every node the parser rejects (cutting each out to find the next); build the graph if
    it parses.

    Returns:
        ``{"file", "tensorrt_rtx", "parsed", "rejected": [{"node", "op", "why"}], "scan_complete",
        "build": {...} | None}``; a build (only of a graph that parses) is ``{"ok", "seconds", "engine_bytes",
        "errors"}``.
    """
    import onnx
    import tensorrt_rtx as trt

    keep: list[Any] = []  # TensorRT-RTX objects are never freed mid-check: that crashed after a failed plugin lookup

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)

    def parse(model) -> tuple[bool, Any, Any, Any, Any]:
        log = Log()
        builder = trt.Builder(log)
        network = builder.create_network(0)  # TensorRT-RTX is always strongly typed: precision comes from the ONNX
        parser = trt.OnnxParser(network, log)
        buf = model.SerializeToString()
        keep.extend([log, builder, network, parser, buf])
        return parser.parse(buf), log, builder, network, parser

    def build(log, builder, network) -> dict[str, Any]:
        config = builder.create_builder_config()
        dynamic = any(d < 0 for i in range(network.num_inputs) for d in network.get_input(i).shape)
        if dynamic:
            prof = builder.create_optimization_profile()
            for name, shapes in profile.items():
                prof.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
            config.add_optimization_profile(prof)
        before = len(log.errors)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        keep.extend([config, plan])
        return {"ok": plan is not None, "seconds": round(time.perf_counter() - t0, 2),
                "engine_bytes": plan.nbytes if plan is not None else None, "errors": log.errors[before:][:5]}

    model = onnx.load(str(path))
    ok, log, builder, network, parser = parse(model)
    result: dict[str, Any] = {"file": str(path), "tensorrt_rtx": trt.__version__, "parsed": bool(ok),
                              "rejected": [], "scan_complete": True, "build": None}
    if ok:
        result["build"] = build(log, builder, network)
        return result
    model = onnx.shape_inference.infer_shapes(model)
    for _ in range(MAX_CUTS):
        err = parser.get_error(0)
        name, op, why = err.node_name(), err.node_operator(), err.desc()[:300]
        if not _cut(model, name):
            result["rejected"].append({"node": name, "op": op, "why": why})
            result["scan_complete"] = False
            return result
        result["rejected"].append({"node": name, "op": op, "why": why})
        ok, log, builder, network, parser = parse(model)
        if ok:  # every rejected node found (the cut graph is not built: its cut points have no profile)
            return result
    result["scan_complete"] = False
    return result


def _cut(model, name: str) -> bool:
    """Remove node ``name`` (or the If/Loop holding it) and make its outputs graph inputs; False if impossible."""
    import onnx
    from onnx import helper

    graph = model.graph

    def holds(node) -> bool:
        return any(name in {n.name for n in a.g.node} or any(holds(n) for n in a.g.node)
                   for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)

    idx = next((i for i, n in enumerate(graph.node) if n.name == name), None)
    if idx is None:
        idx = next((i for i, n in enumerate(graph.node) if holds(n)), None)
    if idx is None:
        return False
    infos = {v.name: v for v in list(graph.value_info) + list(graph.output)}
    inputs = {i.name for i in graph.input}
    for out in graph.node[idx].output:
        if out in inputs:
            continue
        info = infos.get(out)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return False
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{out}_{k}")
                for k, d in enumerate(t.shape.dim)]
        graph.input.append(helper.make_tensor_value_info(out, t.elem_type, dims))
    del graph.node[idx]
    return True


if __name__ == "__main__":  # python -m gkd.export.trt_rtx FILE.onnx PROFILE_JSON  -> one JSON line on stdout
    print(json.dumps(check_file(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
