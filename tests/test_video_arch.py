"""The video builders at the real layouts, ``modelscope_arch_pipeline`` and ``animatediff_arch_pipeline``:
their configurations against the hub's (``damo-vilab/text-to-video-ms-1.7b`` ``unet/config.json``,
``guoyww/animatediff-motion-adapter-v1-5-2`` ``config.json``), built on the meta device, which
allocates no weights (the real builds take about 50 s and 10 GB each on a 2-core CPU)."""

import pytest
import torch

from fd_trt.families import family_for_pipeline
from fd_trt.families.models import SD15_UNET_CONFIG
from fd_trt.families.video import (
    ANIMATEDIFF_MOTION_ADAPTER_CONFIG,
    MODELSCOPE_UNET3D_CONFIG,
    animatediff_arch_pipeline,
    modelscope_arch_pipeline,
)


def params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def modelscope():
    with torch.device("meta"):
        return modelscope_arch_pipeline(seed=0, sample_size=16)


@pytest.fixture(scope="module")
def animatediff():
    with torch.device("meta"):
        return animatediff_arch_pipeline(seed=0, sample_size=16)


def test_modelscope_has_the_hub_unet3d_config(modelscope):
    cfg = modelscope.unet.config
    assert type(modelscope.unet).__name__ == "UNet3DConditionModel"
    assert family_for_pipeline(modelscope).name == "text-to-video"
    assert tuple(cfg.block_out_channels) == (320, 640, 1280, 1280)
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    assert tuple(cfg.up_block_types) == ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    assert (cfg.layers_per_block, cfg.cross_attention_dim, cfg.attention_head_dim) == (2, 1024, 64)
    assert (cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn) == (32, 1e-5, "silu")
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (4, 4, 16)
    assert MODELSCOPE_UNET3D_CONFIG["sample_size"] == 32  # the hub's; the builder takes the latent side
    assert 1.411e9 < params(modelscope.unet) < 1.412e9  # the "1.7B" model's UNet
    # A text encoder of the cross-attention width, kept small; 77 tokens; the VAE's factor of 8.
    text = modelscope.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers) == (1024, 2)
    assert modelscope.tokenizer.model_max_length == 77
    assert len(modelscope.vae.config.block_out_channels) == 4


def test_animatediff_has_sd15_and_the_v1_5_2_motion_adapter(animatediff):
    unet, adapter = animatediff.unet, animatediff.motion_adapter
    assert type(unet).__name__ == "UNetMotionModel"
    assert family_for_pipeline(animatediff).name == "animatediff"
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == SD15_UNET_CONFIG["block_out_channels"] == (320, 640, 1280, 1280)
    # SD 1.x's attention_head_dim=8 is its head count, which UNetMotionModel names as such.
    assert (cfg.layers_per_block, cfg.cross_attention_dim, cfg.num_attention_heads) == (2, 768, 8)
    acfg = adapter.config
    assert tuple(acfg.block_out_channels) == (320, 640, 1280, 1280)
    assert (acfg.motion_layers_per_block, acfg.motion_mid_block_layers_per_block) == (2, 1)
    assert (acfg.motion_num_attention_heads, acfg.motion_norm_num_groups, acfg.motion_max_seq_length) == (8, 32, 32)
    assert acfg.use_motion_mid_block is True
    for key, value in ANIMATEDIFF_MOTION_ADAPTER_CONFIG.items():
        assert (tuple(acfg[key]) if isinstance(value, tuple) else acfg[key]) == value, key
    # The fused UNet carries the motion settings, and SD 1.5's 860 M plus the adapter's 453 M weights.
    assert (cfg.motion_max_seq_length, cfg.motion_num_attention_heads, cfg.use_motion_mid_block) == (32, 8, True)
    assert 453.0e6 < params(adapter) < 453.5e6
    assert 1.3125e9 < params(unet) < 1.313e9
    text = animatediff.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers) == (768, 2)
    assert animatediff.tokenizer.model_max_length == 77
