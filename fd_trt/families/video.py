"""Text-to-video: ModelScope / VideoFusion (``UNet3DConditionModel``) and AnimateDiff (``UNetMotionModel``).

What tells them apart from Stable Diffusion:

* the latents are videos, ``[B, 4, F, h, w]`` (F frames), and the UNet denoises all frames of a
  video together: temporal layers inside its blocks mix the frames
  ([`fd_trt.graphs.split_video`][fd_trt.graphs.split_video] splits it; a sampler row is one video);
* ``"text-to-video"``: diffusers' ``TextToVideoSDPipeline`` (the ModelScope text-to-video model,
  VideoFusion's architecture, on which the paper measures video): a ``UNet3DConditionModel``
  with a temporal transformer after ``conv_in`` and temporal convolutions in every block;
* ``"animatediff"``: diffusers' ``AnimateDiffPipeline``: a Stable Diffusion 1.x UNet turned into
  a ``UNetMotionModel`` by a ``MotionAdapter`` (temporal transformers after the spatial layers).

Both condition on one CLIP prompt embedding per video (``StableDiffusionPipeline``'s
``encode_prompt``); the split repeats it per frame, as diffusers does. Their pipeline is
[`fd_trt.pipelines.video.FasterDiffusionVideoPipeline`][fd_trt.pipelines.video.FasterDiffusionVideoPipeline], on the torch or onnxruntime backend
(graphs over ``[rows, 4, F, h, w]`` latents, F fixed per graph: [`fd_trt.graphs.contract`][fd_trt.graphs.contract]).

[`tiny_text_to_video_pipeline()`][fd_trt.families.video.tiny_text_to_video_pipeline] and [`tiny_animatediff_pipeline()`][fd_trt.families.video.tiny_animatediff_pipeline] build both at toy widths
with seeded random weights (no download), as diffusers' own tests configure them;
[`modelscope_arch_pipeline()`][fd_trt.families.video.modelscope_arch_pipeline] and [`animatediff_arch_pipeline()`][fd_trt.families.video.animatediff_arch_pipeline] build them at the
real models' layouts (``MODELSCOPE_UNET3D_CONFIG``, SD 1.5's UNet and ``ANIMATEDIFF_MOTION_ADAPTER_CONFIG``),
random weights again, to measure speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.base import ModelFamily, PromptEmbeddings, config_value

#: ModelScope text-to-video's ``UNet3DConditionModel`` configuration (``damo-vilab/text-to-video-ms-1.7b``,
#: ``unet/config.json``; 1.41 B parameters).
MODELSCOPE_UNET3D_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=64,
)

#: AnimateDiff v2's ``MotionAdapter`` configuration for Stable Diffusion 1.5
#: (``guoyww/animatediff-motion-adapter-v1-5-2``, ``config.json``; 453 M parameters), the keys
#: diffusers' ``MotionAdapter`` takes.
ANIMATEDIFF_MOTION_ADAPTER_CONFIG: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280, 1280),
    motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1,
    motion_norm_num_groups=32,
    motion_num_attention_heads=8,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)


class VideoFamily(ModelFamily):
    """What the text-to-video families share: the UNet class they recognise, CLIP prompts, the checks."""

    #: The diffusers UNet class of the family.
    unet_class: str = ""
    #: The diffusers pipeline class the family wraps.
    pipeline_class: str = ""
    supports_controlnet = False

    def matches_config(self, unet_config: Any) -> bool:
        return config_value(unet_config, "_class_name") == self.unet_class

    def matches_pipeline(self, sd_pipeline: Any) -> bool:
        """A loaded pipeline's UNet by its class (a loaded model's config has no ``_class_name``)."""
        unet = getattr(sd_pipeline, "unet", None)
        return unet is not None and (type(unet).__name__ == self.unet_class or self.matches_config(unet.config))

    def check_config(self, unet_config: Any) -> None:
        """The split's limits ([`fd_trt.graphs.split_video.check_video_config()`][fd_trt.graphs.split_video.check_video_config]) and the channel layout.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        from fd_trt.graphs.split_video import check_video_config

        check_video_config(unet_config)
        self.unet_kind(unet_config)

    def unet_kind(self, unet_config: Any) -> str:
        """``"text2img"``: the UNet takes the noisy video latents alone.

        Raises:
            UnsupportedModelError: when its input and output channels differ.
        """
        cin, cout = config_value(unet_config, "in_channels", 4), config_value(unet_config, "out_channels", 4)
        if int(cin) != int(cout):
            raise UnsupportedModelError(
                f"the {self.unet_class} takes {cin} input channels and predicts {cout}: fd_trt runs text-to-video "
                "UNets that take the noisy latents alone (in_channels == out_channels)"
            )
        return "text2img"

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """Refuses a pipeline without the prompt encoder and VAE the video pipeline uses.

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        name = type(sd_pipeline).__name__
        for part in ("tokenizer", "text_encoder", "vae"):
            if getattr(sd_pipeline, part, None) is None:
                raise InputError(
                    f"{name} has no {part}: fd_trt encodes the prompts and decodes the frames itself; wrap a "
                    f"diffusers {self.pipeline_class} with its {part}"
                )
        if not callable(getattr(sd_pipeline, "encode_prompt", None)):
            raise InputError(
                f"{name} has a {self.unet_class} but no encode_prompt: wrap a diffusers {self.pipeline_class}"
            )
        if getattr(sd_pipeline, "controlnet", None) is not None:
            raise UnsupportedModelError(f"fd_trt runs {self.pipeline_class} without a ControlNet")
        super().check_pipeline(sd_pipeline)

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(L, D)``: the tokenizer's length and the CLIP text encoder's width (per video)."""
        return int(sd_pipeline.tokenizer.model_max_length), int(sd_pipeline.text_encoder.config.hidden_size)

    def graph_contract(
        self, sd_pipeline: Any, latent_size: tuple[int, int] | None = None, frames: int | None = None
    ) -> Any:
        """The contract of the video UNet's graphs for ``frames`` frames: latents ``[rows, C, F, h, w]``,
        features ``[rows, C', F, h', w']``, one text row per video ([`fd_trt.graphs.contract`][fd_trt.graphs.contract]).

        Raises:
            InputError: without ``frames`` (the graphs fix the frame count), or for a bad one.
        """
        from fd_trt.graphs.contract import GraphContract

        if frames is None:
            raise InputError(f"the {self.name!r} graphs are built for a frame count: pass frames=F to graph_contract")
        return GraphContract.from_unet_config(
            sd_pipeline.unet.config, latent_size, self.text_shape(sd_pipeline), {}, frames=frames
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
        **options: Any,
    ) -> PromptEmbeddings:
        """The wrapped pipeline's ``encode_prompt`` (``StableDiffusionPipeline``'s): one row per video,
        negatives first with CFG (the split repeats each row per frame)."""
        self.check_prompt_options(prompts, **options)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        pos, neg = sd_pipeline.encode_prompt(
            prompts, device, num_images_per_prompt, do_classifier_free_guidance, negatives
        )
        return PromptEmbeddings(text=torch.cat([neg, pos]) if do_classifier_free_guidance else pos)


