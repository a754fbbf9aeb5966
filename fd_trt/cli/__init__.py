"""Command line: ``fd-trt`` (``python -m fd_trt.cli``). Only this package prints.

One module per command, each with ``add_parser(subparsers)`` and ``run(args) -> exit status``:
:mod:`~fd_trt.cli.generate`, :mod:`~fd_trt.cli.build`, :mod:`~fd_trt.cli.bench`,
:mod:`~fd_trt.cli.serve`, :mod:`~fd_trt.cli.calibrate` and :mod:`~fd_trt.cli.mask`; the options
they share are in :mod:`fd_trt.cli.common`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fd_trt.cli import bench, build, calibrate, generate, mask, serve
from fd_trt.cli.common import setup_logging
from fd_trt.cli.generate import bf16_hint_text
from fd_trt.errors import FdTrtError

#: The commands, in the order ``fd-trt --help`` lists them.
COMMANDS = {"generate": generate, "build": build, "bench": bench, "serve": serve, "calibrate": calibrate, "mask": mask}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fd-trt``, with every command."""
    parser = argparse.ArgumentParser(prog="fd-trt", description="Faster Diffusion on compiled graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fd-trt``."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "quiet", False), getattr(args, "log_level", "warning"))
    try:
        return COMMANDS[args.command].run(args)
    except FdTrtError as e:
        print(f"fd-trt: error: {e}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "bf16_hint_text", "build_parser", "main"]
