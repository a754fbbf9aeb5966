"""Command line: ``fd-trt generate``. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fd_trt.errors import FdTrtError, InputError
from fd_trt.families.models import SCHEDULERS
from fd_trt.serving.runtime import DEFAULT_DECODER_MEMORY_MB


def _add_model_args(p: Any) -> None:
    """Model and runner options shared by ``generate`` and ``serve``."""
    p.add_argument("--model", default="default", help="'default' or a local diffusers folder")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="runner backend (default: auto, which measures the available ones and keeps the fastest)")
    p.add_argument("--engines", default=None, help="a built engine directory (fd-trt build) for graph backends")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the runner")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="runner precision (default: fp16 for tensorrt, fp32 otherwise; auto lets --backend auto "
                        "consider bf16, which changes the numbers)")


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate an image with Faster Diffusion")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--negative-prompt", default=None)
    _add_model_args(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a local LoRA (diffusers or kohya safetensors), fused at SCALE (default 1); repeatable")
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument("--schedule", default=None,
                   help="paper | all | uniform:N | calibrated | FILE.json | comma-separated key steps "
                        "(default: the model's saved calibration for this scheduler and step count, else paper)")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="an input image: img2img (with --strength), inpainting (with --mask), or the ControlNet's "
                        "conditioning image (with --controlnet)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting: the fraction of the steps run from the noised image "
                        "(default 0.8 for img2img, 1.0 for inpainting)")
    p.add_argument("--mask", default=None, metavar="FILE", help="inpainting: the mask image (white = repaint)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a local diffusers ControlNet folder, or 'default' (the default model's silhouette-mask "
                        "ControlNet; make a mask with fd-trt mask); repeat for several (they share --image)")
    p.add_argument("--controlnet-scale", type=float, action="append", default=[], metavar="S",
                   help="controlnet_conditioning_scale, one for all or one per --controlnet (default 1.0)")
    p.add_argument("--no-noise-injection", action="store_true", help="switch prior noise injection off")
    p.add_argument("--sequential", action="store_true", help="decode one step per call instead of batching")
    p.add_argument("--max-decoder-rows", type=int, default=None, help="cap on rows per decoder call")
    p.add_argument("--out", default="fd_trt_out.png", help="output image (PNG); several images get _i suffixes")
    p.add_argument("--json", default=None, help="write stats as JSON here")
    p.add_argument("--compare", action="store_true",
                   help="also run plain diffusers (the pipeline the model folder describes) and schedule 'all' on the same "
                        "seed, alternating after a warm-up, and report times, speedups and relative L2")
    p.add_argument("--repeat", type=int, default=3,
                   help="with --compare: timed runs per system, alternating; the run with the median total is reported")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark diffusers, fd_trt and DeepCache side by side")
    p.add_argument("--model", default="sd15-arch", help="default | tiny | tiny-sdxl | sd15-arch | sdxl-arch | a local diffusers folder")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--backends", default="auto,torch",
                   help="comma-separated: auto,torch,onnxruntime,tensorrt (auto runs last, so that it can measure "
                        "the graphs the others built)")
    p.add_argument("--schedules", default="all,paper", help="comma-separated fd_trt schedules (';' separates lists)")
    p.add_argument("--precisions", default="fp32", help="torch runner precisions, e.g. fp32,bf16")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per system (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system first")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--no-deepcache", action="store_true", help="skip the DeepCache row")
    p.add_argument("--controlnet", action="store_true",
                   help="also run every row with a random ControlNet made from the model's UNet (ControlNetModel.from_unet) "
                        "and a random control image, against diffusers' StableDiffusionControlNetPipeline")
    p.add_argument("--authors-style", action=argparse.BooleanOptionalAction, default=True,
                   help="the peer baseline row: Faster Diffusion ('paper') run the authors' way on diffusers modules "
                        "(fd_trt/authors_style.py); on by default")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, help="PNG bar chart")
    p.add_argument("--quiet", action="store_true")


def _bench(args: argparse.Namespace) -> int:
    from fd_trt.tools.bench import BenchConfig, run_benchmark, to_markdown, write_outputs

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
        authors_style=args.authors_style,
        threads=args.threads,
        controlnet=args.controlnet,
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
        + (f" | ControlNet {s.get('controlnet', 0.0):.3f} s, {st.controlnet_calls} calls"
           if getattr(st, "controlnet_calls", 0) else "")
    )


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is None:
        return {}
    backend = args.backend or "auto"
    if backend == "onnxruntime":
        return {"intra_op_threads": args.threads}
    import torch

    torch.set_num_threads(args.threads)
    # auto passes each runner the options it takes (fd_trt.pipelines.runner_pool.RunnerPool.options_for).
    return {"intra_op_threads": args.threads} if backend == "auto" else {}


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (POST /v1/generate, GET /healthz, GET /metrics)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most requests per sampler call (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for company")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--timeout", type=float, default=120.0, help="default per-request deadline in seconds")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--max-size", type=int, default=1024, help="largest height or width")
    p.add_argument("--max-prompt-chars", type=int, default=1000)
    p.add_argument("--sizes", default=None,
                   help="image sizes served, HxW comma-separated (e.g. 64x64,128x128); graph backends build or load "
                        "them at start-up and refuse other sizes (default: the model's size; torch: any size)")
    p.add_argument("--decoder-memory-mb", type=float, default=DEFAULT_DECODER_MEMORY_MB,
                   help="memory budget of one decoder call; caps rows per call and images per batch (0: no cap)")
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (413 beyond)")
    p.add_argument("--log-level", default="info")


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fd_trt.serving.http import create_app
    except ImportError as e:
        raise FdTrtError(f"fd-trt serve needs the [serve] extra ({e.name} is missing): pip install 'fd_trt[serve]'") from e
    from fd_trt.serving.runtime import Limits, ServingRuntime, parse_sizes

    import signal
    import threading

    options = _runner_options(args)
    limits = Limits(max_steps=args.max_steps, max_size=args.max_size, max_prompt_chars=args.max_prompt_chars)
    # The runtime's worker runs on this (main) thread: PyTorch's OpenMP regions cost much more when a
    # non-main thread starts them (see ServingRuntime's `start`). uvicorn runs in a thread instead,
    # so this function handles SIGINT/SIGTERM itself.
    rt = ServingRuntime.from_pretrained(
        args.model, backend=args.backend, device=args.device, precision=args.precision, engines=args.engines,
        runner_options=options, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        default_timeout_s=args.timeout, limits=limits, start=False,
        sizes=parse_sizes(args.sizes) if args.sizes else None,
        decoder_memory_mb=args.decoder_memory_mb if args.decoder_memory_mb > 0 else None,
    )
    app = create_app(runtime=rt, max_body_bytes=args.max_body_kb * 1024)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    http = threading.Thread(target=server.run, name="fd_trt-http", daemon=True)

    def stop(signum: int, frame: Any) -> None:
        # Graceful: uvicorn stops accepting and waits for open requests (the worker keeps serving
        # them), then its lifespan shutdown drains the runtime, which ends rt.run() below.
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def supervise() -> None:
        http.join()
        rt.shutdown(drain=True)  # also when uvicorn failed to start (e.g. the port is taken)

    http.start()
    threading.Thread(target=supervise, name="fd_trt-supervisor", daemon=True).start()
    print(f"fd-trt serve: {rt.pipeline.source} on {rt.pipeline.backend}/{rt.pipeline.device}, "
          f"max batch {rt.max_batch}, sizes {', '.join(f'{h}x{w}' for h, w in rt.sizes) if rt.sizes else 'any'}, "
          f"http://{args.host}:{args.port}", flush=True)
    rt.run()
    http.join(30)
    return 0 if server.started else 1


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="export the encoder/decoder graphs (and engines) into an engine directory")
    p.add_argument("--model", default="default", help="'default' or a local diffusers folder")
    p.add_argument("--out", default=None, help="engine directory (default: engines/<model name>-<H>x<W>-<precision>)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--precision", default=None, choices=["fp32", "fp16"],
                   help="graph precision (default: fp32 for onnxruntime, fp16 for tensorrt)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="images per call (sets the row ranges)")
    p.add_argument("--max-segment-steps", type=int, default=15, help="longest segment decoded in one call")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tune", action="store_true",
                   help="also measure every backend='auto' candidate (building the graphs it lacks) for --schedule, "
                        "--steps and --batch, and cache the decision that fd-trt generate then reuses")
    p.add_argument("--threads", type=int, default=None, help="with --tune: intra-op threads, as fd-trt generate --threads")
    trt = p.add_argument_group("TensorRT plans (--backend tensorrt)")
    trt.add_argument("--schedule", default=None,
                     help="schedule whose segments choose the decoder profile's opt rows (default: paper), and that "
                          "--tune tunes for (default: the one fd-trt generate would use)")
    trt.add_argument("--steps", type=int, default=50, help="step count the --schedule is read for (default: 50)")
    trt.add_argument("--opt-segment-steps", type=int, default=None,
                     help="tune the decoder for segments of this many steps (default: from --schedule)")
    trt.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                     help="TensorRT builder optimization level (default: 3, TensorRT's own)")
    trt.add_argument("--workspace-gb", type=float, default=None,
                     help="builder workspace limit in GiB (default: TensorRT's, the GPU's memory)")
    trt.add_argument("--no-timing-cache", action="store_true", help="neither read nor update the timing cache")
    trt.add_argument("--device", default="cuda", help="CUDA device to build the plans for (default: cuda)")


def _build(args: argparse.Namespace) -> int:
    from fd_trt.graphs.engines import build_engines
    from fd_trt.families.models import load_diffusers_pipeline

    t0 = time.perf_counter()
    if args.tune and not args.out:
        # auto looks for graphs in the engine cache: build them there, once.
        return _tune(args)
    if args.backend == "tensorrt":
        from fd_trt.core.schedule import parse_schedule

        args.schedule = args.schedule or "paper"

        if args.schedule.strip().lower().endswith(".json"):  # a calibration: its key steps set the profiles
            from fd_trt.core.calibration import Calibration

            cal = Calibration.load(args.schedule)
            if cal.steps != args.steps:
                raise InputError(f"--schedule {args.schedule} was calibrated for {cal.steps} steps, but --steps is "
                                 f"{args.steps}: pass --steps {cal.steps}")
            args.schedule = ",".join(map(str, cal.key_steps))
        parse_schedule(args.schedule, args.steps)  # a bad --schedule fails now, not after the export
    sd, source = load_diffusers_pipeline(args.model)
    f = int(sd.vae_scale_factor)
    height = args.height or int(sd.unet.config.sample_size) * f
    width = args.width or int(sd.unet.config.sample_size) * f
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % f:
            raise InputError(f"--{name} {v} is not a positive multiple of the VAE factor {f}")
    precision = args.precision or ("fp16" if args.backend == "tensorrt" else "fp32")
    name = Path(str(args.model).rstrip("/")).name or "model"
    out = Path(args.out) if args.out else Path("engines") / f"{name}-{height}x{width}-{precision}"
    from fd_trt.families.sdxl import is_sdxl, sdxl_added_shapes, sdxl_text_shape

    added_shapes = None
    if is_sdxl(sd):  # the pooled width and time-id count (6 base, 5 refiner) come from the model
        text_shape, added_shapes = sdxl_text_shape(sd), sdxl_added_shapes(sd)
    else:
        text_shape = (int(sd.tokenizer.model_max_length), int(sd.unet.config.cross_attention_dim))
    print(f"model: {source} (loaded in {time.perf_counter() - t0:.1f} s)")
    res = build_engines(
        sd.unet,
        out,
        latent_size=(height // f, width // f),
        text_shape=text_shape,
        precision=precision,
        batch=args.batch,
        max_segment_steps=args.max_segment_steps,
        model_source=str(args.model),
        force=args.force,
        progress=not args.quiet,
        added_shapes=added_shapes,
    )
    m = res.manifest
    state = "built" if res.built else "up to date, nothing rebuilt"
    print(f"{out}: {state} ({res.reason}) in {res.seconds:.1f} s")
    for role, rec in sorted(m.graphs.items(), key=lambda kv: kv[0] != "encoder"):
        extra = f" + {rec.data_file} {rec.data_bytes / 1e6:.1f} MB" if getattr(rec, "data_file", None) else ""
        print(f"  {role}: {rec.file} {rec.bytes / 1e6:.1f} MB{extra}, sha256 {rec.sha256[:12]}")
    print(f"  {precision} graphs, opset {m.opset}, latents {m.latent_shape}, text {m.text_shape}, "
          f"decoder rows {m.decoder_rows[0]}..{m.decoder_rows[1]}")
    if args.backend == "tensorrt":
        _build_plans(args, out)
    if args.tune:
        return _tune(args, engines=out)
    return 0


def _tune(args: argparse.Namespace, engines: Path | None = None) -> int:
    """``fd-trt build --tune``: measures every ``auto`` candidate ahead of time and caches the decision."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.core.schedule import parse_schedule

    opts = {}
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        opts = {"intra_op_threads": args.threads}
    pipe = FasterDiffusionPipeline.from_pretrained(args.model, backend="auto", progress=not args.quiet, engines=engines,
                                                   runner_options=opts)
    pipe.auto_build_graphs = True  # ahead of time: building is what the user asked for
    runner = pipe.prepare(args.height, args.width)
    runner.read_cache = False  # measure afresh; the new decision replaces a cached one
    steps = args.steps
    schedule = parse_schedule(pipe.resolve_schedule(args.schedule, steps), steps)
    for b in range(1, args.batch + 1):
        d = runner.plan(schedule, rows=2 * b)
        print(f"batch {b}, key steps {','.join(map(str, schedule.key_steps))}: {d.summary()}")
    from fd_trt.backends.auto import tuning_cache_dir

    print(f"tuning decisions cached in {tuning_cache_dir()}")
    return 0


