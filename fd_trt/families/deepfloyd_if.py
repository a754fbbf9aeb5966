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
  (``encoder_hid_dim``, ``encoder_hid_dim_type="text_proj"``). Neither depends on the timestep:
  [`encode_prompt()`][fd_trt.families.deepfloyd_if.DeepFloydIFFamily.encode_prompt] computes both once per generation
  ([`fd_trt.graphs.split.TextConditioning`][fd_trt.graphs.split.TextConditioning]), and the split graphs take the projected prompt
  (``[N, 77, cross_attention_dim]``) and the pooled one (the added input ``text_pooled``).

The authors' IF key steps (their ``if_demo.py`` runs stage I with the rule they call ``"100ls"``):
a step index ``i`` is a key step when ``i < 10``, ``i % 5 == 0`` or ``i > 85``
([`if_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_paper_key_steps]).

Stage II (``IFSuperResolutionPipeline``, [`DeepFloydIFSuperResolutionFamily`][fd_trt.families.deepfloyd_if.DeepFloydIFSuperResolutionFamily]) is the same UNet with
two more inputs: the upscaled stage-I image, concatenated after the noisy image along the
channels (``in_channels = 2 x`` the image's), and its noise level, embedded like a timestep
(``class_embed_type="timestep"``) and added to the time embedding. Both graphs take the noise
level per row as the added input ``class_labels [N,1]``. The authors' stage-II key steps (the
loop of their ``register_if2``, made for 50 steps): ``i < 20``, ``i % 2 == 0`` or ``i > 40``
([`if_sr_paper_key_steps()`][fd_trt.families.deepfloyd_if.if_sr_paper_key_steps]).
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


def if_sr_paper_key_steps(num_steps: int) -> list[int]:
    """The authors' DeepFloyd IF stage-II key steps for ``num_steps`` steps: every index below 20,
    every even index, and every index above 40 (the rule of their stage-II sampling loop, made for
    50 steps; at 25 steps, as their demo runs it, every step but 21 and 23)."""
    return [i for i in range(int(num_steps)) if i < 20 or i % 2 == 0 or i > 40]


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
        f"the IF UNet takes {cin} input channels and predicts {cout}: a DeepFloyd IF stage-I UNet takes the image "
        f"({cin} channels) and predicts its noise ({cin}) or noise and learned variance ({2 * cin}); a stage-II UNet "
        "(IFSuperResolutionPipeline) has class_embed_type='timestep'"
    )


def if_sr_layout(unet_config: Any) -> tuple[int, bool]:
    """``(image channels, learned variance)`` of an IF stage-II UNet: it takes the noisy image and
    the upscaled image (``in_channels = 2 x`` the image's) and predicts the noise, or noise and
    learned variance.

    Raises:
        UnsupportedModelError: for another channel layout.
    """
    cin, cout = int(config_value(unet_config, "in_channels", 6)), int(config_value(unet_config, "out_channels", 6))
    image = cin // 2
    if cin % 2 == 0 and cout in (image, 2 * image):
        return image, cout == 2 * image
    raise UnsupportedModelError(
        f"the IF stage-II UNet takes {cin} input channels and predicts {cout}: a stage-II UNet takes the noisy "
        "image and the upscaled image (twice the image's channels) and predicts the noise (the image's channels) "
        "or noise and learned variance (twice them)"
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

    #: The diffusers pipeline this family wraps, for messages.
    diffusers_class = "IFPipeline"

    def image_layout(self, unet_config: Any) -> tuple[int, bool]:
        """``(image channels, learned variance)`` of this family's UNet ([`if_layout()`][fd_trt.families.deepfloyd_if.if_layout])."""
        return if_layout(unet_config)

    def check_config(self, unet_config: Any) -> None:
        """The split's limits and IF's channel layout; a class embedding other than stage II's
        (which [`DeepFloydIFSuperResolutionFamily`][fd_trt.families.deepfloyd_if.DeepFloydIFSuperResolutionFamily] runs) is refused.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        if config_value(unet_config, "class_embed_type") is not None:
            raise UnsupportedModelError(
                f"the IF UNet has class_embed_type={config_value(unet_config, 'class_embed_type')!r}: fd_trt runs IF "
                "stage I (IFPipeline, no class embedding) and stage II (IFSuperResolutionPipeline, "
                "class_embed_type='timestep': the noise level) only"
            )
        from fd_trt.graphs.split import check_supported_config

        check_supported_config(unet_config)
        self.image_layout(unet_config)

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """Refuses a pipeline without IF's prompt encoder, or with a ControlNet.

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        if not callable(getattr(sd_pipeline, "encode_prompt", None)) or not hasattr(sd_pipeline, "tokenizer"):
            raise InputError(
                f"{type(sd_pipeline).__name__} has an IF UNet (addition_embed_type='text') but no IF prompt encoder: "
                f"wrap a diffusers {self.diffusers_class}"
            )
        if getattr(sd_pipeline, "text_encoder", None) is None:
            raise InputError(
                f"{type(sd_pipeline).__name__} has no text_encoder: fd_trt encodes the prompts itself; load the "
                f"{self.diffusers_class} with its T5 text encoder"
            )
        if getattr(sd_pipeline, "controlnet", None) is not None:
            raise UnsupportedModelError("fd_trt runs DeepFloyd IF without a ControlNet")
        super().check_pipeline(sd_pipeline)

    def unet_kind(self, unet_config: Any) -> str:
        """``"text2img"``: the UNet takes the noisy image alone ([`if_layout()`][fd_trt.families.deepfloyd_if.if_layout] checks the channels)."""
        self.image_layout(unet_config)
        return "text2img"

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """The folder's diffusers pipeline of this stage (``IFPipeline``, ``IFSuperResolutionPipeline``),
        without safety checker and watermarker."""
        import diffusers

        return getattr(diffusers, self.diffusers_class).from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
        )

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(77, cross_attention_dim)``: IF's prompt length and the width the UNet projects the T5
        embeddings to; the graphs take the projected prompt ([`encode_prompt()`][fd_trt.families.deepfloyd_if.DeepFloydIFFamily.encode_prompt])."""
        return IF_TEXT_TOKENS, int(config_value(sd_pipeline.unet.config, "cross_attention_dim"))

    def added_shapes(self, sd_pipeline: Any) -> dict[str, tuple[int, ...]]:
        """``{"text_pooled": (E,)}``, the pooled prompt (the time embedding's width E), and stage
        II's ``"class_labels": (1,)``."""
        from fd_trt.graphs.contract import default_added_shapes

        return default_added_shapes(sd_pipeline.unet.config)

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
        """diffusers' ``IFPipeline.encode_prompt`` (T5 embeddings of 77 tokens, negatives first with
        CFG), then the UNet's timestep-free text conditioning of them, once for the whole
        generation ([`fd_trt.graphs.split.TextConditioning`][fd_trt.graphs.split.TextConditioning]): ``text`` is the prompt projected to the
        cross-attention width, ``added["text_pooled"]`` its attention pooling."""
        from fd_trt.graphs.split import if_text_conditioning

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
        raw = torch.cat([neg, pos]) if do_classifier_free_guidance else pos
        projected, pooled = if_text_conditioning(sd_pipeline.unet, raw)
        return PromptEmbeddings(text=projected, added={"text_pooled": pooled})


#: The noise level diffusers' ``IFSuperResolutionPipeline`` adds to the upscaled image by default.
IF_SR_NOISE_LEVEL = 250


class DeepFloydIFSuperResolutionFamily(DeepFloydIFFamily):
    """DeepFloyd IF stage II (``"if-ii"``): IF's UNet with the upscaled image as extra input
    channels and its noise level as class labels (``class_embed_type="timestep"``)."""

    name = "if-ii"
    description = (
        "DeepFloyd IF stage II: IF's UNet with the upscaled stage-I image as extra input channels and its "
        "noise level as class labels (class_embed_type='timestep')"
    )
    diffusers_class = "IFSuperResolutionPipeline"

    def matches_config(self, unet_config: Any) -> bool:
        return super().matches_config(unet_config) and config_value(unet_config, "class_embed_type") == "timestep"

    def image_layout(self, unet_config: Any) -> tuple[int, bool]:
        """``(image channels, learned variance)`` of a stage-II UNet ([`if_sr_layout()`][fd_trt.families.deepfloyd_if.if_sr_layout])."""
        return if_sr_layout(unet_config)

    def check_config(self, unet_config: Any) -> None:
        """The split's limits and stage II's channel layout.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        from fd_trt.graphs.split import check_supported_config

        check_supported_config(unet_config)
        self.image_layout(unet_config)

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """As stage I's, and refuses a pipeline without the scheduler that noises the upscaled image.

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        if getattr(sd_pipeline, "image_noising_scheduler", None) is None or not callable(
            getattr(sd_pipeline, "preprocess_image", None)
        ):
            raise InputError(
                f"{type(sd_pipeline).__name__} has an IF stage-II UNet (class_embed_type='timestep') but no "
                "image_noising_scheduler or preprocess_image: wrap a diffusers IFSuperResolutionPipeline"
            )
        super().check_pipeline(sd_pipeline)

    def unet_kind(self, unet_config: Any) -> str:
        """``"superres"``: the UNet takes the noisy image and the upscaled image ([`if_sr_layout()`][fd_trt.families.deepfloyd_if.if_sr_layout])."""
        self.image_layout(unet_config)
        return "superres"

    def check_prompt_options(
        self, prompts: list[str], clean_caption: Any = False, noise_level: Any = IF_SR_NOISE_LEVEL
    ) -> None:
        """Stage II's prompt options: ``clean_caption`` (as stage I's) and ``noise_level``, the
        noise added to the upscaled image, which conditions the UNet.

        Raises:
            InputError: for a ``noise_level`` that is no integer in [0, 1000), or a bad ``clean_caption``.
        """
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < 1000:
            raise InputError(
                f"noise_level must be an integer in [0, 1000) (the noise added to the upscaled image; diffusers' "
                f"default is {IF_SR_NOISE_LEVEL}), got {noise_level!r}"
            )
        super().check_prompt_options(prompts, clean_caption=clean_caption)

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
        noise_level: int = IF_SR_NOISE_LEVEL,
    ) -> PromptEmbeddings:
        """Stage I's text conditioning, and the noise level of every row as ``class_labels [R,1]``."""
        self.check_prompt_options(prompts, clean_caption=clean_caption, noise_level=noise_level)
        cond = super().encode_prompt(
            sd_pipeline,
            prompts,
            negative_prompt,
            num_images_per_prompt,
            do_classifier_free_guidance,
            height=height,
            width=width,
            device=device,
            clean_caption=clean_caption,
        )
        labels = torch.full((cond.rows, 1), float(noise_level), device=device, dtype=torch.float32)
        return PromptEmbeddings(text=cond.text, added={**(cond.added or {}), "class_labels": labels})


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


def if_sr_scheduler_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """IF stage II's two schedulers: the sampler's (as stage I's, with ``sample_max_value=1``) and
    the ``image_noising_scheduler`` that noises the upscaled image (DDPM, cosine betas)."""
    sampler = {**if_scheduler_config(), "sample_max_value": 1.0}
    noising = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    return sampler, noising


def _random_if_pipeline(seed: int, unet_config: dict[str, Any], t5: dict[str, int], *, stage: int = 1) -> Any:
    """An IF pipeline of seeded random weights (``IFPipeline`` for stage 1,
    ``IFSuperResolutionPipeline`` for stage 2): the given UNet and a T5 encoder over the word tokenizer."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
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
    common = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    if stage == 2:
        sampler, noising = if_sr_scheduler_configs()
        pipe = IFSuperResolutionPipeline(
            scheduler=DDPMScheduler(**sampler), image_noising_scheduler=DDPMScheduler(**noising), **common
        )
    else:
        pipe = IFPipeline(scheduler=DDPMScheduler(**if_scheduler_config()), **common)
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


def tiny_if_sr_pipeline(seed: int = 0, *, sample_size: int = 32, text_width: int = 24) -> Any:
    """A tiny DeepFloyd IF stage-II pipeline with seeded random weights, built in code (no download).

    [`tiny_if_pipeline()`][fd_trt.families.deepfloyd_if.tiny_if_pipeline]'s structure with stage II's inputs: 6 input channels (the noisy
    image and the upscaled one), 6 output channels (noise and learned variance), the noise level
    embedded as a timestep (``class_embed_type="timestep"``), and IF stage II's two schedulers.

    Returns:
        A ``diffusers.IFSuperResolutionPipeline`` in float32 on the CPU; images are ``sample_size``
        pixels square.
    """
    return _random_if_pipeline(
        seed,
        dict(
            sample_size=sample_size,
            in_channels=6,
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
            class_embed_type="timestep",
            cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift",
            act_fn="gelu",
            norm_num_groups=8,
        ),
        dict(d_model=text_width, d_kv=8, d_ff=2 * text_width, num_layers=2, num_heads=3),
        stage=2,
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
    "IF_SR_NOISE_LEVEL",
    "IF_TEXT_TOKENS",
    "DeepFloydIFFamily",
    "DeepFloydIFSuperResolutionFamily",
    "if_layout",
    "if_m_arch_pipeline",
    "if_paper_key_steps",
    "if_scheduler_config",
    "if_sr_layout",
    "if_sr_paper_key_steps",
    "if_sr_scheduler_configs",
    "tiny_if_pipeline",
    "tiny_if_sr_pipeline",
]
