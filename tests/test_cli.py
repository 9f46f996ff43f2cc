"""Every command and subcommand answers --help, in words a newcomer can use."""
import click
import pytest

from gkd.cli import COMMANDS, cli, main


def _all_command_paths():
    paths = []
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        paths.append([name])
        if isinstance(cmd, click.Group):
            sub_ctx = click.Context(cmd)
            paths += [[name, sub] for sub in cmd.list_commands(sub_ctx)]
    return paths


def test_root_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "train", "eval", "distill", "export", "bench", "run"):
        assert name in out
    assert set(COMMANDS) >= {"data", "train", "eval", "distill", "export", "bench", "run"}


@pytest.mark.parametrize("path", _all_command_paths(), ids=" ".join)
def test_every_command_has_help(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: gkd " + " ".join(path))
    assert "Not available in this build" not in out, f"gkd {' '.join(path)} is not implemented"
    body = out.split("\n\n", 2)[1] if "\n\n" in out else ""
    assert len(body.strip()) >= 20, f"gkd {' '.join(path)} --help has no description"


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["trian"]) == 2
    assert "No such command 'trian'" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gkd.kd.train.train_detector", interrupted)
    assert main(["train", "train.epochs=1"]) == 130
    err = capsys.readouterr().err
    assert "gkd: interrupted" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1


def test_the_interrupt_hint_fits_the_command():
    from gkd.cli import interrupt_hint

    assert "--resume" in interrupt_hint(["train", "cfg.yaml"]) and "--resume" in interrupt_hint(["distill", "c.yaml"])
    assert "same gkd run command" in interrupt_hint(["run", "name=x"])
    for command in (["export", "m.pt", "--out", "e"], ["eval", "m.pt"], ["predict", "m.pt", "photos"]):
        hint = interrupt_hint(command)
        assert "resume" not in hint.lower() and "run the same command again" in hint, (command, hint)


def test_sigterm_during_training_says_what_happened(capsys, monkeypatch):
    import os
    import signal
    import time

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # gkd's handler raises before this ends
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr("gkd.kd.train.train_detector", killed)
    # a handler that only notes the signal: without gkd's own, the test fails instead of ending pytest
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        assert main(["train", "train.epochs=1"]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "gkd: terminated (SIGTERM)" in err and "--resume" in err


def test_eval_on_a_missing_gpu_names_the_option(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU (this one has one)")
    from gkd.kd.checkpoint import detector_checkpoint, save_checkpoint
    from gkd.kd.config import ModelConfig
    from gkd.kd.data import generate_synthetic
    from gkd.kd.models.detectors import build_detector

    generate_synthetic(tmp_path / "d", n_images=5, image_size=64)
    cfg = ModelConfig(backbone="resnet18", min_size=64, max_size=64, fpn_channels=64, box_head_dim=128)
    from gkd.kd.data import SYNTH_CLASSES

    classes = list(SYNTH_CLASSES)
    ckpt = save_checkpoint(detector_checkpoint(build_detector(cfg, len(classes)), cfg, classes,
                                               list(range(1, len(classes) + 1))), tmp_path / "m.pt")
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "d" / "val.json"), "--device", "cuda",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device: 'cuda' requested" in err and "train.device" not in err