def _build_plans(args: argparse.Namespace, out: Path) -> None:
    from fd_trt.backends.tensorrt import build_plans, runtime_problem

    problem = runtime_problem(args.device)
    if problem is not None:
        print(f"  TensorRT plans: not built: {problem}")
        return
    workspace = None if args.workspace_gb is None else int(args.workspace_gb * (1 << 30))
    results = build_plans(
        out,
        device=args.device,
        schedule=args.schedule,
        num_steps=args.steps,
        opt_segment_steps=args.opt_segment_steps,
        builder_optimization_level=args.opt_level,
        workspace_bytes=workspace,
        timing_cache=not args.no_timing_cache,
        force=args.force,
    )
    for res in results:
        rec = res.record
        state = f"built in {res.seconds:.1f} s" if res.built else "up to date"
        print(f"  {rec.role} plan: {rec.file} {rec.bytes / 1e6:.1f} MB, TensorRT {rec.tensorrt_version}, {rec.gpu_name} "
              f"(compute {'.'.join(map(str, rec.compute_capability))}), rows {rec.rows[0]}/{rec.rows[1]}/{rec.rows[2]} "
              f"(min/opt/max), {state}")


def _median_run(outputs: list[Any]) -> Any:
    """The output whose total time is the median (the lower middle one for an even count)."""
    from fd_trt.tools.compare import median_index

    return outputs[median_index([o.stats.seconds["total"] for o in outputs])]


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
            raise InputError(f"--lora {spec!r}: {scale_text!r} is not a number; write PATH or PATH:SCALE, e.g. style.safetensors:0.8") from None
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
            raise InputError("--mask, --strength and --controlnet need --image FILE: the input image "
                             "(or, with --controlnet, its conditioning image)")
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
        print(f"(the first call at this shape and schedule paid {d.tuning_s:.2f} s for tuning; later runs read "
              "the decision from the cache)")
    return d


