"""Scale-out on Ray Serve: N replicas of ``ServingRuntime`` behind Ray's HTTP proxy.

Each replica is a Ray actor that loads the model once, warms up, and serves the same HTTP API as
``fd-trt serve`` ([`fd_trt.serving.http.create_app()`][fd_trt.serving.http.create_app]): ``POST /v1/generate``, ``GET /healthz``,
``GET /metrics`` (that replica's metrics). Ray's proxy spreads requests over the replicas, and each
replica batches what it receives. With GPUs, each replica asks for one (``num_gpus=1``), so N
replicas use N GPUs, across the nodes of the cluster.

Run it (``pip install 'fd_trt[serve]'``)::

    python -m fd_trt.serving.ray --replicas 2 --port 8000            # starts or joins a Ray cluster
    # or, from Python:
    from ray import serve
    from fd_trt.serving.ray import deployment
    serve.run(deployment(num_replicas=2).bind(model="default"), route_prefix="/")

Every response carries ``X-Replica``: the replica that served it, as Ray's replica id (the end of
the replica actor's name), never a host name or process id.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

from fd_trt.errors import FdTrtError
from fd_trt.serving.options import (
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_IMAGE_KB,
    add_serve_options,
    exposure_warning,
    http_kwargs,
    key_digest,
    runner_options,
    runtime_kwargs,
    set_threads,
    uvicorn_kwargs,
)
from fd_trt.serving.options import log_level as parse_log_level


def deployment(
    num_replicas: int = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    max_ongoing_requests: int = 64,
    log_level: str | None = None,
    max_queued_requests: int = DEFAULT_LIMIT_CONCURRENCY,
) -> Any:
    """The Ray Serve deployment of the runtime.

    Args:
        num_replicas: replicas (processes), each with its own runtime and model copy.
        num_cpus: CPUs each replica reserves (default 1).
        num_gpus: GPUs each replica reserves; default 1 when this machine's Ray cluster has GPUs, else 0.
        max_ongoing_requests: requests Ray sends one replica at a time; beyond it Ray queues them at
            the proxy. Keep it at least the runtime's ``max_batch`` so batches can fill.
        log_level: the replicas' log level (``"INFO"``, ``"DEBUG"``, ...); default Ray Serve's.
        max_queued_requests: requests Ray's proxy holds for the deployment beyond those sent to
            replicas; more get 503 at once (back-pressure; ``fd-trt serve --limit-concurrency``).

    Returns:
        A ``ray.serve.Deployment``; ``.bind(**runtime_kwargs)`` makes the application, with
        ``runtime_kwargs`` passed to `ServingRuntime.from_pretrained()` (``model``, ``backend``,
        ``max_batch``, ``max_wait_ms``, ``max_queue``, ``sizes``, ``decoder_memory_mb``, ...), plus
        ``threads`` and ``max_body_bytes`` (the HTTP body limit). ``threads`` means what ``fd-trt serve
        --threads`` means: torch's threads in the replica (unless the backend is onnxruntime), and
        ``runner_options`` from [`fd_trt.serving.options.runner_options()`][fd_trt.serving.options.runner_options] where none are given.
        ``api_key_sha256``, ``allowed_hosts``, ``allowed_origins`` and ``docs`` go to
        [`create_app()`][fd_trt.serving.http.create_app] (keys travel only as their sha256).
    """
    import ray
    from ray import serve

    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @serve.deployment(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": 1 if num_cpus is None else num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        **({"logging_config": {"log_level": log_level}} if log_level else {}),
    )
    @serve.ingress()
    class FdTrtReplica:
        def __init__(self, **runtime_kwargs: Any) -> None:
            from fd_trt.serving.runtime import ServingRuntime

            self.max_body_bytes = runtime_kwargs.pop("max_body_bytes", None)
            self.http = {
                k: runtime_kwargs.pop(k)
                for k in ("api_key_sha256", "allowed_hosts", "allowed_origins", "docs", "max_image_bytes")
                if k in runtime_kwargs
            }
            threads = runtime_kwargs.pop("threads", None)
            if threads:
                threads = int(threads)
                runtime_kwargs.setdefault("runner_options", runner_options(runtime_kwargs.get("backend"), threads))
                set_threads(runtime_kwargs.get("backend"), threads)
            # Ray's replica id (a random token) tells replicas apart without showing the host or the
            # process id; the operator maps it to a process with Ray's own tools (the actor's name).
            try:
                self.name = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a replica (tests): a random token
                self.name = secrets.token_hex(4)
            self.runtime = ServingRuntime.from_pretrained(**runtime_kwargs)

        def __serve_build_asgi_app__(self) -> Any:
            from fd_trt.serving.http import DEFAULT_MAX_BODY_BYTES, create_app

            app = create_app(
                runtime=self.runtime, max_body_bytes=self.max_body_bytes or DEFAULT_MAX_BODY_BYTES, **self.http
            )
            name = self.name

            @app.middleware("http")
            async def tag_replica(request: Any, call_next: Any) -> Any:
                response = await call_next(request)
                response.headers["X-Replica"] = name
                return response

            return app

    return FdTrtReplica


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fd_trt.serving.ray``: Ray's own options, then every option of ``fd-trt serve``.

    The serving options come from [`fd_trt.serving.options.add_serve_options()`][fd_trt.serving.options.add_serve_options], as in ``fd-trt
    serve``; ``--host`` and ``--port`` are where Ray's HTTP proxy listens, ``--log-level`` is Ray
    Serve's (``trace`` reads as ``debug``).
    """
    p = argparse.ArgumentParser(prog="python -m fd_trt.serving.ray", description=__doc__.split("\n")[0])
    ray_opts = p.add_argument_group("Ray")
    ray_opts.add_argument(
        "--address", default=None, help="Ray cluster address (default: join a running one, or start one)"
    )
    ray_opts.add_argument("--replicas", type=int, default=1, help="replicas, each with its own model copy (default 1)")
    ray_opts.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    ray_opts.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per replica (default 1 if the cluster has GPUs)"
    )
    add_serve_options(p.add_argument_group("serving (as fd-trt serve)"))
    return p


