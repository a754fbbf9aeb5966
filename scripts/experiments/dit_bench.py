"""Benchmark of Faster Diffusion on a diffusion transformer against diffusers and a block-caching
baseline in ModelOpt's ``cache_diffusion`` style (docs/guides/dit.md).

Rows, all from the same initial latents and prompt embeddings, on the torch backend (and the fd
rows again on each other backend of ``--backends``, after an untimed first call that exports the
graphs, its seconds in the JSON's ``warmup_seconds``):

* ``diffusers``: the diffusers pipeline itself (``PixArtAlphaPipeline`` or ``StableDiffusion3Pipeline``
  with precomputed embeddings);
* ``fd all``: every step a key step (must equal diffusers);
* ``fd paper`` / ``fd uniform:K`` at split N: key steps, the other steps' rear blocks decoded in one
  batched call per segment, prior noise injection on;
* ``block-caching``: blocks 0..N-1 reused on two of every three steps (key steps 0, 3, 6, ...), one
  decoder call per step, no noise injection: ModelOpt's static pattern, run by the same sampler;
* ``fd calibrated`` (``--calibrate``): the key steps (and N, over ``--splits`` when given, else a
  quarter, half and three quarters of the blocks) searched by
  ``fd_trt.tools.calibrate_dit.calibrate_transformer`` within ``--max-error`` of ``all``, on another
  prompt and seed than the rows', run at the calibration's N (its seconds, N and key steps are in
  the JSON).

Each row reports the denoising seconds (text encoding and VAE excluded), the speed-up against
diffusers, the transformer GFLOPs per image (block evaluations x the per-block FLOPs counted with
``torch.utils.flop_counter`` on one forward), and the rel. L2 of the final latents against diffusers.

Models: ``tiny-pixart``, ``pixart-arch`` (PixArt-alpha XL/2's transformer config), ``tiny-sd3``,
``sd3-arch`` (SD3-medium's), the -arch ones with random weights and small random text encoders and VAE.

    python scripts/experiments/dit_bench.py --model pixart-arch --size 256 --steps 20 --splits 21
    python scripts/experiments/dit_bench.py --model pixart-arch --size 256 --splits 21 --backends torch,onnxruntime
    python scripts/experiments/dit_bench.py --model sd3-arch --size 256 --steps 28
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (the tiny models' GFLOPs are well below 1)."""
    return float(f"{x:.6g}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


#: The models: the tiny test models and the -arch ones (a released model's exact transformer config,
#: random weights, small random text encoders and VAE).
MODELS = ("tiny-pixart", "pixart-arch", "tiny-sd3", "sd3-arch")

#: The calibration's prompt (seed 1): not the rows' prompt, so the calibrated row is not fitted to it.
CALIBRATION_PROMPT = "a green square on a white background"


def build(model: str, size: int) -> tuple[Any, int]:
    """The diffusers pipeline of ``model`` at ``size`` x ``size`` images, and its prompt length."""
    from fd_trt.families import dit_models

    side = size // 8
    if model == "pixart-arch":
        return dit_models.pixart_arch_pipeline(seed=0, sample_size=side), 120
    if model == "tiny-pixart":
        return dit_models.tiny_pixart_pipeline(seed=0, sample_size=side), 16
    if model == "sd3-arch":
        return dit_models.sd3_arch_pipeline(seed=0, sample_size=side), 256
    if model == "tiny-sd3":
        return dit_models.tiny_sd3_pipeline(seed=0, sample_size=side), 16
    raise SystemExit(f"unknown model {model!r}: {', '.join(MODELS)}")


def bench(
    pipe: Any,
    *,
    steps: int = 20,
    guidance: float | None = None,
    splits: Sequence[int] | None = None,
    schedules: Sequence[str] = ("all", "paper", "uniform:3"),
    repeats: int = 1,
    max_len: int = 120,
    prompt: str = "a red circle on a blue background",
    log: Callable[[dict[str, Any]], None] | None = None,
    calibrate: bool = False,
    calibration_tolerance: float = 0.05,
    block_caching: bool = True,
    backends: Sequence[str] = ("torch",),
) -> dict[str, Any]:
    """The rows (module docstring) for a diffusers PixArt or SD3 pipeline; ``splits`` default to the
    family's N, ``guidance`` to the family's CFG scale. ``calibrate`` adds the ``fd calibrated`` row
    (N searched over ``splits``, or a quarter, half and three quarters of the blocks, within
    ``calibration_tolerance`` rel. L2 of ``all``). ``backends`` other than torch repeat the fd rows
    (not block caching) on that backend."""
    from fd_trt import FasterDiffusionPipeline

    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    others = {
        b: FasterDiffusionPipeline.from_diffusers(pipe, backend=b, progress=False) for b in backends if b != "torch"
    }
    sd3 = fd.family.name == "sd3"
    guidance = fd.family.default_guidance if guidance is None else float(guidance)
    tr = pipe.transformer
    blocks = len(tr.transformer_blocks)
    side = int(tr.config.sample_size)
    latents = torch.randn(1, int(tr.config.in_channels), side, side, generator=torch.Generator().manual_seed(0))
    if sd3:
        pe, ne, ppe, npe = pipe.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=max_len
        )
        embeds = dict(
            prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=npe
        )
        forward = dict(encoder_hidden_states=pe, pooled_projections=ppe)
    else:
        pe, pm, ne, nm = pipe.encode_prompt(
            prompt, True, negative_prompt="", clean_caption=False, max_sequence_length=max_len
        )
        embeds = dict(
            negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
            negative_prompt_attention_mask=nm, use_resolution_binning=False,
        )  # fmt: skip
        forward = dict(encoder_hidden_states=pe, encoder_attention_mask=pm)

    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tr(latents, timestep=torch.tensor([500.0]), **forward)
    forward_gflops = fc.get_total_flops() / 1e9  # one row; blocks dominate

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        best, out = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            took = time.perf_counter() - t0
            best = took if best is None else min(best, took)
        assert best is not None
        return out, best

    ref, t_ref = timed(
        lambda: (
            pipe(
                **embeds,
                latents=latents.clone(),
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="latent",
            ).images
        )
    )
    cfg_rows = 2 if guidance > 1 else 1
    rows: list[dict[str, Any]] = [
        dict(row="diffusers", seconds=round(t_ref, 2), speedup=1.0, gflops=_sig(forward_gflops * steps * cfg_rows),
             rel_l2=0.0)
    ]  # fmt: skip

    def run(schedule: Any, split: int, fd: Any = fd, **kw: Any) -> tuple[torch.Tensor, float, float, Any]:
        out = fd(
            prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
            output_type="latent", schedule=schedule, split=split, max_sequence_length=max_len, **kw,
        )  # fmt: skip
        s = out.stats
        denoise = s.seconds["encoder"] + s.seconds["decoder"] + s.seconds["scheduler"]
        evals = (s.encoder_rows * split + s.decoder_rows * (blocks - split)) / blocks  # full-forward equivalents
        return out.latents, denoise, evals / cfg_rows, s

    def add_row(
        name: str, schedule: Any, split: int, key_steps: list[int] | None = None, backend: str = "torch", **kw: Any
    ) -> None:
        """Times ``schedule`` at ``split`` on ``backend`` (best of ``repeats``) and appends its row."""
        best = None
        for _ in range(repeats):
            lat, sec, evals, stats = run(schedule, split, fd=others.get(backend, fd), **kw)
            best = sec if best is None else min(best, sec)
        assert best is not None
        row = dict(row=name if backend == "torch" else f"{name} ({backend})", backend=backend, split=split)
        if key_steps is not None:
            row["key_steps"] = key_steps
        row.update(
            seconds=round(best, 2),
            speedup=round(t_ref / best, 2),
            gflops=_sig(forward_gflops * evals * cfg_rows),
            rel_l2=round(_rel(lat, ref), 5),
            encoder_calls=stats.encoder_calls,
            decoder_calls=stats.decoder_calls,
        )
        rows.append(row)
        if log:
            log(row)

    warmup: dict[str, float] = {}
    for split in list(splits) if splits else [fd.split_point]:
        for backend, other in others.items():  # exports this split's graphs, untimed
            t0 = time.perf_counter()
            run("all", split, fd=other)
            warmup[f"{backend} N={split}"] = round(time.perf_counter() - t0, 1)
        cases: list[tuple[str, str, dict[str, Any]]] = [(f"fd {sc}", sc, {}) for sc in schedules]
        if block_caching:
            cases.append(("block-caching", "uniform:3", {"parallel": False, "noise_injection": False}))
        for name, sched, kw in cases:
            add_row(name, sched, split, **kw)
        for backend in others:
            for sc in schedules:
                add_row(f"fd {sc}", sc, split, backend=backend)
    calibration = None
    if calibrate:
        from fd_trt.tools.calibrate_dit import calibrate_transformer

        cal = calibrate_transformer(
            fd, [CALIBRATION_PROMPT], steps=steps, splits=splits, tolerance=calibration_tolerance,
            guidance_scale=guidance, seeds=[1], max_sequence_length=max_len,
        )  # fmt: skip
        calibration = dict(
            prompt=CALIBRATION_PROMPT, seed=1, seconds=round(cal.seconds, 1), split=cal.split,
            key_steps=cal.key_steps, error=round(cal.error, 5), tolerance=calibration_tolerance,
            history=cal.history,
        )  # fmt: skip
        if log:
            log(dict(calibration=calibration))
        add_row("fd calibrated", cal, int(cal.split), key_steps=list(cal.key_steps))
        for backend, other in others.items():
            if int(cal.split) not in (list(splits) if splits else [fd.split_point]):
                t0 = time.perf_counter()
                run("all", int(cal.split), fd=other)
                warmup[f"{backend} N={cal.split}"] = round(time.perf_counter() - t0, 1)
            add_row("fd calibrated", cal, int(cal.split), key_steps=list(cal.key_steps), backend=backend)
    return dict(
        calibration=calibration,
        steps=steps,
        guidance=guidance,
        blocks=blocks,
        latent_side=side,
        backend="torch fp32" + "".join(f", {b} fp32" for b in others),
        warmup_seconds=warmup,
        scheduler=type(pipe.scheduler).__name__,
        forward_gflops_per_row=_sig(forward_gflops),
        rows=rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-pixart", choices=MODELS)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the family's, 4.5 / 7.0)")
    p.add_argument(
        "--splits", default=None, help="comma-separated split points N for the fd rows (default: the family's)"
    )
    p.add_argument("--schedules", default="all,paper,uniform:3", help="comma-separated fd schedules")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--calibrate", action="store_true", help="add the 'fd calibrated' row (N and key steps searched)")
    p.add_argument("--max-error", type=float, default=0.05, help="the calibration's rel. L2 tolerance against 'all'")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--no-block-caching", action="store_true", help="leave out the block-caching row")
    p.add_argument(
        "--backends", default="torch", help="comma-separated: torch and the graph backends to repeat the fd rows on"
    )
    a = p.parse_args()

    torch.manual_seed(0)
    pipe, max_len = build(a.model, a.size)
    res = bench(
        pipe,
        steps=a.steps,
        guidance=a.guidance,
        splits=[int(x) for x in a.splits.split(",")] if a.splits else None,
        schedules=a.schedules.split(","),
        repeats=a.repeats,
        max_len=max_len,
        log=lambda row: print(json.dumps(row), flush=True),
        calibrate=a.calibrate,
        calibration_tolerance=a.max_error,
        block_caching=not a.no_block_caching,
        backends=[b.strip() for b in a.backends.split(",") if b.strip()],
    )
    doc = dict(model=a.model, size=a.size, cpu=_cpu(), threads=torch.get_num_threads(), **res)
    print(json.dumps(doc))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=4)


if __name__ == "__main__":
    main()
