"""Diffusion-transformer families: DiT (``"dit"``), PixArt-alpha/sigma (``"pixart"``) and Stable
Diffusion 3 (``"sd3"``), and the refusal of the transformer pipelines fd_trt does not run yet
(``"transformer-unsupported"``).

A transformer family is recognised from the denoiser's config (``transformer/config.json`` of a
folder, ``_class_name``) or a loaded pipeline's ``transformer``. Its denoiser is split at block
``N`` ([`fd_trt.graphs.split_dit`][fd_trt.graphs.split_dit]); ``N`` is part of the run's schedule, with a default per
family ([`TransformerFamily.default_split()`][fd_trt.families.transformer.TransformerFamily.default_split], from the measurement in docs/guides/dit.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.base import ModelFamily, PromptEmbeddings, config_value


def _class_name(config: Any) -> str:
    return str(config_value(config, "_class_name", "") or "")


class TransformerFamily(ModelFamily):
    """A family whose denoiser is a diffusion transformer (``pipe.transformer``), split at block ``N``.

    Subclasses set `transformer_class`, `pipeline_classes` and
    `default_split_fraction`, and implement [`conditioning()`][fd_trt.families.transformer.TransformerFamily.conditioning].
    """

    #: The diffusers class name of the denoiser (``transformer/config.json``'s ``_class_name``).
    transformer_class: str = ""
    #: The diffusers pipeline classes of the family.
    pipeline_classes: tuple[str, ...] = ()
    #: The default split point as a fraction of the blocks (rounded): see docs/guides/dit.md.
    default_split_fraction: float = 0.5
    #: Whether the family's pipeline takes prompts (PixArt, SD3) or class labels (DiT).
    takes_prompts: bool = True
    #: The CFG weight of the family's diffusers pipeline, the default of a call.
    default_guidance: float = 4.5

    def matches_config(self, unet_config: Any) -> bool:
        return _class_name(unet_config) == self.transformer_class

    def matches_pipeline(self, sd_pipeline: Any) -> bool:
        tr = getattr(sd_pipeline, "transformer", None)
        return (
            tr is not None
            and type(tr).__name__ == self.transformer_class
            and type(sd_pipeline).__name__ in self.pipeline_classes
        )

    def check_config(self, unet_config: Any) -> None:
        if config_value(unet_config, "patch_size") is None:
            raise UnsupportedModelError(f"a {self.transformer_class} without patch_size is not supported")

    def check_pipeline(self, sd_pipeline: Any) -> None:
        self.check_config(sd_pipeline.transformer.config)
        from fd_trt.graphs.split_dit import split_transformer

        split_transformer(sd_pipeline.transformer, self.default_split(sd_pipeline.transformer))

    def unet_kind(self, unet_config: Any) -> str:
        return "text2img"

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        import diffusers

        index = Path(folder) / "model_index.json"
        import json

        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name not in self.pipeline_classes:
            raise UnsupportedModelError(
                f"{folder} is a {cls_name or 'pipeline'} folder; the {self.name!r} family loads "
                f"{', '.join(self.pipeline_classes)}"
            )
        return getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True, use_safetensors=True)

    def default_split(self, transformer: Any) -> int:
        """The default ``N``: `default_split_fraction` of the blocks, at least 1."""
        blocks = len(transformer.transformer_blocks)
        return max(1, min(blocks, round(self.default_split_fraction * blocks)))

    def split(self, unet: Any, split: int | None = None, latent_hw: tuple[int, int] | None = None) -> Any:
        """The transformer split after ``split`` blocks (the family's default when ``None``)."""
        from fd_trt.graphs.split_dit import split_transformer

        n = self.default_split(unet) if split is None else split
        return split_transformer(unet, n, latent_hw)

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        raise NotImplementedError

    def conditioning(
        self, sd_pipeline: Any, cond: Any, negative: Any, images_per: int, cfg: bool, *, height: int, width: int, **kw
    ) -> PromptEmbeddings:
        """The rows' conditioning (negative rows first with CFG) in the runners' ``(text, added)`` form."""
        raise NotImplementedError


class DiTFamily(TransformerFamily):
    """``DiTPipeline``: class-conditional DiT (ImageNet labels), usually sampled with DDIM."""

    name = "dit"
    description = "DiT, class-conditional diffusion transformer (DiTPipeline)"
    transformer_class = "DiTTransformer2DModel"
    pipeline_classes = ("DiTPipeline",)
    default_split_fraction = 0.5
    takes_prompts = False
    default_guidance = 4.0

    def conditioning(
        self, sd_pipeline: Any, cond: Any, negative: Any, images_per: int, cfg: bool, *, height: int, width: int, **kw
    ) -> PromptEmbeddings:
        """``cond`` is class ids (ints) or label words (``pipe.get_label_ids``); the null class
        ``num_embeds_ada_norm`` (1000, as DiTPipeline) is the unconditional row."""
        labels = cond if isinstance(cond, (list, tuple)) else [cond]
        if not labels:
            raise InputError("class_labels is empty: pass one or more ImageNet class ids or label words")
        ids = []
        for lab in labels:
            if isinstance(lab, str):
                ids.extend(sd_pipeline.get_label_ids(lab))
            elif isinstance(lab, int) and not isinstance(lab, bool):
                ids.append(lab)
            else:
                raise InputError(f"class label {lab!r} must be an int class id or a label word")
        null = int(sd_pipeline.transformer.config.num_embeds_ada_norm or 1000)
        bad = [i for i in ids if not 0 <= i < null]
        if bad:
            raise InputError(f"class ids {bad} are outside 0..{null - 1}")
        rows = torch.tensor(ids, dtype=torch.long).repeat_interleave(images_per)
        if cfg:
            rows = torch.cat([torch.full_like(rows, null), rows])
        return PromptEmbeddings(rows, None)


class PixArtFamily(TransformerFamily):
    """``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline``: T5 text, DPM-Solver++ by default."""

    name = "pixart"
    description = "PixArt-alpha / PixArt-sigma text-to-image transformer (T5 text encoder)"
    transformer_class = "PixArtTransformer2DModel"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    default_split_fraction = 0.75

    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """As the base class; a folder whose index leaves the tokenizer, text encoder and VAE empty
        (the default DiT's, ``scripts/train_default_dit.py``) borrows them from the default model."""
        import json

        index = json.loads((Path(folder) / "model_index.json").read_text())
        if all((index.get(k) or [None])[0] is None for k in ("tokenizer", "text_encoder", "vae")):
            from fd_trt.families.dit_models import load_default_dit

            return load_default_dit(folder)
        return super().load_pipeline(folder, unet_config)

    @staticmethod
    def max_tokens(sd_pipeline: Any) -> int | None:
        """The most prompt tokens the text encoder takes (a CLIP encoder's positions, as the
        default DiT's); ``None`` for T5, whose relative positions have no limit."""
        limit = getattr(getattr(sd_pipeline.text_encoder, "config", None), "max_position_embeddings", None)
        return int(limit) if limit else None

    def default_length(self, sd_pipeline: Any) -> int:
        """The default ``max_sequence_length``: diffusers' 120, or the text encoder's limit when smaller."""
        limit = self.max_tokens(sd_pipeline)
        return min(120, limit) if limit else 120

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        return self.default_length(sd_pipeline), int(sd_pipeline.transformer.config.caption_channels)

    def conditioning(
        self, sd_pipeline: Any, cond: Any, negative: Any, images_per: int, cfg: bool, *, height: int, width: int, **kw
    ) -> PromptEmbeddings:
        """T5 embeddings as ``text`` and the attention mask (and, for PixArt-alpha 1024, the size
        conditioning) in ``added``, as diffusers' PixArt pipelines encode them (no caption cleaning)."""
        prompts = [cond] if isinstance(cond, str) else list(cond)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt must be a string or a list of strings, got {cond!r}")
        max_len = int(kw.get("max_sequence_length") or self.default_length(sd_pipeline))
        limit = self.max_tokens(sd_pipeline)
        if limit is not None and max_len > limit:
            raise InputError(
                f"max_sequence_length={max_len} is more than this text encoder's {limit} positions: "
                f"pass max_sequence_length={limit} or less"
            )
        pe, pm, ne, nm = sd_pipeline.encode_prompt(
            prompts,
            cfg,
            negative_prompt="" if negative is None else negative,
            num_images_per_prompt=images_per,
            device=torch.device("cpu"),
            clean_caption=False,
            max_sequence_length=max_len,
        )
        text, mask = (torch.cat([ne, pe]), torch.cat([nm, pm])) if cfg else (pe, pm)
        added: dict[str, torch.Tensor] = {"encoder_attention_mask": mask.float()}
        if sd_pipeline.transformer.use_additional_conditions:
            rows = text.shape[0]
            added["resolution"] = torch.tensor([[float(height), float(width)]]).repeat(rows, 1)
            added["aspect_ratio"] = torch.tensor([[float(height / width)]]).repeat(rows, 1)
        return PromptEmbeddings(text.float(), added)


class SD3Family(TransformerFamily):
    """``StableDiffusion3Pipeline``: three text encoders (CLIP-L, CLIP-G, T5), a joint transformer
    whose text stream crosses the split with the image tokens, flow matching
    (``FlowMatchEulerDiscreteScheduler``)."""

    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 text-to-image joint transformer (StableDiffusion3Pipeline)"
    transformer_class = "SD3Transformer2DModel"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_split_fraction = 0.75
    default_guidance = 7.0

    def text_shape(self, sd_pipeline: Any, max_sequence_length: int = 256) -> tuple[int, int]:
        """``(L, Dt)``: the CLIP tokens then the T5 tokens, at the transformer's joint width."""
        clip = int(getattr(sd_pipeline, "tokenizer_max_length", 77))
        return clip + int(max_sequence_length), int(sd_pipeline.transformer.config.joint_attention_dim)

    def conditioning(
        self, sd_pipeline: Any, cond: Any, negative: Any, images_per: int, cfg: bool, *, height: int, width: int, **kw
    ) -> PromptEmbeddings:
        """The joint CLIP + T5 embeddings as ``text`` and the pooled CLIP embeddings as
        ``added["pooled_projections"]``, through diffusers' own ``encode_prompt``.

        ``kw`` may hold ``prompt_2``, ``prompt_3``, ``negative_prompt_2``, ``negative_prompt_3``,
        ``max_sequence_length`` (256) and ``clip_skip``, as in ``StableDiffusion3Pipeline``.
        """
        prompts = [cond] if isinstance(cond, str) else list(cond)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt must be a string or a list of strings, got {cond!r}")
        known = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "max_sequence_length", "clip_skip")
        unknown = sorted(k for k in kw if k not in known)
        if unknown:
            raise InputError(f"unknown SD3 options {unknown}: the SD3 family takes {', '.join(known)}")
        pe, ne, pp, npool = sd_pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=kw.get("prompt_2"),
            prompt_3=kw.get("prompt_3"),
            device=torch.device("cpu"),
            num_images_per_prompt=images_per,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
            negative_prompt_2=kw.get("negative_prompt_2"),
            negative_prompt_3=kw.get("negative_prompt_3"),
            clip_skip=kw.get("clip_skip"),
            max_sequence_length=int(kw.get("max_sequence_length", 256)),
        )
        text, pooled = (torch.cat([ne, pe]), torch.cat([npool, pp])) if cfg else (pe, pp)
        return PromptEmbeddings(text.float(), {"pooled_projections": pooled.float()})


