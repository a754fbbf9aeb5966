"""The runner protocol shared by every backend (docs/design.md section 5).

A runner is constructed cheaply, then activated (allocate, load, warm up), used, and closed.
It is also a context manager. Its two calls:

* ``encode(sample [N,C,h,w], timestep [N], text [N,L,D], added=None) -> Features`` (N rows)
* ``decode(features, timesteps [S], text [N,L,D], added=None) -> noise_pred [S*N,C,h,w]``: the
  features of one key step are expanded to the S steps asked for. Rows are step-major: rows
  ``j*N .. j*N+N-1`` belong to ``timesteps[j]``, in the same order as the encoder's rows.

``added`` is SDXL's added conditioning, ``{"text_embeds": [N,P], "time_ids": [N,K]}`` with the
encoder's N rows, for both calls; ``None`` for SD 1.x/2.x. ``decode`` tiles it like the text.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from contextlib import AbstractContextManager
from typing import Any

import torch

from fd_trt.core.features import Added, Features
from fd_trt.errors import FdTrtError, InputError


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one (``cuda`` and ``cuda:0`` are, when 0 is current)."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


class Runner(abc.ABC):
    """Base class of the backends' runners.

    Attributes:
        name: the backend name (``"torch"``, ``"onnxruntime"``, ``"tensorrt"``).
        device: where ``encode`` / ``decode`` take and return tensors.
        dtype: the dtype of the graphs' float tensors; inputs are cast to it, outputs are float32.
        launches: graph executions so far, ``{"encoder": n, "decoder": n}``. A runner that splits
            one ``decode`` call into several executions (a plan's profile, a row cap) counts each.
        thread_safe: whether ``encode`` / ``decode`` may run from several threads at once. Runners
            that own static buffers (TensorRT, CUDA graphs) set it to ``False`` and serialize their
            calls with [`exclusive()`][fd_trt.core.runner.Runner.exclusive].
    """

    name: str = "base"
    thread_safe: bool = True

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.is_active = False
        self.launches: dict[str, int] = {"encoder": 0, "decoder": 0}
        self._lock = threading.RLock()

    def exclusive(self) -> AbstractContextManager[Any]:
        """A lock held around one ``encode`` / ``decode`` of a runner that is not thread-safe.

        Runners that return copies of their static buffers need no more than that: a call's inputs
        are written, run and copied out before another thread's call may start.
        """
        return self._lock if not self.thread_safe else contextlib.nullcontext()

    # lifecycle -----------------------------------------------------------------------------
    def activate(self) -> Runner:
        """Allocates and loads what the runner needs. Calling it twice is harmless."""
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Frees what [`activate()`][fd_trt.core.runner.Runner.activate] allocated."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def _activate(self) -> None:  # pragma: no cover - trivial default
        pass

    def _deactivate(self) -> None:  # pragma: no cover - trivial default
        pass

    def _check_active(self) -> None:
        if not self.is_active:
            raise FdTrtError(f"{type(self).__name__} is not active: call activate() or use it in a `with` block")

    def refit(self, unet: Any) -> bool:
        """Takes new weights from ``unet`` (same architecture) in place, if this runner can.

        The pipeline calls it when it notices that the UNet's weights changed between calls
        (a fused LoRA, other adapters or scales, a loaded state dict).

        Args:
            unet: the UNet with its new weights.

        Returns:
            ``True`` when the runner now computes with the new weights; ``False`` when it cannot
            (its graphs must then be rebuilt), which is the default.
        """
        return False

    def plan(self, schedule: Any, rows: int, parallel: bool = True, max_decoder_rows: int | None = None) -> Any:
        """Told by the sampler, before a run, which calls are coming; most runners ignore it.

        [`fd_trt.backends.auto.AutoRunner`][fd_trt.backends.auto.AutoRunner] uses it to choose a backend and a decoder call size for
        the run's schedule and rows.

        Args:
            schedule: the run's [`KeySchedule`][fd_trt.core.schedule.KeySchedule].
            rows: rows per step (2B with CFG).
            parallel: whether a segment's steps may share a decoder call.
            max_decoder_rows: the caller's cap on rows per decoder call.
        """
        return None

    def controlnet(self, record: Any) -> Any:
        """The ControlNet graph of ``record`` (a [`fd_trt.graphs.manifest.ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord] of this
        runner's engine directory) as a `fd_trt.pipelines.conditioning.ControlNetCall`, loaded once.

        Graph runners (onnxruntime, tensorrt) run it; the default, ``None``, means this runner runs
        no graphs and the ControlNet stays the torch module.
        """
        return None

    def synchronize(self) -> None:
        """Waits for queued device work, so that host timers measure it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # inference -----------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        """Runs the encoder graph.

        Args:
            sample: ``[N,C,h,w]`` scaled model input.
            timestep: ``[N]`` float timesteps.
            text: ``[N,L,D]`` encoder hidden states.
            added: SDXL's per-row ``{"text_embeds": [N,P], "time_ids": [N,K]}``; ``None`` for SD 1.x/2.x.

        Returns:
            The mid and skip features, N rows each.
        """

    @abc.abstractmethod
    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        """Runs the decoder graph for S steps that share the features of one key step.

        Args:
            features: encoder output with N rows.
            timesteps: ``[S]`` timesteps, one per step.
            text: ``[N,L,D]`` encoder hidden states of the encoder's rows.
            added: the added conditioning of the encoder's N rows (SDXL), or ``None``.

        Returns:
            ``[S*N,C,h,w]`` float32 noise predictions, step-major.
        """

    # shallow decoder steps (docs/guides/deepcache-front.md) -------------------------------------
    def _no_shallow(self) -> FdTrtError:
        return FdTrtError(
            f"the {getattr(self, 'name', type(self).__name__)} runner runs no shallow decoder steps "
            "(schedules 'deepcache:N' and 'combined:...'): use backend='torch', or a schedule without "
            "shallow steps"
        )

    def decode_capture(
        self,
        features: Features,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """[`decode()`][fd_trt.core.runner.Runner.decode], also returning, for each ``d`` in ``depths``, the hidden state that
        entered the decoder's last ``d`` up layers (``[S*N,...]``, step-major, the runner's dtype
        and device): what later shallow steps reuse."""
        raise self._no_shallow()

    def decode_shallow(
        self,
        hidden: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        """Runs the decoder's last ``len(skips)`` up layers for S steps.

        Args:
            hidden: ``[S*N,...]`` step-major, from [`decode_capture()`][fd_trt.core.runner.Runner.decode_capture] of earlier steps.
            skips: ``skip_00 .. skip_{depth-1}`` at N rows (the runner repeats them for the S steps).
            timesteps: ``[S]``.
            text, added: the N rows' conditioning, as in [`decode()`][fd_trt.core.runner.Runner.decode].

        Returns:
            ``[S*N,C,h,w]`` float32 noise predictions, step-major.
        """
        raise self._no_shallow()

    def input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        """``skip_00`` (the ``conv_in`` output) of ``[N,C,h,w]`` scaled model input."""
        raise self._no_shallow()


def one_capture_depth(runner: str, depths: tuple[int, ...]) -> int:
    """The one shallow depth a graph runner's capture graph returns the hidden state of.

    Raises:
        InputError: for none or several depths, naming the fix.
    """
    if len(depths) != 1:
        raise InputError(
            f"the {runner} runner captures one shallow depth per decoder call, got {list(depths)}: "
            "use one shallow depth per schedule, or backend='torch'"
        )
    return int(depths[0])


def step_timesteps(
    features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
) -> torch.Tensor:
    """The decoder's per-row timesteps for S steps of N rows (step-major), after checking that the
    text and added conditioning have the features' N rows.

    Args:
        features: N rows.
        timesteps: ``[S]``.
        text: ``[N,L,D]``.
        added: ``None``, or per-row tensors with N rows each (SDXL's ``text_embeds``, ``time_ids``).

    Returns:
        ``[S*N]``: row ``j*N + i`` has step ``j``'s timestep.
    """
    n = features.rows
    if text.shape[0] != n:
        raise InputError(f"text has {text.shape[0]} rows but the features have {n}: pass the encoder's text")
    if timesteps.ndim != 1 or timesteps.shape[0] < 1:
        raise InputError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    bad = {k: tuple(v.shape) for k, v in (added or {}).items() if v.ndim < 1 or v.shape[0] != n}
    if bad:
        raise InputError(f"added conditioning {bad} must have the features' {n} rows: pass the encoder's")
    return timesteps.repeat_interleave(n)


def expand_for_steps(
    features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
) -> tuple[Features, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Tiles the features, text and added conditioning to ``S*N`` step-major rows and gives each
    row its timestep (what the decoder graph does inside, for eager PyTorch). The arguments are
    those of [`step_timesteps()`][fd_trt.core.runner.step_timesteps].

    Returns:
        ``(features, timestep [S*N], text [S*N,L,D], added with S*N rows or None)``.
    """
    rows_t = step_timesteps(features, timesteps, text, added)
    s = int(timesteps.shape[0])
    rows_added = None
    if added is not None:
        rows_added = {k: (v.repeat(s, *([1] * (v.ndim - 1))) if s > 1 else v) for k, v in added.items()}
    return features.repeat(s), rows_t, (text.repeat(s, 1, 1) if s > 1 else text), rows_added
