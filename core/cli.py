"""What every command line of gkd shares: the lazily loaded command group and the ``[CONFIG] [KEY=VALUE]...`` arguments.

:class:`LazyGroup` is a click group whose subcommands are imported only when invoked (click docs, "Lazily Loading
Subcommands"): one class for every command table of the house (``gkd``'s root in ``gkd/cli.py``, ``gkd bench`` in
``bench/cli.py``), so that listing commands or printing ``--help`` imports no torch-heavy module.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import click

__all__ = ["LazyGroup", "config_overrides_argument", "split_config_and_overrides"]

#: top-level packages of gkd: a missing one means the stage is not built, not a bug in a third-party import
_OWN_PACKAGES = {"gkd", "core", "kd", "export", "bench"}


class LazyGroup(click.Group):
    """``commands``: name -> ``("module:attribute", one-line help)``; the help is shown without importing."""

    def __init__(self, *args, commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = dict(commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.table)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.table:
            return None
        target, help_ = self.table[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in _OWN_PACKAGES:
                return _unavailable(cmd_name, help_)  # the stage is not built: say so instead of crashing --help
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in self.table.items()])


def _unavailable(name: str, help_: str) -> click.Command:
    @click.command(name=name, help=f"{help_}\n\n(Not available in this build.)",
                   context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args):
        raise click.ClickException(f"'gkd {name}' is not available in this version of gkd")

    return _cmd


def config_overrides_argument(f):
    """The ``[KEY=VALUE]...`` argument of a command that reads a config."""
    return click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)


def split_config_and_overrides(config: Path | None, overrides: tuple[str, ...]) -> tuple[Path | None, list[str]]:
    """CONFIG is optional: when the first argument looks like KEY=VALUE (and is no file), it is an override."""
    text = str(config) if config is not None else ""
    if "=" in text and "/" not in text.split("=", 1)[0] and not config.exists():
        return None, [text, *overrides]
    return config, list(overrides)