#: The bf16 suggestion runs only when one fp32 run is at most this long (it costs two more runs).
BF16_HINT_MAX_S = 3.0


def bf16_hint_text(units: str, bf16_s: float, fp32_s: float, rel: float, fp32_backend: str) -> str:
    """The hint line: a suggestion only where bf16 was faster than the fp32 run it was timed next to."""
    where = fp32_backend if "/" in fp32_backend else f"{fp32_backend}/fp32"  # auto's label names its precision
    head = (f"hint: this CPU has {units}: torch bf16 ran this in {bf16_s:.3f} s against {fp32_s:.3f} s on "
            f"{where} ({fp32_s / bf16_s:.2f}x), relative L2 of the final latents vs fp32 {rel:.1e}; ")
    if bf16_s < fp32_s:
        return head + "--precision auto lets backend auto choose it"
    return head + "not faster here, so fp32 stays (--precision auto would measure it and keep fp32)"


def _bf16_hint(args: argparse.Namespace, pipe: Any, out: Any, run: Any, noise: Any) -> dict[str, Any] | None:
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

    from fd_trt.tools.compare import rel_l2
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    bf = FasterDiffusionPipeline.from_diffusers(pipe.sd, backend="torch", precision="bf16", progress=False)
    bf.model_dir = pipe.model_dir
    kw = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
              num_images_per_prompt=args.num_images, output_type="latent", schedule=args.schedule,
              noise_injection=noise, parallel=not args.sequential, max_decoder_rows=args.max_decoder_rows)
    bf(args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw)  # warm-up
    o = bf(args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kw)
    ref = run(args.schedule, noise, output_type="latent")  # fp32 timed next to it
    speed = ref.stats.seconds["total"] / o.stats.seconds["total"]
    rel = rel_l2(o.latents, ref.latents)
    units = "AMX-BF16" if "amx_bf16" in cpu_flags() else "AVX512-BF16"
    print(bf16_hint_text(units, o.stats.seconds["total"], ref.stats.seconds["total"], rel, ref.stats.backend))
    bf.close()
    return {"bf16_s": o.stats.seconds["total"], "fp32_s": ref.stats.seconds["total"], "speedup": speed, "rel_l2": rel}


