"""The runners of one pipeline: which backend runs, one runner per shape, and the weights they carry.

A pipeline runs on either one *fixed* runner that serves every shape (torch, or a runner passed in)
or on graph runners built per latent/text shape (onnxruntime, tensorrt, and ``auto``, which measures
its candidates per shape; a latent shape is ``(h, w)``, or ``(F, h, w)`` for a text-to-video model,
whose graphs fix the frame count F too). [`RunnerPool`][fd_trt.pipelines.runner_pool.RunnerPool] keeps the latter in a least-recently-used cache of
``max_cached_runners``, holds a runner in use for the length of a call (eviction then closes it when
the call ends, never under it), and makes every runner follow a change of the UNet's weights.

The pool reads the pipeline's settings (``backend``, ``precision``, ``engines``, ``build_on_demand``,
``max_cached_runners``, ``runner_options``, the ``auto_*`` switches) when it needs them, so that a
change made to the pipeline (serving turns ``build_on_demand`` off) takes effect at once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fd_trt.backends import BACKENDS, default_backend, get_runner_class
from fd_trt.core.runner import Runner
from fd_trt.errors import EngineMismatchError, InputError, NotPreparedError
from fd_trt.utils.cache import engine_cache_root

logger = logging.getLogger(__name__)

Shape = tuple[int, int]
#: The latent dims after the channels a graph runner serves: ``(h, w)``, or ``(F, h, w)`` for video.
LatentDims = tuple[int, ...]


def split_frames(latent_dims: LatentDims) -> tuple[int | None, Shape]:
    """``(F or None, (h, w))`` of latent dims ``(h, w)`` or ``(F, h, w)``."""
    dims = tuple(int(d) for d in latent_dims)
    if len(dims) == 3:
        return dims[0], (dims[1], dims[2])
    return None, (dims[0], dims[1])


def resolve_backend(
    backend: str | Runner | None, precision: str | None, device: torch.device
) -> tuple[str, str, str | None]:
    """``(backend, precision, auto_precision)`` of a pipeline from its constructor's arguments.

    ``auto_precision`` is the precision asked of ``auto`` (``None``: exact only; ``"auto"``: reduced
    precision may compete), ``None`` for the other backends.

    Raises:
        InputError: for an unknown backend or precision, or bf16 asked of onnxruntime.
    """
    if isinstance(backend, Runner):
        return backend.name, precision or "fp32", None
    name = backend or default_backend(str(device))
    if name not in (*BACKENDS, "auto"):
        raise InputError(f"unknown backend {name!r}: choose auto or one of {', '.join(BACKENDS)}")
    auto_precision = None
    if name == "auto":
        if precision not in (None, "auto", "fp32", "fp16", "bf16"):
            raise InputError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
        auto_precision = precision
        precision = precision if precision not in (None, "auto") else ("fp16" if device.type == "cuda" else "fp32")
    # TensorRT engines are fp16 unless asked otherwise; the others default to fp32.
    precision = precision or ("fp16" if name == "tensorrt" else "fp32")
    if name not in ("torch", "auto"):
        get_runner_class(name)  # fails now when the backend's library is missing
        if name == "onnxruntime" and precision not in ("fp32", "fp16"):
            raise InputError(f"the onnxruntime backend runs fp32 or fp16 graphs, got precision={precision!r}")
    return name, precision, auto_precision


class RunnerPool:
    """The runners of one pipeline, and the UNet weights they were made from.

    Args:
        pipe: the [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline] whose UNet, device and
            settings the runners follow.
        runner: a ready runner passed to the pipeline, which then serves every shape.
    """

    def __init__(self, pipe: Any, runner: Runner | None = None) -> None:
        self.pipe = pipe
        #: Guards the cache, the in-use counts and the weights state; re-entrant.
        self.lock = threading.RLock()
        self._runners: OrderedDict[tuple[int, ...], Runner] = OrderedDict()
        self._in_use: dict[int, int] = {}
        self._retired: dict[int, Runner] = {}
        self._unet_sha256: str | None = None
        self._weights_fp: tuple[Any, ...] | None = None
        #: A runner that serves every shape (torch, or one passed in); ``None`` for per-shape graph runners.
        self.fixed: Runner | None = None
        if runner is not None:
            self.fixed = runner.activate()
        elif pipe.backend == "torch":
            cls = get_runner_class("torch")
            self.fixed = cls(pipe.sd.unet, device=pipe.device, dtype=pipe.precision, **pipe.runner_options).activate()
        #: The runner of the latest call (the fixed one when there is one).
        self.current: Runner | None = self.fixed

    # the per-shape cache ------------------------------------------------------------------------
    def runner_for(
        self, latent_hw: LatentDims, text_shape: Shape, build: bool | None = None, ahead: bool = False
    ) -> Runner:
        """The runner for one latent size and text shape; builds or checks graphs on first use.

        Args:
            latent_hw, text_shape: the shape served (``latent_hw``: ``(h, w)``, or ``(F, h, w)``
                for a text-to-video model).
            build: whether a new shape may be built or loaded; the pipeline's ``build_on_demand``
                when ``None``.
            ahead: the shape is readied ahead of the first call (``prepare``), so a build is what
                the caller asked for: it is logged at INFO, not warned about as a first-use build.

        Raises:
            NotPreparedError: for a new shape when building is off.
        """
        if self.fixed is not None:
            return self.fixed
        key = (*latent_hw, *text_shape)
        pipe = self.pipe
        with self.lock:
            if key in self._runners:
                self._runners.move_to_end(key)
                self.current = self._runners[key]
                return self.current
            if not (pipe.build_on_demand if build is None else build):
                f = pipe.vae_scale_factor
                ready = ", ".join(f"{k[-4] * f}x{k[-3] * f}" for k in self._runners) or "none"
                frames, (h, w) = split_frames(latent_hw)
                what = "images" if frames is None else f"videos of {frames} frames"
                raise NotPreparedError(
                    f"no {pipe.backend} graphs are loaded for {h * f}x{w * f} {what} "
                    f"(latents {h}x{w}, text {text_shape[0]}x{text_shape[1]}) and building on "
                    f"demand is off; sizes ready: {ready}. Prepare the size first (pipe.prepare(height, width), "
                    "fd-trt serve --sizes HxW,...)"
                )
            runner = self._load(latent_hw, text_shape, ahead)
            self._runners[key] = runner
            self.current = runner
            while len(self._runners) > pipe.max_cached_runners:
                old_key, old = self._runners.popitem(last=False)
                logger.info(
                    "closing the %s runner of latents %s (least recently used; max_cached_runners=%d)",
                    pipe.backend,
                    old_key[:-2],
                    pipe.max_cached_runners,
                )
                self._retire(old)
            return runner

    @contextlib.contextmanager
    def using(self, latent_hw: LatentDims, text_shape: Shape) -> Iterator[Runner]:
        """The runner for a shape, held in use (never closed by eviction) until the block ends."""
        with self.lock:  # one critical section: no eviction between lookup and hold
            runner = self.runner_for(latent_hw, text_shape)
            self._in_use[id(runner)] = self._in_use.get(id(runner), 0) + 1
        try:
            yield runner
        finally:
            with self.lock:
                self._in_use[id(runner)] -= 1
                if self._in_use[id(runner)] == 0:
                    del self._in_use[id(runner)]
                    retired = self._retired.pop(id(runner), None)
                    if retired is not None:
                        retired.deactivate()

    def shapes(self) -> list[tuple[int, ...]]:
        """``(h, w, L, D)`` (``(F, h, w, L, D)`` for video) of the loaded graph runners, least recently used first."""
        with self.lock:
            return list(self._runners)

    def loaded_runners(self) -> list[Runner]:
        """The runners loaded now: the fixed one, or the per-shape ones (least recently used first)."""
        with self.lock:
            return [self.fixed] if self.fixed is not None else list(self._runners.values())

    def close(self) -> None:
        """Deactivates every runner of the pool."""
        with self.lock:
            for r in [*self._runners.values(), *([self.fixed] if self.fixed else [])]:
                r.deactivate()
            self._runners.clear()

    def _retire(self, runner: Runner) -> None:
        """Closes a runner now, or when the last call that uses it ends."""
        if self._in_use.get(id(runner), 0) > 0:
            self._retired[id(runner)] = runner
        else:
            runner.deactivate()

    def _load(self, latent_hw: LatentDims, text_shape: Shape, ahead: bool = False) -> Runner:
        pipe = self.pipe
        if pipe.backend == "auto":
            return self._auto_runner(latent_hw, text_shape).activate()
        folder = self.graph_folder(latent_hw, text_shape, pipe.precision, build=True, asked=ahead)
        cls = get_runner_class(pipe.backend)
        return cls(folder, device=pipe.device, dtype=pipe.precision, **pipe.runner_options).activate()

    def graph_folder(
        self, latent_hw: LatentDims, text_shape: Shape, precision: str, build: bool, asked: bool = False
    ) -> Path:
        """The engine directory for a shape: ``engines=``, or the cache folder, built there when ``build``.

        ``latent_hw`` is ``(h, w)``, or ``(F, h, w)`` for a text-to-video model: its graphs are
        built for the frame count, and a directory of another frame count is refused (or, in
        the cache, lives in a folder of its own).

        A build is warned about (a call paid for it, once) unless ``asked``: the caller asked for
        the graphs ahead of time (``prepare``, ``fd-trt build --tune``), and the build is then
        logged at INFO.

        Raises:
            EngineMismatchError: the graphs do not fit (or, with ``build=False``, are not built).
        """
        from fd_trt.graphs.build import build_engines
        from fd_trt.graphs.manifest import check_engine_dir

        pipe = self.pipe
        unet, added = pipe.sd.unet, pipe.added_shapes()
        frames, latent_hw = split_frames(latent_hw)
        model = {"frames": frames or 0, "family": pipe.family.name}
        if pipe.engines is not None:
            check_engine_dir(
                pipe.engines,
                unet,
                latent_size=latent_hw,
                text_shape=text_shape,
                precision=precision,
                unet_sha256=self.unet_sha256,
                added_shapes=added,
                **model,
            )
            return pipe.engines
        digest = self.unet_sha256
        h, w = latent_hw
        f_part = f"-f{frames}" if frames is not None else ""
        folder = engine_cache_root() / f"{digest[:16]}{f_part}-{h}x{w}-t{text_shape[0]}x{text_shape[1]}-{precision}"
        if not build:
            if not (folder / "manifest.json").is_file():
                raise EngineMismatchError(
                    f"no {precision} graphs built for latents {latent_hw} (fd-trt build --tune builds them)"
                )
            check_engine_dir(
                folder,
                unet,
                latent_size=latent_hw,
                text_shape=text_shape,
                precision=precision,
                unet_sha256=digest,
                added_shapes=added,
                **model,
            )
            return folder
        res = build_engines(
            unet,
            folder,
            latent_size=latent_hw,
            text_shape=text_shape,
            precision=precision,
            model_source=pipe.source,
            progress=pipe.progress,
            unet_sha256=digest,
            added_shapes=added,
            frames=frames,
            family=pipe.family.name,
        )
        if res.built and asked:
            logger.info("built graphs for latents %s into %s (%.1f s)", latent_hw, folder, res.seconds)
        elif res.built:
            logger.warning(
                "built graphs for latents %s on first use into %s (%.1f s); they are reused from now on",
                latent_hw,
                folder,
                res.seconds,
            )
        return folder

    # backend="auto" -----------------------------------------------------------------------------
    def auto_candidates(self) -> list[Any]:
        """The candidates ``backend="auto"`` measures on the pipeline's device, in order of preference on a tie."""
        from fd_trt.backends.auto import Candidate

        if self.pipe.device.type == "cuda":
            return [
                Candidate("tensorrt", "fp16", exact=False),
                Candidate("torch", "fp16", exact=False, options=(("cuda_graphs", True),)),
            ]
        asked = self.pipe.auto_precision
        if asked == "bf16":
            return [Candidate("torch", "bf16", exact=False)]
        if asked == "fp16":
            return [Candidate("onnxruntime", "fp16", exact=False)]
        cands = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32")]
        if asked == "auto":
            cands.append(Candidate("torch", "bf16", exact=False))
        return cands

    def options_for(self, cls: type) -> dict[str, Any]:
        """The pipeline's runner options that ``cls`` takes (``auto`` mixes runners with different options)."""
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return dict(self.pipe.runner_options)
        return {k: v for k, v in self.pipe.runner_options.items() if k in params}

    def _auto_runner(self, latent_hw: Shape, text_shape: Shape) -> Runner:
        from fd_trt.backends.auto import AutoRunner, Candidate, library_versions
        from fd_trt.graphs.manifest import check_engine_dir
        from fd_trt.utils.system import device_name

        pipe = self.pipe
        if pipe.engines is not None:
            # An engine directory is an explicit request for its graphs: one that does not fit is an
            # error naming the rebuild command, not a candidate quietly skipped.
            check_engine_dir(
                pipe.engines,
                pipe.sd.unet,
                latent_size=latent_hw,
                text_shape=text_shape,
                unet_sha256=self.unet_sha256,
                added_shapes=pipe.added_shapes(),
            )

        def make(cand: Candidate) -> Runner:
            cls = get_runner_class(cand.backend)
            opts = {**self.options_for(cls), **dict(cand.options)}
            if cand.backend == "torch":
                return cls(pipe.sd.unet, device=pipe.device, dtype=cand.precision, **opts)
            # auto_build_graphs: building is what the caller asked for (fd-trt build --tune).
            build = pipe.auto_build_graphs
            folder = self.graph_folder(latent_hw, text_shape, cand.precision, build=build, asked=build)
            if cand.backend == "tensorrt":
                opts.setdefault("build", pipe.auto_build_graphs)
            return cls(folder, device=pipe.device, dtype=cand.precision, **opts)

        def ready(cand: Candidate) -> bool:
            if cand.backend == "torch":
                return True
            if pipe.engines is not None:
                return True
            pattern = f"{self.unet_sha256[:16]}-{latent_hw[0]}x{latent_hw[1]}-*-{cand.precision}/manifest.json"
            return any(engine_cache_root().glob(pattern))

        def base_key() -> dict[str, Any]:
            return {
                # 2: onnxruntime stopped spinning on CPU, so format-1 costs no longer hold.
                # 3: the torch decoder convolves repeated skips once per distinct row (faster).
                # 4: so do the decoder graphs (engine format 2).
                # 5: ... only for UNets at least 96 channels wide (torch too; fd_trt.graphs.split.decoder_shares_rows).
                # 6: torch shallow steps keep the hidden half of their first convolutions (faster).
                "format": 6,
                "unet_sha256": self.unet_sha256,
                "device": device_name(pipe.device),
                "device_type": pipe.device.type,
                "threads": torch.get_num_threads(),
                "versions": dict(library_versions()),
                "runner_options": {k: repr(v) for k, v in sorted(pipe.runner_options.items())},
                "engines": str(pipe.engines) if pipe.engines is not None else None,
            }

        c = int(pipe.sd.unet.config.in_channels)
        # The pipeline's auto_candidates, which a caller may replace on the instance.
        return AutoRunner(
            pipe.auto_candidates(),
            make,
            (c, *latent_hw),
            text_shape,
            base_key,
            device=pipe.device,
            ready=ready,
            use_cache=pipe.auto_use_cache,
            added_shapes=pipe.added_shapes(),
        )

    # weights ------------------------------------------------------------------------------------
    @property
    def unet_sha256(self) -> str:
        """sha256 of the UNet's effective weights (parameters, fused LoRA, active adapters and scales)."""
        from fd_trt.graphs.weights import unet_weights_sha256

        if self._unet_sha256 is None:
            self._unet_sha256 = unet_weights_sha256(self.pipe.sd.unet)
        return self._unet_sha256

    def refresh_weights(self) -> None:
        """Makes every runner take the UNet's weights now, whatever the cheap fingerprint says."""
        with self.lock:
            self._weights_fp = ("refresh",)
        self.check_weights()

    def check_weights(self) -> None:
        """Notices a weight change since the last call and makes every runner follow it.

        A cheap fingerprint ([`fd_trt.graphs.weights.weights_fingerprint()`][fd_trt.graphs.weights.weights_fingerprint]) is compared on every
        call. On a change, runners that can take new weights in place (torch, refittable
        TensorRT plans) are refit; graph runners that cannot are closed, so the next call
        rebuilds them (or, with ``engines=``, refuses the directory naming the rebuild command).

        Raises:
            EngineMismatchError: when a runner passed to the pipeline cannot take the new weights.
        """
        from fd_trt.graphs.weights import weights_fingerprint

        pipe = self.pipe
        unet = pipe.sd.unet
        fp = weights_fingerprint(unet)
        with self.lock:
            if fp == self._weights_fp:
                return
            first = self._weights_fp is None
            self._weights_fp = fp
            if first:
                return
            self._unet_sha256 = None
            logger.warning(
                "the UNet's weights changed since the last call (%s): updating the %s runners",
                pipe.source,
                pipe.backend,
            )
            if self.fixed is not None:
                if not self.fixed.refit(unet):
                    raise EngineMismatchError(
                        f"the UNet's weights changed, and the {self.fixed.name} runner passed to this pipeline "
                        "cannot take new weights: create a new runner (or pass backend='torch')"
                    )
                return
            for key, runner in list(self._runners.items()):
                if not runner.refit(unet):
                    del self._runners[key]
                    self._retire(runner)


