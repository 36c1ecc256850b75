"""Subcommands that other packages add to mechir: a Command in the mechir.commands entry-point
group (mechir demo comes from the studies this way: the library never imports them).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mechir.cli_common import PROG, UsageError


# ---------------------------------------------------------------------- commands of other packages
@dataclass(frozen=True)
class Command:
    """A ``mechir`` subcommand that another package contributes through the entry-point group
    :data:`COMMAND_GROUP` (in ``pyproject.toml``: ``[project.entry-points."mechir.commands"]``,
    ``name = "module:OBJECT"``).

    Attributes:
        help: one line for ``mechir --help``.
        description: the text of ``mechir <name> --help``.
        add_options: adds the command's options to its parser (keep its imports light: ``--help``
            and argument errors must not import torch).
        run: runs the parsed command; returns the exit status.
    """

    help: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: The entry-point group of :class:`Command` objects (``mechir <name>``).
COMMAND_GROUP = "mechir.commands"
#: Commands of this repository's other packages, tried by module path when the installed
#: metadata lacks their entry point (an editable install made before it was declared, or a
#: source checkout on ``sys.path``); ``pyproject.toml`` declares the same entry points.
KNOWN_COMMANDS: dict[str, str] = {"demo": "analyses.demo:COMMAND"}


def _entry_points() -> dict[str, str]:
    """``name -> "module:attr"`` of the installed :data:`COMMAND_GROUP` entry points."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)}


def _load_command(name: str, target: str) -> Command | str:
    """The :class:`Command` at ``target`` (``"module:attr"``), or one line saying why not."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a broken plugin must not break mechir --help
        missing = getattr(err, "name", None) if isinstance(err, ImportError) else None
        if missing and module_name.split(".")[0] == missing.split(".")[0]:
            return (
                f"'{PROG} {name}' is not installed (no module {missing!r}; it comes with the "
                "mechir repository's studies: run 'pip install -e .' in a checkout of it)"
            )
        return f"'{PROG} {name}' cannot be loaded from {target} ({type(err).__name__}: {err})"
    command = getattr(module, attr, None) if attr else None
    if not all(callable(getattr(command, f, None)) for f in ("add_options", "run")):
        return f"'{PROG} {name}': {target} is not a mechir.cli_plugins.Command"
    return command


def plugin_commands() -> dict[str, Command | str]:
    """The commands of other packages: ``name -> Command``, or a one-line reason why that
    command cannot run (the entry point or module is missing or broken). Installed entry points
    come first, then :data:`KNOWN_COMMANDS` by module path."""
    targets = {**KNOWN_COMMANDS, **_entry_points()}
    return {name: _load_command(name, targets[name]) for name in sorted(targets)}


def _plugin_parser(sub: Any, name: str, command: Command | str) -> argparse.ArgumentParser:
    """The subparser of a plugin command; a missing one takes any arguments and says why."""
    if not isinstance(command, str):
        p = sub.add_parser(name, help=command.help, description=command.description)
        command.add_options(p)
        p.set_defaults(_run=command.run)
        return p
    # no option prefix: every argument (--help too) is taken, and running says why it cannot run
    p = sub.add_parser(name, help=f"(not available: {command})", prefix_chars="\0", add_help=False)
    p.add_argument("arguments", nargs="*")

    def unavailable(args: argparse.Namespace) -> int:
        raise UsageError(command)

    p.set_defaults(_run=unavailable)
    return p