def _generate(args: argparse.Namespace) -> int:
    import torch

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    if args.repeat < 1:
        raise InputError(f"--repeat must be a positive integer, got {args.repeat}: pass --repeat 1 for a single timed run")
    t0 = time.perf_counter()
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        scheduler=args.scheduler,
        progress=not args.quiet,
        engines=args.engines,
        runner_options=_runner_options(args),
        **({"controlnet": args.controlnet} if args.controlnet else {}),
    )
    print(f"model: {pipe.source}")
    _apply_loras(pipe, args.lora)
    print(f"backend: {pipe.backend} on {pipe.device} ({pipe.precision}), scheduler {args.scheduler}, load {time.perf_counter() - t0:.2f} s")

    image_kwargs = _image_kwargs(args)

    def run(schedule: str, noise: bool | None, output_type: str = "pil") -> Any:
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
        diffusers_kw = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                            num_inference_steps=args.steps, guidance_scale=args.guidance,
                            num_images_per_prompt=args.num_images, seed=args.seed, device=pipe.device)
        # One untimed run of the timed schedule pays the one-off costs (allocation, FLOP counting,
        # backend="auto"'s tuning, and ONNX Runtime's first call at each decoder row count, which a
        # 2-step run would not reach: on the default model it made the first 'paper' run 1.15 s
        # against 0.32 s warm). diffusers gets its warm-up run too.
        if not args.quiet:
            print("warm-up: one untimed run of each system")
        warm = run(args.schedule, noise, output_type="latent")
        decision = _print_auto(pipe, warm, first=True)
        run("all", False, output_type="latent")
        run_diffusers(pipe.sd, args.prompt, **diffusers_kw)
        # Alternating runs, so that a slow spell of a shared machine hits every system alike. Every
        # run of one system has the same seed and so the same result; only the timings differ.
        runs: list[Any] = []
        refs: list[Any] = []
        plain: list[Any] = []
        for _ in range(args.repeat):
            runs.append(run(args.schedule, noise, output_type="np"))
            refs.append(run("all", False, output_type="np"))
            plain.append(run_diffusers(pipe.sd, args.prompt, **diffusers_kw))
        out, ref = _median_run(runs), _median_run(refs)
        dref = plain[median_index([d.seconds for d in plain])]
        out_np = out.images
        out.images = pipe.sd.image_processor.numpy_to_pil(out_np)
    else:
        out = run(args.schedule, noise)
        decision = _print_auto(pipe, out, first=True)
    label = args.schedule or ("calibrated" if out.stats.key_steps != _paper_keys(out.stats.num_steps) else "paper")
    print(f"key steps: {','.join(map(str, out.stats.key_steps))}")
    print(_fmt_stats(label, out.stats))
    report: dict[str, Any] = {"schedule": args.schedule or label, "stats": out.stats.as_dict()}
    if decision is not None:  # the decision of the asked schedule's run (--compare's 'all' has its own)
        report["auto"] = decision.as_dict()
    if args.compare:
        print(_fmt_stats("all", ref.stats))
        print(f"{'diffusers':>10}: {dref.seconds:7.3f} s total | {type(pipe.sd).__name__}, same seed, scheduler and steps")
        if args.repeat > 1:
            def totals(values: list[float]) -> str:
                return ", ".join(f"{v:.3f}" for v in values)

            print(f"(median of {args.repeat} alternating runs each; totals {label}: "
                  f"{totals([o.stats.seconds['total'] for o in runs])} s, all: "
                  f"{totals([o.stats.seconds['total'] for o in refs])} s, diffusers: {totals([d.seconds for d in plain])} s)")
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
        print(f"speedup vs diffusers: {vs_diffusers:.2f}x ({out.stats.seconds['total']:.3f} s against "
              f"{dref.seconds:.3f} s); relative L2 of the images vs diffusers: {img_rel:.4e} "
              f"('all' vs diffusers: {all_img_rel:.2e} images, {all_lat_rel:.2e} latents)")
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
    hint = _bf16_hint(args, pipe, out, run, noise)
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


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="choose the key steps for a model, scheduler and step count")
    _add_model_args(p)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--key-steps", type=int, default=None, help="K: encoder runs (key steps, step 0 included)")
    budget.add_argument("--speedup", type=float, default=None,
                        help="target UNet speedup over 'all', estimated from encoder/decoder costs measured here")
    p.add_argument("--method", default="greedy", choices=["greedy", "dp", "dp+swap"])
    p.add_argument("--prompts", default=None, help="a text file, one calibration prompt per line (default: built-in)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default=None, help="write the calibration JSON here")
    p.add_argument("--save", action="store_true",
                   help="save it with the engine directory (--engines) or the model folder, for schedule='calibrated'")
    p.add_argument("--plot", default=None,
                   help="PNG: the paper's Figure 3 for this model and scheduler (encoder vs decoder feature change "
                        "per step), with the chosen key steps marked")
    p.add_argument("--quiet", action="store_true")


def _calibrate(args: argparse.Namespace) -> int:
    from fd_trt.tools.calibrate import DEFAULT_PROMPTS, calibrate
    from fd_trt.core.calibration import calibration_file
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    prompts: Sequence[str] = DEFAULT_PROMPTS
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise InputError(f"--prompts {args.prompts}: no such file; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"--prompts {args.prompts} holds no prompt: write one prompt per line")
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model, backend=args.backend, device=args.device, precision=args.precision, scheduler=args.scheduler,
        progress=False, engines=args.engines, runner_options=_runner_options(args),
    )
    print(f"model: {pipe.source}; backend {pipe.backend}; {args.scheduler}-{args.steps}; {len(prompts)} prompts")
    cal = calibrate(pipe, scheduler=args.scheduler, steps=args.steps, key_steps=args.key_steps, speedup=args.speedup,
                    prompts=prompts, guidance=args.guidance, method=args.method,
                    progress=None if args.quiet else (lambda line: print(f"  {line}", flush=True)))
    print(f"key steps: {','.join(map(str, cal.key_steps))} (K={len(cal.key_steps)})")
    print(f"calibration error (rel. L2 vs all): {cal.error:.4f}; paper: {cal.paper_error:.4f}")
    print(f"estimated UNet speedup over all: {cal.estimated_speedup:.2f}x")
    if cal.costs:
        c = cal.costs
        print(f"  from measured costs ({len(cal.prompts)} prompts, CFG rows): encoder {1e3 * c['encoder']:.2f} ms, "
              f"decoder {1e3 * c['decoder_1']:.2f} ms per call + {1e3 * c['decoder_per_step_batched']:.2f} ms per "
              "extra batched step")
    print(f"took {cal.seconds:.1f} s ({cal.evaluations} sampler runs, {cal.steps_run} steps)")
    if args.out:
        print(f"wrote {cal.save(args.out)}")
    if args.save:
        folder = pipe.engines or pipe.model_dir
        if folder is None:
            raise InputError("--save needs a model folder or --engines DIR to save into")
        print(f"saved {cal.save(calibration_file(folder, args.scheduler, args.steps))} (schedule='calibrated')")
    if args.plot:
        from fd_trt.tools.calibrate import feature_changes, plot_feature_changes

        fc = feature_changes(pipe, args.scheduler, args.steps, prompts, cal.seeds, args.guidance)
        enc, dec = sum(fc["enc_rel"]) / len(fc["enc_rel"]), sum(fc["dec_rel"]) / len(fc["dec_rel"])
        print(f"mean relative change per step: encoder {enc:.4f}, decoder {dec:.4f} "
              f"(Figure 3 {'holds' if enc < dec else 'does not hold'} on this model)")
        title = f"Figure 3: {args.scheduler}-{args.steps} on {pipe.source}, key steps {cal.key_steps}"
        print(f"wrote {plot_feature_changes(fc, args.plot, cal.key_steps, title)}")
    return 0


def _add_mask(sub: Any) -> None:
    p = sub.add_parser("mask", help="write a silhouette mask PNG: the control image of --controlnet default")
    p.add_argument("shape", help="circle, square, triangle, star or diamond")
    p.add_argument("--out", default="mask.png", help="output PNG (white object on black)")
    p.add_argument("--size", type=float, default=30.0, help="the shape's diameter in pixels")
    p.add_argument("--cx", type=float, default=None, help="centre x in pixels (default: the middle)")
    p.add_argument("--cy", type=float, default=None, help="centre y in pixels (default: the middle)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square mask (the default model makes 64x64)")


def _mask(args: argparse.Namespace) -> int:
    from fd_trt.tools.shapes import SHAPES, mask_image, silhouette

    if args.shape not in SHAPES:
        raise InputError(f"unknown shape {args.shape!r}: choose one of {', '.join(SHAPES)}")
    n = args.image_size
    if n < 8 or not 0 < args.size <= n:
        raise InputError(f"--size must be in (0, --image-size={n}] and --image-size at least 8, got --size {args.size}")
    cx = n / 2 if args.cx is None else args.cx
    cy = n / 2 if args.cy is None else args.cy
    m = silhouette(args.shape, cx, cy, args.size, image_size=n)
    if not m.any():
        raise InputError(f"the {args.shape} at ({cx}, {cy}) with size {args.size} lies outside the {n}x{n} image")
    mask_image(m).save(args.out)
    print(f"wrote {args.out} ({n}x{n}, {args.shape}, {int(m.sum())} px)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fd-trt``."""
    parser = argparse.ArgumentParser(prog="fd-trt", description="Faster Diffusion on compiled graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_build(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_calibrate(sub)
    _add_mask(sub)
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "build":
            return _build(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "mask":
            return _mask(args)
    except FdTrtError as e:
        print(f"fd-trt: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
