"""Model factories and local loading: tiny SD pipelines built in code, and diffusers folders.

Nothing here touches a network: diffusers folders load with ``local_files_only=True`` and
safetensors only, and the tiny models are built from configs with seeded random weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError, UnsupportedModelError

logger = logging.getLogger(__name__)

#: Words the tiny tokenizer knows as whole tokens; anything else is spelled out byte by byte.
TINY_WORDS: tuple[str, ...] = (
    "a an the and on of in with at to small large big tiny",
    "red orange yellow green cyan blue purple magenta pink white black gray brown",
    "circle square triangle star diamond cross ring shape shapes",
    "left right top bottom middle center background plain textured striped dotted",
    "photo picture image drawing of cat dog house tree car sky",
)

SCHEDULERS = ("ddim", "dpmpp", "pndm", "euler", "ddpm")

#: The flow-matching schedulers (SD3's): Euler (``FlowMatchEulerDiscreteScheduler``, SD3's own) and Heun.
FLOW_SCHEDULERS = ("flow-euler", "flow-heun")


def is_flow_config(config: dict[str, Any] | Any) -> bool:
    """Whether a scheduler config is a flow-matching scheduler's (a ``shift`` and no betas)."""
    cfg = dict(config)
    return str(cfg.get("_class_name", "")).startswith("FlowMatch") or ("shift" in cfg and "beta_start" not in cfg)


def _bytes_to_unicode() -> list[str]:
    # The printable-byte alphabet of byte-level BPE (as in CLIP / GPT-2): 256 symbols, one per byte.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def make_word_tokenizer(words: Iterable[str] = TINY_WORDS, max_length: int = 16) -> Any:
    """Builds a CLIP tokenizer whose vocabulary is the byte alphabet plus whole-word tokens.

    Args:
        words: strings of space-separated words that become single tokens.
        max_length: the tokenizer's ``model_max_length`` (the text encoder's sequence length).

    Returns:
        A ``transformers.CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    # CLIP's BPE merges the lowest-ranked adjacent pair first, across the whole word, so a merge
    # list built word by word can let one word's merge split another word (e.g. "an" inside
    # "cyan"). Simulate BPE on each word and append merges until it is one token: an appended merge
    # ranks last, so it never changes how an earlier word is merged.
    merges: list[tuple[str, str]] = []
    rank: dict[tuple[str, str], int] = {}
    for word in sorted({w for line in words for w in line.split()}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(rank.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            known = [(r, i) for r, i in pairs if r is not None]
            if known:
                i = min(known)[1]
            else:
                i = 0
                rank[(parts[0], parts[1])] = len(merges)
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def sd_scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.x's scheduler settings."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_scheduler(name: str, config: dict[str, Any] | Any | None = None) -> Any:
    """Creates a diffusers scheduler by short name, from another scheduler's config.

    Args:
        name: ``ddim``, ``dpmpp`` (DPM-Solver++ multistep), ``pndm``, ``euler`` or ``ddpm`` for
            the models trained with betas (SD, SDXL, DiT, PixArt); ``flow-euler`` or ``flow-heun``
            for the flow-matching ones (SD3).
        config: a scheduler config (dict or FrozenDict); SD 1.x settings when omitted.

    Raises:
        InputError: for an unknown name, or a flow-matching name for a model with betas (and the
            other way round).
    """
    import diffusers

    classes = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "dpmpp": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "flow-euler": (diffusers.FlowMatchEulerDiscreteScheduler, {}),
        "flow-heun": (diffusers.FlowMatchHeunDiscreteScheduler, {}),
    }
    key = str(name).lower()
    if key not in classes:
        raise InputError(
            f"unsupported scheduler {name!r}: choose one of {', '.join(SCHEDULERS)} "
            f"(or {', '.join(FLOW_SCHEDULERS)} for a flow-matching model such as SD3)"
        )
    cls, overrides = classes[key]
    cfg = dict(config) if config is not None else sd_scheduler_config()
    flow = is_flow_config(cfg)
    if key in FLOW_SCHEDULERS and not flow:
        raise InputError(
            f"scheduler {name!r} is a flow-matching scheduler, but this model's scheduler has betas: "
            f"choose one of {', '.join(SCHEDULERS)}"
        )
    if key not in FLOW_SCHEDULERS and flow:
        raise InputError(
            f"scheduler {name!r} needs a model trained with betas, but this model is flow matching (SD3): "
            f"choose one of {', '.join(FLOW_SCHEDULERS)}"
        )
    return cls.from_config({**cfg, **overrides})


def scheduler_name(scheduler: Any) -> str | None:
    """The short name (``ddim``, ``dpmpp``, ...) of a diffusers scheduler, or ``None`` for others."""
    cls = type(scheduler).__name__
    if cls == "DPMSolverMultistepScheduler":
        return "dpmpp" if scheduler.config.get("algorithm_type") == "dpmsolver++" else None
    return {
        "DDIMScheduler": "ddim",
        "PNDMScheduler": "pndm",
        "EulerDiscreteScheduler": "euler",
        "DDPMScheduler": "ddpm",
        "FlowMatchEulerDiscreteScheduler": "flow-euler",
        "FlowMatchHeunDiscreteScheduler": "flow-heun",
    }.get(cls)


def _random_sd_pipeline(
    seed: int,
    unet_config: dict[str, Any],
    text_width: int,
    text_intermediate: int,
    text_layers: int,
    text_heads: int,
    max_length: int,
) -> Any:
    """A StableDiffusionPipeline of seeded random weights: the given UNet, a CLIP text encoder over
    the word tokenizer, and a tiny VAE with SD's downsampling factor of 8."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_word_tokenizer(max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=int(unet_config["sample_size"]) * 8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=text_intermediate,
                num_hidden_layers=text_layers,
                num_attention_heads=text_heads,
                max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0, *, cross_attention_dim: int = 32, sample_size: int = 8) -> Any:
    """A tiny Stable Diffusion pipeline with seeded random weights, built in code (no download).

    The structure is SD's: CLIP text encoder + tokenizer, AutoencoderKL with a downsampling factor
    of 8, UNet2DConditionModel with cross-attention, DDIM scheduler. Images are
    ``8 * sample_size`` pixels square by default (64x64).

    Args:
        seed: seeds the weights; the same seed gives the same model.
        cross_attention_dim: width of the text encoder and of the UNet's cross-attention.
        sample_size: the UNet's default latent size.

    Returns:
        A ``diffusers.StableDiffusionPipeline`` in float32 on the CPU.
    """
    return _random_sd_pipeline(
        seed,
        dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        text_width=cross_attention_dim,
        text_intermediate=2 * cross_attention_dim,
        text_layers=2,
        text_heads=2,
        max_length=16,
    )