#: Ray's HTTP request timeout is the longest request deadline plus this margin (seconds).
REQUEST_TIMEOUT_MARGIN_S = 30.0


def app_kwargs(args: argparse.Namespace, environ: Any = None) -> dict[str, Any]:
    """What [`main()`][fd_trt.serving.ray.main] binds the deployment with: [`runtime_kwargs()`][fd_trt.serving.options.runtime_kwargs], plus
    ``threads`` (torch's threads in each replica) and ``max_body_bytes``, and, where the options set
    them, the HTTP guard's ``api_key_sha256`` (the keys' sha256 only: no key is stored in the
    cluster), ``allowed_hosts``, ``allowed_origins`` and ``docs``.

    Raises:
        InputError: a bad ``--sizes`` or key file.
    """
    http = http_kwargs(args, environ)
    out = {**runtime_kwargs(args), "threads": args.threads, "max_body_bytes": http["max_body_bytes"]}
    if http["api_keys"]:
        out["api_key_sha256"] = [key_digest(k) for k in http["api_keys"]]
    if getattr(args, "allowed_hosts", None):
        out["allowed_hosts"] = http["allowed_hosts"]
    if http["allowed_origins"]:
        out["allowed_origins"] = http["allowed_origins"]
    if http["docs"]:
        out["docs"] = True
    if args.max_image_kb != DEFAULT_MAX_IMAGE_KB:
        out["max_image_bytes"] = http["max_image_bytes"]
    return out


def request_timeout_s(args: argparse.Namespace) -> float:
    """Ray's HTTP request timeout: the longest deadline a request may get, plus a margin."""
    longest = args.max_timeout if getattr(args, "max_timeout", None) is not None else args.timeout
    return float(longest) + REQUEST_TIMEOUT_MARGIN_S


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fd_trt.serving.ray``: deploy N replicas on the current (or a new local) Ray cluster."""
    args = build_parser().parse_args(argv)
    try:
        kwargs = app_kwargs(args)
        level = parse_log_level(args)
        if args.ssl_keyfile or args.ssl_certfile:
            raise FdTrtError(
                "Ray Serve's proxy does not take --ssl-keyfile/--ssl-certfile here: put a TLS-terminating "
                "proxy (nginx, a cloud load balancer) in front of it"
            )
        limit = uvicorn_kwargs(args)["limit_concurrency"]
        warning = exposure_warning(args, ["set"] if "api_key_sha256" in kwargs else [])
    except FdTrtError as e:
        print(f"python -m fd_trt.serving.ray: error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    ray_level = "DEBUG" if level == "trace" else level.upper()
    # A replica loading a model keeps a small node busy; give Ray's proxy more than 5 s to report ready.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    if warning:
        print(f"python -m fd_trt.serving.ray: {warning}", file=sys.stderr, flush=True)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(
        http_options={"host": args.host, "port": args.port, "request_timeout_s": request_timeout_s(args)},
        logging_config={"log_level": ray_level},
    )
    app = deployment(
        args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        log_level=ray_level,
        max_queued_requests=limit,
    ).bind(**kwargs)
    serve.run(app, name="fd_trt", route_prefix="/")
    print(
        f"fd_trt on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}/v1/generate (Ctrl-C stops)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
