"""A pipeline's training stage resumes exactly its own interrupted run and nothing else (kd/resume.py).

The run folders here are fakes: a ``last.pt`` that passes the run-checkpoint checks but holds no trained detector,
so no test trains anything.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from gkd.core.config import to_dict
from gkd.core.errors import GkdError
from gkd.kd.checkpoint import FORMAT, VERSION, save_checkpoint
from gkd.kd.config import load_config
from gkd.kd.resume import RESULT_NEUTRAL_KEYS, STAGE_KEY_FILE, prepare_stage_run

KEY = "a-stage-key"


def stage_config(runs, *overrides):
    return load_config(None, [f"runs_dir={runs}", "name=teacher", "model.num_classes=3", *overrides])


def interrupted_run(cfg, key: str | None = KEY):
    """What a stage killed after its first epoch leaves: the key marker, config.yaml, metrics and ``last.pt``."""
    checkpoints = cfg.run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    if key is not None:
        (cfg.run_dir / STAGE_KEY_FILE).write_text(key + "\n")
    (cfg.run_dir / "config.yaml").write_text("name: teacher\n")
    (cfg.run_dir / "metrics.jsonl").write_text('{"epoch": 0}\n')
    save_checkpoint({"format": FORMAT, "version": VERSION, "kind": "run", "model_config": to_dict(cfg.model),
                     "model": {"weight": torch.zeros(1)}, "epoch": 0, "config": to_dict(cfg), "optimizer": {},
                     "scheduler": {}, "rng": {}}, checkpoints / "last.pt")
    return cfg.run_dir


def contents(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_same_key_and_config_resume(tmp_path, caplog):
    cfg = stage_config(tmp_path)
    folder = interrupted_run(cfg)
    before = contents(folder)
    with caplog.at_level(logging.INFO, logger="gkd"):
        assert prepare_stage_run(cfg, KEY) is True
    assert contents(folder) == before
    assert f"resuming the interrupted run in {folder}" in caplog.text


@pytest.mark.parametrize("key", RESULT_NEUTRAL_KEYS)
def test_a_result_neutral_key_changed_still_resumes(tmp_path, key):
    folder = interrupted_run(stage_config(tmp_path))
    section, name = key.split(".")
    cfg = stage_config(tmp_path)
    changed = getattr(cfg, section)
    value = getattr(changed, name)
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(changed, **{name: value + 3})})
    assert prepare_stage_run(cfg, KEY) is True and (folder / "checkpoints" / "last.pt").is_file()


def test_a_class_count_left_to_the_dataset_matches_the_one_the_run_recorded(tmp_path):
    folder = interrupted_run(stage_config(tmp_path))  # recorded model.num_classes=3
    assert prepare_stage_run(stage_config(tmp_path, "model.num_classes=0"), KEY) is True
    assert (folder / "checkpoints" / "last.pt").is_file()


def test_another_key_removes_the_run_and_marks_the_folder_with_the_new_key(tmp_path, caplog):
    cfg = stage_config(tmp_path)
    folder = interrupted_run(cfg, key="an-older-key")
    with caplog.at_level(logging.INFO, logger="gkd"):
        assert prepare_stage_run(cfg, KEY) is False
    assert contents(folder) == [STAGE_KEY_FILE]
    assert (folder / STAGE_KEY_FILE).read_text() == KEY + "\n"
    assert f"removing {folder}: made for another stage key (its inputs changed)" in caplog.text


def test_another_config_removes_the_run(tmp_path, caplog):
    folder = interrupted_run(stage_config(tmp_path))
    with caplog.at_level(logging.INFO, logger="gkd"):
        assert prepare_stage_run(stage_config(tmp_path, "train.lr=0.5"), KEY) is False
    assert contents(folder) == [STAGE_KEY_FILE]
    assert f"removing {folder}: made with another config (train.lr)" in caplog.text


def test_a_folder_with_no_finished_epoch_starts_clean(tmp_path):
    cfg = stage_config(tmp_path)
    folder = interrupted_run(cfg)
    (folder / "checkpoints" / "last.pt").unlink()
    assert prepare_stage_run(cfg, KEY) is False
    assert contents(folder) == [STAGE_KEY_FILE]


def test_no_folder_yet_is_made_and_marked(tmp_path):
    cfg = stage_config(tmp_path)
    assert prepare_stage_run(cfg, KEY) is False
    assert contents(cfg.run_dir) == [STAGE_KEY_FILE]


def test_a_folder_the_pipeline_did_not_make_is_refused_and_kept(tmp_path):
    cfg = stage_config(tmp_path)
    folder = interrupted_run(cfg, key=None)  # the user's own gkd train run: no stage key file
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(GkdError, match="holds files this pipeline did not make .*no stage_key.txt"):
        prepare_stage_run(cfg, KEY)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_marker_left_half_written_by_a_kill_is_not_foreign(tmp_path):
    cfg = stage_config(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / f".{STAGE_KEY_FILE}.1234.tmp").write_text("a-stage")
    assert prepare_stage_run(cfg, KEY) is False
    assert contents(cfg.run_dir) == [STAGE_KEY_FILE]


def test_a_newer_checkpoint_format_is_refused_before_anything_is_removed(tmp_path):
    cfg = stage_config(tmp_path)
    folder = interrupted_run(cfg)
    last = folder / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    save_checkpoint({**state, "version": VERSION + 1}, last)
    with pytest.raises(GkdError, match="newer than this gkd understands"):
        prepare_stage_run(cfg, KEY)
    assert last.is_file()
