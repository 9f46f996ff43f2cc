"""The TensorRT-RTX parse/build check (export/trt_rtx.py): the first TensorRT builder to touch gkd's graphs.

TensorRT-RTX builds engines on a CPU but cannot run them: these tests check what the builder accepts, never what an
engine computes. They skip where tensorrt-rtx is not installed (it is in requirements.txt, so CI runs them).
"""
import json

import pytest
import torch

from gkd.export import trt_rtx

pytest.importorskip("tensorrt_rtx", exc_type=ImportError, reason="tensorrt-rtx is not installed (pip install "
                    "tensorrt-rtx, or the trt-rtx extra)")

PROFILE = {"image": {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [1, 3, 256, 256]}}


def test_full_detectors_are_rejected_at_their_post_processing(exported):
    """Measured: torchvision's post-processing uses NonZero, which TensorRT has no layer for; Faster R-CNN's RoiAlign
    needs a plugin TensorRT-RTX cannot create without a GPU. Every rejected node is listed, not only the first."""
    results = trt_rtx.check_files({"faster_rcnn": exported["faster_rcnn"]["fp32"],
                                   "retinanet": exported["retinanet"]["fp32"]}, PROFILE)
    for arch, r in results.items():
        assert "error" not in r, r
        assert not r["parsed"] and r["scan_complete"], r
        ops = {x["op"] for x in r["rejected"]}
        assert "NonZero" in ops, ops
        assert sum(x["op"] == "NonZero" for x in r["rejected"]) >= 2  # more than the first one found
        assert "rejects NonZero x" in trt_rtx.summarize(r)
    assert "RoiAlign" in {x["op"] for x in results["faster_rcnn"]["rejected"]}


def test_a_graph_it_supports_parses_and_builds(trained, tmp_path):
    """The backbone + FPN of the same detector (no post-processing), with a dynamic H/W profile: it builds."""
    class Body(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            return tuple(self.model.backbone(image).values())

    path = tmp_path / "body.onnx"
    with torch.no_grad():
        torch.onnx.export(Body(trained["retinanet"]["model"]).eval(), (torch.rand(1, 3, 64, 64),), str(path),
                          dynamo=False, opset_version=17, input_names=["image"],
                          dynamic_axes={"image": {2: "height", 3: "width"}})
    (r,) = trt_rtx.check_files({"body": path}, PROFILE).values()
    assert r["parsed"] and r["rejected"] == [] and r["build"]["ok"] and r["build"]["engine_bytes"] > 1e6, r
    assert trt_rtx.summarize(r).startswith("parses and builds")


def test_gkd_export_records_the_check_per_precision(trained, rect_data, tmp_path, capsys):
    """gkd export checks the files TensorRT builds from (the static graph's) and records each result: the whole
    graph parses with no rejected node and builds, at every precision exported."""
    from gkd.cli import main

    out = tmp_path / "exp"
    rc = main(["export", str(trained["retinanet"]["checkpoint"]), "--precision", "fp32,fp16",
               "--val-data", str(rect_data["val"]), "--out", str(out), "--parity-images", "2"])
    assert rc == 0
    check = json.loads((out / "export.json").read_text())["tensorrt_rtx_check"]
    assert check["ran"] and check["graph"] == "static" and set(check["results"]) == {"static-fp32", "static-fp16"}
    for r in check["results"].values():
        assert r["parsed"] and not r["rejected"] and r["build"]["ok"], r
    assert all(s.startswith("parses and builds") for s in check["summary"].values())
    assert "tensorrt-rtx (builds on the CPU, never runs): static-fp16: parses and builds" in capsys.readouterr().err
