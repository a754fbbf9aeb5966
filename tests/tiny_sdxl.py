"""Tiny SDXL-shaped UNet configurations (``addition_embed_type="text_time"``), built in code."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

#: name -> (UNet kwargs, pooled text width P, time_ids per row K).
SDXL_CONFIGS = {
    # SDXL base's layout in miniature: no attention at the top level, deeper transformers below.
    "sdxl_base_like": (
        dict(
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=32,
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        ),
        24,
        6,
    ),
    # The refiner's shape: five time_ids (aesthetic score instead of the target size).
    "sdxl_refiner_like": (
        dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=4,
            cross_attention_dim=24,
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 5 * 4,
        ),
        16,
        5,
    ),
}


def tiny_sdxl_unet(name: str = "sdxl_base_like", seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """A random-weight SDXL-shaped UNet from :data:`SDXL_CONFIGS`, in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=sample_size, **SDXL_CONFIGS[name][0]).eval()


def added_conditioning(name: str, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-row ``text_embeds [rows,P]`` and ``time_ids [rows,K]`` for a config, different per row."""
    _, pooled, k = SDXL_CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    # time_ids are sizes and crop offsets in pixels (or an aesthetic score): distinct per row.
    time_ids = torch.tensor([64.0, 96.0, 0.0, 8.0, 64.0, 96.0])[:k].repeat(rows, 1) + 16 * torch.arange(rows)[:, None]
    return {"text_embeds": torch.randn(rows, pooled, generator=gen), "time_ids": time_ids}