class TextToVideoFamily(VideoFamily):
    """ModelScope / VideoFusion text-to-video (``"text-to-video"``): a ``UNet3DConditionModel``."""

    name = "text-to-video"
    description = (
        "text-to-video (ModelScope / VideoFusion, TextToVideoSDPipeline): a UNet3DConditionModel with temporal "
        "convolutions and attention, video latents [B, 4, F, h, w]"
    )
    unet_class = "UNet3DConditionModel"
    pipeline_class = "TextToVideoSDPipeline"

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """diffusers' ``TextToVideoSDPipeline`` of the folder."""
        from diffusers import TextToVideoSDPipeline

        return TextToVideoSDPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)


class AnimateDiffFamily(VideoFamily):
    """AnimateDiff (``"animatediff"``): a ``UNetMotionModel``, an SD 1.x UNet with a motion adapter."""

    name = "animatediff"
    description = (
        "AnimateDiff (AnimateDiffPipeline): a UNetMotionModel, a Stable Diffusion 1.x UNet with a MotionAdapter's "
        "temporal transformers, video latents [B, 4, F, h, w]"
    )
    unet_class = "UNetMotionModel"
    pipeline_class = "AnimateDiffPipeline"

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """As every video family, and refuses FreeNoise and FreeInit, which change the loop.

        Raises:
            InputError, UnsupportedModelError: naming what does not fit.
        """
        for flag, undo in (("free_noise_enabled", "disable_free_noise"), ("free_init_enabled", "disable_free_init")):
            if getattr(sd_pipeline, flag, False):
                raise UnsupportedModelError(
                    f"the AnimateDiffPipeline has {flag.replace('_enabled', '')} on, which fd_trt does not run: call "
                    f"pipe.{undo}() first"
                )
        super().check_pipeline(sd_pipeline)

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """diffusers' ``AnimateDiffPipeline`` of the folder (its UNet saved as a ``UNetMotionModel``)."""
        from diffusers import AnimateDiffPipeline

        return AnimateDiffPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)


