"""Model families (:mod:`fd_trt.families.base`) and model loading (:mod:`fd_trt.families.models`).

The built-in families are registered here, oldest first: Stable Diffusion 1.x/2.x (``"sd"``),
SDXL (``"sdxl"``), then DeepFloyd IF stage I (``"if"``). Another family is one module (a :class:`ModelFamily` subclass) and a
:func:`register_family` call.
"""

from fd_trt.families.base import (
    FAMILIES,
    ModelFamily,
    PromptEmbeddings,
    family_for_config,
    family_for_pipeline,
    get_family,
    register_family,
    registered_families,
    unregister_family,
)
from fd_trt.families.deepfloyd_if import DeepFloydIFFamily
from fd_trt.families.sd import StableDiffusionFamily
from fd_trt.families.sdxl import StableDiffusionXLFamily

SD_FAMILY = register_family(StableDiffusionFamily())
SDXL_FAMILY = register_family(StableDiffusionXLFamily())
IF_FAMILY = register_family(DeepFloydIFFamily())

__all__ = [
    "FAMILIES",
    "IF_FAMILY",
    "SDXL_FAMILY",
    "SD_FAMILY",
    "DeepFloydIFFamily",
    "ModelFamily",
    "PromptEmbeddings",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_for_config",
    "family_for_pipeline",
    "get_family",
    "register_family",
    "registered_families",
    "unregister_family",
]
