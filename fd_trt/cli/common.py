"""What the commands of ``fd-trt`` share: the model and runner options, ``--threads``, and the logging set-up."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fd_trt.serving import options


def add_model_args(p: Any) -> None:
    """Adds ``--model``, ``--backend``, ``--engines``, ``--threads``, ``--device`` and ``--precision``.

    ``fd-trt generate``, ``calibrate`` and ``serve`` share them; the definition is
    :func:`fd_trt.serving.options.add_model_options`, which ``python -m fd_trt.serve_ray`` uses too.
    """
    options.add_model_options(p)


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``runner_options`` for ``--threads`` and ``--backend``; also sets torch's threads in this process.

    See :func:`fd_trt.serving.options.runner_options` and :func:`fd_trt.serving.options.set_threads`.
    """
    options.set_threads(args.backend, args.threads)
    return options.runner_options(args.backend, args.threads)


def setup_logging(quiet: bool) -> None:
    """Warnings and errors of every logger to stderr; with ``quiet``, also no diffusers/transformers progress bars."""
    if quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)


__all__ = ["add_model_args", "runner_options", "setup_logging"]
