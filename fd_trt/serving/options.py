"""The options of a served model, declared once for ``fd-trt serve`` and ``python -m fd_trt.serve_ray``.

[`add_serve_options()`][fd_trt.serving.options.add_serve_options] adds them to an `argparse` parser (the model and runner options of
[`add_model_options()`][fd_trt.serving.options.add_model_options], the HTTP listener, batching, request limits and the body limit);
[`runtime_kwargs()`][fd_trt.serving.options.runtime_kwargs] turns the parsed namespace into the keyword arguments of
[`ServingRuntime.from_pretrained()`][fd_trt.serving.runtime.ServingRuntime.from_pretrained].
Both commands use them, so a flag means the same thing, with the same default, in both; options
that only make sense on Ray (replicas, CPUs and GPUs per replica, the cluster address) stay in
[`fd_trt.serving.ray`][fd_trt.serving.ray].
"""

from __future__ import annotations

import argparse
from typing import Any

from fd_trt.errors import InputError
from fd_trt.serving.runtime import DEFAULT_DECODER_MEMORY_MB, Limits, parse_sizes

#: The ``--backend`` choices; ``None`` (no ``--backend``) is ``auto``.
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")

#: The ``--precision`` choices; ``None`` is fp16 for tensorrt, fp32 otherwise.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

#: The ``--log-level`` values (uvicorn's; Ray Serve reads ``trace`` as ``debug``).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_model_options(p: Any) -> None:
    """Adds the model and runner options: ``--model``, ``--backend``, ``--engines``, ``--threads``, ``--device``
    and ``--precision`` (``fd-trt generate``, ``calibrate`` and ``serve`` share them)."""
    p.add_argument("--model", default="default", help="'default' or a local diffusers folder")
    p.add_argument(
        "--backend",
        default=None,
        choices=list(BACKENDS),
        help="runner backend (default: auto, which measures the available ones and keeps the fastest)",
    )
    p.add_argument("--engines", default=None, help="a built engine directory (fd-trt build) for graph backends")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the runner")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--precision",
        default=None,
        choices=list(PRECISIONS),
        help="runner precision (default: fp16 for tensorrt, fp32 otherwise; auto lets --backend auto "
        "consider bf16, which changes the numbers)",
    )


def add_serve_options(p: Any) -> None:
    """Adds every option of ``fd-trt serve`` to the parser (or argument group) ``p``.

    The model and runner options ([`add_model_options()`][fd_trt.serving.options.add_model_options]), then ``--host``, ``--port``,
    ``--max-batch``, ``--max-wait-ms``, ``--max-queue``, ``--timeout``, ``--max-steps``,
    ``--max-size``, ``--max-prompt-chars``, ``--sizes``, ``--decoder-memory-mb``, ``--max-body-kb``
    and ``--log-level``. Read the parsed namespace with [`runtime_kwargs()`][fd_trt.serving.options.runtime_kwargs],
    [`max_body_bytes()`][fd_trt.serving.options.max_body_bytes] and [`log_level()`][fd_trt.serving.options.log_level].
    """
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch", type=int, default=8, help="most requests per sampler call (1: no batching)")
    p.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long, in milliseconds, a batch waits for more requests"
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--timeout", type=float, default=120.0, help="default per-request deadline in seconds")
    p.add_argument("--max-steps", type=int, default=200, help="most inference steps a request may ask for")
    p.add_argument("--max-size", type=int, default=1024, help="largest height or width")
    p.add_argument(
        "--max-prompt-chars", type=int, default=1000, help="longest prompt (and negative prompt) in characters"
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="image sizes served, HxW comma-separated (e.g. 64x64,128x128); graph backends build or load "
        "them at start-up and refuse other sizes (default: the model's size; torch: any size)",
    )
    p.add_argument(
        "--decoder-memory-mb",
        type=float,
        default=DEFAULT_DECODER_MEMORY_MB,
        help="memory budget of one decoder call; caps rows per call and images per batch (0: no cap)",
    )
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (413 beyond)")
    p.add_argument(
        "--log-level",
        default="info",
        help=f"the server's and fd_trt's log level, one of {', '.join(LOG_LEVELS)}; debug and trace also show "
        "diffusers' and transformers' warnings",
    )


def runner_options(backend: str | None, threads: int | None) -> dict[str, Any]:
    """The ``runner_options`` that ``--threads`` asks for, given ``--backend``.

    ONNX Runtime and ``auto`` (which passes each candidate runner the options it takes) get
    ``intra_op_threads``; the torch and TensorRT runners take no thread option (torch's threads are
    process-wide: [`set_threads()`][fd_trt.serving.options.set_threads]). No ``--threads``: no options.
    """
    if threads is None:
        return {}
    return {"intra_op_threads": threads} if (backend or "auto") in ("auto", "onnxruntime") else {}


def set_threads(backend: str | None, threads: int | None) -> None:
    """Sets torch's intra-op threads for ``--threads`` in this process, unless the backend is ONNX Runtime."""
    if threads is None or (backend or "auto") == "onnxruntime":
        return
    import torch

    torch.set_num_threads(threads)


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `ServingRuntime.from_pretrained()` from the options of [`add_serve_options()`][fd_trt.serving.options.add_serve_options].

    ``model``, ``backend``, ``device``, ``precision``, ``engines``, ``runner_options``, ``max_batch``,
    ``max_wait_ms``, ``max_queue``, ``default_timeout_s``, ``limits`` (a [`Limits`][fd_trt.serving.runtime.Limits]), ``sizes``
    (parsed, so a bad ``--sizes`` fails here) and ``decoder_memory_mb`` (``None`` for ``0``: no cap).
    ``--threads`` gives ``runner_options``; torch's own threads are [`set_threads()`][fd_trt.serving.options.set_threads]' business, in
    the process that runs the model.

    Raises:
        InputError: a bad ``--sizes``.
    """
    return {
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "precision": args.precision,
        "engines": args.engines,
        "runner_options": runner_options(args.backend, args.threads),
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "default_timeout_s": args.timeout,
        "limits": Limits(max_steps=args.max_steps, max_size=args.max_size, max_prompt_chars=args.max_prompt_chars),
        "sizes": parse_sizes(args.sizes) if args.sizes else None,
        "decoder_memory_mb": args.decoder_memory_mb if args.decoder_memory_mb > 0 else None,
    }


def max_body_bytes(args: argparse.Namespace) -> int:
    """The HTTP body limit in bytes (``--max-body-kb`` KiB)."""
    return args.max_body_kb * 1024


def log_level(args: argparse.Namespace) -> str:
    """``--log-level`` in lower case.

    Raises:
        InputError: a level that is not one of `LOG_LEVELS`.
    """
    level = str(args.log_level).lower()
    if level not in LOG_LEVELS:
        raise InputError(f"--log-level {args.log_level!r} is not a log level: choose one of {', '.join(LOG_LEVELS)}")
    return level


__all__ = [
    "BACKENDS",
    "LOG_LEVELS",
    "PRECISIONS",
    "add_model_options",
    "add_serve_options",
    "log_level",
    "max_body_bytes",
    "runner_options",
    "runtime_kwargs",
    "set_threads",
]
