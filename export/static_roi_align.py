"""Multi-scale RoIAlign for a fixed number of RoIs per image, in standard ONNX operators only.

torchvision's ``MultiScaleRoIAlign`` exports (legacy exporter) as a level assignment with ``NonZero``, one ONNX
``RoiAlign`` per level and a ``ScatterND`` merge. TensorRT 10/11 has no native RoiAlign (only the ``ROIAlign_TRT``
plugin), TensorRT-RTX rejects both ``NonZero`` and ``RoiAlign``, and ``NonZero`` gives a data-dependent shape.
:func:`multiscale_roi_align` computes the same result for ``R`` RoIs per image with Gather, MatMul, arithmetic and
shape operators only: every shape depends on the input's H/W (shape arithmetic), none on data values.

How:

* **one table**: all levels of all images, channels-last, concatenated into ``[sum_l B*H_l*W_l, C]``. A RoI's level
  (torchvision's ``LevelMapper``: canonical scale 224, level 4, eps 1e-6, k_min/k_max from the scales) selects its
  level's row offset, height, width and scale by a Gather on ``[L]`` vectors; no boolean indexing, no per-level
  branch. A single Gather then reads every bilinear tap of every RoI: ``[B*R, PH*2S, PW*2S]`` rows of ``C``.
* **torchvision's roi_align rules** (``aligned=False``), written with the kernel's own expressions: sample
  ``y = y1*scale + ph*bin + (iy + .5)*bin/S``, RoI size ``max(y2*scale - y1*scale, 1)``, a sample with
  ``y < -1 or y > H`` (or the same in x) contributes 0 but still counts in the average of S*S samples, otherwise
  ``y`` is clamped to ``[0, H-1]`` and interpolated between ``floor(y)`` and ``min(floor(y)+1, H-1)``.
* **two batched MatMuls** reduce the taps: per (RoI, bin row) ``[1, 2S] x [2S, PW*2S*C]`` over the row taps, then a
  block-diagonal ``[PW, PW*2S] x [PW*2S, C]`` over the column taps.

Equivalence: against torchvision 0.29's CPU kernel the max abs error is a few 1e-7 on N(0, 1) float32 features
(summation order only); tests/test_export/test_static_roi_align.py asserts 1e-5 for random, border, beyond-border,
sub-pixel and huge boxes on every level, B = 1 and B > 1, in PyTorch and in onnxruntime.

Measured (onnxruntime 1.31.1 CPU provider, 1 thread, ``lscpu`` model name "AMD EPYC" with AVX2 and no AVX-512,
2 cores shared with other jobs (load ~2); B = 1, R = 100 proposals of a 160x160 input, C = 64, levels 40x40, 20x20,
10x10, 5x5, 7x7 bins, sampling ratio 2; medians of 800 interleaved calls per graph in one process, three runs):

=====================================================================  ==============  ========================
graph                                                                  median (ms)     vs. torchvision's export
=====================================================================  ==============  ========================
torchvision's export (NonZero + 4 RoiAlign + ScatterND, gkd rewrite)   5.1 - 5.7       1.00
this module (one Gather, two MatMuls)                                  4.8 - 5.3       0.90 - 0.97
one ``[1, 4S^2] x [4S^2, C]`` MatMul per bin instead                   4.7 - 5.0       0.88 - 0.92
GridSample over one zero-separated canvas of all levels                5.2 - 6.0       1.02 - 1.06
=====================================================================  ==============  ========================

Why Gather and not GridSample: GridSample is not faster here (onnxruntime's kernel costs about what its RoiAlign
does), and it is less exact: one GridSample for all RoIs needs all levels in one canvas, so each sample coordinate is
rounded at the canvas's magnitude (row offset + y) and normalised to [-1, 1] and back: 7.5e-6 to 1.1e-5 max abs error
on N(0, 1) features, against 5e-7 for the Gather. GridSample per level would sample every RoI on every level (4x the
work). On the CPU the Gather formulation is bound by the tap tensor it materialises (B*R*PH*PW*4*S*S*C floats,
20 MB here: the Gather and the two MatMuls are ~30%, ~20% and ~15% of its time), which is also why neither a table of
2x2 pixel quads (same bytes, fewer rows) nor other reductions (in units of torchvision's time: Mul + ReduceSum
1.3-1.9, Einsum, wider block-diagonal or dense per-RoI MatMuls 1.1-1.5) helped. The per-bin MatMul row is 3-5%
faster than the two MatMuls but needs its ``[.., PH, PW, 2S, 2S]`` tap order: built by 6-D broadcasting it was
slower than this module, and fast only when the row indices are selected by one-hot MatMuls in float32; this module
keeps integer indices.

Not covered: torchvision's adaptive sampling (``sampling_ratio <= 0``: the sample count depends on the box size, a
data-dependent shape) and non-consecutive levels (torchvision would return zeros for RoIs mapped to a missing level);
both raise. A box with ``x2 < x1`` (outside torchvision's contract, where its level is undefined) is pooled from the
finest level. Like torchvision's own export, an exported graph holds the scales as constants.

Memory: the tap tensor is ``B * R * PH * PW * 4 * S * S * C`` values: 20 MB for gkd's student (R = 100, C = 64) but
0.8 GB per image at torchvision's defaults (1000 proposals, 256 channels), which a runtime must hold at once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["multiscale_roi_align", "infer_scales", "roi_levels", "StaticMultiScaleRoIAlign", "FORBIDDEN_OPS"]

#: ONNX operators this module must never emit: data-dependent shapes (NonZero), plugin-only layers (RoiAlign),
#: control flow and scatters (TensorRT-RTX rejects or cannot build them)
FORBIDDEN_OPS = frozenset({"NonZero", "RoiAlign", "ScatterND", "ScatterElements", "Scatter", "NonMaxSuppression",
                           "Loop", "If"})


def infer_scales(feature_sizes: Sequence[Sequence[int]], image_size: Sequence[int]) -> list[float]:
    """torchvision's scale guess per level: ``2 ** round(log2(H_l / H_img))`` (heights only, as torchvision does).

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level, finest first.
        image_size: ``(H, W)`` of the (largest) input image the RoIs refer to.

    Returns:
        One float per level, e.g. ``[1/4, 1/8, 1/16, 1/32]``.
    """
    out = []
    for size in feature_sizes:
        # the same float32 tensor arithmetic as torchvision.ops.poolers._infer_scale, so ties round alike
        approx = float(size[0]) / float(image_size[0])
        out.append(2 ** float(torch.tensor(approx).log2().round()))
    return out


def _level_range(scales: Sequence[float]) -> tuple[int, int]:
    """``(k_min, k_max)`` as torchvision's ``_setup_scales`` derives them (int() of -log2 in float32)."""
    k_min = int(-torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item())
    k_max = int(-torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item())
    return k_min, k_max


