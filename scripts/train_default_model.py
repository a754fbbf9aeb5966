#!/usr/bin/env python
"""Trains fd_trt's embedded default model: a miniature Stable Diffusion on procedural shapes.

Stages (all seeded, all on the CPU):

1. generate the procedural dataset (``fd_trt.tools.shapes``): 64x64 RGB, one or two objects;
2. train an ``AutoencoderKL`` (downsampling factor 4: latents are 4x16x16) and set its
   ``scaling_factor`` to 1 / std of the latents, as SD does;
3. encode the whole dataset to latents once;
4. train a ``UNet2DConditionModel`` with cross-attention jointly with a small ``CLIPTextModel``
   over the word tokenizer (``make_word_tokenizer``), epsilon prediction, SD's DDPM noise
   schedule, 10% empty captions for classifier-free guidance, EMA of the weights;
5. save a diffusers ``StableDiffusionPipeline`` folder (safetensors, fp16 storage), a training log
   and a sample grid (DDIM-50, CFG 7.5).

Usage::

    nice -n 19 python scripts/train_default_model.py                 # the shipped model
    python scripts/train_default_model.py --quick --out-dir /tmp/m    # a 1-minute smoke test

Timing: the log records wall seconds and process CPU seconds per stage. With ``--threads 1`` the
CPU seconds are what an idle machine would take in wall time, whatever else shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fd_trt.families.models import default_model_dir, make_word_tokenizer, sd_scheduler_config  # noqa: E402
from fd_trt.tools.shapes import generate_dataset, pair_prompt, single_prompt  # noqa: E402

MAX_TOKENS = (
    32  # longest caption: 28 tokens ("orange", "purple", "triangle", "cyan" are several BPE tokens) + 2 specials
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``argv``, or ``sys.argv[1:]`` when ``None``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "fd_trt" / "assets" / "default_model"))
    p.add_argument(
        "--grid",
        default=str(REPO / "docs" / "images" / "default_model_samples.png"),
        help="sample grid PNG ('' for none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--num-images", type=int, default=40000, help="training scenes")
    p.add_argument("--p-two", type=float, default=0.6, help="fraction of two-object scenes")
    p.add_argument("--vae-steps", type=int, default=1800)
    p.add_argument(
        "--vae-crop", type=int, default=32, help="random crop size of the VAE's early steps (0: full images)"
    )
    p.add_argument("--vae-full-steps", type=int, default=300, help="last VAE steps on full 64x64 images")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the UNet and text encoder weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--resave-only", action="store_true", help="only re-save --out-dir with the storage policy")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.vae_steps, args.vae_full_steps, args.unet_steps, args.log_every = 512, 10, 4, 10, 5
    return args


# model definitions -----------------------------------------------------------------------------
def build_vae() -> Any:
    """AutoencoderKL with 3 blocks: downsampling factor 4, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def build_unet() -> Any:
    """UNet2DConditionModel on 16x16 latents: cross-attention at 8x8, 4x4 and the mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: Any) -> Any:
    """A small CLIPTextModel over the word tokenizer: width 64, 3 layers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# helpers ------------------------------------------------------------------------------------------
class Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self) -> None:
        self.w0, self.c0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.w0

    def cpu(self) -> float:
        return time.process_time() - self.c0


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    q = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)))


def optimizer_step(
    loss: torch.Tensor, opt: Any, params: list[torch.Tensor], ema: list[torch.Tensor], step: int, decay: float
) -> None:
    """Backward, gradient clip at 1, the optimizer step, then the EMA of ``params`` into ``ema``,
    with a warm-up so that the early average is not dominated by the random init."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)


def log_losses(losses: list[dict[str, Any]], window: list[float], step: int, clock: Clock) -> list[float]:
    """Appends the mean of ``window`` at ``step`` (1-based) with the clock's seconds; returns a new window."""
    losses.append(
        {"step": step, "loss": float(np.mean(window)), "wall_s": round(clock.wall(), 1), "cpu_s": round(clock.cpu(), 1)}
    )
    return []


