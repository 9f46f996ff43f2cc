"""gkd study: the report's arithmetic on a hand-made study, its stages' helpers, and a micro end-to-end run
(machinery only)."""
import dataclasses
import json
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.study_report import detectable_effect, paired_ci, render_report, summarize, t_quantile


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
    # paired delta +6.0 +- 1.4 over 2 seeds: 95% CI = 6.0 -+ 12.706 x 1.414 / sqrt(2) = [-6.7, +18.7]
    assert "| gkd | 37.0 +- 2.8 | 57.0 +- 2.8 | 32.0 +- 2.8 | +6.0 +- 1.4 [-6.7, +18.7] | - |" in text
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


def _blind_control_study():
    """A hand-made study whose control teacher was blind to blurred objects: 2 seeds of local / robust on each
    teacher, and both audits."""
    def metrics(ap, blurred):
        m = {s: {"bbox_mAP": ap, "bbox_mAP_50": ap, "bbox_mAP_75": ap} for s in ("all", "small", "occluded")}
        return {**m, "blurred": {"bbox_mAP": blurred}, "per_class": {"a": ap, "b": ap}}

    def run(kind, method, seed, blurred):
        return {"kind": kind, "method": method, "seed": seed, "metrics": metrics(0.3, blurred),
                "diagnostics": {"robust_weight_mean": 0.8}}

    def audit(blurred_w, others_minus_blurred):
        return {"instances": 10, "groups": {"all": {"n": 10, "mean": 0.9, "std": 0.1},
                                            "tag blurred": {"n": 4, "mean": blurred_w, "std": 0.1}},
                "within_level": {"right - confused": 0.0, "right - missed": 0.0,
                                 "others - tag blurred": others_minus_blurred}}

    runs = [run("main", "local", 0, 0.20), run("main", "local", 1, 0.22), run("main", "robust", 0, 0.20),
            run("main", "robust", 1, 0.22), run("control", "local", 0, 0.05), run("control", "local", 1, 0.07),
            run("control", "robust", 0, 0.10), run("control", "robust", 1, 0.14)]
    return {"config": {"methods": ["local", "robust"], "seeds": [0, 1], "control_methods": ["local", "robust"]},
            "runs": runs, "machine": {"processor": "x86_64", "cpus": 2, "torch": "2.x"}, "wall_s": 60,
            "command": "gkd study control=blind",
            "teacher": {"metrics": metrics(0.4, 0.3), "control": {
                "metrics": metrics(0.35, 0.01),
                "corruption": {"kind": "blind", "tag": "blurred", "annotations": 40, "deleted": 40,
                               "images_left_empty": 3}}},
            "audits": {"main": audit(0.90, 0.02), "control": audit(0.80, 0.12)}}


def test_report_of_a_blind_control_compares_the_tag_on_both_teachers():
    text = render_report(_blind_control_study())
    assert ("trained with 40 of the 40 training boxes tagged `blurred` deleted (the objects stay in the images, as "
            "background: 3 images lost every box): 35.0 mAP, AP on `blurred` objects 1.0 (the healthy teacher: 40.0 "
            "and 30.0)") in text
    assert "| robust | 0, 1 | 30.0 | 12.0 | 0.800 |" in text  # AP on the tag, the mean robust weight
    # robust - local on blurred objects: +5 and +7 with the control teacher, 0 with the healthy one
    assert "`robust` - `local` on `blurred` objects (paired, control teacher): +6.0 +- 1.4 [-6.7, +18.7] AP." in text
    assert "`robust` - `local` on `blurred` objects (paired, healthy teacher): +0.0 +- 0.0 [+0.0, +0.0] AP." in text
    assert "| control teacher (`blurred` objects deleted) |" in text
    assert ("against the other boxes on the same level (others - part: positive where the part weighs less): "
            "teacher +0.020 (`blurred` objects 0.900 (4)); control teacher (`blurred` objects deleted) +0.120 "
            "(`blurred` objects 0.800 (4)).") in text
    assert "The defect's own effect (control - healthy teacher): +0.100." in text
    assert "In the teacher's own features" not in text  # these audits carry no cosines
    study = _blind_control_study()
    for kind, v in (("main", 0.01), ("control", 0.2)):
        study["audits"][kind]["within_level"]["teacher cos: others - tag blurred"] = v
    assert ("others - part within a level): teacher +0.010; control teacher (`blurred` objects deleted) +0.200."
            in render_report(study))


