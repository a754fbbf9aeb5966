"""Model families: what the pipeline knows about one kind of denoiser, and the table of them.

A family (a [`ModelFamily`][fd_trt.families.base.ModelFamily]) states, for its denoiser:

* how to recognise it, before any weights load: [`matches_config()`][fd_trt.families.base.ModelFamily.matches_config] on the UNet
  config of a local diffusers folder (``unet/config.json``), [`matches_pipeline()`][fd_trt.families.base.ModelFamily.matches_pipeline]
  on a loaded diffusers pipeline;
* what it refuses, with the message: [`check_config()`][fd_trt.families.base.ModelFamily.check_config],
  [`check_pipeline()`][fd_trt.families.base.ModelFamily.check_pipeline], `supports_controlnet`;
* how a local folder loads: [`load_pipeline()`][fd_trt.families.base.ModelFamily.load_pipeline];
* how it is split and what its graphs take: [`split()`][fd_trt.families.base.ModelFamily.split] and the shapes of the
  graph contract ([`fd_trt.graphs.contract`][fd_trt.graphs.contract]): [`text_shape()`][fd_trt.families.base.ModelFamily.text_shape] (the
  ``encoder_hidden_states`` per row) and [`added_shapes()`][fd_trt.families.base.ModelFamily.added_shapes] (the added
  conditioning per row, ``None`` when there is none);
* how it encodes prompts into that conditioning: [`check_prompt_options()`][fd_trt.families.base.ModelFamily.check_prompt_options],
  [`encode_prompt()`][fd_trt.families.base.ModelFamily.encode_prompt].

`FAMILIES` is the table, name -> family, in registration order (as diffusers'
``AUTO_TEXT2IMAGE_PIPELINES_MAPPING``). [`register_family()`][fd_trt.families.base.register_family] adds one;
[`family_for_config()`][fd_trt.families.base.family_for_config] and [`family_for_pipeline()`][fd_trt.families.base.family_for_pipeline] ask the families newest first, so a
family registered later may claim a subset of an earlier family's models (an SD-shaped UNet with
a marker in its config). ``fd_trt.families`` registers Stable Diffusion 1.x/2.x (``"sd"``,
[`fd_trt.families.sd`][fd_trt.families.sd]) and SDXL (``"sdxl"``, [`fd_trt.families.sdxl`][fd_trt.families.sdxl]). Which pipeline
class serves a family is the pipelines' business ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]); a family
no pipeline class is registered for runs on ``FasterDiffusionPipeline``, which asks its family
for everything listed above.

Nothing here imports a family: this module is the base, the families import it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fd_trt.errors import InputError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fd_trt.graphs.contract import GraphContract
    from fd_trt.graphs.split import SplitUNet


@dataclass
class PromptEmbeddings:
    """The conditioning of every sampler row, negative rows first with CFG.

    Attributes:
        text: ``[R,L,D]`` prompt embeddings (the UNet's ``encoder_hidden_states``).
        added: the UNet's added conditioning per row, or ``None``. SDXL:
            ``{"text_embeds": [R,D], "time_ids": [R,6]}`` (5 time ids for the refiner).
    """

    text: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.text.shape[0])


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a UNet config: a dict, diffusers' ``FrozenDict`` or an attribute object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


class ModelFamily:
    """One kind of denoiser: how to recognise, refuse, load, split and condition it.

    Subclass it, set `name` and `description`, implement [`matches_config()`][fd_trt.families.base.ModelFamily.matches_config],
    [`text_shape()`][fd_trt.families.base.ModelFamily.text_shape] and [`encode_prompt()`][fd_trt.families.base.ModelFamily.encode_prompt] (and whatever else differs from the defaults
    below), then register an instance with [`register_family()`][fd_trt.families.base.register_family]. The defaults fit a
    diffusers ``UNet2DConditionModel`` that [`fd_trt.graphs.split.split_unet()`][fd_trt.graphs.split.split_unet] carries.
    """

    #: The registry key and the name in messages (``"sd"``, ``"sdxl"``).
    name: str = ""
    #: What the family runs, for messages and listings.
    description: str = ""
    #: Whether ``controlnet=`` is supported with this family's models.
    supports_controlnet: bool = False

    # recognition --------------------------------------------------------------------------------
    def matches_config(self, unet_config: Any) -> bool:
        """Whether a UNet config (a local folder's ``unet/config.json``, a dict or diffusers'
        ``FrozenDict``) is this family's. It reads the config only: no weights have loaded."""
        raise NotImplementedError

    def matches_pipeline(self, sd_pipeline: Any) -> bool:
        """Whether a loaded diffusers pipeline is this family's: its UNet's config, by default."""
        unet = getattr(sd_pipeline, "unet", None)
        return unet is not None and self.matches_config(unet.config)

    # refusals -----------------------------------------------------------------------------------
    def check_config(self, unet_config: Any) -> None:
        """Refuses, from the config alone, a model of this family fd_trt does not run: by default a
        UNet option the split does not carry, or a channel layout that is neither text-to-image nor
        inpainting.

        Raises:
            UnsupportedModelError: naming what is not supported.
        """
        from fd_trt.graphs.split import check_supported_config

        check_supported_config(unet_config)
        self.unet_kind(unet_config)

    def check_pipeline(self, sd_pipeline: Any) -> None:
        """Refuses a loaded pipeline this family would run wrongly: [`check_config()`][fd_trt.families.base.ModelFamily.check_config] on its UNet,
        then the split itself ([`split()`][fd_trt.families.base.ModelFamily.split]), so that an unsupported UNet fails before any call.

        Raises:
            UnsupportedModelError, InputError: naming what does not fit.
        """
        self.check_config(sd_pipeline.unet.config)
        self.split(sd_pipeline.unet)

    def unet_kind(self, unet_config: Any) -> str:
        """How the pipeline feeds the UNet: ``"text2img"`` or ``"inpaint"`` (latents, mask and
        masked-image latents in); [`fd_trt.families.models.unet_input_kind()`][fd_trt.families.models.unet_input_kind] by default.

        Raises:
            UnsupportedModelError: for another channel layout.
        """
        from fd_trt.families.models import unet_input_kind

        return unet_input_kind(unet_config)

    # loading ------------------------------------------------------------------------------------
    def load_pipeline(self, folder: Path, unet_config: dict[str, Any]) -> Any:
        """The diffusers pipeline of a local folder of this family (safetensors, no download).

        Raises:
            InputError: by default: the family loads no folder.
        """
        raise InputError(
            f"the {self.name!r} model family cannot load a folder ({folder}): build its diffusers pipeline and "
            "wrap it with FasterDiffusionPipeline.from_diffusers(pipe)"
        )

    # graphs -------------------------------------------------------------------------------------
    def split(self, unet: Any) -> SplitUNet:
        """The denoiser as encoder and decoder ([`fd_trt.graphs.split.split_unet()`][fd_trt.graphs.split.split_unet])."""
        from fd_trt.graphs.split import split_unet

        return split_unet(unet)

    def text_shape(self, sd_pipeline: Any) -> tuple[int, int]:
        """``(L, D)`` of the prompt embeddings per row (the graphs' ``encoder_hidden_states``)."""
        raise NotImplementedError

    def added_shapes(self, sd_pipeline: Any) -> dict[str, tuple[int, ...]] | None:
        """Per-row shapes of the added conditioning, named as the graph contract's added inputs
        (`fd_trt.graphs.contract.ADDED_CONDITIONING`); ``None`` when there is none."""
        return None

    def graph_contract(self, sd_pipeline: Any, latent_size: tuple[int, int] | None = None) -> GraphContract:
        """The contract of this model's encoder and decoder graphs ([`fd_trt.graphs.contract`][fd_trt.graphs.contract])."""
        from fd_trt.graphs.contract import GraphContract

        return GraphContract.from_unet_config(
            sd_pipeline.unet.config, latent_size, self.text_shape(sd_pipeline), self.added_shapes(sd_pipeline)
        )

    # conditioning -------------------------------------------------------------------------------
    def check_prompt_options(self, prompts: list[str], **options: Any) -> None:
        """Checks the family's own prompt arguments of a call (SDXL's ``prompt_2``, sizes, ...).

        Raises:
            InputError: naming the bad value; by default for any option, since there are none.
        """
        if options:
            raise InputError(
                f"the {self.name!r} model family takes no prompt options, got {', '.join(sorted(options))}"
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
        """The conditioning of every sampler row, negative rows first with CFG.

        Args:
            sd_pipeline: the wrapped diffusers pipeline (its text encoders).
            prompts: the checked prompts.
            negative_prompt: one string for all prompts, one per prompt, or ``None``.
            num_images_per_prompt: each prompt's rows repeat this many times.
            do_classifier_free_guidance: also encode the negative prompts.
            height, width: the image size (for a family that conditions on it).
            device: where the embeddings go.
            **options: the family's own prompt options ([`check_prompt_options()`][fd_trt.families.base.ModelFamily.check_prompt_options]).

        Returns:
            [`PromptEmbeddings`][fd_trt.families.base.PromptEmbeddings] with ``text [R,L,D]`` of [`text_shape()`][fd_trt.families.base.ModelFamily.text_shape] and ``added`` of
            [`added_shapes()`][fd_trt.families.base.ModelFamily.added_shapes], R = (2 if CFG else 1) x images.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


#: The registered families, name -> family, in registration order.
FAMILIES: OrderedDict[str, ModelFamily] = OrderedDict()


def register_family(family: ModelFamily) -> ModelFamily:
    """Adds a family to `FAMILIES`; it is asked before every family registered earlier.

    Returns:
        ``family``, so that a module can write ``FAMILY = register_family(MyFamily())``.

    Raises:
        InputError: for a name already registered, or an object that is no [`ModelFamily`][fd_trt.families.base.ModelFamily].
    """
    if not isinstance(family, ModelFamily):
        raise InputError(f"register_family takes a ModelFamily instance, got {family!r}")
    name = family.name
    if not isinstance(name, str) or not name:
        raise InputError(f"{type(family).__name__}.name must be a non-empty string, got {name!r}")
    if name in FAMILIES:
        raise InputError(
            f"a model family named {name!r} is registered already ({FAMILIES[name]!r}): pick another name, or "
            f"unregister_family({name!r}) first"
        )
    FAMILIES[name] = family
    return family


def unregister_family(name: str) -> ModelFamily:
    """Removes a family from `FAMILIES` and returns it.

    Raises:
        InputError: for a name that is not registered.
    """
    if name not in FAMILIES:
        raise InputError(f"no model family named {name!r} is registered; registered: {', '.join(FAMILIES) or 'none'}")
    return FAMILIES.pop(name)


def registered_families() -> list[ModelFamily]:
    """The registered families, in registration order."""
    return list(FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    """The registered family of this name.

    Raises:
        InputError: for a name that is not registered.
    """
    if name not in FAMILIES:
        raise InputError(f"no model family named {name!r} is registered; registered: {', '.join(FAMILIES) or 'none'}")
    return FAMILIES[name]


#: Config keys that tell denoisers apart, quoted when no family recognises a config.
_TELLING_KEYS = (
    "_class_name",
    "addition_embed_type",
    "class_embed_type",
    "encoder_hid_dim_type",
    "time_cond_proj_dim",
    "num_class_embeds",
    "in_channels",
    "out_channels",
    "cross_attention_dim",
)


def _families_listing() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES.values()) or "none"


def _unrecognised(what: str, config: Any) -> UnsupportedModelError:
    facts = []
    if config is not None:
        for key in _TELLING_KEYS:
            value = config_value(config, key)
            if value is not None:
                facts.append(f"{key}={value!r}")
    told = f" ({', '.join(facts)})" if facts else ""
    return UnsupportedModelError(
        f"no registered model family recognises {what}{told}. Registered families: {_families_listing()}. Use a "
        "model of one of these families, or register a family for it (fd_trt.families.register_family)"
    )


def family_for_config(unet_config: Any) -> ModelFamily:
    """The family of a UNet config, before any weights load; the newest registered family that
    recognises it.

    Raises:
        UnsupportedModelError: when no registered family does, naming the config's telling
            options and every registered family.
    """
    for family in reversed(FAMILIES.values()):
        if family.matches_config(unet_config):
            return family
    raise _unrecognised("this UNet", unet_config)


def family_for_pipeline(sd_pipeline: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline; the newest registered family that recognises it.

    Raises:
        UnsupportedModelError: when no registered family does, naming its UNet's telling options
            and every registered family.
    """
    for family in reversed(FAMILIES.values()):
        if family.matches_pipeline(sd_pipeline):
            return family
    config = getattr(getattr(sd_pipeline, "unet", None), "config", None)
    raise _unrecognised(f"the {type(sd_pipeline).__name__}", config)


__all__ = [
    "FAMILIES",
    "ModelFamily",
    "PromptEmbeddings",
    "config_value",
    "family_for_config",
    "family_for_pipeline",
    "get_family",
    "register_family",
    "registered_families",
    "unregister_family",
]
