#!/usr/bin/env python
"""UNet FLOPs of the encoder and decoder halves, and the cut of a key-step schedule, per model.

The UNets are built on the meta device (shapes only, no weights, no memory), split as fd_trt
splits them, and counted with torch.utils.flop_counter (2 x multiply-adds, attention included).
With E and D the FLOPs of one row of the encoder and the decoder, ``all`` costs T (E + D) and a
schedule with K key steps K E + T D per row, so its cut is (T - K) / T x E / (E + D).

Example (the README's figures):
    python scripts/experiments/unet_flops.py --models sd15-arch,sdxl-arch --sizes 256,512,1024 --json flops.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def count(unet_config: dict, latent: int, text_len: int = 77) -> dict[str, float]:
    """Per-row GFLOPs of the whole UNet, its encoder and its decoder at ``latent x latent``."""
    from diffusers import UNet2DConditionModel

    from fd_trt.graphs.split import split_unet
    from fd_trt.utils.flops import flop_counter_mode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).eval()
    cfg = unet.config
    x = torch.zeros(1, int(cfg.in_channels), latent, latent, device="meta")
    t = torch.full((1,), 500.0, device="meta")
    e = torch.zeros(1, text_len, int(cfg.cross_attention_dim), device="meta")
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        added = {"text_embeds": torch.zeros(1, pooled, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    split = split_unet(unet)
    with torch.inference_mode():
        with flop_counter_mode() as whole:
            unet(x, t, e, added_cond_kwargs=added)
        with flop_counter_mode() as enc:
            feats = split.run_encoder(x, t, e, added)
        with flop_counter_mode() as dec:
            split.run_decoder(feats, t, e, added)
    params = sum(p.numel() for p in unet.parameters())
    return {
        "params_m": params / 1e6,
        "unet_gflop_per_row": whole.get_total_flops() / 1e9,
        "encoder_gflop_per_row": enc.get_total_flops() / 1e9,
        "decoder_gflop_per_row": dec.get_total_flops() / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    from fd_trt.core.schedule import parse_schedule
    from fd_trt.families.models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    configs = {"sd15-arch": SD15_UNET_CONFIG, "sdxl-arch": SDXL_UNET_CONFIG}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd15-arch,sdxl-arch", help=f"comma-separated: {', '.join(configs)}")
    ap.add_argument("--sizes", default="256,1024", help="image sizes in pixels (square), comma-separated")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--schedule", default="paper")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    key_steps = len(parse_schedule(args.schedule, args.steps).key_steps)
    rows = []
    print(
        "| model | image | params (M) | UNet GFLOP/row | encoder share | "
        f"{args.schedule} cut (DDIM-{args.steps}, {key_steps} key steps) | GFLOP/image all (CFG) | {args.schedule} (CFG) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            r = count(configs[model], size // 8)
            e, d = r["encoder_gflop_per_row"], r["decoder_gflop_per_row"]
            share = e / (e + d)
            cut = (args.steps - key_steps) / args.steps * share
            all_img = 2 * args.steps * (e + d)
            sched_img = 2 * (key_steps * e + args.steps * d)
            r.update(model=model, size=size, encoder_share=share, cut=cut, gflop_all=all_img, gflop_schedule=sched_img)
            rows.append(r)
            print(
                f"| {model} | {size}x{size} | {r['params_m']:.0f} | {r['unet_gflop_per_row']:.1f} | {100 * share:.1f}% | "
                f"{100 * cut:.1f}% | {all_img:.0f} | {sched_img:.0f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
