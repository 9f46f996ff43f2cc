"""`gkd bench distill` runs end to end on a tiny dataset and reports every variant, the breakdown and the refresh.
(No timing is asserted: timings are what the benchmark reports, not what a unit test checks.)"""
import json

import pytest
import torch

from gkd.cli import main
from gkd.kd.data import generate_synthetic
from tests.helpers import TEST_THREADS


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


def test_bench_distill_reports_variants_breakdown_and_refresh(tmp_path, capsys):
    generate_synthetic(tmp_path / "data", n_images=8, seed=0, image_size=64, val_fraction=0.25)
    out = tmp_path / "bench.json"
    rc = main(["bench", "distill", f"data.root={tmp_path / 'data'}",  # CONFIG left out: distill_gkd.yaml
               "model.min_size=64", "model.max_size=64", "model.anchor_sizes=[8,16,32,64,128]",
               "model.rois_per_image=64", "train.batch_size=2", "distill.teacher.backbone=resnet18",
               "distill.pgm.min_box_size=8", "--methods", "robust,gkd", "--steps", "1", "--warmup", "0",
               "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert list(r["steps"]) == ["none", "none+teacher", "robust", "gkd"]
    assert r["ratio_vs_student_plus_teacher"]["none+teacher"] == pytest.approx(1.0)
    assert all(v["median_s"] > 0 and v["cpu_median_s"] > 0 for v in r["steps"].values())
    parts = r["breakdown_s"]
    assert {"teacher backbone+FPN", "adapters", "prototype projection (op)", "backward (all parts)"} <= set(parts)
    assert parts["total"] >= parts["backward (all parts)"]
    assert r["refresh"]["first_s"] > 0 and r["refresh"]["later_s"] > 0 and r["refresh"]["pgm"]["pgm_images"] > 0
    printed = capsys.readouterr().out
    assert "x none+teacher" in printed and "prototype refresh: first" in printed


def test_bench_distill_rejects_unknown_method(capsys):
    assert main(["bench", "distill", "--methods", "fgd"]) == 2
    assert "--methods: unknown ['fgd']" in capsys.readouterr().err
