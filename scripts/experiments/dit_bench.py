"""Benchmark of Faster Diffusion on a diffusion transformer against diffusers and a block-caching
baseline in ModelOpt's ``cache_diffusion`` style (docs/guides/dit.md).

Rows, all from the same initial latents and prompt embeddings, on the torch backend:

* ``diffusers``: the diffusers pipeline itself (``PixArtAlphaPipeline`` with precomputed embeddings);
* ``fd all``: every step a key step (must equal diffusers);
* ``fd paper`` / ``fd uniform:K`` at split N: key steps, the other steps' rear blocks decoded in one
  batched call per segment, prior noise injection on;
* ``block-caching``: blocks 0..N-1 reused on two of every three steps (key steps 0, 3, 6, ...), one
  decoder call per step, no noise injection: ModelOpt's static pattern, run by the same sampler.

Each row reports the denoising seconds (text encoding and VAE excluded), the speed-up against
diffusers, the transformer GFLOPs per image (block evaluations x the per-block FLOPs counted with
``torch.utils.flop_counter`` on one forward), and the rel. L2 of the final latents against diffusers.

    python scripts/experiments/dit_bench.py --model pixart-arch --size 256 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-pixart", choices=["tiny-pixart", "pixart-arch"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--splits", default="21", help="comma-separated split points N for the fd rows")
    p.add_argument("--schedules", default="all,paper,uniform:3", help="comma-separated fd schedules")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()

    from fd_trt import FasterDiffusionPipeline
    from fd_trt.families.dit_models import pixart_arch_pipeline, tiny_pixart_pipeline

    torch.manual_seed(0)
    if a.model == "pixart-arch":
        pipe = pixart_arch_pipeline(seed=0, sample_size=a.size // 8)
        max_len = 120
    else:
        pipe = tiny_pixart_pipeline(seed=0, sample_size=a.size // 8)
        max_len = 16
    tr = pipe.transformer
    blocks = len(tr.transformer_blocks)
    side = a.size // 8
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    prompt = "a red circle on a blue background"
    pe, pm, ne, nm = pipe.encode_prompt(
        prompt, True, negative_prompt="", clean_caption=False, max_sequence_length=max_len
    )

    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tr(latents, encoder_hidden_states=pe, encoder_attention_mask=pm, timestep=torch.tensor([500]))
    forward_gflops = fc.get_total_flops() / 1e9  # one row; blocks dominate

    rows = []

    def timed(fn):
        best = None
        out = None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            took = time.perf_counter() - t0
            best = took if best is None else min(best, took)
        return out, best

    ref, t_ref = timed(
        lambda: (
            pipe(
                negative_prompt=None,
                prompt_embeds=pe,
                prompt_attention_mask=pm,
                negative_prompt_embeds=ne,
                negative_prompt_attention_mask=nm,
                latents=latents.clone(),
                num_inference_steps=a.steps,
                guidance_scale=a.guidance,
                output_type="latent",
                use_resolution_binning=False,
            ).images
        )
    )
    cfg_rows = 2 if a.guidance > 1 else 1
    rows.append(
        dict(
            row="diffusers",
            seconds=round(t_ref, 2),
            speedup=1.0,
            gflops=round(forward_gflops * a.steps * cfg_rows, 3),
            rel_l2=0.0,
        )
    )
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)

    def run(schedule, split, **kw):
        out = fd(
            prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, latents=latents.clone(),
            output_type="latent", schedule=schedule, split=split, max_sequence_length=max_len, **kw,
        )  # fmt: skip
        s = out.stats
        denoise = s.seconds["encoder"] + s.seconds["decoder"] + s.seconds["scheduler"]
        evals = (s.encoder_rows * split + s.decoder_rows * (blocks - split)) / blocks  # full-forward equivalents
        return out.latents, denoise, evals / cfg_rows, s

    for split in [int(x) for x in a.splits.split(",")]:
        cases = [(f"fd {sc}", sc, {}) for sc in a.schedules.split(",")]
        cases.append(("block-caching", "uniform:3", {"parallel": False, "noise_injection": False}))
        for name, sched, kw in cases:
            best = None
            for _ in range(a.repeats):
                lat, sec, evals, stats = run(sched, split, **kw)
                best = sec if best is None else min(best, sec)
            rows.append(
                dict(
                    row=name,
                    split=split,
                    seconds=round(best, 2),
                    speedup=round(t_ref / best, 2),
                    gflops=round(forward_gflops * evals * cfg_rows, 3),
                    rel_l2=round(_rel(lat, ref), 5),
                    encoder_calls=stats.encoder_calls,
                    decoder_calls=stats.decoder_calls,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            dict(
                model=a.model,
                size=a.size,
                steps=a.steps,
                guidance=a.guidance,
                blocks=blocks,
                backend="torch fp32",
                scheduler=type(pipe.scheduler).__name__,
                cpu=_cpu(),
                threads=torch.get_num_threads(),
                forward_gflops_per_row=round(forward_gflops, 4),
                rows=rows,
            )  # fmt: skip
        )
    )


if __name__ == "__main__":
    main()
