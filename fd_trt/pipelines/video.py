"""FasterDiffusionVideoPipeline: text-to-video (ModelScope / VideoFusion, AnimateDiff) with encoder propagation.

The model families ([`fd_trt.families.video`][fd_trt.families.video]) recognise, check and encode; this class
changes what video latents change in the pipeline's stages:

* the sampler starts from ``[B, 4, F, h, w]`` latents: a sampler row is one video, all its frames
  together, and a decoder call decodes steps x videos x CFG rows of F frames each
  ([`fd_trt.graphs.split_video`][fd_trt.graphs.split_video]);
* ``max_decoder_rows`` counts frames: a decoder call decodes at most that many frames (steps x
  videos x CFG x F), which is what its memory grows with;
* the key steps are the image pipelines' (``all``, ``paper``, ``uniform:K``, a list), and prior
  noise injection adds ``alpha x_T`` to the video latents as for Stable Diffusion;
* the output is the wrapped pipeline's: its ``decode_latents`` (the VAE, frame by frame) and its
  ``video_processor``; ``output_type`` ``"np"`` (``[B, F, H, W, 3]``), ``"pil"`` (one list of
  frames per video), ``"pt"`` or ``"latent"``; [`FasterDiffusionVideoOutput.frames`][fd_trt.pipelines.video.FasterDiffusionVideoOutput.frames] holds it, as
  diffusers' ``.frames``.

It runs on the torch backend (what ``backend=None`` and ``"auto"`` pick), on onnxruntime and on
TensorRT: ``backend="onnxruntime"`` and ``"tensorrt"`` export the encoder and decoder graphs per
frame count, latent size and text shape on first use (``[rows, 4, F, h, w]`` latents, F fixed per
graph; an engine directory built for another frame count is refused with its rebuild command), and
the tensorrt runner builds its plans of them (profiles over the row axes only; each plan records
its frame count and is never run for another). The decoder schedules (``deepcache:N``,
``combined:...``) run on every backend: the graph backends export the capture, shallow and
``conv_in`` graphs of 5-D latents on first use, as for image models.
``fd_trt.pipelines`` registers it for the ``"text-to-video"`` and ``"animatediff"`` families, so
``FasterDiffusionPipeline.from_diffusers(TextToVideoSDPipeline(...))`` returns one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fd_trt.core.runner import Runner
from fd_trt.core.sampler import SamplerOptions, SamplerStats, StepCallback
from fd_trt.core.schedule import KeySchedule, NoiseInjection, ScheduleSpec
from fd_trt.errors import InputError
from fd_trt.families.base import PromptEmbeddings
from fd_trt.families.video import AnimateDiffFamily, VideoFamily
from fd_trt.pipelines.image import ImageRun
from fd_trt.pipelines.pipeline import FasterDiffusionOutput, FasterDiffusionPipeline

#: Output types of the video pipeline: ``pt`` is the decoded video tensor, ``latent`` the latents.
VIDEO_OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class FasterDiffusionVideoOutput(FasterDiffusionOutput):
    """Output of [`FasterDiffusionVideoPipeline`][fd_trt.pipelines.video.FasterDiffusionVideoPipeline]: ``images`` are the videos.

    Attributes:
        images: ``np``: ``[B, F, H, W, 3]`` floats in [0, 1]; ``pil``: one list of F images per
            video; ``pt``: ``[B, F, 3, H, W]``; ``latent``: the ``[B, 4, F, h, w]`` latents (as
            diffusers' video pipelines).
        stats: counters and timings of the call; its rows are videos (F frames each).
        latents: the final ``[B, 4, F, h, w]`` float32 latents, whatever the output type.
    """

    @property
    def frames(self) -> Any:
        """The videos, as diffusers' ``TextToVideoSDPipelineOutput.frames`` (``images``)."""
        return self.images


def _check_frames(num_frames: Any) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    return num_frames


class FasterDiffusionVideoPipeline(FasterDiffusionPipeline):
    """Text-to-video (a diffusers ``TextToVideoSDPipeline`` or ``AnimateDiffPipeline``) with Faster
    Diffusion's encoder propagation, on the torch, onnxruntime or tensorrt backend.

    Construct it like [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline] (``from_diffusers`` and ``from_pretrained`` on the
    base class return this class for video models); ``backend`` is ``"torch"`` (also what ``None``
    and ``"auto"`` pick: ``auto`` does not measure the graph backends for video models),
    ``"onnxruntime"`` (graphs per frame count, built on first use or read from ``engines=``, a
    directory of ``fd-trt build --frames F``), ``"tensorrt"`` (the same graphs and their plans, built
    on first use or read from a directory of ``fd-trt build --backend tensorrt --frames F``) or a
    ready [`Runner`][fd_trt.core.runner.Runner].

    Raises:
        InputError: for ``token_merging`` or a ControlNet.
    """

    #: Why calibration ([`fd_trt.tools.calibrate`][fd_trt.tools.calibrate]) refuses this pipeline.
    calibration_refusal = (
        "calibration (fd-trt calibrate) does not run text-to-video models yet: pass schedule='paper', 'uniform:K' "
        "or a list of key steps, or a decoder schedule such as 'combined:power:10|none|1|fresh'"
    )

    def __init__(self, sd_pipeline: Any, backend: str | Runner | None = None, **kwargs: Any) -> None:
        if backend is None or backend == "auto":
            backend = "torch"
            if kwargs.get("precision") == "auto":
                kwargs["precision"] = None
        if kwargs.get("token_merging") is not None:
            raise InputError(
                f"token_merging={kwargs['token_merging']!r} is not supported for text-to-video models: leave it unset"
            )
        if kwargs.get("controlnet") is not None:
            raise InputError("text-to-video models run without a ControlNet: leave controlnet unset")
        super().__init__(sd_pipeline, backend=backend, **kwargs)

    def _check_model(self) -> None:
        if not isinstance(self.family, VideoFamily):
            raise InputError(
                f"FasterDiffusionVideoPipeline wraps a text-to-video pipeline (TextToVideoSDPipeline, "
                f"AnimateDiffPipeline), got a {self.family.name!r} model: use FasterDiffusionPipeline.from_diffusers(pipe)"
            )
        super()._check_model()

    def prepare(self, height: int | None = None, width: int | None = None, num_frames: int = 16) -> Runner:
        """Builds or loads, and activates, the runner for one video size ahead of the first call
        (the graph backends build graphs per frame count and frame size).

        Args:
            height, width: the frame size; the model's default when omitted.
            num_frames: the frame count F the graphs take.

        Returns:
            The active runner for that size.
        """
        f = self.vae_scale_factor
        frames = _check_frames(num_frames)
        height, width = self.default_size(height, width)
        self.check_inputs("x", None, height, width, 1, 1.0, 1, "latent")
        self.pool.check_weights()
        return self.pool.runner_for((frames, height // f, width // f), self.text_shape(), build=True, ahead=True)

    # stages -------------------------------------------------------------------------------------
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
        **prompt_options: Any,
    ) -> list[str]:
        """As the base class, with the video output types (``pt``: the decoded video tensor)."""
        return super().check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            "latent" if output_type == "pt" else output_type,
            **prompt_options,
        )

    def prepare_video_latents(
        self,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        scheduler: Any,
    ) -> torch.Tensor:
        """The initial latents ``[B, C, F, h, w]``, float32, scaled by ``init_noise_sigma`` (diffusers'
        video pipelines' ``prepare_latents``).

        Raises:
            InputError: when given ``latents`` have another shape.
        """
        f = self.vae_scale_factor
        shape = (batch, int(self.sd.unet.config.in_channels), num_frames, height // f, width // f)
        expected = f"{batch} videos of {num_frames} frames of {height}x{width}"
        return self._initial_latents(shape, generator, latents, scheduler, expected)

    def prepare_run(
        self,
        mode: str,
        scheduler: Any,
        num_inference_steps: int,
        batch: int,
        height: int,
        width: int,
        latents: torch.Tensor | None,
        generator: Any,
        cfg: bool,
        num_images_per_prompt: int,
        timesteps: torch.Tensor | None,
        options: dict[str, Any],
    ) -> ImageRun:
        """Stage 2: the initial video latents (text-to-video only: no image inputs)."""
        frames = _check_frames(options.get("num_frames"))
        return ImageRun(
            self.prepare_video_latents(batch, frames, height, width, generator, latents, scheduler), timesteps
        )

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
        """Stage 3, with ``max_decoder_rows`` counted in frames: the sampler's cap (in videos) is
        ``max_decoder_rows // F``.

        Raises:
            InputError: for a cap below the frames of one step (videos x CFG x F).
        """
        cap = options.max_decoder_rows
        if cap is not None:
            frames = int(image_run.latents.shape[2])
            per_step = int(cond.text.shape[0]) * frames
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < per_step:
                raise InputError(
                    f"max_decoder_rows={cap!r} counts decoded frames for a video model and is below the {per_step} "
                    f"frames of a single step ({cond.text.shape[0]} rows with CFG x {frames} frames): raise it to at "
                    f"least {per_step}"
                )
            options = dataclasses.replace(options, max_decoder_rows=cap // frames)
        return super().denoise(scheduler, cond, key_schedule, options, image_run, callback=callback, stats=stats)

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Stage 4: the wrapped pipeline's ``decode_latents`` (the VAE frame by frame) and
        ``video_processor`` into ``output_type`` (``latent``: the latents)."""
        if output_type == "latent":
            return latents
        vae_dtype = next(self.sd.vae.parameters()).dtype
        video = self.sd.decode_latents(latents.to(vae_dtype))
        return self.sd.video_processor.postprocess_video(video=video, output_type=output_type)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 16,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = None,
        schedule: ScheduleSpec | Any | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> FasterDiffusionVideoOutput:
        """Generates videos, as diffusers' ``TextToVideoSDPipeline`` / ``AnimateDiffPipeline``.

        Args:
            prompt, negative_prompt, height, width, num_frames, num_inference_steps, eta,
            generator, num_videos_per_prompt: as in diffusers' video pipelines.
            guidance_scale: CFG weight; ``None``: the wrapped pipeline's default (9.0 for
                ``TextToVideoSDPipeline``, 7.5 for ``AnimateDiffPipeline``).
            latents: the initial ``[B, 4, F, h, w]`` latents (drawn from ``generator`` otherwise).
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``; ``None``: the wrapped
                pipeline's default (``np`` for ``TextToVideoSDPipeline``, ``pil`` for AnimateDiff).
            schedule, noise_injection, parallel, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__] (decoder
                schedules such as ``deepcache:N`` included; the callback's ``"latents"`` are the
                video latents).
            max_decoder_rows: cap on the frames one decoder call decodes (steps x videos x CFG x
                ``num_frames``); at least one step's.

        Returns:
            [`FasterDiffusionVideoOutput`][fd_trt.pipelines.video.FasterDiffusionVideoOutput]: ``.frames`` (as diffusers), ``.stats``, ``.latents``.
        """
        animatediff = isinstance(self.family, AnimateDiffFamily)
        if output_type is None:
            output_type = "pil" if animatediff else "np"
        if output_type not in VIDEO_OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
        if guidance_scale is None:
            guidance_scale = 7.5 if animatediff else 9.0
        out = self._generate(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_videos_per_prompt,
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
            image_options={"num_frames": _check_frames(num_frames)},
        )
        return FasterDiffusionVideoOutput(images=out.images, stats=out.stats, latents=out.latents)


__all__ = ["VIDEO_OUTPUT_TYPES", "FasterDiffusionVideoOutput", "FasterDiffusionVideoPipeline"]
