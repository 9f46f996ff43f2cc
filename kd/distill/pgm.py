"""Prototype Generation Module (docs/method.md, section 2.2, as decided in sections 3.5 to 3.7).

Once per refresh (default: before every epoch) and without gradients:

1. **Sampling** (once per run, seeded, kept for every refresh): for each class c, the images holding at least one
   box of class c whose width and height (original pixels) are strictly above ``min_box_size``; at most
   ``max_images_per_class`` of them, drawn from a generator seeded by (seed, c).
2. **Features**: one pass over the *union* of the sampled images (not one pass per class, as the reference),
   through the student's own transform in eval mode (deterministic resize, no flip); both backbones see the same
   tensor. Every valid box in those images (of any class: an image sampled for one class adds its other classes'
   instances at no extra cost) is pooled (cell-mean crop, docs/method.md, section 2.1) from **every** distilled
   level of both FPNs. Teacher features are computed at the first refresh and cached (the teacher is frozen).
3. **Selection** per (class, level): L2-normalise rows, density filter in both spaces, then joint matching pursuit
   with the O(K N) closed-form error, in float32, never re-selecting a chosen atom. The output is the *raw* pooled
   features of the chosen instances in both spaces.

In a process group (torchrun) the extraction is sharded: each rank runs its share of the image batches (batch-aligned,
so every batch is computed as one process would), rank 0 gathers the pooled features in batch order, runs the
selection once and broadcasts the bank; every rank logs the bank's SHA-256, and the job stops if they differ.

A class with fewer filtered candidates than ``num_prototypes`` gets fewer prototypes; a class with no valid instance
gets none (warned once, naming the class): its instances then get robust weight 1 and no global term.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .config import PGMConfig
from .levels import LevelPair
from .ops import prototype_project

__all__ = ["PrototypeBank", "PrototypeGenerator", "sample_images", "density_candidates", "joint_matching_pursuit",
           "batch_statistics"]

log = logging.getLogger("gkd")


@dataclass
class PrototypeBank:
    """Prototypes of every distilled level, all classes concatenated.

    Attributes:
        student / teacher: level key -> ``[M, C]`` raw pooled features of the chosen instances.
        labels: level key -> ``[M]`` int64 class label (1..K) of each prototype.
    """

    student: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "PrototypeBank":
        return PrototypeBank({k: v.to(device) for k, v in self.student.items()},
                             {k: v.to(device) for k, v in self.teacher.items()},
                             {k: v.to(device) for k, v in self.labels.items()})

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Plain dict of CPU tensors (for checkpoints)."""
        return {"student": {k: v.detach().cpu() for k, v in self.student.items()},
                "teacher": {k: v.detach().cpu() for k, v in self.teacher.items()},
                "labels": {k: v.detach().cpu() for k, v in self.labels.items()}}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, torch.Tensor]]) -> "PrototypeBank":
        return cls(dict(state["student"]), dict(state["teacher"]), dict(state["labels"]))

    def count(self, key: str) -> int:
        return int(self.labels[key].numel()) if key in self.labels else 0

    def sha256(self) -> str:
        """Checksum of every tensor (names, dtypes, shapes, bytes): equal banks, equal digests."""
        from ..distributed import state_sha256

        st = self.state()
        return state_sha256({f"{space}/{k}": v for space in ("student", "teacher", "labels")
                             for k, v in st[space].items()})


# ----------------------------------------------------------------------------------------------------------------
# 1. sampling


