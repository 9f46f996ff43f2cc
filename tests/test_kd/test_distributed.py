"""Many processes (torchrun, Gloo, CPU): 2-process distillation end to end, against one process of the same
computation. Nothing here depends on what training learned: the assertions are equalities between ranks, between
one and two processes of the same computation (prototype bank of the same weights, evaluation of one checkpoint),
between a resumed and an uninterrupted 2-process run, plus exit codes, messages and which files exist.

Each 2-process job is a real ``python -m torch.distributed.run`` subprocess (a free port, a timeout). Tiny: 64 px
images, FPN 64 wide, one step per epoch."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from gkd.cli import main
from gkd.core.errors import GkdError
from gkd.kd.checkpoint import detector_checkpoint, load_checkpoint, save_checkpoint
from gkd.kd.config import ModelConfig, TrainConfig
from gkd.kd.data import generate_synthetic, load_coco
from gkd.kd.distill.pgm import PrototypeBank
from gkd.kd.distributed import ShardedBatchSampler, _backend, effective_lr, shard_batches, torchrun_command
from gkd.kd.models.detectors import build_detector
from tests.helpers import TEST_THREADS

#: a 2-process job here takes ~10-15 s on the shared 2-core machine; far more means it hangs
JOB_TIMEOUT_S = 240

MODEL = ("{arch: faster_rcnn, backbone: resnet18, min_size: 64, max_size: 64, anchor_sizes: [8, 16, 32, 64, 128], "
         "rois_per_image: 64, fpn_channels: 64, box_head_dim: 128}")

# A rank that raises: run as torchrun's script, it makes rank 1's training step fail with a user error.
FAILING_RANK = """
import os, sys
from gkd.kd.distill.task import DistillationTask
from gkd.core.errors import GkdError
if os.environ.get("RANK") == "1":
    def boom(self, images, targets):
        raise GkdError("injected failure in a training step")
    DistillationTask.forward = boom
