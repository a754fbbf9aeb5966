"""HTTP API of the serving runtime (FastAPI): ``fd-trt serve`` and the Ray Serve replicas use it.

Routes:

- ``POST /v1/generate``: JSON body [`GenerateBody`][fd_trt.serving.http.GenerateBody]; answers ``image/png`` or, with
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
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from fd_trt.errors import FdTrtError, InputError
from fd_trt.families.models import SCHEDULERS
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
    [`ServingRuntime.check()`][fd_trt.serving.runtime.ServingRuntime.check] and also answer 422.
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
    timeout_s: float | None = Field(default=None, gt=0)
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


def _unavailable(message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(
        status_code=503, content={"detail": message}, headers={"Retry-After": str(int(max(1, retry_after_s)))}
    )


def create_app(
    runtime: ServingRuntime | None = None,
    runtime_factory: Callable[[], ServingRuntime] | None = None,
    drain_on_shutdown: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Builds the FastAPI app around a runtime.

    Args:
        runtime: a ready runtime (tests, Ray replicas), or
        runtime_factory: builds the runtime at application start-up (``fd-trt serve``), so that
            loading and warm-up happen before the server answers.
        drain_on_shutdown: at application shutdown, finish every accepted request first.
        max_body_bytes: the largest request body accepted; larger ones get 413.

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

    app = FastAPI(title="fd_trt", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

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
            return JSONResponse(
                status_code=422, content={"detail": [{"loc": ["body"], "msg": str(e), "type": "value_error"}]}
            )
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
            return JSONResponse(
                status_code=422, content={"detail": [{"loc": ["body"], "msg": str(e), "type": "value_error"}]}
            )
        except FdTrtError as e:
            return JSONResponse(status_code=500, content={"detail": str(e)})
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

    ``with ThreadedServer(app) as server: httpx.get(server.url + "/healthz")``; leaving the block asks
    uvicorn to shut down gracefully and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> None:
        import threading

        import uvicorn

        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
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


__all__ = ["BodyLimit", "DEFAULT_MAX_BODY_BYTES", "GenerateBody", "ThreadedServer", "create_app", "free_port"]
