#!/usr/bin/env python
"""Trains fd_trt's default ControlNet: the shipped default model steered by a silhouette mask.

Stages (all seeded, all on the CPU):

1. generate procedural scenes (``fd_trt.tools.shapes``) with their ground-truth silhouette masks
   (``Dataset.masks``: the union of the objects, binarised at 0.5);
2. encode the scenes to latents with the default model's frozen VAE (posterior mean, times its
   ``scaling_factor``) and the distinct captions with its frozen text encoder, once;
3. ``ControlNetModel.from_unet(default UNet)``: the encoder half is copied from the UNet and the
   output convolutions start at zero, so training starts from the unconditioned model. Only the
   ControlNet trains; UNet, text encoder and VAE stay frozen. Loss: epsilon MSE under the model's
   DDPM noise schedule, 10% empty captions (the mask is always given), as the default model;
4. save a diffusers ``ControlNetModel`` folder (safetensors, fp16 storage) with a training log.

The control image is what fd_trt's pipeline feeds a ControlNet: the mask as an RGB image in [0, 1]
at the output size (64x64), white object on black. ``conditioning_embedding_out_channels`` has three
entries, so the conditioning embedding downsamples by 4, the VAE factor of the default model.

Usage::

    flock /tmp/fd_heavy.lock python scripts/train_default_controlnet.py --no-progress --max-minutes 18   # the shipped one
    python scripts/train_default_controlnet.py --quick --out-dir /tmp/cn      # a smoke test (~1 min)

Timing: the log records wall and process CPU seconds per stage; CPU seconds / threads is the wall
time of an idle machine with that many cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fd_trt.families.models import default_model_dir, sd_scheduler_config  # noqa: E402
from fd_trt.tools.shapes import generate_dataset  # noqa: E402

#: The conditioning embedding's widths: three entries downsample the 64x64 mask by 4 to the latents.
COND_CHANNELS = (16, 32, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``argv``, or ``sys.argv[1:]`` when ``None``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the default model folder (the shipped one by default)")
    p.add_argument("--out-dir", default=str(REPO / "fd_trt" / "assets" / "default_controlnet"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--num-images", type=int, default=16000, help="training scenes")
    p.add_argument("--data-seed", type=int, default=20000, help="seed of the scenes (not the default model's 0)")
    p.add_argument("--p-two", type=float, default=0.5, help="fraction of two-object scenes")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop training early once the training stage has used this many CPU-minutes / threads (0: no limit)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.steps, args.batch, args.log_every = 256, 6, 8, 2
    return args


class Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self) -> None:
        self.w0, self.c0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.w0

    def cpu(self) -> float:
        return time.process_time() - self.c0

    def stamp(self) -> dict[str, float]:
        return {"wall_s": round(self.wall(), 1), "cpu_s": round(self.cpu(), 1)}


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    q = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)))


def mask_to_control(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bool ``[N,64,64]`` masks -> the control images the pipeline feeds: ``[N,3,64,64]`` float in {0, 1}."""
    m = torch.as_tensor(np.asarray(masks)).float()
    return m[:, None].expand(-1, 3, -1, -1).contiguous()