class PreparedSizesMixin:
    """The pipeline's methods that ready its [`RunnerPool`][fd_trt.pipelines.runner_pool.RunnerPool] for image sizes ahead of the
    first call (serving prepares every size it serves at start-up)."""

    pool: RunnerPool
    vae_scale_factor: int

    def prepare(self, height: int | None = None, width: int | None = None) -> Runner:
        """Builds or loads, and activates, the runner for one image size ahead of the first call.

        Serving calls it at start-up for every size it serves, so that no request pays for (or
        waits behind) an export or a plan build.

        Args:
            height, width: the image size; the model's default size when omitted.

        Returns:
            The active runner for that size.
        """
        f = self.vae_scale_factor
        height, width = self.default_size(height, width)
        self.check_inputs("x", None, height, width, 1, 1.0, 1, "latent")
        self.pool.check_weights()
        return self.pool.runner_for((height // f, width // f), self.text_shape(), build=True, ahead=True)

    def prepared_sizes(self) -> list[tuple[int, int]]:
        """Image sizes ``(height, width)`` with a loaded graph runner, least recently used first."""
        f = self.vae_scale_factor
        return [(k[-4] * f, k[-3] * f) for k in self.pool.shapes()]


__all__ = ["PreparedSizesMixin", "RunnerPool", "resolve_backend"]
