"""Model families ([`fd_trt.families.base`][fd_trt.families.base]) and model loading ([`fd_trt.families.models`][fd_trt.families.models]).

The built-in families are registered here, oldest first: Stable Diffusion 1.x/2.x (``"sd"``),
SDXL (``"sdxl"``), DeepFloyd IF stage I (``"if"``) and stage II (``"if-ii"``), then the diffusion transformers (DiT,
PixArt, SD3, and the refusal of those not supported), then text-to-video
(``"text-to-video"``, ``"animatediff"``, [`fd_trt.families.video`][fd_trt.families.video]). Another family is one module (a [`ModelFamily`][fd_trt.families.base.ModelFamily] subclass) and a
[`register_family()`][fd_trt.families.base.register_family] call.
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
from fd_trt.families.deepfloyd_if import DeepFloydIFFamily, DeepFloydIFSuperResolutionFamily
from fd_trt.families.sd import StableDiffusionFamily
from fd_trt.families.sdxl import StableDiffusionXLFamily
from fd_trt.families.transformer import DiTFamily, PixArtFamily, SD3Family, UnsupportedTransformerFamily
from fd_trt.families.video import AnimateDiffFamily, TextToVideoFamily

SD_FAMILY = register_family(StableDiffusionFamily())
SDXL_FAMILY = register_family(StableDiffusionXLFamily())
IF_FAMILY = register_family(DeepFloydIFFamily())
IF_SR_FAMILY = register_family(DeepFloydIFSuperResolutionFamily())
# Diffusion transformers; the refusal family first, so that DiT, PixArt and SD3 are asked before it.
TRANSFORMER_UNSUPPORTED_FAMILY = register_family(UnsupportedTransformerFamily())
DIT_FAMILY = register_family(DiTFamily())
PIXART_FAMILY = register_family(PixArtFamily())
SD3_FAMILY = register_family(SD3Family())
# Text-to-video: UNet3DConditionModel (ModelScope / VideoFusion) and UNetMotionModel (AnimateDiff).
TEXT_TO_VIDEO_FAMILY = register_family(TextToVideoFamily())
ANIMATEDIFF_FAMILY = register_family(AnimateDiffFamily())

__all__ = [
    "ANIMATEDIFF_FAMILY",
    "DIT_FAMILY",
    "FAMILIES",
    "PIXART_FAMILY",
    "SD3_FAMILY",
    "SD3Family",
    "TEXT_TO_VIDEO_FAMILY",
    "TRANSFORMER_UNSUPPORTED_FAMILY",
    "AnimateDiffFamily",
    "TextToVideoFamily",
    "DiTFamily",
    "PixArtFamily",
    "IF_FAMILY",
    "IF_SR_FAMILY",
    "SDXL_FAMILY",
    "SD_FAMILY",
    "DeepFloydIFFamily",
    "DeepFloydIFSuperResolutionFamily",
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
