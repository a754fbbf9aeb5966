"""``fd-trt serve``: the HTTP API (:mod:`fd_trt.serving.http`) on one process.

Its options are :func:`fd_trt.serving.options.add_serve_options`, which ``python -m fd_trt.serve_ray``
shares.
"""

from __future__ import annotations

import argparse
from typing import Any

from fd_trt.errors import FdTrtError
from fd_trt.serving.options import (
    add_serve_options,
    exposure_warning,
    http_kwargs,
    log_level,
    runtime_kwargs,
    set_threads,
    uvicorn_kwargs,
)


def add_parser(sub: Any) -> None:
    """Adds ``serve`` to the sub-commands."""
    p = sub.add_parser(
        "serve", help="serve the HTTP API (POST /v1/generate, the OpenAI images API, GET /healthz, GET /metrics)"
    )
    add_serve_options(p)


def run(args: argparse.Namespace) -> int:
    """Loads the model, then serves it until SIGINT or SIGTERM; returns the exit status."""
    try:
        import uvicorn

        from fd_trt.serving.http import create_app
    except ImportError as e:
        raise FdTrtError(
            f"fd-trt serve needs the [serve] extra ({e.name} is missing): pip install 'fd_trt[serve]'"
        ) from e
    import signal
    import threading

    from fd_trt.serving.runtime import ServingRuntime

    kwargs = runtime_kwargs(args)  # a bad --sizes fails here, before the model loads
    level = log_level(args)
    app_kwargs = http_kwargs(args)  # and a bad key file or TLS pair
    server_kwargs = uvicorn_kwargs(args)
    warning = exposure_warning(args, app_kwargs["api_keys"])
    if warning:
        import sys

        print(f"fd-trt serve: {warning}", file=sys.stderr, flush=True)
    set_threads(args.backend, args.threads)
    # The runtime's worker runs on this (main) thread: PyTorch's OpenMP regions cost much more when a
    # non-main thread starts them (see ServingRuntime's `start`). uvicorn runs in a thread instead,
    # so this function handles SIGINT/SIGTERM itself.
    rt = ServingRuntime.from_pretrained(**kwargs, start=False)
    app = create_app(runtime=rt, **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=level, **server_kwargs))
    http = threading.Thread(target=server.run, name="fd_trt-http", daemon=True)

    def stop(signum: int, frame: Any) -> None:
        # Graceful: uvicorn stops accepting and waits for open requests (the worker keeps serving
        # them), then its lifespan shutdown drains the runtime, which ends rt.run() below.
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def supervise() -> None:
        http.join()
        rt.shutdown(drain=True)  # also when uvicorn failed to start (e.g. the port is taken)

    http.start()
    threading.Thread(target=supervise, name="fd_trt-supervisor", daemon=True).start()
    print(
        f"fd-trt serve: {rt.pipeline.source} on {rt.pipeline.backend}/{rt.pipeline.device}, "
        f"max batch {rt.max_batch}, sizes {', '.join(f'{h}x{w}' for h, w in rt.sizes) if rt.sizes else 'any'}, "
        f"{'https' if 'ssl_certfile' in server_kwargs else 'http'}://{args.host}:{args.port}"
        f"{', API key required' if app_kwargs['api_keys'] else ''}",
        flush=True,
    )
    rt.run()
    http.join(30)
    return 0 if server.started else 1
