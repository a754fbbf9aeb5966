"""FasterDiffusionXLPipeline: Stable Diffusion XL on the Faster Diffusion sampler.

SDXL differs from SD 1.x/2.x only in its conditioning: two text encoders whose hidden states are
concatenated, the second one's pooled output, and the micro-conditioning ``time_ids``
(original size, crop corner, target size). The UNet adds an embedding of the last two to its time
embedding, so both graphs take them per row (see :mod:`fd_trt.split`). Everything else (timesteps,
latents, the sampler, the VAE) is the base pipeline's. Prompt encoding, the time ids and
``guidance_rescale`` are diffusers' own ``StableDiffusionXLPipeline`` code, called on the wrapped
pipeline.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import InputError, UnsupportedModelError
from .pipeline import FasterDiffusionOutput, FasterDiffusionPipeline, PromptEmbeddings
from .schedule import NoiseInjection, ScheduleSpec

Size = tuple[int, int]

def is_sdxl(sd_pipeline: Any) -> bool:
    """Whether a diffusers pipeline is SDXL-shaped: a UNet with ``addition_embed_type="text_time"``."""
    unet = getattr(sd_pipeline, "unet", None)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _check_pair(name: str, value: Any) -> None:
    if value is None:
        return
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise InputError(f"{name} must be a pair of non-negative integers (height, width) or (top, left), got {value!r}")


def _check_prompt_list(name: str, value: Any, count: int) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise InputError(f"{name} must be a string or a list of strings, got {value!r}")
    if len(value) != count:
        raise InputError(f"{len(value)} entries in {name} for {count} prompts: give one per prompt, or a single string")


class FasterDiffusionXLPipeline(FasterDiffusionPipeline):
    """SDXL with Faster Diffusion's encoder propagation.

    Construct it like :class:`~fd_trt.pipeline.FasterDiffusionPipeline`, with a diffusers
    ``StableDiffusionXLPipeline``; ``FasterDiffusionPipeline.from_pretrained`` and
    ``from_diffusers`` return this class for SDXL models.
    """

    supports_controlnet = False

    def _check_model(self) -> None:
        if not is_sdxl(self.sd) or not hasattr(self.sd, "text_encoder_2"):
            raise InputError(
                f"FasterDiffusionXLPipeline wraps an SDXL pipeline (a UNet with addition_embed_type='text_time' and "
                f"its text encoders), got {type(self.sd).__name__}: use FasterDiffusionPipeline for SD 1.x/2.x"
            )
        if getattr(self.sd, "controlnet", None) is not None or self.unet_kind != "text2img":
            what = "a ControlNet" if getattr(self.sd, "controlnet", None) is not None else "an inpainting UNet"
            raise UnsupportedModelError(
                f"{type(self.sd).__name__} has {what}: fd_trt runs SDXL text-to-image only so far; use a "
                "StableDiffusionXLPipeline with a text-to-image UNet"
            )

    def text_shape(self) -> tuple[int, int]:
        """``(L, D)`` of the prompt embeddings: both encoders' hidden states side by side."""
        tokenizer = self.sd.tokenizer if self.sd.tokenizer is not None else self.sd.tokenizer_2
        return int(tokenizer.model_max_length), int(self.sd.unet.config.cross_attention_dim)

    def added_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the added conditioning: ``text_embeds`` (the second encoder's
        projection) and ``time_ids`` (what the UNet's add_embedding leaves for them)."""
        cfg = self.sd.unet.config
        width = int(cfg.projection_class_embeddings_input_dim)
        if self.sd.text_encoder_2 is not None:
            pooled = int(self.sd.text_encoder_2.config.projection_dim)
        else:
            pooled = int(self.sd.text_encoder.config.hidden_size)
        return {"text_embeds": (pooled,), "time_ids": ((width - pooled) // int(cfg.addition_time_embed_dim),)}

    # stages -----------------------------------------------------------------------------------
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
        prompt_2: Any = None,
        negative_prompt_2: Any = None,
        original_size: Any = None,
        crops_coords_top_left: Any = (0, 0),
        target_size: Any = None,
        negative_original_size: Any = None,
        negative_crops_coords_top_left: Any = (0, 0),
        negative_target_size: Any = None,
    ) -> list[str]:
        """The base checks, plus SDXL's second prompts and micro-conditioning sizes.

        Raises:
            InputError: naming the bad value and what is expected.
        """
        prompts = super().check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type
        )
        _check_prompt_list("prompt_2", prompt_2, len(prompts))
        _check_prompt_list("negative_prompt_2", negative_prompt_2, len(prompts))
        for name, value in (
            ("original_size", original_size),
            ("crops_coords_top_left", crops_coords_top_left),
            ("target_size", target_size),
            ("negative_original_size", negative_original_size),
            ("negative_crops_coords_top_left", negative_crops_coords_top_left),
            ("negative_target_size", negative_target_size),
        ):
            _check_pair(name, value)
        return prompts

    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        height: int,
        width: int,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
    ) -> PromptEmbeddings:
        """Stage 1 for SDXL: both text encoders, the pooled embedding and the time ids per row.

        Text and pooled embeddings come from diffusers' ``StableDiffusionXLPipeline.encode_prompt``
        (penultimate hidden states of both encoders, ``force_zeros_for_empty_prompt``), the time
        ids from its ``_get_add_time_ids``. Unlike diffusers, which tiles ``[negative, positive]``
        time ids over the batch, every negative row gets the negative time ids when the batch has
        more than one image; the two agree whenever the negative micro-conditioning is the default.

        Returns:
            :class:`PromptEmbeddings` with ``text [R,L,D]`` and ``added`` =
            ``{"text_embeds": [R,P], "time_ids": [R,K]}``, negative rows first with CFG.
        """
        sd = self.sd
        pos, neg, pooled, neg_pooled = sd.encode_prompt(
            prompt=prompts,
            prompt_2=prompt_2,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
        )
        rows = int(pos.shape[0])
        projection = (
            int(sd.text_encoder_2.config.projection_dim) if sd.text_encoder_2 is not None else int(pooled.shape[-1])
        )

        def time_ids(orig: Size | None, crop: Size, target: Size | None) -> torch.Tensor:
            ids = sd._get_add_time_ids(
                tuple(orig or (height, width)),
                tuple(crop),
                tuple(target or (height, width)),
                dtype=pos.dtype,
                text_encoder_projection_dim=projection,
            )
            return ids.to(self.device).repeat(rows, 1)

        pos_ids = time_ids(original_size, crops_coords_top_left, target_size)
        if not do_classifier_free_guidance:
            return PromptEmbeddings(text=pos, added={"text_embeds": pooled, "time_ids": pos_ids})
        if negative_original_size is not None and negative_target_size is not None:
            neg_ids = time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size)
        else:
            neg_ids = pos_ids  # as diffusers: without both negative sizes, the negatives share the time ids
        return PromptEmbeddings(
            text=torch.cat([neg, pos]),
            added={"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([neg_ids, pos_ids])},
        )

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
        schedule: ScheduleSpec | Any | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> FasterDiffusionOutput:
        """Generates images with SDXL.

        Args:
            prompt, prompt_2, negative_prompt, negative_prompt_2, height, width,
            num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, eta,
            generator, latents, output_type, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size: as in
                diffusers' ``StableDiffusionXLPipeline`` (``original_size`` and ``target_size``
                default to ``(height, width)``).
            schedule, noise_injection, parallel, max_decoder_rows, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in :meth:`FasterDiffusionPipeline.__call__`.

        Returns:
            :class:`~fd_trt.pipeline.FasterDiffusionOutput` with ``images`` and ``stats``.
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
        )
        return self._generate(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta,
            generator, latents, output_type, schedule, noise_injection, parallel, max_decoder_rows,
            callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_options=options,
            guidance_rescale=guidance_rescale,
        )


__all__ = ["FasterDiffusionXLPipeline", "is_sdxl"]
