"""Stable Diffusion XL (base and refiner): what tells it apart from SD 1.x/2.x.

SDXL differs from SD 1.x/2.x only in its conditioning: two text encoders whose hidden states are
concatenated, the second one's pooled output, and the micro-conditioning ``time_ids``
(original size, crop corner, target size). The UNet adds an embedding of the last two to its time
embedding, so both graphs take them per row (see [`fd_trt.graphs.split`][fd_trt.graphs.split]). Prompt encoding is
diffusers' own ``StableDiffusionXLPipeline.encode_prompt``, called on the wrapped pipeline.

The refiner has no first text encoder and five time ids (original size, crop corner, aesthetic
score); how many the UNet takes is read from its config (``projection_class_embeddings_input_dim``
less the pooled width, over ``addition_time_embed_dim``), never assumed.

[`StableDiffusionXLFamily`][fd_trt.families.sdxl.StableDiffusionXLFamily] is the registered family (``"sdxl"``);
``fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline`` serves it, with SDXL's call arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.base import ModelFamily, PromptEmbeddings, config_value
from fd_trt.families.sd import UNET_CLASSES

Size = tuple[int, int]


def sdxl_text_shape(sd_pipeline: Any) -> tuple[int, int]:
    """``(L, D)`` of an SDXL pipeline's prompt embeddings: the tokenizers' length and the UNet's
    cross-attention width (both encoders' hidden states side by side; the refiner has only the
    second)."""
    tokenizer = (
        sd_pipeline.tokenizer if getattr(sd_pipeline, "tokenizer", None) is not None else sd_pipeline.tokenizer_2
    )
    return int(tokenizer.model_max_length), int(sd_pipeline.unet.config.cross_attention_dim)


def sdxl_added_shapes(sd_pipeline: Any) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of an SDXL pipeline's added conditioning: ``text_embeds`` (P, the second
    text encoder's projection width) and ``time_ids`` (K, what the UNet's ``add_embedding`` leaves
    for them: 6 for SDXL base, 5 for the refiner).

    The UNet config alone cannot tell P from K (``projection_class_embeddings_input_dim`` is
    ``P + K * addition_time_embed_dim``), so P comes from the text encoder.

    Raises:
        UnsupportedModelError: when the widths do not divide into whole time ids.
    """
    cfg = sd_pipeline.unet.config
    width = int(cfg.projection_class_embeddings_input_dim)
    if getattr(sd_pipeline, "text_encoder_2", None) is not None:
        pooled = int(sd_pipeline.text_encoder_2.config.projection_dim)
    else:
        pooled = int(sd_pipeline.text_encoder.config.hidden_size)
    per_id = int(cfg.addition_time_embed_dim)
    k, rest = divmod(width - pooled, per_id)
    if rest or k < 1:
        raise UnsupportedModelError(
            f"the UNet's add_embedding takes {width} features, which is not the pooled text width {pooled} plus "
            f"whole time ids of {per_id}: the text encoder does not fit this UNet"
        )
    return {"text_embeds": (pooled,), "time_ids": (k,)}


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
        raise InputError(
            f"{name} must be a pair of non-negative integers (height, width) or (top, left), got {value!r}"
        )


def _check_prompt_list(name: str, value: Any, count: int) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise InputError(f"{name} must be a string or a list of strings, got {value!r}")
    if len(value) != count:
        raise InputError(f"{len(value)} entries in {name} for {count} prompts: give one per prompt, or a single string")


