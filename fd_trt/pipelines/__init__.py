"""The pipelines, and which one serves each model family ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]).

``FasterDiffusionPipeline`` ([`fd_trt.pipelines.pipeline`][fd_trt.pipelines.pipeline]) serves Stable Diffusion 1.x/2.x and
any family without a class of its own; ``FasterDiffusionXLPipeline`` ([`fd_trt.pipelines.sdxl`][fd_trt.pipelines.sdxl])
serves SDXL, ``FasterDiffusionTransformerPipeline`` ([`fd_trt.pipelines.transformer`][fd_trt.pipelines.transformer])
DiT, PixArt and SD3, ``FasterDiffusionIFPipeline`` ([`fd_trt.pipelines.deepfloyd_if`][fd_trt.pipelines.deepfloyd_if]) DeepFloyd IF
stage I and ``FasterDiffusionIFSuperResolutionPipeline`` stage II, ``FasterDiffusionVideoPipeline`` ([`fd_trt.pipelines.video`][fd_trt.pipelines.video]) text-to-video
(``TextToVideoSDPipeline``, ``AnimateDiffPipeline``). They are registered here, so that the base pipeline never imports its subclasses.
"""

from fd_trt.pipelines.deepfloyd_if import FasterDiffusionIFPipeline, FasterDiffusionIFSuperResolutionPipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.registry import register_pipeline_class
from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline
from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline
from fd_trt.pipelines.video import FasterDiffusionVideoPipeline

register_pipeline_class("sd", FasterDiffusionPipeline)
register_pipeline_class("sdxl", FasterDiffusionXLPipeline)
register_pipeline_class("if", FasterDiffusionIFPipeline)
register_pipeline_class("if-ii", FasterDiffusionIFSuperResolutionPipeline)
# Diffusion transformers (DiT, PixArt, SD3), and the clear refusal of those not supported yet (Flux, ...).
for _family in ("dit", "pixart", "sd3", "transformer-unsupported"):
    register_pipeline_class(_family, FasterDiffusionTransformerPipeline)
# Text-to-video: ModelScope / VideoFusion (UNet3DConditionModel) and AnimateDiff (UNetMotionModel).
for _family in ("text-to-video", "animatediff"):
    register_pipeline_class(_family, FasterDiffusionVideoPipeline)

__all__ = [
    "FasterDiffusionIFPipeline",
    "FasterDiffusionIFSuperResolutionPipeline",
    "FasterDiffusionPipeline",
    "FasterDiffusionTransformerPipeline",
    "FasterDiffusionVideoPipeline",
    "FasterDiffusionXLPipeline",
]
