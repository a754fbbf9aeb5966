"""FasterDiffusionPipeline: text encoding, latents, the sampler, VAE decode, images.

It wraps a diffusers pipeline for the text encoder, tokenizer, VAE and image post-processing, and
replaces the UNet loop with [`fd_trt.core.sampler.run_sampler()`][fd_trt.core.sampler.run_sampler] on a backend runner.
``__call__`` takes the arguments of diffusers' ``StableDiffusionPipeline`` plus ``schedule``,
``noise_injection``, ``parallel`` and ``max_decoder_rows``.

What differs between model families (how a model is recognised and refused, its text and added
conditioning shapes, how its prompts are encoded, whether it runs a ControlNet) is asked of the
wrapped model's family ([`fd_trt.families`][fd_trt.families]); which class serves a family is
[`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]'s table. This module imports no family's pipeline class.

The class holds construction, the stages of a call (check the inputs, encode the prompt, prepare
the latents, denoise, decode; see ``_generate``) and thin public methods. The rest lives next to
it: the runners and the weights they carry in [`runner_pool`][fd_trt.pipelines.runner_pool], image inputs
(img2img, inpainting, ControlNet) in [`image`][fd_trt.pipelines.image], LoRA in
[`lora`][fd_trt.pipelines.lora], key-step schedules and calibrations in
[`key_steps`][fd_trt.pipelines.key_steps], argument checks in [`inputs`][fd_trt.pipelines.inputs].
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fd_trt.core.runner import Runner, same_device
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, SamplerStats, StepCallback, run_sampler
from fd_trt.core.schedule import DecoderSchedule, KeySchedule, NoiseInjection, ScheduleSpec, with_keys
from fd_trt.errors import InputError
from fd_trt.families.base import ModelFamily, PromptEmbeddings, family_for_pipeline
from fd_trt.families.models import make_scheduler
from fd_trt.graphs.contract import FLOAT32_INPUTS
from fd_trt.graphs.split import split_unet
from fd_trt.pipelines.conditioning import with_key_steps
from fd_trt.pipelines.image import ImageInputsMixin, ImageRun
from fd_trt.pipelines.inputs import InputChecksMixin, check_call_options
from fd_trt.pipelines.key_steps import KeyStepsMixin
from fd_trt.pipelines.loading import LoadingMixin
from fd_trt.pipelines.lora import LoraMixin
from fd_trt.pipelines.registry import pipeline_class_for
from fd_trt.pipelines.runner_pool import PreparedSizesMixin, RunnerPool, resolve_backend
from fd_trt.pipelines.token_merging import apply_token_merging, check_token_merging, set_token_merging_size
from fd_trt.utils.flops import flop_counter_mode

#: The name [`fd_trt.pipelines.sdxl`][fd_trt.pipelines.sdxl] imports [`ImageRun`][fd_trt.pipelines.image.ImageRun] by.
_ImageRun = ImageRun

logger = logging.getLogger(__name__)


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
        shallow_calls, shallow_rows: shallow decoder work (``deepcache:N``, ``combined:...``
            schedules); ``unet_gflops`` does not count it (the decoder's last up layers only).
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
    shallow_calls: int = 0
    shallow_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FasterDiffusionOutput:
    """Output of [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline].

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
                added = {
                    k: torch.zeros((1, w), device=p.device, dtype=torch.float32 if k in FLOAT32_INPUTS else p.dtype)
                    for k, w in added_widths.items()
                }
            try:
                # Shapes only: under FakeTensorMode no arithmetic runs, so counting costs a fraction
                # of a real call (sd15-arch at 256x256: 2.4 s against 11.9 s on a 2-core CPU).
                self.cache[key] = _count_split_flops(split, x, t, e, added, fake=True)
            except Exception as exc:  # an operator without a fake kernel: count on real tensors
                logger.debug("FLOP counting on fake tensors failed (%s); counting on real ones", exc)
                self.cache[key] = _count_split_flops(split, x, t, e, added, fake=False)
        return self.cache[key]


def _count_split_flops(
    split: Any, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, added: Any, fake: bool
) -> tuple[float, float]:
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


