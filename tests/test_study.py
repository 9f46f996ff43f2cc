"""gkd study: the report's arithmetic on a hand-made study, and a micro end-to-end run (machinery only)."""
import json

import pytest

from gkd.study import render_report, summarize
from gkd.cli import main


def _run(method, seed, ap, small=0.1):
    metrics = {s: {"bbox_mAP": ap, "bbox_mAP_50": ap + 0.2, "bbox_mAP_75": ap - 0.05} for s in ("all",)}
    metrics.update({s: {"bbox_mAP": small} for s in ("small", "occluded", "blurred")})
    return {"kind": "main", "method": method, "seed": seed, "metrics": metrics}


def test_summary_mean_std_and_delta():
    study = {"config": {"methods": ["none", "gkd"], "seeds": [0, 1], "ablation_seeds": [0]},
             "runs": [_run("none", 0, 0.30), _run("none", 1, 0.32), _run("gkd", 0, 0.35), _run("gkd", 1, 0.39, -1)],
             "teacher": {"metrics": {s: {"bbox_mAP": 0.5, "bbox_mAP_50": 0.7, "bbox_mAP_75": 0.5}
                                     for s in ("all", "small", "occluded", "blurred")}},
             "machine": {"processor": "x86_64", "cpus": 2, "torch": "2.x"}, "wall_s": 60, "command": "gkd study"}
    rows = {r["method"]: r for r in summarize(study)}
    assert rows["none"]["mAP"] == pytest.approx((0.31, 0.0141421356), rel=1e-6)
    assert rows["gkd"]["mAP"][0] == pytest.approx(0.37)
    assert rows["gkd"]["AP_small"] == (0.1, 0.0)  # -1 (no such objects) is left out of the mean
    assert rows["gkd"]["vs_none"] == pytest.approx((0.06, 0.0141421356, 2)) and rows["none"]["vs_none"] is None
    assert rows["gkd"]["vs_local"] is None  # no `local` runs in this study
    text = render_report(study)
    assert "| gkd | 37.0 +- 2.8 | 57.0 +- 2.8 | 32.0 +- 2.8 | +6.0 +- 1.4 | - |" in text
    assert "Teacher: 50.0 mAP" in text and "theirs, not ours" in text and "40.6" in text
    assert "Stage times" not in text  # a study without per-stage times says nothing about them

    study["teacher"]["train_s"] = 600.0
    study["config"]["jobs"] = 2
    for r, t in zip(study["runs"], (60.0, 90.0, 120.0, 30.0)):
        r["train_s"] = t
    assert ("teacher 10.0 min, 4 student runs 5.0 min in all (2 at a time)." in render_report(study))


def test_paired_delta_removes_the_shared_seed_variation():
    """Seed 1 is harder for every method: unpaired, gkd and local overlap (std 5 points); paired, gkd is 1 point
    ahead at every seed, with no spread. Seeds run by one method only are left out of the pairing."""
    runs = [_run("local", 0, 0.30), _run("local", 1, 0.20), _run("gkd", 0, 0.31), _run("gkd", 1, 0.21),
            _run("gkd", 2, 0.90)]
    rows = {r["method"]: r for r in summarize({"config": {"methods": ["local", "gkd"]}, "runs": runs})}
    assert rows["local"]["mAP"][1] == pytest.approx(0.0707106781)
    assert rows["gkd"]["vs_local"] == pytest.approx((0.01, 0.0, 2))


def _micro_args(tmp_path):
    args = ["study", f"runs_dir={tmp_path}", f"data_root={tmp_path / 'data'}", "synth_images=12", "synth_size=64",
            "methods=[none,gkd]", "seeds=[0]", "ablation_prototypes=[]", "ablation_global_weight=[]", "jobs=1",
            f"report={tmp_path / 'study.md'}", "teacher.train.epochs=1", "teacher.model.backbone=resnet18",
            "teacher.train.max_steps_per_epoch=1", "student.train.max_steps_per_epoch=1", "student.train.epochs=1",
            "teacher.train.threads=1", "student_init_epochs=1", "student_init.train.threads=1"]
    for who in ("teacher", "student", "student_init"):
        args += [f"{who}.model.min_size=64", f"{who}.model.max_size=64", f"{who}.model.rois_per_image=16"]
    args.append("student.distill.pgm.min_box_size=2")
    return args


def test_micro_study_end_to_end(tmp_path, capsys):
    args = _micro_args(tmp_path)
    assert main(args) == 0
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert sorted(r["method"] for r in study["runs"]) == ["gkd", "none"]
    for r in study["runs"]:
        assert set(r["metrics"]) == {"all", "small", "occluded", "blurred"}
    init = tmp_path / "study" / "student-init" / "checkpoints" / "model.pt"
    run_cfg = (tmp_path / "study" / "students" / "gkd-s0" / "config.yaml").read_text()
    assert f"weights: {init}" in run_cfg  # every student starts from the common initialisation
    report = (tmp_path / "study.md").read_text()
    assert "Every student starts from the same student trained without distillation for 1 epochs" in report
    assert "| none |" in report and "| gkd |" in report
    # rerun: everything is cached, nothing retrains
    before = (tmp_path / "study" / "students" / "gkd-s0" / "checkpoints" / "model.pt").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "study" / "students" / "gkd-s0" / "checkpoints" / "model.pt").stat().st_mtime == before
    # rerun with another design: a cached run made with another config is never mixed into the table; a one-line
    # error names the folder and the key (the student-init schedule, then a student override) before anything trains
    capsys.readouterr()
    assert main([*args, "student_init_epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "student-init was made with another config (train.epochs=1 there, 2 asked)" in err
    assert len(err.splitlines()) == 1
    assert main([*args, "student.distill.global_weight=7"]) == 2
    assert "distill.global_weight=5.0 there, 7.0 asked" in capsys.readouterr().err


def test_quick_preset_and_default_stage_configs_are_valid():
    """The presets name real keys, and the study's stage configs load and agree on the model (teacher, init and
    students share the architecture: the teacher is stronger because it trains longer)."""
    from gkd.study import QUICK_OVERRIDES, StudyConfig
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import DistillRunConfig

    quick = load_config(None, list(QUICK_OVERRIDES), cls=StudyConfig)
    default = StudyConfig()
    assert quick.methods == ("none", "local", "gkd") and quick.seeds == (0,)
    assert quick.teacher_config == default.teacher_config and quick.data_root == default.data_root
    teacher = load_config(default.teacher_config, [])
    init = load_config(default.student_init_config, [])
    student = load_config(default.student_config, [], cls=DistillRunConfig)
    assert teacher.model == init.model == student.model
    assert teacher.train.epochs > 4 * student.train.epochs and student.distill.method == "gkd"
