"""What the machine is: the CPU's model and feature flags, the device's name."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; the CPU's model name (``/proc/cpuinfo``) otherwise."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return cpu_model()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_fast_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
