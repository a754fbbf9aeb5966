"""Stable Diffusion XL (base and refiner): what tells it apart from SD 1.x/2.x."""

from __future__ import annotations

from typing import Any

from fd_trt.errors import UnsupportedModelError


def sdxl_text_shape(sd_pipeline: Any) -> tuple[int, int]:
    """``(L, D)`` of an SDXL pipeline's prompt embeddings: the tokenizers' length and the UNet's
    cross-attention width (both encoders' hidden states side by side; the refiner has only the
    second)."""
    tokenizer = sd_pipeline.tokenizer if getattr(sd_pipeline, "tokenizer", None) is not None else sd_pipeline.tokenizer_2
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
