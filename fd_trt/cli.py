"""Command line: ``fd-trt generate``. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import FdTrtError
from .models import SCHEDULERS


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate an image with Faster Diffusion")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default="default", help="'default' or a local diffusers folder")
    p.add_argument("--backend", default="torch", choices=["torch"], help="runner backend")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument("--schedule", default="paper", help="paper | all | uniform:N | comma-separated key steps")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--no-noise-injection", action="store_true", help="switch prior noise injection off")
    p.add_argument("--sequential", action="store_true", help="decode one step per call instead of batching")
    p.add_argument("--max-decoder-rows", type=int, default=None, help="cap on rows per decoder call")
    p.add_argument("--out", default="fd_trt_out.png", help="output image (PNG); several images get _i suffixes")
    p.add_argument("--json", default=None, help="write stats as JSON here")
    p.add_argument("--compare", action="store_true", help="also run schedule 'all' and report speedup and error")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark diffusers, fd_trt and DeepCache side by side")
    p.add_argument("--model", default="sd15-arch", help="default | tiny | sd15-arch | a local diffusers folder")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--backends", default="torch", help="comma-separated: torch,onnxruntime,tensorrt")
    p.add_argument("--schedules", default="all,paper", help="comma-separated fd_trt schedules (';' separates lists)")
    p.add_argument("--precisions", default="fp32", help="torch runner precisions, e.g. fp32,bf16")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per system (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system first")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--no-deepcache", action="store_true", help="skip the DeepCache row")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, help="PNG bar chart")
    p.add_argument("--quiet", action="store_true")


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_benchmark, to_markdown, write_outputs

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    cfg = BenchConfig(
        model=args.model,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        backends=split(args.backends),
        schedules=tuple(x.strip() for x in args.schedules.split(";" if ";" in args.schedules else ",") if x.strip()),
        precisions=split(args.precisions),
        repeat=args.repeat,
        warmup=args.warmup,
        deepcache=not args.no_deepcache,
        threads=args.threads,
    )
    report = run_benchmark(cfg, progress=not args.quiet)
    write_outputs(report, args.json, args.markdown, args.plot)
    print(to_markdown(report))
    for path in (args.json, args.markdown, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def _fmt_stats(label: str, st: Any) -> str:
    s = st.seconds
    return (
        f"{label:>10}: {s['total']:7.3f} s total | text {s['text_encoder']:.3f}  encoder {s['encoder']:.3f}  "
        f"decoder {s['decoder']:.3f}  scheduler {s['scheduler']:.3f}  vae {s['vae']:.3f} | "
        f"encoder calls {st.encoder_calls}, decoder calls {st.decoder_calls}, decoder rows {st.decoder_rows}, "
        f"UNet {st.unet_gflops:.2f} GFLOP"
    )


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import FasterDiffusionPipeline

    t0 = time.perf_counter()
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        scheduler=args.scheduler,
        progress=not args.quiet,
    )
    print(f"model: {pipe.source}")
    print(f"backend: {pipe.runner.name} on {pipe.device} ({args.precision}), scheduler {args.scheduler}, load {time.perf_counter() - t0:.2f} s")

    def run(schedule: str, noise: bool | None) -> Any:
        return pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            generator=torch.Generator(pipe.device).manual_seed(args.seed),
            output_type="pil",
            schedule=schedule,
            noise_injection=noise,
            parallel=not args.sequential,
            max_decoder_rows=args.max_decoder_rows,
        )

    noise = False if args.no_noise_injection else None
    if args.compare:
        # One short untimed call per schedule pays one-off costs (allocation, FLOP counting).
        pipe(args.prompt, num_inference_steps=2, height=args.height, width=args.width, output_type="latent", schedule="all")
    out = run(args.schedule, noise)
    print(_fmt_stats(args.schedule, out.stats))
    report: dict[str, Any] = {"schedule": args.schedule, "stats": out.stats.as_dict()}
    if args.compare:
        ref = run("all", False)
        print(_fmt_stats("all", ref.stats))
        a, b = out.latents, ref.latents
        rel = float((a - b).norm() / b.norm())
        speed = ref.stats.seconds["total"] / out.stats.seconds["total"]
        unet_speed = (ref.stats.seconds["encoder"] + ref.stats.seconds["decoder"]) / max(
            1e-12, out.stats.seconds["encoder"] + out.stats.seconds["decoder"]
        )
        flop_cut = 1 - out.stats.unet_gflops / ref.stats.unet_gflops
        print(
            f"speedup {speed:.2f}x total, {unet_speed:.2f}x UNet; UNet FLOPs -{100 * flop_cut:.1f}%; "
            f"relative L2 of final latents vs 'all': {rel:.4e}"
        )
        report["compare"] = {
            "all_stats": ref.stats.as_dict(),
            "speedup_total": speed,
            "speedup_unet": unet_speed,
            "unet_flops_reduction": flop_cut,
            "rel_l2_latents_vs_all": rel,
        }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(out.images):
        path = out_path if len(out.images) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}")
        img.save(path)
        print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fd-trt``."""
    parser = argparse.ArgumentParser(prog="fd-trt", description="Faster Diffusion on compiled graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
    except FdTrtError as e:
        print(f"fd-trt: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