def _micro_args(tmp_path):
    args = ["study", f"runs_dir={tmp_path}", f"data_root={tmp_path / 'data'}", "synth_images=12", "synth_size=64",
            "synth_val_images=4", "methods=[none,gkd]", "seeds=[0]", "ablation_prototypes=[]",
            "ablation_global_weight=[]", "ablation_bn_modes=[]", "ablation_refresh_steps=[]", "jobs=1",
            "control_methods=[gkd]", "control_seeds=[0]",
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
    assert sorted((r["kind"], r["method"]) for r in study["runs"]) == [("control", "gkd"), ("main", "gkd"),
                                                                       ("main", "none")]
    for r in study["runs"]:
        assert set(r["metrics"]) == {"all", "small", "occluded", "blurred", "per_class"}
    init = tmp_path / "study" / "student-init" / "checkpoints" / "model.pt"
    run_cfg = (tmp_path / "study" / "students" / "gkd-s0" / "config.yaml").read_text()
    assert f"weights: {init}" in run_cfg  # every student starts from the common initialisation
    control = (tmp_path / "study" / "students" / "control-gkd-s0" / "config.yaml").read_text()
    assert "teacher-control" in control and "runs_dir" in control
    gkd = next(r for r in study["runs"] if r["kind"] == "main" and r["method"] == "gkd")
    assert {"instances_s4", "rw_s4", "rw_c1", "global_discrepancy"} <= set(gkd["diagnostics"])
    assert study["teacher"]["control"]["corruption"]["relabelled"] >= 1
    assert sum(study["levels"]["gt"]) == sum(study["levels"]["gt_at_56"]) > 0
    report = (tmp_path / "study.md").read_text()
    assert "Student initialisation (every student starts here): resnet18 x0.5" in report
    assert "| none |" in report and "| gkd |" in report and "## Positive control" in report
    # the robust-weight audit of both teachers, each at the students' start, with the runs' own settings
    assert set(study["audits"]) == {"main", "control"}
    for audit in study["audits"].values():
        assert audit["instances"] > 0 and audit["groups"]["all"]["n"] == audit["instances"]
        assert audit["student"] == str(init)
    assert study["audits"]["control"]["teacher"].endswith("teacher-control/checkpoints/model.pt")
    assert "## Do the robust weights follow the teacher's errors?" in report
    assert '"teacher_config": "kd/configs/study/teacher.yaml"' in report  # no machine's checkout path
    assert study["config"]["student_config"] == "kd/configs/study/distill.yaml"  # nor in the record
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


def test_micro_study_blind_control(tmp_path):
    """control=blind: the control teacher trains on a split without the tagged boxes (the images kept), and the
    report and the audit compare that tag with the other boxes (machinery only)."""
    args = [a for a in _micro_args(tmp_path) if not a.startswith("methods=")]
    assert main([*args, "methods=[gkd]", "control=blind", "control_fraction=1"]) == 0
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    bad = study["teacher"]["control"]["corruption"]
    full = json.loads((tmp_path / "data" / "train.json").read_text())
    split = json.loads((tmp_path / "study" / "control" / "train.json").read_text())
    blurred = [a for a in full["annotations"] if a["attributes"]["blurred"]]
    assert bad["kind"] == "blind" and bad["deleted"] == bad["annotations"] == len(blurred) > 0
    assert len(split["annotations"]) == len(full["annotations"]) - len(blurred) and split["images"] == full["images"]
    assert not any(a["attributes"]["blurred"] for a in split["annotations"])
    assert "teacher-control" in (tmp_path / "study" / "students" / "control-gkd-s0" / "config.yaml").read_text()
    assert all("others - tag blurred" in a["within_level"] for a in study["audits"].values())
    report = (tmp_path / "study.md").read_text()
    assert "training boxes tagged `blurred` deleted" in report and "on `blurred` objects (paired" not in report
    assert "| control teacher (`blurred` objects deleted) |" in report


def test_quick_preset_and_default_stage_configs_are_valid():
    """The presets name real keys, and the study's stage configs load: the teacher is independent of the students
    (its own seed and width), the initialisation has its own seed, the students share its architecture."""
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import DistillRunConfig
    from gkd.study_config import QUICK_OVERRIDES, StudyConfig

    quick = load_config(None, list(QUICK_OVERRIDES), cls=StudyConfig)
    default = StudyConfig()
    assert quick.methods == ("none", "local", "gkd") and quick.seeds == (0,)
    assert quick.teacher_config == default.teacher_config and quick.data_root == default.data_root
    teacher = load_config(default.teacher_config, [])
    init = load_config(default.student_init_config, [])
    student = load_config(default.student_config, [], cls=DistillRunConfig)
    assert init.model == student.model and init.model.backbone_width == 0.5
    assert dataclasses.replace(teacher.model, backbone_width=0.5) == init.model  # only the width differs
    assert len({teacher.seed, init.seed, *default.seeds}) == 2 + len(default.seeds)
    assert student.distill.method == "gkd" and student.distill.level_canonical_size is None
    assert student.distill.pgm.min_box_size is None and student.distill.monitor_global
    assert len(default.seeds) >= 5 and default.synth_val_images >= 500


def test_student_runs_cover_the_grid_ablations_and_control():
    from gkd.study_config import StudyConfig, student_runs

    cfg = StudyConfig()
    runs = {name: (run, meta) for name, run, meta in student_runs(cfg, Path("t.pt"), Path("i.pt"), Path("c.pt"))}
    n_ablations = len(cfg.ablation_prototypes) + len(cfg.ablation_global_weight) + len(cfg.ablation_bn_modes) + \
        len(cfg.ablation_refresh_steps)
    assert len(runs) == len(cfg.methods) * len(cfg.seeds) + n_ablations * len(cfg.ablation_seeds) + \
        len(cfg.control_methods) * len(cfg.control_seeds)
    glob, meta = runs["global-s3"]
    assert glob.distill.method == "gkd" and meta["method"] == "global" and glob.seed == 3
    assert (glob.distill.fg_weight, glob.distill.bg_weight, glob.distill.soft_weight) == (0, 0, 0)
    assert runs["gkd-s0"][0].distill.fg_weight > 0 and runs["pkd_global-s0"][0].distill.method == "pkd+global"
    assert runs["gkd-bnbatch-s1"][0].distill.pgm.bn_mode == "batch"
    assert runs["gkd-every25-s0"][0].distill.pgm.interval_steps == 25
    soft, meta = runs["local-soft0.8-s4"]  # is `robust` only a smaller soft-label weight?
    assert soft.distill.method == "local" and soft.distill.soft_weight == 0.8 and meta["method"] == "local-soft0.8"
    assert soft.distill.fg_weight == runs["local-s4"][0].distill.fg_weight
    ctrl, meta = runs["control-robust-s2"]
    assert ctrl.distill.teacher.checkpoint == "c.pt" and meta["kind"] == "control"
    assert runs["local-s0"][0].distill.teacher.checkpoint == "t.pt"
    assert all(r.model.weights == "i.pt" for r, _ in runs.values())


def test_corrupted_labels_are_seeded_and_touch_one_class(tmp_path):
    from gkd.core.errors import GkdError
    from gkd.kd.data.defects import corrupt_labels

    anns = [{"id": i, "image_id": 1, "category_id": 1 + i % 3, "bbox": [0, 0, 5, 5]} for i in range(30)]
    src = tmp_path / "train.json"
    src.write_text(json.dumps({"images": [{"id": 1}], "annotations": anns, "categories": [
        {"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}))
    info = corrupt_labels(src, tmp_path / "x.json", "b", 0.5, seed=0)
    assert info == {"class": "b", "category_id": 2, "annotations": 10, "relabelled": 5}
    out = json.loads((tmp_path / "x.json").read_text())["annotations"]
    changed = [(a["category_id"], b["category_id"]) for a, b in zip(anns, out) if a != b]
    assert len(changed) == 5 and all(old == 2 and new in (1, 3) for old, new in changed)
    corrupt_labels(src, tmp_path / "y.json", "b", 0.5, seed=0)
    assert (tmp_path / "x.json").read_text() == (tmp_path / "y.json").read_text()
    assert corrupt_labels(src, tmp_path / "z.json", "", 0.2, seed=1)["class"] == "a"  # "": the first class
    with pytest.raises(GkdError, match="control_class: 'q' is not a class"):
        corrupt_labels(src, tmp_path / "z.json", "q", 0.5, seed=0)


def test_training_diagnostics_divide_sums_by_counts(tmp_path):
    from gkd.kd.distill.diagnostics import training_diagnostics

    epochs = [{"train/kd_instances_s4": 10.0, "train/kd_rw_sum_s4": 8.0, "train/kd_rw_n_s4": 10.0,
               "train/kd_rw_sum_c2": 0.0, "train/kd_rw_n_c2": 0.0, "train/kd_global_discrepancy": 0.2},
              {"train/kd_instances_s4": 20.0, "train/kd_rw_sum_s4": 12.0, "train/kd_rw_n_s4": 20.0,
               "train/kd_rw_sum_c2": 1.8, "train/kd_rw_n_c2": 2.0, "train/kd_global_discrepancy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    d = training_diagnostics(tmp_path)
    assert d["instances_s4"] == 15.0 and d["rw_s4"] == pytest.approx(20 / 30)
    assert d["rw_c2"] == pytest.approx(0.9) and d["global_discrepancy"] == pytest.approx(0.3)
    assert training_diagnostics(tmp_path / "nothing") == {}


def test_level_histogram_uses_the_resize_and_the_canonical_size(tmp_path):
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import DistillRunConfig
    from gkd.kd.distill.levels import level_histogram
    from gkd.study_config import StudyConfig

    # 320 px images resized to 160: boxes of 40 / 80 / 200 px become 20 / 40 / 100 px, levels floor(log2(
    # (side + 1) / 11.2)) = 0, 1, 3 (and all three on level 0 at 56 px)
    data = {"images": [{"id": 1, "height": 320, "width": 320}],
            "annotations": [{"image_id": 1, "bbox": [0, 0, s, s]} for s in (40, 80, 200)]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    run_cfg = load_config(StudyConfig().student_config, [], cls=DistillRunConfig)
    runs = [{"kind": "main", "method": "gkd", "diagnostics": {f"instances_s{s}": 1.0 for s in (4, 8, 16, 32, 64)}}]
    lv = level_histogram(tmp_path / "train.json", runs, run_cfg)
    assert lv["canonical"] == pytest.approx(11.2) and lv["levels"] == ["s4", "s8", "s16", "s32", "s64"]
    assert lv["gt"] == [1, 1, 0, 1, 0] and lv["gt_at_56"] == [3, 0, 0, 0, 0]


def test_confidence_intervals_and_detectable_effect():
    assert t_quantile(0.975, 4) == 2.776 and t_quantile(0.975, 100) == 1.96
    lo, hi = paired_ci(1.0, 1.0, 5)
    assert (lo, hi) == pytest.approx((1 - 2.776 / 5 ** 0.5, 1 + 2.776 / 5 ** 0.5))
    assert paired_ci(1.0, 0.0, 1) is None
    assert detectable_effect(0.4, 5) == pytest.approx((2.776 + 0.941) * 0.4 / 5 ** 0.5)
    assert detectable_effect(0.4, 10) < detectable_effect(0.4, 5)


def test_blind_labels_delete_a_seeded_share_of_one_tag_and_keep_every_image(tmp_path):
    from gkd.core.errors import GkdError
    from gkd.kd.data.defects import blind_labels

    # image 1: boxes 0-3, of which 1 and 3 are blurred; image 2: box 4 only, blurred; box 5 has no attributes
    tags = [False, True, False, True, True]
    anns = [{"id": i, "image_id": 1 if i < 4 else 2, "category_id": 1, "bbox": [0, 0, 5, 5],
             "attributes": {"blurred": b, "small": i == 0, "visible": 0.5}} for i, b in enumerate(tags)]
    anns.append({"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]})
    src = tmp_path / "train.json"
    src.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}]}))
    info = blind_labels(src, tmp_path / "all.json", "blurred", 1.0, seed=0)
    assert info == {"kind": "blind", "tag": "blurred", "annotations": 3, "deleted": 3, "images_left_empty": 1}
    out = json.loads((tmp_path / "all.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [0, 2, 5] and len(out["images"]) == 2
    half = blind_labels(src, tmp_path / "half.json", "blurred", 0.5, seed=3)
    kept = {a["id"] for a in json.loads((tmp_path / "half.json").read_text())["annotations"]}
    assert half["deleted"] == 2 and {0, 2, 5} <= kept and len(kept & {1, 3, 4}) == 1
    blind_labels(src, tmp_path / "again.json", "blurred", 0.5, seed=3)
    assert (tmp_path / "again.json").read_text() == (tmp_path / "half.json").read_text()
    with pytest.raises(GkdError, match="control_tag: 'occluded' is not a tag .* expected one of blurred, small"):
        blind_labels(src, tmp_path / "x.json", "occluded", 1.0, seed=0)
    for a in anns:
        a.pop("attributes", None)
    src.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": anns, "categories": []}))
    with pytest.raises(GkdError, match="carry no 'attributes' tags"):
        blind_labels(src, tmp_path / "x.json", "blurred", 1.0, seed=0)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("data, report", [("docs/measurements/study_default.json", "docs/study.md"),
                                          ("docs/measurements/study_control_blind.json",
                                           "docs/measurements/study_control_blind.md"),
                                          ("docs/measurements/study_default_seed0.json",
                                           "docs/measurements/study_default_seed0.md"),
                                          ("docs/measurements/study_quick.json", "docs/measurements/study_quick.md")])
def test_recorded_studies_render_to_their_committed_reports(data, report):
    """The committed reports are what the report code makes of the recorded study.json (the default study with its
    label control, the blind control, the default design at one seed, the quick study): a change to the report shows
    here, and the docs are regenerated with it."""
    root = Path(__file__).resolve().parent.parent
    study = json.loads((root / data).read_text())
    assert render_report(study) == (root / report).read_text()
