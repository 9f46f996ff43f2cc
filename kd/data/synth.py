"""The embedded synthetic dataset: textured shapes on cluttered backgrounds, written as PNG files + COCO JSON.

Design (docs/data.md has the full description and the measured statistics):

* Six classes told apart only by **shape**: circle, square, triangle, ring, cross, star. Colour and texture (solid,
  stripes, checker, noise, gradient) are drawn independently of the class, and shapes are rotated and slightly
  stretched, so the detector has to learn geometry.
* **Backgrounds**: a smooth colour field; in the ``cluttered`` preset also irregular textured blobs and line
  segments that are not objects (distractors). ``PRESETS`` holds the two worlds (``clean`` is the default).
* **Hard cases** the study reports AP on, tagged per annotation in ``attributes``:
  ``small`` (box area < 16 x 16 px), ``occluded`` (more than ``OCCLUDED_ABOVE`` of the object hidden by objects
  drawn after it; ``visible`` stores the visible fraction), ``blurred`` (object or whole-image Gaussian blur),
  ``noisy`` (strong object or image noise) and ``low_contrast`` (object coloured like the background under it).
* Boxes are the tight box of the whole (amodal) shape; ``area`` is the shape's full pixel area, as COCO uses the
  segment area for the small/medium/large ranges.

Determinism: image ``i`` is drawn from ``SeedSequence([seed, i])`` alone, so files are byte-identical for the same
seed, and a different ``n_images`` gives the same first images. Only integer-exact or IEEE-exact operations
(add/multiply, PIL drawing, NumPy's PCG64 streams) touch pixel arrays; trigonometry is scalar ``math``, which keeps
outputs identical across CPUs with different SIMD support.
"""
from __future__ import annotations

import io
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gkd.core.errors import GkdError
from gkd.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["generate_synthetic", "render_image", "SYNTH_CLASSES", "GENERATOR_VERSION", "SMALL_AREA",
           "OCCLUDED_ABOVE", "PRESETS", "DEFAULT_PRESET"]

log = logging.getLogger("gkd")

#: bump when the output for a given seed changes
GENERATOR_VERSION = 1
SYNTH_CLASSES = ("circle", "square", "triangle", "ring", "cross", "star")
#: box area (px^2) under which an object counts as small
SMALL_AREA = 16 * 16
#: hidden fraction above which an object counts as occluded
OCCLUDED_ABOVE = 0.2
#: placements that would leave an earlier object less visible than this are redrawn (boxes of invisible objects
#: cannot be learned)
MIN_VISIBLE = 0.4
#: the worlds the generator draws. ``clean`` (the default since gkd 0.2, what ``gkd run`` trains on): a smooth
#: colour field without distractors, 12% of draws small, the rest from 20 px to 45% of the side (at 256 px), so
#: that a detector trained from scratch on a 2-core CPU takes off within minutes (measured: the same ResNet-18 FPN
#: recipe reaches 6.2 mAP after 240 steps here, 1.7 on ``cluttered``). ``cluttered``: the first world (generator
#: version 1, byte-identical), distractor blobs and line segments on the background, 25% of draws small, 16 px to
#: 40% of the side; the study's first designs ran on it. Both keep every hard case (small, occluded, blurred,
#: noisy, low contrast) tagged per object.
PRESETS: dict[str, dict[str, Any]] = {
    "clean": {"distractors": False, "small_share": 0.12, "min_side_256": 20.0, "max_side_frac": 0.45,
              "objects": (3, 8), "classes": SYNTH_CLASSES, "hard_cases": True},
    "cluttered": {"distractors": True, "small_share": 0.25, "min_side_256": 16.0, "max_side_frac": 0.4,
                  "objects": (3, 8), "classes": SYNTH_CLASSES, "hard_cases": True},
    "quick": {"distractors": False, "small_share": 0.0, "min_side_256": 80.0, "max_side_frac": 0.55,
              "objects": (1, 3), "classes": ("circle", "triangle", "cross"), "hard_cases": False},
}
DEFAULT_PRESET = "clean"
_SS = 4  # supersampling of shape masks (anti-aliased edges)
_TEXTURES = ("solid", "stripes", "checker", "noise", "gradient")


