"""FasterDiffusionXLPipeline: Stable Diffusion XL on the Faster Diffusion sampler.

What SDXL is (two text encoders, the pooled text embedding and the micro-conditioning
``time_ids`` as added conditioning; the refiner's five time ids), how it is recognised and refused,
and how its prompts are encoded is its model family's, [`fd_trt.families.sdxl.StableDiffusionXLFamily`][fd_trt.families.sdxl.StableDiffusionXLFamily].
This class adds SDXL's call arguments (``prompt_2``, ``original_size``, crops, aesthetic scores,
``denoising_start`` / ``denoising_end``), its img2img and refiner image handling and its VAE
decode; everything else (timesteps, latents, the sampler) is the base pipeline's.
``fd_trt.pipelines`` registers it as the class that serves the ``"sdxl"`` family
([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]).

img2img and the refiner: ``image=`` / ``strength=`` (or ``denoising_start=``) start from an image's
latents, as diffusers' ``StableDiffusionXLImg2ImgPipeline``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fd_trt.core.schedule import NoiseInjection, ScheduleSpec
from fd_trt.errors import InputError
from fd_trt.families.sdxl import Size, StableDiffusionXLFamily, is_sdxl, sdxl_added_shapes, sdxl_text_shape
from fd_trt.pipelines.conditioning import repeat_to_batch
from fd_trt.pipelines.pipeline import FasterDiffusionOutput, FasterDiffusionPipeline, _ImageRun


def _check_fraction(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(
            f"{name} must be a number strictly between 0 and 1 (a fraction of the schedule), got {value!r}"
        )


class FasterDiffusionXLPipeline(FasterDiffusionPipeline):
    """SDXL with Faster Diffusion's encoder propagation.

    Construct it like [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline], with a diffusers
    ``StableDiffusionXLPipeline`` (or ``StableDiffusionXLImg2ImgPipeline`` for the refiner);
    ``FasterDiffusionPipeline.from_pretrained`` and ``from_diffusers`` return this class for SDXL
    models. Its `family` is [`StableDiffusionXLFamily`][fd_trt.families.sdxl.StableDiffusionXLFamily], which
    states the text and added-conditioning shapes, encodes the prompts and refuses what SDXL
    does not run yet (ControlNets, inpainting UNets).
    """

    family: StableDiffusionXLFamily

    def _check_model(self) -> None:
        if not isinstance(self.family, StableDiffusionXLFamily):
            raise InputError(
                f"FasterDiffusionXLPipeline wraps an SDXL pipeline (a UNet with addition_embed_type='text_time' and "
                f"its text encoders), got {type(self.sd).__name__}: use FasterDiffusionPipeline for SD 1.x/2.x"
            )
        super()._check_model()

    def aesthetic_time_ids(self) -> bool:
        """Whether the time ids end with an aesthetic score (the refiner: 5 ids) rather than the
        target size (base: 6 ids); see
        [`StableDiffusionXLFamily.aesthetic_time_ids`][fd_trt.families.sdxl.StableDiffusionXLFamily.aesthetic_time_ids].

        Raises:
            UnsupportedModelError: for a UNet that takes neither 5 nor 6 time ids.
            InputError: when ``requires_aesthetics_score`` contradicts the UNet.
        """
        return self.family.aesthetic_time_ids(self.sd)

    @staticmethod
    def resolve_strength(mode: str, strength: Any) -> float:
        """``strength`` checked, or diffusers' SDXL img2img default, 0.3."""
        if strength is None and mode == "img2img":
            return 0.3
        return FasterDiffusionPipeline.resolve_strength(mode, strength)

    def _latent_image(self, image: Any) -> bool:
        """Whether ``image`` is latents already (a ``[B,C,h,w]`` tensor of the VAE's latent
        channels), as a base run with ``output_type="latent"`` hands to the refiner."""
        return (
            isinstance(image, torch.Tensor)
            and image.ndim == 4
            and int(image.shape[1]) == int(self.sd.vae.config.latent_channels)
        )

    def _image_size(self, mode: str, image: Any) -> tuple[int, int]:
        if mode == "img2img" and self._latent_image(image):
            f = self.vae_scale_factor
            return int(image.shape[2]) * f, int(image.shape[3]) * f
        return super()._image_size(mode, image)

    def steps_to_run(
        self, scheduler: Any, num_inference_steps: int, mode: str, strength: Any, options: dict[str, Any]
    ) -> torch.Tensor | None:
        """The base's steps, with diffusers' SDXL ``denoising_start`` and ``denoising_end``.

        ``denoising_start`` (img2img) starts at the first timestep below ``(1 - start) x
        num_train_timesteps`` and replaces ``strength``; ``denoising_end`` stops before the first
        timestep below ``(1 - end) x num_train_timesteps``. A base run with ``denoising_end=0.8``
        and a refiner run with ``denoising_start=0.8`` split one schedule between them.

        Raises:
            InputError: for values outside (0, 1), ``denoising_start`` without an image, a start
                not before the end, or a cut that leaves no step.
        """
        start, end = options.get("denoising_start"), options.get("denoising_end")
        _check_fraction("denoising_start", start)
        _check_fraction("denoising_end", end)
        if start is not None and end is not None and start >= end:
            raise InputError(f"denoising_start={start} must be below denoising_end={end}")
        n_train = int(scheduler.config.num_train_timesteps)
        if start is not None:
            if mode != "img2img":
                raise InputError("denoising_start needs image=: the (latent) image the run continues from")
            cutoff = int(round(n_train - start * n_train))
            n = int((scheduler.timesteps < cutoff).sum())
            if int(getattr(scheduler, "order", 1)) == 2 and n % 2 == 0:
                n += 1  # as diffusers: end after a second-order step's second half
            first = len(scheduler.timesteps) - n
            if n < 1 or first < 0:
                raise InputError(f"denoising_start={start} leaves no step of {num_inference_steps}: lower it")
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(first)
            timesteps = scheduler.timesteps[first:]
        else:
            timesteps = super().steps_to_run(scheduler, num_inference_steps, mode, strength, options)
        if end is not None:
            run = scheduler.timesteps if timesteps is None else timesteps
            cutoff = int(round(n_train - end * n_train))
            keep = int((run >= cutoff).sum())
            if keep < 1:
                raise InputError(f"denoising_end={end} leaves no step of the {len(run)} to run: raise it")
            timesteps = run[:keep]
        return timesteps

    def image_latents(
        self, image: Any, height: int, width: int, batch: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """The latents of img2img's input image, one per image of the batch, as diffusers' SDXL
        img2img pipeline: latents given as ``image`` are taken as they are; a picture is encoded
        by the VAE (in float32 when a float16 VAE asks for it), sampled with the generator(s),
        then normalized by the VAE's ``latents_mean`` / ``latents_std`` when it has them and
        scaled by its scaling factor.

        Raises:
            InputError: for an image of another size, or a batch it cannot be tiled to.
        """
        vae, dev, f = self.sd.vae, self.device, self.vae_scale_factor
        cfg = vae.config
        if self._latent_image(image):
            z0 = image.to(dev, torch.float32)
            if tuple(z0.shape[-2:]) != (height // f, width // f):
                raise InputError(
                    f"latents given as image= are {tuple(z0.shape[-2:])}, expected {(height // f, width // f)} for "
                    f"{height}x{width}: leave height/width unset, or pass latents of that size"
                )
            return repeat_to_batch(z0, batch, "images")
        init = self._processor("image").preprocess(image, height=height, width=width).to(dev, torch.float32)
        if tuple(init.shape[-2:]) != (height, width):
            raise InputError(f"image preprocessed to {tuple(init.shape[-2:])}, expected {(height, width)}")
        dtype = next(vae.parameters()).dtype
        upcast = dtype == torch.float16 and bool(getattr(cfg, "force_upcast", False))
        if upcast:
            vae.to(torch.float32)  # SDXL's VAE overflows in float16; the caller's VAE goes back below
        try:
            x = init if upcast else init.to(dtype)
            if isinstance(generator, list):
                x = repeat_to_batch(x, batch, "images")
                z = torch.cat([vae.encode(x[i : i + 1]).latent_dist.sample(generator[i]) for i in range(x.shape[0])])
            else:
                z = vae.encode(x).latent_dist.sample(generator)
        finally:
            if upcast:
                vae.to(dtype)
        z = z.float()
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
            std_t = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
            z = (z - mean_t) * float(cfg.scaling_factor) / std_t
        else:
            z = float(cfg.scaling_factor) * z
        return repeat_to_batch(z, batch, "images")

    def prepare_image_run(
        self, mode: str, scheduler: Any, num_inference_steps: int, latent_shape: Any, height: int, width: int, **kw: Any
    ) -> _ImageRun:  # type: ignore[override]
        """SDXL img2img: the image latents noised to the first step run, as diffusers'
        ``StableDiffusionXLImg2ImgPipeline`` (with ``denoising_start``, not noised: the latents
        continue a run). ``latents=`` is the noise, as for SD img2img."""
        if mode != "img2img":
            return super().prepare_image_run(mode, scheduler, num_inference_steps, latent_shape, height, width, **kw)
        options = kw.get("options") or {}
        timesteps = kw.get("timesteps")
        if timesteps is None:
            timesteps = self.steps_to_run(scheduler, num_inference_steps, mode, kw.get("strength"), options)
        batch, latents, generator = int(latent_shape[0]), kw.get("latents"), kw.get("generator")
        z0 = self.image_latents(kw["image"], height, width, batch, generator)
        if options.get("denoising_start") is not None:
            return _ImageRun(latents=z0, timesteps=timesteps)
        if latents is not None:
            if tuple(latents.shape) != tuple(z0.shape):
                raise InputError(f"latents have shape {tuple(latents.shape)}, expected {tuple(z0.shape)}")
            noise = latents.to(self.device, torch.float32)
        else:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(tuple(z0.shape), generator=generator, device=self.device, dtype=torch.float32)
        x = scheduler.add_noise(z0, noise, timesteps[:1].repeat(batch))
        return _ImageRun(latents=x, timesteps=timesteps, initial_noise=noise)

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Stage 4 for SDXL: as diffusers' SDXL pipeline, the VAE's optional latent mean and std,
        a float32 decode for a float16 VAE that asks for it (``force_upcast``), and the
        watermark when the wrapped pipeline has one."""
        if output_type == "latent":
            return latents
        vae = self.sd.vae
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
            std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
            z = latents * std_t / cfg.scaling_factor + mean_t
        else:
            z = latents / cfg.scaling_factor
        dtype = next(vae.parameters()).dtype
        if dtype == torch.float16 and getattr(cfg, "force_upcast", False):
            # SDXL's VAE overflows in float16. Decode in float32 and cast back, as diffusers does
            # (the VAE is the caller's object: it is left in the dtype it came in).
            vae.to(torch.float32)
            try:
                image = vae.decode(z.float(), return_dict=False)[0]
            finally:
                vae.to(torch.float16)
        else:
            image = vae.decode(z.to(dtype), return_dict=False)[0]
        watermark = getattr(self.sd, "watermark", None)
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return self.sd.image_processor.postprocess(
            image.float(), output_type=output_type, do_denormalize=[True] * int(latents.shape[0])
        )

    @torch.inference_mode()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        image: Any = None,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        schedule: ScheduleSpec | Any | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> FasterDiffusionOutput:
        """Generates images with SDXL: text-to-image, or img2img / the refiner with ``image=``.

        Args:
            prompt, prompt_2, negative_prompt, negative_prompt_2, height, width,
            num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, eta,
            generator, latents, output_type, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size: as in
                diffusers' ``StableDiffusionXLPipeline`` (``original_size`` and ``target_size``
                default to ``(height, width)``).
            image, strength, denoising_start, denoising_end, aesthetic_score,
            negative_aesthetic_score: as in diffusers' ``StableDiffusionXLImg2ImgPipeline``:
                ``image`` is a picture (PIL, array, ``[B,3,H,W]`` tensor in [-1, 1]) or latents
                (``[B,4,h,w]``, e.g. a base run's ``output_type="latent"``); without
                height/width the image's size is used. ``strength`` defaults to 0.3; the run
                covers the last ``int(strength x num_inference_steps)`` steps, and the schedule's
                key steps index the steps run (``paper`` with 50 steps and strength 0.3: 15
                steps, key steps {0,1,2,3,5,10}). ``denoising_start`` (img2img) replaces
                ``strength`` and does not noise the latents; ``denoising_end`` stops early (also
                text-to-image). The aesthetic scores enter the time ids of a refiner (a UNet with
                5 time ids; ``requires_aesthetics_score``), and are unused by a base model.
                ``latents`` in img2img is the noise added to the image latents (as for SD
                img2img), not the starting latents. Noise injection needs the run's initial
                noise, which a ``denoising_start`` run does not have: it is off there.
            schedule, noise_injection, parallel, max_decoder_rows, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in [`FasterDiffusionPipeline.__call__()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.__call__].

        Returns:
            [`FasterDiffusionOutput`][fd_trt.pipelines.pipeline.FasterDiffusionOutput] with ``images`` and ``stats``.
        """
        options = dict(
            prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )
        if denoising_start is not None:
            if latents is not None:
                raise InputError(
                    "with denoising_start the image's latents are the start and no noise is added: drop latents= "
                    "(pass the latents to continue as image=)"
                )
            if noise_injection is True or (isinstance(noise_injection, NoiseInjection) and noise_injection.enabled):
                raise InputError(
                    "noise injection adds the run's initial noise, which a denoising_start run (continuing given "
                    "latents) does not have: leave noise_injection unset or False"
                )
            noise_injection = False if noise_injection is None else noise_injection
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
            prompt_options=options,
            guidance_rescale=guidance_rescale,
            image_options=dict(
                image=image, strength=strength, denoising_start=denoising_start, denoising_end=denoising_end
            ),
        )


__all__ = ["FasterDiffusionXLPipeline", "is_sdxl", "sdxl_added_shapes", "sdxl_text_shape"]
