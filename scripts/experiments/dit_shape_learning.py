#!/usr/bin/env python
"""How fast variants of the default DiT's recipe learn the shapes: a fixed wall-clock budget, then the checker.

Trains a PixArt-shaped transformer as ``scripts/train_default_dit.py`` does (the default model's
frozen VAE and text encoder, the procedural shapes, Min-SNR epsilon loss, EMA, 10% empty captions),
with the learning rate on a cosine over ``--minutes`` of training time instead of over a step count,
so that variants of different step costs compare at equal time. Every ``--eval-every-min`` minutes
it samples the 32 single-object prompts of ``scripts/evaluate.py --num-prompts 64`` (their seeds,
DPM-Solver++ 20, CFG 4.5) with the EMA weights and reads colour and shape with the evaluation's
checker. Variants: ``--patch 1`` (256 tokens instead of 64), the width and depth, ``--teacher w``
(regress on ``w`` x the default UNet's epsilon + ``(1 - w)`` x the noise: distillation),
``--tsample logitnorm:m:s`` (timesteps from a logit-normal), ``--pred v``. Writes a JSON curve.

    python scripts/experiments/dit_shape_learning.py --minutes 12 --json base.json
    python scripts/experiments/dit_shape_learning.py --minutes 12 --patch 1 --heads 3 --layers 6 --json patch1.json
    python scripts/experiments/dit_shape_learning.py --minutes 10 --teacher 1 --json teacher.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import evaluate as ev  # noqa: E402
from train_default_dit import encode_captions, noisy_prediction  # noqa: E402
from train_default_model import encode_latents, optimizer_step  # noqa: E402

from fd_trt.families.dit_models import DEFAULT_DIT_TRANSFORMER, default_dit_scheduler  # noqa: E402
from fd_trt.families.models import default_model_dir, sd_scheduler_config  # noqa: E402
from fd_trt.tools.shapes import generate_dataset  # noqa: E402
from fd_trt.utils.system import cpu_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the curve")
    p.add_argument("--minutes", type=float, default=12.0, help="training time (evaluations excluded)")
    p.add_argument("--eval-every-min", type=float, default=4.0)
    p.add_argument("--num-images", type=int, default=24000)
    p.add_argument("--p-two", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--tsample", default="uniform", help="uniform or logitnorm:M:S")
    p.add_argument("--pred", default="epsilon", choices=["epsilon", "v"])
    p.add_argument("--teacher", type=float, default=0.0, help="weight of the default UNet's epsilon in the target")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(default_model_dir(), local_files_only=True, use_safetensors=True)
    width = args.heads * args.head_dim
    cfg = dict(
        DEFAULT_DIT_TRANSFORMER,
        patch_size=args.patch,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_layers=args.layers,
        cross_attention_dim=width,
    )
    torch.manual_seed(args.seed + 3)
    tr = PixArtTransformer2DModel(**cfg)
    torch.nn.init.zeros_(tr.proj_out.weight)
    torch.nn.init.zeros_(tr.proj_out.bias)
    sched = default_dit_scheduler()
    if args.pred == "v":
        sched = type(sched).from_config(sched.config, prediction_type="v_prediction")
    holder = PixArtAlphaPipeline(
        tokenizer=sd.tokenizer, text_encoder=sd.text_encoder, vae=sd.vae, transformer=tr, scheduler=sched
    )
    holder.set_progress_bar_config(disable=True)
    data = generate_dataset(args.num_images, seed=args.seed, p_two=args.p_two, progress=False)
    with torch.no_grad():
        latents = encode_latents(sd.vae, data.images) * float(sd.vae.config.scaling_factor)
    distinct, index, embs, masks = encode_captions(holder, list(data.captions))
    teacher_embs = None
    if args.teacher > 0:  # the UNet reads the text encoder's states as StableDiffusionPipeline encodes them
        with torch.no_grad():
            teacher_embs = torch.cat(
                [sd.encode_prompt(distinct[i : i + 256], "cpu", 1, False)[0] for i in range(0, len(distinct), 256)]
            )
        sd.unet.eval().requires_grad_(False)

    checker = ev.load_or_train_checker(progress=False)
    ps = ev.make_prompts(64, seed=0)
    single = [i for i in range(len(ps.prompts)) if ps.num_objects[i] == 1]

    def read(model: Any) -> tuple[float, float]:
        holder.transformer = model.eval()
        images = []
        with torch.no_grad():
            for i in range(0, len(single), 16):
                ids = single[i : i + 16]
                out = holder(
                    [ps.prompts[k] for k in ids],
                    num_inference_steps=20,
                    guidance_scale=4.5,
                    generator=[torch.Generator().manual_seed(ps.seeds[k]) for k in ids],
                    use_resolution_binning=False,
                    clean_caption=False,
                    max_sequence_length=32,
                    output_type="np",
                )
                images.append(out.images)
        c, s, _ = ev.checker_read(checker, np.concatenate(images), [1] * len(single))
        return float((c[:, 0] == ps.colors[single, 0]).mean()), float((s[:, 0] == ps.shapes[single, 0]).mean())

    params = list(tr.parameters())
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    alphas = DDPMScheduler.from_config(sd_scheduler_config()).alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 4)
    empty, n = embs.shape[0] - 1, latents.shape[0]
    budget, train_s, next_eval, step = args.minutes * 60, 0.0, args.eval_every_min * 60, 0
    log: dict[str, Any] = {
        "cpu": cpu_model(),
        "args": vars(args),
        "params": sum(q.numel() for q in params),
        "curve": [],
    }
    tr.train()
    while True:
        t0 = time.perf_counter()
        q = min(train_s / budget, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)))
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        rows = index[idx].clone()
        rows[torch.rand(args.batch, generator=gen) < 0.1] = empty
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=gen)
        if args.tsample == "uniform":
            t = torch.randint(0, len(alphas), (args.batch,), generator=gen)
        else:
            _, m, s = args.tsample.split(":")
            u = torch.sigmoid(float(m) + float(s) * torch.randn(args.batch, generator=gen))
            t = (u * (len(alphas) - 1)).round().long()
        xt, pred = noisy_prediction(tr, alphas, x0, noise, t, embs[rows], masks[rows])
        a = alphas[t].view(-1, 1, 1, 1)
        snr = alphas[t] / (1 - alphas[t])
        clamp = snr.clamp(max=args.min_snr) if args.min_snr > 0 else snr
        if args.pred == "v":
            target, w = a.sqrt() * noise - (1 - a).sqrt() * x0, clamp / (snr + 1)
        else:
            target, w = noise, clamp / snr
            if teacher_embs is not None:
                with torch.no_grad():
                    teacher = sd.unet(xt, t, encoder_hidden_states=teacher_embs[rows]).sample
                target = args.teacher * teacher + (1 - args.teacher) * noise
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        optimizer_step(loss, opt, params, ema, step, 0.995)
        step += 1
        train_s += time.perf_counter() - t0
        if train_s >= next_eval or train_s >= budget:
            model = copy.deepcopy(tr)
            for p, e in zip(model.parameters(), ema):
                p.data.copy_(e)
            color, shape = read(model)
            tr.train()
            point = {
                "step": step,
                "train_s": round(train_s, 1),
                "loss": float(loss.detach()),
                "color": color,
                "shape": shape,
            }
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            next_eval += args.eval_every_min * 60
            if train_s >= budget:
                break
    Path(args.json).write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
