"""HTTP API of the serving runtime (FastAPI): ``fd-trt serve`` and the Ray Serve replicas use it.

Routes:

- ``POST /v1/generate``: JSON body [`GenerateBody`][fd_trt.serving.http.GenerateBody]; answers ``image/png`` or, with
  ``"format": "base64"``, JSON ``{"image": <base64 PNG>, "seed": ..., "fd": {...}, ...}``. Image modes:
  ``image`` (+ ``strength``) for img2img, ``image`` + ``mask`` for inpainting (base64 PNG/JPEG),
  ``controlnet`` + ``control_image`` for a ControlNet the server loaded, ``lora`` for an adapter it
  registered. Bad fields get 422 with the reason (never a server path), a full queue or a
  shutting-down server gets 503 with ``Retry-After``, a request past its deadline gets 504, a server
  failure 500 with only a request id (the details go to the log). Response headers ``X-Seed``,
  ``X-Batch-Size``, ``X-Queue-Seconds`` and ``X-Latency-Seconds`` say how it was served; an image
  whose latents held NaN/Inf carries a ``Warning`` header (and ``"nonfinite": true`` in JSON).
- ``POST /v1/images/generations`` and ``POST /v1/images/edits``: OpenAI's images API
  (``b64_json`` answers, OpenAI's error shape); see docs/guides/openai-api.md.
- ``GET /``: a page to try the server from a browser ([`fd_trt.serving.page`][fd_trt.serving.page]).
- ``GET /healthz``: 200 ``{"status": "ok"}`` while serving, 503 while shutting down.
- ``GET /metrics``: Prometheus text format (queue depth, batch sizes, latency quantiles and
  histogram, requests by outcome).
- ``/docs`` and ``/openapi.json`` only with ``docs=True``.

In front of every route, [`Guard`][fd_trt.serving.http.Guard] checks the ``Host`` header against an allow-list
(loopback names by default), the API key (``Authorization: Bearer``; everything but ``/healthz`` and
``/``) and the body's content type; CORS headers are sent only for ``allowed_origins``. Bodies over
``max_body_bytes`` (64 KiB by default) get 413 before any parsing; validation that depends on the
model runs in a worker thread, never on the event loop, so ``/healthz`` keeps answering while large
or hostile bodies arrive. docs/guides/serving-security.md is the deployment guide.

FastAPI and uvicorn come with the ``[serve]`` extra; this module imports them at import time, so
import it only where they are installed (``fd_trt.serving.runtime`` does not need them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from fd_trt.errors import FdTrtError, InputError
from fd_trt.families.models import SCHEDULERS
from fd_trt.serving.images import (
    FormFile,
    ImageLimits,
    b64_bytes,
    decode_image,
    openai_mask,
    parse_multipart,
    parse_size,
)
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
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    format: Literal["png", "base64"] = "png"
    image: str | None = Field(default=None, description="img2img / inpainting: a base64 PNG or JPEG image")
    mask: str | None = Field(default=None, description="inpainting: a base64 PNG or JPEG mask, white where repainted")
    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    controlnet: str | None = Field(
        default=None, min_length=1, max_length=64, description="a ControlNet the server loaded, by name"
    )
    control_image: str | None = Field(default=None, description="the ControlNet's base64 PNG or JPEG image")
    controlnet_conditioning_scale: float | None = Field(default=None, ge=0, le=10, allow_inf_nan=False)
    lora: str | None = Field(
        default=None, min_length=1, max_length=64, description="a LoRA adapter the server registered"
    )

    def to_request(self, limits: ImageLimits | None = None) -> GenerateRequest:
        """The runtime request; base64 images are decoded here (call it off the event loop).

        Raises:
            InputError: an image that is not base64 PNG/JPEG or is over ``limits``.
        """
        limits = limits or ImageLimits()
        image = mask = None
        if self.image is not None:
            image = decode_image(b64_bytes(self.image, "image", limits), "image", limits)
        if self.mask is not None:
            mask = decode_image(b64_bytes(self.mask, "mask", limits), "mask", limits, mode="L")
        control = None
        if self.control_image is not None:
            control = decode_image(b64_bytes(self.control_image, "control_image", limits), "control_image", limits)
        return GenerateRequest(
            controlnet=self.controlnet,
            control_image=control,
            controlnet_conditioning_scale=self.controlnet_conditioning_scale,
            image=image,
            mask_image=mask,
            strength=self.strength,
            lora=self.lora,
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


#: Most images one OpenAI-style request may ask for (OpenAI's own limit).
MAX_IMAGES_PER_REQUEST = 10


def _openai_common(prompt: Any, n: Any, response_format: Any, output_format: Any) -> int:
    """Checks the fields both OpenAI routes share; returns ``n``."""
    if not isinstance(prompt, str) or not prompt:
        raise InputError("prompt is required: a non-empty string")
    if response_format not in (None, "b64_json"):
        if response_format == "url":
            raise InputError(
                "response_format 'url' is not supported: this server keeps no images to link to; "
                "ask for 'b64_json' (the image inline, base64)"
            )
        raise InputError(f"response_format must be 'b64_json', got {str(response_format)[:40]!r}")
    if output_format not in (None, "png"):
        raise InputError(f"output_format must be 'png', got {str(output_format)[:40]!r}")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_REQUEST:
        raise InputError(f"n must be an integer in [1, {MAX_IMAGES_PER_REQUEST}], got {str(n)[:20]!r}")
    return n


class ImagesGenerationsBody(BaseModel):
    """The JSON body of ``POST /v1/images/generations`` (OpenAI's images API).

    ``model``, ``user``, ``quality`` and ``style`` are accepted and ignored (the server serves one
    model); ``seed`` and ``steps`` are fd_trt's additions.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1)

    def to_requests(self, rt: ServingRuntime) -> list[GenerateRequest]:
        n = _openai_common(self.prompt, self.n, self.response_format, self.output_format)
        size = parse_size(self.size)
        h, w = size if size is not None else (None, None)
        base = GenerateRequest(prompt=self.prompt, height=h, width=w)
        if self.steps is not None:
            base.steps = self.steps
        return [
            dataclasses.replace(base, seed=None if self.seed is None else (self.seed + i) % (MAX_SEED + 1))
            for i in range(n)
        ]


def _one(fields: dict[str, list[Any]], name: str, kind: type | tuple[type, ...] = str) -> Any:
    values = fields.get(name, [])
    if len(values) > 1:
        raise InputError(f"{name} is given {len(values)} times; give it once")
    if values and not isinstance(values[0], kind):
        raise InputError(f"{name} must be {'a file' if kind is FormFile else 'a form field'}")
    return values[0] if values else None


def _form_number(value: str | None, name: str, cast: Any) -> Any:
    if value is None or value == "":
        return None
    try:
        out = cast(value)
    except ValueError:
        raise InputError(f"{name} must be a number, got {value[:20]!r}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {value[:20]!r}")
    return out


#: The form fields ``/v1/images/edits`` reads (OpenAI's, and fd_trt's ``strength``, ``seed``, ``steps``).
EDIT_FIELDS = frozenset(
    {
        "image",
        "mask",
        "prompt",
        "n",
        "size",
        "response_format",
        "output_format",
        "user",
        "model",
        "quality",
        "strength",
        "seed",
        "steps",
    }
)


#: The OpenAPI description of ``/v1/images/edits``' multipart body.
EDIT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image", "prompt"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "PNG or JPEG"},
                    "mask": {"type": "string", "format": "binary", "description": "transparent where edited"},
                    "prompt": {"type": "string"},
                    "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES_PER_REQUEST},
                    "size": {"type": "string", "description": "WIDTHxHEIGHT, the image's"},
                    "response_format": {"type": "string", "enum": ["b64_json"]},
                    "strength": {"type": "number", "minimum": 0, "maximum": 1},
                    "seed": {"type": "integer", "minimum": 0},
                    "steps": {"type": "integer", "minimum": 1},
                    "model": {"type": "string"},
                    "user": {"type": "string"},
                },
            }
        }
    },
}


