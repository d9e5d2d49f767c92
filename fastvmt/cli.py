"""The ``fastvmt`` command line.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``
and keeps heavy imports (torch, diffusers) inside ``run`` so ``fastvmt --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from fastvmt._version import __version__

# (subcommand, module, one-line help)
COMMANDS = (
    ("transfer", "fastvmt.commands.transfer", "Transfer a reference video's motion onto a text prompt (Wan2.1)."),
    ("demo", "fastvmt.testbed.demo", "Motion transfer on the tiny testbed model, scored against ground truth (CPU)."),
    ("train-testbed", "fastvmt.testbed.train", "Train the testbed model (moving shapes, pixel-space Wan DiT)."),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(prog="fastvmt", description="Fast training-free video motion transfer.")
    parser.add_argument("--version", action="version", version=f"fastvmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastvmt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(dict((n, m) for n, m, _ in COMMANDS)[args.command])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
