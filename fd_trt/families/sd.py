"""Stable Diffusion 1.x/2.x: one CLIP text encoder and no added conditioning.

Its UNet takes the latents (text-to-image) or the latents, the mask and the masked image's
latents (the 9-channel inpainting UNet); its prompts are diffusers' ``StableDiffusionPipeline``
prompt embeddings. It is the one family so far that runs ControlNets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fd_trt.families.base import ModelFamily, PromptEmbeddings, config_value

#: The UNet classes whose configs the UNet families read (a config without ``_class_name``, as a
#: loaded model's, is taken for one).
UNET_CLASSES = (None, "UNet2DConditionModel")


class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x/2.x (``"sd"``): a ``UNet2DConditionModel`` without added conditioning."""

    name = "sd"
    description = (
        "Stable Diffusion 1.x/2.x: a UNet2DConditionModel with text cross-attention and no added conditioning, "
        "text-to-image or 9-channel inpainting"
    )
    supports_controlnet = True

    def matches_config(self, unet_config: Any) -> bool:
        """A ``UNet2DConditionModel`` config without ``addition_embed_type``. Options the split does
        not carry (``class_embed_type``, ...) are recognised here and refused by `check_config()`."""
        return (
            config_value(unet_config, "_class_name") in UNET_CLASSES
            and config_value(unet_config, "addition_embed_type") is None
        )

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """diffusers' ``StableDiffusionPipeline`` of the folder, without a safety checker."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, safety_checker=None, requires_safety_checker=False
        )

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(L, D)``: the tokenizer's length and the text encoder's width."""
        return int(sd_pipeline.tokenizer.model_max_length), int(sd_pipeline.text_encoder.config.hidden_size)

    def encode_prompt(
        self,
        sd_pipeline: Any,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        *,
        height: int,
        width: int,
        device: torch.device,
        **options: Any,
    ) -> PromptEmbeddings:
        """diffusers' ``StableDiffusionPipeline.encode_prompt`` (the image size is unused)."""
        self.check_prompt_options(prompts, **options)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        pos, neg = sd_pipeline.encode_prompt(
            prompts, device, num_images_per_prompt, do_classifier_free_guidance, negatives
        )
        return PromptEmbeddings(text=torch.cat([neg, pos]) if do_classifier_free_guidance else pos)


__all__ = ["UNET_CLASSES", "StableDiffusionFamily"]
