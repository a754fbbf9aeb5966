"""Error types of fd_trt.

Every error says what was wrong, which value arrived, and what to do next.
"""

from __future__ import annotations


class FdTrtError(Exception):
    """Base class of every error raised by fd_trt."""


class InputError(FdTrtError, ValueError):
    """A user-supplied argument is invalid (bad size, bad prompt list, bad step count, ...)."""


class ScheduleError(InputError):
    """A key-step schedule is malformed (no step 0, out of range, unsorted or duplicated)."""


class UnsupportedModelError(FdTrtError):
    """The UNet uses a feature that the encoder/decoder split does not handle."""


class BackendUnavailableError(FdTrtError, ImportError):
    """A backend's runtime (onnxruntime, tensorrt, CUDA) is missing on this machine."""


class EngineMismatchError(FdTrtError):
    """A built graph or engine does not match the model or runtime it is asked to serve."""


class NotPreparedError(InputError):
    """A call needs graphs for a shape that were not prepared, and building on demand is off."""
