"""DeepFloyd IF, stage I: a pixel-space UNet conditioned on T5 prompt embeddings.

What tells it apart from Stable Diffusion:

* no VAE: the UNet denoises the 64x64 image itself (3 channels in);
* a learned variance: the UNet predicts 6 channels, the noise and a variance interpolation
  (``out_channels = 2 * in_channels``); the scheduler (``DDPMScheduler`` with
  ``variance_type="learned_range"`` and dynamic thresholding) consumes all of them, and
  classifier-free guidance mixes the noise channels only, the variance being the conditional
  rows' (diffusers' ``IFPipeline``);
* T5 conditioning: the UNet pools the raw prompt embeddings into its time embedding
  (``addition_embed_type="text"``) and projects them to its cross-attention width
  (``encoder_hid_dim``, ``encoder_hid_dim_type="text_proj"``); the split graphs take the raw
  T5 embeddings (``[N, 77, d_model]``) and do both per row ([`fd_trt.graphs.split`][fd_trt.graphs.split]).

The authors' IF key steps (their ``if_demo.py`` runs stage I with the rule they call ``"100ls"``):
a step index ``i`` is a key step when ``i < 10``, ``i % 5 == 0`` or ``i > 85``
([`if_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_paper_key_steps]). Stage II (``IFSuperResolutionPipeline``, class-conditioned on the
noise level) is refused by the split so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.base import ModelFamily, PromptEmbeddings, config_value
from fd_trt.families.sd import UNET_CLASSES

#: IFPipeline.encode_prompt pads and truncates every prompt to 77 T5 tokens.
IF_TEXT_TOKENS = 77


def if_paper_key_steps(num_steps: int) -> list[int]:
    """The authors' DeepFloyd IF stage-I key steps for ``num_steps`` steps: every index below 10,
    every multiple of 5, and every index above 85 (their ``"100ls"`` rule, made for 100 DDPM steps;
    at 25 steps, as their demo runs it: 0..10, 15, 20)."""
    return [i for i in range(int(num_steps)) if i < 10 or i % 5 == 0 or i > 85]


def if_layout(unet_config: Any) -> tuple[int, bool]:
    """``(image channels, learned variance)`` of an IF UNet: ``out_channels`` is the image's
    channels (no learned variance) or twice them (noise and variance).

    Raises:
        UnsupportedModelError: for another channel layout (stage II's upscaled-image channels
            included, which fd_trt does not run yet).
    """
    cin, cout = int(config_value(unet_config, "in_channels", 3)), int(config_value(unet_config, "out_channels", 3))
    if cout == cin:
        return cin, False
    if cout == 2 * cin:
        return cin, True
    raise UnsupportedModelError(
        f"the IF UNet takes {cin} input channels and predicts {cout}: fd_trt runs DeepFloyd IF stage I, whose UNet "
        f"takes the image ({cin} channels) and predicts its noise ({cin}) or noise and learned variance "
        f"({2 * cin}); stage II (IFSuperResolutionPipeline: the upscaled image as extra channels) is not supported yet"
    )


class DeepFloydIFFamily(ModelFamily):
    """DeepFloyd IF stage I (``"if"``): a ``UNet2DConditionModel`` with ``addition_embed_type="text"``."""

    name = "if"
    description = (
        "DeepFloyd IF stage I: a pixel-space UNet2DConditionModel with T5 text conditioning "
        "(addition_embed_type='text', encoder_hid_dim) and a learned variance"
    )
    supports_controlnet = False

    def matches_config(self, unet_config: Any) -> bool:
        return (
            config_value(unet_config, "_class_name") in UNET_CLASSES
            and config_value(unet_config, "addition_embed_type") == "text"
        )

    def check_config(self, unet_config: Any) -> None:
        """The split's limits (stage II's class embedding among them) and IF's channel layout.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        if config_value(unet_config, "class_embed_type") is not None:
            raise UnsupportedModelError(
                f"the IF UNet has class_embed_type={config_value(unet_config, 'class_embed_type')!r} (stage II, "
                "IFSuperResolutionPipeline, conditioned on the noise level): fd_trt runs IF stage I (IFPipeline) only "
                "so far"
            )
        from fd_trt.graphs.split import check_supported_config

        check_supported_config(unet_config)
        if_layout(unet_config)

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """Refuses a pipeline without IF's prompt encoder, or with a ControlNet.

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        if not callable(getattr(sd_pipeline, "encode_prompt", None)) or not hasattr(sd_pipeline, "tokenizer"):
            raise InputError(
                f"{type(sd_pipeline).__name__} has an IF UNet (addition_embed_type='text') but no IF prompt encoder: "
                "wrap a diffusers IFPipeline"
            )
        if getattr(sd_pipeline, "text_encoder", None) is None:
            raise InputError(
                f"{type(sd_pipeline).__name__} has no text_encoder: fd_trt encodes the prompts itself; load the "
                "IFPipeline with its T5 text encoder"
            )
        if getattr(sd_pipeline, "controlnet", None) is not None:
            raise UnsupportedModelError("fd_trt runs DeepFloyd IF without a ControlNet")
        super().check_pipeline(sd_pipeline)

    def unet_kind(self, unet_config: Any) -> str:
        """``"text2img"``: the UNet takes the noisy image alone ([`if_layout()`][fd_trt.families.deepfloyd_if.if_layout] checks the channels)."""
        if_layout(unet_config)
        return "text2img"

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """diffusers' ``IFPipeline`` of the folder, without safety checker and watermarker."""
        from diffusers import IFPipeline

        return IFPipeline.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
        )

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(77, d_model)``: IF's prompt length and the T5 encoder's width (the UNet's ``encoder_hid_dim``)."""
        width = config_value(sd_pipeline.unet.config, "encoder_hid_dim")
        if width is None:
            width = sd_pipeline.text_encoder.config.d_model
        return IF_TEXT_TOKENS, int(width)

    def check_prompt_options(self, prompts: list[str], clean_caption: Any = False) -> None:
        """IF's one prompt option, ``clean_caption`` (diffusers' caption cleaning; needs bs4 and ftfy).

        Raises:
            InputError: for a value that is not a bool, or cleaning without its packages.
        """
        if not isinstance(clean_caption, bool):
            raise InputError(f"clean_caption must be True or False, got {clean_caption!r}")
        if clean_caption:
            import importlib.util

            missing = [m for m in ("bs4", "ftfy") if importlib.util.find_spec(m) is None]
            if missing:
                raise InputError(
                    f"clean_caption=True needs {' and '.join(missing)}: pip install beautifulsoup4 ftfy, or pass "
                    "clean_caption=False"
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
        clean_caption: bool = False,
    ) -> PromptEmbeddings:
        """diffusers' ``IFPipeline.encode_prompt``: T5 embeddings of 77 tokens, negatives first with CFG."""
        self.check_prompt_options(prompts, clean_caption=clean_caption)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        pos, neg = sd_pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            negative_prompt=negatives,
            clean_caption=clean_caption,
        )
        return PromptEmbeddings(text=torch.cat([neg, pos]) if do_classifier_free_guidance else pos)


