"""What the encoder hands the decoder, and the conditioning both take: types every layer shares.

The sampler, the runners and the graph export all speak of [`Features`][fd_trt.core.features.Features] (the mid-block
output and the skip features of one key step) and of ``Added`` (SDXL's per-row added
conditioning), so they live here, below all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fd_trt.errors import InputError

#: Graph name of the mid-block output between the two graphs.
MID = "mid"


def skip_name(index: int) -> str:
    """The graph name of skip feature ``index``: ``skip_00``, ``skip_01``, ..."""
    return f"skip_{index:02d}"


def feature_names(num_skips: int) -> list[str]:
    """Graph names of the features between the graphs: ``mid, skip_00 .. skip_NN``."""
    return [MID] + [skip_name(i) for i in range(num_skips)]


@dataclass
class Features:
    """Encoder output at one key step: the mid-block output and the skips, all with N rows."""

    mid: torch.Tensor
    skips: tuple[torch.Tensor, ...]

    @property
    def rows(self) -> int:
        return int(self.mid.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mid, *self.skips)

    def repeat(self, times: int) -> Features:
        """Tiles every tensor ``times`` times along axis 0 (step-major rows)."""
        if times == 1:
            return self

        def tile(x: torch.Tensor) -> torch.Tensor:
            return x.repeat(times, *([1] * (x.ndim - 1)))

        return Features(tile(self.mid), tuple(tile(s) for s in self.skips))

    @staticmethod
    def names(num_skips: int) -> list[str]:
        """Graph names of the feature tensors: ``mid, skip_00 .. skip_NN`` ([`fd_trt.graphs.contract`][fd_trt.graphs.contract])."""
        return feature_names(num_skips)


#: Type of the added conditioning a caller passes: ``None`` for SD 1.x/2.x, per-row tensors for SDXL.
Added = Mapping[str, torch.Tensor] | None


def added_tensors(names: tuple[str, ...], added: Added, rows: int) -> tuple[torch.Tensor, ...]:
    """The added-conditioning tensors in graph order, checked against the UNet and the row count.

    Args:
        names: the UNet's `added_input_names()`.
        added: what the caller passed.
        rows: the rows every tensor must have.

    Raises:
        InputError: for a missing or unexpected tensor, or one with other rows.
    """
    if not names:
        if added:
            raise InputError(f"this UNet takes no added conditioning, got {sorted(added)}: pass added=None")
        return ()
    missing = [n for n in names if added is None or n not in added]
    if missing:
        raise InputError(f"this UNet (SDXL-style) needs added conditioning {list(names)} per row; missing {missing}")
    assert added is not None
    out = tuple(added[n] for n in names)
    for n, t in zip(names, out):
        if t.ndim != 2 or t.shape[0] != rows:
            raise InputError(f"added conditioning {n!r} must be [{rows}, K] (one row per sample), got {tuple(t.shape)}")
    return out


def guess_mode_scales(num_down: int, conditioning_scale: float) -> torch.Tensor:
    """Per-residual scales of diffusers' ControlNet guess mode: ``logspace(-1, 0)`` over the
    ``num_down`` down residuals and the mid one, times ``conditioning_scale`` (0.1 for the
    shallowest residual up to 1 for the mid one). The ControlNet graph is exported without guess
    mode (one scale on every output), so in guess mode a graph runner runs it at scale 1 and
    multiplies its outputs by these; not for ControlNets with ``global_pool_conditions``, as in
    diffusers."""
    return torch.logspace(-1, 0, num_down + 1) * float(conditioning_scale)