def call_stats(
    pipe: Any,
    x0: torch.Tensor,
    cond: PromptEmbeddings,
    key_schedule: KeySchedule,
    sstats: SamplerStats,
    seconds: dict[str, float],
    runner: Runner,
    nonfinite: bool,
) -> PipelineStats:
    """The [`PipelineStats`][fd_trt.pipelines.pipeline.PipelineStats] of a call: the sampler's counters, and the UNet FLOPs they amount to."""
    widths = {k: int(v.shape[1]) for k, v in cond.added.items()} if cond.added else None
    unet_in = (int(pipe.sd.unet.config.in_channels), *x0.shape[2:])  # 9 channels for an inpainting UNet
    enc_f, dec_f = pipe._flops.per_row(
        pipe.sd.unet, unet_in, (int(cond.text.shape[1]), int(cond.text.shape[2])), widths
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
        shallow_calls=sstats.shallow_calls,
        shallow_rows=sstats.shallow_rows,
    )


def prepare_shallow_graphs(
    unet: Any, runner: Runner, schedule: DecoderSchedule, rows: int, options: SamplerOptions
) -> None:
    """Exports the shallow decoder graphs a decoder schedule needs into the engine directory of
    the graph runner that will run it (``auto`` plans first to know which), on first use; the
    tensorrt runner builds its plans of them on its first call."""
    target = runner
    if hasattr(runner, "current_runner"):
        runner.plan(schedule, rows, options.parallel, options.max_decoder_rows)
        target = getattr(runner, "current_runner", None) or runner
    engine_dir = getattr(target, "engine_dir", None)
    if engine_dir is None or getattr(target, "name", "") not in ("onnxruntime", "tensorrt"):
        return
    from fd_trt.graphs.shallow import build_shallow_graphs

    for depth in sorted({d for d in schedule.depths if d}):
        build_shallow_graphs(unet, engine_dir, depth)


def scheduler_step_kwargs(scheduler: Any, eta: float, generator: Any) -> dict[str, Any]:
    """``eta`` and ``generator`` for ``scheduler.step``, where it takes them."""
    params = set(inspect.signature(scheduler.step).parameters)
    extra: dict[str, Any] = {}
    if "eta" in params:
        extra["eta"] = eta
    if "generator" in params:
        extra["generator"] = generator
    return extra


def step_callback(
    pipe: Any,
    blend: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None,
) -> StepCallback | None:
    """The sampler's step callback: the inpainting blend, then the user's ``callback_on_step_end``
    (diffusers blends before the user's callback sees the latents); ``None`` when there is neither."""
    if callback_on_step_end is None and blend is None:
        return None

    def cb(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if blend is not None:
            x = blend(i, t, x)
        if callback_on_step_end is None:
            return x
        out = callback_on_step_end(pipe, i, t, {"latents": x})
        return out.get("latents", x) if isinstance(out, dict) else x

    return cb


def warn_nonfinite(x0: torch.Tensor, runner: Runner) -> bool:
    """Whether the final latents hold NaN or Inf; warns (to the caller of ``__call__``) when they do."""
    if bool(torch.isfinite(x0).all()):
        return False
    msg = (
        f"the final latents contain NaN or Inf (backend {runner.name}, precision {runner.dtype}); "
        "the images are invalid. Try fp32, or bf16 instead of fp16."
    )
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=5)  # here, _generate, __call__, inference_mode, the caller
    return True


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _place_pipeline(sd: Any, device: str | torch.device | None, owns_pipeline: bool) -> torch.device:
    """The device a pipeline runs on: ``device`` (CUDA when available by default), where a pipeline
    it owns is moved; a wrapped one stays where it is, and ``device`` must name that place.

    Raises:
        InputError: for a wrapped pipeline on another device than ``device``.
    """
    here = _pipeline_device(sd)
    if owns_pipeline:
        target = torch.device(device or default_device())
        sd.to(target)
        return target
    # The caller's pipeline stays where it is: moving it would change their object.
    target = torch.device(device) if device is not None else here
    if not same_device(target, here):
        raise InputError(
            f"the diffusers pipeline is on {here} but device={str(device)!r} was asked for: move it first "
            f"(sd_pipeline.to({str(device)!r})) or leave device unset; fd_trt does not move a pipeline it wraps"
        )
    return target


