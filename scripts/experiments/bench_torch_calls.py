#!/usr/bin/env python
"""Per-call UNet times on the torch backend, for machines too slow for a full benchmark run.

Builds only the UNet of a benchmark model (random weights), then, after one untimed call of
each, times, interleaved round by round: the whole UNet at 2 rows (one CFG step of plain diffusers), the split encoder at 2 rows,
and the split decoder at 2 rows and at ``--segment`` steps x 2 rows (one batched segment). From
the medians it projects DDIM-50 with CFG: diffusers = 50 U(2); fd_trt ``all`` = 50 (E(2) + D(2));
``paper`` = 9 E(2) + the decoder over the segments 1,1,1,2,5,5,10,10,15, each batched, at the
per-step decoder time measured at the nearest row count. A projection, not an end-to-end run:
scheduler, text encoder and VAE are left out (together under 1% of a 256x256 run here).

``--precision bf16`` runs the split encoder and decoder on a bf16 copy of the UNet, while the whole
UNet (the diffusers reference) stays fp32. ``decoder_only_bound`` is diffusers' time over 50
batched decoder steps alone: no schedule of encoder propagation can beat it, since the decoder
runs at every step.

    python scripts/experiments/bench_torch_calls.py --model sdxl-arch --height 256 --width 256 --threads 2 --repeat 2
    python scripts/experiments/bench_torch_calls.py --model sd15-arch --precision bf16 --segment 15
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdxl-arch", help="sd15-arch or sdxl-arch")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds (median)")
    ap.add_argument("--segment", type=int, default=5, help="steps of the batched decoder call")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="precision of the split encoder and decoder (the whole-UNet reference stays fp32)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    from fd_trt.backends.torch import converted_copy
    from fd_trt.core.schedule import parse_schedule
    from fd_trt.families.models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
    from fd_trt.graphs.split import split_unet

    torch.set_num_threads(args.threads)
    config = {"sd15-arch": SD15_UNET_CONFIG, "sdxl-arch": SDXL_UNET_CONFIG}[args.model]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    build_s = time.perf_counter() - t0
    cfg = unet.config
    h, w = args.height // 8, args.width // 8
    x = torch.randn(2, int(cfg.in_channels), h, w)
    t = torch.full((2,), 500.0)
    text = torch.randn(2, 77, int(cfg.cross_attention_dim))
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    split = split_unet(unet if dt == torch.float32 else converted_copy(unet, "cpu", dt))
    xs, texts = x.to(dt), text.to(dt)
    added_d = {k: v.to(dt) if k == "text_embeds" else v for k, v in added.items()} if added else None
    s = args.segment
    with torch.inference_mode():
        feats = split.run_encoder(xs, t, texts, added_d)
        feats_s = feats.repeat(s)
        t_s, text_s = t.repeat(s), texts.repeat(s, 1, 1)
        added_s = {k: v.repeat(s, 1) for k, v in added_d.items()} if added_d else None
        calls = {
            "unet_2": lambda: unet(x, t, text, added_cond_kwargs=added),
            "encoder_2": lambda: split.run_encoder(xs, t, texts, added_d),
            "decoder_2": lambda: split.run_decoder(feats, t, texts, added_d),
            f"decoder_{2 * s}": lambda: split.run_decoder(feats_s, t_s, text_s, added_s),
        }
        for fn in calls.values():  # untimed: the first call of a shape pays for oneDNN primitives and buffers
            fn()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(args.repeat):
            for name, fn in calls.items():
                t1 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t1)
                print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    u, e, d2, ds = med["unet_2"], med["encoder_2"], med["decoder_2"], med[f"decoder_{2 * s}"] / s
    key = parse_schedule("paper", 50).key_steps
    segments = [b - a for a, b in zip(key, [*key[1:], 50])]
    # Segments of one step decode at 2 rows; longer ones at the batched per-step rate.
    paper_dec = sum(d2 if n == 1 else n * ds for n in segments)
    proj = {
        "diffusers_s": 50 * u,
        "fd_all_s": 50 * (e + d2),
        "fd_paper_s": len(key) * e + paper_dec,
    }
    proj["paper_speedup_vs_diffusers"] = proj["diffusers_s"] / proj["fd_paper_s"]
    proj["all_vs_diffusers"] = proj["diffusers_s"] / proj["fd_all_s"]
    proj["decoder_only_bound"] = proj["diffusers_s"] / (50 * min(d2, ds))
    report = {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "threads": args.threads,
        "precision": args.precision,
        "repeat": args.repeat,
        "cpu": platform.processor() or "see lscpu",
        "unet_build_s": build_s,
        "median_s": med,
        "decoder_per_step_batched_s": ds,
        "projected_ddim50_cfg": proj,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
