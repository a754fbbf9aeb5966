"""fd_trt: Faster Diffusion (encoder propagation) on compiled graphs.

``import fd_trt`` is light: torch-heavy modules load on first use, and TensorRT / CUDA /
onnxruntime only when their backend is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fd_trt.core.schedule import PAPER_KEY_STEPS, KeySchedule, NoiseInjection, parse_schedule
from fd_trt.errors import (
    BackendUnavailableError,
    EngineMismatchError,
    FdTrtError,
    InputError,
    NotPreparedError,
    ScheduleError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from fd_trt.pipelines.pipeline import FasterDiffusionOutput, FasterDiffusionPipeline, PipelineStats
    from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline

_LAZY = {
    "FasterDiffusionPipeline": "fd_trt.pipelines.pipeline",
    "FasterDiffusionXLPipeline": "fd_trt.pipelines.sdxl",
    "FasterDiffusionOutput": "fd_trt.pipelines.pipeline",
    "PipelineStats": "fd_trt.pipelines.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fd_trt' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "EngineMismatchError",
    "FasterDiffusionOutput",
    "FasterDiffusionPipeline",
    "FasterDiffusionXLPipeline",
    "FdTrtError",
    "InputError",
    "KeySchedule",
    "NoiseInjection",
    "NotPreparedError",
    "PAPER_KEY_STEPS",
    "PipelineStats",
    "ScheduleError",
    "UnsupportedModelError",
    "parse_schedule",
    "__version__",
]