# ----------------------------------------------------------------------------------------------------------------
# shapes: polygons in local coordinates (centre 0, "radius" r), then rotated and stretched


def _circle(r: float, n: int = 40) -> list[tuple[float, float]]:
    return [(r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _regular(r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(r: float, inner: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((rad * math.cos(a), rad * math.sin(a)))
    return out


def _cross(r: float, t: float) -> list[tuple[float, float]]:
    a, b = r, r * t  # arm length, half arm width
    return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
            (-b, -b)]


def _shape_polygons(cls: str, r: float, rng: np.random.Generator) -> tuple[list, list]:
    """``(filled polygons, hole polygons)`` of class ``cls`` with outer radius ``r`` (before rotation)."""
    if cls == "circle":
        return [_circle(r)], []
    if cls == "ring":
        return [_circle(r)], [_circle(r * rng.uniform(0.45, 0.65))]
    if cls == "square":
        return [_regular(r, 4, math.pi / 4)], []
    if cls == "triangle":
        return [_regular(r, 3, -math.pi / 2)], []
    if cls == "cross":
        return [_cross(r, rng.uniform(0.28, 0.4))], []
    if cls == "star":
        return [_star(r, rng.uniform(0.38, 0.5))], []
    raise ValueError(cls)


def _transform(polys: list, angle: float, sx: float, sy: float) -> list:
    c, s = math.cos(angle), math.sin(angle)
    return [[(c * x * sx - s * y * sy, s * x * sx + c * y * sy) for x, y in p] for p in polys]


def _rasterize(fill: list, holes: list, size: int, offset: tuple[float, float]) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` float32 in [0, 1] of ``fill`` minus ``holes``, shifted by ``offset``."""
    big = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(big)
    ox, oy = offset
    for polys, value in ((fill, 255), (holes, 0)):
        for p in polys:
            draw.polygon([((x + ox) * _SS, (y + oy) * _SS) for x, y in p], fill=value)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)


# ----------------------------------------------------------------------------------------------------------------
# colours and textures


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated-ish RGB colour in [0, 1] (HSV drawn, converted without array transcendental functions)."""
    h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, a: np.ndarray, b: np.ndarray,
             kind: str | None = None) -> np.ndarray:
    """An ``[h, w, 3]`` float32 texture mixing colours ``a`` and ``b``."""
    kind = kind or _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    if kind == "solid":
        return np.broadcast_to(a, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    u = xx * np.float32(math.cos(ang)) + yy * np.float32(math.sin(ang))
    if kind == "stripes":
        period = rng.uniform(3.0, max(4.0, min(h, w) / 2.5))
        m = ((u / np.float32(period)) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checker":
        v = -xx * np.float32(math.sin(ang)) + yy * np.float32(math.cos(ang))
        cell = np.float32(rng.uniform(2.0, max(3.0, min(h, w) / 3.0)))
        m = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == "noise":
        g = max(2, int(min(h, w) / rng.uniform(2.0, 6.0)))
        coarse = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8), "L")
        m = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32) * (1.0 / 255.0)
    else:  # gradient
        span = max(float(u.max() - u.min()), 1.0)
        m = (u - u.min()) / np.float32(span)
    m = m[..., None]
    return a * (1.0 - m) + b * m


def _second_colour(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    # Half the time a contrasting colour, half a shade of the first one: textures of varied strength.
    if rng.random() < 0.5:
        return _random_colour(rng)
    return np.clip(a * np.float32(rng.uniform(0.4, 0.8)) + np.float32(rng.uniform(0.0, 0.2)), 0, 1).astype(np.float32)


def _composite(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray, y0: int, x0: int) -> None:
    """``canvas[y0:, x0:] = layer * alpha + canvas * (1 - alpha)`` over the layer's extent (in place)."""
    h, w = alpha.shape
    region = canvas[y0:y0 + h, x0:x0 + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += layer * a


def _blur_layer(layer: np.ndarray, alpha: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-blur colour and coverage of a patch (PIL, deterministic); the colour is defined over the whole
    patch, so blurring it separately from the coverage leaves no dark fringe."""
    rgb = Image.fromarray(np.clip(layer * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    cov = Image.fromarray(np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    f = ImageFilter.GaussianBlur(sigma)
    return (np.asarray(rgb.filter(f), dtype=np.float32) * (1.0 / 255.0),
            np.asarray(cov.filter(f), dtype=np.float32) * (1.0 / 255.0))


# ----------------------------------------------------------------------------------------------------------------
# one image


def _background(rng: np.random.Generator, s: int, distractors: bool = True) -> np.ndarray:
    """Smooth colour field (+ textured blobs + line segments with ``distractors``): ``[s, s, 3]`` float32."""
    g = int(rng.integers(2, 6))
    coarse = Image.fromarray((rng.random((g, g, 3)) * 255).astype(np.uint8), "RGB")
    canvas = np.asarray(coarse.resize((s, s), Image.BILINEAR), dtype=np.float32) * np.float32(1.0 / 255.0)
    canvas = canvas * np.float32(rng.uniform(0.4, 0.9)) + np.float32(rng.uniform(0.0, 0.3))
    canvas = np.ascontiguousarray(canvas, dtype=np.float32)
    if not distractors:
        return canvas
    # Distractor blobs: irregular polygons (radius jitter keeps them unlike any class shape), textured like objects.
    for _ in range(int(rng.integers(2, 8))):
        r = rng.uniform(0.04, 0.2) * s
        n = int(rng.integers(5, 11))
        pts = [(r * rng.uniform(0.35, 1.0) * math.cos(2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / n),
                r * rng.uniform(0.35, 1.0) * math.sin(2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / n))
               for k in range(n)]
        size = int(2 * r) + 3
        cov = _rasterize([pts], [], size, (size / 2, size / 2))
        y0, x0 = int(rng.integers(-size // 2, s - size // 2)), int(rng.integers(-size // 2, s - size // 2))
        a = _random_colour(rng)
        tex = _texture(rng, size, size, a, _second_colour(rng, a))
        _paste_clipped(canvas, tex, cov * np.float32(rng.uniform(0.5, 1.0)), y0, x0)
    # Line segments (thin, some long): edges that are not object boundaries.
    n_lines = int(rng.integers(2, 9))
    if n_lines:
        lines = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(lines)
        colours = []
        for k in range(n_lines):
            x1, y1 = rng.uniform(0, s, 2)
            ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.8) * s
            draw.line([(x1, y1), (x1 + length * math.cos(ang), y1 + length * math.sin(ang))], fill=k + 1,
                      width=int(rng.integers(1, 4)))
            colours.append(_random_colour(rng))
        ids = np.asarray(lines)
        palette = np.concatenate([np.zeros((1, 3), np.float32), np.stack(colours)])
        mask = (ids > 0)[..., None]
        canvas = np.where(mask, canvas * np.float32(0.3) + palette[ids] * np.float32(0.7), canvas)
    return np.ascontiguousarray(canvas, dtype=np.float32)


def _paste_clipped(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray, y0: int, x0: int) -> None:
    """Composite a patch that may stick out of the canvas."""
    s_h, s_w = canvas.shape[:2]
    h, w = alpha.shape
    ty0, tx0 = max(0, -y0), max(0, -x0)
    ty1, tx1 = min(h, s_h - y0), min(w, s_w - x0)
    if ty1 <= ty0 or tx1 <= tx0:
        return
    _composite(canvas, layer[ty0:ty1, tx0:tx1], alpha[ty0:ty1, tx0:tx1], y0 + ty0, x0 + tx0)


def _object_size(rng: np.random.Generator, s: int, preset: dict[str, Any]) -> float:
    """Outer diameter: ``small_share`` small (8-16 px at 256 px), else log-uniform from ``min_side_256`` px (at
    256 px) to ``max_side_frac`` of the image side."""
    k = s / 256.0
    if rng.random() < preset["small_share"]:
        return max(6.0, rng.uniform(8.0, 16.0) * k)
    lo, hi = preset["min_side_256"] * k, preset["max_side_frac"] * s
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def render_image(seed: int, index: int, image_size: int = 256, return_owner: bool = False,
                 preset: str = DEFAULT_PRESET) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image ``index`` of the dataset seeded ``seed``.

    Args:
        seed, index: what the image is drawn from (``SeedSequence([GENERATOR_VERSION, seed, index])``).
        image_size: side ``S`` of the square image.
        preset: the world (:data:`PRESETS`).
        return_owner: also return the ``[S, S]`` int16 map of which object shows at each pixel (-1: background),
            for tests and debugging.

    Returns:
        ``(pixels uint8 [S, S, 3], objects)`` (plus the owner map if asked); each object has ``label`` (0-based
        class index), ``bbox`` xywh (ints, tight box of the whole shape), ``area`` (full shape pixel area),
        ``visible`` and the attribute flags.
    """
    world = _preset(preset)
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, int(seed), int(index)]))
    s = int(image_size)
    canvas = _background(rng, s, world["distractors"])
    owner = np.full((s, s), -1, dtype=np.int16)  # index of the object that shows at each pixel
    objects: list[dict[str, Any]] = []
    lo, hi = world["objects"]
    n_target = int(rng.integers(lo, hi + 1))
    for _ in range(4 * n_target):  # a draw that finds no place is replaced by a new one
        if len(objects) == n_target:
            break
        obj = _place_object(rng, s, canvas, owner, objects, world)
        if obj is not None:
            objects.append(obj)
    img_blur = rng.random() < 0.15 and world["hard_cases"]
    if img_blur:
        canvas = _blur_layer(canvas, np.ones(canvas.shape[:2], np.float32), float(rng.uniform(0.6, 1.3)))[0]
    img_noise = rng.random() < 0.25 and world["hard_cases"]
    if img_noise:  # sensor noise on a quarter of the images (noise everywhere would double the PNG size)
        sigma = np.float32(rng.uniform(0.03, 0.08))
        canvas = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    pixels = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)

    counts = np.bincount(owner.ravel().astype(np.int64) + 1, minlength=len(objects) + 1)[1:]
    for k, obj in enumerate(objects):
        visible = float(counts[k]) / obj.pop("_pixels")
        obj["visible"] = round(visible, 3)
        obj["occluded"] = 1.0 - visible > OCCLUDED_ABOVE
        obj["blurred"] = obj["blurred"] or img_blur
        obj["noisy"] = obj["noisy"] or img_noise
    return (pixels, objects, owner) if return_owner else (pixels, objects)


def _preset(name: str) -> dict[str, Any]:
    """The world ``name`` draws (its keys: see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise GkdError(f"synthetic preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _place_object(rng: np.random.Generator, s: int, canvas: np.ndarray, owner: np.ndarray,
                  objects: list[dict], world: dict[str, Any]) -> dict[str, Any] | None:
    label = int(rng.integers(len(world["classes"])))
    d = _object_size(rng, s, world)
    angle = rng.uniform(0, 2 * math.pi)
    sx, sy = rng.uniform(0.85, 1.15, 2)
    fill, holes = _shape_polygons(world["classes"][label], d / 2, rng)
    fill, holes = _transform(fill, angle, sx, sy), _transform(holes, angle, sx, sy)
    blur = float(rng.uniform(0.7, 1.8)) * max(1.0, d / 48.0) if rng.random() < 0.2 else 0.0
    hard = world["hard_cases"]  # False: no blur, noise, low contrast or texture (the quick world)
    blur = blur if hard else 0.0
    margin = int(math.ceil(3 * blur)) + 2
    xs = [x for x, _ in fill[0]]
    ys = [y for _, y in fill[0]]
    size = int(math.ceil(max(max(xs) - min(xs), max(ys) - min(ys)))) + 2 * margin + 2
    if size >= s:
        return None
    sub = rng.uniform(0, 1, 2)  # sub-pixel position of the shape inside its patch
    cov = _rasterize(fill, holes, size, (size / 2 + sub[0], size / 2 + sub[1]))
    solid = cov > 0.5
    npix = int(solid.sum())
    if npix < 6:
        return None
    rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
    by0, by1, bx0, bx1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1

    # Position: fully inside the image; a quarter of the time next to an earlier object, to get occlusion.
    hidden_ok = None
    for attempt in range(25):
        if objects and rng.random() < 0.25:
            ref = objects[int(rng.integers(len(objects)))]["bbox"]
            cx = ref[0] + ref[2] / 2 + rng.normal(0, 0.5) * (ref[2] + (bx1 - bx0)) / 2
            cy = ref[1] + ref[3] / 2 + rng.normal(0, 0.5) * (ref[3] + (by1 - by0)) / 2
            x0, y0 = int(round(cx - (bx0 + bx1) / 2)), int(round(cy - (by0 + by1) / 2))
        else:
            x0 = int(rng.integers(-bx0, s - bx1 + 1))
            y0 = int(rng.integers(-by0, s - by1 + 1))
        x0 = min(max(x0, -bx0), s - bx1)
        y0 = min(max(y0, -by0), s - by1)
        if _keeps_visible(owner, solid, y0, x0, objects):
            hidden_ok = (y0, x0)
            break
    if hidden_ok is None:
        return None
    y0, x0 = hidden_ok

    low_contrast = rng.random() < 0.08 and hard
    py0, px0 = max(0, y0), max(0, x0)
    py1, px1 = min(s, y0 + size), min(s, x0 + size)
    if low_contrast:
        # The colour of what lies under the object, nudged: hard to see, still a real object.
        under = canvas[py0:py1, px0:px1][solid[py0 - y0:py1 - y0, px0 - x0:px1 - x0]].mean(0)
        shift = rng.uniform(0.08, 0.18, 3) * rng.choice([-1.0, 1.0], 3)
        a = np.clip(under + shift.astype(np.float32), 0, 1).astype(np.float32)
        b = np.clip(a + rng.uniform(-0.08, 0.08, 3).astype(np.float32), 0, 1).astype(np.float32)
    else:
        a = _random_colour(rng)
        b = _second_colour(rng, a)
    layer = _texture(rng, size, size, a, b, None if hard else "solid")
    noisy = rng.random() < 0.12 and hard
    if noisy:
        layer = layer + rng.standard_normal(layer.shape, dtype=np.float32) * np.float32(rng.uniform(0.06, 0.15))
    alpha = cov
    if blur:
        layer, alpha = _blur_layer(layer, cov, blur)
    _paste_clipped(canvas, layer, alpha, y0, x0)
    region = owner[py0:py1, px0:px1]
    region[solid[py0 - y0:py1 - y0, px0 - x0:px1 - x0]] = len(objects)

    bx, by, bw, bh = int(x0 + bx0), int(y0 + by0), int(bx1 - bx0), int(by1 - by0)
    return {"label": label, "bbox": [bx, by, bw, bh], "area": npix, "_pixels": npix,
            "small": bw * bh < SMALL_AREA, "blurred": bool(blur), "noisy": bool(noisy),
            "low_contrast": bool(low_contrast)}


def _keeps_visible(owner: np.ndarray, solid: np.ndarray, y0: int, x0: int, objects: list[dict]) -> bool:
    """Whether drawing ``solid`` at ``(y0, x0)`` leaves every earlier object at least ``MIN_VISIBLE`` visible."""
    if not objects:
        return True
    s = owner.shape[0]
    py0, px0, py1, px1 = max(0, y0), max(0, x0), min(s, y0 + solid.shape[0]), min(s, x0 + solid.shape[1])
    covered = owner[py0:py1, px0:px1][solid[py0 - y0:py1 - y0, px0 - x0:px1 - x0]]
    covered = covered[covered >= 0]
    if covered.size == 0:
        return True
    newly_hidden = np.bincount(covered.astype(np.int64), minlength=len(objects))
    visible_now = np.bincount(owner.ravel()[owner.ravel() >= 0].astype(np.int64), minlength=len(objects))
    total = np.array([o["_pixels"] for o in objects], dtype=np.float64)
    return bool(np.all((visible_now - newly_hidden) / total >= MIN_VISIBLE))


# ----------------------------------------------------------------------------------------------------------------
# the dataset


def _encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # No timestamps or text chunks in PNG: bytes depend on the pixels only. Level 1: the sensor noise makes the
    # pixels nearly incompressible, and level 6 takes twice as long for 10% smaller files (measured).
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check_args(out_dir: Path, n_images: int, seed: int, image_size: int, val_fraction: float) -> int:
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 2:
        raise GkdError(f"n_images is {n_images!r}; expected an integer >= 2 (a train and a val image at least)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GkdError(f"seed is {seed!r}; expected a non-negative integer")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 64 <= image_size <= 4096:
        raise GkdError(f"image_size is {image_size!r}; expected an integer from 64 to 4096 pixels")
    if not 0.0 < val_fraction < 1.0:
        raise GkdError(f"val_fraction is {val_fraction!r}; expected a number strictly between 0 and 1")
    n_val = min(n_images - 1, max(1, int(round(n_images * val_fraction))))
    if out_dir.exists() and not out_dir.is_dir():
        raise GkdError(f"{out_dir}: exists and is not a folder; expected a folder for the dataset")
    if out_dir.is_dir() and not _generator_owned(out_dir):
        for name in ("train.json", "val.json"):
            if (out_dir / name).exists():
                raise GkdError(f"{out_dir / name}: exists and is not a gkd synthetic dataset (no meta.json); "
                               f"expected an empty or new --out folder, refusing to overwrite it")
        theirs = next((p for p in sorted(out_dir.rglob("*")) if p.is_file()), None)
        if theirs is not None:
            raise GkdError(f"{out_dir}: holds files that are not gkd's synthetic data (e.g. {theirs}); generated data "
                           f"only goes into an empty folder or one made by gkd data synth (for your own labelled "
                           f"images: gkd data convert, then data_root=... with train.json, val.json, images/)")
    return n_val


def _drop_previous(folder: Path) -> None:
    """Before a new dataset is generated where this generator made one: remove the old one's files (its JSON and
    its images, which the generator named), so that no image of the old dataset stays beside the new one's; the
    user is told which dataset is replaced."""
    import json

    try:
        old = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        old = {}
    log.info("replacing the synthetic dataset in %s (made by gkd data synth: %s images, seed %s, %s px)", folder,
             old.get("n_images", "?"), old.get("seed", "?"), old.get("image_size", "?"))
    (folder / "train.json").unlink(missing_ok=True)  # first: the folder no longer claims a complete dataset
    for name in ("val.json", "README.txt"):
        (folder / name).unlink(missing_ok=True)
    for png in (folder / "images").glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        png.unlink()


def _generator_owned(folder: Path) -> bool:
    """Whether ``folder`` holds a dataset written by this generator (its meta.json says so)."""
    import json

    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "gkd.synth"


def generate_synthetic(out_dir: str | os.PathLike, *, n_images: int = 800, seed: int = 0, image_size: int = 256,
                       val_fraction: float = 0.2, progress: bool = False,
                       preset: str = DEFAULT_PRESET) -> dict[str, Any]:
    """Write the embedded synthetic dataset to ``out_dir``.

    Files: ``images/000000.png ...``, ``train.json``, ``val.json`` (COCO instances, file names relative to
    ``images/``), ``meta.json`` (seed, generator version, classes, statistics) and ``README.txt``. ``train.json``
    is written last, so its presence means the dataset is complete. The last ``round(n_images * val_fraction)``
    images form the val split.

    Args:
        out_dir: output folder (created). A folder holding another dataset (a train.json/val.json without our
            meta.json) is refused rather than overwritten.
        n_images: total images, train + val.
        seed: the dataset seed; same seed and size give byte-identical files.
        image_size: side of the square images in pixels.
        val_fraction: share of images in the val split, strictly between 0 and 1.
        progress: show a tqdm bar.
        preset: the world drawn (:data:`PRESETS`: ``clean``, the default, or ``cluttered``).

    Returns:
        The metadata dict also written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    _preset(preset)
    n_val = _check_args(out_dir, n_images, seed, image_size, val_fraction)
    n_train = n_images - n_val
    if _generator_owned(out_dir):
        _drop_previous(out_dir)
    t0 = time.perf_counter()
    images, anns = [], []
    iterator = range(n_images)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="synth", unit="img", leave=False)
    for i in iterator:
        pixels, objects = render_image(seed, i, image_size, preset=preset)
        name = f"{i:06d}.png"
        atomic_write_bytes(out_dir / "images" / name, _encode_png(pixels))
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        for obj in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": obj["label"] + 1,
                         "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0,
                         "attributes": {k: obj[k] for k in ("small", "occluded", "blurred", "noisy", "low_contrast",
                                                            "visible")}})
    seconds = time.perf_counter() - t0
    classes = PRESETS[preset]["classes"]
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(classes)]
    info = {"description": "gkd embedded synthetic shapes dataset", "version": str(GENERATOR_VERSION),
            "seed": seed, "image_size": image_size, "preset": preset}
    splits = {"train": images[:n_train], "val": images[n_train:]}
    stats = {}
    for split, imgs in splits.items():
        ids = {img["id"] for img in imgs}
        split_anns = [a for a in anns if a["image_id"] in ids]
        stats[split] = _stats(imgs, split_anns, classes)
        if split == "val":
            atomic_write_json(out_dir / "val.json", {"info": {**info, "split": split}, "licenses": [],
                                                      "images": imgs, "annotations": split_anns,
                                                      "categories": categories}, indent=None)
        else:
            train_json = {"info": {**info, "split": split}, "licenses": [], "images": imgs,
                          "annotations": split_anns, "categories": categories}
    meta = {"generator": "gkd.synth", "generator_version": GENERATOR_VERSION, "seed": seed, "n_images": n_images,
            "image_size": image_size, "preset": preset, "world": PRESETS[preset], "val_fraction": val_fraction,
            "classes": list(classes),
            "thresholds": {"small_area": SMALL_AREA, "occluded_above": OCCLUDED_ABOVE, "min_visible": MIN_VISIBLE},
            "stats": stats, "numpy": np.__version__, "pillow": Image.__version__, "python": platform.python_version()}
    atomic_write_json(out_dir / "meta.json", meta)
    atomic_write_text(out_dir / "README.txt", _readme(meta))
    atomic_write_json(out_dir / "train.json", train_json, indent=None)  # last: marks the dataset complete
    log.info("synthetic dataset: %d train + %d val images (%d objects) in %s, %.1f s", n_train, n_val, len(anns),
             out_dir, seconds)
    return {**meta, "out_dir": str(out_dir), "seconds": round(seconds, 2)}


def _stats(images: list[dict], anns: list[dict], classes: tuple[str, ...]) -> dict[str, Any]:
    per_class = {n: 0 for n in classes}
    for a in anns:
        per_class[classes[a["category_id"] - 1]] += 1
    n = max(1, len(anns))
    flags = {k: sum(a["attributes"][k] for a in anns) for k in ("small", "occluded", "blurred", "noisy",
                                                                  "low_contrast")}
    return {"images": len(images), "objects": len(anns), "per_class": per_class,
            **{f"{k}": v for k, v in flags.items()}, "fractions": {k: round(v / n, 3) for k, v in flags.items()}}


def _readme(meta: dict) -> str:
    st = meta["stats"]
    lines = [
        "gkd embedded synthetic dataset",
        "",
        f"Generated by gkd's synthetic generator version {meta['generator_version']} with seed {meta['seed']}:",
        f"  gkd data synth --out <dir> --images {meta['n_images']} --seed {meta['seed']} "
        f"--size {meta['image_size']} --val-fraction {meta['val_fraction']} --preset {meta['preset']}",
        "The same command gives byte-identical files.",
        "",
        "Files: images/NNNNNN.png (RGB), train.json and val.json (COCO instances; file_name relative to images/),",
        "meta.json (parameters and statistics).",
        "",
        f"Classes (category id = position): {', '.join(f'{i + 1}={c}' for i, c in enumerate(meta['classes']))}.",
        f"Shapes with random colour and texture on {'cluttered' if meta['world']['distractors'] else 'smooth'} "
        "backgrounds. Each annotation has",
        '"attributes": {"small", "occluded", "blurred", "noisy", "low_contrast", "visible"}:',
        f"  small: box area < {meta['thresholds']['small_area']} px^2;",
        f"  occluded: more than {meta['thresholds']['occluded_above']:.0%} of the shape hidden by later shapes "
        f"(visible = visible fraction);",
        "  blurred / noisy: the object or the whole image was blurred / got strong noise;",
        "  low_contrast: the object is coloured like the background under it.",
        "",
        f"train: {st['train']['images']} images, {st['train']['objects']} objects; "
        f"val: {st['val']['images']} images, {st['val']['objects']} objects.",
        "",
    ]
    return "\n".join(lines)