from gkd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, script=None, timeout=JOB_TIMEOUT_S):
    """``gkd <args>`` (or ``script <args>``) on 2 local processes; returns (exit status, output, seconds)."""
    target = [str(script)] if script else ["-m", "gkd"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *target, *map(str, args), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """9 train + 3 val images of 64 px, a random-init teacher, train.yaml and distill.yaml."""
    root = tmp_path_factory.mktemp("ddp")
    generate_synthetic(root / "data", n_images=12, seed=0, image_size=64, val_fraction=0.25)
    index = load_coco(root / "data" / "train.json")
    cfg = ModelConfig(backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128),
                      fpn_channels=64, box_head_dim=128)
    torch.manual_seed(0)
    save_checkpoint(detector_checkpoint(build_detector(cfg, len(index.classes)), cfg, index.classes,
                                        index.category_ids), root / "teacher.pt")
    text = f"""
runs_dir: {root / 'runs'}
data: {{root: {root / 'data'}}}
model: {MODEL}
train: {{epochs: 2, batch_size: 2, lr: 0.002, warmup_iters: 0, max_steps_per_epoch: 1, threads: {TEST_THREADS},
         grad_clip: 10.0, dist_timeout_s: 60}}
eval: {{batch_size: 2}}
"""
    (root / "train.yaml").write_text(text)
    text += f"""
distill:
  method: gkd
  teacher: {{checkpoint: {root / 'teacher.pt'}, arch: faster_rcnn, backbone: resnet18}}
  pgm: {{num_prototypes: 3, min_box_size: 8, max_images_per_class: 4, batch_size: 2}}
"""
    (root / "distill.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def two_process_run(world):
    """`gkd distill` on 2 processes, 2 epochs of one step each: (output, run folder)."""
    rc, out, _ = torchrun("distill", world / "distill.yaml", "name=two")
    assert rc == 0, out[-3000:]
    return out, world / "runs" / "two"


def checksums(out: str, what: str) -> dict[tuple[int, str], str]:
    """{(rank, epoch): sha256} of the per-rank checksum lines ``rank R: <what> ... epoch E: sha256 H``."""
    found = re.findall(rf"rank (\d): {what}\D*(\d+): sha256 ([0-9a-f]{{64}})", out)
    return {(int(r), e): h for r, e, h in found}


def test_two_processes_agree_on_prototypes_and_parameters_and_only_rank0_writes(two_process_run, world):
    out, run = two_process_run
    banks = checksums(out, "prototype bank of epoch")
    params = checksums(out, "trainable parameters and buffers after epoch")
    for sums in (banks, params):
        assert {e for _, e in sums} == {"1", "2"}  # logged at every refresh / after every epoch (one step each)
        for epoch in ("1", "2"):
            assert sums[(0, epoch)] == sums[(1, epoch)]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert PrototypeBank.from_state(last["extra"]["prototypes"]).sha256() == banks[(0, "2")]
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2
    # rank 0 alone wrote: one record per epoch, its log only, the lock released
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[0]["world_size"] == 2
    assert "rank 1" not in (run / "log.txt").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "log.txt", "metrics.csv",
                                                     "metrics.jsonl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "model.pt"]


def test_first_bank_equals_one_process_bank(two_process_run, world):
    """Epoch 1's bank comes from the initial student (the same on 1 and 2 processes): the sharded extraction and the
    gather give exactly the single-process bank."""
    out, _ = two_process_run
    assert main(["distill", str(world / "distill.yaml"), "name=one", "train.epochs=1", "--no-progress"]) == 0
    one = load_checkpoint(world / "runs" / "one" / "checkpoints" / "last.pt")
    assert PrototypeBank.from_state(one["extra"]["prototypes"]).sha256() == checksums(out, "prototype bank of "
                                                                                          "epoch")[(0, "1")]


def test_sharded_evaluation_equals_single_process_evaluation(two_process_run, world):
    """The 2-process run's last val metrics (sharded, gathered) = one process evaluating its model.pt the same way
    (the loop's own evaluation: eval.batch_size 2, max_dets 100). (Called through the library, not `gkd eval`, whose
    protocol is its own.)"""
    from gkd.kd.checkpoint import load_detector
    from gkd.kd.data import CocoDetection
    from gkd.kd.engine import make_loader
    from gkd.kd.evaluation import CocoEvaluator, evaluate_detector

    _, run = two_process_run
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    index = load_coco(world / "data" / "val.json")
    model, _ = load_detector(run / "checkpoints" / "model.pt")
    single = evaluate_detector(model, make_loader(CocoDetection(index, train=False, min_size=64, max_size=64), 2, 0),
                               CocoEvaluator(index.gt_json, index.category_ids, 100), "cpu")
    names = [k[len("val/"):] for k in last if k.startswith("val/")]
    assert len(names) == 12
    assert {k: last[f"val/{k}"] for k in names} == {k: single[k] for k in names}


def test_resume_on_two_processes_matches_uninterrupted_and_other_world_size_is_refused(two_process_run, world,
                                                                                      capsys):
    _, full = two_process_run
    rc, out, _ = torchrun("distill", world / "distill.yaml", "name=part", "train.epochs=1")
    assert rc == 0, out[-3000:]
    # one process cannot continue a 2-process run: data order, steps per epoch and lr schedule depend on it
    assert main(["distill", str(world / "distill.yaml"), "name=part", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume on 1 process(es): the run was trained on 2" in err and "Traceback" not in err
    rc, out, _ = torchrun("distill", world / "distill.yaml", "name=part", "--resume")
    assert rc == 0, out[-3000:]
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(world / "runs" / "part" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["extra"]["adapters"]:
        assert torch.equal(a["extra"]["adapters"][k], b["extra"]["adapters"][k]), k
    assert PrototypeBank.from_state(a["extra"]["prototypes"]).sha256() == \
        PrototypeBank.from_state(b["extra"]["prototypes"]).sha256()


def test_a_rank_that_raises_ends_the_job_naming_its_rank(world, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    rc, out, seconds = torchrun("distill", world / "distill.yaml", "name=fails", script=script)
    assert rc != 0
    assert "gkd: error: rank 1: injected failure in a training step" in out
    # rank 0, left waiting in a collective, stops too (with one line saying so) well before the 60 s timeout
    assert "Traceback" not in "\n".join(line for line in out.splitlines() if line.startswith("gkd:"))
    assert seconds < 60 + 30, seconds


def _evaluate_on_rank(rank, port, checkpoint, val_json, out):
    """One rank of a 2-process Gloo group (torch.multiprocessing): the sharded evaluation of ``checkpoint``."""
    import torch.distributed as dist

    from gkd.kd.checkpoint import load_detector
    from gkd.kd.data import CocoDetection, collate
    from gkd.kd.distributed import evaluate_sharded
    from gkd.kd.evaluation import CocoEvaluator

    torch.set_num_threads(TEST_THREADS)  # as the parent process: the same kernels, the same floats
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, _ = load_detector(checkpoint)
        index = load_coco(val_json)
        ds = CocoDetection(index, train=False, min_size=64, max_size=64)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=ShardedBatchSampler(len(ds), 2, rank, 2),
                                             collate_fn=collate)
        evaluator = CocoEvaluator(index.gt_json, index.category_ids)
        metrics = evaluate_sharded(model, loader, evaluator, torch.device("cpu"))
        if rank == 0:
            torch.save({"metrics": metrics, "detections": evaluator.detections}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_gathers_exactly_the_single_process_detections(world, tmp_path):
    """A fixed random-init checkpoint at score threshold 0 (it detects plenty, by construction of the threshold):
    2 ranks over 3 images in batches of 2 (rank 0: images 0-1, rank 1: image 2) give the single-process list of
    detections, in the same order, and the same 12 metrics."""
    import torch.multiprocessing as mp

    from gkd.kd.checkpoint import load_detector
    from gkd.kd.data import CocoDetection
    from gkd.kd.engine import make_loader
    from gkd.kd.evaluation import CocoEvaluator, evaluate_detector

    index = load_coco(world / "data" / "val.json")
    cfg = ModelConfig(backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128),
                      fpn_channels=64, box_head_dim=128, score_thresh=0.0)
    torch.manual_seed(1)
    ckpt = tmp_path / "fixed.pt"
    save_checkpoint(detector_checkpoint(build_detector(cfg, len(index.classes)), cfg, index.classes,
                                        index.category_ids), ckpt)
    mp.spawn(_evaluate_on_rank, args=(free_port(), ckpt, world / "data" / "val.json", tmp_path / "two.pt"),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    model, _ = load_detector(ckpt)
    single = CocoEvaluator(index.gt_json, index.category_ids)
    metrics = evaluate_detector(model, make_loader(CocoDetection(index, train=False, min_size=64, max_size=64), 2,
                                                   0), single, "cpu")
    assert len(single.detections) > 0
    assert two["detections"] == single.detections
    assert two["metrics"] == metrics


def test_gkd_train_nproc_runs_torchrun_end_to_end(world):
    """`gkd train --nproc 2`: torchrun --standalone (it finds a free port itself) with the same command line."""
    cfg = world / "train.yaml"
    assert main(["train", str(cfg), "name=trained", "train.epochs=1", "--nproc", "2", "--no-progress"]) == 0
    (record,) = [json.loads(line) for line in (world / "runs" / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert record["world_size"] == 2 and record["step"] == 1 and "val/bbox_mAP" in record


# ------------------------------------------------------------------------------------------------------------------
# small pieces, in-process


def test_batch_aligned_shards_cover_every_image_once_in_the_single_process_batches():
    n, bs = 11, 3
    single = [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]
    shards = [shard_batches(n, bs, r, 2) for r in range(2)]
    assert sorted((i, b) for s in shards for i, b in s) == list(enumerate(single))
    sampler = ShardedBatchSampler(n, bs, 1, 2)
    assert list(sampler) == [single[1], single[3]] and sampler.batch_ids == [1, 3] and len(sampler) == 2


def test_linear_scaling_rule_is_off_by_default():
    assert effective_lr(TrainConfig(lr=0.02, batch_size=2), 8) == 0.02
    scaled = TrainConfig(lr=0.02, batch_size=2, lr_scaling="linear", base_batch_size=16)
    assert effective_lr(scaled, 8) == pytest.approx(0.02)
    assert effective_lr(scaled, 2) == pytest.approx(0.005)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_nccl_without_gpu_and_bad_nproc_are_one_line_errors(capsys):
    with pytest.raises(GkdError, match="'nccl' needs CUDA GPUs"):
        _backend(TrainConfig(dist_backend="nccl"))
    assert _backend(TrainConfig()) == "gloo"
    assert main(["distill", "--nproc", "0"]) == 2
    err = capsys.readouterr().err
    assert "--nproc" in err and "Traceback" not in err


def test_nproc_starts_torchrun_with_the_same_command(monkeypatch, tmp_path):
    import subprocess as sp

    seen = {}
    monkeypatch.setattr(sp, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    (tmp_path / "cfg.yaml").write_text("name: x\n")
    cfg = str(tmp_path / "cfg.yaml")
    assert main(["train", cfg, "train.epochs=1", "--nproc", "2", "--resume"]) == 0
    assert seen["cmd"] == torchrun_command(2, ["train", cfg, "train.epochs=1", "--resume"])
    assert seen["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