class StableDiffusionXLFamily(ModelFamily):
    """SDXL base and refiner (``"sdxl"``): a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``."""

    name = "sdxl"
    description = (
        "Stable Diffusion XL, base or refiner: a UNet2DConditionModel with addition_embed_type='text_time' "
        "(pooled text embeddings and time ids), text-to-image and img2img"
    )
    supports_controlnet = False

    def matches_config(self, unet_config: Any) -> bool:
        return (
            config_value(unet_config, "_class_name") in UNET_CLASSES
            and config_value(unet_config, "addition_embed_type") == "text_time"
        )

    def check_config(self, unet_config: Any) -> None:
        """The split's limits, and SDXL's: text-to-image UNets only so far.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        super().check_config(unet_config)
        if self.unet_kind(unet_config) != "text2img":
            raise UnsupportedModelError(
                f"the SDXL UNet takes {config_value(unet_config, 'in_channels')} input channels (inpainting): fd_trt "
                "runs SDXL text-to-image only so far; use a StableDiffusionXLPipeline with a text-to-image UNet"
            )

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """Refuses an SDXL pipeline without its second text encoder, with a ControlNet or an
        inpainting UNet, or whose time-id layout does not fit its UNet ([`aesthetic_time_ids()`][fd_trt.families.sdxl.StableDiffusionXLFamily.aesthetic_time_ids]).

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        if not hasattr(sd_pipeline, "text_encoder_2"):
            raise InputError(
                f"{type(sd_pipeline).__name__} has an SDXL UNet (addition_embed_type='text_time') but no text_encoder_2: "
                "wrap a diffusers StableDiffusionXLPipeline (or StableDiffusionXLImg2ImgPipeline for the refiner)"
            )
        self.aesthetic_time_ids(sd_pipeline)  # a pipeline whose time-id layout does not fit its UNet fails now
        controlnet = getattr(sd_pipeline, "controlnet", None)
        if controlnet is not None or self.unet_kind(sd_pipeline.unet.config) != "text2img":
            what = "a ControlNet" if controlnet is not None else "an inpainting UNet"
            raise UnsupportedModelError(
                f"{type(sd_pipeline).__name__} has {what}: fd_trt runs SDXL text-to-image only so far; use a "
                "StableDiffusionXLPipeline with a text-to-image UNet"
            )
        super().check_pipeline(sd_pipeline)

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """diffusers' ``StableDiffusionXLPipeline`` of the folder, or ``StableDiffusionXLImg2ImgPipeline``
        when the folder names it (the refiner: no first text encoder, aesthetic score)."""
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )

        index = json.loads((Path(folder) / "model_index.json").read_text())
        img2img = "Img2Img" in str(index.get("_class_name", "")) or "requires_aesthetics_score" in index
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        # No invisible-watermark: fd_trt's images match diffusers' without one, and the package
        # is not a dependency.
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, add_watermarker=False)

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(L, D)`` of the prompt embeddings: both encoders' hidden states side by side ([`sdxl_text_shape()`][fd_trt.families.sdxl.sdxl_text_shape])."""
        return sdxl_text_shape(sd_pipeline)

    def added_shapes(self, sd_pipeline: Any) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the added conditioning ([`sdxl_added_shapes()`][fd_trt.families.sdxl.sdxl_added_shapes])."""
        return sdxl_added_shapes(sd_pipeline)

    def aesthetic_time_ids(self, sd_pipeline: Any) -> bool:
        """Whether the time ids end with an aesthetic score (the refiner: original size, crop
        corner, score; 5 ids) rather than the target size (base: 6 ids).

        The UNet's time-id count decides; a wrapped pipeline's ``requires_aesthetics_score``
        (diffusers' img2img pipeline) must agree with it.

        Raises:
            UnsupportedModelError: for a UNet that takes neither 5 nor 6 time ids.
            InputError: when ``requires_aesthetics_score`` contradicts the UNet.
        """
        k = int(self.added_shapes(sd_pipeline)["time_ids"][0])
        if k not in (5, 6):
            raise UnsupportedModelError(
                f"the UNet takes {k} time ids; fd_trt builds SDXL's 6 (original size, crop corner, target size) "
                "or the refiner's 5 (original size, crop corner, aesthetic score)"
            )
        requires = getattr(getattr(sd_pipeline, "config", None), "requires_aesthetics_score", None)
        if requires is not None and bool(requires) != (k == 5):
            raise InputError(
                f"the pipeline has requires_aesthetics_score={bool(requires)} but its UNet takes {k} time ids: set "
                f"pipe.register_to_config(requires_aesthetics_score={k == 5}) on the diffusers pipeline"
            )
        return k == 5

    def check_prompt_options(
        self,
        prompts: list[str],
        prompt_2: Any = None,
        negative_prompt_2: Any = None,
        original_size: Any = None,
        crops_coords_top_left: Any = (0, 0),
        target_size: Any = None,
        negative_original_size: Any = None,
        negative_crops_coords_top_left: Any = (0, 0),
        negative_target_size: Any = None,
        aesthetic_score: Any = 6.0,
        negative_aesthetic_score: Any = 2.5,
    ) -> None:
        """SDXL's second prompts and micro-conditioning sizes and scores.

        Raises:
            InputError: naming the bad value and what is expected.
        """
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
        for name, value in (
            ("aesthetic_score", aesthetic_score),
            ("negative_aesthetic_score", negative_aesthetic_score),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(
                    f"{name} must be a number (the refiner's aesthetic score, 6.0 / 2.5 by default), got {value!r}"
                )

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
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> PromptEmbeddings:
        """Both text encoders, the pooled embedding and the time ids per row.

        Text and pooled embeddings come from diffusers' ``StableDiffusionXLPipeline.encode_prompt``
        (penultimate hidden states of both encoders, ``force_zeros_for_empty_prompt``; the
        refiner's second encoder alone). The time ids are laid out as diffusers does: original
        size, crop corner, then the target size (base, 6 ids) or the aesthetic score (refiner, 5
        ids; the negative rows get ``negative_original_size`` (default: ``original_size``),
        ``negative_crops_coords_top_left`` and ``negative_aesthetic_score``). Unlike diffusers'
        text-to-image pipeline, which tiles ``[negative, positive]`` time ids over the batch,
        every negative row gets the negative time ids when the batch has more than one image; the
        two agree whenever the negative micro-conditioning is the default.

        Returns:
            [`PromptEmbeddings`][fd_trt.families.base.PromptEmbeddings] with ``text [R,L,D]`` and ``added`` =
            ``{"text_embeds": [R,P], "time_ids": [R,K]}``, negative rows first with CFG.
        """
        pos, neg, pooled, neg_pooled = sd_pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
        )
        rows = int(pos.shape[0])
        aesthetic = self.aesthetic_time_ids(sd_pipeline)
        original = tuple(original_size or (height, width))

        def time_ids(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor([list(values)], dtype=pos.dtype, device=device).repeat(rows, 1)

        if aesthetic:
            pos_ids = time_ids([*original, *crops_coords_top_left, float(aesthetic_score)])
        else:
            pos_ids = time_ids([*original, *crops_coords_top_left, *(target_size or (height, width))])
        if not do_classifier_free_guidance:
            return PromptEmbeddings(text=pos, added={"text_embeds": pooled, "time_ids": pos_ids})
        if aesthetic:
            neg_ids = time_ids(
                [
                    *(negative_original_size or original),
                    *negative_crops_coords_top_left,
                    float(negative_aesthetic_score),
                ]
            )
        elif negative_original_size is not None and negative_target_size is not None:
            neg_ids = time_ids([*negative_original_size, *negative_crops_coords_top_left, *negative_target_size])
        else:
            neg_ids = pos_ids  # as diffusers: without both negative sizes, the negatives share the time ids
        return PromptEmbeddings(
            text=torch.cat([neg, pos]),
            added={"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([neg_ids, pos_ids])},
        )


__all__ = ["StableDiffusionXLFamily", "is_sdxl", "sdxl_added_shapes", "sdxl_text_shape"]