def if_scheduler_config() -> dict[str, Any]:
    """IF stage I's scheduler: DDPM, cosine betas, learned-range variance, dynamic thresholding."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


def _random_if_pipeline(seed: int, unet_config: dict[str, Any], t5: dict[str, int]) -> Any:
    """An IFPipeline of seeded random weights: the given UNet and a T5 encoder over the word tokenizer."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from fd_trt.families.models import make_word_tokenizer

    tokenizer = make_word_tokenizer(max_length=IF_TEXT_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **t5,
            )
        )
    pipe = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        scheduler=DDPMScheduler(**if_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_if_pipeline(seed: int = 0, *, sample_size: int = 16, text_width: int = 24) -> Any:
    """A tiny DeepFloyd IF stage-I pipeline with seeded random weights, built in code (no download).

    IF's structure at toy widths: ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttn*`` blocks with
    added key/value attention and group-normalized text, scale-shift resnets, GELU, a T5 encoder
    of width ``text_width`` pooled into the time embedding and projected to the cross-attention
    width, 6 output channels (learned variance), and IF's DDPM scheduler.

    Returns:
        A ``diffusers.IFPipeline`` in float32 on the CPU; images are ``sample_size`` pixels square.
    """
    return _random_if_pipeline(
        seed,
        dict(
            sample_size=sample_size,
            in_channels=3,
            out_channels=6,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            cross_attention_dim=32,
            encoder_hid_dim=text_width,
            attention_head_dim=8,
            addition_embed_type="text",
            addition_embed_type_num_heads=2,
            cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift",
            act_fn="gelu",
            norm_num_groups=8,
        ),
        dict(d_model=text_width, d_kv=8, d_ff=2 * text_width, num_layers=2, num_heads=3),
    )


def if_m_arch_pipeline(seed: int = 0, *, text_width: int = 4096) -> Any:
    """IF-I-M's stage-I UNet (block widths 192-768, 3 layers per block, 64x64 pixels) with random
    weights, behind a 1-layer T5 of IF's width (4096; the text encoder is not what is measured).

    Returns:
        A ``diffusers.IFPipeline`` in float32 on the CPU.
    """
    return _random_if_pipeline(
        seed,
        dict(
            sample_size=64,
            in_channels=3,
            out_channels=6,
            layers_per_block=3,
            block_out_channels=(192, 384, 576, 768),
            down_block_types=(
                "ResnetDownsampleBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
            ),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=(
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "ResnetUpsampleBlock2D",
            ),
            cross_attention_dim=768,
            encoder_hid_dim=text_width,
            attention_head_dim=64,
            addition_embed_type="text",
            addition_embed_type_num_heads=64,
            cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift",
            resnet_skip_time_act=True,
            resnet_out_scale_factor=1.414,
            act_fn="gelu",
            time_embedding_act_fn="gelu",
            norm_num_groups=32,
        ),
        dict(d_model=text_width, d_kv=64, d_ff=256, num_layers=1, num_heads=4),
    )


__all__ = [
    "IF_TEXT_TOKENS",
    "DeepFloydIFFamily",
    "if_layout",
    "if_m_arch_pipeline",
    "if_paper_key_steps",
    "if_scheduler_config",
    "tiny_if_pipeline",
]
