"""Subcommands other than ``compress``: each lives in its own module and is listed here.

A command is a pair of functions: ``add(subparsers)`` declares its parser (with
``argument_default=argparse.SUPPRESS`` so that only given flags reach the config), and
``run(args, console) -> exit status`` runs it. ``SecateurError`` raised by ``run`` becomes a
one-line message and exit status 2 in :func:`secateur.cli._main.main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from . import _distill, _encoder, _export, _plan, _sensitivity, _sweep


@dataclass(frozen=True)
class Command:
    add: Callable[[argparse._SubParsersAction], None]
    run: Callable[[argparse.Namespace, Console], int]


COMMANDS: dict[str, Command] = {
    "distill": Command(_distill.add, _distill.run),
    "encoder": Command(_encoder.add, _encoder.run),
    "export": Command(_export.add, _export.run),
    "plan": Command(_plan.add, _plan.run),
    "sensitivity": Command(_sensitivity.add, _sensitivity.run),
    "sweep": Command(_sweep.add, _sweep.run),
}
