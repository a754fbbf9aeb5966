#!/usr/bin/env python
"""Trains fd_trt's default diffusion transformer (``--model default-dit``) on the procedural shapes.

A PixArt-shaped ``PixArtTransformer2DModel`` (adaLN-single, cross-attention to the prompt) learns to
denoise the latents of the default model's VAE, conditioned on the default model's text encoder,
both frozen and shared: the folder it writes holds only the transformer, the scheduler and the
pipeline index, and fd_trt assembles the ``PixArtAlphaPipeline`` with the default model's
tokenizer, text encoder and VAE (``fd_trt.families.dit_models.load_default_dit``).

Stages (all seeded, all on the CPU):

1. generate the procedural dataset (``fd_trt.tools.shapes``), 64x64, as the default model's;
2. encode it with the default VAE (scaled latents 4x16x16) and the captions with the default text
   encoder the way ``PixArtAlphaPipeline.encode_prompt`` does (token embeddings and attention mask);
3. train the transformer: epsilon prediction with SD's DDPM noise schedule and Min-SNR-5 loss
   weights (Hang et al. 2023: the low-noise steps, which only sharpen detail, stop dominating the
   gradient, and a transformer learns the objects' shapes in far fewer steps), 10% empty captions
   for classifier-free guidance, EMA of the weights;
4. save the folder (fp16 safetensors), a training log and a sample grid (DPM-Solver++ 20, CFG 4.5).

Usage::

    python scripts/train_default_dit.py --threads 2 --no-progress          # the shipped model
    python scripts/train_default_dit.py --quick --out-dir /tmp/dit --grid ''  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_default_model import (  # noqa: E402
    GRID_PROMPTS,
    MAX_TOKENS,
    Clock,
    draw_grid,
    encode_latents,
    folder_mb,
    load_ema,
    log_losses,
    lr_at,
    optimizer_step,
)

from fd_trt.families.dit_models import DEFAULT_DIT_TRANSFORMER, default_dit_scheduler, load_default_dit  # noqa: E402
from fd_trt.families.models import default_model_dir, sd_scheduler_config  # noqa: E402
from fd_trt.tools.shapes import generate_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``argv``, or ``sys.argv[1:]`` when ``None``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "fd_trt" / "assets" / "default_dit"))
    p.add_argument(
        "--grid",
        default=str(REPO / "docs" / "images" / "default_dit_samples.png"),
        help="sample grid PNG ('' for none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--num-images", type=int, default=24000, help="training scenes")
    p.add_argument("--p-two", type=float, default=0.4, help="fraction of two-object scenes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-snr", type=float, default=5.0, help="Min-SNR loss weight gamma (0: plain epsilon MSE)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the transformer weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.steps, args.log_every = 256, 10, 5
    return args


def build_transformer(seed: int) -> Any:
    """The PixArt-shaped transformer of ``DEFAULT_DIT_TRANSFORMER``, its output projection zeroed
    (as DiT initialises its final layer: the first predictions are zero, not noise)."""
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tr = PixArtTransformer2DModel(**DEFAULT_DIT_TRANSFORMER)
    torch.nn.init.zeros_(tr.proj_out.weight)
    torch.nn.init.zeros_(tr.proj_out.bias)
    return tr


@torch.no_grad()
def encode_captions(pipe: Any, captions: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encodes each distinct caption once with ``pipe.encode_prompt`` (as sampling will).

    Returns:
        ``(distinct captions, index of each caption into them, embeddings [U,L,D], masks [U,L])``;
        the empty caption is the last distinct row.
    """
    distinct = sorted(set(captions) - {""}) + [""]
    where = {c: i for i, c in enumerate(distinct)}
    embs, masks = [], []
    for i in range(0, len(distinct), 256):
        e, m, _, _ = pipe.encode_prompt(
            distinct[i : i + 256],
            do_classifier_free_guidance=False,
            device=torch.device("cpu"),
            clean_caption=False,
            max_sequence_length=MAX_TOKENS,
        )
        embs.append(e.float())
        masks.append(m.float())
    index = torch.tensor([where[c] for c in captions], dtype=torch.long)
    return distinct, index, torch.cat(embs), torch.cat(masks)


