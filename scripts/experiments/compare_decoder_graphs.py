#!/usr/bin/env python
"""Times two decoder graphs of one UNet side by side on ONNX Runtime (CPU), per decoder call size.

    python scripts/experiments/compare_decoder_graphs.py ENGINE_DIR_A ENGINE_DIR_B --steps 1,2,5,10 --repeat 30

Each directory's ``decoder.onnx`` is fed as its manifest's ``format_version`` says: format 1 took
the key step's features and text tiled to S*N rows, format 2 takes them at N rows with S*N
timesteps (README, "Design choices and measurements"). The features come from directory A's
encoder on random inputs (2 rows, as one image with CFG). For every S the two graphs run
alternately ``--repeat`` times after one warm-up each; the medians, their ratio (A / B: above 1
means B is faster) and the relative L2 between the two outputs are printed. Use it to compare a
format-1 directory with a format-2 one, or a shared format-2 graph with an unshared one
(``build_engines(..., share_rows=False)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--steps", default="1,2,5,10", help="decoder call sizes in steps (2 rows each)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        o.log_severity_level = 3
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as fd_trt's CPU runner
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    formats = {}
    for d in (args.a, args.b):
        formats[d] = int(json.loads((d / "manifest.json").read_text())["format_version"])
        if formats[d] not in (1, 2):
            raise SystemExit(f"{d}: format_version {formats[d]} is neither 1 nor 2")
    enc = session(args.a / "encoder.onnx")
    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in enc.get_inputs()}
    if set(shapes) != {"sample", "timestep", "encoder_hidden_states"}:
        raise SystemExit(f"{args.a}: encoder inputs {sorted(shapes)}: only SD 1.x/2.x graphs are supported here")
    feed = {
        "sample": rng.standard_normal((2, *shapes["sample"][1:]), dtype=np.float32),
        "timestep": np.full(2, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, *shapes["encoder_hidden_states"][1:]), dtype=np.float32),
    }
    feats = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, feed)))

    def decoder_feed(fmt: int, s: int) -> dict[str, np.ndarray]:
        reps = s if fmt == 1 else 1
        d = {k: np.concatenate([v] * reps) for k, v in feats.items()}
        d["encoder_hidden_states"] = np.concatenate([feed["encoder_hidden_states"]] * reps)
        d["timestep"] = np.repeat(np.linspace(900, 100, s, dtype=np.float32), 2)
        return d

    sessions = {d: session(d / "decoder.onnx") for d in (args.a, args.b)}
    print(
        f"onnxruntime {ort.__version__}, {args.threads} threads; A = {args.a} (format {formats[args.a]}), "
        f"B = {args.b} (format {formats[args.b]}); median of {args.repeat} alternating calls"
    )
    for s in (int(x) for x in args.steps.split(",")):
        feeds = {d: decoder_feed(formats[d], s) for d in sessions}
        outs = {d: sessions[d].run(None, feeds[d])[0] for d in sessions}  # warm-up, and the outputs compared
        times: dict[Path, list[float]] = {d: [] for d in sessions}
        for _ in range(args.repeat):
            for d, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds[d])
                times[d].append(time.perf_counter() - t)
        ma, mb = statistics.median(times[args.a]), statistics.median(times[args.b])
        rel = float(np.linalg.norm(outs[args.a] - outs[args.b]) / np.linalg.norm(outs[args.a]))
        print(f"S={s:>2}: A {ma * 1e3:9.2f} ms  B {mb * 1e3:9.2f} ms  A/B {ma / mb:.3f}  rel L2 {rel:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
