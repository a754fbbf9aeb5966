"""Low-latency serving runtime: a request queue, dynamic batching, limits and metrics.

[`ServingRuntime`][fd_trt.serving.runtime.ServingRuntime] loads a [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline] once, warms it
up, and serves [`GenerateRequest`][fd_trt.serving.runtime.GenerateRequest] objects from any thread ([`ServingRuntime.submit()`][fd_trt.serving.runtime.ServingRuntime.submit]
returns a ``concurrent.futures.Future``) or from asyncio ([`ServingRuntime.generate()`][fd_trt.serving.runtime.ServingRuntime.generate]).

One worker thread owns the pipeline. It takes the oldest waiting request, then gathers the
waiting requests that can share a sampler call with it (same size, steps, scheduler, key steps,
guidance and noise injection) until it has ``max_batch`` of them or ``max_wait_ms`` has passed, and
runs them as one call. Each request brings its own seed: its initial latents and any scheduler
noise come from its own ``torch.Generator``, and the rows of a batch never mix, so a request's image
is the image it gets when run alone (within float tolerance: batched matrix products may round
differently).

Nothing is dropped silently: a full queue raises [`QueueFullError`][fd_trt.serving.runtime.QueueFullError] at submission; a request
that passes its deadline fails with [`RequestTimeoutError`][fd_trt.serving.runtime.RequestTimeoutError]; a cancelled one reports
cancellation; [`ServingRuntime.shutdown()`][fd_trt.serving.runtime.ServingRuntime.shutdown] drains what was accepted (or fails it with
[`RuntimeClosedError`][fd_trt.serving.runtime.RuntimeClosedError] when asked not to drain); an image with NaN/Inf comes back with
``nonfinite=True`` and a logged warning.

The HTTP server (``fd-trt serve``) is in [`fd_trt.serving.http`][fd_trt.serving.http], the Ray Serve deployment in
[`fd_trt.serving.ray`][fd_trt.serving.ray].
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fd_trt.core.schedule import KeySchedule, parse_schedule
from fd_trt.errors import FdTrtError, InputError
from fd_trt.families.models import SCHEDULERS
from fd_trt.graphs.split import feature_bytes_per_row

if TYPE_CHECKING:  # pragma: no cover
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


#: Peak decoder memory per decoded row, as a multiple of the row's feature tensors (mid + skips).
#: Measured on the default model (torch backend, CPU, fp32, 64x64, 1 thread) from the peak-RSS
#: rise of one ``runner.decode`` call of M rows: 7.1x at M=30, 7.1x at M=120, 5.9x at M=240
#: (features 110,592 B/row, peak 653-788 KB/row); rounded up to 8 for headroom.
DECODER_ACTIVATION_FACTOR = 8.0

#: Default decoder memory budget of a serving runtime, in MiB.
DEFAULT_DECODER_MEMORY_MB = 4096.0


def _parse_size(v: Any) -> tuple[int, int]:
    if isinstance(v, str):
        parts = v.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
        raise InputError(f"a size must look like HEIGHTxWIDTH, e.g. 512x512, got {v!r}")
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return int(v[0]), int(v[1])
    raise InputError(f"a size must be (height, width) or 'HxW', got {v!r}")


def parse_sizes(spec: str | Sequence[Any]) -> list[tuple[int, int]]:
    """Parses ``"64x64,128x96"`` (or a list of ``(h, w)`` / ``"HxW"``) into ``[(h, w), ...]``.

    Args:
        spec: comma-separated ``HxW`` sizes, or a sequence of sizes.

    Returns:
        The sizes, in order, without duplicates.

    Raises:
        InputError: for a malformed size or an empty list.
    """
    items = [x for x in spec.split(",") if x.strip()] if isinstance(spec, str) else list(spec)
    sizes = list(dict.fromkeys(_parse_size(x.strip() if isinstance(x, str) else x) for x in items))
    if not sizes:
        raise InputError(f"give at least one size as HEIGHTxWIDTH, e.g. --sizes 64x64, got {spec!r}")
    return sizes


def _fmt_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


class QueueFullError(FdTrtError):
    """The runtime's queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RuntimeClosedError(FdTrtError):
    """The runtime is shutting down or shut down and takes no new work."""


class RequestTimeoutError(FdTrtError, TimeoutError):
    """A request passed its deadline before its image was ready."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_steps: most inference steps.
        max_size: largest height or width in pixels.
        size_multiple: height and width must be multiples of this (and of the VAE factor).
        max_prompt_chars: longest prompt or negative prompt, in characters.
        max_guidance: largest CFG scale.
    """

    max_steps: int = 200
    max_size: int = 1024
    size_multiple: int = 8
    max_prompt_chars: int = 1000
    max_guidance: float = 50.0


