"""Where fd_trt keeps what it builds on first use."""

from __future__ import annotations

import os
from pathlib import Path


def engine_cache_root() -> Path:
    """Where graphs built on first use are kept: ``$FD_TRT_CACHE`` or ``~/.cache/fd_trt/engines``."""
    env = os.environ.get("FD_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fd_trt" / "engines"