#: The package's shipped models (fd_trt/assets).
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def default_model_dir() -> Path | None:
    """The shipped trained default model folder, if this installation has one."""
    path = ASSETS_DIR / "default_model"
    return path if (path / "model_index.json").is_file() else None


#: The shipped models that ``--model`` / ``from_pretrained`` accept by name, besides local folders.
BUILTIN_MODELS = ("default", "default-dit")


def builtin_model_dir(name: str | os.PathLike[str]) -> Path | None:
    """The folder of a shipped model named in `BUILTIN_MODELS` (``None`` for other names, or when
    this installation lacks it)."""
    if str(name) == "default":
        return default_model_dir()
    if str(name) == "default-dit":
        from fd_trt.families.dit_models import default_dit_dir

        return default_dit_dir()
    return None


def model_folder(model: str | os.PathLike[str]) -> Path | None:
    """The local folder a ``--model`` value names: a shipped model's (`BUILTIN_MODELS`; ``None`` when
    this installation lacks it), or ``model`` itself."""
    if str(model) in BUILTIN_MODELS:
        return builtin_model_dir(model)
    return Path(model)


def default_controlnet_dir() -> Path | None:
    """The shipped ControlNet of the default model (silhouette masks), if this installation has one."""
    path = ASSETS_DIR / "default_controlnet"
    return path if (path / "config.json").is_file() else None


