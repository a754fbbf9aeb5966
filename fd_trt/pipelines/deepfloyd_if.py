"""FasterDiffusionIFPipeline: DeepFloyd IF stage I with encoder propagation.

The model family ([`fd_trt.families.deepfloyd_if.DeepFloydIFFamily`][fd_trt.families.deepfloyd_if.DeepFloydIFFamily]) recognises, checks
and encodes; this class changes what pixel space changes in the pipeline's stages:

* the sampler starts from ``[B, 3, H, W]`` pixel noise (no VAE, a scale factor of 1);
* classifier-free guidance mixes the noise channels only; the scheduler gets the conditional
  rows' learned variance after them, as diffusers' ``IFPipeline`` does (or none, for a scheduler
  without a learned variance);
* ``schedule="paper"`` (and the default, without a saved calibration) is the authors' IF
  schedule ([`fd_trt.families.deepfloyd_if.if_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_paper_key_steps]);
* prior noise injection adds ``alpha x_T`` to the image itself (DDPM's ``scale_model_input`` is
  the identity, so the variance-preserving space is pixel space);
* the output is diffusers' IF post-processing: ``(x / 2 + 0.5).clamp(0, 1)`` as ``np`` or ``pil``
  images, or the raw ``[-1, 1]`` images with ``output_type="pt"`` (or ``"latent"``).

``fd_trt.pipelines`` registers it for the ``"if"`` family, so ``FasterDiffusionPipeline.from_diffusers(IFPipeline(...))``
returns one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fd_trt.core.sampler import SamplerOptions
from fd_trt.core.schedule import NoiseInjection, ScheduleSpec
from fd_trt.errors import InputError
from fd_trt.families.deepfloyd_if import (
    IF_SR_NOISE_LEVEL,
    DeepFloydIFFamily,
    DeepFloydIFSuperResolutionFamily,
    if_paper_key_steps,
    if_sr_paper_key_steps,
)
from fd_trt.pipelines.image import ImageRun
from fd_trt.pipelines.pipeline import FasterDiffusionOutput, FasterDiffusionPipeline

#: Output types of the IF pipeline: diffusers' ``pt`` returns the raw images.
IF_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FasterDiffusionIFPipeline(FasterDiffusionPipeline):
    """DeepFloyd IF stage I (a diffusers ``IFPipeline``) with Faster Diffusion's encoder propagation.

    Construct it like [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline]; ``from_diffusers``
    on the base class returns this class for IF models.
    """

    def _check_model(self) -> None:
        if not isinstance(self.family, DeepFloydIFFamily):
            raise InputError(
                f"FasterDiffusionIFPipeline wraps a DeepFloyd IF pipeline (a UNet with addition_embed_type='text'), "
                f"got a {self.family.name!r} model: use FasterDiffusionPipeline.from_diffusers(pipe)"
            )
        super()._check_model()

    @property
    def vae_scale_factor(self) -> int:
        """1: IF denoises pixels."""
        return 1

    @property
    def image_channels(self) -> int:
        return self.family.image_layout(self.sd.unet.config)[0]

    def paper_key_steps(self, num_steps: int) -> list[int]:
        """The authors' key steps for this stage ([`if_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_paper_key_steps])."""
        return if_paper_key_steps(num_steps)

    def resolve_schedule(self, schedule: Any, num_inference_steps: int, scheduler: str | None = None) -> Any:
        """As the base class, with ``"paper"`` the authors' IF key steps ([`paper_key_steps()`][fd_trt.pipelines.deepfloyd_if.FasterDiffusionIFPipeline.paper_key_steps])."""
        spec = super().resolve_schedule(schedule, num_inference_steps, scheduler)
        if isinstance(spec, str) and spec.strip().lower() == "paper":
            return self.paper_key_steps(num_inference_steps)
        return spec

    def prepare_latents(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        scheduler: Any,
    ) -> torch.Tensor:
        """The initial noisy images ``[B, C, H, W]`` (diffusers' ``prepare_intermediate_images``).

        Raises:
            InputError: when given ``latents`` (the initial images) have another shape.
        """
        shape = (batch, self.image_channels, height, width)
        expected = f"{batch} images of {height}x{width}"
        return self._initial_latents(
            shape, generator, latents, scheduler, expected, name="latents (the initial noisy images)"
        )

    def sampler_options(self, options: SamplerOptions, scheduler: Any) -> SamplerOptions:
        """Guide the noise channels only: the learned variance is the conditional rows', and is
        dropped for a scheduler without a learned variance (diffusers' ``IFPipeline``)."""
        channels, learned = self.family.image_layout(self.sd.unet.config)
        if not learned:
            return options
        keep = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
        return dataclasses.replace(options, noise_channels=channels, keep_variance=keep)

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """diffusers' IF post-processing: ``pt`` / ``latent`` return the raw images, ``np`` and ``pil``
        the images mapped to [0, 1] (through the wrapped pipeline's safety checker when it has one)."""
        if output_type in ("pt", "latent"):
            return latents
        image = (latents / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if getattr(self.sd, "safety_checker", None) is not None:
            image, _, _ = self.sd.run_safety_checker(image, self.device, latents.dtype)
        if output_type == "pil":
            return self.sd.numpy_to_pil(image)
        return image

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.0,
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
        clean_caption: bool = False,
    ) -> FasterDiffusionOutput:
        """Generates 64x64 (the UNet's sample size) images, as diffusers' ``IFPipeline``.

        Args:
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
            num_images_per_prompt, eta, generator, output_type, clean_caption: as in diffusers'
                ``IFPipeline`` (``output_type="pt"``: the raw images in [-1, 1]); ``clean_caption``
                is off by default (diffusers' needs bs4 and ftfy).
            latents: the initial noisy images ``[B, 3, H, W]`` (diffusers draws them from ``generator``).
            schedule: as [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__]; ``"paper"`` is the authors' IF
                schedule ([`if_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_paper_key_steps]).
            noise_injection, parallel, max_decoder_rows, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__]; the
                callback's ``"latents"`` are the noisy images.

        Returns:
            [`FasterDiffusionOutput`][fd_trt.pipelines.pipeline.FasterDiffusionOutput]; ``latents`` holds the final raw images.
        """
        if output_type not in IF_OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(IF_OUTPUT_TYPES)}, got {output_type!r}")
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
            "latent" if output_type == "pt" else output_type,
            schedule,
            noise_injection,
            parallel,
            max_decoder_rows,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_options={"clean_caption": clean_caption},
        )


