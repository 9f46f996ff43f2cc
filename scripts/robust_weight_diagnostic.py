"""Does the robust weight single out the instances where the teacher's local knowledge is noisy?

For every ground-truth instance of the synthetic train split, at its distillation level (all at stride 4 here):
the robust weight w = clamp(1 - |max cos(f_s, P_s[c]) - max cos(f_t, P_t[c])|, 0, 1) with prototypes built by the
toolkit's own PrototypeGenerator from the given student and the teacher, exactly as at a refresh. Instances are
grouped by their difficulty tags and by whether the teacher detects them (a detection of the right class with
IoU >= 0.5 and score >= 0.3): the paper's premise is that w is low where the teacher is wrong.

    .venv/bin/python scripts/robust_weight_diagnostic.py STUDENT.pt [STUDENT.pt ...]

Needs a study's teacher (runs/study/teacher, made by `gkd study`) and its data (data/synth here). The figures in
docs/measurements/robust_weight_diagnostic.json were made with the lineage-teacher study's student initialisation
and its seed-0 `local`, `robust` and `gkd` students (runs/study/student-init and runs/study/students/*-s0,
checkpoints/model.pt; docs/study_notes.md, "Other recorded variants"). `python -m gkd.kd.distill.audit` is the
maintained tool for the same question on any run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

from gkd.kd.checkpoint import load_detector
from gkd.kd.config import load_config
from gkd.kd.data import CocoDetection, load_coco
from gkd.kd.distill.config import DistillRunConfig
from gkd.kd.distill.levels import assign_levels, pair_levels
from gkd.kd.distill.ops import prototype_project
from gkd.kd.distill.pgm import PrototypeGenerator
from gkd.kd.distill.robust import robust_weights

torch.set_num_threads(2)
TEACHER = Path("runs/study/teacher/checkpoints/model.pt")
DATA = Path("data/synth")


@torch.no_grad()
def main(students: list[str]) -> None:
    cfg = load_config(Path("kd/configs/study/distill.yaml"), [], cls=DistillRunConfig)
    index = load_coco(DATA / "train.json")
    ds = CocoDetection(index, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size)
    anns = json.loads((DATA / "train.json").read_text())
    tags_by_image: dict[int, list[dict]] = {}
    for a in anns["annotations"]:
        tags_by_image.setdefault(a["image_id"], []).append(a["attributes"])
    teacher, _ = load_detector(TEACHER)
    teacher.eval()
    out = {}
    for path in students:
        student, _ = load_detector(Path(path))
        student.eval()
        pairs, _ = pair_levels(student.gkd_meta["strides"], teacher.gkd_meta["strides"], ())
        annotations = [tuple(torch.from_numpy(a) for a in ds.target_boxes(i)) for i in range(len(ds))]
        pgm = PrototypeGenerator(cfg.distill.pgm, pairs, index.classes, annotations, ds.__getitem__, seed=0)
        bank, _ = pgm.refresh(student, teacher, torch.device("cpu"))
        rows = []
        for i in range(len(ds)):
            img, tgt = ds[i]
            boxes, labels = tgt["boxes"].float(), tgt["labels"].long()
            x, tt = student.transform([img], [{"boxes": boxes, "labels": labels}])
            b5 = torch.cat([torch.zeros(len(tt[0]["boxes"]), 1), tt[0]["boxes"]], 1)
            fs, ft = student.backbone(x.tensors), teacher.backbone(x.tensors)
            level = assign_levels(b5[:, 1:], len(pairs))
            w = torch.ones(len(b5))
            for j, p in enumerate(pairs):
                sel = level == j
                if not sel.any():
                    continue
                _, cs = prototype_project(fs[p.student], b5[sel], p.stride, bank.student[p.key])
                _, ct = prototype_project(ft[p.teacher], b5[sel], p.stride, bank.teacher[p.key])
                w[sel] = robust_weights(cs, ct, labels[sel], bank.labels[p.key])[0]
            det = teacher([img])[0]
            keep = det["scores"] >= 0.3
            iou = box_iou(boxes, det["boxes"][keep]) if keep.any() else torch.zeros(len(boxes), 0)
            same = labels.view(-1, 1) == det["labels"][keep].view(1, -1)
            found = ((iou >= 0.5) & same).any(1) if iou.numel() else torch.zeros(len(boxes), dtype=torch.bool)
            tags = tags_by_image.get(tgt["image_id"], [])
            # the eval-mode dataset keeps every box in annotation order: check, never pair tags with the wrong box
            assert len(tags) == len(boxes), (tgt["image_id"], len(tags), len(boxes))
            for k, t in enumerate(tags):
                rows.append({"w": float(w[k]), "teacher_found": bool(found[k]), **t})
        def stats(sel):
            ws = torch.tensor([r["w"] for r in rows if sel(r)])
            return {"n": len(ws), "mean": round(float(ws.mean()), 3) if len(ws) else None,
                    "p10": round(float(ws.quantile(0.1)), 3) if len(ws) else None}
        groups = {"all": lambda r: True,
                  "clean (no tag)": lambda r: not (r["small"] or r["occluded"] or r["blurred"]),
                  "small": lambda r: r["small"], "occluded": lambda r: r["occluded"],
                  "blurred": lambda r: r["blurred"],
                  "teacher detects it": lambda r: r["teacher_found"],
                  "teacher misses it": lambda r: not r["teacher_found"]}
        out[path] = {name: stats(sel) for name, sel in groups.items()}
        print(path)
        for name, s in out[path].items():
            print(f"  {name:20s} n={s['n']:5d}  mean w={s['mean']}  10th percentile={s['p10']}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
