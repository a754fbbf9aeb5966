"""``fd-trt generate``: one prompt to images, optionally timed against diffusers (``--compare``);
with a text-to-video model, to a GIF or MP4 clip (``--frames``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from fd_trt.cli.common import add_log_level, add_model_args, runner_options
from fd_trt.errors import InputError
from fd_trt.families.models import FLOW_SCHEDULERS, SCHEDULERS


def add_parser(sub: Any) -> None:
    """Adds ``generate`` to the sub-commands."""
    p = sub.add_parser("generate", help="generate an image with Faster Diffusion")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--negative-prompt", default=None, help="what the image should not show (classifier-free guidance)")
    add_model_args(p)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a local LoRA (diffusers or kohya safetensors), fused at SCALE (default 1); repeatable",
    )
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument(
        "--schedule",
        default=None,
        help="paper | all | uniform:N | power:K[:P] | deepcache:N | combined:KEYS|FULL|DEPTH[|fresh] | calibrated | "
        "FILE.json | comma-separated key steps "
        "(default: the model's saved calibration for this scheduler and step count, else paper)",
    )
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=[*SCHEDULERS, *FLOW_SCHEDULERS],
        help="the diffusers scheduler (flow-euler, flow-heun: flow-matching models such as SD3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--image",
        default=None,
        metavar="FILE",
        help="an input image: img2img (with --strength), inpainting (with --mask), or the ControlNet's "
        "conditioning image (with --controlnet)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img / inpainting: the fraction of the steps run from the noised image "
        "(default 0.8 for img2img, 1.0 for inpainting)",
    )
    p.add_argument("--mask", default=None, metavar="FILE", help="inpainting: the mask image (white = repaint)")
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="a local diffusers ControlNet folder, or 'default' (the default model's silhouette-mask "
        "ControlNet; make a mask with fd-trt mask); repeat for several (they share --image)",
    )
    p.add_argument(
        "--controlnet-scale",
        type=float,
        action="append",
        default=[],
        metavar="S",
        help="controlnet_conditioning_scale, one for all or one per --controlnet (default 1.0)",
    )
    p.add_argument("--no-noise-injection", action="store_true", help="switch prior noise injection off")
    p.add_argument("--sequential", action="store_true", help="decode one step per call instead of batching")
    p.add_argument("--max-decoder-rows", type=int, default=None, help="cap on rows per decoder call")
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="text-to-video models (TextToVideoSDPipeline, AnimateDiffPipeline): frames per video (default 16)",
    )
    p.add_argument(
        "--out",
        default="fd_trt_out.png",
        help="output image (PNG); several images get _i suffixes. A video model writes a .gif, or a .mp4 where "
        "imageio-ffmpeg is installed",
    )
    p.add_argument(
        "--json", default=None, help="also write the run's stats (and --compare's results) as JSON to this file"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run plain diffusers (the pipeline the model folder describes) and schedule 'all' on the same "
        "seed, alternating after a warm-up, and report times, speedups and relative L2",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="with --compare: timed runs per system, alternating; the run with the median total is reported",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_level(p)


def _fmt_stats(label: str, st: Any) -> str:
    s = st.seconds
    return (
        f"{label:>10}: {s['total']:7.3f} s total | text {s['text_encoder']:.3f}  encoder {s['encoder']:.3f}  "
        f"decoder {s['decoder']:.3f}  scheduler {s['scheduler']:.3f}  vae {s['vae']:.3f} | "
        f"encoder calls {st.encoder_calls}, decoder calls {st.decoder_calls}, decoder rows {st.decoder_rows}, "
        f"UNet {st.unet_gflops:.2f} GFLOP"
        + (
            f" | ControlNet {s.get('controlnet', 0.0):.3f} s, {st.controlnet_calls} calls"
            if getattr(st, "controlnet_calls", 0)
            else ""
        )
    )


def _median_run(outputs: list[Any]) -> Any:
    """The output whose total time is the median (the lower middle one for an even count)."""
    from fd_trt.tools.compare import median_index

    return outputs[median_index([o.stats.seconds["total"] for o in outputs])]


def _is_video(pipe: Any) -> bool:
    from fd_trt.pipelines.video import FasterDiffusionVideoPipeline

    return isinstance(pipe, FasterDiffusionVideoPipeline)


#: The clip formats ``fd-trt generate`` writes for a video model.
VIDEO_SUFFIXES = (".gif", ".mp4")


def _run_video(args: argparse.Namespace, pipe: Any) -> int:
    """``generate`` with a text-to-video model: one clip per video, as GIF (PIL) or MP4 (imageio-ffmpeg).

    Raises:
        InputError: for ``--frames`` with an image model, options a video run does not take, or an
            output that is no .gif or .mp4 (.mp4 without imageio-ffmpeg).
    """
    import importlib.util

    import torch

    if not _is_video(pipe):
        raise InputError(
            f"--frames is for text-to-video models (TextToVideoSDPipeline, AnimateDiffPipeline); {pipe.source} is a "
            f"{pipe.family.name!r} model: drop --frames"
        )
    given = [
        flag
        for flag, value in (
            ("--compare", args.compare),
            ("--image", getattr(args, "image", None)),
            ("--mask", getattr(args, "mask", None)),
            ("--strength", getattr(args, "strength", None)),
            ("--controlnet", getattr(args, "controlnet", None)),
        )
        if value
    ]
    if given:
        raise InputError(f"a text-to-video model takes no {', '.join(given)}: drop them")
    frames = 16 if args.frames is None else args.frames
    out_path = Path(args.out)
    suffix = out_path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputError(f"--out {args.out!r}: a text-to-video model writes a clip; name a .gif or .mp4 file")
    if suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise InputError(
            f"--out {args.out!r}: writing MP4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); "
            "or name a .gif file"
        )
    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_videos_per_prompt=args.num_images,
        generator=torch.Generator(pipe.device).manual_seed(args.seed),
        output_type="pil",
        schedule=args.schedule,
        noise_injection=False if args.no_noise_injection else None,
        parallel=not args.sequential,
        max_decoder_rows=args.max_decoder_rows,
    )
    print(f"key steps: {','.join(map(str, out.stats.key_steps))}")
    print(_fmt_stats(args.schedule or "default", out.stats) + f" | {frames} frames per video")
    from diffusers.utils import export_to_gif, export_to_video

    out_path.parent.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(out.frames):
        path = out_path if len(out.frames) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}")
        if suffix == ".gif":
            export_to_gif(clip, str(path))
        else:
            export_to_video(clip, str(path))
        print(f"wrote {path}")
    if args.json:
        report = {"schedule": args.schedule, "frames": frames, "stats": out.stats.as_dict()}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _paper_keys(num_steps: int) -> list[int]:
    from fd_trt.core.schedule import PAPER_KEY_STEPS

    return [k for k in PAPER_KEY_STEPS if k < num_steps]


def _apply_loras(pipe: Any, specs: list[str]) -> None:
    """Loads each ``PATH[:SCALE]`` LoRA as its own adapter and fuses them at their scales."""
    if not specs:
        return
    names, scales = [], []
    for i, spec in enumerate(specs):
        path, _, scale_text = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            raise InputError(
                f"--lora {spec!r}: {scale_text!r} is not a number; write PATH or PATH:SCALE, e.g. style.safetensors:0.8"
            ) from None
        if not os.path.exists(path):
            raise InputError(f"--lora {spec!r}: {path} does not exist; give a local LoRA .safetensors file or folder")
        name = f"lora{i}"
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
        scales.append(scale)
        print(f"lora: {path} at scale {scale}")
    pipe.set_adapters(names, scales)
    pipe.fuse_lora(lora_scale=1.0)


def _image_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's image arguments from ``--image``, ``--mask``, ``--strength``, ``--controlnet-scale``."""
    import PIL.Image

    def load(path: str, what: str) -> Any:
        if not Path(path).is_file():
            raise InputError(f"{what} {path!r} is not a file: pass the path of an image (PNG, JPEG)")
        return PIL.Image.open(path).convert("RGB")

    kwargs: dict[str, Any] = {}
    if args.image is None:
        if args.mask or args.strength is not None or args.controlnet:
            raise InputError(
                "--mask, --strength and --controlnet need --image FILE: the input image "
                "(or, with --controlnet, its conditioning image)"
            )
        return kwargs
    kwargs["image"] = load(args.image, "--image")
    if args.mask:
        kwargs["mask_image"] = load(args.mask, "--mask")
    if args.strength is not None:
        kwargs["strength"] = args.strength
    if args.controlnet_scale:
        scales = args.controlnet_scale
        kwargs["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    return kwargs


def _auto_decision(pipe: Any) -> Any:
    """The decision ``backend="auto"`` made for the latest call, or ``None`` for another backend."""
    return getattr(pipe.runner, "last_decision", None) if pipe.backend == "auto" else None


def _print_auto(pipe: Any, out: Any, first: bool) -> Any:
    """Says what ``auto`` chose and why (the predicted times it measured); returns the decision."""
    d = _auto_decision(pipe)
    if d is None:
        return None
    print(d.summary())
    if first and not d.cached:
        print(
            f"(the first call at this shape and schedule paid {d.tuning_s:.2f} s for tuning; later runs read "
            "the decision from the cache)"
        )
    return d


#: The bf16 suggestion runs only when one fp32 run is at most this long (it costs two more runs).
BF16_HINT_MAX_S = 3.0


def bf16_hint_text(units: str, bf16_s: float, fp32_s: float, rel: float, fp32_backend: str) -> str:
    """The hint line: a suggestion only where bf16 was faster than the fp32 run it was timed next to."""
    where = fp32_backend if "/" in fp32_backend else f"{fp32_backend}/fp32"  # auto's label names its precision
    head = (
        f"hint: this CPU has {units}: torch bf16 ran this in {bf16_s:.3f} s against {fp32_s:.3f} s on "
        f"{where} ({fp32_s / bf16_s:.2f}x), relative L2 of the final latents vs fp32 {rel:.1e}; "
    )
    if bf16_s < fp32_s:
        return head + "--precision auto lets backend auto choose it"
    return head + "not faster here, so fp32 stays (--precision auto would measure it and keep fp32)"


def _bf16_hint(args: argparse.Namespace, pipe: Any, out: Any, sample: Any, noise: Any) -> dict[str, Any] | None:
    """On a CPU with bf16 matrix units, measures torch bf16 once and suggests ``--precision auto``.

    Only when no precision was asked, on a CPU, and when it is cheap (a run of at most
    :data:`BF16_HINT_MAX_S`); bf16 changes the numbers, so it is a suggestion, never the default.
    """
    from fd_trt.utils.system import cpu_flags, has_fast_bf16

    if args.precision is not None or pipe.device.type != "cpu" or not has_fast_bf16():
        return None
    if out.stats.seconds["total"] > BF16_HINT_MAX_S or args.backend not in (None, "auto", "torch"):
        return None
    import torch

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.compare import rel_l2

    bf = FasterDiffusionPipeline.from_diffusers(pipe.sd, backend="torch", precision="bf16", progress=False)
    bf.model_dir = pipe.model_dir
    kw = dict(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        output_type="latent",
        schedule=args.schedule,
        noise_injection=noise,
        parallel=not args.sequential,
        max_decoder_rows=args.max_decoder_rows,
    )
    bf(args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw)  # warm-up
    o = bf(args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw)
    ref = sample(args.schedule, noise, output_type="latent")  # fp32 timed next to it
    speed = ref.stats.seconds["total"] / o.stats.seconds["total"]
    rel = rel_l2(o.latents, ref.latents)
    units = "AMX-BF16" if "amx_bf16" in cpu_flags() else "AVX512-BF16"
    print(bf16_hint_text(units, o.stats.seconds["total"], ref.stats.seconds["total"], rel, ref.stats.backend))
    bf.close()
    return {"bf16_s": o.stats.seconds["total"], "fp32_s": ref.stats.seconds["total"], "speedup": speed, "rel_l2": rel}


def run(args: argparse.Namespace) -> int:
    """Generates the images (and, with ``--compare``, the timings); returns the exit status."""
    import torch

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    if args.repeat < 1:
        raise InputError(
            f"--repeat must be a positive integer, got {args.repeat}: pass --repeat 1 for a single timed run"
        )
    t0 = time.perf_counter()
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        scheduler=args.scheduler,
        progress=not args.quiet,
        engines=args.engines,
        runner_options=runner_options(args),
        **({"controlnet": args.controlnet} if args.controlnet else {}),
    )
    print(f"model: {pipe.source}")
    _apply_loras(pipe, args.lora)
    print(
        f"backend: {pipe.backend} on {pipe.device} ({pipe.precision}), scheduler {args.scheduler}, load {time.perf_counter() - t0:.2f} s"
    )

    if args.frames is not None or _is_video(pipe):
        return _run_video(args, pipe)
    image_kwargs = _image_kwargs(args)

    def sample(schedule: str, noise: bool | None, output_type: str = "pil") -> Any:
        return pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            generator=torch.Generator(pipe.device).manual_seed(args.seed),
            output_type=output_type,
            schedule=schedule,
            noise_injection=noise,
            parallel=not args.sequential,
            max_decoder_rows=args.max_decoder_rows,
            **image_kwargs,
        )

    noise = False if args.no_noise_injection else None
    if args.compare:
        from fd_trt.tools.compare import median_index, rel_l2, run_diffusers

        if image_kwargs:
            raise InputError(
                "--compare measures text-to-image runs against diffusers' StableDiffusionPipeline; drop --image, "
                "--mask, --strength and --controlnet, or run without --compare"
            )

        if args.quiet:
            pipe.sd.set_progress_bar_config(disable=True)
        diffusers_kw = dict(
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            seed=args.seed,
            device=pipe.device,
        )
        # One untimed run of the timed schedule pays the one-off costs (allocation, FLOP counting,
        # backend="auto"'s tuning, and ONNX Runtime's first call at each decoder row count, which a
        # 2-step run would not reach: on the default model it made the first 'paper' run 1.15 s
        # against 0.32 s warm). diffusers gets its warm-up run too.
        if not args.quiet:
            print("warm-up: one untimed run of each system")
        warm = sample(args.schedule, noise, output_type="latent")
        decision = _print_auto(pipe, warm, first=True)
        sample("all", False, output_type="latent")
        run_diffusers(pipe.sd, args.prompt, **diffusers_kw)
        # Alternating runs, so that a slow spell of a shared machine hits every system alike. Every
        # run of one system has the same seed and so the same result; only the timings differ.
        runs: list[Any] = []
        refs: list[Any] = []
        plain: list[Any] = []
        for _ in range(args.repeat):
            runs.append(sample(args.schedule, noise, output_type="np"))
            refs.append(sample("all", False, output_type="np"))
            plain.append(run_diffusers(pipe.sd, args.prompt, **diffusers_kw))
        out, ref = _median_run(runs), _median_run(refs)
        dref = plain[median_index([d.seconds for d in plain])]
        out_np = out.images
        out.images = pipe.sd.image_processor.numpy_to_pil(out_np)
    else:
        out = sample(args.schedule, noise)
        decision = _print_auto(pipe, out, first=True)
    label = args.schedule or ("calibrated" if out.stats.key_steps != _paper_keys(out.stats.num_steps) else "paper")
    print(f"key steps: {','.join(map(str, out.stats.key_steps))}")
    print(_fmt_stats(label, out.stats))
    report: dict[str, Any] = {"schedule": args.schedule or label, "stats": out.stats.as_dict()}
    if decision is not None:  # the decision of the asked schedule's run (--compare's 'all' has its own)
        report["auto"] = decision.as_dict()
    if args.compare:
        print(_fmt_stats("all", ref.stats))
        print(
            f"{'diffusers':>10}: {dref.seconds:7.3f} s total | {type(pipe.sd).__name__}, same seed, scheduler and steps"
        )
        if args.repeat > 1:

            def totals(values: list[float]) -> str:
                return ", ".join(f"{v:.3f}" for v in values)

            print(
                f"(median of {args.repeat} alternating runs each; totals {label}: "
                f"{totals([o.stats.seconds['total'] for o in runs])} s, all: "
                f"{totals([o.stats.seconds['total'] for o in refs])} s, diffusers: {totals([d.seconds for d in plain])} s)"
            )
        rel = rel_l2(out.latents, ref.latents)
        speed = ref.stats.seconds["total"] / out.stats.seconds["total"]
        unet_speed = (ref.stats.seconds["encoder"] + ref.stats.seconds["decoder"]) / max(
            1e-12, out.stats.seconds["encoder"] + out.stats.seconds["decoder"]
        )
        flop_cut = 1 - out.stats.unet_gflops / ref.stats.unet_gflops
        vs_diffusers = dref.seconds / out.stats.seconds["total"]
        img_rel = rel_l2(out_np, dref.images)
        all_img_rel = rel_l2(ref.images, dref.images)
        all_lat_rel = rel_l2(ref.latents, dref.latents)
        print(
            f"speedup vs diffusers: {vs_diffusers:.2f}x ({out.stats.seconds['total']:.3f} s against "
            f"{dref.seconds:.3f} s); relative L2 of the images vs diffusers: {img_rel:.4e} "
            f"('all' vs diffusers: {all_img_rel:.2e} images, {all_lat_rel:.2e} latents)"
        )
        print(
            f"speedup {speed:.2f}x total, {unet_speed:.2f}x UNet vs 'all' on {ref.stats.backend}; UNet FLOPs "
            f"-{100 * flop_cut:.1f}%; relative L2 of final latents vs 'all': {rel:.4e}"
        )
        report["compare"] = {
            "all_stats": ref.stats.as_dict(),
            "speedup_total": speed,
            "speedup_unet": unet_speed,
            "unet_flops_reduction": flop_cut,
            "rel_l2_latents_vs_all": rel,
            "repeat": args.repeat,
            "totals_s": [r.stats.seconds["total"] for r in runs],
            "all_totals_s": [r.stats.seconds["total"] for r in refs],
            "diffusers": {
                "pipeline": type(pipe.sd).__name__,
                "seconds": dref.seconds,
                "totals_s": [d.seconds for d in plain],
                "speedup": vs_diffusers,
                "rel_l2_images": img_rel,
                "rel_l2_latents": rel_l2(out.latents, dref.latents),
                "all_rel_l2_images": all_img_rel,
                "all_rel_l2_latents": all_lat_rel,
            },
        }
    hint = _bf16_hint(args, pipe, out, sample, noise)
    if hint is not None:
        report["bf16_hint"] = hint
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