def noisy_prediction(
    tr: Any,
    alphas: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    embs: torch.Tensor,
    masks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, the transformer's prediction at x_t)``: ``x0`` noised to steps ``t`` under the DDPM
    ``alphas`` (cumulative products), conditioned on caption embeddings and masks, one row each."""
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = tr(
        xt,
        encoder_hidden_states=embs,
        encoder_attention_mask=masks,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    return xt, pred


def train(
    args: argparse.Namespace,
    latents: torch.Tensor,
    index: torch.Tensor,
    embs: torch.Tensor,
    masks: torch.Tensor,
    log: dict[str, Any],
) -> Any:
    """Trains the transformer (epsilon MSE, CFG dropout to the last, empty, caption row, EMA).

    Returns:
        The transformer holding the EMA weights, in eval mode.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    tr = build_transformer(args.seed + 3).train()
    params = list(tr.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    alphas = DDPMScheduler.from_config(sd_scheduler_config()).alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 4)
    empty = embs.shape[0] - 1
    clock = Clock()
    window: list[float] = []
    n = latents.shape[0]
    for step in tqdm(range(args.steps), desc="transformer", disable=args.no_progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=min(100, args.steps // 5 + 1))
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        rows = index[idx].clone()
        rows[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = empty
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (args.batch,), generator=gen)
        xt, pred = noisy_prediction(tr, alphas, x0, noise, t, embs[rows], masks[rows])
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr > 0:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * snr.clamp(max=args.min_snr) / snr
        loss = per_sample.mean()
        optimizer_step(loss, opt, params, ema, step, args.ema)
        window.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            window = log_losses(log["transformer"]["losses"], window, step + 1, clock)
    load_ema(params, ema)
    log["transformer"].update(wall_s=round(clock.wall(), 1), cpu_s=round(clock.cpu(), 1))
    return tr.eval()


def save(out_dir: Path, pipe: Any) -> None:
    """Writes the folder: the transformer (fp16 safetensors), the scheduler and a ``PixArtAlphaPipeline``
    index whose tokenizer, text encoder and VAE entries are empty (they are the default model's)."""
    import shutil

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    pipe.transformer.to(torch.float16).save_pretrained(out_dir / "transformer", safe_serialization=True)
    pipe.transformer.to(torch.float32)
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    import diffusers

    index = {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": [None, None],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def sample_grid(pipe: Any, path: Path, seed: int) -> None:
    """DPM-Solver++ 20, CFG 4.5 samples of the default model's grid prompts, captions under each."""
    images = []
    for i, p in enumerate(GRID_PROMPTS):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(
            p,
            num_inference_steps=20,
            guidance_scale=4.5,
            generator=g,
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=MAX_TOKENS,
        )
        images.append(out.images[0])
    draw_grid(images, GRID_PROMPTS, path)


def main(argv: list[str] | None = None) -> int:
    """Runs all stages and returns the exit status (0)."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    shipped = default_model_dir()
    if shipped is None:
        raise SystemExit(
            "the default model (fd_trt/assets/default_model) is missing: the DiT shares its VAE and text encoder"
        )
    total = Clock()
    log: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "transformer": {"losses": []}}

    print(f"[1/4] generating {args.num_images} scenes (seed {args.seed})", flush=True)
    clock = Clock()
    data = generate_dataset(args.num_images, seed=args.seed, p_two=args.p_two, progress=not args.no_progress)
    log["data"] = {"num_images": args.num_images, "wall_s": round(clock.wall(), 1), "cpu_s": round(clock.cpu(), 1)}

    print("[2/4] encoding latents and captions with the default model's VAE and text encoder", flush=True)
    clock = Clock()
    sd = StableDiffusionPipeline.from_pretrained(shipped, local_files_only=True, use_safetensors=True)
    latents = encode_latents(sd.vae, data.images) * float(sd.vae.config.scaling_factor)
    holder = PixArtAlphaPipeline(
        tokenizer=sd.tokenizer,
        text_encoder=sd.text_encoder,
        vae=sd.vae,
        transformer=build_transformer(0),
        scheduler=default_dit_scheduler(),
    )
    distinct, index, embs, masks = encode_captions(holder, list(data.captions))
    log["encode"] = {
        "distinct_captions": len(distinct),
        "wall_s": round(clock.wall(), 1),
        "cpu_s": round(clock.cpu(), 1),
    }
    print(f"      {clock.wall():.0f} s, {len(distinct)} distinct captions", flush=True)

    print(f"[3/4] training the transformer: {args.steps} steps x {args.batch}", flush=True)
    holder.transformer = train(args, latents, index, embs, masks, log)
    print(f"      {log['transformer']['wall_s']:.0f} s, final loss {log['transformer']['losses'][-1]['loss']:.4f}")

    print(f"[4/4] saving to {out_dir}", flush=True)
    clock = Clock()
    save(out_dir, holder)
    pipe = load_default_dit(out_dir)
    if args.grid:
        sample_grid(pipe, Path(args.grid), seed=args.seed)
    log["save"] = {"wall_s": round(clock.wall(), 1), "cpu_s": round(clock.cpu(), 1)}
    log["params"] = {"transformer": sum(p.numel() for p in pipe.transformer.parameters())}
    log["total"] = {"wall_s": round(total.wall(), 1), "cpu_s": round(total.cpu(), 1)}
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    log["folder_mb"] = round(folder_mb(out_dir), 2)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    print(
        f"done in {total.wall() / 60:.1f} min wall ({total.cpu() / 60:.1f} min CPU); folder {log['folder_mb']} MB",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
