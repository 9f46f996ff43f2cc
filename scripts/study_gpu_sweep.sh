#!/bin/bash
# The teacher-recipe sweep of docs/measurements/study_gpu_h100.md (section 1): eight recipes side by side on one GPU,
# 12 epochs each, evaluated every epoch. Run from the repository root on a GPU machine without network access, with a
# pycocotools wheel for its Python in .whl/; results go to sweep/ and, packed, to $OUT (default: the current folder).
# The recipes start from kd/configs/study/base_teacher.yaml (ResNet-50 FPN-256, SGD lr 0.02) and override it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
python3 -c 'from gkd.cli import main; main()' data synth --out data/synth --preset cluttered --images 800 --seed 0 --size 160 --val-fraction 0.2 >/dev/null || exit 1
run() { name=$1; shift; python3 -c 'from gkd.cli import main; main()' train kd/configs/study/base_teacher.yaml name=$name runs_dir=sweep train.epochs=12 "train.steps=[9,11]" train.threads=2 "$@" > sweep_$name.log 2>&1; echo "$name rc=$?"; }
run r50_256 &
run r50_128 model.fpn_channels=128 model.box_head_dim=512 &
run r50_128_adamw model.fpn_channels=128 model.box_head_dim=512 train.optimizer=adamw train.lr=0.001 train.weight_decay=0.05 &
run r34_128 model.backbone=resnet34 model.fpn_channels=128 model.box_head_dim=512 &
run r18_128 model.backbone=resnet18 model.fpn_channels=128 model.box_head_dim=256 &
run r18_128_adamw model.backbone=resnet18 model.fpn_channels=128 model.box_head_dim=256 train.optimizer=adamw train.lr=0.001 train.weight_decay=0.05 &
run r50_128_lr04 model.fpn_channels=128 model.box_head_dim=512 train.lr=0.04 &
run r18_64 model.backbone=resnet18 model.fpn_channels=64 model.box_head_dim=256 &
wait
for f in sweep/*/metrics.jsonl; do echo "== $f"; python3 - "$f" <<'PY'
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if 'bbox_mAP' in r or any(k.startswith('val') for k in r): print({k:(round(v,4) if isinstance(v,float) else v) for k,v in r.items() if 'mAP' in k or k in ('epoch','step','loss','time_s')})
PY
done
tail -n 3 sweep_*.log
OUT=${OUT:-.}; mkdir -p "$OUT" && tar czf "$OUT/sweep.tgz" sweep/*/metrics.jsonl sweep_*.log
