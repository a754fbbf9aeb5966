"""Diffusion-transformer pipelines of seeded random weights, built in code (no download).

``tiny_dit_pipeline``, ``tiny_pixart_pipeline`` and ``tiny_sd3_pipeline`` are the test models of
the transformer families; ``pixart_arch_pipeline`` has PixArt-alpha's exact transformer config (the benchmark's
``pixart-arch``) and ``sd3_arch_pipeline`` SD3-medium's (``sd3-arch``), each with small random text
encoders and VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from fd_trt.families.models import make_word_tokenizer

#: PixArt-alpha's scheduler settings (its diffusers folders ship DPM-Solver++ with these).
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0
)


def _tiny_vae(seed: int, sample_px: int, latent_channels: int = 4, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=sample_px,
            **extra,
        )
    return vae.eval()


def tiny_dit_pipeline(seed: int = 0, *, sample_size: int = 8, learned_sigma: bool = True, layers: int = 4) -> Any:
    """A tiny ``DiTPipeline`` (class-conditional, DDIM) of seeded random weights.

    Args:
        seed: seeds the weights.
        sample_size: the latent side (images are 8x that).
        learned_sigma: ``out_channels = 2 x in_channels`` (the variance channels of DiT-XL/2).
        layers: transformer blocks.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8 if learned_sigma else 4,
            num_layers=layers,
            sample_size=sample_size,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_tiny_vae(seed, sample_size * 8), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixart_pipeline(
    seed: int, transformer_config: dict[str, Any], text_width: int, max_length: int, sigma: bool
) -> Any:
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_word_tokenizer(max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(**transformer_config)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=text_width,
                d_kv=8,
                d_ff=2 * text_width,
                num_layers=2,
                num_heads=2,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER, algorithm_type="dpmsolver++")
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=_tiny_vae(seed, int(transformer_config["sample_size"]) * 8),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 8,
    sigma: bool = False,
    layers: int = 4,
    additional_conditions: bool = False,
    max_length: int = 16,
) -> Any:
    """A tiny ``PixArtAlphaPipeline`` (or ``PixArtSigmaPipeline``) of seeded random weights: a
    T5 encoder over the word tokenizer, a PixArt transformer with learned variance, DPM-Solver++.

    Args:
        seed: seeds the weights.
        sample_size: the latent side.
        sigma: build a ``PixArtSigmaPipeline``.
        layers: transformer blocks.
        additional_conditions: resolution and aspect-ratio conditioning (PixArt-alpha at 1024 px).
        max_length: the prompt tokens (the pipeline's ``max_sequence_length``).
    """
    heads = 3 if additional_conditions else 2  # the size embeddings take a third of the width each
    cfg = dict(
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=8 * heads,
        caption_channels=32,
        sample_size=sample_size,
        patch_size=2,
        use_additional_conditions=additional_conditions,
    )
    return _pixart_pipeline(seed, cfg, 32, max_length, sigma)


#: PixArt-alpha XL/2 1024's transformer config (PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json).
PIXART_ALPHA_TRANSFORMER = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=128,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    attention_bias=True,
    use_additional_conditions=None,
)


def pixart_arch_pipeline(seed: int = 0, *, sample_size: int = 32) -> Any:
    """``pixart-arch``: PixArt-alpha XL/2's transformer config (28 blocks of width 1152, about 0.6 B
    parameters) with random weights; a small random T5 (width 4096 output, as PixArt's caption
    channels) and the tiny VAE. ``sample_size`` is the latent side (32 = 256x256 images); the
    additional conditions stay those of the 1024 model (``use_additional_conditions`` follows
    ``sample_size == 128``, as in diffusers)."""
    cfg = dict(PIXART_ALPHA_TRANSFORMER, sample_size=sample_size, use_additional_conditions=None)
    return _pixart_pipeline(seed, cfg, 4096, 120, sigma=False)


