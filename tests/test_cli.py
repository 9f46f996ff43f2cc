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
