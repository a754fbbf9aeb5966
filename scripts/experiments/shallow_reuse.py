#!/usr/bin/env python
"""What keeping the hidden half of a shallow step's first convolutions saves on the torch backend.

A shallow step (a decoder schedule's step that recomputes only the last up layer, from the hidden
state of the last whole-decoder step and a fresh ``conv_in``) convolves ``cat(hidden, skip)``.
The torch backend keeps the hidden half of ``conv1`` and ``conv_shortcut`` from the first step that
reuses a hidden state, and convolves the skip half once for CFG's two equal halves
(``fd_trt.graphs.split.reusing_hidden_part``). This script times, interleaved round by round, with
that reuse on and off (``off``: the context replaced by a no-op):

1. one shallow call (2 rows, CFG) of the model's UNet at the given size, after the first call;
2. a whole pipeline run with ``--schedule`` (torch backend), and the rel. L2 between the two runs'
   latents (a sum reordered: about 1e-6).

Prints one JSON object.

    python scripts/experiments/shallow_reuse.py --model default --height 128 --width 128 --repeat 3
    python scripts/experiments/shallow_reuse.py --model default --height 64 --width 64 --force
    python scripts/experiments/shallow_reuse.py --model sd15-arch --height 256 --width 256 \\
        --schedule 'combined:power:8|none|1|fresh' --repeat 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def _no_reuse(*_: Any) -> Iterator[None]:
    yield


def _set_reuse(on: bool, original: Callable[..., Any]) -> None:
    import fd_trt.graphs.split as split_module
    import fd_trt.graphs.split_video as split_video

    split_module.reusing_hidden_part = original if on else _no_reuse
    split_video.reusing_hidden_part = split_module.reusing_hidden_part


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default, sd15-arch, sdxl-arch or a local folder")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--schedule", default="combined:power:10|none|1|fresh")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds of the pipeline runs (median)")
    ap.add_argument("--calls", type=int, default=20, help="shallow calls per timed round")
    ap.add_argument(
        "--force", action="store_true", help="reuse even below SHALLOW_REUSE_MIN_MACS (to measure that threshold)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import fd_trt.graphs.split as split_module

    if args.force:
        split_module.SHALLOW_REUSE_MIN_MACS = 0
    from fd_trt import FasterDiffusionPipeline
    from fd_trt.tools.bench import load_model
    from fd_trt.utils.system import cpu_model

    original = split_module.reusing_hidden_part
    sd, _ = load_model(args.model)
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    split = split_module.split_unet(sd.unet)
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sd.unet.config.in_channels, args.height // factor, args.width // factor, generator=g)
    x = x.repeat(2, 1, 1, 1)  # CFG: one latent, two rows
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        pos, neg = sd.encode_prompt("a red circle", "cpu", 1, True)
        text = torch.cat([neg, pos])
        feats = split.run_encoder(x, t, text)
        _, hs = split.run_decoder_capture(feats, t, text, None, (1,))
        hidden, skip0 = hs[1], split.run_input_conv(x)
        call_ms: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(3):
            for name in ("off", "on"):
                _set_reuse(name == "on", original)
                split.run_decoder_shallow(hidden, (skip0,), t, text)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    split.run_decoder_shallow(hidden, (skip0,), t, text)
                call_ms[name].append((time.perf_counter() - t0) / args.calls * 1e3)

    kw = dict(
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        schedule=args.schedule,
        output_type="latent",
    )
    run_s: dict[str, list[float]] = {"off": [], "on": []}
    latents: dict[str, torch.Tensor] = {}
    for name in ("off", "on"):  # warm-up
        _set_reuse(name == "on", original)
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    for _ in range(args.repeat):
        for name in ("off", "on"):
            _set_reuse(name == "on", original)
            t0 = time.perf_counter()
            out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
            run_s[name].append(time.perf_counter() - t0)
            latents[name] = out.latents
    _set_reuse(True, original)
    med = {k: statistics.median(v) for k, v in run_s.items()}
    cmed = {k: statistics.median(v) for k, v in call_ms.items()}
    rel = float((latents["on"] - latents["off"]).norm() / latents["off"].norm())
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "threads": args.threads,
                "model": args.model,
                "size": [args.height, args.width],
                "schedule": args.schedule,
                "steps": args.steps,
                "forced": args.force,
                "shallow_call_ms": {k: [round(v, 3) for v in vs] for k, vs in call_ms.items()},
                "shallow_call_speedup": round(cmed["off"] / cmed["on"], 3),
                "run_s": {k: [round(v, 3) for v in vs] for k, vs in run_s.items()},
                "run_speedup": round(med["off"] / med["on"], 3),
                "rel_l2_on_vs_off": rel,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
