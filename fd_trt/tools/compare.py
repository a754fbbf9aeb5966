"""Side-by-side runs against plain diffusers, for ``fd-trt generate --compare``.

The question a user asks is "how much faster than what I run today", and what they run today is
the diffusers pipeline that the model folder describes. [`run_diffusers()`][fd_trt.tools.compare.run_diffusers] runs it with the
call's seed, scheduler, steps and guidance, so that it starts from the same latents as fd_trt;
[`rel_l2()`][fd_trt.tools.compare.rel_l2] and [`median_index()`][fd_trt.tools.compare.median_index] are the figures the CLI prints.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class DiffusersRun:
    """One run of the plain diffusers pipeline.

    Attributes:
        images: ``[B,H,W,3]`` float images in [0, 1] (diffusers' ``output_type="np"``).
        latents: the final ``[B,C,h,w]`` latents (before the VAE).
        seconds: wall seconds of the whole call (text encoder, UNet loop, VAE), as fd_trt's ``total``.
    """

    images: np.ndarray
    latents: torch.Tensor
    seconds: float


@torch.inference_mode()
def run_diffusers(
    sd: Any,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DiffusersRun:
    """Runs a diffusers pipeline as fd_trt's own call would run: same seed, so the same initial latents.

    Args:
        sd: the diffusers pipeline (for the default model, the ``StableDiffusionPipeline`` that
            [`fd_trt.families.models.load_diffusers_pipeline()`][fd_trt.families.models.load_diffusers_pipeline] loads, with the scheduler fd_trt uses).
        prompt ... num_images_per_prompt: as in diffusers.
        seed: seeds a ``torch.Generator`` on ``device``, as ``fd-trt generate --seed`` does.
        device: where the generator lives.

    Returns:
        The images, the final latents and the wall time.
    """
    last: list[torch.Tensor] = []

    def grab(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        last[:] = [kw["latents"]]
        return {}

    t0 = time.perf_counter()
    out = sd(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images_per_prompt,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="np",
        callback_on_step_end=grab,
    )
    seconds = time.perf_counter() - t0
    return DiffusersRun(images=np.asarray(out.images), latents=last[0].float().cpu(), seconds=seconds)


def rel_l2(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` over all elements (numpy arrays or tensors)."""
    a = torch.as_tensor(np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b), dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def median_index(values: Sequence[float]) -> int:
    """Index of the median value (the lower middle one for an even count)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(order) - 1) // 2]


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` in seconds, for one line of output."""
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


__all__ = ["DiffusersRun", "median_index", "rel_l2", "run_diffusers", "spread"]
