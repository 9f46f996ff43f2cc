"""gkd.core.io atomic writes: the permissions a plain write would give, and nothing left behind on failure."""
import os
import stat

import pytest

from gkd.core.io import atomic_write, atomic_write_text


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_the_umask_default_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "b.txt") == 0o640


def test_rewrite_keeps_the_existing_files_permissions(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o600


def test_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path):
    import errno

    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "metrics.csv", "old\n")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GkdError, match=r"metrics.csv: No space left on device while writing it"):
        atomic_write(target, full)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_unwritable_folders_are_found_before_any_work(tmp_path):
    from gkd.core.errors import GkdError
    from gkd.core.io import RunLock, ensure_writable_folder

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GkdError, match=r"file/run: the run folder is not writable"):
        with RunLock(blocker / "run"):
            pass
    with pytest.raises(GkdError, match=r"checkpoints: the checkpoint folder is not writable"):
        ensure_writable_folder(blocker / "checkpoints", "the checkpoint folder")


def test_appending_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import builtins
    import errno

    from gkd.core.errors import GkdError
    from gkd.core.io import append_jsonl

    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"epoch": 0})
    real_open = builtins.open

    class Full:
        def __init__(self, *a, **k):
            self.fh = real_open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", Full)
    with pytest.raises(GkdError, match="metrics.jsonl: No space left on device while appending"):
        append_jsonl(log, {"epoch": 1})
    monkeypatch.undo()
    assert log.read_text() == '{"epoch": 0}\n'


def test_an_output_folder_that_is_a_file_says_so(tmp_path):
    from gkd.core.errors import GkdError
    from gkd.core.io import ensure_writable_folder

    blocker = tmp_path / "report.json"
    blocker.write_text("the user's file")
    with pytest.raises(GkdError, match=r"report.json: --out folder is a file; expected a folder"):
        ensure_writable_folder(blocker, "--out folder")
    assert blocker.read_text() == "the user's file"


def test_a_refused_command_leaves_no_empty_folder_it_made(tmp_path):
    from gkd.core.io import created_folders, ensure_writable_folder, remove_empty_created_folders

    existed = tmp_path / "existed"
    existed.mkdir()
    mark = created_folders()
    ensure_writable_folder(existed, "--out folder")  # there before: never removed
    ensure_writable_folder(tmp_path / "a" / "b" / "c", "--out folder")
    ensure_writable_folder(tmp_path / "kept", "--out folder")
    (tmp_path / "kept" / "result.json").write_text("{}")
    removed = remove_empty_created_folders(since=mark)
    assert set(removed) == {tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existed", "kept"]
    assert remove_empty_created_folders(since=mark) == []


def test_a_command_refused_after_making_its_out_folder_leaves_none(tmp_path, capsys):
    """`gkd predict` and `gkd eval` create --out before they open the model (an unwritable --out costs nothing);
    a refusal then removes the empty folder they made."""
    from PIL import Image

    from gkd.cli import main

    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "photos" / "a.png")
    rc = main(["predict", str(bogus), str(tmp_path / "photos"), "--out", str(tmp_path / "new" / "pred")])
    assert rc == 2 and "not a PyTorch checkpoint" in capsys.readouterr().err
    rc = main(["eval", str(bogus), "--data", str(tmp_path / "val.json"), "--out", str(tmp_path / "new2" / "ev")])
    assert rc == 2 and "gkd: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "photos"]