@dataclass
class GenerateRequest:
    """One image to generate.

    Attributes:
        prompt: the text prompt.
        negative_prompt: the negative prompt (``""``: none).
        seed: the seed of the request's own ``torch.Generator``; ``None`` picks a random one,
            reported back in `GenerateResult.seed`.
        steps: inference steps.
        guidance: CFG scale; ``<= 1`` turns CFG off.
        height, width: image size; ``None`` is the model's native size.
        scheduler: ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``.
        schedule: key steps: ``"paper"``, ``"all"``, ``"uniform:N"``, ``"power:K[:P]"``, ``"calibrated"``
            or a list of step indices; or a decoder schedule (``"deepcache:N"``, ``"combined:..."``);
            ``None`` (default): the model's saved calibration for the request's scheduler and
            step count, else ``"paper"``, as in the pipeline.
        noise_injection: prior noise injection; ``None`` is on exactly when some step decodes from
            propagated encoder features (off for ``deepcache:N``).
        timeout_s: seconds from submission until the request fails with
            [`RequestTimeoutError`][fd_trt.serving.runtime.RequestTimeoutError]; ``None`` uses the runtime's default.
        image: img2img's start image, or with ``mask_image`` the image to inpaint (a PIL image);
            without height/width the image's size is the request's size.
        mask_image: inpainting mask (PIL), white where the image is repainted; its size is the image's.
        strength: img2img / inpainting strength in [0, 1] (default 0.8 for img2img, 1.0 for inpainting).
        lora: the name of a LoRA adapter the server registered (``fd-trt serve --lora name=PATH``).
        controlnet: the name of a ControlNet the server loaded (``fd-trt serve --controlnet name=PATH``).
        control_image: that ControlNet's conditioning image (PIL); without height/width its size
            is the request's size.
        controlnet_conditioning_scale: the ControlNet residuals' scale (default 1.0).
    """

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str = "ddim"
    schedule: str | Sequence[int] | None = None
    noise_injection: bool | None = None
    timeout_s: float | None = None
    image: Any = None
    mask_image: Any = None
    strength: float | None = None
    lora: str | None = None
    controlnet: str | None = None
    control_image: Any = None
    controlnet_conditioning_scale: float | None = None

    @property
    def mode(self) -> str:
        """``text2img``, ``img2img``, ``inpaint`` or ``controlnet``."""
        if self.controlnet is not None:
            return "controlnet"
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "text2img"


@dataclass
class GenerateResult:
    """The answer to one [`GenerateRequest`][fd_trt.serving.runtime.GenerateRequest].

    Attributes:
        image: the PIL image.
        latents: the final ``[C,h,w]`` float32 latents.
        seed: the seed used (the request's, or the one picked for it).
        batch_size: how many requests shared the sampler call.
        queue_seconds: from submission until its batch started.
        run_seconds: the batch's sampler call, VAE included.
        total_seconds: from submission until the result was ready.
        nonfinite: the latents held NaN or Inf (a warning was logged; the image is invalid).
        fd: the batch's Faster Diffusion counters: ``steps``, ``key_steps`` (encoder runs),
            ``encoder_calls``, ``decoder_calls`` and ``backend``.
    """

    image: Any
    latents: Any
    seed: int
    batch_size: int
    queue_seconds: float
    run_seconds: float
    total_seconds: float
    nonfinite: bool = False
    fd: dict[str, Any] | None = None

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


