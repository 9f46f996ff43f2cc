#!/usr/bin/env bash
# Build gkd as a wheel, install it into a clean virtual environment and use it from outside the repository:
# `gkd --help`, `python -m gkd --help`, the packaged configs, and a tiny `gkd data synth` -> `gkd train` ->
# `gkd distill` on the CPU. Run by .ci/run after the tests; needs scripts/setup.sh to have run (.venv).
#
# The clean venv reuses the pinned torch of .venv instead of installing another 5.5 GB copy: every distribution in
# .venv's site-packages except gkd itself is linked into it, so pip sees torch & co. as installed there and the
# wheel's own requirements are resolved for real (nothing is downloaded when they are met). The extension is built
# CPU-only here (GKD_CPU_ONLY=1) to keep the check short; the CUDA build is the same code path with nvcc added.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gkd-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "[check_wheel] $*"; }
quiet() { "$@" > "$WORK/out.log" 2>&1 || { cat "$WORK/out.log"; say "FAILED: $*"; exit 1; }; }

say "building the wheel (CPU-only extension)"
rm -rf build/lib*  # setuptools would pack stale files left there by an earlier build (object files are kept)
quiet env GKD_CPU_ONLY=1 .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/gkd-*.whl)
say "built $(basename "$WHEEL"): $(.venv/bin/python -m zipfile -l "$WHEEL" | grep -c '\.py ') Python files"
.venv/bin/python - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["gkd/kd/distill/losses/__init__.py", "gkd/export/pipeline.py", "gkd/bench/latency.py",
        "gkd/kd/configs/distill_gkd.yaml", "gkd/kd/configs/study/teacher.yaml"]
missing = [n for n in need if n not in names]
stray = sorted({n.split("/")[0] for n in names if not n.startswith(("gkd/", "gkd-"))})
assert not missing and not stray, f"wheel: missing {missing}, top-level names other than gkd: {stray}"
assert any(n.startswith("gkd/kd/_C") and n.endswith(".so") for n in names), "wheel: no compiled extension"
EOF

say "clean venv in $WORK/venv, reusing .venv's packages (not gkd)"
python3 -m venv "$WORK/venv"
SRC=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DST=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for entry in "$SRC"/*; do
    name=$(basename "$entry")
    case "$name" in
        gkd|gkd-*|__editable__*gkd*|pip|pip-*|_distutils_hack|distutils-precedence.pth|setuptools|setuptools-*) ;;
        *) [ -e "$DST/$name" ] || ln -s "$entry" "$DST/$name" ;;
    esac
done
quiet "$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL"

cd "$WORK"  # outside the repository: nothing can be imported from the checkout
GKD="$WORK/venv/bin/gkd"
PY="$WORK/venv/bin/python"
"$PY" - "$REPO" <<'EOF'
import sys
import gkd, gkd.kd, gkd.export, gkd.bench, gkd.kd._ops as ops
repo = sys.argv[1]
for m in (gkd, gkd.kd, gkd.export, gkd.bench):
    assert "site-packages" in m.__file__ and not m.__file__.startswith(repo), m.__file__
assert ops.has_ops(), ops.backend_summary()
print("[check_wheel] imports from", gkd.__file__, "| operator:", ops.backend_summary())
EOF
"$GKD" --help > /dev/null
"$PY" -m gkd --help > /dev/null
CONFIGS=$("$PY" -c "from gkd.kd import CONFIG_DIR; print(CONFIG_DIR)")
TINY=(model.backbone=resnet18 model.min_size=64 model.max_size=64 "model.anchor_sizes=[8,16,32,64,128]"
      model.rois_per_image=32 model.fpn_channels=64 model.box_head_dim=128 train.batch_size=2 train.warmup_iters=0
      train.max_steps_per_epoch=2 train.epochs=1 train.threads=1 eval.batch_size=4 runs_dir=runs data.root=data)
say "tiny gkd data synth -> gkd train -> gkd distill with the packaged configs ($CONFIGS)"
quiet "$GKD" data synth --out data --images 10 --size 64
quiet "$GKD" train "$CONFIGS/teacher.yaml" --no-progress "${TINY[@]}" name=teacher
quiet "$GKD" distill "$CONFIGS/distill_gkd.yaml" --no-progress "${TINY[@]}" name=student \
    distill.teacher.checkpoint=runs/teacher/checkpoints/model.pt distill.teacher.backbone=resnet18 \
    distill.pgm.min_box_size=4 distill.pgm.num_prototypes=2 distill.pgm.max_images_per_class=4
test -f runs/student/checkpoints/model.pt
say "OK: the wheel installs, imports as gkd.*, and distills"
