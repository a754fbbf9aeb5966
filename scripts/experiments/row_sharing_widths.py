#!/usr/bin/env python
"""Shared against unshared decoder graphs for a UNet of given widths (the row-sharing rule's data).

    python scripts/experiments/row_sharing_widths.py --channels 128,256,256,256 --latent 32 --repeat 10
    python scripts/experiments/row_sharing_widths.py --channels default --latent 16 --backend torch --repeat 30

ONNX Runtime (default): builds the engine-format-2 graphs of one UNet twice, with
``share_rows=True`` and ``share_rows=False`` (``fd_trt.graphs.build.build_engines``), and times the two
decoders side by side with ``scripts/experiments/compare_decoder_graphs.py`` (A = unshared, B = shared: A/B
above 1 means sharing pays). ``--backend torch``: the same comparison with two torch runners
(``TorchRunner(share_rows=False)`` against ``share_rows=True``), decoding the features of one
encoder call of 2 random rows, alternating, median of ``--repeat``.

``--channels default`` takes the shipped default model; otherwise a UNet with SD1.5's layout
(cross-attention in all blocks but the deepest, 2 layers per block, 768-wide text of 77 tokens,
8-channel attention heads) and the given ``block_out_channels`` is made with seeded random
weights: speed does not depend on the weights. The README's "Design choices and measurements"
lists what this printed for the widths that set ``fd_trt.graphs.split.ROW_SHARING_MIN_CHANNELS``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", required=True, help="block_out_channels, comma-separated, or 'default'")
    ap.add_argument("--latent", type=int, default=32, help="latent height and width")
    ap.add_argument("--steps", default="1,2,5,10", help="decoder call sizes in steps (2 rows each)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fd_trt_row_sharing"), help="where the graphs go")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fd_trt.graphs.build import build_engines

    if args.channels == "default":
        from fd_trt import FasterDiffusionPipeline

        unet = FasterDiffusionPipeline.from_pretrained("default", backend="torch", progress=False).sd.unet
        text = (32, int(unet.config.cross_attention_dim))
    else:
        from diffusers import UNet2DConditionModel

        try:
            ch = tuple(int(c) for c in args.channels.split(","))
        except ValueError:
            raise SystemExit(
                f"--channels {args.channels!r}: give integers such as 128,256,256,256, or 'default'"
            ) from None
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=args.latent,
            in_channels=4,
            out_channels=4,
            block_out_channels=ch,
            down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
        text = (77, 768)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    name = args.channels.replace(",", "-")
    print(
        f"UNet {name} ({params:.1f} M parameters), latents {args.latent}x{args.latent}, text {text}, {args.backend}",
        flush=True,
    )
    if args.backend == "torch":
        return _compare_torch(unet, args.latent, text, [int(s) for s in args.steps.split(",")], args.repeat)
    dirs = {}
    for share in (False, True):
        d = args.out / f"{name}-{args.latent}-{'shared' if share else 'unshared'}"
        t = time.perf_counter()
        res = build_engines(
            unet,
            d,
            latent_size=(args.latent, args.latent),
            text_shape=text,
            progress=False,
            share_rows=share,
            max_segment_steps=max(int(s) for s in args.steps.split(",")),
        )
        print(f"{d}: {'built' if res.built else 'up to date'} in {time.perf_counter() - t:.1f} s", flush=True)
        dirs[share] = d
    script = Path(__file__).with_name("compare_decoder_graphs.py")
    return subprocess.run(
        [
            sys.executable,
            str(script),
            str(dirs[False]),
            str(dirs[True]),
            "--steps",
            args.steps,
            "--repeat",
            str(args.repeat),
            "--threads",
            str(args.threads),
        ]
    ).returncode


def _compare_torch(unet, latent: int, text_shape: tuple[int, int], steps: list[int], repeat: int) -> int:
    import statistics

    import torch

    from fd_trt.backends.torch import TorchRunner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, int(unet.config.in_channels), latent, latent, generator=g)
    text = torch.randn(2, *text_shape, generator=g)
    runners = {share: TorchRunner(unet, share_rows=share).activate() for share in (False, True)}
    feats = runners[False].encode(x, torch.full((2,), 500.0), text)
    for s in steps:
        ts = torch.linspace(900.0, 100.0, s)
        outs = {share: r.decode(feats, ts, text) for share, r in runners.items()}  # warm-up, and compared
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeat):
            for share, r in runners.items():
                t = time.perf_counter()
                r.decode(feats, ts, text)
                times[share].append(time.perf_counter() - t)
        ma, mb = statistics.median(times[False]), statistics.median(times[True])
        rel = float((outs[False] - outs[True]).norm() / outs[False].norm())
        print(
            f"S={s:>2}: A {ma * 1e3:9.2f} ms  B {mb * 1e3:9.2f} ms  A/B {ma / mb:.3f}  rel L2 {rel:.1e}  "
            f"(A unshared, B shared; median of {repeat} alternating calls)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
