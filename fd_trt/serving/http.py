"""HTTP API of the serving runtime (FastAPI): ``fd-trt serve`` and the Ray Serve replicas use it.

Routes:

- ``POST /v1/generate``: JSON body :class:`GenerateBody`; answers ``image/png`` or, with
  ``"format": "base64"``, JSON ``{"image": <base64 PNG>, "seed": ..., ...}``. Bad fields get 422 with
  the reason, a full queue or a shutting-down server gets 503 with ``Retry-After``, a request past
  its deadline gets 504. Response headers ``X-Seed``, ``X-Batch-Size``, ``X-Queue-Seconds`` and
  ``X-Latency-Seconds`` say how it was served; an image whose latents held NaN/Inf carries a
  ``Warning`` header (and ``"nonfinite": true`` in JSON).
- Bodies over ``max_body_bytes`` (64 KiB by default) get 413 before any parsing; validation that
  depends on the model runs in a worker thread, never on the event loop, so ``/healthz`` keeps
  answering while large or hostile bodies arrive.
- ``GET /healthz``: 200 ``{"status": "ok"}`` while serving, 503 while shutting down.
- ``GET /metrics``: Prometheus text format (queue depth, batch sizes, latency quantiles and
  histogram, requests by outcome).

FastAPI and uvicorn come with the ``[serve]`` extra; this module imports them at import time, so
import it only where they are installed (``fd_trt.serving.runtime`` does not need them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from fd_trt.errors import FdTrtError, InputError
from fd_trt.families.models import SCHEDULERS
from fd_trt.serving.options import LOOPBACK_NAMES, key_digest
from fd_trt.serving.runtime import (
    MAX_SEED,
    GenerateRequest,
    QueueFullError,
    RequestTimeoutError,
    RuntimeClosedError,
    ServingRuntime,
)

logger = logging.getLogger(__name__)

SchedulerName = Literal[SCHEDULERS]  # type: ignore[valid-type]


class GenerateBody(BaseModel):
    """The JSON body of ``POST /v1/generate``. Types are strict: ``"50"`` is not a number of steps.

    Limits that depend on the server (steps, size, prompt length, guidance) are checked by
    :meth:`ServingRuntime.check` and also answer 422.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int = Field(default=50, ge=1)
    guidance: float = Field(default=7.5, ge=0)
    height: int | None = Field(default=None, gt=0)
    width: int | None = Field(default=None, gt=0)
    scheduler: SchedulerName = "ddim"  # type: ignore[valid-type]
    schedule: str | list[int] | None = None
    noise_injection: bool | None = None
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    format: Literal["png", "base64"] = "png"

    def to_request(self) -> GenerateRequest:
        return GenerateRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            steps=self.steps,
            guidance=float(self.guidance),
            height=self.height,
            width=self.width,
            scheduler=self.scheduler,
            schedule=self.schedule,
            noise_injection=self.noise_injection,
            timeout_s=self.timeout_s,
        )


async def _wait_or_cancel(future: Any, request: Request, poll_s: float = 0.25) -> Any:
    """Waits for the runtime's future; None if the client disconnected first (the request is then
    cancelled if it is still queued; a running batch finishes and its result is dropped)."""
    waiter = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=poll_s)
        if done:
            return waiter.result()
        if await request.is_disconnected():
            if future.cancel():
                logger.info("fd_trt serve: client disconnected; its queued request was cancelled")
            return None


