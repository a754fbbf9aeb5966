"""FasterDiffusionPipeline: text encoding, latents, the sampler, VAE decode, images.

It wraps a diffusers ``StableDiffusionPipeline`` for the text encoder, tokenizer, VAE and image
post-processing, and replaces the UNet loop with :func:`fd_trt.core.sampler.run_sampler` on a backend
runner. ``__call__`` takes the arguments of diffusers' ``StableDiffusionPipeline`` plus
``schedule``, ``noise_injection``, ``parallel`` and ``max_decoder_rows``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fd_trt.backends import BACKENDS, default_backend, get_runner_class
from fd_trt.core.runner import Runner, same_device
from fd_trt.errors import EngineMismatchError, InputError, NotPreparedError, UnsupportedModelError
from fd_trt.utils.cache import engine_cache_root
from fd_trt.utils.flops import flop_counter_mode
from fd_trt.pipelines.conditioning import (
    InpaintBlend,
    KeyStepControlNet,
    controlnet_nets,
    encode_images,
    img2img_steps,
    repeat_to_batch,
    with_key_steps,
)
from fd_trt.families.models import unet_input_kind
from fd_trt.families.models import check_controlnet_fits, load_controlnet, load_diffusers_pipeline, make_scheduler
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, SamplerStats, run_sampler
from fd_trt.core.schedule import KeySchedule, NoiseInjection, ScheduleSpec, parse_schedule
from fd_trt.graphs.split import split_unet

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineStats:
    """What one call did and where its time went.

    Attributes:
        num_steps: scheduler steps.
        key_steps: the steps at which the encoder ran.
        encoder_calls, encoder_rows, decoder_calls, decoder_rows: work done by the runner.
        unet_gflops: UNet GFLOPs for the run (2 x multiply-adds), counted with
            ``torch.utils.flop_counter`` on the split modules (the ControlNet not included).
        seconds: wall seconds per stage: ``text_encoder``, ``encoder``, ``controlnet``,
            ``decoder``, ``scheduler``, ``vae``, ``total``.
        backend: the runner's backend name.
        nonfinite: the final latents hold NaN or Inf.
        controlnet_calls: ControlNet forward passes, one per ControlNet per key step inside its
            guidance window.
    """

    num_steps: int
    key_steps: list[int]
    encoder_calls: int
    encoder_rows: int
    decoder_calls: int
    decoder_rows: int
    unet_gflops: float
    seconds: dict[str, float]
    backend: str
    nonfinite: bool = False
    controlnet_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FasterDiffusionOutput:
    """Output of :class:`FasterDiffusionPipeline`.

    Attributes:
        images: a list of PIL images (``pil``), a ``[B,H,W,3]`` numpy array (``np``), or the
            ``[B,C,h,w]`` latents tensor (``latent``), as in diffusers.
        stats: counters and timings of the call.
        latents: the final ``[B,C,h,w]`` float32 latents, whatever the output type.
    """

    images: Any
    stats: PipelineStats
    latents: torch.Tensor | None = None


@dataclass
class PromptEmbeddings:
    """The conditioning of every sampler row, negative rows first with CFG.

    Attributes:
        text: ``[R,L,D]`` prompt embeddings (the UNet's ``encoder_hidden_states``).
        added: the UNet's added conditioning per row, or ``None``. SDXL:
            ``{"text_embeds": [R,D], "time_ids": [R,6]}`` (5 time ids for the refiner).
    """

    text: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.text.shape[0])




@dataclass
class _FlopCounter:
    """UNet FLOPs per row of the encoder and the decoder, counted once per latent/text shape."""

    cache: dict[tuple[Any, ...], tuple[float, float]] = field(default_factory=dict)

    def per_row(
        self,
        unet: torch.nn.Module,
        latent_shape: tuple[int, int, int],
        text_shape: tuple[int, int],
        added_widths: dict[str, int] | None = None,
    ) -> tuple[float, float]:
        """``(encoder, decoder)`` FLOPs of one row; ``added_widths`` are SDXL's per-row widths."""
        key = (*latent_shape, *text_shape, *sorted((added_widths or {}).items()))
        if key not in self.cache:
            split = split_unet(unet)
            p = next(unet.parameters())
            x = torch.zeros((1, *latent_shape), device=p.device, dtype=p.dtype)
            t = torch.full((1,), 500.0, device=p.device)
            e = torch.zeros((1, *text_shape), device=p.device, dtype=p.dtype)
            added = None
            if added_widths:
                added = {k: torch.zeros((1, w), device=p.device, dtype=torch.float32 if k == "time_ids" else p.dtype)
                         for k, w in added_widths.items()}
            try:
                # Shapes only: under FakeTensorMode no arithmetic runs, so counting costs a fraction
                # of a real call (sd15-arch at 256x256: 2.4 s against 11.9 s on a 2-core CPU).
                self.cache[key] = _count_split_flops(split, x, t, e, added, fake=True)
            except Exception as exc:  # an operator without a fake kernel: count on real tensors
                logger.debug("FLOP counting on fake tensors failed (%s); counting on real ones", exc)
                self.cache[key] = _count_split_flops(split, x, t, e, added, fake=False)
        return self.cache[key]


def _count_split_flops(split: Any, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, added: Any,
                       fake: bool) -> tuple[float, float]:
    """``(encoder, decoder)`` FLOPs of one call of the split UNet on these inputs."""
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            x, t, e = mode.from_tensor(x), mode.from_tensor(t), mode.from_tensor(e)
            added = None if added is None else {k: mode.from_tensor(v) for k, v in added.items()}
        with flop_counter_mode() as enc:
            feats = split.run_encoder(x, t, e, added)
        with flop_counter_mode() as dec:
            split.run_decoder(feats, t, e, added)
    return float(enc.get_total_flops()), float(dec.get_total_flops())


@dataclass
class _ImageRun:
    """What an img2img, inpainting or ControlNet call adds to the sampler's arguments."""

    latents: torch.Tensor
    timesteps: torch.Tensor | None = None
    initial_noise: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    blend: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    control: KeyStepControlNet | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pipeline_device(sd: Any) -> torch.device:
    """Where a diffusers pipeline's UNet lives."""
    try:
        return next(sd.unet.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")




class FasterDiffusionPipeline:
    """Stable Diffusion with Faster Diffusion's encoder propagation on a chosen backend.

    Args:
        sd_pipeline: a diffusers ``StableDiffusionPipeline`` (its components are used, not copied).
        backend: ``"auto"`` (default: measure the available backends and keep the fastest, see
            :mod:`fd_trt.backends.auto`), ``"torch"``, ``"onnxruntime"``, ``"tensorrt"``, or a ready
            :class:`~fd_trt.core.runner.Runner`.
        device: ``"cpu"`` or ``"cuda[:i]"``; CUDA when available by default.
        precision: the runner's precision, ``fp32``, ``fp16`` or ``bf16``; with ``auto``, also
            ``"auto"``, which lets reduced precision (bf16 on a CPU) compete.
        progress: show progress bars.
        source: a description of where the model came from, for messages.
        engines: a built engine directory for graph backends (see :meth:`from_pretrained`).
        runner_options: extra keyword arguments for the runner.
        max_cached_runners: graph runners kept loaded, one per latent/text shape; the least
            recently used is closed past this count.
        build_on_demand: build or load graphs for a new shape on the first call that needs it.
            With ``False`` (serving), only shapes readied by :meth:`prepare` run; any other
            raises :class:`~fd_trt.errors.NotPreparedError`.
        owns_pipeline: whether ``sd_pipeline`` belongs to this object, which may then move it to
            ``device``. A wrapped pipeline (:meth:`from_diffusers`) is never moved or cast.
        controlnet: a ``ControlNetModel``, a ``MultiControlNetModel`` or a list of them, run at key
            steps only; by default the wrapped pipeline's own ``controlnet``, if it has one. On the
            torch backend it runs as the diffusers module; on the graph backends (onnxruntime,
            tensorrt, and ``auto`` when it chooses one) each ControlNet runs as its own graph,
            ``controlnet-<sha16>.onnx`` in the UNet's engine directory, exported on first use
            (with ``build_on_demand``) and re-exported when the ControlNet's weights change.
    """

    #: Whether ``controlnet=`` is supported (SD 1.x/2.x); SDXL's subclass says no.
    supports_controlnet: bool = True


    def __init__(
        self,
        sd_pipeline: Any,
        backend: str | Runner | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        progress: bool = True,
        source: str = "diffusers pipeline",
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        max_cached_runners: int = 4,
        build_on_demand: bool = True,
        owns_pipeline: bool = False,
        controlnet: Any = None,
    ) -> None:
        self.sd = sd_pipeline
        #: ``"text2img"`` or ``"inpaint"`` (a UNet with mask and masked-image input channels).
        self.unet_kind = unet_input_kind(sd_pipeline.unet.config)
        self.source = source
        if isinstance(max_cached_runners, bool) or not isinstance(max_cached_runners, int) or max_cached_runners < 1:
            raise InputError(f"max_cached_runners must be a positive integer, got {max_cached_runners!r}")
        self.max_cached_runners = max_cached_runners
        self.build_on_demand = bool(build_on_demand)
        self.progress = progress
        self.engines = Path(engines) if engines is not None else None
        self.runner_options = dict(runner_options or {})
        here = _pipeline_device(sd_pipeline)
        if owns_pipeline:
            self.device = torch.device(device or default_device())
            self.sd.to(self.device)
        else:
            # The caller's pipeline stays where it is: moving it would change their object.
            self.device = torch.device(device) if device is not None else here
            if not same_device(self.device, here):
                raise InputError(
                    f"the diffusers pipeline is on {here} but device={str(device)!r} was asked for: move it first "
                    f"(sd_pipeline.to({str(device)!r})) or leave device unset; fd_trt does not move a pipeline it wraps"
                )
        self._check_model()
        split_unet(self.sd.unet)  # fail early on an unsupported UNet
        #: The ControlNet(s) run at key steps, or ``None``.
        self.controlnet: Any = load_controlnet(controlnet) if controlnet is not None else getattr(sd_pipeline, "controlnet", None)
        if self.controlnet is not None:
            if not self.supports_controlnet:
                raise UnsupportedModelError(
                    f"{type(self).__name__} does not run a ControlNet yet: drop controlnet=, or use an SD 1.x/2.x model"
                )
            if self.unet_kind != "text2img":
                raise UnsupportedModelError(
                    "ControlNet with an inpainting UNet is not supported yet: use a text-to-image UNet with the ControlNet"
                )
            for net in controlnet_nets(self.controlnet):
                check_controlnet_fits(net, self.sd.unet.config)
                here_cn = next(net.parameters()).device
                if owns_pipeline:
                    net.to(self.device)
                elif not same_device(here_cn, self.device):
                    raise InputError(f"the ControlNet is on {here_cn} but the pipeline runs on {self.device}: move it first")
        self._runners: OrderedDict[tuple[int, ...], Runner] = OrderedDict()
        self._in_use: dict[int, int] = {}
        self._retired: dict[int, Runner] = {}
        self._cache_lock = threading.RLock()
        self._unet_sha256: str | None = None
        self._weights_fp: tuple[Any, ...] | None = None
        #: Per ControlNet (by id): its weights fingerprint and sha256, recomputed when the fingerprint changes.
        self._controlnet_digests: dict[int, tuple[tuple[Any, ...], str]] = {}
        #: The model folder (``from_pretrained``), where saved calibrations are looked for.
        self.model_dir: Path | None = None
        # A runner that serves every shape (torch, or one passed in); None for per-shape graph runners.
        self._fixed_runner: Runner | None = None
        if isinstance(backend, Runner):
            self.backend = backend.name
            self._fixed_runner = backend.activate()
        else:
            self.backend = backend or default_backend(str(self.device))
            if self.backend not in (*BACKENDS, "auto"):
                raise InputError(f"unknown backend {self.backend!r}: choose auto or one of {', '.join(BACKENDS)}")
            if self.backend == "auto":
                if precision not in (None, "auto", "fp32", "fp16", "bf16"):
                    raise InputError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
                #: The precision asked of ``auto`` (None: exact only; "auto": reduced precision may compete).
                self.auto_precision = precision
                precision = precision if precision not in (None, "auto") else ("fp16" if self.device.type == "cuda" else "fp32")
            # TensorRT engines are fp16 unless asked otherwise; the others default to fp32.
            precision = precision or ("fp16" if self.backend == "tensorrt" else "fp32")
            if self.backend == "torch":
                cls = get_runner_class("torch")
                self._fixed_runner = cls(self.sd.unet, device=self.device, dtype=precision, **self.runner_options).activate()
            elif self.backend != "auto":  # auto measures per shape, on the first call (fd_trt.backends.auto)
                # Graph backends are built per latent/text shape, on the first call that needs one.
                get_runner_class(self.backend)
                if self.backend == "onnxruntime" and precision not in ("fp32", "fp16"):
                    raise InputError(f"the onnxruntime backend runs fp32 or fp16 graphs, got precision={precision!r}")
        self.precision: str = precision or "fp32"
        #: The runner of the latest call (the fixed one when there is one).
        self.runner: Runner | None = self._fixed_runner
        self._flops = _FlopCounter()

    def _check_model(self) -> None:
        """Refuses a diffusers pipeline this class would condition wrongly: SDXL has its own class."""
        from fd_trt.families.sdxl import is_sdxl

        if is_sdxl(self.sd):
            raise InputError(
                f"{type(self.sd).__name__} has an SDXL UNet (addition_embed_type='text_time'): wrap it with "
                "FasterDiffusionPipeline.from_diffusers(pipe) or FasterDiffusionXLPipeline(pipe), which pass its "
                "pooled text embeddings and time ids"
            )

    @classmethod
    def _class_for(cls, sd_pipeline: Any) -> type["FasterDiffusionPipeline"]:
        """The class that serves a diffusers pipeline: SDXL's subclass for an SDXL model when called
        on the base class, else ``cls``."""
        from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline
        from fd_trt.families.sdxl import is_sdxl

        if cls is FasterDiffusionPipeline and is_sdxl(sd_pipeline):
            return FasterDiffusionXLPipeline
        return cls

    def _runner_for(self, latent_hw: tuple[int, int], text_shape: tuple[int, int]) -> Runner:
        """The runner for one latent size and text shape; builds or checks graphs on first use.

        Raises:
            NotPreparedError: for a new shape when ``build_on_demand`` is off.
        """
        if self._fixed_runner is not None:
            return self._fixed_runner
        key = (*latent_hw, *text_shape)
        with self._cache_lock:
            if key in self._runners:
                self._runners.move_to_end(key)
                self.runner = self._runners[key]
                return self.runner
            if not self.build_on_demand:
                f = self.vae_scale_factor
                ready = ", ".join(f"{k[0] * f}x{k[1] * f}" for k in self._runners) or "none"
                raise NotPreparedError(
                    f"no {self.backend} graphs are loaded for {latent_hw[0] * f}x{latent_hw[1] * f} images "
                    f"(latents {latent_hw[0]}x{latent_hw[1]}, text {text_shape[0]}x{text_shape[1]}) and building on "
                    f"demand is off; sizes ready: {ready}. Prepare the size first (pipe.prepare(height, width), "
                    "fd-trt serve --sizes HxW,...)"
                )
            runner = self._load_runner(latent_hw, text_shape)
            self._runners[key] = runner
            self.runner = runner
            while len(self._runners) > self.max_cached_runners:
                old_key, old = self._runners.popitem(last=False)
                logger.info("closing the %s runner of latents %s (least recently used; max_cached_runners=%d)",
                            self.backend, old_key[:2], self.max_cached_runners)
                self._retire(old)
            return runner

    def _load_runner(self, latent_hw: tuple[int, int], text_shape: tuple[int, int]) -> Runner:
        if self.backend == "auto":
            return self._auto_runner(latent_hw, text_shape).activate()
        folder = self._graph_folder(latent_hw, text_shape, self.precision, build=True)
        cls = get_runner_class(self.backend)
        return cls(folder, device=self.device, dtype=self.precision, **self.runner_options).activate()

    def _graph_folder(self, latent_hw: tuple[int, int], text_shape: tuple[int, int], precision: str, build: bool) -> Path:
        """The engine directory for a shape: ``engines=``, or the cache folder, built there when ``build``.

        Raises:
            EngineMismatchError: the graphs do not fit (or, with ``build=False``, are not built).
        """
        from fd_trt.graphs.engines import build_engines, check_engine_dir

        unet = self.sd.unet
        if self.engines is not None:
            check_engine_dir(self.engines, unet, latent_size=latent_hw, text_shape=text_shape, precision=precision,
                             unet_sha256=self.unet_sha256, added_shapes=self.added_shapes())
            return self.engines
        digest = self.unet_sha256
        folder = engine_cache_root() / f"{digest[:16]}-{latent_hw[0]}x{latent_hw[1]}-t{text_shape[0]}x{text_shape[1]}-{precision}"
        if not build:
            if not (folder / "manifest.json").is_file():
                raise EngineMismatchError(f"no {precision} graphs built for latents {latent_hw} (fd-trt build --tune builds them)")
            check_engine_dir(folder, unet, latent_size=latent_hw, text_shape=text_shape, precision=precision,
                             unet_sha256=digest, added_shapes=self.added_shapes())
            return folder
        res = build_engines(
            unet,
            folder,
            latent_size=latent_hw,
            text_shape=text_shape,
            precision=precision,
            model_source=self.source,
            progress=self.progress,
            unet_sha256=digest,
            added_shapes=self.added_shapes(),
        )
        if res.built:
            logger.warning("built graphs for latents %s on first use into %s (%.1f s); they are reused from now on",
                           latent_hw, folder, res.seconds)
        return folder

    # backend="auto" ---------------------------------------------------------------------------
    #: With ``backend="auto"``: whether missing graphs may be built while tuning (``fd-trt build --tune``).
    auto_build_graphs: bool = False
    #: With ``backend="auto"``: read and write the decision cache.
    auto_use_cache: bool = True
    auto_precision: str | None = None

    def auto_candidates(self) -> list[Any]:
        """The candidates ``backend="auto"`` measures here, in order of preference on a tie."""
        from fd_trt.backends.auto import Candidate

        if self.device.type == "cuda":
            return [Candidate("tensorrt", "fp16", exact=False),
                    Candidate("torch", "fp16", exact=False, options=(("cuda_graphs", True),))]
        asked = self.auto_precision
        if asked == "bf16":
            return [Candidate("torch", "bf16", exact=False)]
        if asked == "fp16":
            return [Candidate("onnxruntime", "fp16", exact=False)]
        cands = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32")]
        if asked == "auto":
            cands.append(Candidate("torch", "bf16", exact=False))
        return cands

    def _options_for(self, cls: type) -> dict[str, Any]:
        """The pipeline's runner options that ``cls`` takes (``auto`` mixes runners with different options)."""
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return dict(self.runner_options)
        return {k: v for k, v in self.runner_options.items() if k in params}

    def _auto_runner(self, latent_hw: tuple[int, int], text_shape: tuple[int, int]) -> Runner:
        from fd_trt.graphs.engines import check_engine_dir
        from fd_trt.backends.auto import AutoRunner, Candidate, library_versions
        from fd_trt.utils.system import device_name

        if self.engines is not None:
            # An engine directory is an explicit request for its graphs: one that does not fit is an
            # error naming the rebuild command, not a candidate quietly skipped.
            check_engine_dir(self.engines, self.sd.unet, latent_size=latent_hw, text_shape=text_shape,
                             unet_sha256=self.unet_sha256, added_shapes=self.added_shapes())

        def make(cand: Candidate) -> Runner:
            cls = get_runner_class(cand.backend)
            opts = {**self._options_for(cls), **dict(cand.options)}
            if cand.backend == "torch":
                return cls(self.sd.unet, device=self.device, dtype=cand.precision, **opts)
            folder = self._graph_folder(latent_hw, text_shape, cand.precision, build=self.auto_build_graphs)
            if cand.backend == "tensorrt":
                opts.setdefault("build", self.auto_build_graphs)
            return cls(folder, device=self.device, dtype=cand.precision, **opts)

        def ready(cand: Candidate) -> bool:
            if cand.backend == "torch":
                return True
            if self.engines is not None:
                return True
            return any(engine_cache_root().glob(f"{self.unet_sha256[:16]}-{latent_hw[0]}x{latent_hw[1]}-*-{cand.precision}/manifest.json"))

        def base_key() -> dict[str, Any]:
            return {
                # 2: onnxruntime stopped spinning on CPU, so format-1 costs no longer hold.
                # 3: the torch decoder convolves repeated skips once per distinct row (faster).
                # 4: so do the decoder graphs (engine format 2).
                # 5: ... only for UNets at least 96 channels wide (torch too; fd_trt.graphs.split.decoder_shares_rows).
                "format": 5,
                "unet_sha256": self.unet_sha256,
                "device": device_name(self.device),
                "device_type": self.device.type,
                "threads": torch.get_num_threads(),
                "versions": dict(library_versions()),
                "runner_options": {k: repr(v) for k, v in sorted(self.runner_options.items())},
                "engines": str(self.engines) if self.engines is not None else None,
            }

        c = int(self.sd.unet.config.in_channels)
        return AutoRunner(self.auto_candidates(), make, (c, *latent_hw), text_shape, base_key, device=self.device,
                          ready=ready, use_cache=self.auto_use_cache, added_shapes=self.added_shapes())


    def _retire(self, runner: Runner) -> None:
        """Closes a runner now, or when the last call that uses it ends."""
        if self._in_use.get(id(runner), 0) > 0:
            self._retired[id(runner)] = runner
        else:
            runner.deactivate()

    @contextlib.contextmanager
    def _using(self, latent_hw: tuple[int, int], text_shape: tuple[int, int]) -> Any:
        """The runner for a shape, held in use (never closed by eviction) until the block ends."""
        with self._cache_lock:  # one critical section: no eviction between lookup and hold
            runner = self._runner_for(latent_hw, text_shape)
            self._in_use[id(runner)] = self._in_use.get(id(runner), 0) + 1
        try:
            yield runner
        finally:
            with self._cache_lock:
                self._in_use[id(runner)] -= 1
                if self._in_use[id(runner)] == 0:
                    del self._in_use[id(runner)]
                    retired = self._retired.pop(id(runner), None)
                    if retired is not None:
                        retired.deactivate()

    def text_shape(self) -> tuple[int, int]:
        """``(L, D)`` of the prompt embeddings this pipeline's text encoder produces."""
        return int(self.sd.tokenizer.model_max_length), int(self.sd.text_encoder.config.hidden_size)

    def added_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Per-row shapes of the UNet's added conditioning (SDXL's), ``None`` for SD 1.x/2.x."""
        return None

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
        self._check_weights()
        with self._cache_lock:
            saved, self.build_on_demand = self.build_on_demand, True
            try:
                return self._runner_for((height // f, width // f), self.text_shape())
            finally:
                self.build_on_demand = saved

    def prepared_sizes(self) -> list[tuple[int, int]]:
        """Image sizes ``(height, width)`` with a loaded graph runner, least recently used first."""
        f = self.vae_scale_factor
        with self._cache_lock:
            return [(k[0] * f, k[1] * f) for k in self._runners]

    # schedules --------------------------------------------------------------------------------
    def calibration_folders(self) -> list[Path]:
        """Where ``schedule="calibrated"`` looks: the engine directory, then the model folder."""
        return [f for f in (self.engines, self.model_dir) if f is not None]

    def resolve_schedule(self, schedule: Any, num_inference_steps: int, scheduler: str | None = None) -> Any:
        """Turns ``None``, ``"calibrated"``, a calibration path or object into key steps.

        Other specs are returned unchanged for :func:`fd_trt.core.schedule.parse_schedule`.

        Args:
            schedule: the call's ``schedule``.
            num_inference_steps: the call's step count.
            scheduler: the scheduler's short name; the pipeline's current scheduler by default.

        Raises:
            ScheduleError: when no calibration matches, or one was made for another model,
                scheduler or step count.
        """
        from fd_trt.core.calibration import Calibration, find_calibration
        from fd_trt.errors import ScheduleError
        from fd_trt.families.models import scheduler_name

        name = scheduler or scheduler_name(self.sd.scheduler)
        if schedule is None or (isinstance(schedule, str) and schedule.strip().lower() == "calibrated"):
            path = find_calibration(self.calibration_folders(), name, num_inference_steps) if name else None
            if path is None:
                if schedule is None:
                    return "paper"
                where = ", ".join(str(f) for f in self.calibration_folders()) or "no model folder or engine directory"
                raise ScheduleError(
                    f"schedule='calibrated' but no calibration for {name or type(self.sd.scheduler).__name__}-"
                    f"{num_inference_steps} is saved in {where}: run fd-trt calibrate --model MODEL --scheduler "
                    f"{name or 'ddim'} --steps {num_inference_steps} --key-steps 9 --save, or pass a calibration "
                    "JSON path as schedule"
                )
            cal = Calibration.load(path)
            if schedule is None:
                try:
                    cal.check(model_sha256=self.unet_sha256, scheduler=name, steps=num_inference_steps, where=str(path))
                except ScheduleError as exc:
                    logger.info("not using the saved calibration: %s", exc)
                    return "paper"
                return list(cal.key_steps)
            schedule = cal
        elif isinstance(schedule, (str, os.PathLike)) and str(schedule).lower().endswith(".json"):
            schedule = Calibration.load(schedule)
        if isinstance(schedule, Calibration):
            schedule.check(model_sha256=self.unet_sha256, scheduler=name, steps=num_inference_steps)
            return list(schedule.key_steps)
        return schedule

    # LoRA -------------------------------------------------------------------------------------
    # diffusers' own LoRA calls on the wrapped pipeline (PEFT backend). They change the UNet's
    # effective weights; the next call notices (see _check_weights) and every backend follows:
    # torch at once, onnxruntime by rebuilding its graphs, TensorRT by refitting its plans.
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                          **kwargs: Any) -> None:
        """diffusers' ``load_lora_weights``: a local LoRA file or folder (safetensors), or a state dict."""
        self.sd.load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """diffusers' ``set_adapters``: which LoRA adapters are active, at which scales."""
        self.sd.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0, **kwargs: Any) -> None:
        """diffusers' ``fuse_lora``: merges the active adapters into the base weights."""
        self.sd.fuse_lora(lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, **kwargs: Any) -> None:
        """diffusers' ``unfuse_lora``."""
        self.sd.unfuse_lora(**kwargs)

    def disable_lora(self) -> None:
        """diffusers' ``disable_lora``: the base model, adapters kept."""
        self.sd.disable_lora()

    def enable_lora(self) -> None:
        """diffusers' ``enable_lora``."""
        self.sd.enable_lora()

    def unload_lora_weights(self) -> None:
        """diffusers' ``unload_lora_weights``: removes every adapter."""
        self.sd.unload_lora_weights()

    # weights ----------------------------------------------------------------------------------
    @property
    def unet_sha256(self) -> str:
        """sha256 of the UNet's effective weights (parameters, fused LoRA, active adapters and scales)."""
        from fd_trt.graphs.engines import unet_weights_sha256

        if self._unet_sha256 is None:
            self._unet_sha256 = unet_weights_sha256(self.sd.unet)
        return self._unet_sha256

    def refresh_weights(self) -> None:
        """Makes every runner take the UNet's weights now, whatever the cheap fingerprint says.

        For changes that :func:`fd_trt.graphs.engines.weights_fingerprint` cannot see (a few elements
        written through ``.data`` between its samples, with no counter bumped).
        """
        with self._cache_lock:
            self._weights_fp = ("refresh",)
        self._check_weights()

    def _check_weights(self) -> None:
        """Notices a weight change since the last call and makes every runner follow it.

        A cheap fingerprint (:func:`fd_trt.graphs.engines.weights_fingerprint`) is compared on every
        call. On a change, runners that can take new weights in place (torch, refittable
        TensorRT plans) are refit; graph runners that cannot are closed, so the next call
        rebuilds them (or, with ``engines=``, refuses the directory naming the rebuild command).
        """
        from fd_trt.graphs.engines import weights_fingerprint

        unet = self.sd.unet
        fp = weights_fingerprint(unet)
        with self._cache_lock:
            if fp == self._weights_fp:
                return
            first = self._weights_fp is None
            self._weights_fp = fp
            if first:
                return
            self._unet_sha256 = None
            logger.warning("the UNet's weights changed since the last call (%s): updating the %s runners",
                           self.source, self.backend)
            if self._fixed_runner is not None:
                if not self._fixed_runner.refit(unet):
                    raise EngineMismatchError(
                        f"the UNet's weights changed, and the {self._fixed_runner.name} runner passed to this pipeline "
                        "cannot take new weights: create a new runner (or pass backend='torch')"
                    )
                return
            for key, runner in list(self._runners.items()):
                if not runner.refit(unet):
                    del self._runners[key]
                    self._retire(runner)

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = "default",
        backend: str | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        scheduler: str | None = None,
        progress: bool = True,
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "FasterDiffusionPipeline":
        """Loads a local diffusers Stable Diffusion or SDXL folder, or ``"default"``.

        The folder's ``unet/config.json`` is checked before any weights load: a UNet the split
        cannot carry raises :class:`~fd_trt.errors.UnsupportedModelError` at once. An SDXL
        folder (``addition_embed_type="text_time"``) returns a
        :class:`~fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline`.

        Args:
            model: a local folder, or ``"default"`` (the shipped model).
            backend: ``"auto"`` (default), ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``. ``auto``
                measures the available backends and decoder call sizes on the first call at each
                shape, batch and schedule, caches the choice, and never builds graphs by surprise.
            device: ``"cpu"`` or ``"cuda"``; CUDA when available by default.
            precision: ``fp32``, ``fp16`` or ``bf16`` (torch); ``fp32`` or ``fp16`` (graphs);
                ``auto`` with ``backend="auto"`` (bf16 may compete). Default: ``fp16`` for
                ``tensorrt`` and on CUDA, ``fp32`` otherwise.
            scheduler: ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``; the folder's own when omitted.
            progress: show progress bars.
            engines: a built engine directory (``fd-trt build``) for graph backends. Without one,
                graphs are built on first use into ``$FD_TRT_CACHE`` (``~/.cache/fd_trt/engines``),
                keyed by the UNet weights' hash and the shapes, and reused afterwards.
            runner_options: extra keyword arguments for the runner (e.g. ``intra_op_threads``).
            **kwargs: ``max_cached_runners``, ``build_on_demand``, ``controlnet`` (see the class;
                here ``controlnet`` may also be a local ControlNet folder or a list of folders).
        """
        sd, source = load_diffusers_pipeline(model)
        pipe = cls._class_for(sd)(sd, backend=backend, device=device, precision=precision, progress=progress, source=source,
                   engines=engines, runner_options=runner_options, owns_pipeline=True, **kwargs)
        from fd_trt.families.models import default_model_dir

        pipe.model_dir = default_model_dir() if str(model) == "default" else Path(model)
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe

    @classmethod
    def from_diffusers(
        cls,
        sd_pipeline: Any,
        backend: str | Runner | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        progress: bool = True,
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "FasterDiffusionPipeline":
        """Wraps an existing diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``
        (the latter as a :class:`~fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline`), sharing its
        components.

        The img2img, inpainting and ControlNet pipelines of Stable Diffusion wrap the same way; a
        ``StableDiffusionControlNetPipeline``'s ControlNet is taken along and run at key steps.

        The wrapped pipeline is neither moved nor cast: ``device`` defaults to where it is, and a
        runner that needs another dtype or device works on its own copy of the UNet. Weight changes
        made to it later (``fuse_lora``, ``set_adapters``, ``load_state_dict``) are followed.

        Args: as :meth:`from_pretrained`, with ``sd_pipeline`` in place of ``model``.
        """
        return cls._class_for(sd_pipeline)(sd_pipeline, backend=backend, device=device, precision=precision,
                                           progress=progress, engines=engines, runner_options=runner_options, **kwargs)

    def set_scheduler(self, name: str) -> None:
        """Swaps the scheduler for ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``, keeping the betas."""
        self.sd.scheduler = make_scheduler(name, self.sd.scheduler.config)

    @property
    def scheduler(self) -> Any:
        return self.sd.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return int(self.sd.vae_scale_factor)

    def close(self) -> None:
        """Deactivates every runner this pipeline started."""
        with self._cache_lock:
            for r in [*self._runners.values(), *([self._fixed_runner] if self._fixed_runner else [])]:
                r.deactivate()
            self._runners.clear()

    def __enter__(self) -> "FasterDiffusionPipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # call -------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        height: Any,
        width: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        output_type: Any,
    ) -> list[str]:
        """Validates the call's arguments and returns the prompts as a list.

        Raises:
            InputError: naming the bad value and what is expected.
        """
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None:
            if isinstance(negative_prompt, (list, tuple)):
                if len(negative_prompt) != len(prompts):
                    raise InputError(
                        f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one negative "
                        "prompt per prompt, or a single string for all"
                    )
                if not all(isinstance(p, str) for p in negative_prompt):
                    raise InputError(f"negative prompts must be strings, got {negative_prompt!r}")
            elif not isinstance(negative_prompt, str):
                raise InputError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
            if v % f != 0:
                raise InputError(
                    f"{name}={v} is not divisible by the VAE factor {f}: use a multiple of {f}, e.g. {max(f, v // f * f)}"
                )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise InputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt <= 0:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        return prompts

    # image inputs ---------------------------------------------------------------------------
    def image_mode(self, image: Any, mask_image: Any, strength: Any) -> str:
        """What a call does with its images: ``text2img``, ``img2img``, ``inpaint`` or ``controlnet``.

        Raises:
            InputError: for image arguments that do not fit the model (a mask without an image, a
                ControlNet without a conditioning image, an inpainting UNet without a mask).
        """
        if mask_image is not None and image is None:
            raise InputError("mask_image needs image=: the image to inpaint")
        if self.controlnet is not None:
            if image is None:
                raise InputError("this pipeline has a ControlNet: pass its conditioning image as image=")
            if mask_image is not None or strength is not None:
                raise InputError(
                    "with a ControlNet, image= is the conditioning image; ControlNet img2img and inpainting "
                    "(mask_image=, strength=) are not supported yet"
                )
            return "controlnet"
        if self.unet_kind == "inpaint":
            if image is None or mask_image is None:
                raise InputError("this is an inpainting UNet (9 input channels): pass image= and mask_image=")
            return "inpaint"
        if mask_image is not None:
            return "inpaint"
        if image is not None:
            return "img2img"
        if strength is not None:
            raise InputError("strength= needs image=: the image to start from")
        return "text2img"

    @staticmethod
    def resolve_strength(mode: str, strength: Any) -> float:
        """``strength`` checked, or diffusers' default: 0.8 for img2img, 1.0 for inpainting.

        Raises:
            InputError: for a value outside [0, 1].
        """
        if strength is None:
            return 1.0 if mode == "inpaint" else 0.8
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be a number in [0, 1], got {strength!r}")
        return float(strength)

    def _image_size(self, mode: str, image: Any) -> tuple[int, int]:
        """The image size of a call without height/width: the input image's size (rounded down to
        the VAE factor) for img2img and ControlNet, as diffusers does; the model's otherwise."""
        f = self.vae_scale_factor
        size = int(self.sd.unet.config.sample_size) * f
        if mode in ("img2img", "controlnet"):
            first = image[0] if isinstance(image, (list, tuple)) else image
            if isinstance(first, (list, tuple)):  # one list per ControlNet
                first = first[0]
            h, w = self._processor("image").get_default_height_width(first)
            return int(h), int(w)
        return size, size

    def _processor(self, kind: str) -> Any:
        """diffusers' image processors: ``image`` (VAE input), ``mask`` and ``control``."""
        from diffusers.image_processor import VaeImageProcessor

        f = self.vae_scale_factor
        if kind == "image":
            return getattr(self.sd, "image_processor", None) or VaeImageProcessor(vae_scale_factor=f)
        if kind == "mask":
            return VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        return VaeImageProcessor(vae_scale_factor=f, do_convert_rgb=True, do_normalize=False)

    def prepare_image_run(
        self,
        mode: str,
        scheduler: Any,
        num_inference_steps: int,
        latent_shape: tuple[int, int, int, int],
        height: int,
        width: int,
        *,
        image: Any,
        mask_image: Any,
        strength: float | None,
        latents: torch.Tensor | None,
        generator: Any,
        cfg: bool,
        num_images_per_prompt: int,
        controlnet_conditioning_scale: float | Sequence[float],
        control_guidance_start: float | Sequence[float],
        control_guidance_end: float | Sequence[float],
        guess_mode: bool,
        timesteps: torch.Tensor | None = None,
        options: dict[str, Any] | None = None,
    ) -> _ImageRun:
        """The sampler's inputs for img2img, inpainting and ControlNet calls.

        The random draws come in diffusers' order (image latents, noise, masked-image latents), so
        that the same generator gives the same run as diffusers' own pipelines.

        Args:
            mode: :meth:`image_mode`.
            scheduler: the call's scheduler, after ``set_timesteps``.
            num_inference_steps: the call's step count (img2img runs the last ``strength`` of them).
            latent_shape: ``[B,C,h,w]`` of the latents.
            height, width: the image size in pixels.
            image, mask_image, strength, latents, generator, num_images_per_prompt,
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode:
                the call's, as in diffusers. ``latents`` given to img2img are its noise.
            cfg: classifier-free guidance is on.
            timesteps: the steps run (:meth:`steps_to_run`); img2img's tail when omitted.
            options: all of the call's image options (model families read their own).

        Returns:
            The initial latents and, as the mode needs, the timesteps run, the unit noise, the
            extra encoder channels, the blend after each step and the ControlNet hook.
        """
        from diffusers.utils.torch_utils import randn_tensor

        dev, batch = self.device, latent_shape[0]
        sigma = float(scheduler.init_noise_sigma)

        def noise_like(shape: tuple[int, ...]) -> torch.Tensor:
            if latents is not None:
                if tuple(latents.shape) != tuple(shape):
                    raise InputError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
                return latents.to(dev, torch.float32)
            return randn_tensor(shape, generator=generator, device=dev, dtype=torch.float32)

        if mode == "controlnet":
            nets = controlnet_nets(self.controlnet)
            per_net = (isinstance(image, (list, tuple)) and len(nets) > 1 and len(image) == len(nets))
            images = list(image) if per_net else [image] * len(nets)
            guess = bool(guess_mode) or any(bool(getattr(n.config, "global_pool_conditions", False)) for n in nets)
            proc = self._processor("control")
            prepared = [
                KeyStepControlNet.prepare_image(proc, img, height, width, batch, num_images_per_prompt,
                                                next(net.parameters()).dtype, dev, cfg, guess)
                for img, net in zip(images, nets)
            ]
            control = KeyStepControlNet.build(self.controlnet, prepared, len(scheduler.timesteps),
                                              controlnet_conditioning_scale, control_guidance_start,
                                              control_guidance_end, guess_mode=guess, cfg=cfg)
            return _ImageRun(latents=noise_like(latent_shape) * sigma, control=control)

        strength = self.resolve_strength(mode, strength)
        if timesteps is None:
            timesteps, _ = img2img_steps(scheduler, num_inference_steps, strength)
        t_first = timesteps[:1].repeat(batch)
        vae = self.sd.vae
        init = self._processor("image").preprocess(image, height=height, width=width).to(dev, torch.float32)
        if init.shape[-2:] != (height, width):
            raise InputError(f"image preprocessed to {tuple(init.shape[-2:])}, expected {(height, width)}")

        if mode == "img2img":
            if isinstance(generator, list):
                init = repeat_to_batch(init, batch, "images")
            z0 = repeat_to_batch(encode_images(vae, init, generator), batch, "images")
            noise = noise_like(tuple(z0.shape))
            return _ImageRun(latents=scheduler.add_noise(z0, noise, t_first), timesteps=timesteps, initial_noise=noise)

        # Inpainting: the 9-channel UNet sees the mask and the masked image's latents; a 4-channel
        # UNet gets diffusers' blend, which keeps the unmasked image noised to each step's level.
        blend_mode = self.unet_kind != "inpaint"
        full = float(strength) == 1.0
        z0 = None
        if blend_mode or (latents is None and not full):
            z0 = encode_images(vae, init, generator)
            z0 = repeat_to_batch(z0, batch, "images")
        if latents is None:
            noise = noise_like(latent_shape)
            x = noise * sigma if full else scheduler.add_noise(z0, noise, t_first)
        else:  # as diffusers: given latents are the noise, and the run starts from them
            noise = latents.to(dev, torch.float32)
            x = noise * sigma
        mask_cond = self._processor("mask").preprocess(mask_image, height=height, width=width).to(dev, torch.float32)
        masked = init * (mask_cond < 0.5)
        mask = torch.nn.functional.interpolate(mask_cond, size=tuple(latent_shape[2:]))
        masked_latents = encode_images(vae, masked, generator)
        mask = repeat_to_batch(mask, batch, "masks")
        masked_latents = repeat_to_batch(masked_latents, batch, "images")
        run = _ImageRun(latents=x, timesteps=timesteps, initial_noise=noise)
        if blend_mode:
            run.blend = InpaintBlend(scheduler, z0, noise, mask, timesteps)
        else:
            extra = torch.cat([mask, masked_latents], dim=1)
            run.extra_channels = torch.cat([extra, extra]) if cfg else extra
        return run

    # stages -----------------------------------------------------------------------------------
    # A call runs these in order (see _generate). SD and SDXL share all of them but encode_prompt
    # and check_inputs, which SDXL extends with its second prompt and micro-conditioning.
    def steps_to_run(
        self, scheduler: Any, num_inference_steps: int, mode: str, strength: Any, options: dict[str, Any]
    ) -> torch.Tensor | None:
        """The timesteps a call runs, when not all of ``scheduler.timesteps``: img2img and
        inpainting run the last ``int(strength x steps)`` (:func:`img2img_steps`, which also tells
        the scheduler where the run begins). ``None`` runs them all.

        Raises:
            InputError: for a bad ``strength``, or one that runs no step.
        """
        if mode in ("img2img", "inpaint"):
            return img2img_steps(scheduler, num_inference_steps, self.resolve_strength(mode, strength))[0]
        return None

    def default_size(
        self, height: int | None, width: int | None, mode: str = "text2img", image: Any = None
    ) -> tuple[int, int]:
        """The image size of a call: the given one, else the input image's for img2img and
        ControlNet (as diffusers), else the UNet's default sample size."""
        if height is not None and width is not None:
            return height, width
        dh, dw = self._image_size(mode, image)
        return (height if height is not None else dh, width if width is not None else dw)

    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        height: int,
        width: int,
    ) -> PromptEmbeddings:
        """Stage 1: the text conditioning of every sampler row, negative rows first with CFG.

        Args:
            prompts: the checked prompts.
            negative_prompt: one string for all prompts, one per prompt, or ``None``.
            num_images_per_prompt: images per prompt; each prompt's rows repeat this many times.
            do_classifier_free_guidance: also encode the negative prompts.
            height, width: the image size (unused by SD; SDXL conditions on it).

        Returns:
            :class:`PromptEmbeddings` with ``text [R,L,D]``, R = (2 if CFG else 1) x images.
        """
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        pos, neg = self.sd.encode_prompt(prompts, self.device, num_images_per_prompt, do_classifier_free_guidance, negatives)
        return PromptEmbeddings(text=torch.cat([neg, pos]) if do_classifier_free_guidance else pos)

    def prepare_timesteps(self, num_inference_steps: int) -> Any:
        """A copy of the scheduler with its timesteps set: each call owns its solver state."""
        scheduler = copy.deepcopy(self.sd.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    def prepare_schedule(
        self, schedule: Any, noise_injection: bool | NoiseInjection | None, num_inference_steps: int, num_steps: int
    ) -> tuple[KeySchedule, NoiseInjection]:
        """The call's key steps and noise-injection policy (see ``__call__`` for the arguments)."""
        key_schedule: KeySchedule = parse_schedule(self.resolve_schedule(schedule, num_inference_steps), num_steps)
        if isinstance(noise_injection, NoiseInjection):
            return key_schedule, noise_injection
        enabled = key_schedule.propagates if noise_injection is None else bool(noise_injection)
        return key_schedule, NoiseInjection(enabled=enabled)

    def prepare_latents(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        scheduler: Any,
    ) -> torch.Tensor:
        """Stage 2: the initial latents x_T, float32, scaled by the scheduler's ``init_noise_sigma``.

        Raises:
            InputError: when given latents do not have the shape of ``batch`` images of the size.
        """
        f = self.vae_scale_factor
        shape = (batch, int(self.sd.unet.config.out_channels), height // f, width // f)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise InputError(
                    f"latents have shape {tuple(latents.shape)}, expected {shape} for {batch} images of {height}x{width}"
                )
            latents = latents.to(self.device, torch.float32)
        return latents * scheduler.init_noise_sigma

    def denoise(
        self,
        scheduler: Any,
        latents: torch.Tensor,
        cond: PromptEmbeddings,
        key_schedule: KeySchedule,
        *,
        guidance_scale: float,
        noise: NoiseInjection,
        parallel: bool,
        max_decoder_rows: int | None,
        extra_step_kwargs: dict[str, Any],
        callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None,
        stats: SamplerStats,
        guidance_rescale: float = 0.0,
        image_run: _ImageRun | None = None,
    ) -> tuple[torch.Tensor, Runner]:
        """Stage 3: the Faster Diffusion sampler on the runner for this latent and text shape.

        ``image_run`` (img2img, inpainting, ControlNet) gives the steps run, the unit noise, the
        extra encoder channels and the key-step ControlNet hook.

        Returns:
            ``(final latents, the runner that ran)``.
        """
        text = cond.text
        with self._using((int(latents.shape[2]), int(latents.shape[3])), (int(text.shape[1]), int(text.shape[2]))) as runner:
            control = image_run.control if image_run is not None else None
            if control is not None:
                control.resolve_runners = functools.partial(self._controlnet_calls, runner)
            inputs = SamplerInputs(
                text,
                added=cond.added,
                extra_channels=image_run.extra_channels if image_run is not None else None,
                control=control,
                initial_noise=image_run.initial_noise if image_run is not None else None,
            )
            opts = SamplerOptions(
                guidance_scale=float(guidance_scale),
                guidance_rescale=float(guidance_rescale),
                noise=noise,
                parallel=parallel,
                max_decoder_rows=max_decoder_rows,
                extra_step_kwargs=extra_step_kwargs,
                timesteps=image_run.timesteps if image_run is not None else None,
                progress=self.progress,
            )
            x0 = run_sampler(runner, scheduler, latents, inputs, key_schedule, opts, callback=callback, stats=stats)
        return x0, runner

    def controlnet_sha256(self, net: Any) -> str:
        """sha256 of a ControlNet's weights (:func:`fd_trt.graphs.engines.unet_weights_sha256`), cached
        until its weights fingerprint changes."""
        from fd_trt.graphs.engines import unet_weights_sha256, weights_fingerprint

        fp = weights_fingerprint(net)
        known = self._controlnet_digests.get(id(net))
        if known is None or known[0] != fp:
            known = self._controlnet_digests[id(net)] = (fp, unet_weights_sha256(net))
        return known[1]

    def _controlnet_calls(self, runner: Runner) -> list[Any] | None:
        """The ControlNet graphs on ``runner`` (the one ``auto`` chose), one per ControlNet, or
        ``None`` when it runs no graphs (torch): the ControlNets then run as torch modules.

        Each graph is exported into the runner's engine directory on first use when
        ``build_on_demand`` is on, and checked against the ControlNet's weights otherwise.

        Raises:
            EngineMismatchError: with ``build_on_demand`` off, for a missing or stale graph.
            UnsupportedModelError: for a ControlNet the graph cannot carry.
        """
        from fd_trt.graphs.engines import build_controlnet_graph, check_controlnet_graph

        target = getattr(runner, "current_runner", runner) or runner
        folder = getattr(target, "engine_dir", None)
        if folder is None or type(target).controlnet is Runner.controlnet:
            return None
        calls = []
        for net in controlnet_nets(self.controlnet):
            sha = self.controlnet_sha256(net)
            if self.build_on_demand:
                rec = build_controlnet_graph(net, folder, controlnet_sha256=sha, progress=self.progress)
            else:
                rec = check_controlnet_graph(folder, net, controlnet_sha256=sha)
            calls.append(target.controlnet(rec))
        return calls

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Stage 4: the VAE decode and diffusers' post-processing into ``output_type``."""
        if output_type == "latent":
            return latents
        vae = self.sd.vae
        z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)
        image = vae.decode(z, return_dict=False)[0]
        return self.sd.image_processor.postprocess(
            image.float(), output_type=output_type, do_denormalize=[True] * int(latents.shape[0])
        )

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        schedule: ScheduleSpec | Any | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_rescale: float = 0.0,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
    ) -> FasterDiffusionOutput:
        """Generates images.

        Args:
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
            num_images_per_prompt, eta, generator, latents, output_type, guidance_rescale: as in
                diffusers' ``StableDiffusionPipeline``.
            schedule: key steps: ``"paper"``, ``"all"``, ``"uniform:N"``, a list of step indices,
                ``"calibrated"`` (the calibration saved with the model or engine directory for this
                scheduler and step count), a calibration JSON path or a
                :class:`~fd_trt.tools.calibrate.Calibration`. ``None`` (default): ``calibrated`` when a
                matching calibration is saved with the model, otherwise ``paper``.
            noise_injection: prior noise injection on (``True``), off (``False``), a
                :class:`NoiseInjection`, or ``None`` for on exactly when the schedule propagates
                features (so ``schedule="all"`` reproduces plain diffusers).
            parallel: decode the steps of a segment in one batched call.
            max_decoder_rows: cap on rows per decoder call (a memory cap).
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs) -> dict``, called after
                every scheduler step, including the steps inside a batched segment. A ``"latents"``
                entry in the returned dict replaces the latents.
            callback_on_step_end_tensor_inputs: keys passed in ``callback_kwargs``; only ``"latents"``.
            image: img2img's input image; with ``mask_image``, the image to inpaint; with a
                ControlNet, its conditioning image (one per ControlNet, or one for all). A PIL image,
                array, tensor or list, as in diffusers. Without height/width, img2img and
                ControlNet calls take the image's size.
            mask_image: inpainting mask, white where the image is repainted. A 9-channel
                inpainting UNet gets the mask and the masked image's latents as input channels; a
                text-to-image UNet gets diffusers' latent blend after every step.
            strength: img2img / inpainting: the run covers the last ``int(strength x
                num_inference_steps)`` steps, starting from the image noised to the first of them
                (default 0.8 for img2img, 1.0 for inpainting). The schedule's key steps index the
                steps run: ``paper`` with 50 steps and strength 0.6 runs 30 steps, key steps
                {0,1,2,3,5,10,15,25}.
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            guess_mode: as in diffusers' ``StableDiffusionControlNetPipeline``. The ControlNet runs
                at key steps only; a guidance window's edge becomes a key step, so that no segment
                mixes steps inside and outside it.

        Returns:
            :class:`FasterDiffusionOutput` with ``images`` and ``stats``.
        """
        return self._generate(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta,
            generator, latents, output_type, schedule, noise_injection, parallel, max_decoder_rows,
            callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_options={},
            guidance_rescale=guidance_rescale,
            image_options=dict(
                image=image, mask_image=mask_image, strength=strength,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                guess_mode=guess_mode,
            ),
        )

    def _generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        schedule: ScheduleSpec | Any | None,
        noise_injection: bool | NoiseInjection | None,
        parallel: bool,
        max_decoder_rows: int | None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
        prompt_options: dict[str, Any],
        guidance_rescale: float = 0.0,
        image_options: dict[str, Any] | None = None,
    ) -> FasterDiffusionOutput:
        """The stages of a call, in order. ``prompt_options`` are the model family's own prompt
        arguments (SDXL's second prompts and micro-conditioning), passed to ``check_inputs`` and
        ``encode_prompt``; ``image_options`` the image arguments of ``__call__`` (``image``,
        ``mask_image``, ``strength`` and the ControlNet's)."""
        t_start = time.perf_counter()
        # 0. Check the inputs.
        opts = dict(image_options or {})
        image, mask_image, strength = opts.get("image"), opts.get("mask_image"), opts.get("strength")
        mode = self.image_mode(image, mask_image, strength)
        height, width = self.default_size(height, width, mode, image)
        prompts = self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
            output_type, **prompt_options,
        )
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or not (
            math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0
        ):
            raise InputError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        bad_keys = [k for k in callback_on_step_end_tensor_inputs if k != "latents"]
        if bad_keys:
            raise InputError(f"callback_on_step_end_tensor_inputs supports only 'latents', got {bad_keys}")
        batch = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise InputError(f"{len(generator)} generators for {batch} images: pass one generator per image, or one")
        cfg = guidance_scale > 1.0
        scheduler = self.prepare_timesteps(num_inference_steps)
        num_steps = len(scheduler.timesteps)
        # The steps run when not all of the schedule's (img2img's tail, SDXL's denoising_start/end).
        run_timesteps = self.steps_to_run(scheduler, num_inference_steps, mode, strength, opts)
        if run_timesteps is not None:
            num_steps = len(run_timesteps)
        self._check_weights()  # before the calibration check, which compares the weights hash
        # An img2img run has fewer steps than asked; a calibration must be for the steps run.
        cal_steps = num_inference_steps if num_steps == len(scheduler.timesteps) else num_steps
        key_schedule, noise = self.prepare_schedule(schedule, noise_injection, cal_steps, num_steps)
        seconds = {"text_encoder": 0.0, "encoder": 0.0, "controlnet": 0.0, "decoder": 0.0, "scheduler": 0.0, "vae": 0.0,
                   "total": 0.0}

        # 1. Encode the prompts.
        t0 = time.perf_counter()
        cond = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, cfg, height, width, **prompt_options)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the text encoder's kernels are queued, not done
        seconds["text_encoder"] = time.perf_counter() - t0

        # 2. Prepare the latents x_T (img2img: the noised image latents) and the scheduler's step arguments.
        image_run: _ImageRun | None = None
        if mode == "text2img":
            latents = self.prepare_latents(batch, height, width, generator, latents, scheduler)
            if run_timesteps is not None:  # a head of the schedule (SDXL's denoising_end)
                image_run = _ImageRun(latents=latents, timesteps=run_timesteps)
        else:
            f = self.vae_scale_factor
            latent_shape = (batch, int(self.sd.unet.config.out_channels), height // f, width // f)
            image_run = self.prepare_image_run(
                mode, scheduler, num_inference_steps, latent_shape, height, width, image=image, mask_image=mask_image,
                strength=strength, latents=latents, generator=generator, cfg=cfg,
                num_images_per_prompt=num_images_per_prompt,
                controlnet_conditioning_scale=opts.get("controlnet_conditioning_scale", 1.0),
                control_guidance_start=opts.get("control_guidance_start", 0.0),
                control_guidance_end=opts.get("control_guidance_end", 1.0),
                guess_mode=bool(opts.get("guess_mode", False)),
                timesteps=run_timesteps, options=opts,
            )
            latents = image_run.latents
            if image_run.control is not None and image_run.control.window_edges():
                keys = with_key_steps(key_schedule.key_steps, image_run.control.window_edges())
                key_schedule = KeySchedule(tuple(keys), num_steps)
        extra: dict[str, Any] = {}
        step_params = set(inspect.signature(scheduler.step).parameters)
        if "eta" in step_params:
            extra["eta"] = eta
        if "generator" in step_params:
            extra["generator"] = generator

        # 3. Denoise with encoder propagation.
        cb = None
        blend = image_run.blend if image_run is not None else None
        if callback_on_step_end is not None or blend is not None:

            def cb(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
                if blend is not None:  # diffusers blends before the user's callback sees the latents
                    x = blend(i, t, x)
                if callback_on_step_end is None:
                    return x
                out = callback_on_step_end(self, i, t, {"latents": x})
                return out.get("latents", x) if isinstance(out, dict) else x

        sstats = SamplerStats()
        x0, runner = self.denoise(
            scheduler, latents, cond, key_schedule, guidance_scale=float(guidance_scale), noise=noise,
            parallel=parallel, max_decoder_rows=max_decoder_rows, extra_step_kwargs=extra, callback=cb, stats=sstats,
            guidance_rescale=float(guidance_rescale),
            image_run=image_run,
        )
        seconds.update(sstats.seconds)
        nonfinite = not bool(torch.isfinite(x0).all())
        if nonfinite:
            msg = (
                f"the final latents contain NaN or Inf (backend {runner.name}, precision {runner.dtype}); "
                "the images are invalid. Try fp32, or bf16 instead of fp16."
            )
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)  # the caller of __call__

        # 4. Decode with the VAE.
        t0 = time.perf_counter()
        images = self.decode_latents(x0, output_type)
        seconds["vae"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        stats = self._stats(x0, cond, key_schedule, sstats, seconds, runner, nonfinite)
        if image_run is not None and image_run.control is not None:
            stats.controlnet_calls = image_run.control.calls
        return FasterDiffusionOutput(images=images, stats=stats, latents=x0)

    def _stats(
        self,
        x0: torch.Tensor,
        cond: PromptEmbeddings,
        key_schedule: KeySchedule,
        sstats: SamplerStats,
        seconds: dict[str, float],
        runner: Runner,
        nonfinite: bool,
    ) -> PipelineStats:
        widths = {k: int(v.shape[1]) for k, v in cond.added.items()} if cond.added else None
        unet_in = (int(self.sd.unet.config.in_channels), *x0.shape[2:])  # 9 channels for an inpainting UNet
        enc_f, dec_f = self._flops.per_row(
            self.sd.unet, unet_in, (int(cond.text.shape[1]), int(cond.text.shape[2])), widths
        )
        return PipelineStats(
            num_steps=key_schedule.num_steps,
            key_steps=list(key_schedule.key_steps),
            encoder_calls=sstats.encoder_calls,
            encoder_rows=sstats.encoder_rows,
            decoder_calls=sstats.decoder_calls,
            decoder_rows=sstats.decoder_rows,
            unet_gflops=(sstats.encoder_rows * enc_f + sstats.decoder_rows * dec_f) / 1e9,
            seconds=seconds,
            backend=runner.name,
            nonfinite=nonfinite,
        )


__all__ = ["FasterDiffusionPipeline", "FasterDiffusionOutput", "PipelineStats", "PromptEmbeddings"]
