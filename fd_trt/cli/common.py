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


#: ``--log-level`` of the commands (``fd-trt serve`` has its own, which uvicorn reads too).
LOG_LEVELS = ("error", "warning", "info", "debug")

#: Libraries whose messages a command's user cannot act on (``torchvision`` missing for an image
#: processor fd_trt never uses, ``accelerate`` missing, loading bars): shown with ``--log-level debug``.
LIBRARIES = ("diffusers", "transformers")


def add_log_level(p: Any, default: str = "warning") -> None:
    """Adds ``--log-level`` (one of :data:`LOG_LEVELS`) to a command."""
    p.add_argument(
        "--log-level",
        default=default,
        choices=LOG_LEVELS,
        help=f"fd_trt's log messages shown on stderr (default: {default}); 'debug' also shows diffusers' and "
        "transformers' warnings and loading bars, which are hidden otherwise",
    )


def setup_logging(quiet: bool, level: str = "warning") -> None:
    """Logging and warnings of the command line: fd_trt's own messages at ``level``, library noise hidden.

    fd_trt's loggers go to stderr at ``level``, every other logger at WARNING. Below ``debug``,
    diffusers' and transformers' loggers are set to ERROR, their Python warnings ignored and their
    loading bars switched off (:data:`LIBRARIES`), so that a command prints only its own progress
    and results; ``debug`` shows them (``quiet`` still hides the bars). This is done here, in the
    command line's entry point only: the library leaves the logging of a program that imports it
    alone.
    """
    import warnings

    # fd-trt serve's --log-level (uvicorn's names) has two more: trace and critical.
    level = {"trace": "debug", "critical": "error"}.get(str(level).lower(), str(level).lower())
    if level not in LOG_LEVELS:
        level = "warning"  # fd-trt serve refuses it, naming the levels, once logging is set up
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    # NOTSET at the default: the root's WARNING applies, as to every other logger.
    logging.getLogger("fd_trt").setLevel(logging.NOTSET if level == "warning" else getattr(logging, level.upper()))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if level == "debug":
        diffusers_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_warning()
    else:
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        for lib in LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")
    # "Loading pipeline components" (diffusers) and "Loading weights" (transformers) bars
    for lib_logging in (diffusers_logging, transformers_logging):
        if quiet or level != "debug":
            lib_logging.disable_progress_bar()
        else:
            lib_logging.enable_progress_bar()


__all__ = ["LIBRARIES", "LOG_LEVELS", "add_log_level", "add_model_args", "runner_options", "setup_logging"]
