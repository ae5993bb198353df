"""cli/: the ``secateur`` command; it only wires the recipes to argparse."""

import sys

from ._main import build_parser as build_parser
from ._main import main as _main


def main() -> None:
    """Console-script entry: run and exit with the returned status."""
    sys.exit(_main())


__all__ = ["build_parser", "main"]
