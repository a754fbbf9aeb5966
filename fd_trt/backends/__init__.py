"""Runners: one per engine kind, all with the protocol of :class:`fd_trt.backends.base.Runner`.

Backends that need heavy or GPU-only packages are imported lazily by :func:`get_runner_class`.
"""

from __future__ import annotations

from ..errors import InputError
from .base import Runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def get_runner_class(name: str) -> type[Runner]:
    """Returns the runner class of a backend, importing its module only now.

    Args:
        name: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.

    Raises:
        InputError: for an unknown backend name.
        BackendUnavailableError: when the backend's runtime is not installed.
    """
    if name == "torch":
        from .torch import TorchRunner

        return TorchRunner
    if name == "onnxruntime":
        from .onnxruntime import OrtRunner  # type: ignore[import-not-found]

        return OrtRunner
    if name == "tensorrt":
        from .tensorrt import TrtRunner  # type: ignore[import-not-found]

        return TrtRunner
    raise InputError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Runner", "get_runner_class"]