@dataclass
class _Job:
    request: GenerateRequest
    seed: int
    height: int
    width: int
    #: The parsed schedule: key steps, and for a decoder schedule its per-step depths too.
    schedule: KeySchedule
    future: Future
    submitted: float
    deadline: float

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests share a sampler call only when all of this agrees: size, steps, scheduler, schedule
        (key steps and decoder depths), guidance, noise injection, image mode, strength and LoRA adapter."""
        r = self.request
        strength = None if r.strength is None else float(r.strength)
        return (
            self.height,
            self.width,
            r.steps,
            r.scheduler,
            self.schedule,
            float(r.guidance),
            r.noise_injection,
            r.mode,
            strength,
            r.lora,
            r.controlnet,
            None if r.controlnet_conditioning_scale is None else float(r.controlnet_conditioning_scale),
        )


class _BatchAborted(Exception):
    """Raised from the step callback when no request of the batch still wants its image."""


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


class Metrics:
    """Thread-safe counters of a runtime: requests by outcome, batch sizes, latencies.

    Latency percentiles are over the latest ``window`` completed requests.
    """

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # ok, timeout, cancelled, rejected, error, closed
        self.batch_sizes: Counter[int] = Counter()
        self.nonfinite_images = 0
        self._latency: deque[float] = deque(maxlen=window)
        self._queue_wait: deque[float] = deque(maxlen=window)
        self._latency_buckets = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._batch_seconds: deque[float] = deque(maxlen=64)

    def count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.requests[outcome] += n

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes[size] += 1
            self._batch_seconds.append(seconds)

    def done(self, total_s: float, queue_s: float, nonfinite: bool) -> None:
        with self._lock:
            self.requests["ok"] += 1
            self.nonfinite_images += int(nonfinite)
            self._latency.append(total_s)
            self._queue_wait.append(queue_s)
            self._latency_sum += total_s
            self._latency_count += 1
            i = next((i for i, b in enumerate(self.LATENCY_BUCKETS) if total_s <= b), len(self.LATENCY_BUCKETS))
            self._latency_buckets[i] += 1

    def mean_batch_seconds(self) -> float:
        with self._lock:
            return sum(self._batch_seconds) / len(self._batch_seconds) if self._batch_seconds else math.nan

    def snapshot(self, queue_depth: int, in_flight: int) -> dict[str, Any]:
        """A JSON-ready view: counters, batch-size histogram, latency and queue-wait percentiles."""
        with self._lock:
            lat, qw = list(self._latency), list(self._queue_wait)
            batches = dict(sorted(self.batch_sizes.items()))
            n_batches = sum(batches.values())
            return {
                "queue_depth": queue_depth,
                "in_flight": in_flight,
                "requests": dict(self.requests),
                "nonfinite_images": self.nonfinite_images,
                "batches": n_batches,
                "batch_sizes": batches,
                "mean_batch_size": (sum(k * v for k, v in batches.items()) / n_batches) if n_batches else math.nan,
                "latency_s": {f"p{q}": _percentile(lat, q) for q in (50, 95, 99)} | {"count": len(lat)},
                "queue_wait_s": {f"p{q}": _percentile(qw, q) for q in (50, 95, 99)},
                "latency_histogram": {
                    "buckets": list(self.LATENCY_BUCKETS),
                    "counts": list(self._latency_buckets),
                    "sum": self._latency_sum,
                    "count": self._latency_count,
                },
            }


def prometheus_text(snapshot: dict[str, Any], prefix: str = "fd_trt") -> bytes:
    """Renders [`Metrics.snapshot()`][fd_trt.serving.runtime.Metrics.snapshot] in the Prometheus text format with ``prometheus_client``."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    except ImportError as e:  # pragma: no cover - the [serve] extra installs it
        raise FdTrtError("metrics in Prometheus format need prometheus-client: pip install 'fd_trt[serve]'") from e

    class _Collector:
        def collect(self) -> Any:
            yield GaugeMetricFamily(
                f"{prefix}_queue_depth", "Requests waiting in the queue.", value=snapshot["queue_depth"]
            )
            yield GaugeMetricFamily(
                f"{prefix}_in_flight", "Requests in the running batch.", value=snapshot["in_flight"]
            )
            c = CounterMetricFamily(f"{prefix}_requests", "Finished requests by outcome.", labels=["outcome"])
            for outcome in ("ok", "timeout", "cancelled", "rejected", "error", "closed"):
                c.add_metric([outcome], snapshot["requests"].get(outcome, 0))
            yield c
            yield CounterMetricFamily(
                f"{prefix}_nonfinite_images",
                "Images whose latents held NaN or Inf.",
                value=snapshot["nonfinite_images"],
            )
            b = CounterMetricFamily(f"{prefix}_batches", "Sampler calls by batch size.", labels=["size"])
            for size, n in snapshot["batch_sizes"].items():
                b.add_metric([str(size)], n)
            yield b
            q = GaugeMetricFamily(
                f"{prefix}_request_latency_quantile_seconds",
                "Latency from submission to result over the recent window.",
                labels=["quantile"],
            )
            for name, v in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                q.add_metric([name], snapshot["latency_s"][v])
            yield q
            h = snapshot["latency_histogram"]
            cum, buckets = 0, []
            for bound, n in zip([*map(str, h["buckets"]), "+Inf"], h["counts"]):
                cum += n
                buckets.append((bound, cum))
            yield HistogramMetricFamily(
                f"{prefix}_request_latency_seconds",
                "Latency from submission to result.",
                buckets=buckets,
                sum_value=h["sum"],
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return bytes(generate_latest(registry))


class ServingRuntime:
    """A thread-safe, dynamically batching front of one [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline].

    Args:
        pipeline: the pipeline to serve; the runtime owns it from now on (only its worker calls it).
        max_batch: most requests per sampler call; 1 turns batching off.
        max_wait_ms: how long the worker waits for more compatible requests after the first.
        max_queue: most requests waiting; more are rejected with [`QueueFullError`][fd_trt.serving.runtime.QueueFullError].
        default_timeout_s: deadline of requests that set none (``None``: no deadline).
        limits: request limits ([`Limits`][fd_trt.serving.runtime.Limits]).
        warmup: run warm-up batches (1 and ``max_batch`` rows) at the native size before serving,
            so graph builds and allocations happen at start-up, not on the first request.
        warmup_sizes: extra ``(height, width)`` to warm up.
        sizes: the image sizes ``(height, width)`` (or ``"HxW"``) served; any other size is refused
            at submission with [`InputError`][fd_trt.errors.InputError]. Graph backends (onnxruntime, tensorrt) build or
            load each size's graphs here, at start-up, and never build while serving
            (``build_on_demand`` is switched off); ``None`` serves only the model's default size.
            The torch backend has no graphs: ``None`` there allows any size within ``limits``.
        decoder_memory_mb: memory budget of one decoder call in MiB; the rows per decoder call are
            capped at ``budget // decoder_row_bytes(h, w)``, and batches at the images whose rows
            of one step fit. ``None``: no cap.
        max_timeout_s: the longest deadline a request may ask for; a longer ``timeout_s`` is
            clamped to it (``None``: ``default_timeout_s``).
        loras: LoRA adapters by name (``{name: local file or folder}``), loaded at start-up;
            a request names one with ``lora`` (clients never name files). The torch backend only:
            graph backends would rebuild or refit their graphs at each switch.
        controlnets: ControlNets by name (``{name: local folder or "default"}``), loaded at
            start-up; a request names one with ``controlnet`` and sends its ``control_image``
            (torch backend).
        start: start the worker in a background thread. With ``False``, call [`run()`][fd_trt.serving.runtime.ServingRuntime.run] from the
            thread that should own the pipeline. On CPU that should be the main thread: PyTorch's
            OpenMP (libgomp) parallel regions cost much more when a non-main thread starts them
            (measured with the default model, 2 threads: one image 0.70 s from a worker thread
            against 0.30 s from the main thread). ``fd-trt serve`` does this.
    """

    def __init__(
        self,
        pipeline: FasterDiffusionPipeline,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        default_timeout_s: float | None = 120.0,
        limits: Limits | None = None,
        warmup: bool = True,
        warmup_sizes: Sequence[tuple[int, int]] = (),
        start: bool = True,
        sizes: str | Sequence[Any] | None = None,
        decoder_memory_mb: float | None = DEFAULT_DECODER_MEMORY_MB,
        max_timeout_s: float | None = None,
        loras: dict[str, str] | None = None,
        controlnets: dict[str, str] | None = None,
    ) -> None:
        from fd_trt.pipelines.video import FasterDiffusionVideoPipeline

        if isinstance(pipeline, FasterDiffusionVideoPipeline):
            raise InputError(
                f"the server serves image models; this is a text-to-video model ({pipeline.family.name!r}): make clips "
                "with fd-trt generate --frames N or FasterDiffusionPipeline.from_pretrained(...)(prompt, num_frames=N)"
            )
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(max_wait_ms, (int, float)) and max_wait_ms >= 0):
            raise InputError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        if default_timeout_s is not None and not (
            isinstance(default_timeout_s, (int, float)) and default_timeout_s > 0
        ):
            raise InputError(f"default_timeout_s must be a positive number or None, got {default_timeout_s!r}")
        if max_timeout_s is not None and (
            isinstance(max_timeout_s, bool)
            or not isinstance(max_timeout_s, (int, float))
            or not (math.isfinite(max_timeout_s) and max_timeout_s > 0)
        ):
            raise InputError(f"max_timeout_s must be a positive finite number or None, got {max_timeout_s!r}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.default_timeout_s = default_timeout_s
        #: The longest deadline a request may ask for; longer ``timeout_s`` are clamped to it.
        self.max_timeout_s = max_timeout_s if max_timeout_s is not None else default_timeout_s
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.native_size = int(pipeline.sd.unet.config.sample_size) * pipeline.vae_scale_factor
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self._schedulers: dict[str, Any] = {}
        self._base_scheduler_config = pipeline.sd.scheduler.config
        if decoder_memory_mb is not None and (
            isinstance(decoder_memory_mb, bool)
            or not isinstance(decoder_memory_mb, (int, float))
            or not (math.isfinite(decoder_memory_mb) and decoder_memory_mb > 0)
        ):
            raise InputError(f"decoder_memory_mb must be a positive number or None, got {decoder_memory_mb!r}")
        self.decoder_memory_mb = decoder_memory_mb
        # Graph backends build per size; the torch runner (a fixed runner) serves every size.
        self.builds_graphs = getattr(getattr(pipeline, "pool", None), "fixed", None) is None
        if sizes is None and self.builds_graphs:
            sizes = [(self.native_size, self.native_size)]
        self.sizes: tuple[tuple[int, int], ...] | None = None
        if sizes is not None:
            served = parse_sizes(sizes)
            for h, w in served:
                self._check_size(h, w)
            self.sizes = tuple(served)
        self.loras: dict[str, str] = {}
        self._active_lora: str | None = None
        self._load_loras(loras or {})
        self._base_controlnet = getattr(pipeline, "controlnet", None)
        self.controlnets: dict[str, Any] = {}
        self._load_controlnets(controlnets or {})
        self._prepare_sizes()
        if warmup:
            warm = list(self.sizes) if self.sizes is not None else [(self.native_size, self.native_size)]
            self._warmup([*warm, *warmup_sizes])
            self._tune_served()
        self._freeze_tuning()
        self._loop_started = False
        self._loop_done = threading.Event()
        self._worker: threading.Thread | None = None
        if start:
            self._loop_started = True  # before the thread runs: a quick shutdown must still drain
            self._worker = threading.Thread(target=self._loop, name="fd_trt-serve-worker", daemon=True)
            self._worker.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        backend: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        engines: str | None = None,
        runner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ServingRuntime:
        """Loads a model with [`FasterDiffusionPipeline.from_pretrained()`][fd_trt.pipelines.loading.LoadingMixin.from_pretrained] (no progress bars) and serves it."""
        from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

        pipe = FasterDiffusionPipeline.from_pretrained(
            model,
            backend=backend,
            device=device,
            precision=precision,
            progress=False,
            engines=engines,
            runner_options=runner_options,
        )
        return cls(pipe, **kwargs)

    # requests ---------------------------------------------------------------------------------
    def check(self, request: GenerateRequest) -> tuple[int, int, KeySchedule]:
        """Validates a request against the limits and the model.

        Returns:
            ``(height, width, schedule)`` with the defaults filled in; ``schedule`` is the parsed
            [`KeySchedule`][fd_trt.core.schedule.KeySchedule] (a
            [`DecoderSchedule`][fd_trt.core.schedule.DecoderSchedule] for ``deepcache:N`` and ``combined:...``).

        Raises:
            InputError: naming the bad field, its value and what is allowed.
        """
        lim = self.limits
        if not isinstance(request, GenerateRequest):
            raise InputError(f"expected a GenerateRequest, got {type(request).__name__}")
        for name in ("prompt", "negative_prompt"):
            v = getattr(request, name)
            if not isinstance(v, str):
                raise InputError(f"{name} must be a string, got {v!r}")
            if len(v) > lim.max_prompt_chars:
                raise InputError(f"{name} has {len(v)} characters; the limit is {lim.max_prompt_chars}")
        if request.seed is not None and (
            isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED
        ):
            raise InputError(f"seed must be an integer in [0, 2**63-1] or None, got {request.seed!r}")
        s = request.steps
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= lim.max_steps:
            raise InputError(f"steps must be an integer in [1, {lim.max_steps}], got {s!r}")
        g = request.guidance
        if (
            isinstance(g, bool)
            or not isinstance(g, (int, float))
            or not (math.isfinite(g) and 0 <= g <= lim.max_guidance)
        ):
            raise InputError(f"guidance must be a number in [0, {lim.max_guidance}], got {g!r}")
        multiple = math.lcm(lim.size_multiple, self.pipeline.vae_scale_factor)
        image_hw = self._check_images(request)
        sizes = []
        for i, name in enumerate(("height", "width")):
            v = getattr(request, name)
            v = (self.native_size if image_hw is None else image_hw[i]) if v is None else v
            if isinstance(v, bool) or not isinstance(v, int) or not multiple <= v <= lim.max_size:
                raise InputError(f"{name} must be an integer in [{multiple}, {lim.max_size}], got {v!r}")
            if v % multiple:
                raise InputError(
                    f"{name}={v} is not a multiple of {multiple}: use {max(multiple, v // multiple * multiple)}"
                )
            sizes.append(v)
        h, w = sizes
        if self.sizes is not None and (h, w) not in self.sizes:
            raise InputError(
                f"size {h}x{w} (height x width) is not served here; sizes served: {_fmt_sizes(self.sizes)}. "
                "Ask for one of them, or restart the server with that size in --sizes"
            )
        t = request.timeout_s
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0)
        ):
            raise InputError(f"timeout_s must be a positive number (finite, in seconds) or null, got {t!r}")
        cap = self.decoder_rows_cap(h, w)
        if cap is not None and cap < self._rows_per_image(g):
            raise InputError(
                f"size {h}x{w} needs about {self.decoder_row_bytes(h, w) / 2**20:.1f} MiB per decoder row, and the "
                f"decoder memory budget ({self.decoder_memory_mb:g} MiB) holds {cap} rows, fewer than one image "
                f"({self._rows_per_image(g)} rows): ask for a smaller size or raise --decoder-memory-mb"
            )
        sched = request.schedule
        # Bounded before any per-item work: an untrusted list or string may be huge.
        if sched is None:
            pass  # the model's saved calibration for this scheduler and step count, else paper
        elif not isinstance(sched, str):
            try:
                n_items = len(sched)
            except TypeError:
                raise InputError(f"schedule must be a name or a list of step indices, got {sched!r:.80}") from None
            if n_items > s + 1:  # PNDM runs one step more than asked; parse_schedule checks exactly
                raise InputError(
                    f"schedule has {n_items} key steps but the request has {s} steps: give at most {s} "
                    "distinct step indices, or a name ('paper', 'all', 'uniform:N')"
                )
        elif len(sched) > 8 * (s + 2) + 32:
            raise InputError(
                f"schedule string has {len(sched)} characters, too long for {s} steps: use 'paper', 'all', "
                "'uniform:N' or at most one index per step"
            )
        if request.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {request.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if request.noise_injection is not None and not isinstance(request.noise_injection, bool):
            raise InputError(f"noise_injection must be true, false or null, got {request.noise_injection!r}")
        if request.timeout_s is not None and (
            isinstance(request.timeout_s, bool)
            or not isinstance(request.timeout_s, (int, float))
            or not request.timeout_s > 0
        ):
            raise InputError(f"timeout_s must be a positive number or None, got {request.timeout_s!r}")
        # The number of steps the scheduler really takes (img2img: the steps run) decides which key
        # steps are valid.
        num_steps = self._num_steps(request)
        cal_steps = request.steps
        # "calibrated" resolves against the model's saved calibrations. A client never names a
        # file on the server: calibration paths are for the Python API and the CLI only.
        if isinstance(request.schedule, str) and request.schedule.strip().lower().endswith(".json"):
            raise InputError(
                "schedule names a file; the server takes 'calibrated' (its saved calibration), "
                "'paper', 'all', 'uniform:N' or a list of key steps"
            )
        if request.mode in ("img2img", "inpaint"):
            run = self._steps_run(request)
            if run != num_steps:
                num_steps = cal_steps = run
        spec = self.pipeline.resolve_schedule(request.schedule, cal_steps, request.scheduler)
        # The whole schedule travels with the job: a decoder schedule (deepcache:N, combined:...)
        # keeps its depths, which key steps alone would drop.
        schedule = parse_schedule(spec, num_steps)  # ScheduleError is an InputError
        return sizes[0], sizes[1], schedule

    def submit(self, request: GenerateRequest) -> Future[GenerateResult]:
        """Queues a request; thread-safe.

        Returns:
            A ``concurrent.futures.Future`` of [`GenerateResult`][fd_trt.serving.runtime.GenerateResult]. ``future.cancel()`` works while
            the request waits in the queue.

        Raises:
            InputError: the request is invalid (nothing was queued).
            QueueFullError: ``max_queue`` requests are already waiting.
            RuntimeClosedError: the runtime is shutting down.
        """
        # Room first: a full queue is refused before the costly validation (a scheduler copy, the
        # schedule parse), so a flood of requests costs the server next to nothing.
        self._check_room()
        height, width, schedule = self.check(request)
        now = time.perf_counter()
        timeout = self.timeout_for(request)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        job = _Job(request, seed, height, width, schedule, Future(), now, now + timeout if timeout else math.inf)
        with self._cv:
            self._check_room()
            self._queue.append(job)
            self._cv.notify_all()
        job.future.add_done_callback(lambda f: self._on_cancel(job) if f.cancelled() else None)
        return job.future

    def _check_room(self) -> None:
        """Raises when the runtime takes no request now (closed, or ``max_queue`` waiting)."""
        with self._cv:
            if self._closed:
                self.metrics.count("rejected")
                raise RuntimeClosedError("the serving runtime is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                self.metrics.count("rejected")
                retry = self.retry_after_s()
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry in {retry:.0f} s or raise max_queue",
                    retry_after_s=retry,
                )

    def timeout_for(self, request: GenerateRequest) -> float | None:
        """The deadline in seconds a request gets: its ``timeout_s`` (or the default), at most ``max_timeout_s``."""
        timeout = request.timeout_s if request.timeout_s is not None else self.default_timeout_s
        if timeout is None:
            return self.max_timeout_s
        return timeout if self.max_timeout_s is None else min(float(timeout), self.max_timeout_s)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """``await``-able [`submit()`][fd_trt.serving.runtime.ServingRuntime.submit]; cancelling the awaiting task cancels a still-queued request."""
        return await asyncio.wrap_future(self.submit(request))

    def __call__(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        """Submits and waits: ``runtime(request)`` is ``runtime.submit(request).result(timeout)``."""
        return self.submit(request).result(timeout)

    def retry_after_s(self) -> float:
        """An estimate of when the queue will have room: the queue's batches times the mean batch time."""
        per_batch = self.metrics.mean_batch_seconds()
        per_batch = 1.0 if math.isnan(per_batch) else per_batch
        return float(max(1, math.ceil(per_batch * math.ceil(max(1, len(self._queue)) / self.max_batch))))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """[`Metrics.snapshot()`][fd_trt.serving.runtime.Metrics.snapshot] with the current queue depth and running rows."""
        return self.metrics.snapshot(len(self._queue), self._in_flight)

    def prometheus(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return prometheus_text(self.stats())

    # lifecycle --------------------------------------------------------------------------------
    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests and stops the worker.

        Args:
            drain: finish every accepted request first; otherwise waiting requests fail with
                [`RuntimeClosedError`][fd_trt.serving.runtime.RuntimeClosedError] (the running batch still finishes).
            timeout: seconds to wait for the worker; ``None`` waits as long as it takes.
        """
        with self._cv:
            self._closed = True
            if not drain:
                self._fail_queued("the runtime shut down before this request ran")
            self._cv.notify_all()
        if not self._loop_started:
            self._fail_queued("the runtime shut down before its worker started")
            self.pipeline.close()
            return
        if self._loop_done.wait(timeout):
            self.pipeline.close()

    def __enter__(self) -> ServingRuntime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # sizes and memory ---------------------------------------------------------------------------
    def _check_size(self, h: int, w: int) -> None:
        lim = self.limits
        multiple = math.lcm(lim.size_multiple, self.pipeline.vae_scale_factor)
        for name, v in (("height", h), ("width", w)):
            if not multiple <= v <= lim.max_size or v % multiple:
                raise InputError(
                    f"served size {h}x{w}: {name} {v} must be a multiple of {multiple} in [{multiple}, {lim.max_size}]"
                )

    def _prepare_sizes(self) -> None:
        """Builds or loads every served size's graphs now, then forbids building while serving."""
        pipe = self.pipeline
        if not self.builds_graphs or self.sizes is None:
            return
        # Every served size must stay loaded: an evicted runner would be rebuilt inside the worker.
        pipe.max_cached_runners = max(int(getattr(pipe, "max_cached_runners", 1)), len(self.sizes))
        t0 = time.perf_counter()
        for h, w in self.sizes:
            try:
                pipe.prepare(h, w)
            except FdTrtError as e:
                raise type(e)(f"cannot serve size {h}x{w}: {e}") from e
        pipe.build_on_demand = False
        logger.info(
            "fd_trt serve: %s graphs ready for %s in %.1f s",
            pipe.backend,
            _fmt_sizes(self.sizes),
            time.perf_counter() - t0,
        )

    def _rows_per_image(self, guidance: float) -> int:
        return 2 if guidance > 1.0 else 1  # CFG decodes an unconditional and a conditional row

    def decoder_row_bytes(self, height: int, width: int) -> int:
        """Estimated peak memory of one decoder row at an image size.

        Args:
            height, width: the image size in pixels.

        Returns:
            ``DECODER_ACTIVATION_FACTOR`` times the row's feature bytes (mid + skips) at the runner's
            precision.
        """
        f = self.pipeline.vae_scale_factor
        itemsize = 2 if getattr(self.pipeline, "precision", "fp32") in ("fp16", "bf16") else 4
        feats = feature_bytes_per_row(self.pipeline.sd.unet.config, (height // f, width // f), itemsize)
        return int(math.ceil(DECODER_ACTIVATION_FACTOR * feats))

    def decoder_rows_cap(self, height: int, width: int) -> int | None:
        """Most rows per decoder call at an image size under ``decoder_memory_mb``; ``None``: no cap.

        Args:
            height, width: the image size in pixels.

        Returns:
            ``floor(decoder_memory_mb * 2**20 / decoder_row_bytes(height, width))``, or ``None``.
        """
        if self.decoder_memory_mb is None:
            return None
        return int(self.decoder_memory_mb * 2**20 // self.decoder_row_bytes(height, width))

    def _batch_cap(self, height: int, width: int, guidance: float) -> int:
        """Most images per batch: ``max_batch``, and no more than one step's rows fit the decoder budget."""
        cap = self.decoder_rows_cap(height, width)
        if cap is None:
            return self.max_batch
        return max(1, min(self.max_batch, cap // self._rows_per_image(guidance)))

    # worker -----------------------------------------------------------------------------------
    def _num_steps(self, request: GenerateRequest) -> int:
        """Steps the scheduler really takes (PNDM adds some), on a private copy: submitters run in many threads."""
        import copy

        sched = copy.deepcopy(self._scheduler(request.scheduler))
        sched.set_timesteps(request.steps)
        return len(sched.timesteps)

    def _load_loras(self, loras: dict[str, str]) -> None:
        if not loras:
            return
        if self.builds_graphs:
            raise InputError(
                "LoRA adapters chosen per request (--lora) need --backend torch: a graph backend would rebuild "
                "or refit its graphs at every switch. To serve one adapter on a graph backend, fuse it into "
                "the model folder"
            )
        import re

        for name, path in loras.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise InputError(f"a LoRA name is 1-64 letters, digits, '_', '.' or '-', got {name!r}")
            try:
                self.pipeline.load_lora_weights(str(path), adapter_name=name)
            except (OSError, ValueError) as e:
                raise InputError(f"--lora {name}={path}: cannot load it ({e})") from e
            self.loras[name] = str(path)
        self.pipeline.disable_lora()

    def _load_controlnets(self, controlnets: dict[str, str]) -> None:
        if not controlnets:
            return
        if self.builds_graphs:
            raise InputError(
                "ControlNets chosen per request (--controlnet) need --backend torch here; to serve one ControlNet "
                "on a graph backend, load the pipeline with it"
            )
        if self._base_controlnet is not None:
            raise InputError("the served model already has a ControlNet; register ControlNets by name on a plain model")
        import re

        pipe = self.pipeline
        try:
            for name, source in controlnets.items():
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                    raise InputError(f"a ControlNet name is 1-64 letters, digits, '_', '.' or '-', got {name!r}")
                pipe._attach_controlnet(source, True)  # loads, checks it fits the UNet, moves it to the device
                self.controlnets[name] = pipe.controlnet
        finally:
            pipe.controlnet = None

    def _use_lora(self, name: str | None) -> None:
        """Makes ``name`` the active adapter (``None``: the base model); the worker calls it per batch."""
        if name == self._active_lora or not self.loras:
            return
        if name is None:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name])
        self._active_lora = name

    def _steps_run(self, request: GenerateRequest) -> int:
        """Steps an img2img or inpainting request runs: the last ``int(strength x steps)``."""
        import copy

        from fd_trt.pipelines.conditioning import img2img_steps

        strength = self.pipeline.resolve_strength(request.mode, request.strength)
        sched = copy.deepcopy(self._scheduler(request.scheduler))
        sched.set_timesteps(request.steps)
        timesteps, _ = img2img_steps(sched, request.steps, strength)
        return len(timesteps)

    def _check_images(self, request: GenerateRequest) -> tuple[int, int] | None:
        """Checks a request's image, mask, strength and LoRA; returns the image's ``(height, width)``."""
        if request.lora is not None and request.lora not in self.loras:
            named = ", ".join(sorted(self.loras)) or "none"
            raise InputError(f"lora {request.lora!r} is not registered on this server; adapters: {named}")
        if request.controlnet is not None:
            if request.controlnet not in self.controlnets:
                named = ", ".join(sorted(self.controlnets)) or "none"
                raise InputError(
                    f"controlnet {request.controlnet!r} is not loaded on this server; ControlNets: {named}"
                )
            if request.control_image is None:
                raise InputError("controlnet needs control_image: its conditioning image")
            if request.image is not None or request.mask_image is not None or request.strength is not None:
                raise InputError("controlnet with image, mask or strength (img2img, inpainting) is not supported")
            c = request.controlnet_conditioning_scale
            if c is not None and (
                isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and 0 <= c <= 10)
            ):
                raise InputError(f"controlnet_conditioning_scale must be a number in [0, 10], got {c!r}")
            if not (hasattr(request.control_image, "size") and hasattr(request.control_image, "mode")):
                raise InputError("control_image must be a decoded image")
            w, h = request.control_image.size
            return int(h), int(w)
        if request.control_image is not None or request.controlnet_conditioning_scale is not None:
            raise InputError("control_image and controlnet_conditioning_scale need controlnet: a ControlNet's name")
        if request.image is None:
            if request.mask_image is not None:
                raise InputError("mask needs image: the image to inpaint")
            if request.strength is not None:
                raise InputError("strength needs image: the image to start from")
            return None
        if self._base_controlnet is not None:
            raise InputError("this server's model has a ControlNet; img2img and inpainting are not served with it")
        for name in ("image", "mask_image"):
            img = getattr(request, name)
            if img is not None and not (hasattr(img, "size") and hasattr(img, "mode")):
                raise InputError(f"{name} must be a decoded image, got {type(img).__name__}")
        w, h = request.image.size
        if request.mask_image is not None and tuple(request.mask_image.size) != (w, h):
            raise InputError(
                f"the mask is {request.mask_image.size[0]}x{request.mask_image.size[1]} (WxH); the image is {w}x{h}"
            )
        self.pipeline.resolve_strength(request.mode, request.strength)  # in [0, 1]
        return int(h), int(w)

    def _scheduler(self, name: str) -> Any:
        from fd_trt.families.models import make_scheduler

        with self._cv:
            if name not in self._schedulers:
                self._schedulers[name] = make_scheduler(name, self._base_scheduler_config)
            return self._schedulers[name]

    def _warmup(self, sizes: Sequence[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        for h, w in dict.fromkeys(sizes):
            for n in dict.fromkeys((1, self._batch_cap(h, w, GenerateRequest.guidance))):
                jobs = []
                for i in range(n):
                    req = GenerateRequest(prompt="warm-up", seed=i, steps=10, height=h, width=w)
                    hh, ww, ks = self.check(req)
                    jobs.append(_Job(req, i, hh, ww, ks, Future(), t0, math.inf))
                self._execute(jobs, record=False)
        logger.info(
            "fd_trt serve: warmed up %s at batch 1 and %d in %.1f s",
            list(sizes),
            self.max_batch,
            time.perf_counter() - t0,
        )

    def _auto_runners(self) -> list[Any]:
        from fd_trt.backends.auto import AutoRunner

        pool = getattr(self.pipeline, "pool", None)
        runners = pool.loaded_runners() if pool is not None else []
        return [r for r in runners if isinstance(r, AutoRunner)]

    def _tune_served(self) -> None:
        """``auto``: decides (measures, or reads the cache) for the default request at every served
        size, alone and in a full batch, before serving; requests later follow the nearest decision."""
        req = GenerateRequest(prompt="tune")
        f = self.pipeline.vae_scale_factor
        for runner in self._auto_runners():
            h, w = int(runner.latent_shape[1]) * f, int(runner.latent_shape[2]) * f
            try:
                _, _, schedule = self.check(GenerateRequest(prompt="tune", height=h, width=w))
            except InputError:
                continue
            per_image = self._rows_per_image(req.guidance)
            for n in dict.fromkeys((1, self._batch_cap(h, w, req.guidance))):
                runner.plan(schedule, n * per_image, True, self.decoder_rows_cap(h, w))

    def _freeze_tuning(self) -> None:
        """No tuning run while serving: ``auto`` runners follow the nearest decision they have."""
        for runner in self._auto_runners():
            runner.tune_on_demand = False

    def _next_batch(self) -> list[_Job] | None:
        """Blocks for the oldest live job, then gathers compatible ones; None when closed and empty."""
        with self._cv:
            while True:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return None
                first = self._take(self._queue.popleft())
                if first is not None:
                    break
            batch = [first]
            key = first.batch_key
            limit = self._batch_cap(first.height, first.width, float(first.request.guidance))
            wait_until = time.perf_counter() + self.max_wait_s
            while len(batch) < limit:
                for job in list(self._queue):
                    if len(batch) >= limit:
                        break
                    if job.batch_key == key:
                        self._queue.remove(job)
                        if self._take(job) is not None:
                            batch.append(job)
                remaining = wait_until - time.perf_counter()
                if len(batch) >= limit or remaining <= 0 or self._closed:
                    break
                self._cv.wait(remaining)
            self._in_flight = len(batch)
            return batch

    def _on_cancel(self, job: _Job) -> None:
        """A cancelled request leaves the queue at once: it frees its place and is counted once."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                pass
            self.metrics.count("cancelled")

    def _take(self, job: _Job) -> _Job | None:
        """Marks a job running; None (and its outcome recorded) when it was cancelled or expired."""
        if not job.future.set_running_or_notify_cancel():
            return None  # cancelled: _on_cancel has counted it
        if time.perf_counter() > job.deadline:
            job.future.set_exception(RequestTimeoutError(self._timeout_message(job, "in the queue")))
            self.metrics.count("timeout")
            return None
        return job

    def _timeout_message(self, job: _Job, where: str) -> str:
        limit = job.deadline - job.submitted
        return f"the request passed its {limit:.1f} s deadline {where}; raise timeout_s or lower the load"

    def _fail_queued(self, message: str) -> None:
        with self._cv:
            while self._queue:
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(RuntimeClosedError(message))
                    self.metrics.count("closed")

    def run(self) -> None:
        """The worker loop: serves batches until [`shutdown()`][fd_trt.serving.runtime.ServingRuntime.shutdown], then returns.

        Called by the background thread, or by the caller when the runtime was made with
        ``start=False``.
        """
        with self._cv:
            if self._loop_started:
                raise FdTrtError("the runtime's worker loop is already running")
            self._loop_started = True
        self._loop()

    def _loop(self) -> None:
        try:
            self._serve_batches()
        finally:
            self._loop_done.set()

    def _serve_batches(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException as e:  # noqa: BLE001 - every failure goes to the requests, none is lost
                logger.exception("fd_trt serve: a batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                        self.metrics.count("error")
            finally:
                with self._cv:
                    self._in_flight = 0

    def _execute(self, jobs: list[_Job], record: bool = True) -> None:
        import torch

        req = jobs[0].request
        pipe = self.pipeline
        pipe.sd.scheduler = self._scheduler(req.scheduler)

        def still_wanted(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            if record and all(now > j.deadline for j in jobs):
                raise _BatchAborted
            return {}

        image_kw: dict[str, Any] = {}
        if self.controlnets:
            pipe.controlnet = self.controlnets.get(req.controlnet) if req.controlnet else None
        if req.mode == "controlnet":
            image_kw["image"] = [j.request.control_image for j in jobs]
            scale = req.controlnet_conditioning_scale
            image_kw["controlnet_conditioning_scale"] = 1.0 if scale is None else float(scale)
        elif req.mode != "text2img":
            image_kw["image"] = [j.request.image for j in jobs]
            image_kw["strength"] = req.strength
            if req.mode == "inpaint":
                image_kw["mask_image"] = [j.request.mask_image for j in jobs]
        self._use_lora(req.lora)
        t0 = time.perf_counter()
        try:
            out = pipe(
                prompt=[j.request.prompt for j in jobs],
                negative_prompt=[j.request.negative_prompt for j in jobs],
                height=jobs[0].height,
                width=jobs[0].width,
                num_inference_steps=req.steps,
                guidance_scale=float(req.guidance),
                generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
                schedule=jobs[0].schedule,
                noise_injection=req.noise_injection,
                max_decoder_rows=self.decoder_rows_cap(jobs[0].height, jobs[0].width),
                callback_on_step_end=still_wanted,
                **image_kw,
            )
        except _BatchAborted:
            for job in jobs:
                job.future.set_exception(RequestTimeoutError(self._timeout_message(job, "while running")))
            self.metrics.count("timeout", len(jobs))
            return
        done = time.perf_counter()
        if not record:
            return
        self.metrics.batch(len(jobs), done - t0)
        st = getattr(out, "stats", None)
        fd = (
            None
            if st is None
            else {
                "steps": st.num_steps,
                "key_steps": len(st.key_steps),
                "encoder_calls": st.encoder_calls,
                "decoder_calls": st.decoder_calls,
                "backend": st.backend,
            }
        )
        lat = out.latents.float()
        for i, job in enumerate(jobs):
            nonfinite = not bool(torch.isfinite(lat[i]).all())
            if nonfinite:
                logger.warning("fd_trt serve: the image for seed %d has NaN/Inf latents and is invalid", job.seed)
            if done > job.deadline:
                job.future.set_exception(RequestTimeoutError(self._timeout_message(job, "while running")))
                self.metrics.count("timeout")
                continue
            res = GenerateResult(
                image=out.images[i],
                latents=lat[i].clone(),
                seed=job.seed,
                batch_size=len(jobs),
                queue_seconds=t0 - job.submitted,
                run_seconds=done - t0,
                total_seconds=done - job.submitted,
                nonfinite=nonfinite,
                fd=fd,
            )
            self.metrics.done(res.total_seconds, res.queue_seconds, nonfinite)
            job.future.set_result(res)


__all__ = [
    "GenerateRequest",
    "GenerateResult",
    "Limits",
    "Metrics",
    "QueueFullError",
    "RequestTimeoutError",
    "RuntimeClosedError",
    "ServingRuntime",
    "feature_bytes_per_row",
    "parse_sizes",
    "prometheus_text",
]
