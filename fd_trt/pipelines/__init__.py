"""The pipelines, and which one serves each model family (:mod:`fd_trt.pipelines.registry`).

``FasterDiffusionPipeline`` (:mod:`fd_trt.pipelines.pipeline`) serves Stable Diffusion 1.x/2.x and
any family without a class of its own; ``FasterDiffusionXLPipeline`` (:mod:`fd_trt.pipelines.sdxl`)
serves SDXL, ``FasterDiffusionIFPipeline`` (:mod:`fd_trt.pipelines.deepfloyd_if`) DeepFloyd IF
stage I. They are registered here, so that the base pipeline never imports its subclasses.
"""

from fd_trt.pipelines.deepfloyd_if import FasterDiffusionIFPipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.registry import register_pipeline_class
from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline

register_pipeline_class("sd", FasterDiffusionPipeline)
register_pipeline_class("sdxl", FasterDiffusionXLPipeline)
register_pipeline_class("if", FasterDiffusionIFPipeline)

__all__ = ["FasterDiffusionIFPipeline", "FasterDiffusionPipeline", "FasterDiffusionXLPipeline"]
