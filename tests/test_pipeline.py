"""``gkd run`` end to end on a tiny profile: stages, content-keyed reuse, refused keys, kill and resume.

Nothing here depends on what the tiny models learn (a few steps from scratch detect next to nothing): the tests
check what ran, what was reused and why, and that a killed run finishes with exactly the numbers of an
uninterrupted one on the same machine.
"""
from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch

from gkd.cli import main
from gkd.core.errors import GkdError
from gkd.kd.checkpoint import load_checkpoint
from gkd.pipeline import run_pipeline
from gkd.run_config import load_pipeline_config
from tests.helpers import TEST_THREADS

TINY_MODEL = {"backbone": "resnet18", "min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128],
              "rois_per_image": 32, "fpn_channels": 64, "box_head_dim": 128, "proposals_test": 100}
TINY_TRAIN = {"batch_size": 2, "warmup_iters": 0, "lr": 0.002, "threads": TEST_THREADS, "max_steps_per_epoch": 2}
TINY = {
    "synth_images": 12, "synth_size": 64, "precisions": ["fp32"], "bench_iterations": 2, "bench_images": 2,
    # one process (the kill test patches a step in it); test_students_side_by_side_* and
    # test_teacher_in_two_processes_* run the defaults
    "side_by_side": False, "teacher_processes": 1,
    "teacher": {"model": TINY_MODEL, "train": {**TINY_TRAIN, "epochs": 1}, "eval": {"batch_size": 4}},
    "student": {"model": TINY_MODEL, "train": {**TINY_TRAIN, "epochs": 2}, "eval": {"batch_size": 4},
                "distill": {"pgm": {"num_prototypes": 2, "min_box_size": 4, "max_images_per_class": 4,
                                    "batch_size": 4}}},
}
STAGES = ["data", "teacher", "distill", "baseline", "export", "export-baseline", "eval-teacher", "eval-baseline", "bench"]