@torch.no_grad()
def load_ema(params: list[torch.Tensor], ema: list[torch.Tensor]) -> None:
    """Copies the EMA weights into the model's parameters."""
    for p, e in zip(params, ema):
        p.copy_(e)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(args: argparse.Namespace, images: np.ndarray, held_out: np.ndarray, log: dict[str, Any]) -> Any:
    """Trains the VAE and records its losses, time and held-out PSNR in ``log['vae']``.

    Args:
        args: the parsed command line.
        images: ``[N,64,64,3]`` uint8 training scenes.
        held_out: scenes for the PSNR measurement.
        log: the training log, updated in place.

    Returns:
        The ``AutoencoderKL`` in eval mode.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed + 1)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 2)
    clock = Clock()
    window: list[float] = []
    for step in tqdm(range(args.vae_steps), desc="vae", disable=args.no_progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=min(30, args.vae_steps // 5 + 1))
        x = to_tensor(images[rng.integers(0, len(images), args.vae_batch)])
        if args.vae_crop and step < args.vae_steps - args.vae_full_steps:
            # The VAE is convolutional: random crops cost a quarter of a full image at 32 px and
            # teach the same local reconstruction; the last steps on full images fit the mid-block
            # attention to the 64x64 geometry.
            i, j = rng.integers(0, x.shape[-1] - args.vae_crop + 1, 2)
            x = x[:, :, i : i + args.vae_crop, j : j + args.vae_crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps flat colours and edges sharp; the tiny KL only keeps the latents bounded (as SD's 1e-6).
        loss_rec = (rec - x).abs().mean() + F.mse_loss(rec, x)
        loss = loss_rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        window.append(float(loss_rec.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            log["vae"]["losses"].append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(window)),
                    "wall_s": round(clock.wall(), 1),
                    "cpu_s": round(clock.cpu(), 1),
                }
            )
            window = []
    vae.eval()
    with torch.no_grad():
        x = to_tensor(held_out)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2, reduction="none").mean(dim=(1, 2, 3))
        psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    log["vae"].update(wall_s=round(clock.wall(), 1), cpu_s=round(clock.cpu(), 1), held_out_psnr_db=round(psnr, 2))
    return vae


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of the dataset, unscaled."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mode())
    return torch.cat(out)


def train_unet(
    args: argparse.Namespace,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    tokenizer: Any,
    log: dict[str, Any],
) -> tuple[Any, Any]:
    """Trains the UNet and text encoder together (epsilon MSE, CFG dropout, EMA).

    Args:
        args: the parsed command line.
        latents: ``[N,4,16,16]`` scaled latents.
        ids: ``[N,L]`` caption token ids.
        empty_ids: ``[L]`` token ids of the empty caption.
        tokenizer: the word tokenizer.
        log: the training log, updated in place.

    Returns:
        ``(unet, text_encoder)`` holding the EMA weights, in eval mode.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed + 3)
    unet = build_unet().train()
    text_encoder = build_text_encoder(tokenizer).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(sd_scheduler_config())  # ignores DDIM-only keys
    alphas = noise_scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 4)
    clock = Clock()
    window: list[float] = []
    n = latents.shape[0]
    for step in tqdm(range(args.unet_steps), desc="unet", disable=args.no_progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=min(100, args.unet_steps // 5 + 1))
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(args.unet_batch, generator=gen) < args.cfg_dropout
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # same as noise_scheduler.add_noise
        text = text_encoder(tok)[0]
        pred = unet(xt, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, params, ema, step, args.ema)
        window.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            window = log_losses(log["unet"]["losses"], window, step + 1, clock)
    load_ema(params, ema)
    log["unet"].update(wall_s=round(clock.wall(), 1), cpu_s=round(clock.cpu(), 1))
    return unet.eval(), text_encoder.eval()


def save_pipeline(out_dir: Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """Saves a StableDiffusionPipeline folder (safetensors, fp16 storage) and reloads it in fp32."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # fp16 storage of the UNet and VAE keeps the folder under 20 MB; diffusers loads them back in
    # fp32. The text encoder stays fp32: transformers keeps a checkpoint's stored dtype by default,
    # and an fp16 text encoder would feed fp16 states to the fp32 UNet.
    unet.to(torch.float16)
    vae.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    unet.to(torch.float32)
    vae.to(torch.float32)
    return load_fp32(out_dir)


def resave(path: Path) -> Any:
    """Re-saves an existing folder with the storage policy of :func:`save_pipeline`."""
    import shutil
    import tempfile

    sd = load_fp32(path)
    with tempfile.TemporaryDirectory() as tmp:
        keep = [f for f in ("training_log.json",) if (path / f).is_file()]
        for f in keep:
            shutil.copy(path / f, Path(tmp) / f)
        out = save_pipeline(path, sd.vae, sd.unet, sd.text_encoder, sd.tokenizer)
        for f in keep:
            shutil.copy(Path(tmp) / f, path / f)
    return out


def load_fp32(path: Path) -> Any:
    """Loads the saved folder offline, in float32."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(
        path,
        local_files_only=True,
        use_safetensors=True,
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


#: The prompts of the sample grids: single objects on top, pairs below.
GRID_PROMPTS = (
    single_prompt("red", "circle"),
    single_prompt("orange", "square"),
    single_prompt("yellow", "triangle"),
    single_prompt("green", "star"),
    single_prompt("cyan", "diamond"),
    single_prompt("blue", "circle", "left"),
    single_prompt("purple", "square"),
    single_prompt("magenta", "triangle", "top"),
    pair_prompt(("red", "circle"), ("blue", "square")),
    pair_prompt(("yellow", "star"), ("purple", "triangle")),
    pair_prompt(("green", "diamond"), ("magenta", "circle")),
    pair_prompt(("cyan", "square"), ("orange", "star")),
)


def draw_grid(images: list[Any], prompts: Sequence[str], path: Path) -> None:
    """Draws 64x64 PIL ``images`` in a 4-column grid, each caption under its image, to ``path``."""
    from PIL import Image, ImageDraw

    cols, scale, cap_h = 4, 3, 30
    w = 64 * scale
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * (w + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, p) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * w, (i // cols) * (w + cap_h)
        grid.paste(img.resize((w, w), Image.NEAREST), (x, y))
        words = p.split()
        lines = [" ".join(words[:6]), " ".join(words[6:])] if len(words) > 6 else [p]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + w + 2 + 12 * k), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def sample_grid(sd: Any, path: Path, seed: int) -> None:
    """A grid of DDIM-50, CFG 7.5 samples of `GRID_PROMPTS`, captions under each."""
    images = []
    for i, p in enumerate(GRID_PROMPTS):
        g = torch.Generator().manual_seed(seed + i)
        images.append(sd(p, num_inference_steps=50, guidance_scale=7.5, generator=g, output_type="pil").images[0])
    draw_grid(images, GRID_PROMPTS, path)


def folder_mb(path: Path) -> float:
    """Total size of the files under ``path`` in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    """Runs all stages.

    Args:
        argv: command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status, 0.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if args.resave_only:
        resave(out_dir)
        print(f"re-saved {out_dir} ({folder_mb(out_dir):.2f} MB)")
        return 0
    total = Clock()
    log: dict[str, Any] = {
        "args": vars(args),
        "torch": torch.__version__,
        "threads": args.threads,
        "vae": {"losses": []},
        "unet": {"losses": []},
    }

    print(f"[1/5] generating {args.num_images} scenes (seed {args.seed})", flush=True)
    clock = Clock()
    data = generate_dataset(args.num_images, seed=args.seed, p_two=args.p_two, progress=not args.no_progress)
    held = generate_dataset(256, seed=args.seed + 1000, p_two=args.p_two)
    log["data"] = {
        "num_images": args.num_images,
        "p_two": args.p_two,
        "wall_s": round(clock.wall(), 1),
        "cpu_s": round(clock.cpu(), 1),
    }
    print(f"      {clock.wall():.0f} s", flush=True)

    print(f"[2/5] training the VAE: {args.vae_steps} steps x {args.vae_batch}", flush=True)
    vae = train_vae(args, data.images, held.images, log)
    print(f"      {log['vae']['wall_s']:.0f} s, held-out PSNR {log['vae']['held_out_psnr_db']:.1f} dB", flush=True)

    print("[3/5] encoding the latents", flush=True)
    clock = Clock()
    raw = encode_latents(vae, data.images)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    log["latents"] = {
        "shape": list(raw.shape[1:]),
        "scaling_factor": scaling,
        "wall_s": round(clock.wall(), 1),
        "cpu_s": round(clock.cpu(), 1),
    }
    print(f"      {clock.wall():.0f} s, scaling_factor {scaling:.4f}", flush=True)

    print(f"[4/5] training the UNet + text encoder: {args.unet_steps} steps x {args.unet_batch}", flush=True)
    tokenizer = make_word_tokenizer(max_length=MAX_TOKENS)
    enc = tokenizer(data.captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    empty = tokenizer(
        [""], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids[0]
    unet, text_encoder = train_unet(args, latents, enc.input_ids, empty, tokenizer, log)
    print(f"      {log['unet']['wall_s']:.0f} s, final loss {log['unet']['losses'][-1]['loss']:.4f}", flush=True)

    print(f"[5/5] saving to {out_dir}", flush=True)
    clock = Clock()
    sd = save_pipeline(out_dir, vae, unet, text_encoder, tokenizer)
    if args.grid:
        sample_grid(sd, Path(args.grid), seed=args.seed)
    log["save"] = {"wall_s": round(clock.wall(), 1), "cpu_s": round(clock.cpu(), 1)}
    log["params"] = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    log["total"] = {"wall_s": round(total.wall(), 1), "cpu_s": round(total.cpu(), 1)}
    log["folder_mb"] = round(folder_mb(out_dir), 2)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    log["folder_mb"] = round(folder_mb(out_dir), 2)
    print(
        f"done in {total.wall() / 60:.1f} min wall ({total.cpu() / 60:.1f} min CPU); folder {log['folder_mb']} MB",
        flush=True,
    )
    if default_model_dir() is not None and Path(default_model_dir()).resolve() == out_dir.resolve():
        print(
            "this is the shipped default model: FasterDiffusionPipeline.from_pretrained('default') loads it", flush=True
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