class UnsupportedTransformerFamily(ModelFamily):
    """Recognises the transformer pipelines fd_trt does not run (Flux, SD3's img2img, ...) to refuse them clearly."""

    name = "transformer-unsupported"
    description = "diffusion-transformer pipelines not supported yet (FluxPipeline, HunyuanDiTPipeline, ...)"

    #: The denoiser classes of folders refused from their config alone.
    refused_classes = (
        "FluxTransformer2DModel",
        "HunyuanDiT2DModel",
        "SanaTransformer2DModel",
        "AuraFlowTransformer2DModel",
        "LuminaNextDiT2DModel",
    )

    def matches_config(self, unet_config: Any) -> bool:
        return _class_name(unet_config) in self.refused_classes

    def matches_pipeline(self, sd_pipeline: Any) -> bool:
        return getattr(sd_pipeline, "unet", None) is None and getattr(sd_pipeline, "transformer", None) is not None

    def _refuse(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{what} is a diffusion-transformer model fd_trt does not run yet. Supported transformer pipelines: "
            "DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline; use plain diffusers "
            "for this one"
        )

    def check_config(self, unet_config: Any) -> None:
        raise self._refuse(_class_name(unet_config) or "this transformer")

    def check_pipeline(self, sd_pipeline: Any) -> None:
        raise self._refuse(type(sd_pipeline).__name__)

    def unet_kind(self, unet_config: Any) -> str:
        raise self._refuse(_class_name(unet_config) or "this transformer")


__all__ = [
    "DiTFamily",
    "PixArtFamily",
    "SD3Family",
    "TransformerFamily",
    "UnsupportedTransformerFamily",
]
