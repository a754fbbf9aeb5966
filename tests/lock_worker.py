"""A child process for tests/test_locking.py: builds an engine directory, or holds its lock.

    python tests/lock_worker.py export FOLDER READY GO [--force]
    python tests/lock_worker.py plans FOLDER READY GO
    python tests/lock_worker.py hold FOLDER READY

It writes the file READY when it is about to start, waits for the file GO (so that the test
starts several workers' builds at the same moment, after their slow imports), and prints one
JSON line with what it did. ``plans`` runs on the CPU stand-in of TensorRT (``fake_tensorrt``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LATENT = (8, 8)
TEXT = (16, 32)


def _wait_for(go: Path) -> None:
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {go} within 120 s")
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    mode, folder = argv[0], Path(argv[1])
    ready = Path(argv[2])
    if mode == "hold":
        from fd_trt.graphs.manifest import engine_dir_lock

        with engine_dir_lock(folder, "test"):
            ready.write_text("held")
            time.sleep(600)  # killed by the test
        return 0
    go = Path(argv[3])
    if mode == "export":
        from fd_trt.families.models import tiny_sd_pipeline
        from fd_trt.graphs.build import build_engines

        unet = tiny_sd_pipeline(seed=0).unet
        ready.write_text("ready")
        _wait_for(go)
        t0 = time.perf_counter()
        res = build_engines(unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False, force="--force" in argv)
        print(json.dumps({"built": res.built, "reason": res.reason, "seconds": time.perf_counter() - t0}))
        return 0
    if mode == "plans":
        from _pytest.monkeypatch import MonkeyPatch

        from fd_trt.backends.tensorrt import build_plans

        import fake_tensorrt

        fake_tensorrt.install(MonkeyPatch())
        ready.write_text("ready")
        _wait_for(go)
        results = build_plans(folder, opt_segment_steps=2)
        print(json.dumps({"built": {r.record.role: r.built for r in results}}))
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