def _tiny_clip(seed: int, width: int, max_length: int = 16) -> tuple[Any, Any]:
    """A word tokenizer and a 2-layer CLIP text encoder of ``width``, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from fd_trt.families.models import make_word_tokenizer

    tokenizer = make_word_tokenizer(max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return tokenizer, encoder.eval()


def _tiny_vae(sample_size: int) -> Any:
    """An AutoencoderKL with SD's 4 latent channels and a downsampling factor of 8, random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    ).eval()


def _text_to_video_pipeline(seed: int, unet_config: dict[str, Any], text_width: int, max_length: int) -> Any:
    """A ``TextToVideoSDPipeline`` of seeded random weights: a ``UNet3DConditionModel`` of
    ``unet_config``, a 2-layer CLIP text encoder of ``text_width``, the small VAE and DDIM."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    from fd_trt.families.models import sd_scheduler_config

    tokenizer, text_encoder = _tiny_clip(seed, text_width, max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet3DConditionModel(**unet_config)
        vae = _tiny_vae(unet_config["sample_size"])
    pipe = TextToVideoSDPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**sd_scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _animatediff_pipeline(
    seed: int,
    unet_config: dict[str, Any],
    adapter_config: dict[str, Any],
    text_width: int,
    max_length: int,
    motion_std: float,
) -> Any:
    """An ``AnimateDiffPipeline`` of seeded random weights: a ``UNet2DConditionModel`` of
    ``unet_config`` and a ``MotionAdapter`` of ``adapter_config`` (fused into a ``UNetMotionModel``),
    a 2-layer CLIP text encoder of ``text_width``, the small VAE and DDIM.

    diffusers zero-initialises the motion layers' output projections, which would make the adapter
    the identity and a test or a timing of the temporal layers vacuous: they are drawn from
    N(0, ``motion_std``) instead.
    """
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    from fd_trt.families.models import sd_scheduler_config

    tokenizer, text_encoder = _tiny_clip(seed, text_width, max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        adapter = MotionAdapter(**adapter_config)
        for name, param in adapter.named_parameters():
            if "proj_out" in name:
                torch.nn.init.normal_(param, std=motion_std)
        vae = _tiny_vae(unet_config["sample_size"])
    pipe = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=adapter,
        scheduler=DDIMScheduler(**sd_scheduler_config()),
    )
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text_to_video_pipeline(seed: int = 0, *, sample_size: int = 8, text_width: int = 16) -> Any:
    """A tiny ``TextToVideoSDPipeline`` with seeded random weights, built in code (no download).

    A ``UNet3DConditionModel`` of two blocks (``CrossAttnDownBlock3D``, ``DownBlock3D``), widths
    16-32, with its temporal transformer and convolutions, a 2-layer CLIP text encoder of
    ``text_width``, an AutoencoderKL with a downsampling factor of 8 and DDIM. Frames are
    ``8 * sample_size`` pixels square by default (64x64).
    """
    unet_config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    return _text_to_video_pipeline(seed, unet_config, text_width, max_length=16)


def tiny_animatediff_pipeline(seed: int = 0, *, sample_size: int = 8, text_width: int = 16) -> Any:
    """A tiny ``AnimateDiffPipeline`` with seeded random weights, built in code (no download).

    A ``UNet2DConditionModel`` of SD 1.x's block types at widths 16-32 and a ``MotionAdapter``
    (two motion layers per block, 2 heads), which the pipeline fuses into a ``UNetMotionModel``;
    a 2-layer CLIP text encoder of ``text_width``, an AutoencoderKL with a downsampling factor of
    8 and DDIM. Frames are ``8 * sample_size`` pixels square by default (64x64).
    """
    unet_config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    adapter_config = dict(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )
    return _animatediff_pipeline(seed, unet_config, adapter_config, text_width, max_length=16, motion_std=0.2)


def modelscope_arch_pipeline(seed: int = 0, *, sample_size: int = 16) -> Any:
    """ModelScope text-to-video's UNet (``MODELSCOPE_UNET3D_CONFIG``: block widths
    320/640/1280/1280, two layers per block, cross-attention width 1024, heads of 64 channels) with
    seeded random weights, built in code (no download).

    The text encoder is a 2-layer CLIP of the UNet's cross-attention width (1024; the text encoder is
    not what is measured) over the word tokenizer at 77 tokens; the VAE is small but keeps SD's
    downsampling factor of 8; DDIM with SD's betas. Use it to measure speed and FLOPs, not videos.

    Args:
        seed: seeds the weights.
        sample_size: the latent side (16: frames of 128x128 pixels).

    Returns:
        A float32 ``diffusers.TextToVideoSDPipeline`` on the CPU.
    """
    unet_config = {**MODELSCOPE_UNET3D_CONFIG, "sample_size": sample_size}
    return _text_to_video_pipeline(seed, unet_config, text_width=1024, max_length=77)


def animatediff_arch_pipeline(seed: int = 0, *, sample_size: int = 16) -> Any:
    """AnimateDiff at its real layout: Stable Diffusion 1.5's UNet (``SD15_UNET_CONFIG``) and the
    v1-5-2 motion adapter (``ANIMATEDIFF_MOTION_ADAPTER_CONFIG``: two motion layers per block, a
    motion mid block, 8 heads, 32 positions), with seeded random weights, built in code (no download).

    The motion layers' output projections, zero in diffusers, are drawn with a small deviation
    (0.002) that keeps the activations finite through the full depth. The text encoder is a 2-layer
    CLIP of width 768 over the word tokenizer at 77 tokens; the VAE is small but keeps SD's
    downsampling factor of 8; DDIM with SD's betas. Use it to measure speed and FLOPs, not videos.

    Args:
        seed: seeds the weights.
        sample_size: the latent side (16: frames of 128x128 pixels).

    Returns:
        A float32 ``diffusers.AnimateDiffPipeline`` (its UNet a ``UNetMotionModel``) on the CPU.
    """
    from fd_trt.families.models import SD15_UNET_CONFIG

    unet_config = {**SD15_UNET_CONFIG, "sample_size": sample_size}
    return _animatediff_pipeline(
        seed, unet_config, ANIMATEDIFF_MOTION_ADAPTER_CONFIG, text_width=768, max_length=77, motion_std=0.002
    )


__all__ = [
    "ANIMATEDIFF_MOTION_ADAPTER_CONFIG",
    "MODELSCOPE_UNET3D_CONFIG",
    "AnimateDiffFamily",
    "TextToVideoFamily",
    "VideoFamily",
    "animatediff_arch_pipeline",
    "modelscope_arch_pipeline",
    "tiny_animatediff_pipeline",
    "tiny_text_to_video_pipeline",
]