def check_controlnet_fits(net: Any, unet_config: Any) -> None:
    """Checks that a ControlNet's residuals fit a UNet: same block widths, block types, layers and text width.

    Args:
        net: a ``ControlNetModel``.
        unet_config: the UNet's config.

    Raises:
        InputError: naming the values that differ; for the shipped default ControlNet, saying which
            model it was trained for.
    """
    keys = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "in_channels")
    cfg = net.config
    diff = []
    for k in keys:
        a, b = cfg.get(k), unet_config.get(k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            diff.append(f"{k}: ControlNet {a!r}, UNet {b!r}")
    if not diff:
        return
    if getattr(net, "_fd_trt_default", False):
        raise InputError(
            "the default ControlNet was trained for fd_trt's default model (fd_trt/assets/default_model) and does not "
            f"fit this UNet ({'; '.join(diff)}): use --model default with it, or pass a ControlNet folder trained for your model"
        )
    raise InputError(
        f"the ControlNet does not fit the UNet ({'; '.join(diff)}): pass a ControlNet trained for this model"
    )


def load_diffusers_pipeline(source: str | os.PathLike[str]) -> tuple[Any, str]:
    """Loads a diffusers pipeline from a local folder, or the built-in default.

    The folder's model family ([`fd_trt.families.base.family_for_config()`][fd_trt.families.base.family_for_config]) is read from its
    ``unet/config.json`` and checks it before any weights load; the family loads the pipeline
    ([`load_pipeline()`][fd_trt.families.base.ModelFamily.load_pipeline]).

    Args:
        source: ``"default"``, ``"default-dit"`` (the shipped models) or the path of a local diffusers
            folder (``model_index.json``, safetensors weights).

    Returns:
        ``(pipeline, description)``.

    Raises:
        InputError: when the folder does not exist or is not a diffusers pipeline folder.
        UnsupportedModelError: when no registered family recognises its UNet, or its family
            refuses it.
    """
    if str(source) == "default":
        shipped = default_model_dir()
        if shipped is not None:
            return load_diffusers_pipeline(shipped)[0], f"default model ({shipped})"
        return tiny_sd_pipeline(), "default: tiny random-weight SD (no trained default model is installed yet)"
    if str(source) == "default-dit":
        from fd_trt.families.dit_models import load_default_dit

        dit = builtin_model_dir(source)
        return load_default_dit(dit), f"default DiT ({dit})"
    path = Path(source)
    if not path.is_dir():
        raise InputError(
            f"model {str(source)!r} is not a local folder; fd_trt never downloads. Pass 'default', 'default-dit' or the path "
            "of a diffusers Stable Diffusion folder (with model_index.json)"
        )
    if not (path / "model_index.json").is_file():
        raise InputError(f"{path} has no model_index.json: it is not a diffusers pipeline folder")
    from fd_trt.families.base import family_for_config

    unet_config = read_unet_config(path)
    # The family and what it refuses come from the config, before any weight loads.
    family = family_for_config(unet_config)
    family.check_config(unet_config)
    pipe = family.load_pipeline(path, unet_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, str(path)


def read_unet_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A diffusers folder's UNet configuration (``unet/config.json``), read without loading weights.

    Its model family ([`fd_trt.families.base.family_for_config()`][fd_trt.families.base.family_for_config]) tells what it supports
    ([`check_config()`][fd_trt.families.base.ModelFamily.check_config]).

    Raises:
        InputError: when the folder has no readable UNet configuration.
    """
    import json

    config_path = Path(folder) / "unet" / "config.json"
    if not config_path.is_file() and (Path(folder) / "transformer" / "config.json").is_file():
        # A diffusion transformer's folder (DiT, PixArt, SD3, ...): its families read this config.
        config_path = Path(folder) / "transformer" / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the UNet configuration {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_path} is not a JSON object")
    return config


#: Stable Diffusion 1.5's UNet configuration (860 M parameters).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

#: Stable Diffusion XL base 1.0's UNet configuration (2.57 B parameters).
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
    norm_num_groups=32,
)


def load_controlnet(source: str | os.PathLike[str] | Any | Sequence[Any]) -> Any:
    """Loads ControlNet weights from local folders (safetensors), or passes models through.

    Args:
        source: a diffusers ``ControlNetModel`` folder, ``"default"`` (the shipped ControlNet of the
            default model, conditioned on silhouette masks), a loaded model, or a list of either
            (which gives a ``MultiControlNetModel``).

    Returns:
        A ``ControlNetModel`` or a ``MultiControlNetModel``.

    Raises:
        InputError: when a folder does not exist or holds no ControlNet config.
    """
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    if isinstance(source, (list, tuple)):
        nets = [load_controlnet(s) for s in source]
        return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source) == "default":
        shipped = default_controlnet_dir()
        if shipped is None:
            raise InputError(
                "controlnet 'default': this installation has no default ControlNet (fd_trt/assets/default_controlnet); "
                "train it with scripts/train_default_controlnet.py or pass a ControlNet folder"
            )
        net = load_controlnet(shipped)
        net._fd_trt_default = True
        return net
    path = Path(source)
    if not (path / "config.json").is_file():
        raise InputError(
            f"controlnet {str(source)!r} is not a local ControlNet folder (no config.json); fd_trt never downloads. "
            "Pass the folder of a diffusers ControlNetModel (config.json + diffusion_pytorch_model.safetensors)"
        )
    return ControlNetModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()


def random_controlnet(unet: Any, seed: int = 0, vae_scale_factor: int = 8, zero_conv_std: float = 0.1) -> Any:
    """A ControlNet shaped for ``unet`` (``ControlNetModel.from_unet``, no download), for benchmarks and tests.

    ``from_unet`` copies the UNet's encoder weights, so the ControlNet has exactly the UNet's
    encoder shape (SD1.5's for [`sd15_arch_pipeline()`][fd_trt.families.models.sd15_arch_pipeline]). Its zero convolutions are then drawn
    from a normal distribution (seeded): a fresh ControlNet's zero convolutions make every
    residual exactly zero, which would hide any error in how the residuals are applied.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        seed: seeds the zero convolutions' weights.
        vae_scale_factor: how much the conditioning embedding downsamples the image (the
            pipeline's VAE factor): diffusers' default embedding channels ``(16, 32, 96, 256)``
            are cut to ``log2(factor) + 1`` entries.
        zero_conv_std: standard deviation of the zero convolutions' weights.

    Returns:
        A float32 ``diffusers.ControlNetModel`` in eval mode.
    """
    import torch
    from diffusers import ControlNetModel

    halvings = int(vae_scale_factor).bit_length() - 1
    if 2**halvings != int(vae_scale_factor) or not 1 <= halvings <= 3:
        raise InputError(
            f"vae_scale_factor must be 2, 4 or 8 for a ControlNet's conditioning embedding, got {vae_scale_factor}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: halvings + 1])
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=zero_conv_std)
            torch.nn.init.normal_(module.bias, std=zero_conv_std / 10)
    return net.eval()


def sd15_arch_pipeline(seed: int = 0) -> Any:
    """Stable Diffusion 1.5's UNet and a CLIP-L-width text encoder with random weights (no download).

    The UNet has SD1.5's exact configuration (320/640/1280/1280 channels, two layers per block,
    cross-attention width 768, 8 heads). The text encoder is CLIP-L shaped (12 layers, width 768,
    77 tokens) over the word tokenizer. The VAE is tiny but keeps SD's downsampling factor of 8,
    so 256x256 means 32x32 latents. Use it to measure speed and FLOPs, not images.

    Args:
        seed: seeds the weights.

    Returns:
        A float32 ``diffusers.StableDiffusionPipeline`` on the CPU.
    """
    return _random_sd_pipeline(
        seed,
        SD15_UNET_CONFIG,
        text_width=768,
        text_intermediate=3072,
        text_layers=12,
        text_heads=12,
        max_length=77,
    )


def _random_sdxl_pipeline(
    seed: int,
    unet_config: dict[str, Any],
    text_encoders: tuple[dict[str, Any] | None, dict[str, Any]],
    max_length: int,
) -> Any:
    """A StableDiffusionXLPipeline of seeded random weights: the given UNet, SDXL's two text
    encoders (a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` for the pooled embedding)
    over the word tokenizer, and a tiny VAE with SD's downsampling factor of 8.

    Args:
        seed: seeds the weights.
        unet_config: the ``UNet2DConditionModel`` configuration (with ``addition_embed_type="text_time"``).
        text_encoders: ``(first, second)`` CLIP text configurations: ``hidden_size``,
            ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, and
            ``projection_dim`` for the second.
            ``first`` is ``None`` for a refiner: no first encoder, and a
            ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score=True`` (the
            UNet then takes five time ids).
        max_length: the tokenizers' sequence length.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_word_tokenizer(max_length=max_length)
    tokenizer_2 = make_word_tokenizer(max_length=max_length)

    def clip_config(spec: dict[str, Any]) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=int(unet_config["sample_size"]) * 8,
            scaling_factor=0.13025,  # SDXL's VAE scale
        )
        text_encoder = CLIPTextModel(clip_config(text_encoders[0])).eval() if text_encoders[0] is not None else None
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(text_encoders[1]))
    # SDXL's folder has an EulerDiscreteScheduler over SD's betas with "leading" spacing; its config
    # also keeps DDIM's clip_sample=False, which make_scheduler("ddim", ...) reads.
    scheduler = EulerDiscreteScheduler.from_config({**sd_scheduler_config(), "timestep_spacing": "leading"})
    parts = dict(
        vae=vae.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        add_watermarker=False,
    )
    if text_encoder is None:  # the refiner's layout (its folder's settings)
        pipe = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            **parts,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            text_encoder=text_encoder, tokenizer=tokenizer, force_zeros_for_empty_prompt=True, **parts
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, *, sample_size: int = 8) -> Any:
    """A tiny SDXL pipeline with seeded random weights, built in code (no download).

    The structure is SDXL's: two CLIP text encoders (the second with a projection, whose pooled
    output is the UNet's ``text_embeds``), a UNet with ``addition_embed_type="text_time"``, two
    transformer layers in its lowest level (``transformer_layers_per_block=(1, 2)``) and linear
    projections, and a tiny VAE with a downsampling factor of 8. Images are ``8 * sample_size``
    pixels square by default (64x64).

    Args:
        seed: seeds the weights.
        sample_size: the UNet's default latent size.

    Returns:
        A ``diffusers.StableDiffusionXLPipeline`` in float32 on the CPU.
    """
    return _random_sdxl_pipeline(
        seed,
        dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + the pooled width
            cross_attention_dim=64,  # the two encoders' hidden states, concatenated
            norm_num_groups=32,
        ),
        (
            dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
            dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        ),
        max_length=16,
    )


def tiny_sdxl_refiner_pipeline(seed: int = 0, *, sample_size: int = 8) -> Any:
    """A tiny SDXL refiner with seeded random weights, built in code (no download).

    The refiner's structure: only the second text encoder (``text_encoder=None``; its hidden
    states are the cross-attention input, its projection the pooled ``text_embeds``), five time
    ids (original size, crop corner, aesthetic score), ``requires_aesthetics_score=True``, and a
    tiny VAE with a downsampling factor of 8.

    Returns:
        A ``diffusers.StableDiffusionXLImg2ImgPipeline`` in float32 on the CPU.
    """
    return _random_sdxl_pipeline(
        seed,
        dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=5 * 8 + 32,  # 5 time ids x 8 + the pooled width
            cross_attention_dim=32,  # the second encoder's hidden states only
            norm_num_groups=32,
        ),
        (
            None,
            dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        ),
        max_length=16,
    )


def sdxl_arch_pipeline(seed: int = 0) -> Any:
    """SDXL's UNet and its two text encoders' shapes with random weights (no download).

    The UNet has SDXL base 1.0's exact configuration: 320/640/1280 channels, two layers per block,
    transformer depths 1/2/10 (none in the top level), head dims 5/10/20, cross-attention width
    2048, linear projections, and the ``text_time`` added embedding (6 x 256 time features + a
    1280-wide pooled text embedding); 2.57 B parameters. The text encoders have CLIP ViT-L's
    (12 layers, width 768) and OpenCLIP ViT-bigG's (32 layers, width 1280, projection 1280)
    shapes over the word tokenizer, 77 tokens. The VAE is tiny but keeps the factor of 8, so
    256x256 means 32x32 latents. Use it to measure speed and FLOPs, not images.

    Args:
        seed: seeds the weights.

    Returns:
        A float32 ``diffusers.StableDiffusionXLPipeline`` on the CPU (about 13 GB).
    """
    return _random_sdxl_pipeline(
        seed,
        SDXL_UNET_CONFIG,
        (
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            dict(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
            ),
        ),
        max_length=77,
    )


def unet_input_kind(unet_config: Any) -> str:
    """How the pipeline feeds a UNet: ``"text2img"`` (latent channels in and out) or
    ``"inpaint"`` (latents + 1 mask channel + masked-image latents in, latents out).

    Args:
        unet_config: the UNet's config (a dict or diffusers' ``FrozenDict``).

    Raises:
        UnsupportedModelError: for any other channel layout.
    """
    get = unet_config.get if hasattr(unet_config, "get") else lambda k, d=None: getattr(unet_config, k, d)
    cin, cout = int(get("in_channels", 4)), int(get("out_channels", 4))
    if cin == cout:
        return "text2img"
    if cin == 2 * cout + 1:
        return "inpaint"
    learned = (
        f"; {cout} = 2 x {cin} outputs are noise and a learned variance, DeepFloyd IF's layout, which fd_trt runs "
        "as an IFPipeline (a UNet with addition_embed_type='text')"
        if cout == 2 * cin
        else ""
    )
    raise UnsupportedModelError(
        f"the UNet takes {cin} input channels and predicts {cout}: fd_trt drives Stable Diffusion text-to-image "
        f"UNets (as many channels in as out, C in and C out) and inpainting UNets (2C + 1 in: latents, mask, "
        f"masked-image latents; C out){learned}. Use a UNet of one of these layouts"
    )
