"""Token Merging (ToMe for Stable Diffusion, Bolya and Hoffman 2023) on top of encoder propagation.

``token_merging=r`` (0 < r < 1) on a pipeline patches the UNet's transformer blocks with
``tomesd.apply_patch(sd_pipeline, ratio=r)``: before self-attention, cross-attention and the MLP
of every block at the highest resolution, a fraction r of the image tokens is merged into the most
similar remaining ones (bipartite soft matching), and unmerged afterwards. It combines with every
schedule: encoder propagation decides which blocks run, ToMe how many tokens they see.

Runs on ``backend="torch"`` only. The graph backends are refused: the merge's ``scatter_reduce``
with ``reduce="mean"`` has no ONNX operator (ScatterElements reduces by add, mul, min or max), and
the graphs' cache key is the UNet's weights, which ToMe does not change.

tomesd reads the image size from a pre-hook on the UNet's forward, which the split never calls;
[`set_token_merging_size()`][fd_trt.pipelines.token_merging.set_token_merging_size] gives it the size before every run. The random choice of
destination tokens draws from tomesd's own generator (forked from torch's global one on first use),
as in a tomesd-patched diffusers pipeline.
"""

from __future__ import annotations

import math
from typing import Any

from fd_trt.errors import InputError


def check_token_merging(ratio: Any, backend: str) -> float | None:
    """``ratio`` checked: ``None`` (off) or a number in (0, 1).

    Raises:
        InputError: for another value, or a backend other than torch.
    """
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise InputError(f"token_merging must be a ratio in (0, 1) (0.5 merges half the tokens) or None, got {ratio!r}")
    if backend != "torch":
        raise InputError(
            f"token_merging runs on backend='torch' only, got backend={backend!r}: tomesd's merge (scatter_reduce "
            "with reduce='mean') does not export to ONNX. Pass backend='torch', or leave token_merging unset"
        )
    return float(ratio)


def apply_token_merging(sd_pipeline: Any, ratio: float, **tomesd_options: Any) -> None:
    """Patches the pipeline's UNet with ``tomesd.apply_patch`` (in place: the wrapped diffusers
    pipeline's UNet is the one patched; ``tomesd.remove_patch(sd_pipeline)`` undoes it).

    Raises:
        InputError: when tomesd is not installed.
    """
    try:
        import tomesd
    except ImportError:  # pragma: no cover - tomesd is a dependency of the [tome] extra
        raise InputError("token_merging needs tomesd: pip install 'fd_trt[tome]' (or tomesd)") from None
    tomesd.apply_patch(sd_pipeline, ratio=float(ratio), **tomesd_options)


def set_token_merging_size(unet: Any, height: int, width: int) -> None:
    """Tells tomesd's blocks the UNet's input size (what its pre-hook on the UNet forward records)."""
    info = getattr(unet, "_tome_info", None)
    if info is not None:
        info["size"] = (int(height), int(width))


def token_merging_ratio(unet: Any) -> float | None:
    """The ratio tomesd patched the UNet with, ``None`` when it is not patched."""
    info = getattr(unet, "_tome_info", None)
    return None if info is None else float(info["args"]["ratio"])


__all__ = ["apply_token_merging", "check_token_merging", "set_token_merging_size", "token_merging_ratio"]
