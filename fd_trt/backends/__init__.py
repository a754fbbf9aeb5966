"""Runners: one per engine kind, all with the protocol of [`fd_trt.core.runner.Runner`][fd_trt.core.runner.Runner].

Backends that need heavy or GPU-only packages are imported lazily by [`get_runner_class()`][fd_trt.backends.get_runner_class].
"""

from __future__ import annotations

from fd_trt.core.runner import Runner
from fd_trt.errors import BackendUnavailableError, InputError

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
        from fd_trt.backends.torch import TorchRunner

        return TorchRunner
    if name == "onnxruntime":
        from fd_trt.backends.onnxruntime import OrtRunner  # type: ignore[import-not-found]

        return OrtRunner
    if name == "tensorrt":
        try:
            from fd_trt.backends.tensorrt import TrtRunner, runtime_problem
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the tensorrt backend is not available here ({exc}): on an NVIDIA GPU, pip install '.[gpu]'; "
                "elsewhere use backend='onnxruntime' or 'torch'"
            ) from exc
        # The module imports without TensorRT; fail here, before any graph is exported for nothing.
        problem = runtime_problem()
        if problem is not None:
            raise BackendUnavailableError(problem)
        return TrtRunner
    raise InputError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def default_backend(device: str | None = None) -> str:
    """The backend a plain call gets: ``auto`` on every device.

    ``auto`` ([`fd_trt.backends.auto`][fd_trt.backends.auto]) measures the backends that can run here (torch and onnxruntime
    on a CPU; tensorrt and torch on CUDA) and keeps the fastest. Before it, the default was
    onnxruntime on a CPU and torch on CUDA, which left most of the gain unused on small models.

    Args:
        device: the target device (the answer does not depend on it any more).
    """
    return "auto"


__all__ = ["BACKENDS", "Runner", "default_backend", "get_runner_class"]