def _sd3_pipeline(
    seed: int,
    transformer_config: dict[str, Any],
    *,
    clip_width: int,
    clip_projections: tuple[int, int],
    t5_width: int,
    max_length: int,
    vae_factors: tuple[float, float],
) -> Any:
    """A ``StableDiffusion3Pipeline`` of seeded random weights around an ``SD3Transformer2DModel``
    config: two CLIP text encoders with projection (``clip_projections`` add up to the pooled
    width), a T5 encoder of width ``t5_width`` (the joint attention width) over the word tokenizer,
    the tiny VAE with SD3's ``(scaling_factor, shift_factor)`` and
    ``FlowMatchEulerDiscreteScheduler`` with SD3's ``shift=3.0``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = make_word_tokenizer(max_length=max_length)

    def clip(projection_dim: int) -> Any:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=clip_width,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=3,
                max_position_embeddings=max_length,
                projection_dim=projection_dim,
                hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_config)
        text_encoder = clip(clip_projections[0])
        text_encoder_2 = clip(clip_projections[1])
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=t5_width,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    vae = _tiny_vae(
        seed,
        int(transformer_config["sample_size"]) * 8,
        latent_channels=int(transformer_config["in_channels"]),
        scaling_factor=vae_factors[0],
        shift_factor=vae_factors[1],
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=make_word_tokenizer(max_length=max_length),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=make_word_tokenizer(max_length=max_length),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, *, sample_size: int = 8, layers: int = 4, max_length: int = 16) -> Any:
    """A tiny ``StableDiffusion3Pipeline`` of seeded random weights: two CLIP text encoders with
    projection (pooled widths 32 + 32) and a T5 encoder over the word tokenizer, an
    ``SD3Transformer2DModel`` (joint width 32, inner width 16), the tiny VAE with SD3's scaling and
    shift factors, and ``FlowMatchEulerDiscreteScheduler`` with SD3's ``shift=3.0``.

    Args:
        seed: seeds the weights.
        sample_size: the latent side.
        layers: joint transformer blocks.
        max_length: the CLIP tokenizers' length (the T5 length is the call's ``max_sequence_length``).
    """
    cfg = dict(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=max(16, sample_size),
    )
    return _sd3_pipeline(
        seed,
        cfg,
        clip_width=32,
        clip_projections=(32, 32),
        t5_width=32,
        max_length=max_length,
        vae_factors=(1.5035, 0.0609),
    )


#: Stable Diffusion 3 medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers,
#: transformer/config.json): 24 joint blocks of width 24 x 64 = 1536, patch 2, 16 latent channels,
#: T5-XXL's 4096-wide joint attention input, CLIP-L + CLIP-G pooled text (768 + 1280 = 2048).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

#: SD3's VAE ``(scaling_factor, shift_factor)`` (stable-diffusion-3-medium-diffusers, vae/config.json).
SD3_VAE_FACTORS = (1.5305, 0.0609)


def sd3_arch_config(sample_size: int = 32, layers: int | None = None) -> dict[str, Any]:
    """``sd3-arch``'s transformer config: ``SD3_MEDIUM_TRANSFORMER`` at latent side ``sample_size``
    (the position embedding table stays 192 x 192, so any side up to 192 fits), with ``layers``
    joint blocks (24 when ``None``)."""
    cfg = dict(SD3_MEDIUM_TRANSFORMER, sample_size=int(sample_size))
    if layers is not None:
        cfg["num_layers"] = int(layers)
    return cfg


def sd3_arch_pipeline(seed: int = 0, *, sample_size: int = 32, layers: int | None = None) -> Any:
    """``sd3-arch``: SD3-medium's ``SD3Transformer2DModel`` config (24 joint blocks of width 1536,
    about 2 B parameters) with random weights; small random CLIP encoders whose projections give
    SD3's pooled widths (768 + 1280), a small random T5 of SD3's joint width 4096 and the tiny VAE
    with 16 latent channels and SD3's factors; ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
    ``sample_size`` is the latent side (32 = 256x256 images, 128 = 1024x1024); ``layers`` cuts the
    joint blocks (for tests; ``None`` keeps 24). CLIP's sequences are 77 tokens, as SD3's."""
    return _sd3_pipeline(
        seed,
        sd3_arch_config(sample_size, layers),
        clip_width=32,
        clip_projections=(768, 1280),
        t5_width=int(SD3_MEDIUM_TRANSFORMER["joint_attention_dim"]),
        max_length=77,
        vae_factors=SD3_VAE_FACTORS,
    )


__all__ = [
    "PIXART_ALPHA_TRANSFORMER",
    "SD3_MEDIUM_TRANSFORMER",
    "SD3_VAE_FACTORS",
    "pixart_arch_pipeline",
    "sd3_arch_config",
    "sd3_arch_pipeline",
    "tiny_dit_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sd3_pipeline",
]


#: The default DiT's transformer (``--model default-dit``): PixArt-alpha's architecture (adaLN-single,
#: cross-attention to the prompt, patch 2) at width 128 and 8 blocks, on the default model's 4x16x16
#: latents and width-64 text states; epsilon prediction (no learned variance).
DEFAULT_DIT_TRANSFORMER = dict(
    PIXART_ALPHA_TRANSFORMER,
    num_attention_heads=4,
    attention_head_dim=32,
    out_channels=4,
    num_layers=8,
    cross_attention_dim=128,
    caption_channels=64,
    sample_size=16,
    use_additional_conditions=False,
)


def default_dit_scheduler() -> Any:
    """DPM-Solver++ (PixArt's sampler) over SD 1.x's noise schedule, on which the default DiT was trained."""
    from diffusers import DPMSolverMultistepScheduler

    from fd_trt.families.models import sd_scheduler_config

    return DPMSolverMultistepScheduler.from_config(sd_scheduler_config(), algorithm_type="dpmsolver++")


def default_dit_dir() -> Any:
    """The shipped default DiT folder (``fd_trt/assets/default_dit``), if this installation has one."""
    from fd_trt.families.models import ASSETS_DIR

    path = ASSETS_DIR / "default_dit"
    return path if (path / "model_index.json").is_file() else None


def load_default_dit(folder: Any = None) -> Any:
    """The default DiT as a diffusers ``PixArtAlphaPipeline`` in fp32.

    The folder holds the transformer and the scheduler; the tokenizer, text encoder and VAE are the
    default model's (``fd_trt/assets/default_model``), so plain diffusers loads it the same way::

        sd = StableDiffusionPipeline.from_pretrained(default_model_dir())
        PixArtAlphaPipeline.from_pretrained(default_dit_dir(), tokenizer=sd.tokenizer,
                                            text_encoder=sd.text_encoder, vae=sd.vae)

    Its prompts are at most 32 tokens: call diffusers' pipeline with ``max_sequence_length=32`` and
    ``use_resolution_binning=False`` (its bins are for 256 px and up).

    Args:
        folder: the DiT folder; the shipped one when ``None``.

    Raises:
        InputError: when the default model or the DiT folder is missing.
    """
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    from fd_trt.errors import InputError
    from fd_trt.families.models import default_model_dir

    folder = default_dit_dir() if folder is None else folder
    base = default_model_dir()
    if folder is None or base is None:
        raise InputError(
            "the default DiT needs fd_trt/assets/default_dit and fd_trt/assets/default_model; "
            "reinstall fd_trt, or train it with scripts/train_default_dit.py"
        )
    from diffusers.utils import logging as diffusers_logging

    sd = StableDiffusionPipeline.from_pretrained(
        base,
        unet=None,  # only its tokenizer, text encoder and VAE are borrowed
        local_files_only=True,
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "expected T5EncoderModel": the CLIP encoder is intended
    try:
        pipe = PixArtAlphaPipeline.from_pretrained(
            folder,
            tokenizer=sd.tokenizer,
            text_encoder=sd.text_encoder,
            vae=sd.vae,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
        )
    finally:
        diffusers_logging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe
