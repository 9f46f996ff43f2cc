"""``DistillationTask``: the student, its adapters and the frozen teacher as one task for ``gkd.kd.engine.fit``.

One training step (docs/method.md, section 2.4), for a batch of images and targets:

1. The student's transform runs once; both backbones see that same normalised, resized, padded tensor.
2. Student: FPN, then its own detection losses computed by its own submodules (Faster R-CNN: rpn,
   ``roi_heads.select_training_samples``, ``box_roi_pool``, ``box_head``, ``box_predictor``, ``fastrcnn_loss``;
   RetinaNet: head, anchor_generator, ``compute_loss``). The *instances* of the step are the positive RoIs of the
   student's R-CNN sampler (GT boxes included, as the reference) or RetinaNet's positive anchors.
3. Teacher (eval mode, no_grad, frozen): FPN on the same tensor; its classification logits on the same instances.
4. Per distilled level (paired by stride): pooled instance features and cosine similarities to the prototypes
   (the prototype-projection operator), robust weights, the robust-weighted fg mask, decoupled fg/bg imitation
   through the adapter, the global-knowledge loss; then the robust-weighted soft-label KL.

The loss dict holds every term (``loss_*``, backpropagated) and metrics (``robust_weight_mean``, ``kd_instances``).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from gkd.core.errors import GkdError

from ..task import loss_terms, with_total
from .adapters import Adapters
from .config import DistillConfig, method_parts, resolve_scale, uses_prototypes
from .levels import LevelPair, assign_levels, pair_levels
from .losses import decoupled_imitation, global_relation_loss, pkd_loss, soft_label_kl, weighted_box_mask
from .ops import prototype_project
from .pgm import PrototypeBank, PrototypeGenerator
from .recorders import capture_calls
from .robust import robust_weights

__all__ = ["DistillationTask"]

log = logging.getLogger("gkd")


class DistillationTask(nn.Module):
    """Student + adapters (trainable) and a frozen teacher.

    ``part_timer`` (None: untimed): a ``name -> context manager`` that each distillation part of a step runs in
    (prototype projection, fg masks, fg/bg imitation, soft-label KL, global loss): ``gkd bench distill`` times
    them with it.

    Args:
        student: a torchvision Faster R-CNN or RetinaNet from ``build_detector`` (has ``gkd_meta``).
        teacher: the same kind of detector with the same classes (None only for method ``none``).
        cfg: the ``distill`` section.
        epochs: total epochs (for the attenuation 1 - epoch / epochs).
        classes: class names (label i + 1 = ``classes[i]``).
        pgm_annotations / pgm_load / seed: the training split for the Prototype Generation Module (see
            :class:`PrototypeGenerator`); required when the method uses prototypes.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig, *, epochs: int,
                 classes: Sequence[str], pgm_annotations: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 pgm_load: Callable[[int], tuple[torch.Tensor, dict]] | None = None, seed: int = 0):
        super().__init__()
        self.part_timer: Callable[[str], ContextManager] | None = None
        # the scale-dependent defaults (level rule, PGM's minimum box) from the student's input size
        cfg = resolve_scale(cfg, min(student.transform.min_size))
        self.cfg = cfg
        self.parts = method_parts(cfg.method)
        #: prototypes are built: the method needs them, or the global discrepancy is monitored
        self.uses_bank = uses_prototypes(cfg)
        #: training steps taken (forward calls in train mode): the step-interval refresh counts them
        self.steps_done = 0
        self.epochs = max(1, int(epochs))
        self.epoch = 0
        self._announced = False
        self.classes = list(classes)
        self.arch = student.gkd_meta["arch"]
        self.detector = student
        self.pairs: list[LevelPair] = []
        self.level_notes: list[str] = []
        self.bank: PrototypeBank | None = None
        self.pgm: PrototypeGenerator | None = None
        if not self.parts.teacher:
            self.adapters = None
            self.teacher = None
            return
        if teacher is None:
            raise GkdError(f"distill.teacher.checkpoint: method '{cfg.method}' needs a teacher")
        _check_compatible(student, teacher)
        if self.parts.pkd and student.gkd_meta["channels"] != teacher.gkd_meta["channels"]:
            raise GkdError(f"distill.method={cfg.method}: PKD compares feature maps channel by channel; the student's "
                           f"FPN is {student.gkd_meta['channels']} wide, the teacher's "
                           f"{teacher.gkd_meta['channels']} (model.fpn_channels must match)")
        self.pairs, self.level_notes = pair_levels(student.gkd_meta["strides"], teacher.gkd_meta["strides"],
                                                   cfg.strides)
        self.adapters = (Adapters([p.key for p in self.pairs], student.gkd_meta["channels"],
                                  teacher.gkd_meta["channels"], kernel=cfg.adapter_kernel)
                         if self.parts.local else None)
        # Registered last: parameter order (student, adapters) is what the optimizer state relies on.
        self.teacher = teacher
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.uses_bank:
            if pgm_annotations is None or pgm_load is None:
                raise ValueError(f"method '{cfg.method}' needs the training split for prototype generation")
            pgm_seed = cfg.pgm.seed if cfg.pgm.seed is not None else seed
            self.pgm = PrototypeGenerator(cfg.pgm, self.pairs, self.classes, pgm_annotations, pgm_load, pgm_seed)
        self.pkd_weight = cfg.pkd_weight if cfg.pkd_weight is not None else (10.0 if self.arch == "retinanet" else 6.0)

    # ------------------------------------------------------------------------------------------------------------
    # task protocol

    def train(self, mode: bool = True) -> "DistillationTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics, dropout, and torchvision's eval-mode paths stay fixed
        return self

    def attenuation(self) -> float:
        """1 - epoch / epochs on the feature and global losses (1 when ``distill.attenuation`` is off)."""
        return 1.0 - self.epoch / self.epochs if self.cfg.attenuation else 1.0

    def on_epoch_start(self, epoch: int, context: dict[str, Any]) -> dict[str, float]:
        """Set the epoch (attenuation) and refresh the prototypes when due. Returns metrics for the log."""
        self.epoch = int(epoch)
        if not self._announced:  # here rather than in __init__: the run's log file is open by now
            self._announced = True
            self._log_setup()
        metrics: dict[str, float] = {"kd_attenuation": self.attenuation()}
        if self.pgm is not None:
            by_steps = self.cfg.pgm.interval_steps is not None
            due = self.bank is None or (not by_steps and epoch % max(1, self.cfg.pgm.interval) == 0)
            if due:
                device = context.get("device") or next(self.detector.parameters()).device
                metrics.update(self._refresh(torch.device(device), f"epoch {epoch + 1}"))
            metrics["pgm_refreshed"] = float(due)
        return metrics

    def _refresh(self, device: torch.device, when: str) -> dict[str, float]:
        """Rebuild the prototype bank from the live student (collective in a process group). Returns its metrics."""
        from ..distributed import current_context, verify_identical

        self.bank, pgm_metrics = self.pgm.refresh(self.detector, self.teacher, device)
        if current_context().enabled:
            # every rank must distil against the same bank: logged per rank, compared, stopped if not
            verify_identical(f"prototype bank of {when}", self.bank.sha256())
        log.info("prototypes refreshed (%s) in %.2fs: %d per level from %d instances in %d images", when,
                 pgm_metrics["pgm_time_s"], pgm_metrics["pgm_prototypes"] // max(1, len(self.pairs)),
                 pgm_metrics["pgm_instances"], pgm_metrics["pgm_images"])
        return pgm_metrics

    def _step_refresh(self, device: torch.device) -> bool:
        """Refresh before this step when ``pgm.interval_steps`` says so; the student goes back to train mode."""
        n = self.cfg.pgm.interval_steps
        if self.pgm is None or n is None or self.steps_done == 0 or self.steps_done % n:
            return False
        self._refresh(device, f"step {self.steps_done}")
        self.detector.train()
        return True

    def _log_setup(self) -> None:
        if self.pairs:
            log.info("distilling with '%s' at strides %s (student levels %s -> teacher levels %s)", self.cfg.method,
                     [p.stride for p in self.pairs], [p.student for p in self.pairs], [p.teacher for p in self.pairs])
        for note in self.level_notes:
            log.info("%s", note)
        if self.pairs:
            log.info("level rule: canonical size %.4g px (distill.level_canonical_size), boxes under %.4g px on the "
                     "finest level", self.cfg.level_canonical_size, 2 * self.cfg.level_canonical_size)
        if self.pgm is not None:
            log.info("prototypes from boxes above %.4g px (distill.pgm.min_box_size), refreshed every %s, BatchNorm "
                     "in %s mode", self.cfg.pgm.min_box_size,
                     f"{self.cfg.pgm.interval_steps} steps" if self.cfg.pgm.interval_steps else
                     f"{self.cfg.pgm.interval} epoch(s)", self.cfg.pgm.bn_mode)
            for c in self.pgm.empty_classes:
                log.warning("class '%s' has no box larger than %g px (distill.pgm.min_box_size): no prototypes; "
                            "its instances get robust weight 1 and no global-knowledge term", self.classes[c - 1],
                            self.cfg.pgm.min_box_size)

    def extra_state(self) -> dict[str, Any]:
        """Adapters' weights and the prototypes in use (tensors and plain values only)."""
        state: dict[str, Any] = {"method": self.cfg.method}
        if self.pgm is not None:  # the step-interval refresh resumes on the same schedule
            state["steps_done"] = self.steps_done
        if getattr(self, "teacher_sha256", None):
            state["teacher_sha256"] = self.teacher_sha256
        if self.adapters is not None:
            state["adapters"] = {k: v.detach().cpu() for k, v in self.adapters.state_dict().items()}
        if self.bank is not None:
            state["prototypes"] = self.bank.state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("method", self.cfg.method) != self.cfg.method:
            raise GkdError(f"checkpoint was made with distill.method '{state['method']}', this run uses "
                           f"'{self.cfg.method}'")
        mine, saved = getattr(self, "teacher_sha256", None), state.get("teacher_sha256")
        if mine and saved and mine != saved:
            raise GkdError(f"distill.teacher.checkpoint: {self.cfg.teacher.checkpoint} is not the file this run "
                           f"started with (sha256 {mine[:12]}, was {saved[:12]}); resuming would mix two teachers: "
                           f"restore that file or start a new run (name=...)")
        self.steps_done = int(state.get("steps_done", 0))
        if self.adapters is not None:
            if "adapters" not in state:
                raise GkdError("checkpoint holds no adapter weights for this distillation method")
            self.adapters.load_state_dict(state["adapters"])
        if self.pgm is not None and "prototypes" in state:
            device = next(self.detector.parameters()).device
            self.bank = PrototypeBank.from_state(state["prototypes"]).to(device)

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One training step's losses.

        Args:
            images: list of ``[3, H, W]`` float images in [0, 1]; targets: per image ``boxes [n, 4]``, ``labels [n]``.

        Returns:
            ``{"loss": total, "loss_<detection term>": ..., "loss_kd_<term>": ..., <metrics>}``.
        """
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        if self.teacher is None:  # "none": exactly the detector's own training forward
            return with_total(loss_terms(self.detector(images, targets)))
        student = self.detector
        refreshed = self.training and self._step_refresh(images[0].device)
        if self.training:
            self.steps_done += 1
        x, tgts = student.transform(images, targets)
        feats = student.backbone(x.tensors)
        with torch.no_grad():
            tfeats = self.teacher.backbone(x.tensors)
        if self.arch == "retinanet":
            det, inst = self._retinanet_step(x, tgts, feats, tfeats)
        else:
            det, inst = self._faster_rcnn_step(x, tgts, feats, tfeats)
        kd = self._distill(x.tensors.shape[0], feats, tfeats, inst)
        out = loss_terms(det)
        out.update({k: v for k, v in kd.items() if k.startswith("loss")})
        out["loss"] = sum(out.values())
        out.update({k: v for k, v in kd.items() if not k.startswith("loss")})
        if self.cfg.pgm.interval_steps is not None and self.pgm is not None:
            out["pgm_refreshed"] = torch.tensor(float(refreshed), device=x.tensors.device)
        return out

    def _faster_rcnn_step(self, x, tgts, feats, tfeats):
        from torchvision.models.detection.roi_heads import fastrcnn_loss

        student, rh = self.detector, self.detector.roi_heads
        proposals, rpn_losses = student.rpn(x, feats, tgts)
        props, _, labels, reg_targets = rh.select_training_samples(proposals, tgts)
        logits, box_reg = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, props, x.image_sizes)))
        loss_cls, loss_box = fastrcnn_loss(logits, box_reg, labels, reg_targets)
        det = {"loss_classifier": loss_cls, "loss_box_reg": loss_box, **rpn_losses}
        # Positive RoIs, image by image (their order matches the logits' rows).
        pos_boxes = [p[lab > 0] for p, lab in zip(props, labels)]
        pos = torch.cat(labels) > 0
        inst = _Instances.build(pos_boxes, [lab[lab > 0] for lab in labels])
        inst.student_logits = logits[pos]
        if self.parts.local and inst.n:
            with torch.no_grad():
                th = self.teacher.roi_heads
                inst.teacher_logits = th.box_predictor(th.box_head(th.box_roi_pool(tfeats, pos_boxes,
                                                                                   x.image_sizes)))[0]
        inst.level = assign_levels(inst.boxes[:, 1:], len(self.pairs), self.cfg.level_canonical_size)
        inst.soft_level = inst.level
        return det, inst

    def _retinanet_step(self, x, tgts, feats, tfeats):
        student = self.detector
        flist = list(feats.values())
        head_out = student.head(flist)
        anchors = student.anchor_generator(x, flist)
        with capture_calls(student.head, "compute_loss") as calls:
            det = student.compute_loss(tgts, head_out, anchors)
        matched = calls[0][0][3]  # head.compute_loss(targets, head_outputs, anchors, matched_idxs)
        names = list(feats.keys())
        a = student.anchor_generator.num_anchors_per_location()[0]
        counts = [f.shape[-2] * f.shape[-1] * a for f in flist]
        starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
        level_of_anchor = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(x.tensors.device)
        boxes, labels, lvl, idx_img, idx_anchor = [], [], [], [], []
        for i, m in enumerate(matched):
            p = (m >= 0).nonzero().squeeze(1)  # anchor order = logits order (level-major), per image
            boxes.append(anchors[i][p])
            labels.append(tgts[i]["labels"][m[p]])
            lvl.append(level_of_anchor[p])
            idx_img.append(torch.full_like(p, i))
            idx_anchor.append(p)
        inst = _Instances.build(boxes, labels)
        lvl, idx_img, idx_anchor = torch.cat(lvl), torch.cat(idx_img), torch.cat(idx_anchor)
        # K dataset classes: torchvision's RetinaNet column 0 (background) is never positive, so it is left out.
        inst.student_logits = head_out["cls_logits"][idx_img, idx_anchor][:, 1:]
        inst.level = assign_levels(inst.boxes[:, 1:], len(self.pairs), self.cfg.level_canonical_size)
        stride_pair = {p.stride: j for j, p in enumerate(self.pairs)}
        s_strides = self.detector.gkd_meta["strides"]
        inst.soft_level = torch.tensor([stride_pair.get(s_strides[n], -1) for n in names],
                                       device=lvl.device, dtype=torch.long)[lvl] if inst.n else lvl
        if self.parts.local and inst.n:
            inst.soft_valid, inst.teacher_logits = self._retinanet_teacher_logits(names, counts, starts, lvl,
                                                                                  idx_img, idx_anchor, tfeats)
        return det, inst

    @torch.no_grad()
    def _retinanet_teacher_logits(self, names, counts, starts, lvl, idx_img, idx_anchor, tfeats):
        """Teacher logits at the student's positive anchors: same stride, same cell, same anchor index."""
        t_by_stride: dict[int, str] = {}
        for n, s in self.teacher.gkd_meta["strides"].items():
            t_by_stride.setdefault(int(s), n)
        s_strides = self.detector.gkd_meta["strides"]
        valid = torch.zeros_like(lvl, dtype=torch.bool)
        out = None
        head = self.teacher.head.classification_head
        for li, name in enumerate(names):
            sel = (lvl == li).nonzero().squeeze(1)
            tname = t_by_stride.get(int(s_strides[name]))
            if sel.numel() == 0 or tname is None:
                continue
            tl = head([tfeats[tname]])  # [B, H*W*A, K + 1], (h, w, a) order as the student's level
            if tl.shape[1] != counts[li]:
                continue  # different map size (only possible for unusual strides): no soft label here
            rows = tl[idx_img[sel], idx_anchor[sel] - starts[li]][:, 1:]
            if out is None:
                out = rows.new_zeros((lvl.numel(), rows.shape[1]))
            out[sel] = rows
            valid[sel] = True
        if out is None:
            out = torch.zeros((lvl.numel(), len(self.classes)), device=lvl.device)
        return valid, out

    def _part(self, name: str) -> ContextManager:
        return self.part_timer(name) if self.part_timer is not None else nullcontext()

    def _distill(self, batch: int, feats, tfeats, inst: "_Instances") -> dict[str, torch.Tensor]:
        cfg, parts = self.cfg, self.parts
        att = self.attenuation()
        dev = inst.boxes.device
        fg_terms, bg_terms, glob_terms, pkd_terms, weights_seen, discrepancy = [], [], [], [], [], []
        soft_w = torch.ones(inst.n, device=dev)
        #: each instance's robust weight at its own level (the one its fg mask and soft label use)
        own_w = torch.ones(inst.n, device=dev)
        for li, p in enumerate(self.pairs):
            s_map, t_map = feats[p.student], tfeats[p.teacher]
            w = torch.ones(inst.n, device=dev)
            use_protos = self.uses_bank and self.bank is not None and self.bank.count(p.key) > 0 and inst.n > 0
            if use_protos:
                # The global loss needs the student's cosine vectors with gradient; robust weights alone do not.
                with self._part("prototype projection (op)"):
                    with torch.set_grad_enabled(parts.global_ and torch.is_grad_enabled()):
                        _, cos_s = prototype_project(s_map, inst.boxes, p.stride, self.bank.student[p.key])
                    with torch.no_grad():
                        _, cos_t = prototype_project(t_map, inst.boxes, p.stride, self.bank.teacher[p.key])
                w, has = robust_weights(cos_s, cos_t, inst.labels, self.bank.labels[p.key])
                w = w.float()  # under CUDA autocast the cosines are half; the weights mix with float32 tensors
                weights_seen.append(w)
                own_w[inst.level == li] = w[inst.level == li]
                if has.any():
                    if parts.global_:
                        with self._part("global loss"):
                            glob_terms.append(global_relation_loss(cos_s[has], cos_t[has], w[has]))
                        discrepancy.append(glob_terms[-1].detach())
                    else:  # monitored only: the same quantity, no gradient
                        with torch.no_grad():
                            discrepancy.append(global_relation_loss(cos_s[has], cos_t[has], w[has]))
            if parts.local:
                on_level = inst.level == li
                mask_w = w[on_level] if parts.robust else torch.ones(int(on_level.sum()), device=dev)
                with self._part("fg masks"):
                    mask = weighted_box_mask(inst.boxes[on_level], mask_w, p.stride,
                                             (batch, s_map.shape[-2], s_map.shape[-1]))
                adapted = self.adapters(p.key, s_map)
                with self._part("fg/bg imitation"):
                    fg, bg = decoupled_imitation(adapted, t_map, mask)
                fg_terms.append(fg)
                bg_terms.append(bg)
                if parts.robust:
                    at_level = inst.soft_level == li
                    soft_w[at_level] = w[at_level]
            if parts.pkd:
                pkd_terms.append(pkd_loss(s_map, t_map))
        out: dict[str, torch.Tensor] = {}
        zero = next(iter(feats.values())).sum() * 0.0
        if parts.local:
            out["loss_kd_fg"] = torch.stack(fg_terms).mean() * (cfg.fg_weight * att)
            out["loss_kd_bg"] = torch.stack(bg_terms).mean() * (cfg.bg_weight * att)
            valid = inst.soft_valid if inst.soft_valid is not None else torch.ones(inst.n, dtype=torch.bool,
                                                                                      device=dev)
            if inst.n and inst.teacher_logits is not None and valid.any():
                with self._part("soft-label KL"):
                    out["loss_kd_soft"] = soft_label_kl(inst.student_logits[valid], inst.teacher_logits[valid],
                                                        soft_w[valid], cfg.temperature) * cfg.soft_weight
            else:
                out["loss_kd_soft"] = zero
        if parts.global_:
            out["loss_kd_global"] = (torch.stack(glob_terms).sum() if glob_terms else zero) * (cfg.global_weight * att)
        if parts.pkd:
            out["loss_kd_pkd"] = torch.stack(pkd_terms).sum() * self.pkd_weight
        if self.uses_bank:
            allw = torch.cat(weights_seen) if weights_seen else torch.ones(0, device=dev)
            out["robust_weight_mean"] = allw.mean() if allw.numel() else torch.ones((), device=dev)
            out["kd_global_discrepancy"] = (torch.stack(discrepancy).sum() if discrepancy
                                            else torch.zeros((), device=dev))
            out.update(self._weight_sums(inst, own_w))
        out["kd_instances"] = torch.tensor(float(inst.n), device=dev)
        for li, p in enumerate(self.pairs):  # how the level rule spreads the step's instances over the pyramid
            out[f"kd_instances_{p.key}"] = (inst.level == li).sum().float() if inst.n else torch.zeros((), device=dev)
        return out

    def _weight_sums(self, inst: "_Instances", own_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums of the robust weights (each instance's at its own level) and their counts, per level
        (``kd_rw_sum_s8`` / ``kd_rw_n_s8``) and per class (``kd_rw_sum_c<label>`` / ``kd_rw_n_c<label>``): the
        logged epoch averages of a sum and of its count divide into the epoch's mean weight. Every key is present
        at every step (ranks of a process group reduce the same keys)."""
        out = {}
        groups = [(p.key, inst.level == li) for li, p in enumerate(self.pairs)]
        groups += [(f"c{c}", inst.labels == c) for c in range(1, len(self.classes) + 1)]
        for name, sel in groups:
            out[f"kd_rw_sum_{name}"] = own_w[sel].sum() if inst.n else own_w.new_zeros(())
            out[f"kd_rw_n_{name}"] = sel.sum().float() if inst.n else own_w.new_zeros(())
        return out


class _Instances:
    """The step's instances: ``boxes [N, 5]`` (batch index, xyxy), ``labels [N]``, their levels and logits."""

    def __init__(self, boxes: torch.Tensor, labels: torch.Tensor):
        self.boxes, self.labels = boxes, labels
        self.level = self.soft_level = None
        self.student_logits = self.teacher_logits = None
        self.soft_valid = None

    @property
    def n(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def build(cls, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> "_Instances":
        b5 = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=b.device, dtype=b.dtype), b], dim=1)
                        for i, b in enumerate(boxes)])
        return cls(b5.detach(), torch.cat(labels).long())


def _check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Same detector kind, same label space, same input normalisation, same anchors per location (RetinaNet)."""
    sm, tm = student.gkd_meta, teacher.gkd_meta
    if sm["arch"] != tm["arch"]:
        raise GkdError(f"distill.teacher: the teacher is a {tm['arch']} and the student (model.arch) a {sm['arch']}; "
                       f"soft labels need the same detector kind")
    if sm["num_classes"] != tm["num_classes"]:
        raise GkdError(f"distill.teacher: the teacher has {tm['num_classes']} classes, the student "
                       f"{sm['num_classes']}; teacher and student must share the label space")
    st, tt = student.transform, teacher.transform
    if list(st.image_mean) != list(tt.image_mean) or list(st.image_std) != list(tt.image_std):
        raise GkdError("distill.teacher: teacher and student normalise images differently; both must see the same "
                       "input tensor")
    if sm["arch"] == "retinanet":
        a_s = student.anchor_generator.num_anchors_per_location()
        a_t = teacher.anchor_generator.num_anchors_per_location()
        if a_s[0] != a_t[0]:
            raise GkdError(f"distill.teacher: RetinaNet teacher has {a_t[0]} anchors per location, the student "
                           f"{a_s[0]}; soft labels pair anchors one to one")