def _valid(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def sample_images(annotations: Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int, min_box_size: float,
                  max_images: int, seed: int) -> dict[int, list[int]]:
    """Pick, per class, the images whose instances will make its prototypes.

    Args:
        annotations: per image ``(boxes [n, 4] xyxy original pixels, labels [n] in 1..K)``.
        num_classes: K.
        min_box_size: a box counts only if its width and height are strictly above this.
        max_images: at most this many images per class.
        seed: sampling seed; class c draws from ``Generator().manual_seed(seed * 1_000_003 + c)`` so that one class's
            draw does not depend on the others.

    Returns:
        ``{class label: sorted image indices}`` for every class 1..K (empty list: no valid instance).
    """
    having: dict[int, list[int]] = {c: [] for c in range(1, num_classes + 1)}
    for i, (boxes, labels) in enumerate(annotations):
        if boxes.numel() == 0:
            continue
        for c in labels[_valid(boxes.float(), min_box_size)].unique().tolist():
            if int(c) in having:
                having[int(c)].append(i)
    out = {}
    for c, imgs in having.items():
        if len(imgs) > max_images:
            g = torch.Generator().manual_seed(seed * 1_000_003 + c)
            keep = torch.randperm(len(imgs), generator=g)[:max_images]
            imgs = sorted(imgs[k] for k in keep.tolist())
        out[c] = imgs
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. selection


def density_candidates(xs: torch.Tensor, xt: torch.Tensor, bandwidth: float, percentile: float) -> torch.Tensor:
    """Indices of the instances denser than the percentile bound in *both* spaces.

    density_i = sum_j exp(-((1 - <x_i, x_j>) / bandwidth)^2) on unit rows; the bound in each space is the density at
    sorted position floor(percentile * N); candidates are strictly above it in both. When that leaves nothing
    (e.g. N = 1, or all densities equal) every instance is a candidate (the reference would crash on an empty set).

    Args:
        xs / xt: ``[N, C]`` L2-normalised features in student / teacher space.

    Returns:
        ``[K]`` int64 indices, ascending.
    """
    n = xs.shape[0]

    def dens(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(((1.0 - x @ x.t()) / bandwidth) ** 2)).sum(dim=1)

    ds, dt = dens(xs), dens(xt)
    pos = min(int(percentile * n), n - 1)
    keep = (ds > ds.sort().values[pos]) & (dt > dt.sort().values[pos])
    if not keep.any():
        return torch.arange(n, device=xs.device)
    return keep.nonzero().squeeze(1)


def joint_matching_pursuit(fs: torch.Tensor, ft: torch.Tensor, num: int, alpha: float = 10.0,
                           bandwidth: float = 0.1, percentile: float = 0.4) -> torch.Tensor:
    """Choose up to ``num`` prototype instances that reconstruct all instances in both spaces with similar weights.

    Greedy matching pursuit over the density-filtered candidates (unit atoms g_s, g_t). For candidate k and
    instance i with a = <g_s,k, r_s,i>, b = <g_t,k, r_t,i>, the closed-form minimiser of
    ||r_s - w_s g_s||^2 + ||r_t - w_t g_t||^2 + alpha (w_s - w_t)^2 is
    w_s = (alpha (a + b) + a) / (1 + 2 alpha), w_t = (alpha (a + b) + b) / (1 + 2 alpha), and the error is
    E_k = sum_i w_s^2 - 2 w_s a + w_t^2 - 2 w_t b + alpha (w_s - w_t)^2 (+ sum_i ||r_i||^2, the same for every k),
    so each step costs O(K N C) for the two products and O(K N) for E, never a K x C x N tensor. Already chosen atoms
    are excluded (the reference may pick one twice).

    Args:
        fs / ft: ``[N, C]`` raw features of the same N instances in student / teacher space.
        num: prototypes wanted.

    Returns:
        ``[k]`` int64 indices into the N instances, in selection order, ``k = min(num, candidates)``.
    """
    if fs.shape[0] == 0 or num <= 0:
        return torch.zeros(0, dtype=torch.long, device=fs.device)
    xs = F.normalize(fs.float(), dim=1)
    xt = F.normalize(ft.float(), dim=1)
    cand = density_candidates(xs, xt, bandwidth, percentile)
    gs, gt = xs[cand], xt[cand]                                   # [K, C] unit atoms
    rs, rt = xs.clone(), xt.clone()                               # [N, C] residuals
    taken = torch.zeros(cand.numel(), dtype=torch.bool, device=fs.device)
    chosen = []
    for _ in range(min(num, cand.numel())):
        a, b = gs @ rs.t(), gt @ rt.t()                            # [K, N]
        ws = (alpha * (a + b) + a) / (1 + 2 * alpha)
        wt = (alpha * (a + b) + b) / (1 + 2 * alpha)
        err = (ws * ws - 2 * ws * a + wt * wt - 2 * wt * b + alpha * (ws - wt) ** 2).sum(dim=1)  # [K]
        err = err.masked_fill(taken, float("inf"))
        k = int(torch.argmin(err))
        taken[k] = True
        chosen.append(int(cand[k]))
        rs = rs - ws[k].unsqueeze(1) * gs[k].unsqueeze(0)
        rt = rt - wt[k].unsqueeze(1) * gt[k].unsqueeze(0)
    return torch.tensor(chosen, dtype=torch.long, device=fs.device)


# ----------------------------------------------------------------------------------------------------------------
# 2. features, and the whole refresh


class PrototypeGenerator:
    """Samples instances once, then builds a :class:`PrototypeBank` from the live models on each :meth:`refresh`.

    Args:
        cfg: the ``distill.pgm`` section.
        pairs: the distilled levels.
        classes: class names (label i + 1 is ``classes[i]``), for messages.
        annotations: per training image ``(boxes [n, 4] original pixels, labels [n])`` (for sampling only).
        load: ``load(image_index) -> (image [3, H, W] float in [0, 1], target with "boxes" and "labels")``, the
            image at original size with its boxes in original pixels (the training split in eval mode).
        seed: sampling seed.
    """

    def __init__(self, cfg: PGMConfig, pairs: list[LevelPair], classes: list[str],
                 annotations: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 load: Callable[[int], tuple[torch.Tensor, dict[str, Any]]], seed: int):
        self.cfg, self.pairs, self.classes, self.load = cfg, pairs, list(classes), load
        self.samples = sample_images(annotations, len(classes), cfg.min_box_size, cfg.max_images_per_class, seed)
        self.images = sorted({i for imgs in self.samples.values() for i in imgs})
        #: classes without any valid instance: they get no prototypes (the task warns about them in the run log)
        self.empty_classes = [c for c, imgs in self.samples.items() if not imgs]
        self._teacher_cache: dict[str, torch.Tensor] | None = None
        self._labels_cache: torch.Tensor | None = None
        self._teacher_done = False  # (on every rank; only rank 0 of a process group holds the cache)

    def _batches(self) -> list[list[int]]:
        """The sampled images in the batches the extraction runs (``cfg.batch_size`` each)."""
        bs = max(1, self.cfg.batch_size)
        return [self.images[s:s + bs] for s in range(0, len(self.images), bs)]

    @torch.no_grad()
    def _extract(self, student, teacher, device, with_teacher: bool, batches: list[list[int]] | None = None):
        """Pooled features of every sampled instance of ``batches`` (default: all): ({key: [N, C]} student,
        teacher or None, labels [N])."""
        feats_s: dict[str, list[torch.Tensor]] = {p.key: [] for p in self.pairs}
        feats_t: dict[str, list[torch.Tensor]] = {p.key: [] for p in self.pairs}
        labels: list[torch.Tensor] = []
        for batch in (self._batches() if batches is None else batches):
            images, targets = [], []
            for i in batch:
                img, tgt = self.load(i)
                boxes, lab = tgt["boxes"].float(), tgt["labels"].long()
                # Every valid box of the image, whichever class it was sampled for: more instances, no extra pass.
                keep = _valid(boxes, self.cfg.min_box_size)
                images.append(img.to(device))
                targets.append({"boxes": boxes[keep].to(device), "labels": lab[keep].to(device)})
            x, tt = student.transform(images, targets)
            boxes5 = torch.cat([torch.cat([torch.full((len(t["boxes"]), 1), float(b), device=device), t["boxes"]], 1)
                                for b, t in enumerate(tt)])
            labels.append(torch.cat([t["labels"] for t in tt]).cpu())
            fs = student.backbone(x.tensors)
            ft = teacher.backbone(x.tensors) if with_teacher else None
            for p in self.pairs:
                feats_s[p.key].append(_pool(fs[p.student], boxes5, p.stride))
                if ft is not None:  # the teacher's FPN may be wider than the student's
                    feats_t[p.key].append(_pool(ft[p.teacher], boxes5, p.stride))
        cat = lambda d, c: {k: (torch.cat(v) if v else torch.zeros(0, c)) for k, v in d.items()}  # noqa: E731
        lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        return (cat(feats_s, student.gkd_meta["channels"]),
                cat(feats_t, teacher.gkd_meta["channels"]) if with_teacher else None, lab)

    def _extract_sharded(self, student, teacher, device, with_teacher: bool, ctx):
        """:meth:`_extract` with this rank's share of the batches; the whole result on rank 0 (None elsewhere),
        concatenated in batch order: the same tensors one process computes."""
        from ..distributed import gather_objects, shard_batches

        batches = self._batches()
        mine = [(i, self._extract(student, teacher, device, with_teacher, [batches[i]]))
                for i, _ in shard_batches(len(batches), 1, ctx.rank, ctx.world_size)]
        parts = gather_objects(mine)
        if parts is None:
            return None, None, None
        ordered = [r for _, r in sorted((item for part in parts for item in part), key=lambda item: item[0])]
        if not ordered:
            return self._extract(student, teacher, device, with_teacher, [])
        cat = lambda i: {p.key: torch.cat([r[i][p.key] for r in ordered]) for p in self.pairs}  # noqa: E731
        return cat(0), cat(1) if with_teacher else None, torch.cat([r[2] for r in ordered])

    def refresh(self, student: torch.nn.Module, teacher: torch.nn.Module,
                device: torch.device) -> tuple[PrototypeBank, dict[str, float]]:
        """Build prototypes from the current student (put in eval mode here, its BatchNorm layers in train mode
        with ``bn_mode: batch``; the caller restores train mode).

        In a process group every rank must call it (it is collective); every rank returns the same bank.

        Returns:
            ``(bank on device, metrics)``; metrics: ``pgm_time_s``, ``pgm_extract_s``, ``pgm_select_s``,
            ``pgm_images``, ``pgm_instances``, ``pgm_prototypes`` (total over levels).
        """
        from ..distributed import broadcast_object, current_context

        ctx = current_context()
        t0 = time.perf_counter()
        student.eval()
        teacher.eval()
        first = not self._teacher_done
        with (batch_statistics(student) if self.cfg.bn_mode == "batch" else nullcontext()):
            if ctx.enabled:
                fs, ft, labels = self._extract_sharded(student, teacher, device, first, ctx)
            else:
                fs, ft, labels = self._extract(student, teacher, device, with_teacher=first)
        self._teacher_done = True
        if not ctx.is_main:  # rank 0 selects; this rank takes its bank
            state, metrics = broadcast_object(None)
            return PrototypeBank.from_state(state).to(device), metrics
        if first:
            self._teacher_cache, self._labels_cache = ft, labels
        ft, labels = self._teacher_cache, self._labels_cache
        t1 = time.perf_counter()
        bank = self._select(fs, ft, labels)
        t2 = time.perf_counter()
        metrics = {"pgm_time_s": round(t2 - t0, 4), "pgm_extract_s": round(t1 - t0, 4),
                   "pgm_select_s": round(t2 - t1, 4), "pgm_images": len(self.images),
                   "pgm_instances": int(labels.numel()),
                   "pgm_prototypes": sum(bank.count(p.key) for p in self.pairs)}
        if ctx.enabled:
            broadcast_object((bank.state(), metrics))
        return bank.to(device), metrics

    def _select(self, fs: dict[str, torch.Tensor], ft: dict[str, torch.Tensor],
                labels: torch.Tensor) -> PrototypeBank:
        """Joint matching pursuit per (class, level) over the pooled features ``fs`` / ``ft`` ``[N, C]``."""
        bank = PrototypeBank()
        cfg = self.cfg
        for p in self.pairs:
            idx_all, lab_all = [], []
            for c in range(1, len(self.classes) + 1):
                members = (labels == c).nonzero().squeeze(1)
                if members.numel() == 0:
                    continue
                idx = joint_matching_pursuit(fs[p.key][members], ft[p.key][members], cfg.num_prototypes, cfg.alpha,
                                             cfg.density_bandwidth, cfg.density_percentile)
                idx_all.append(members[idx])
                lab_all.append(torch.full((idx.numel(),), c, dtype=torch.long))
            sel = torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.long)
            bank.student[p.key] = fs[p.key][sel]
            bank.teacher[p.key] = ft[p.key][sel]
            bank.labels[p.key] = torch.cat(lab_all) if lab_all else torch.zeros(0, dtype=torch.long)
        return bank


@contextmanager
def batch_statistics(model: torch.nn.Module):
    """Inside: ``model``'s BatchNorm layers normalise with each batch's own statistics (train mode), as in a
    training step; on exit their running statistics are restored, bit for bit, and they are back in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        for m in bns:
            m.train()
        yield
    finally:
        for m, buffers in zip(bns, saved):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
            m.eval()


def _pool(fmap: torch.Tensor, boxes5: torch.Tensor, stride: int) -> torch.Tensor:
    """``[N, C]`` float32 CPU: each box's crop of ``fmap [B, C, H, W]`` average-pooled (the op's first output)."""
    dummy = torch.zeros(1, fmap.shape[1], device=fmap.device, dtype=fmap.dtype)
    return prototype_project(fmap, boxes5, stride, dummy)[0].float().cpu()
