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
import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Any

from fd_trt.errors import InputError
from fd_trt.serving.runtime import DEFAULT_DECODER_MEMORY_MB, Limits, parse_sizes

#: The ``--backend`` choices; ``None`` (no ``--backend``) is ``auto``.
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")

#: The ``--precision`` choices; ``None`` is fp16 for tensorrt, fp32 otherwise.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

#: The environment variable that holds an API key (as ``--api-key``; keeps it off the command line).
API_KEY_ENV = "FD_TRT_API_KEY"

#: Host names a server answers to by default (and ``--host`` when it names one address).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

#: Default ``--limit-concurrency``: open connections and requests beyond it get 503 at once.
DEFAULT_LIMIT_CONCURRENCY = 256

#: Default ``--max-image-kb``.
DEFAULT_MAX_IMAGE_KB = 4096

#: The ``--log-level`` values (uvicorn's; Ray Serve reads ``trace`` as ``debug``).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_model_options(p: Any) -> None:
    """Adds the model and runner options: ``--model``, ``--backend``, ``--engines``, ``--threads``, ``--device``
    and ``--precision`` (``fd-trt generate``, ``calibrate`` and ``serve`` share them)."""
    p.add_argument("--model", default="default", help="'default', 'default-dit' or a local diffusers folder")
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
    p.add_argument(
        "--max-timeout",
        type=float,
        default=None,
        help="longest timeout_s a request may ask for, in seconds; longer ones are clamped (default: --timeout)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=DEFAULT_LIMIT_CONCURRENCY,
        help="most open connections (and Ray: requests queued per replica); beyond it 503 at once",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' (everything but /healthz and the page at /); "
        f"the environment variable {API_KEY_ENV} does the same without showing the key in ps",
    )
    p.add_argument(
        "--api-key-file", default=None, help="a file of accepted API keys, one a line ('#' starts a comment)"
    )
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM); serve https with --ssl-certfile")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM)")
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host header names answered, comma-separated ('*.example.com', '*' for any); default: "
        "localhost, 127.0.0.1, ::1 and the --host address. Others get 400 (DNS rebinding)",
    )
    p.add_argument(
        "--allowed-origins",
        default=None,
        help="origins allowed to call the API from a browser (CORS), comma-separated; default: none",
    )
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the API key)")
    p.add_argument(
        "--max-image-kb",
        type=int,
        default=DEFAULT_MAX_IMAGE_KB,
        help="largest uploaded image or mask in KiB (/v1/images/edits; images on /v1/generate count "
        "against --max-body-kb)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="register a LoRA adapter (a local file or folder) that requests name with 'lora' "
        "(torch backend; repeat for several)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="load a ControlNet (a local folder, or 'default' for the default model's) that requests name "
        "with 'controlnet' (torch backend; repeat for several)",
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
    kwargs = {
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
    loras = parse_loras(getattr(args, "lora", None))
    if loras:
        kwargs["loras"] = loras
    controlnets = parse_loras(getattr(args, "controlnet", None), flag="--controlnet", builtin=("default",))
    if controlnets:
        kwargs["controlnets"] = controlnets
    max_timeout = getattr(args, "max_timeout", None)
    if max_timeout is not None:
        if not (max_timeout > 0 and max_timeout < float("inf")):
            raise InputError(f"--max-timeout must be a positive number of seconds, got {max_timeout!r}")
        kwargs["max_timeout_s"] = float(max_timeout)
    return kwargs


def parse_loras(specs: list[str] | None, flag: str = "--lora", builtin: tuple[str, ...] = ()) -> dict[str, str]:
    """``--lora NAME=PATH`` (or ``--controlnet``; repeated) as ``{name: path}``.

    Raises:
        InputError: a spec without ``=``, a name given twice, or a path that does not exist
            (``builtin`` names, such as ``default``, pass as they are).
    """
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"{flag} takes NAME=PATH, got {spec!r}")
        if name in out:
            raise InputError(f"{flag} {name} is given twice")
        if path not in builtin and not Path(path).exists():
            raise InputError(f"{flag} {name}={path}: no such file or folder")
        out[name] = path
    return out


def _split(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def api_keys(args: argparse.Namespace, environ: Any = None) -> list[str]:
    """The accepted API keys: ``--api-key``, the `API_KEY_ENV` variable and the lines of ``--api-key-file``.

    Raises:
        InputError: an unreadable key file, or one that holds no key.
    """
    env = os.environ if environ is None else environ
    keys = [k for k in (getattr(args, "api_key", None), env.get(API_KEY_ENV)) if k]
    path = getattr(args, "api_key_file", None)
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--api-key-file {path}: cannot read it ({e.__class__.__name__})") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise InputError(f"--api-key-file {path} holds no key: write one key a line")
        keys += found
    for k in keys:
        if any(c.isspace() for c in k) or not k.isprintable():
            raise InputError("an API key must be printable and hold no spaces; make one with: openssl rand -hex 32")
    return list(dict.fromkeys(keys))


def key_digest(key: str) -> str:
    """The sha256 (hex) under which a server holds an API key (Ray replicas get only these)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(args: argparse.Namespace) -> list[str]:
    """``--allowed-hosts``, or the loopback names plus ``--host`` when it names one address."""
    given = _split(getattr(args, "allowed_hosts", None))
    if given:
        return given
    host = str(getattr(args, "host", "127.0.0.1"))
    wildcard = host in ("0.0.0.0", "::", "")
    return list(dict.fromkeys([*LOOPBACK_NAMES, *([] if wildcard else [host.strip("[]")])]))


def http_kwargs(args: argparse.Namespace, environ: Any = None) -> dict[str, Any]:
    """The keyword arguments of [`fd_trt.serving.http.create_app()`][fd_trt.serving.http.create_app] (``max_body_bytes``,
    ``api_keys``, ``allowed_hosts``, ``allowed_origins``, ``docs``, ``max_image_bytes``).

    Raises:
        InputError: a bad key file.
    """
    return {
        "max_body_bytes": max_body_bytes(args),
        "api_keys": api_keys(args, environ),
        "allowed_hosts": allowed_hosts(args),
        "allowed_origins": _split(getattr(args, "allowed_origins", None)),
        "docs": bool(getattr(args, "docs", False)),
        "max_image_bytes": int(getattr(args, "max_image_kb", DEFAULT_MAX_IMAGE_KB)) * 1024,
    }


def tls_files(args: argparse.Namespace) -> tuple[str, str] | None:
    """``(keyfile, certfile)`` for TLS, or ``None``.

    Raises:
        InputError: only one of the two given, or a file that is missing.
    """
    key, cert = getattr(args, "ssl_keyfile", None), getattr(args, "ssl_certfile", None)
    if not key and not cert:
        return None
    if not (key and cert):
        raise InputError("TLS needs both --ssl-keyfile and --ssl-certfile")
    for flag, path in (("--ssl-keyfile", key), ("--ssl-certfile", cert)):
        if not Path(path).is_file():
            raise InputError(f"{flag} {path} is not a file")
    return key, cert


def uvicorn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments of the options: TLS files and ``limit_concurrency``.

    Raises:
        InputError: a bad ``--limit-concurrency`` or TLS pair.
    """
    limit = getattr(args, "limit_concurrency", DEFAULT_LIMIT_CONCURRENCY)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"--limit-concurrency must be a positive integer, got {limit!r}")
    out: dict[str, Any] = {"limit_concurrency": limit}
    tls = tls_files(args)
    if tls:
        out["ssl_keyfile"], out["ssl_certfile"] = tls
    return out


def exposure_warning(args: argparse.Namespace, keys: list[str]) -> str | None:
    """The start-up warning for a server reachable from other machines without an API key (or TLS)."""
    host = str(getattr(args, "host", "127.0.0.1"))
    if is_loopback(host):
        return None
    if not keys:
        return (
            f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the "
            f"model. Set {API_KEY_ENV} (or --api-key-file) and put TLS in front (--ssl-keyfile/--ssl-certfile)"
        )
    if tls_files(args) is None:
        return f"WARNING: serving on {host} without TLS: API keys and images cross the network in clear text"
    return None


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
    "API_KEY_ENV",
    "BACKENDS",
    "DEFAULT_LIMIT_CONCURRENCY",
    "DEFAULT_MAX_IMAGE_KB",
    "parse_loras",
    "LOOPBACK_NAMES",
    "allowed_hosts",
    "api_keys",
    "exposure_warning",
    "http_kwargs",
    "is_loopback",
    "key_digest",
    "tls_files",
    "uvicorn_kwargs",
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