class Killed(KeyboardInterrupt):
    """What a Ctrl-C (or a kill the process survives long enough to unwind) raises mid-step."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {"runs_dir": str(root / "runs"), "data_root": str(root / "data")}


def config(world, name, *overrides):
    """The tiny profile in ``world`` under run name ``name``, with command-line style overrides on top."""
    from gkd.core.config import merge_dicts
    from gkd.kd.config import load_config
    from gkd.run_config import PipelineConfig

    base = merge_dicts(TINY, {"name": name, "runs_dir": world["runs_dir"], "data_root": world["data_root"]})
    return load_config(None, list(overrides), cls=PipelineConfig, updates=base)


def actions(manifest) -> dict[str, tuple[str, str]]:
    return {o["stage"]: (o["action"], o["reason"]) for o in manifest["invocation"]}


@pytest.fixture(autouse=True)
def _no_tensorrt_rtx_build_after_the_first_run(monkeypatch):
    """The TensorRT-RTX build of the shipped static file is checked once, in ``first_run`` (a module fixture, made
    before this one): the other runs here are about keys, reuse and resume, and skip the build to save time."""
    from gkd.export import trt_rtx

    monkeypatch.setattr(trt_rtx, "available", lambda: False)


@pytest.fixture(scope="module")
def first_run(world):
    """One uninterrupted run of every stage; a deep copy of its manifest (later tests rerun into other names)."""
    return copy.deepcopy(run_pipeline(config(world, "a")))


def test_end_to_end_runs_every_stage_and_records_artifacts(first_run, world):
    from gkd.core.io import file_sha256

    assert actions(first_run) == {s: ("ran", "not run before") for s in STAGES}
    stages = first_run["stages"]
    assert all(stages[s]["status"] == "done" and len(stages[s]["key"]) == 64 for s in STAGES)
    ckpt = stages["distill"]["outputs"]["checkpoint"]
    assert file_sha256(ckpt["path"]) == ckpt["sha256"]
    assert stages["distill"]["method"] == "gkd"
    assert {"val/bbox_mAP", "val/bbox_mAP_50"} <= set(stages["distill"]["metrics"])
    assert stages["baseline"]["method"] == "none"
    # the shipped student also gets the static, TensorRT-ready graph; the baseline (compared, not shipped) does not
    assert set(stages["export"]["outputs"]["files"]) == {"fp32", "static-fp32"}
    assert set(stages["export-baseline"]["outputs"]["files"]) == {"fp32"}
    runners = stages["bench"]["runners"]
    for name in ("teacher/pytorch-fp32", "distilled/pytorch-fp32", "distilled/onnxruntime-fp32",
                 "baseline/pytorch-fp32", "baseline/onnxruntime-fp32"):
        assert runners[name]["p50_ms"] > 0 and runners[name]["p90_ms"] >= runners[name]["p50_ms"], name
    for name in ("teacher/pytorch-fp32", "distilled/onnxruntime-fp32", "baseline/onnxruntime-fp32"):
        assert 0 <= runners[name]["bbox_mAP"] <= 1, name
    assert set(stages["bench"]["subsets"]["distilled/onnxruntime-fp32"]) == {"small", "occluded", "blurred"}
    speed = stages["bench"]["speed"]
    assert speed["teacher_over_student_p50"] == pytest.approx(speed["teacher_p50_ms"] / speed["student_p50_ms"])
    run_dir = config(world, "a").run_dir
    report = (run_dir / "report.md").read_text()
    assert "| distill | ran | not run before |" in report and "## Accuracy" in report
    assert "## Deployment: what distillation bought, per exported precision" in report
    assert "| precision | baseline mAP | distilled mAP | gain | p50 ms | p90 ms | verified |" in report
    # the TensorRT line says what TensorRT-RTX built of the shipped static file (or why it did not run), and the
    # trtexec command that builds it with TensorRT 10/11
    import importlib.util

    if importlib.util.find_spec("tensorrt_rtx") is not None:  # (trt_rtx.available is patched off in the tests)
        assert "parsed and built on the CPU (engines not run: no GPU here): static-fp32 (" in report
    else:
        assert "TensorRT-RTX: not checked (tensorrt-rtx is not installed)" in report
    assert "trtexec --onnx=model.static-fp32.onnx --saveEngine=model.static-fp32.engine" in report
    summary = json.loads((run_dir / "report.json").read_text())
    [row] = summary["deployment"]
    assert row["precision"] == "fp32"
    assert row["distilled_mAP"] == runners["distilled/onnxruntime-fp32"]["bbox_mAP"]
    assert row["gain"] == pytest.approx(row["distilled_mAP"] - row["baseline_mAP"])
    assert set(first_run["plots"]) == {"training curves", "per-class AP", "latency", "mAP vs p90 latency"}
    for png in first_run["plots"].values():
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and f"]({png.split('/')[-1]})" in report
    on_disk = json.loads((config(world, "a").run_dir / "manifest.json").read_text())
    assert on_disk["stages"]["distill"]["key"] == stages["distill"]["key"]


def test_rerun_reuses_every_stage_without_running_anything(first_run, world, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage ran although nothing changed")

    for target in ("gkd.kd.train.train_detector", "gkd.kd.distill.run.run_distillation",
                   "gkd.export.pipeline.export_checkpoint", "gkd.bench.latency.benchmark_models",
                   "gkd.bench.accuracy.evaluate_models",
                   "gkd.kd.data.generate_synthetic"):
        monkeypatch.setattr(target, must_not_run)
    again = run_pipeline(config(world, "a"))
    assert actions(again) == {s: ("reused", "unchanged") for s in STAGES}
    assert {s: again["stages"][s]["key"] for s in STAGES} == {s: first_run["stages"][s]["key"] for s in STAGES}
    report = (config(world, "a").run_dir / "report.md").read_text()
    assert "| teacher | reused | unchanged |" in report


def test_students_side_by_side_get_the_weights_of_one_after_the_other(first_run, world, monkeypatch, capfd,
                                                                     caplog):
    """The default: distill and baseline train at once in two spawned processes; each gets exactly the weights it
    gets alone with the same threads, and its own tagged log lines."""
    # the machine's momentary load is not what is tested: two free cores per tiny-profile thread
    monkeypatch.setattr("gkd.runner.free_cores", lambda: 2 * TEST_THREADS)
    teacher = first_run["stages"]["teacher"]["outputs"]["checkpoint"]["path"]
    both = run_pipeline(config(world, "sbs", "side_by_side=true", "precisions=[]", f"teacher_checkpoint={teacher}"))
    assert actions(both) == {s: ("ran", "not run before") for s in ("data", "teacher", "distill", "baseline")}
    assert f"distill: running (not run before; side by side, 2 at a time, {TEST_THREADS} thread(s) each)" \
        in caplog.text
    err = capfd.readouterr().err  # the spawned processes write to the terminal themselves
    assert "gkd [baseline]: epoch 2/2" in err and "gkd [distill]: epoch 2/2" in err
    for stage in ("distill", "baseline"):
        a = load_checkpoint(first_run["stages"][stage]["outputs"]["checkpoint"]["path"])["model"]
        b = load_checkpoint(both["stages"][stage]["outputs"]["checkpoint"]["path"])["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert both["stages"][stage]["metrics"] == first_run["stages"][stage]["metrics"]


def test_teacher_in_two_processes_is_recorded_and_reused(world):
    """teacher_processes=2 (the default): the teacher stage runs under torchrun (2 x 1 thread, the batch split),
    records its checkpoint and metrics like a one-process stage, and a rerun reuses it; the process count is keyed."""
    cfg = config(world, "ddp", "teacher_processes=2", "precisions=[]", "baseline=false")
    first = run_pipeline(cfg)
    record = first["stages"]["teacher"]
    assert record["inputs"]["processes"] == 2 and record["inputs"]["config"]["train"]["batch_size"] == 1
    assert load_checkpoint(record["outputs"]["checkpoint"]["path"])["model"]
    assert "val/bbox_mAP" in record["metrics"]
    log = (cfg.run_dir / "teacher" / "log.txt").read_text()
    assert "2 process(es) x batch 1 = global batch 2" in log
    again = run_pipeline(cfg)
    assert actions(again)["teacher"] == ("reused", "unchanged")
    one = run_pipeline(config(world, "ddp", "teacher_processes=1", "precisions=[]", "baseline=false"))
    action, reason = actions(one)["teacher"]
    assert action == "ran" and reason.startswith("changed: teacher.train.batch_size 1 -> 2")
    # the student's config did not change, its teacher did: it trains again from scratch (its finished run of the
    # same config beside the old teacher is another stage, never "resumed")
    assert actions(one)["distill"] == ("ran", "changed: input 'teacher'")
    assert "resuming" not in (cfg.run_dir / "distill" / "log.txt").read_text()


def test_qad_ships_a_quantization_aware_student_beside_post_training_int8(world):
    """qad=tensorrt: the distilled student is fine-tuned with fake INT8 (its own stage, keyed on the distilled
    checkpoint), exported from its learned scales, benchmarked, and shown as "int8 (QAD)" beside "int8 (PTQ)";
    a rerun reuses it; qad_student.* reaches the QAD stage only."""
    cfg = config(world, "qad", "qad=tensorrt", "precisions=[fp32,int8]", "baseline=false")
    first = run_pipeline(cfg)
    st = first["stages"]
    assert actions(first)["qad"] == ("ran", "not run before") and actions(first)["export-qad"][0] == "ran"
    qad_cfg = st["qad"]["inputs"]["config"]
    assert qad_cfg["quant"]["int8_format"] == "tensorrt" and qad_cfg["train"]["lr"] == 0.0001
    assert qad_cfg["model"]["weights"].endswith("distill/checkpoints/model.pt")
    ckpt = load_checkpoint(st["qad"]["outputs"]["checkpoint"]["path"])
    assert ckpt["fake_quant"]["format"] == "tensorrt" and "gkd_fake_quant.scale" in ckpt["model"]
    files = st["export-qad"]["outputs"]["files"]
    assert {"fp32", "int8", "static-fp32", "static-int8"} <= set(files)
    assert st["export-qad"]["int8"]["activations"]["dtype"] == "int8"
    assert "qad/onnxruntime-int8" in st["bench"]["runners"]
    report = (cfg.run_dir / "report.md").read_text()
    assert "| int8 (PTQ) |" in report and "| int8 (QAD) |" in report
    assert any(c.startswith(("qad int8 export", "qad int8 file"))
               for c in first["gate"]["checked"] + first["gate"]["failures"])
    again = run_pipeline(cfg)
    assert actions(again)["qad"] == ("reused", "unchanged") and actions(again)["export-qad"][0] == "reused"
    # a changed QAD schedule reruns the QAD stage alone (keys resolved, no stage run: the plan is the test)
    from gkd.run_config import resolve_stage_configs

    changed = resolve_stage_configs(config(world, "qad", "qad=tensorrt", "qad_student.train.lr=0.0002"))
    assert changed.qad.train.lr == 0.0002 and changed.distill.train.lr == TINY_TRAIN["lr"]


def test_teacher_processes_auto_follows_the_cores(monkeypatch):
    """teacher_processes=0 (the default): 2 processes where the machine has 2 or more cores, 1 on one core (the
    batch is split only then); an explicit count is kept."""
    import gkd.kd.cpu_share as cpu_share
    from gkd.run_config import resolve_stage_configs, teacher_processes

    for cores, want in ((1, 1), (2, 2), (16, 2)):
        monkeypatch.setattr(cpu_share, "available_cores", lambda cores=cores: cores)
        cfg = load_pipeline_config(None, [])
        assert teacher_processes(cfg) == want
        assert resolve_stage_configs(cfg).teacher.train.batch_size == 8 // want
    assert teacher_processes(load_pipeline_config(None, ["teacher_processes=3"])) == 3


def test_quick_preset_resolves_to_the_quick_world():
    """``gkd run --quick``: its keys are real, its stage configs resolve, and every model trains on the quick world
    at its size (the students keep the default recipe's architecture)."""
    from gkd.run_config import QUICK, resolve_stage_configs

    cfg = load_pipeline_config(None, [], quick=True)
    assert (cfg.synth_preset, cfg.synth_size, cfg.data_root) == ("quick", 96, QUICK["data_root"])
    stages = resolve_stage_configs(cfg)
    for run_cfg in (stages.teacher, stages.distill, stages.baseline):
        assert (run_cfg.model.min_size, run_cfg.model.max_size) == (96, 96)
    default = resolve_stage_configs(load_pipeline_config(None, []))
    assert stages.distill.model.backbone_width == default.distill.model.backbone_width == 0.5
    assert stages.teacher.model.backbone_width == 1.0 and stages.baseline.distill.method == "none"
    # the quick students' own schedule (300 steps of 4 images) is the baseline's too: same recipe, other method
    assert stages.distill.train == stages.baseline.train and stages.distill.train.batch_size == 4


@pytest.mark.parametrize("override, message", [
    ("teacher.trian.epochz=99", "unknown key 'teacher.trian'; did you mean 'teacher.train'?"),
    ("student.train.epochz=3", "unknown key 'student.train.epochz'; did you mean 'student.train.epochs'?"),
    ("student.model.backbone=resnet19", "'student.model.backbone' must be one of"),
    ("baselin=true", "unknown key 'baselin'; did you mean 'baseline'?"),
    ("student.name=x", "student.name: set by gkd run"),
])
def test_bad_key_is_refused_before_any_stage_runs(world, tmp_path, capsys, override, message):
    argv = ["run", f"runs_dir={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}", "name=typo", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("odd", ["#ckpts/t.pt", "data/a: b/t.pt", "it's \"quoted\" /with spaces.pt"])
def test_values_travel_as_data_not_reparsed(odd):
    """A value with YAML syntax in it (#, ': ', quotes, spaces) reaches the stage configs unchanged."""
    from gkd.run_config import resolve_stage_configs

    cfg = load_pipeline_config(None, [f"teacher_checkpoint={odd}", f"student.data.images={odd}",
                                      "student.train.lr=1e-4"])
    assert cfg.teacher_checkpoint == odd
    stages = resolve_stage_configs(cfg)
    assert stages.distill.distill.teacher.checkpoint == odd and stages.distill.data.images == odd
    assert stages.distill.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text; a float field takes it as a number
    with pytest.raises(GkdError, match="teacher_checkpoint: .*file not found"):
        run_pipeline(cfg)


@pytest.fixture(scope="module")
def killed_then_resumed(world, first_run):
    """Run "b" (the config of "a"), killed in the middle of the distillation's second epoch, then rerun."""
    from gkd.kd.distill.task import DistillationTask

    original = DistillationTask.forward
    calls = {"n": 0}

    def dies_in_epoch_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == TINY["student"]["train"]["max_steps_per_epoch"] + 1:  # the first step of epoch 2
            raise Killed
        return original(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(DistillationTask, "forward", dies_in_epoch_two)
    with pytest.raises(Killed):
        run_pipeline(config(world, "b"))
    mp.undo()
    cfg = config(world, "b")
    interrupted = json.loads((cfg.run_dir / "manifest.json").read_text())
    torch.manual_seed(12345)  # another process would start from another RNG state: the checkpoint restores it
    resumed = copy.deepcopy(run_pipeline(cfg))
    return {"interrupted": interrupted, "resumed": resumed, "cfg": cfg}


def test_kill_during_distillation_then_same_command_gives_the_same_result(killed_then_resumed, first_run):
    interrupted, resumed = killed_then_resumed["interrupted"], killed_then_resumed["resumed"]
    assert interrupted["stages"]["distill"]["status"] == "running"
    assert "export" not in interrupted["stages"]
    acts = actions(resumed)
    assert acts["data"] == ("reused", "unchanged") and acts["teacher"] == ("reused", "unchanged")
    assert acts["distill"][0] == "ran" and acts["distill"][1].startswith("interrupted earlier")
    assert acts["export"] == acts["export-baseline"] == acts["bench"] == ("ran", "not run before")
    log = (killed_then_resumed["cfg"].run_dir / "distill" / "log.txt").read_text()
    assert "resuming 'distill' at epoch 2/2" in log
    a, b = first_run["stages"]["distill"], resumed["stages"]["distill"]
    assert b["metrics"] == a["metrics"] and b["metrics"]  # the same numbers as the uninterrupted run
    wa = load_checkpoint(a["outputs"]["checkpoint"]["path"])["model"]
    wb = load_checkpoint(b["outputs"]["checkpoint"]["path"])["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changed_key_reruns_exactly_the_stages_that_depend_on_it(killed_then_resumed, world):
    cfg = config(world, "b", "student.train.lr=0.001")
    changed = run_pipeline(cfg)
    acts = actions(changed)
    assert acts["data"] == acts["teacher"] == ("reused", "unchanged")
    assert acts["distill"] == acts["baseline"] == ("ran", "changed: student.train.lr 0.002 -> 0.001")
    assert acts["export"] == acts["export-baseline"] == ("ran", "changed: input 'student'")
    assert acts["bench"][0] == "ran" and "input 'student'" in acts["bench"][1]
    report = (cfg.run_dir / "report.md").read_text()
    assert "| distill | ran | changed: student.train.lr 0.002 -> 0.001 |" in report

    only_bench = run_pipeline(config(world, "b", "student.train.lr=0.001", "bench_iterations=3"))
    assert {s for s, (act, _) in actions(only_bench).items() if act == "ran"} == {"bench"}
    assert actions(only_bench)["bench"][1] == "changed: bench_iterations 2 -> 3"

    back = run_pipeline(config(world, "b"))  # the old lr again: the distillation runs again (one result per key)
    assert actions(back)["distill"][1] == "changed: student.train.lr 0.001 -> 0.002"


def test_modified_output_is_detected_and_remade(killed_then_resumed, world):
    cfg = config(world, "b")
    report = cfg.run_dir / "bench" / "latency.json"
    report.write_text(report.read_text() + " ")
    again = run_pipeline(cfg)
    assert actions(again)["bench"] == ("ran", f"output modified since it was made: {report}")
    assert {s for s, (act, _) in actions(again).items() if act == "ran"} == {"bench"}


def test_stage_methods_and_the_teacher_they_read():
    from gkd.run_config import resolve_stage_configs

    stages = resolve_stage_configs(load_pipeline_config(None, ["name=m"]))  # the baseline is on by default
    assert stages.distill.distill.method == "gkd" and stages.baseline.distill.method == "none"
    # the teacher is its own model: its own seed, never the students' (whose seed and data order are shared)
    assert stages.teacher.seed == 1 and stages.distill.seed == stages.baseline.seed == 0
    assert resolve_stage_configs(load_pipeline_config(None, ["seed=5"])).teacher.seed == 1
    assert resolve_stage_configs(load_pipeline_config(None, ["baseline=false"])).baseline is None
    assert stages.distill.distill.teacher.checkpoint.endswith("m/teacher/checkpoints/model.pt")
    assert stages.distill.run_dir.name == "distill" and stages.baseline.run_dir.name == "baseline"
    chosen = resolve_stage_configs(load_pipeline_config(None, ["baseline=true", "student.distill.method=local"]))
    assert chosen.distill.distill.method == "local" and chosen.baseline.distill.method == "none"


def test_one_gkd_run_per_run_folder(world, tmp_path):
    import socket
    import subprocess
    import sys

    cfg = config(world, "locked", "precisions=[]")
    cfg.run_dir.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cfg.run_dir / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(GkdError, match=f"in use by process {other.pid}"):
            run_pipeline(cfg)
        assert not (cfg.run_dir / "manifest.json").exists()
    finally:
        other.kill()
        other.wait()


def _bench(fp32, int8=None):
    runners = {"distilled/pytorch-fp32": {"bbox_mAP": fp32}, "distilled/onnxruntime-fp32": {"bbox_mAP": fp32},
               "baseline/onnxruntime-fp32": {"bbox_mAP": 0.5}}  # the baseline's numbers are no part of the gate
    if int8 is not None:
        runners["distilled/onnxruntime-int8"] = {"bbox_mAP": int8}
    return {"runners": runners}


def _export(verified=True, int8_passed=True, is_int8=True):
    """An export stage record: every file's verdict, the INT8 file's record and its mAP level."""
    level = {"passed": int8_passed, "summary": "mAP 0.3800 vs 0.4000 (95.0%): -0.0200, 95% interval [-0.0300, "
                                               "-0.0100] over 200 image(s)"}
    return {"outputs": {"files": {"fp32": {"verified": True}, "int8": {"verified": verified}}},
            "parity": {"fp32": {"failures": []}, "int8": {"failures": [] if verified else ["mAP: ..."], "map": level}},
            "int8": {"is_int8": is_int8, "macs_int8_share": 0.97 if is_int8 else 0.5, "floor": 0.9}}


def test_accuracy_gate_on_hand_made_numbers():
    from gkd.report import accuracy_gate

    ok = accuracy_gate(_bench(0.40, 0.399), 0.99, _export())
    assert ok["passed"] is True and not ok["failures"] and len(ok["checked"]) == 5
    low = accuracy_gate(_bench(0.40, 0.38), 0.99, _export(verified=False, int8_passed=False))
    assert low["passed"] is False and len(low["failures"]) == 2
    # a failed check is a failure only, never also listed as checked (the report reads "passed: ..." for those)
    assert len(low["checked"]) == 3 and not any("int8 export verified" in c for c in low["checked"])
    assert low["failures"][0] == "distilled int8 export is NOT verified: mAP: ..."
    assert "loses more than 1.0% of fp32's mAP beyond chance" in low["failures"][1] and "200 image(s)" in low[
        "failures"][1]
    not_int8 = accuracy_gate(_bench(0.40, 0.40), 0.99, _export(is_int8=False))
    assert not_int8["failures"] == ["distilled int8 file is not INT8: only 50.0% of its MACs run in INT8 (floor "
                                    "90.0%)"]
    blind = accuracy_gate(_bench(0.0, 0.0), 0.99)  # detects nothing: 0 >= 0.99 x 0 would pass a naive ratio
    assert blind["passed"] is False and "detects nothing passes no gate" in blind["failures"][0]
    assert accuracy_gate(_bench(0.40), 0.99)["passed"] is True  # no INT8 export: FP32 must still detect
    assert accuracy_gate(_bench(0.0, 0.0), 0)["passed"] is None  # gate off
    assert accuracy_gate(None, 0.99)["passed"] is None  # nothing measured: not checked, never "passed"
    assert accuracy_gate({"runners": {"distilled/pytorch-fp32": {"bbox_mAP": None}}}, 0.99)["passed"] is None
    timed = _bench(0.40, 0.40)
    timed["runners"]["distilled/onnxruntime-fp32"]["p50_ms"] = 20.0
    timed["runners"]["distilled/onnxruntime-int8"]["p50_ms"] = 18.0
    assert accuracy_gate(timed, 0.99, _export(), 1.0)["passed"] is True
    slow = accuracy_gate(timed, 0.99, _export(), 0.5)
    assert slow["failures"] == ["distilled int8 is slower than allowed beyond chance: p50 18.0 ms / fp32 20.0 ms "
                                "= 0.90 > gate_max_int8_latency_ratio=0.5"]


def test_the_latency_gate_fails_only_beyond_chance():
    """With the rounds of the side-by-side measurement, INT8 fails the latency check only when the whole paired 95%
    interval of its p50 ratio is above the limit: a noisy run whose ratio straddles it passes and says so."""
    import random

    from gkd.report import accuracy_gate

    rng = random.Random(0)
    fp32 = [20.0 + rng.uniform(-4, 4) for _ in range(40)]
    for int8, passed, words in (([f * 0.8 for f in fp32], True, "<= gate_max"),
                                ([20.5 + rng.uniform(-4, 4) for _ in range(40)], True, "within chance"),
                                ([f * 1.3 for f in fp32], False, "slower than allowed beyond chance")):
        bench = _bench(0.40, 0.40)
        bench["runners"]["distilled/onnxruntime-fp32"]["p50_ms"] = statistics.median(fp32)
        bench["runners"]["distilled/onnxruntime-int8"]["p50_ms"] = statistics.median(int8)
        bench["samples_ms"] = {"distilled/onnxruntime-fp32": fp32, "distilled/onnxruntime-int8": int8}
        gate = accuracy_gate(bench, 0.99, _export(), 1.0)
        text = " ".join(gate["checked"] + gate["failures"])
        assert gate["passed"] is passed and words in text and "95% interval" in text and "40 rounds" in text


def test_deployment_table_on_hand_made_numbers():
    from gkd.report import deployment_rows

    bench = {"runners": {"distilled/onnxruntime-fp32": {"bbox_mAP": 0.30, "p50_ms": 40.0, "p90_ms": 44.0,
                                                        "verified": True},
                         "baseline/onnxruntime-fp32": {"bbox_mAP": 0.25, "p50_ms": 41.0, "p90_ms": 45.0},
                         "distilled/onnxruntime-fp16": {"bbox_mAP": 0.29, "p50_ms": None, "p90_ms": None},
                         "baseline/onnxruntime-fp16": {"bbox_mAP": 0.26, "p50_ms": None, "p90_ms": None}},
             "skipped": {"distilled/onnxruntime-fp16": "no FP16 kernels"}}
    fp32, fp16, int8 = deployment_rows(bench, ["fp32", "fp16", "int8"])
    assert (fp32["gain"], fp32["p50_ms"], fp32["p90_ms"], fp32["baseline_p50_ms"]) == (pytest.approx(0.05), 40, 44, 41)
    assert fp16["gain"] == pytest.approx(0.03) and fp16["p50_ms"] is None and fp16["latency_note"] == "no FP16 kernels"
    assert int8["distilled_mAP"] is None and int8["gain"] is None  # not exported: no number is made up


def test_deployment_table_shows_qad_beside_ptq():
    from gkd.report import deployment_rows, summary_table

    bench = {"runners": {"distilled/onnxruntime-fp32": {"bbox_mAP": 0.30, "p50_ms": 40.0, "p90_ms": 44.0},
                         "distilled/onnxruntime-int8": {"bbox_mAP": 0.27, "p50_ms": 30.0, "p90_ms": 33.0},
                         "qad/onnxruntime-int8": {"bbox_mAP": 0.295, "p50_ms": 29.0, "p90_ms": 32.0,
                                                  "verified": True}}, "skipped": {}}
    rows = deployment_rows(bench, ["fp32", "int8"])
    assert [r["precision"] for r in rows] == ["fp32", "int8", "int8-qad"]
    assert rows[2]["distilled_mAP"] == 0.295 and rows[2]["baseline_mAP"] is None and rows[2]["p50_ms"] == 29.0
    table = "\n".join(summary_table({"stages": {"bench": bench}, "config": {"precisions": ["fp32", "int8"]}}))
    assert "| int8 (PTQ) | - | 27.0 |" in table and "| int8 (QAD) | - | 29.5 |" in table
    plain = "\n".join(summary_table({"stages": {"bench": {"runners": {}}}, "config": {"precisions": ["int8"]}}))
    assert "| int8 |" in plain and "QAD" not in plain


def test_pareto_front():
    from gkd.bench.plots import pareto_front

    points = [(10.0, 0.20), (5.0, 0.10), (12.0, 0.19), (20.0, 0.30), (5.0, 0.05), (8.0, 0.10)]
    assert pareto_front(points) == [1, 0, 3]  # (12, .19) and (8, .10) are beaten; of two at 5 ms the better one


def test_gkd_run_exits_1_when_the_gate_fails_and_0_when_it_passes(first_run, world, tmp_path, capsys, monkeypatch):
    """The exit code follows the gate (stages reused from the first run; the gate's numbers are stubbed so that
    the test does not depend on what the tiny models learned)."""
    import yaml

    import gkd.report as report

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "name": "a", "runs_dir": world["runs_dir"],
                                        "data_root": world["data_root"]}))
    monkeypatch.setattr(report, "accuracy_gate", lambda bench, r, *rest: {
        "min_ratio": r, "passed": False, "checked": ["x"],
        "failures": ["distilled/onnxruntime-int8: mAP 0.3000 is 75.0% of distilled/onnxruntime-fp32's 0.4000"]})
    assert main(["run", str(cfg_file)]) == 1
    cap = capsys.readouterr()
    assert "gkd run: gate failed: distilled/onnxruntime-int8: mAP 0.3000" in cap.err
    assert "## Accuracy gate: FAILED" in cap.out
    assert all(a == "reused" for a, _ in actions(json.loads((config(world, "a").run_dir / "manifest.json")
                                                             .read_text())).values())
    monkeypatch.setattr(report, "accuracy_gate", lambda bench, r, *rest: {"min_ratio": r, "passed": True,
                                                                      "checked": ["x"], "failures": []})
    assert main(["run", str(cfg_file)]) == 0
    assert "## Accuracy gate: PASS" in capsys.readouterr().out
    assert main(["run", str(cfg_file), "gate_min_ratio=-1"]) == 2
    assert "gate_min_ratio" in capsys.readouterr().err