def _pipeline_device(sd: Any) -> torch.device:
    """Where a diffusers pipeline's UNet lives."""
    try:
        return next(sd.unet.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class FasterDiffusionPipeline(
    LoadingMixin, LoraMixin, InputChecksMixin, ImageInputsMixin, KeyStepsMixin, PreparedSizesMixin
):
    """Stable Diffusion with Faster Diffusion's encoder propagation on a chosen backend.

    It serves Stable Diffusion 1.x/2.x and every registered model family ([`fd_trt.families`][fd_trt.families])
    without a pipeline class of its own ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]): the wrapped model's
    family (`family`) checks it and encodes its prompts.

    Args:
        sd_pipeline: a diffusers ``StableDiffusionPipeline``, or the diffusers pipeline of another
            registered family (its components are used, not copied).
        backend: ``"auto"`` (default: measure the available backends and keep the fastest, see
            [`fd_trt.backends.auto`][fd_trt.backends.auto]), ``"torch"``, ``"onnxruntime"``, ``"tensorrt"``, or a ready
            [`Runner`][fd_trt.core.runner.Runner].
        device: ``"cpu"`` or ``"cuda[:i]"``; CUDA when available by default.
        precision: the runner's precision, ``fp32``, ``fp16`` or ``bf16``; with ``auto``, also
            ``"auto"``, which lets reduced precision (bf16 on a CPU) compete.
        progress: show progress bars.
        source: a description of where the model came from, for messages.
        engines: a built engine directory for graph backends (see `from_pretrained()`).
        runner_options: extra keyword arguments for the runner.
        max_cached_runners: graph runners kept loaded, one per latent/text shape; the least
            recently used is closed past this count.
        build_on_demand: build or load graphs for a new shape on the first call that needs it.
            With ``False`` (serving), only shapes readied by `prepare()` run; any other
            raises [`NotPreparedError`][fd_trt.errors.NotPreparedError].
        owns_pipeline: whether ``sd_pipeline`` belongs to this object, which may then move it to
            ``device``. A wrapped pipeline (`from_diffusers()`) is never moved or cast.
        controlnet: a ``ControlNetModel``, a ``MultiControlNetModel`` or a list of them, run at key
            steps only; by default the wrapped pipeline's own ``controlnet``, if it has one. On the
            torch backend it runs as the diffusers module; on the graph backends (onnxruntime,
            tensorrt, and ``auto`` when it chooses one) each ControlNet runs as its own graph,
            ``controlnet-<sha16>.onnx`` in the UNet's engine directory, exported on first use
            (with ``build_on_demand``) and re-exported when the ControlNet's weights change.
        token_merging: a ratio r in (0, 1): Token Merging (tomesd) merges that fraction of the
            image tokens in the UNet's highest-resolution transformer blocks, with every schedule;
            ``backend="torch"`` only. It patches the wrapped pipeline's UNet
            ([`fd_trt.pipelines.token_merging`][fd_trt.pipelines.token_merging]).
    """

    @property
    def supports_controlnet(self) -> bool:
        """Whether ``controlnet=`` is supported: the model family's say (SD 1.x/2.x: yes)."""
        return self.family.supports_controlnet

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
        token_merging: float | None = None,
    ) -> None:
        self.sd = sd_pipeline
        #: The model family of the wrapped pipeline ([`fd_trt.families.base.family_for_pipeline()`][fd_trt.families.base.family_for_pipeline]).
        self.family: ModelFamily = family_for_pipeline(sd_pipeline)
        #: ``"text2img"`` or ``"inpaint"`` (a UNet with mask and masked-image input channels).
        self.unet_kind = self.family.unet_kind(sd_pipeline.unet.config)
        self.source = source
        if isinstance(max_cached_runners, bool) or not isinstance(max_cached_runners, int) or max_cached_runners < 1:
            raise InputError(f"max_cached_runners must be a positive integer, got {max_cached_runners!r}")
        self.max_cached_runners = max_cached_runners
        self.build_on_demand = bool(build_on_demand)
        self.progress = progress
        self.engines = Path(engines) if engines is not None else None
        self.runner_options = dict(runner_options or {})
        self.device = _place_pipeline(sd_pipeline, device, owns_pipeline)
        self._check_model()  # also splits the UNet: an unsupported one fails now
        self._attach_controlnet(controlnet, owns_pipeline)
        #: Per ControlNet (by id): its weights fingerprint and sha256, recomputed when the fingerprint changes.
        self._controlnet_digests: dict[int, tuple[tuple[Any, ...], str]] = {}
        #: The model folder (``from_pretrained``), where saved calibrations are looked for.
        self.model_dir: Path | None = None
        self.backend, self.precision, self.auto_precision = resolve_backend(backend, precision, self.device)
        #: Token Merging's ratio ([`fd_trt.pipelines.token_merging`][fd_trt.pipelines.token_merging]), ``None`` when off.
        self.token_merging = check_token_merging(token_merging, self.backend)
        if self.token_merging is not None:
            apply_token_merging(sd_pipeline, self.token_merging)
        #: The runners: one fixed runner for every shape (torch, or one passed in), or graph runners per shape.
        self.pool = RunnerPool(self, backend if isinstance(backend, Runner) else None)
        self._flops = _FlopCounter()

    def _check_model(self) -> None:
        """Refuses a diffusers pipeline this class would condition wrongly: one whose family has a
        class of its own that this is not (SDXL: ``FasterDiffusionXLPipeline``), or one its family
        refuses ([`check_pipeline()`][fd_trt.families.base.ModelFamily.check_pipeline])."""
        served = pipeline_class_for(self.family.name)
        if served is not None and not isinstance(self, served):
            raise InputError(
                f"{type(self.sd).__name__} is a {self.family.name!r} model ({self.family.description}): wrap it with "
                f"FasterDiffusionPipeline.from_diffusers(pipe) or {served.__name__}(pipe), which serves that family"
            )
        self.family.check_pipeline(self.sd)

    def text_shape(self) -> tuple[int, int]:
        """``(L, D)`` of the prompt embeddings, as the model family states them."""
        return self.family.text_shape(self.sd)

    def added_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Per-row shapes of the UNet's added conditioning (SDXL's), ``None`` for SD 1.x/2.x: the family's."""
        return self.family.added_shapes(self.sd)

    # runners and weights -----------------------------------------------------------------------
    #: With ``backend="auto"``: whether missing graphs may be built while tuning (``fd-trt build --tune``).
    auto_build_graphs: bool = False
    #: With ``backend="auto"``: read and write the decision cache.
    auto_use_cache: bool = True
    #: With ``backend="auto"``: the precision asked (None: exact only; "auto": reduced precision may compete).
    auto_precision: str | None = None

    @property
    def runner(self) -> Runner | None:
        """The runner of the latest call (the fixed one when there is one)."""
        return self.pool.current

    @property
    def unet_sha256(self) -> str:
        """sha256 of the UNet's effective weights (parameters, fused LoRA, active adapters and scales)."""
        return self.pool.unet_sha256

    def refresh_weights(self) -> None:
        """Makes every runner take the UNet's weights now, whatever the cheap fingerprint says.

        For changes that [`fd_trt.graphs.weights.weights_fingerprint()`][fd_trt.graphs.weights.weights_fingerprint] cannot see (a few elements
        written through ``.data`` between its samples, with no counter bumped).
        """
        self.pool.refresh_weights()

    def auto_candidates(self) -> list[Any]:
        """The candidates ``backend="auto"`` measures here, in order of preference on a tie."""
        return self.pool.auto_candidates()

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
        self.pool.close()

    def __enter__(self) -> FasterDiffusionPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # call -------------------------------------------------------------------------------------
    # stages -----------------------------------------------------------------------------------
    # A call runs these in order (see _generate). Every model family shares them; check_inputs and
    # encode_prompt ask the family for its prompt options and encoding (SDXL's second prompt and
    # micro-conditioning).
    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        height: int,
        width: int,
        **prompt_options: Any,
    ) -> PromptEmbeddings:
        """Stage 1: the text conditioning of every sampler row, negative rows first with CFG, as the
        model family encodes it ([`encode_prompt()`][fd_trt.families.base.ModelFamily.encode_prompt]).

        Args:
            prompts: the checked prompts.
            negative_prompt: one string for all prompts, one per prompt, or ``None``.
            num_images_per_prompt: images per prompt; each prompt's rows repeat this many times.
            do_classifier_free_guidance: also encode the negative prompts.
            height, width: the image size (unused by SD; SDXL conditions on it).
            **prompt_options: the family's own prompt options (SDXL: ``prompt_2``,
                ``original_size``, ...; see
                [`FasterDiffusionXLPipeline.__call__()`][fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline.__call__]).

        Returns:
            [`PromptEmbeddings`][fd_trt.families.base.PromptEmbeddings] with ``text [R,L,D]`` and the family's added conditioning,
            R = (2 if CFG else 1) x images.
        """
        return self.family.encode_prompt(
            self.sd,
            prompts,
            negative_prompt,
            num_images_per_prompt,
            do_classifier_free_guidance,
            height=height,
            width=width,
            device=self.device,
            **prompt_options,
        )

    def prepare_timesteps(self, num_inference_steps: int) -> Any:
        """A copy of the scheduler with its timesteps set: each call owns its solver state."""
        scheduler = copy.deepcopy(self.sd.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

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
        return self._initial_latents(shape, generator, latents, scheduler, f"{batch} images of {height}x{width}")

    def _initial_latents(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        scheduler: Any,
        expected: str,
        name: str = "latents",
    ) -> torch.Tensor:
        """Latents of ``shape``, float32 on the device: drawn from ``generator``, or the given
        ``latents``; scaled by the scheduler's ``init_noise_sigma``.

        Raises:
            InputError: when given ``latents`` do not have ``shape`` (``expected`` says what it holds).
        """
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise InputError(f"{name} have shape {tuple(latents.shape)}, expected {shape} for {expected}")
            latents = latents.to(self.device, torch.float32)
        return latents * scheduler.init_noise_sigma

    def denoise(
        self,
        scheduler: Any,
        cond: PromptEmbeddings,
        key_schedule: KeySchedule,
        options: SamplerOptions,
        image_run: ImageRun,
        callback: StepCallback | None = None,
        stats: SamplerStats | None = None,
    ) -> tuple[torch.Tensor, Runner]:
        """Stage 3: the Faster Diffusion sampler on the runner for this latent and text shape.

        ``image_run`` gives the initial latents and, for img2img, inpainting and ControlNet calls,
        the steps run, the unit noise, the extra encoder channels and the key-step ControlNet hook.

        Returns:
            ``(final latents, the runner that ran)``.
        """
        latents, text, control = image_run.latents, cond.text, image_run.control
        # (h, w) of image latents, (F, h, w) of video latents: a graph runner per shape.
        shape = tuple(int(d) for d in latents.shape[2:]), (int(text.shape[1]), int(text.shape[2]))
        if self.token_merging is not None:
            set_token_merging_size(self.sd.unet, *shape[0][-2:])
        with self.pool.using(*shape) as runner:
            if control is not None:
                control.resolve_runners = functools.partial(self._controlnet_calls, runner)
            inputs = SamplerInputs(
                text,
                added=cond.added,
                extra_channels=image_run.extra_channels,
                control=control,
                initial_noise=image_run.initial_noise,
            )
            options = dataclasses.replace(
                self.sampler_options(options, scheduler), timesteps=image_run.timesteps, progress=self.progress
            )
            if isinstance(key_schedule, DecoderSchedule) and key_schedule.shallow_steps:
                prepare_shallow_graphs(self.sd.unet, runner, key_schedule, int(text.shape[0]), options)
            x0 = run_sampler(runner, scheduler, latents, inputs, key_schedule, options, callback=callback, stats=stats)
        return x0, runner

    def sampler_options(self, options: SamplerOptions, scheduler: Any) -> SamplerOptions:
        """The sampler options a run of this model needs (every sampler run of the pipeline and of
        calibration passes through here): unchanged for SD; a family's class may set what its UNet
        needs (DeepFloyd IF: guide the noise channels only, keep the learned variance)."""
        return options

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
            schedule: key steps: ``"paper"``, ``"all"``, ``"uniform:N"``, ``"power:K[:P]"``, a list of
                step indices, ``"calibrated"`` (the calibration saved with the model or engine directory
                for this scheduler and step count), a calibration JSON path or a
                [`Calibration`][fd_trt.core.calibration.Calibration]; or a decoder schedule (``"deepcache:N"``,
                ``"combined:KEYS|FULL|DEPTH[|fresh]"``). ``None`` (default): ``calibrated`` when a
                matching calibration is saved with the model, otherwise ``paper``.
            noise_injection: prior noise injection on (``True``), off (``False``), a
                [`NoiseInjection`][fd_trt.core.schedule.NoiseInjection], or ``None`` for on exactly when some step
                decodes from propagated encoder features ([`KeySchedule.injects_noise`][fd_trt.core.schedule.KeySchedule.injects_noise]):
                so ``schedule="all"`` reproduces plain diffusers, and DeepCache-like schedules inject none.
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
            [`FasterDiffusionOutput`][fd_trt.pipelines.pipeline.FasterDiffusionOutput] with ``images`` and ``stats``.
        """
        return self._generate(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            eta,
            generator,
            latents,
            output_type,
            schedule,
            noise_injection,
            parallel,
            max_decoder_rows,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_options={},
            guidance_rescale=guidance_rescale,
            image_options=dict(
                image=image,
                mask_image=mask_image,
                strength=strength,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
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
        seconds = dict.fromkeys(("text_encoder", "encoder", "controlnet", "decoder", "scheduler", "vae", "total"), 0.0)
        # 0. Check the inputs; find the steps to run and their key steps.
        opts = dict(image_options or {})
        image, strength = opts.get("image"), opts.get("strength")
        mode = self.image_mode(image, opts.get("mask_image"), strength)
        height, width = self.default_size(height, width, mode, image)
        prompts = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            **prompt_options,
        )
        batch, cfg = len(prompts) * num_images_per_prompt, guidance_scale > 1.0
        check_call_options(guidance_rescale, callback_on_step_end_tensor_inputs, generator, batch)
        scheduler = self.prepare_timesteps(num_inference_steps)
        # The steps run when not all of the schedule's (img2img's tail, SDXL's denoising_start/end).
        run_timesteps = self.steps_to_run(scheduler, num_inference_steps, mode, strength, opts)
        num_steps = len(scheduler.timesteps) if run_timesteps is None else len(run_timesteps)
        self.pool.check_weights()  # before the calibration check, which compares the weights hash
        # An img2img run has fewer steps than asked; a calibration must be for the steps run.
        cal_steps = num_inference_steps if num_steps == len(scheduler.timesteps) else num_steps
        key_schedule, noise = self.prepare_schedule(schedule, noise_injection, cal_steps, num_steps)

        # 1. Encode the prompts.
        t0 = time.perf_counter()
        cond = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, cfg, height, width, **prompt_options)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the text encoder's kernels are queued, not done
        seconds["text_encoder"] = time.perf_counter() - t0

        # 2. Prepare the latents x_T (img2img: the noised image latents) and the image conditioning.
        run = self.prepare_run(
            mode,
            scheduler,
            num_inference_steps,
            batch,
            height,
            width,
            latents,
            generator,
            cfg,
            num_images_per_prompt,
            run_timesteps,
            opts,
        )
        if run.control is not None and run.control.window_edges():  # a guidance window's edges are key steps
            keys = with_key_steps(key_schedule.key_steps, run.control.window_edges())
            key_schedule = with_keys(key_schedule, tuple(keys))

        # 3. Denoise with encoder propagation.
        options = SamplerOptions(
            guidance_scale=float(guidance_scale),
            guidance_rescale=float(guidance_rescale),
            noise=noise,
            parallel=parallel,
            max_decoder_rows=max_decoder_rows,
            extra_step_kwargs=scheduler_step_kwargs(scheduler, eta, generator),
        )
        sstats = SamplerStats()
        callback = step_callback(self, run.blend, callback_on_step_end)
        x0, runner = self.denoise(scheduler, cond, key_schedule, options, run, callback=callback, stats=sstats)
        seconds.update(sstats.seconds)
        nonfinite = warn_nonfinite(x0, runner)

        # 4. Decode with the VAE.
        t0 = time.perf_counter()
        images = self.decode_latents(x0, output_type)
        seconds["vae"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        stats = call_stats(self, x0, cond, key_schedule, sstats, seconds, runner, nonfinite)
        if run.control is not None:
            stats.controlnet_calls = run.control.calls
        return FasterDiffusionOutput(images=images, stats=stats, latents=x0)


__all__ = ["FasterDiffusionPipeline", "FasterDiffusionOutput", "PipelineStats", "PromptEmbeddings"]