DEFAULT_MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """ASGI middleware: refuses a request body over ``max_bytes`` with 413, before the app parses it.

    The declared ``Content-Length`` is checked first; a chunked body is counted as it arrives and
    cut off at the limit, so a client cannot make the server buffer or parse more than that.

    Args:
        app: the ASGI app to protect.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Any, size: str) -> None:
        body = (
            '{"detail": "the request body is %s; the limit is %d bytes (fd-trt serve --max-body-kb). '
            'A schedule needs at most one index per step; prompts are limited by --max-prompt-chars"}'
            % (size, self.max_bytes)
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send, f"{declared} bytes")
                    return
        # Read (at most the limit of) the body here, then replay it to the app.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = []  # a disconnect: pass it on untouched
                pending = [message]
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(send, f"over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Any:
            if pending:
                return pending.pop(0)
            return await receive()

        await self.app(scope, replay, send)


#: The Host names a server answers by default: loopback only (a DNS-rebinding page gets 400).
LOOPBACK_HOSTS = LOOPBACK_NAMES

#: Routes answered without an API key: the health check (load balancers, Ray) and the page at ``/``
#: (static; it asks the user for the key and sends it with each API call).
OPEN_PATHS = frozenset({"/healthz", "/", "/favicon.ico"})

#: POST routes that take a JSON body; fd_trt itself requires ``Content-Type: application/json`` there
#: (415 otherwise), so a cross-site "simple" form or text/plain POST never reaches the model.
JSON_POST_PATHS = frozenset({"/v1/generate", "/v1/images/generations"})

_PATH_RE = re.compile(r"(?:(?<=[\s'\"(=])|^)(?:~|[A-Za-z]:)?[/\\](?!v1/)(?:[^\s'\"/\\,;()]+[/\\])+[^\s'\",;():]*")


def redact_paths(text: str) -> str:
    """``text`` with every file-system path (two or more components) replaced by ``<path>``.

    Messages that go back to a client (4xx) pass through it: a client learns what was wrong with
    its request, never where the server keeps its files.
    """
    return _PATH_RE.sub("<path>", text)


def _host_name(value: str) -> str:
    """The host of a ``Host`` header, lower case, without port or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header names one of ``allowed`` (exact names, ``*.domain`` or ``*``)."""
    name = _host_name(host)
    for a in allowed:
        a = a.strip().lower().rstrip(".")
        if a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:])):
            return True
    return False


def key_matches(token: str, digests: Sequence[str]) -> bool:
    """Whether ``token`` is one of the keys of ``digests`` (:func:`key_digest`); every digest is
    compared in constant time (:func:`hmac.compare_digest`), and all of them, so the answer's
    timing tells nothing about which key came close."""
    candidate = key_digest(token).encode()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest.encode())
    return found


class Guard:
    """ASGI middleware in front of every route: the ``Host`` allow-list, the API key and the JSON content type.

    In this order, each before any body is read: a ``Host`` not in ``allowed_hosts`` gets 400 (DNS
    rebinding), a request without ``Authorization: Bearer <key>`` (one of ``api_keys``) gets 401
    unless its path is in ``open_paths``, a POST to a JSON route without ``Content-Type:
    application/json`` gets 415. Answers are JSON ``{"detail": ...}``.

    Args:
        app: the ASGI app.
        api_keys: the accepted keys; empty (with no ``api_key_sha256``): no authentication.
        api_key_sha256: accepted keys given by their :func:`key_digest` instead.
        allowed_hosts: accepted ``Host`` names (``*.example.com`` and ``*`` work); default loopback.
        open_paths: paths answered without a key.
    """

    def __init__(
        self,
        app: Any,
        api_keys: Sequence[str] = (),
        allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
        open_paths: frozenset[str] = OPEN_PATHS,
        api_key_sha256: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.keys = [key_digest(k) for k in api_keys] + [d.lower() for d in api_key_sha256]
        self.allowed_hosts = tuple(allowed_hosts)
        self.open_paths = open_paths

    @staticmethod
    async def _refuse(send: Any, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        import json

        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            await self._refuse(
                send,
                400,
                f"the Host header {host[:100]!r} is not one this server answers to; its operator lists the "
                "names it may be reached by with --allowed-hosts",
            )
            return
        path = scope.get("path", "")
        if self.keys and path not in self.open_paths:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
                await self._refuse(
                    send,
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    [(b"www-authenticate", b'Bearer realm="fd_trt"')],
                )
                return
        if scope.get("method") == "POST" and path in JSON_POST_PATHS:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                await self._refuse(
                    send, 415, f"the body must be JSON with 'Content-Type: application/json', got {ctype[:60]!r}"
                )
                return
        await self.app(scope, receive, send)


def _request_id() -> str:
    return secrets.token_hex(8)


def _internal_error(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """A 500 whose body names only a request id; the details go to the server's log."""
    rid = request_id or _request_id()
    logger.error("fd_trt serve: request %s failed: %s", rid, exc, exc_info=exc)
    return JSONResponse(
        status_code=500,
        content={"detail": f"internal server error; the server log has the details under request id {rid}"},
        headers={"X-Request-ID": rid},
    )


def _unprocessable(exc: BaseException) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": ["body"], "msg": redact_paths(str(exc)), "type": "value_error"}]},
    )


