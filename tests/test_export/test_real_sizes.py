"""FP32 parity on images of the sizes users feed in: large, not square, odd, smaller than the model, extreme aspect.

Photos are made from the fixture's parity images (so the detectors detect on them): scaled to the size, with
sensor-like noise, then JPEG-compressed and decoded as a photo is. The exported graph resizes them to the model size
itself; before gkd computed that resize's output size as eager PyTorch does (in float64), about one size in five
came out one pixel off and moved scores by up to 0.1 (e.g. 879x710, 642x580 at 128 px).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from gkd.export.images import load_image_set
from gkd.export.parity import DEFAULT_TOLERANCES, collect_outputs, compare_outputs
from gkd.export.runtime import OrtRunner, TorchRunner
from tests.detectors import DETECTS_SCORE, FIT_SCORE

ARCHS = ("faster_rcnn", "retinanet")
#: (H, W): landscape and portrait photos, full HD, odd sizes, one smaller than the 64 px model, one with an aspect
#: ratio far beyond max_size / min_size, and sizes whose float32 resize arithmetic is one pixel off eager's
SIZES = [(427, 640), (640, 427), (1080, 1920), (333, 500), (500, 333), (40, 50), (64, 400), (879, 710),
         (642, 580), (591, 854)]


def as_photo(image: torch.Tensor, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``image`` [3, h, w] in [0, 1] scaled to ``size``, with noise, through a JPEG round trip (quality 90)."""
    from PIL import Image

    big = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    big = big + 0.03 * torch.randn(big.shape, generator=torch.Generator().manual_seed(seed))
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def photos(rect_data):
    images = load_image_set(rect_data["val"], limit=3).images
    return {size: [(i, as_photo(im, size, seed=i)) for i, (_, im) in enumerate(images)] for size in SIZES}


def test_the_sizes_include_ones_whose_float32_resize_size_differs():
    """The list must keep exercising the bug it guards: float32 arithmetic gives another size for some of them."""
    def sizes(h, w, side=64):
        exact = min(side / min(h, w), side / max(h, w))
        s32 = np.minimum(np.float32(side) / np.float32(min(h, w)), np.float32(side) / np.float32(max(h, w)))
        return (int(h * exact), int(w * exact)), (int(np.floor(np.float32(h) * s32)), int(np.floor(np.float32(w) * s32)))

    assert any(a != b for a, b in (sizes(h, w, side) for h, w in SIZES for side in (64, 128)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp32_matches_pytorch_on_photos(exported, trained, photos, arch, size):
    images = photos[size]
    ref = collect_outputs(TorchRunner(trained[arch]["model"]), images)
    with OrtRunner(exported[arch]["fp32"]) as runner:
        out = collect_outputs(runner, images)
    assert all(o["scores"].numel() for o in ref) or size == (64, 400), "the detector must detect on the photos"
    sets = compare_outputs(ref, out, DEFAULT_TOLERANCES["fp32"].replace(score_floor=DETECTS_SCORE))["detection"]
    assert sets["missing"] == 0 and sets["extra"] == 0, sets  # identical detection sets above the parity floor
    # Scores and boxes from FIT_SCORE, the score the fixture fits every object to: the spurious detections between
    # 0.3 and 0.6 are not fit, and one of them can sit on a discrete choice (a near-tied proposal). Seen on an
    # Intel Xeon with ATEN_CPU_CAPABILITY=default: a score-0.327 box 1.5 px and 0.0035 off on one 427x640 photo,
    # while the same detection moves smoothly (0.0002 px) under input noise of 1e-5 in PyTorch alone.
    rep = compare_outputs(ref, out, DEFAULT_TOLERANCES["fp32"].replace(score_floor=FIT_SCORE))
    det = rep["detection"]
    assert det["missing"] == 0 and det["extra"] == 0, det
    assert det["max_score_delta"] <= 1e-4, det
    for r, o in zip(ref, out):  # boxes within 0.05 px, compared by matching (order-free)
        from gkd.export.parity import match_detections

        for ri, ci, _ in match_detections(r, o):
            if r["scores"][ri] >= FIT_SCORE:
                assert float((r["boxes"][ri] - o["boxes"][ci]).abs().max()) <= 0.05
    if det["reference_detections"] == 0:  # only allowed at 64x400 (asserted above)
        # nothing above the floor: everything agrees, and the verdict still says it verifies nothing
        assert len(rep["failures"]) == 1 and "the reference detects nothing" in rep["failures"][0]
        assert not rep["passed"]
    else:
        assert rep["passed"], rep["failures"]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_real_numeric_difference_still_fails(exported, trained, photos, arch):
    """The same comparison against a model whose head weights moved by 1%: parity must fail."""
    import copy

    model = copy.deepcopy(trained[arch]["model"])
    head = model.roi_heads.box_predictor if arch == "faster_rcnn" else model.head.classification_head
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(1.01)
    images = photos[(427, 640)] + photos[(40, 50)]
    ref = collect_outputs(TorchRunner(model), images)
    with OrtRunner(exported[arch]["fp32"]) as runner:
        out = collect_outputs(runner, images)
    rep = compare_outputs(ref, out, DEFAULT_TOLERANCES["fp32"].replace(score_floor=DETECTS_SCORE),
                          max_detections=100)
    assert not rep["passed"] and any(f.startswith(("tensors", "detections")) for f in rep["failures"]), rep
