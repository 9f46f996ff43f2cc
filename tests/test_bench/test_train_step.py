from gkd.bench.train_step import format_report, run_train_benchmark
from gkd.kd.data import generate_synthetic

TINY = ["model.min_size=64", "model.max_size=64", "model.rois_per_image=16", "train.batch_size=2"]


def test_teacher_and_student_measured_side_by_side(tmp_path):
    generate_synthetic(tmp_path / "d", n_images=10, seed=0, image_size=64, val_fraction=0.2)
    from pathlib import Path

    cfgs = Path(__file__).resolve().parents[2] / "kd" / "configs"
    rep = run_train_benchmark({"teacher": cfgs / "teacher.yaml", "student": cfgs / "student.yaml"},
                              TINY + [f"data.root={tmp_path / 'd'}"], steps=1, infer_images=2, threads=1)
    t, s = rep["models"]["teacher"], rep["models"]["student"]
    assert (t["backbone"], s["backbone"]) == ("resnet18", "resnet18")  # the student is narrower (FPN 64 vs 128)
    assert t["params_m"] > s["params_m"] > 1
    for r in (t, s):
        assert r["step_s"] > 0 and r["step_cpu_s"] > 0 and r["infer_img_per_s"] > 0
    table = format_report(rep)
    assert "teacher (faster_rcnn resnet18)" in table and "| 1.00x |" in table and "by CPU time" in table