def load_components(model: str | None) -> Any:
    """The default model's diffusers pipeline, fp32, offline."""
    from diffusers import StableDiffusionPipeline

    path = Path(model) if model else default_model_dir()
    if path is None:
        raise SystemExit("no default model is installed (fd_trt/assets/default_model); pass --model FOLDER")
    sd = StableDiffusionPipeline.from_pretrained(
        path,
        local_files_only=True,
        use_safetensors=True,
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    return sd, path


@torch.no_grad()
def encode_data(
    sd: Any, images: np.ndarray, captions: list[str], batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled latents, per-scene caption indices, and the text states of the distinct captions.

    Returns:
        ``(latents [N,4,16,16], caption_index [N], text [U,L,D], empty_text [L,D])``.
    """
    lat = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        lat.append(sd.vae.encode(x).latent_dist.mode())
    latents = torch.cat(lat) * float(sd.vae.config.scaling_factor)
    unique = sorted(set(captions))
    where = {c: k for k, c in enumerate(unique)}
    index = torch.tensor([where[c] for c in captions])

    def embed(texts: list[str]) -> torch.Tensor:
        tok = sd.tokenizer(
            texts, padding="max_length", max_length=sd.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return sd.text_encoder(tok.input_ids)[0]

    text = torch.cat([embed(unique[i : i + 512]) for i in range(0, len(unique), 512)])
    return latents, index, text, embed([""])[0]


def build_controlnet(unet: Any) -> Any:
    """``ControlNetModel.from_unet``: the UNet's encoder copied, zero-initialised output convolutions."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)


def train(
    args: argparse.Namespace,
    sd: Any,
    latents: torch.Tensor,
    index: torch.Tensor,
    text: torch.Tensor,
    empty: torch.Tensor,
    masks: np.ndarray,
    log: dict[str, Any],
) -> Any:
    """Trains the ControlNet against the frozen UNet; returns it in eval mode."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed + 3)
    unet = sd.unet.eval().requires_grad_(False)
    controlnet = build_controlnet(unet).train()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    alphas = noise_scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 4)
    control_all = torch.from_numpy(masks)
    clock = Clock()
    window: list[float] = []
    n = latents.shape[0]
    for step in tqdm(range(args.steps), desc="controlnet", disable=args.no_progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=min(50, args.steps // 5 + 1))
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = latents[idx]
        states = text[index[idx]].clone()
        drop = torch.rand(args.batch, generator=gen) < args.cfg_dropout
        states[drop] = empty
        cond = mask_to_control(control_all[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        down, mid = controlnet(xt, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        pred = unet(
            xt, t, encoder_hidden_states=states, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log["train"]["losses"].append({"step": step + 1, "loss": float(np.mean(window)), **clock.stamp()})
            if args.no_progress:
                e = log["train"]["losses"][-1]
                print(
                    f"      step {e['step']}: loss {e['loss']:.4f}, {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} s CPU",
                    flush=True,
                )
            window = []
        if args.max_minutes and clock.cpu() / args.threads > 60 * args.max_minutes:
            log["train"]["stopped_early_at_step"] = step + 1
            log["train"]["losses"].append(
                {"step": step + 1, "loss": float(np.mean(window or [float("nan")])), **clock.stamp()}
            )
            break
    log["train"].update(clock.stamp())
    return controlnet.eval()


@torch.no_grad()
def held_out_loss(
    sd: Any, controlnet: Any, latents: torch.Tensor, states: torch.Tensor, masks: np.ndarray, seed: int
) -> dict[str, float]:
    """Epsilon MSE on held-out scenes with the ControlNet, and with it switched off (scale 0)."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(sd_scheduler_config()).alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * latents + (1 - a).sqrt() * noise
    down, mid = controlnet(
        xt, t, encoder_hidden_states=states, controlnet_cond=mask_to_control(masks), return_dict=False
    )
    with_cn = sd.unet(
        xt, t, encoder_hidden_states=states, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    without = sd.unet(xt, t, encoder_hidden_states=states).sample
    return {"with_controlnet": float(F.mse_loss(with_cn, noise)), "without": float(F.mse_loss(without, noise))}


def folder_mb(path: Path) -> float:
    """Total size of the files under ``path`` in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    """Runs all stages; returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    total = Clock()
    sd, model_path = load_components(args.model)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.requires_grad_(False)
    log: dict[str, Any] = {
        "args": vars(args),
        "model": str(model_path),
        "torch": torch.__version__,
        "threads": args.threads,
        "train": {"losses": []},
    }

    print(f"[1/4] generating {args.num_images} scenes with masks (seed {args.data_seed})", flush=True)
    clock = Clock()
    data = generate_dataset(args.num_images, seed=args.data_seed, p_two=args.p_two, progress=not args.no_progress)
    held = generate_dataset(128, seed=args.data_seed + 1000, p_two=args.p_two)
    log["data"] = {
        "num_images": args.num_images,
        "p_two": args.p_two,
        "mask_fraction": round(float(data.masks.mean()), 4),
        **clock.stamp(),
    }
    print(f"      {clock.wall():.0f} s", flush=True)

    print("[2/4] encoding latents and captions (frozen VAE and text encoder)", flush=True)
    clock = Clock()
    latents, index, text, empty = encode_data(sd, data.images, data.captions)
    log["encode"] = {"distinct_captions": int(text.shape[0]), **clock.stamp()}
    print(f"      {clock.wall():.0f} s, {text.shape[0]} distinct captions", flush=True)

    print(f"[3/4] training the ControlNet: {args.steps} steps x {args.batch}", flush=True)
    controlnet = train(args, sd, latents, index, text, empty, data.masks, log)
    print(
        f"      {log['train']['wall_s']:.0f} s wall, {log['train']['cpu_s']:.0f} s CPU, "
        f"final loss {log['train']['losses'][-1]['loss']:.4f}",
        flush=True,
    )

    print(f"[4/4] saving to {out_dir}", flush=True)
    clock = Clock()
    h_lat, h_idx, h_text, _ = encode_data(sd, held.images, held.captions)
    log["held_out_eps_mse"] = held_out_loss(sd, controlnet, h_lat, h_text[h_idx], held.masks, seed=args.seed + 5)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    controlnet.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    log["save"] = clock.stamp()
    log["params"] = sum(p.numel() for p in controlnet.parameters())
    log["total"] = total.stamp()
    log["total"]["cpu_s_per_thread"] = round(total.cpu() / args.threads, 1)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    log["folder_mb"] = round(folder_mb(out_dir), 3)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    print(
        f"held-out eps MSE {log['held_out_eps_mse']['with_controlnet']:.4f} with the ControlNet, "
        f"{log['held_out_eps_mse']['without']:.4f} without",
        flush=True,
    )
    print(
        f"done in {total.wall() / 60:.1f} min wall ({total.cpu() / 60:.1f} min CPU, "
        f"{total.cpu() / args.threads / 60:.1f} min CPU / {args.threads} threads); folder {log['folder_mb']} MB",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