def _unavailable(message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(
        status_code=503, content={"detail": message}, headers={"Retry-After": str(int(max(1, retry_after_s)))}
    )


def create_app(
    runtime: ServingRuntime | None = None,
    runtime_factory: Callable[[], ServingRuntime] | None = None,
    drain_on_shutdown: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_keys: Sequence[str] = (),
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] = (),
    docs: bool = False,
    api_key_sha256: Sequence[str] = (),
) -> FastAPI:
    """Builds the FastAPI app around a runtime.

    Args:
        runtime: a ready runtime (tests, Ray replicas), or
        runtime_factory: builds the runtime at application start-up (``fd-trt serve``), so that
            loading and warm-up happen before the server answers.
        drain_on_shutdown: at application shutdown, finish every accepted request first.
        max_body_bytes: the largest request body accepted; larger ones get 413.
        api_keys: accepted API keys (``Authorization: Bearer <key>``); empty: no authentication.
            ``/healthz`` and the page at ``/`` stay open; everything else, ``/metrics`` and the
            docs included, needs a key.
        api_key_sha256: accepted keys given by their sha256 (:func:`key_digest`): the Ray
            replicas get these, so no key is stored in the cluster.
        allowed_hosts: ``Host`` names answered (:data:`LOOPBACK_HOSTS` by default; ``["*"]``: any).
        allowed_origins: origins allowed cross-origin calls (CORS); empty: no CORS headers at all.
        docs: serve ``/docs`` and ``/openapi.json`` (off by default).

    Returns:
        The FastAPI app.
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise InputError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    if (runtime is None) == (runtime_factory is None):
        raise InputError("create_app needs exactly one of runtime= or runtime_factory=")
    state: dict[str, ServingRuntime] = {}
    if runtime is not None:
        state["rt"] = runtime

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if "rt" not in state and runtime_factory is not None:
            state["rt"] = await asyncio.to_thread(runtime_factory)
        yield
        # Uvicorn has already waited for open requests; this drains anything still queued.
        await asyncio.to_thread(state["rt"].shutdown, drain_on_shutdown)

    app = FastAPI(
        title="fd_trt",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    # The last added runs first: CORS (answers preflights), then the guard, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(
        Guard,
        api_keys=tuple(api_keys),
        api_key_sha256=tuple(api_key_sha256),
        allowed_hosts=tuple(LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts),
    )
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Seed", "X-Batch-Size", "X-Queue-Seconds", "X-Latency-Seconds", "X-Request-ID"],
        )

    @app.exception_handler(Exception)
    async def _crashed(request: Any, exc: Exception) -> JSONResponse:
        return _internal_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request) -> Response:
        rt = state["rt"]
        try:
            # check() deep-copies a scheduler and parses the schedule: off the event loop, so that
            # /healthz and other requests never wait behind it.
            future = await asyncio.to_thread(rt.submit, body.to_request())
        except InputError as e:
            return _unprocessable(e)
        except QueueFullError as e:
            return _unavailable(str(e), e.retry_after_s)
        except RuntimeClosedError as e:
            return _unavailable(str(e), 5)
        try:
            res = await _wait_or_cancel(future, request)
        except asyncio.CancelledError:
            future.cancel()  # the server is cancelling this handler: drop the request if still queued
            raise
        except RequestTimeoutError as e:
            return JSONResponse(status_code=504, content={"detail": str(e)})
        except InputError as e:  # e.g. a size whose graphs are not loaded: the request, not the server
            return _unprocessable(e)
        except FdTrtError as e:
            return _internal_error(e)
        if res is None:  # nobody is listening; 499 is nginx's "client closed request"
            return Response(status_code=499)
        headers = {
            "X-Seed": str(res.seed),
            "X-Batch-Size": str(res.batch_size),
            "X-Queue-Seconds": f"{res.queue_seconds:.4f}",
            "X-Latency-Seconds": f"{res.total_seconds:.4f}",
        }
        if res.nonfinite:
            headers["Warning"] = '199 fd_trt "the latents held NaN or Inf: the image is invalid"'
        png = await asyncio.to_thread(res.png_bytes)
        if body.format == "png":
            return Response(content=png, media_type="image/png", headers=headers)
        return JSONResponse(
            content={
                "image": base64.b64encode(png).decode("ascii"),
                "seed": res.seed,
                "batch_size": res.batch_size,
                "queue_seconds": res.queue_seconds,
                "latency_seconds": res.total_seconds,
                "nonfinite": res.nonfinite,
            },
            headers=headers,
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        rt = state.get("rt")
        if rt is None or rt.closed:
            return JSONResponse(status_code=503, content={"status": "shutting down" if rt else "starting"})
        return JSONResponse(content={"status": "ok", "queue_depth": rt.queue_depth})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(content=state["rt"].prometheus(), media_type=CONTENT_TYPE_LATEST)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ThreadedServer:
    """uvicorn serving ``app`` in a daemon thread on 127.0.0.1 and a free port (tests, load tests).

    ``config`` goes to ``uvicorn.Config`` (``ssl_keyfile``/``ssl_certfile``: https, ``limit_concurrency``).

    ``with ThreadedServer(app) as server: httpx.get(server.url + "/healthz")``; leaving the block asks
    uvicorn to shut down gracefully and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0, **config: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port(host)
        scheme = "https" if config.get("ssl_certfile") else "http"
        self.url = f"{scheme}://{host}:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, name="fd_trt-http", daemon=True)

    def __enter__(self) -> ThreadedServer:
        import time

        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > self.start_timeout_s or not self.thread.is_alive():
                raise FdTrtError(f"the HTTP server did not start on {self.url} within {self.start_timeout_s:.0f} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


__all__ = [
    "BodyLimit",
    "DEFAULT_MAX_BODY_BYTES",
    "GenerateBody",
    "Guard",
    "LOOPBACK_HOSTS",
    "ThreadedServer",
    "create_app",
    "free_port",
    "host_allowed",
    "key_digest",
    "key_matches",
    "redact_paths",
]