class FasterDiffusionIFSuperResolutionPipeline(FasterDiffusionIFPipeline):
    """DeepFloyd IF stage II (a diffusers ``IFSuperResolutionPipeline``) with Faster Diffusion's
    encoder propagation.

    What stage II adds to stage I ([`FasterDiffusionIFPipeline`][fd_trt.pipelines.deepfloyd_if.FasterDiffusionIFPipeline]):

    * the stage-I images (``image=``) are upscaled to the output size (bilinear), noised by the
      pipeline's ``image_noising_scheduler`` at ``noise_level`` and concatenated after the noisy
      image at every encoder call, as diffusers does; the random draws come in diffusers' order
      (the initial noisy images, then the upscaled image's noise);
    * the noise level conditions the UNet per row (``class_labels``, the graphs' last added input);
    * ``schedule="paper"`` is the authors' stage-II schedule ([`fd_trt.families.deepfloyd_if.if_sr_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_sr_paper_key_steps]).

    ``FasterDiffusionPipeline.from_diffusers(IFSuperResolutionPipeline(...))`` returns one.
    """

    def _check_model(self) -> None:
        if not isinstance(self.family, DeepFloydIFSuperResolutionFamily):
            raise InputError(
                f"FasterDiffusionIFSuperResolutionPipeline wraps a DeepFloyd IF stage-II pipeline "
                f"(IFSuperResolutionPipeline), got a {self.family.name!r} model: use "
                "FasterDiffusionPipeline.from_diffusers(pipe)"
            )
        super()._check_model()

    def paper_key_steps(self, num_steps: int) -> list[int]:
        """The authors' stage-II key steps ([`if_sr_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_sr_paper_key_steps])."""
        return if_sr_paper_key_steps(num_steps)

    def image_mode(self, image: Any, mask_image: Any, strength: Any) -> str:
        """``"superres"``: a stage-II call upscales ``image``.

        Raises:
            InputError: without ``image``, or with ``mask_image`` / ``strength``.
        """
        if image is None:
            raise InputError(
                "IF stage II upscales images: pass image= (the stage-I images: a tensor in [-1, 1], PIL images or "
                "arrays, one per prompt)"
            )
        if mask_image is not None or strength is not None:
            raise InputError("IF stage II takes no mask_image= or strength=: it upscales the whole image")
        return "superres"

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
        """The initial noisy images, then the upscaled and noised stage-I images as the encoder's
        extra channels (diffusers' ``IFSuperResolutionPipeline``, in its order of random draws).

        Raises:
            InputError: when the images are not one per prompt.
        """
        import torch.nn.functional as F
        from diffusers.utils.torch_utils import randn_tensor

        x = self.prepare_latents(batch, height, width, generator, latents, scheduler)
        image = self.sd.preprocess_image(options["image"], num_images_per_prompt, self.device)
        if int(image.shape[0]) != batch:
            raise InputError(
                f"image has {int(image.shape[0]) // num_images_per_prompt} images for {batch // num_images_per_prompt} "
                "prompts: pass one stage-I image per prompt"
            )
        upscaled = F.interpolate(image.float(), (height, width), mode="bilinear", align_corners=True)
        level = int(options.get("noise_level", IF_SR_NOISE_LEVEL))
        noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=upscaled.dtype)
        levels = torch.full((batch,), level, device=upscaled.device, dtype=torch.long)
        upscaled = self.sd.image_noising_scheduler.add_noise(upscaled, noise, timesteps=levels)
        extra = torch.cat([upscaled, upscaled]) if cfg else upscaled
        return ImageRun(x, timesteps, extra_channels=extra)

    @torch.inference_mode()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        image: Any = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        noise_level: int = IF_SR_NOISE_LEVEL,
        schedule: ScheduleSpec | Any | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        clean_caption: bool = False,
    ) -> FasterDiffusionOutput:
        """Upscales stage-I images to the UNet's sample size (256x256 for IF-II), as diffusers'
        ``IFSuperResolutionPipeline``.

        Args:
            prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
            num_images_per_prompt, eta, generator, output_type, noise_level, clean_caption: as in
                diffusers' ``IFSuperResolutionPipeline`` (``image``: the stage-I images, one per
                prompt; ``output_type="pt"``: the raw images in [-1, 1]); ``clean_caption`` is off
                by default.
            latents: the initial noisy images ``[B, 3, H, W]`` (diffusers draws them from ``generator``).
            schedule: as [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__]; ``"paper"`` (the default
                without a saved calibration) is the authors' stage-II schedule
                ([`if_sr_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_sr_paper_key_steps]).
            noise_injection, parallel, max_decoder_rows, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__].

        Returns:
            [`FasterDiffusionOutput`][fd_trt.pipelines.pipeline.FasterDiffusionOutput]; ``latents`` holds the final raw images.
        """
        if output_type not in IF_OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(IF_OUTPUT_TYPES)}, got {output_type!r}")
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
            "latent" if output_type == "pt" else output_type,
            schedule,
            noise_injection,
            parallel,
            max_decoder_rows,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_options={"clean_caption": clean_caption, "noise_level": noise_level},
            image_options={"image": image, "noise_level": noise_level},
        )


__all__ = ["IF_OUTPUT_TYPES", "FasterDiffusionIFPipeline", "FasterDiffusionIFSuperResolutionPipeline"]