def edit_requests(body: bytes, content_type: str, rt: ServingRuntime, limits: ImageLimits) -> list[GenerateRequest]:
    """The runtime requests of an OpenAI ``images.edit`` multipart body (call it off the event loop).

    Raises:
        InputError: naming the bad field.
    """
    fields = parse_multipart(body, content_type)
    unknown = sorted(set(fields) - EDIT_FIELDS)
    if unknown:
        raise InputError(
            f"unknown form fields {', '.join(x[:30] for x in unknown[:5])}; this server reads {', '.join(sorted(EDIT_FIELDS))}"
        )
    image_file = _one(fields, "image", FormFile)
    if image_file is None:
        raise InputError("image is required: the PNG or JPEG image to edit")
    n = _openai_common(
        _one(fields, "prompt"),
        _form_number(_one(fields, "n"), "n", int),
        _one(fields, "response_format"),
        _one(fields, "output_format"),
    )
    image = decode_image(image_file.data, "image", limits, mode="keep")
    mask_file = _one(fields, "mask", FormFile)
    mask = None
    if mask_file is not None:
        mask = openai_mask(decode_image(mask_file.data, "mask", limits, mode="keep"), image)
    elif image.mode in ("RGBA", "LA"):
        # OpenAI: without a mask, the image's own transparent pixels mark what to edit
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 128:
            mask = openai_mask(image, image)
    image = image.convert("RGB")
    size = parse_size(_one(fields, "size"))
    w, h = image.size
    if size is not None and size != (h, w):
        raise InputError(
            f"size {size[1]}x{size[0]} differs from the image's {w}x{h}: send the image at the size wanted"
        )
    seed = _form_number(_one(fields, "seed"), "seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be in [0, 2**63-1], got {seed}")
    base = GenerateRequest(
        prompt=_one(fields, "prompt"),
        image=image,
        mask_image=mask,
        strength=_form_number(_one(fields, "strength"), "strength", float),
    )
    steps = _form_number(_one(fields, "steps"), "steps", int)
    if steps is not None:
        base.steps = steps
    return [dataclasses.replace(base, seed=None if seed is None else (seed + i) % (MAX_SEED + 1)) for i in range(n)]


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
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: refuses a request body over ``max_bytes`` with 413, before the app parses it.

    The declared ``Content-Length`` is checked first; a chunked body is counted as it arrives and
    cut off at the limit, so a client cannot make the server buffer or parse more than that.

    Args:
        app: the ASGI app to protect.
        max_bytes: the largest body accepted.
    """

    def __init__(
        self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    async def _refuse(self, send: Any, size: str, limit: int) -> None:
        body = (
            '{"detail": "the request body is %s; the limit is %d bytes (fd-trt serve --max-body-kb, '
            "--max-image-kb for image uploads). "
            'A schedule needs at most one index per step; prompts are limited by --max-prompt-chars"}' % (size, limit)
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
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await self._refuse(send, f"{declared} bytes", limit)
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
            if total > limit:
                await self._refuse(send, f"over {limit} bytes", limit)
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

#: POST routes and the body type they take; fd_trt itself requires that ``Content-Type`` (415
#: otherwise), so a cross-site "simple" text/plain or url-encoded POST never reaches the model.
BODY_TYPES = {
    "/v1/generate": "application/json",
    "/v1/images/generations": "application/json",
    "/v1/images/edits": "multipart/form-data",
}
JSON_POST_PATHS = frozenset(p for p, t in BODY_TYPES.items() if t == "application/json")

#: Routes of the OpenAI-compatible images API; their errors take OpenAI's shape.
OPENAI_PREFIX = "/v1/images/"


def openai_error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {
        401: "authentication_error",
        429: "rate_limit_error",
        503: "server_error",
        500: "server_error",
        504: "server_error",
    }.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def openai_error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(status_code=status, content=openai_error_body(status, message, param), headers=headers)


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
    """Whether ``token`` is one of the keys of ``digests`` (`key_digest()`); every digest is
    compared in constant time (`hmac.compare_digest()`), and all of them, so the answer's
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
        api_key_sha256: accepted keys given by their `key_digest()` instead.
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
    async def _refuse(
        send: Any, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = (), path: str = ""
    ) -> None:
        import json

        content = openai_error_body(status, detail) if path.startswith(OPENAI_PREFIX) else {"detail": detail}
        body = json.dumps(content).encode()
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
                    path=path,
                )
                return
        if scope.get("method") == "POST" and path in BODY_TYPES:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != BODY_TYPES[path]:
                await self._refuse(
                    send,
                    415,
                    f"the body must be sent with 'Content-Type: {BODY_TYPES[path]}', got {ctype[:60]!r}",
                    path=path,
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
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
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
        api_key_sha256: accepted keys given by their sha256 (`key_digest()`): the Ray
            replicas get these, so no key is stored in the cluster.
        allowed_hosts: ``Host`` names answered (`LOOPBACK_HOSTS` by default; ``["*"]``: any).
        allowed_origins: origins allowed cross-origin calls (CORS); empty: no CORS headers at all.
        docs: serve ``/docs`` and ``/openapi.json`` (off by default).
        max_image_bytes: the largest uploaded image (and mask); ``/v1/images/edits`` takes bodies
            of up to twice this plus ``max_body_bytes``. Images on ``/v1/generate`` count against
            ``max_body_bytes``.

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
    app.add_middleware(
        BodyLimit, max_bytes=max_body_bytes, path_limits={"/v1/images/edits": 2 * max_image_bytes + max_body_bytes}
    )
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
        if request.url.path.startswith(OPENAI_PREFIX):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            param = ".".join(str(x) for x in first["loc"] if x != "body") or None
            return openai_error(400, f"{param or 'body'}: {first['msg']}", param)
        return JSONResponse(status_code=422, content={"detail": errors})

    def image_limits() -> ImageLimits:
        rt = state["rt"]
        return ImageLimits(max_bytes=max_image_bytes, max_pixels=rt.limits.max_size**2)

    async def run(requests: list[GenerateRequest], request: Request) -> Any:
        """Submits requests (off the event loop: check() deep-copies a scheduler and parses the
        schedule) and waits for them; returns their results, or the error as ``(status, message,
        retry_after)`` for the route to shape."""
        rt = state["rt"]
        futures = []
        try:
            for r in requests:
                futures.append(await asyncio.to_thread(rt.submit, r))
        except (InputError, QueueFullError, RuntimeClosedError) as e:
            for f in futures:
                f.cancel()
            if isinstance(e, InputError):
                return (422, redact_paths(str(e)), None)
            return (503, str(e), e.retry_after_s if isinstance(e, QueueFullError) else 5)
        results = []
        try:
            for f in futures:
                res = await _wait_or_cancel(f, request)
                if res is None:  # nobody is listening; 499 is nginx's "client closed request"
                    for g in futures:
                        g.cancel()
                    return (499, "client closed request", None)
                results.append(res)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()  # the server is cancelling this handler: drop what is still queued
            raise
        except RequestTimeoutError as e:
            return (504, str(e), None)
        except InputError as e:  # e.g. a size whose graphs are not loaded: the request, not the server
            return (422, redact_paths(str(e)), None)
        except FdTrtError as e:
            return (500, e, None)
        return results

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request) -> Response:
        try:
            req = await asyncio.to_thread(body.to_request, image_limits())
        except InputError as e:
            return _unprocessable(e)
        out = await run([req], request)
        if isinstance(out, tuple):
            status, message, retry = out
            if status == 422:
                return _unprocessable(InputError(message))
            if status == 503:
                return _unavailable(message, retry)
            if status == 499:
                return Response(status_code=499)
            if status == 500:
                return _internal_error(message)
            return JSONResponse(status_code=status, content={"detail": message})
        res = out[0]
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
                "fd": res.fd,
            },
            headers=headers,
        )

    async def openai_images(requests: list[GenerateRequest], request: Request) -> Response:
        out = await run(requests, request)
        if isinstance(out, tuple):
            status, message, retry = out
            if status == 500:
                rid = _request_id()
                _internal_error(message, rid)
                return openai_error(500, f"internal server error; request id {rid}", headers={"X-Request-ID": rid})
            if status == 422:
                return openai_error(400, message)
            if status == 499:
                return Response(status_code=499)
            headers = {"Retry-After": str(int(max(1, retry)))} if retry else None
            return openai_error(status, message, headers=headers)
        pngs = [await asyncio.to_thread(r.png_bytes) for r in out]
        return JSONResponse(
            content={
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs],
            },
            headers={"X-Seed": ",".join(str(r.seed) for r in out)},
        )

    @app.post("/v1/images/generations")
    async def images_generations(body: ImagesGenerationsBody, request: Request) -> Response:
        """OpenAI's ``images.generate``: ``prompt``, ``n``, ``size`` (``WIDTHxHEIGHT``),
        ``response_format`` ``b64_json``; ``model`` and ``user`` are accepted and ignored."""
        try:
            requests = body.to_requests(state["rt"])
        except InputError as e:
            return openai_error(400, redact_paths(str(e)))
        return await openai_images(requests, request)

    @app.post("/v1/images/edits", openapi_extra={"requestBody": EDIT_REQUEST_BODY})
    async def images_edits(request: Request) -> Response:
        """OpenAI's ``images.edit`` (multipart): ``image``, optional ``mask`` (transparent where the
        image is edited), ``prompt``, ``n``, ``size``, ``response_format`` ``b64_json``; also
        ``strength`` (img2img without a mask, default 0.8). ``model`` and ``user`` are ignored."""
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        try:
            requests = await asyncio.to_thread(edit_requests, body, ctype, state["rt"], image_limits())
        except InputError as e:
            return openai_error(400, redact_paths(str(e)))
        return await openai_images(requests, request)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        from fd_trt.serving.page import PAGE_HTML, content_security_policy

        return Response(
            content=PAGE_HTML,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": content_security_policy(),
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
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
    "ImagesGenerationsBody",
    "edit_requests",
    "openai_error_body",
    "LOOPBACK_HOSTS",
    "ThreadedServer",
    "create_app",
    "free_port",
    "host_allowed",
    "key_digest",
    "key_matches",
    "redact_paths",
]