def roi_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
               eps: float = 1e-6) -> Tensor:
    """The FPN level of each box (torchvision's ``LevelMapper``), counted from the finest pooled level.

    Args:
        boxes: ``[..., 4]`` xyxy in input-image pixels.

    Returns:
        ``[...]`` int64 in ``[0, k_max - k_min]``.
    """
    # written with exactly LevelMapper's operations, so eager results are bitwise torchvision's
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    # an inverted box (x2 < x1, outside torchvision's contract) would give a NaN level, an undefined integer and an
    # out-of-range lookup in the graph; 0 sends it to the finest level. Valid boxes are unchanged (area >= 0).
    s = torch.sqrt(torch.clamp(area, min=0.0))
    target = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    target = torch.clamp(target, min=k_min, max=k_max)
    return target.to(torch.int64) - k_min


def _shape(t: Tensor, dim: int) -> Tensor:
    """``t.shape[dim]`` as an int64 0-d tensor: a Shape+Gather in the traced graph, so it follows dynamic H/W."""
    return torch._shape_as_tensor(t)[dim]


def _axis_samples(start: Tensor, size: Tensor, extent: Tensor, pooled: int, sampling_ratio: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for every sample point of every bin, as torchvision's roi_align kernel.

    Args:
        start: ``[...]`` RoI start on its level (feature pixels).
        size: ``[...]`` RoI length on its level (``max(end - start, 1)``).
        extent: ``[...]`` the level's height (or width) as a float.
        pooled: bins along this axis (7).
        sampling_ratio: samples per bin along this axis (2).

    Returns:
        ``lo``, ``hi``: ``[..., pooled, sampling_ratio]`` int64 rows (or columns) of the two taps;
        ``w``: ``[..., pooled, sampling_ratio, 2]`` their weights, zero for a sample outside ``[-1, extent]``.
    """
    dt = start.dtype
    bin_size = size / pooled
    p = torch.arange(pooled, dtype=dt, device=start.device).view(pooled, 1)
    i = torch.arange(sampling_ratio, dtype=dt, device=start.device) + 0.5
    s = start[..., None, None]
    b = bin_size[..., None, None]
    # the kernel's expression and evaluation order: start + p * bin + (i + .5) * bin / grid
    y = s + p * b + i * b / sampling_ratio  # [..., pooled, sampling_ratio]
    ext = extent[..., None, None]
    # a sample more than one pixel outside the map contributes 0 (it still counts in the average)
    inside = (y >= -1.0) & (y <= ext)
    # clamping to [0, extent - 1] is the kernel's "y <= 0 -> 0" and "y_low >= extent - 1 -> y = y_low" in one step
    y = torch.minimum(torch.clamp(y, min=0.0), ext - 1)
    y0 = torch.floor(y)
    ly = y - y0
    hy = 1.0 - ly
    lo = y0.to(torch.int64)
    hi = torch.minimum(lo + 1, extent.to(torch.int64)[..., None, None] - 1)
    w = torch.stack([hy, ly], dim=-1) * inside.to(dt)[..., None]
    return lo, hi, w


def multiscale_roi_align(features: Sequence[Tensor], boxes: Tensor, image_size: Sequence[int] | None = None, *,
                         output_size: int | Sequence[int] = 7, sampling_ratio: int = 2,
                         scales: Sequence[float] | None = None, canonical_scale: int = 224,
                         canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """``torchvision.ops.MultiScaleRoIAlign`` (``aligned=False``) for ``R`` RoIs per image, without data-dependent
    shapes.

    Args:
        features: the pooled FPN levels, finest first, each ``[B, C, H_l, W_l]``.
        boxes: ``[B, R, 4]`` xyxy in padded input-image pixels (the same ``R`` for every image).
        image_size: ``(H, W)`` of the largest image (torchvision's ``image_shapes`` maximum); used only to infer
            the scales when ``scales`` is not given.
        output_size: bins per RoI, ``P`` or ``(PH, PW)``.
        sampling_ratio: samples per bin and axis (> 0; torchvision's adaptive mode, <= 0, has a data-dependent
            sample count and is not supported).
        scales: each level's ``1 / stride``; inferred as torchvision does when None.
        canonical_scale, canonical_level, eps: the FPN level heuristic (torchvision's ``LevelMapper``).

    Returns:
        ``[B * R, C, PH, PW]`` in torchvision's order (image 0's RoIs first).
    """
    if len(features) == 0:
        raise ValueError("multiscale_roi_align needs at least one feature map")
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0 for a static graph, got {sampling_ratio}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, R, 4], got {list(boxes.shape)}")
    ph_, pw_ = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if scales is None:
        if image_size is None:
            raise ValueError("either scales or image_size must be given")
        scales = infer_scales([f.shape[-2:] for f in features], image_size)
    if len(scales) != len(features):
        raise ValueError(f"{len(scales)} scales for {len(features)} feature maps")
    k_min, k_max = _level_range(scales)
    n_levels = len(features)
    if k_max - k_min + 1 != n_levels:
        # torchvision would send RoIs to a level that has no map and return zeros for them
        raise ValueError(f"the feature maps must be consecutive FPN levels (strides 2**k, 2**(k+1), ...), "
                         f"got scales {list(scales)}")
    dt = boxes.dtype
    dev = boxes.device
    B, C = features[0].shape[0], features[0].shape[1]
    S = sampling_ratio

    # One channels-last table of every level and image, [sum_l B*H_l*W_l, C]: each bilinear tap is one whole row,
    # so all RoIs of all levels are read by a single Gather (no per-level branch, no level-sorted RoI lists).
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, C) for f in features], dim=0)
    heights = [_shape(f, 2) for f in features]
    widths = [_shape(f, 3) for f in features]
    batch = _shape(features[0], 0)
    offsets = [torch.zeros((), dtype=torch.int64, device=dev)]
    for h, w in zip(heights[:-1], widths[:-1]):
        offsets.append(offsets[-1] + batch * h * w)
    # per-level constants, looked up per RoI with one small Gather each
    level_h = torch.stack(heights)
    level_w = torch.stack(widths)
    level_off = torch.stack(offsets)
    level_scale = torch.tensor(list(scales), dtype=dt, device=dev)

    if n_levels == 1:
        level = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=dev)
    else:
        level = roi_levels(boxes, k_min, k_max, canonical_scale, canonical_level, eps)  # [B, R]
    scale = level_scale[level]  # [B, R]
    h = level_h[level]  # [B, R] int64
    w = level_w[level]
    base = level_off[level] + torch.arange(B, device=dev).view(-1, 1) * h * w  # first row of (level, image)

    # aligned=False: no half-pixel shift; a RoI is at least 1x1 feature pixel
    x1 = boxes[..., 0] * scale
    y1 = boxes[..., 1] * scale
    x2 = boxes[..., 2] * scale
    y2 = boxes[..., 3] * scale
    roi_w = torch.clamp(x2 - x1, min=1.0)
    roi_h = torch.clamp(y2 - y1, min=1.0)
    y_lo, y_hi, wy = _axis_samples(y1, roi_h, h.to(dt), ph_, S)  # [B, R, PH, S], [B, R, PH, S, 2]
    x_lo, x_hi, wx = _axis_samples(x1, roi_w, w.to(dt), pw_, S)

    # Every RoI reads a [PH*2S, PW*2S] grid of taps: the 2 rows of each of its PH*S sample rows crossed with the 2
    # columns of each of its PW*S sample columns (bin-major: bin p owns entries p*2S .. p*2S+2S-1 of an axis).
    rows = torch.stack([y_lo, y_hi], dim=-1).reshape(B, -1, ph_ * 2 * S) * w[..., None] + base[..., None]
    cols = torch.stack([x_lo, x_hi], dim=-1).reshape(B, -1, pw_ * 2 * S)
    idx = rows[..., :, None] + cols[..., None, :]  # [B, R, PH*2S, PW*2S] table rows
    taps = table[idx.reshape(-1)].reshape(-1, ph_, 2 * S, pw_ * 2 * S * C)  # [B*R, PH, 2S, PW*2S*C]
    # Rows first: per (RoI, bin row) a [1, 2S] x [2S, PW*2S*C] product. torchvision's division by the S*S samples
    # is folded into these weights (a power-of-two S keeps it exact).
    wy = (wy / float(S * S)).reshape(-1, ph_, 1, 2 * S).to(table.dtype)
    t = torch.matmul(wy, taps).reshape(-1, ph_, pw_ * 2 * S, C)  # [B*R, PH, PW*2S, C]
    # Then columns: per (RoI, bin row) a block-diagonal [PW, PW*2S] x [PW*2S, C] product (bin q weighs only its own
    # 2S columns). The taps stay in the order the Gather wrote them: regrouping them per bin costs more than the
    # zeros of the block-diagonal weight (see the module docstring).
    block = torch.eye(pw_, dtype=table.dtype, device=dev).repeat_interleave(2 * S, dim=1)  # [PW, PW*2S]
    wx = (wx.reshape(-1, 1, pw_ * 2 * S).to(table.dtype) * block)[:, None]  # [B*R, 1, PW, PW*2S]
    pooled = torch.matmul(wx, t)  # [B*R, PH, PW, C]
    return pooled.permute(0, 3, 1, 2)  # [B*R, C, PH, PW]


class StaticMultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign`` with a fixed RoI count per image.

    ``forward(x, boxes, image_shapes)`` takes torchvision's arguments: ``x`` the feature dict, ``boxes`` a list of
    ``[R, 4]`` tensors of equal length (or one ``[B, R, 4]`` tensor), ``image_shapes`` the ``(H, W)`` per image;
    returns ``[B * R, C, PH, PW]``.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int | Sequence[int] = 7, sampling_ratio: int = 2,
                 *, scales: Sequence[float] | None = None, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.scales = None if scales is None else list(scales)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    @classmethod
    def from_torchvision(cls, pool: nn.Module) -> "StaticMultiScaleRoIAlign":
        """The same pooling as a torchvision ``MultiScaleRoIAlign`` (its scales too, if it has fixed them)."""
        return cls(pool.featmap_names, pool.output_size, pool.sampling_ratio, scales=pool.scales,
                   canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)

    def forward(self, x: Mapping[str, Tensor], boxes: Sequence[Tensor] | Tensor,
                image_shapes: Sequence[Sequence[int]] | None = None) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]  # torchvision's filter keeps the dict order
        if not isinstance(boxes, Tensor):
            if len({b.shape[0] for b in boxes}) > 1:
                raise ValueError("a static RoIAlign needs the same number of boxes for every image, got "
                                 f"{[b.shape[0] for b in boxes]}")
            boxes = torch.stack(list(boxes))
        # torchvision infers the scales from the largest height and width over the images (only if not fixed)
        size = None if not image_shapes else (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        return multiscale_roi_align(feats, boxes, size, output_size=self.output_size,
                                    sampling_ratio=self.sampling_ratio, scales=self.scales,
                                    canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)
