"""``fd-trt build``: export the encoder/decoder graphs (and TensorRT plans) into an engine directory.

A UNet model's directory is ``engines/<name>-<H>x<W>-<precision>`` by default
([`fd_trt.graphs.build.build_engines()`][fd_trt.graphs.build.build_engines]); a diffusion transformer's (DiT, PixArt, SD3)
is the folder its pipeline uses at run time, ``$FD_TRT_CACHE/transformer/...``
([`fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline.export_graphs()`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline.export_graphs],
[`fd_trt.backends.tensorrt_dit.ensure_transformer_plans()`][fd_trt.backends.tensorrt_dit.ensure_transformer_plans]).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fd_trt.cli.common import add_log_level
from fd_trt.errors import InputError


def add_parser(sub: Any) -> None:
    """Adds ``build`` to the sub-commands."""
    p = sub.add_parser("build", help="export the encoder/decoder graphs (and engines) into an engine directory")
    p.add_argument("--model", default="default", help="'default', 'default-dit' or a local diffusers folder")
    p.add_argument(
        "--out",
        default=None,
        help="engine directory (default: engines/<model name>-<H>x<W>-<precision>; for a diffusion transformer, "
        "the folder its pipeline uses at run time, under $FD_TRT_CACHE/transformer)",
    )
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="what the directory is for: ONNX graphs only, or also TensorRT plans built from them",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "fp16"],
        help="graph precision (default: fp32 for onnxruntime, fp16 for tensorrt)",
    )
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="text-to-video models (required for them): the frame count the graphs take",
    )
    p.add_argument("--batch", type=int, default=1, help="images per call (sets the row ranges)")
    p.add_argument(
        "--max-segment-steps",
        type=int,
        default=None,
        help="longest segment decoded in one call (default: 15; 4 for diffusion transformers, their runner's)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_level(p)
    p.add_argument(
        "--tune",
        action="store_true",
        help="also measure every backend='auto' candidate (building the graphs it lacks) for --schedule, "
        "--steps and --batch, and cache the decision that fd-trt generate then reuses",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="with --tune: intra-op threads, as fd-trt generate --threads"
    )
    trt = p.add_argument_group("TensorRT plans (--backend tensorrt)")
    trt.add_argument(
        "--schedule",
        default=None,
        help="schedule whose segments choose the decoder profile's opt rows (default: paper), and that "
        "--tune tunes for (default: the one fd-trt generate would use); a decoder schedule (deepcache:N, "
        "combined:..., a calibration JSON with depths) also exports its shallow decoder graphs (onnxruntime "
        "too) and builds their plans, so that runs of it build nothing",
    )
    trt.add_argument("--steps", type=int, default=None, help="step count the --schedule is read for (default: 50)")
    trt.add_argument(
        "--opt-segment-steps",
        type=int,
        default=None,
        help="tune the decoder for segments of this many steps (default: from --schedule; 1 for diffusion "
        "transformers)",
    )
    trt.add_argument(
        "--opt-level",
        type=int,
        default=None,
        choices=range(6),
        metavar="0-5",
        help="TensorRT builder optimization level (default: 3, TensorRT's own)",
    )
    trt.add_argument(
        "--workspace-gb",
        type=float,
        default=None,
        help="builder workspace limit in GiB (default: TensorRT's, the GPU's memory)",
    )
    trt.add_argument("--no-timing-cache", action="store_true", help="neither read nor update the timing cache")
    trt.add_argument("--device", default="cuda", help="CUDA device to build the plans for (default: cuda)")
    dit = p.add_argument_group("diffusion transformers (DiT, PixArt, SD3)")
    dit.add_argument(
        "--split",
        type=int,
        default=None,
        help="the split point N the graphs are exported for (the encoder runs blocks 0..N-1; default: the family's)",
    )
    dit.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="PixArt, SD3: the text tokens the graphs take (default: the pipeline's, 120 for PixArt, 256 for SD3)",
    )


def run(args: argparse.Namespace) -> int:
    """Builds the engine directory (and, with ``--tune``, the tuning decisions); returns the exit status."""
    from fd_trt.families.models import load_diffusers_pipeline
    from fd_trt.graphs.build import build_engines

    t0 = time.perf_counter()
    if _is_transformer_folder(args.model):
        return _build_transformer(args)
    for flag, value in (("--split", args.split), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None:
            raise InputError(
                f"{flag} {value} is for diffusion transformers (DiT, PixArt, SD3), but {args.model!r} is a UNet model, "
                f"whose graphs are split at its fixed encoder and decoder: drop {flag}"
            )
    args.steps = 50 if args.steps is None else args.steps
    args.opt_level = 3 if args.opt_level is None else args.opt_level
    args.max_segment_steps = 15 if args.max_segment_steps is None else args.max_segment_steps
    if args.tune and not args.out:
        # auto looks for graphs in the engine cache: build them there, once.
        return _tune(args)
    # A decoder schedule (deepcache:N, combined:..., a calibration with depths) also needs its
    # shallow graphs (and, for tensorrt, their plans): built ahead, so that runs build nothing.
    depths: tuple[int, ...] = ()
    if args.backend == "tensorrt" or (args.schedule is not None and args.schedule.strip().lower() != "calibrated"):
        from fd_trt.core.schedule import DecoderSchedule, parse_schedule

        spec = args.schedule or "paper"
        if isinstance(spec, str) and spec.strip().lower().endswith(".json"):
            # a calibration: its key steps set the profiles, its depths (if any) the shallow graphs
            from fd_trt.core.calibration import Calibration

            cal = Calibration.load(spec)
            if cal.steps != args.steps:
                raise InputError(
                    f"--schedule {spec} was calibrated for {cal.steps} steps, but --steps is "
                    f"{args.steps}: pass --steps {cal.steps}"
                )
            spec = cal.schedule() if cal.depths is not None else ",".join(map(str, cal.key_steps))
        schedule = parse_schedule(spec, args.steps)  # a bad --schedule fails now, not after the export
        if isinstance(schedule, DecoderSchedule):
            depths = tuple(sorted({d for d in schedule.depths if d}))
        if args.backend == "tensorrt":
            args.schedule = spec
    sd, source = load_diffusers_pipeline(args.model)
    # A pixel-space pipeline (DeepFloyd IF: no VAE) denoises the image itself: factor 1.
    f = int(sd.vae_scale_factor) if getattr(sd, "vae", None) is not None else 1
    height = args.height or int(sd.unet.config.sample_size) * f
    width = args.width or int(sd.unet.config.sample_size) * f
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % f:
            raise InputError(f"--{name} {v} is not a positive multiple of the VAE factor {f}")
    precision = args.precision or ("fp16" if args.backend == "tensorrt" else "fp32")
    from fd_trt.graphs.split_video import video_unet_class

    video = video_unet_class(sd.unet)
    if video is not None and args.frames is None:
        raise InputError(f"the model's UNet is a text-to-video {video}: pass --frames F, the frame count to build for")
    name = Path(str(args.model).rstrip("/")).name or "model"
    f_part = f"-f{args.frames}" if args.frames is not None else ""
    out = Path(args.out) if args.out else Path("engines") / f"{name}{f_part}-{height}x{width}-{precision}"
    from fd_trt.families.base import family_for_pipeline

    # The model family states the graphs' text and added-conditioning shapes (SDXL: the pooled
    # width and time-id count, 6 base, 5 refiner, come from the model).
    family = family_for_pipeline(sd)
    text_shape, added_shapes = family.text_shape(sd), family.added_shapes(sd)
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
        frames=args.frames,
        family=family.name,
    )
    m = res.manifest
    state = "built" if res.built else "up to date, nothing rebuilt"
    print(f"{out}: {state} ({res.reason}) in {res.seconds:.1f} s")
    for role, rec in sorted(m.graphs.items(), key=lambda kv: kv[0] != "encoder"):
        extra = f" + {rec.data_file} {rec.data_bytes / 1e6:.1f} MB" if getattr(rec, "data_file", None) else ""
        print(f"  {role}: {rec.file} {rec.bytes / 1e6:.1f} MB{extra}, sha256 {rec.sha256[:12]}")
    print(
        f"  {precision} graphs, opset {m.opset}, latents {m.latent_shape}"
        + (f" x {m.frames} frames" if m.frames else "")
        + f", text {m.text_shape}, "
        f"decoder rows {m.decoder_rows[0]}..{m.decoder_rows[1]}"
    )
    shallow_roles = _build_shallow_graphs(sd.unet, out, depths)
    if args.backend == "tensorrt":
        _build_plans(args, out, shallow_roles)
    if args.tune:
        return _tune(args, engines=out)
    return 0


def _tune(args: argparse.Namespace, engines: Path | None = None) -> int:
    """``fd-trt build --tune``: measures every ``auto`` candidate ahead of time and caches the decision."""
    from fd_trt.core.schedule import parse_schedule
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    opts = {}
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        opts = {"intra_op_threads": args.threads}
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model, backend="auto", progress=not args.quiet, engines=engines, runner_options=opts
    )
    from fd_trt.pipelines.video import FasterDiffusionVideoPipeline

    if isinstance(pipe, FasterDiffusionVideoPipeline):
        raise InputError(
            "--tune measures backend='auto', which runs torch for text-to-video models: build their graphs with "
            "--frames F --out DIR and run them with backend='onnxruntime' or backend='tensorrt'"
        )
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


def _build_shallow_graphs(unet: Any, out: Path, depths: tuple[int, ...]) -> tuple[str, ...]:
    """Exports the shallow decoder graphs of a decoder schedule's ``depths`` into ``out`` (kept
    when up to date, [`fd_trt.graphs.shallow.build_shallow_graphs()`][fd_trt.graphs.shallow.build_shallow_graphs]); returns their roles."""
    if not depths:
        return ()
    from fd_trt.graphs.manifest import load_manifest
    from fd_trt.graphs.shallow import build_shallow_graphs

    roles: list[str] = []
    for depth in depths:
        before = load_manifest(out).graphs
        t0 = time.perf_counter()
        recs = build_shallow_graphs(unet, out, depth)
        fresh = any(r not in before or before[r].sha256 != rec.sha256 for r, rec in recs.items())
        state = f"exported in {time.perf_counter() - t0:.1f} s" if fresh else "up to date"
        for role, rec in recs.items():
            print(
                f"  {role}: {rec.file} {rec.bytes / 1e6:.1f} MB, sha256 {rec.sha256[:12]} (shallow depth {depth}, {state})"
            )
        roles.extend(recs)
    return tuple(roles)


def _build_plans(args: argparse.Namespace, out: Path, shallow_roles: tuple[str, ...] = ()) -> None:
    from fd_trt.backends.tensorrt import build_plans, runtime_problem
    from fd_trt.graphs.contract import ROLES

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
        roles=(*ROLES, *shallow_roles),
    )
    for res in results:
        rec = res.record
        state = f"built in {res.seconds:.1f} s" if res.built else "up to date"
        print(
            f"  {rec.role} plan: {rec.file} {rec.bytes / 1e6:.1f} MB, TensorRT {rec.tensorrt_version}, {rec.gpu_name} "
            f"(compute {'.'.join(map(str, rec.compute_capability))}), rows {rec.rows[0]}/{rec.rows[1]}/{rec.rows[2]} "
            f"(min/opt/max), {state}"
        )


def _is_transformer_folder(model: str) -> bool:
    """Whether ``model`` is a local folder of a diffusion transformer (``transformer/config.json``);
    its family is checked when it loads."""
    from fd_trt.families.models import model_folder

    folder = model_folder(model)
    return folder is not None and (folder / "transformer" / "config.json").is_file()


def _build_transformer(args: argparse.Namespace) -> int:
    """``fd-trt build`` of a diffusion transformer: its two graphs (and TensorRT plans) exported into
    the folder its pipeline uses at run time, or ``--out``."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline

    no_plan_settings = "transformer plans are built with TensorRT's default builder settings"
    no_schedule = "the transformer plans' profile is set by --batch, --max-segment-steps and --opt-segment-steps"
    refused = {
        "--tune": (args.tune, "backend='auto' times diffusion transformers on the first call at each shape"),
        "--schedule": (args.schedule is not None, no_schedule),
        "--steps": (args.steps is not None, no_schedule),
        "--opt-level": (args.opt_level is not None, no_plan_settings),
        "--workspace-gb": (args.workspace_gb is not None, no_plan_settings),
        "--no-timing-cache": (args.no_timing_cache, no_plan_settings),
        "--precision fp16": (args.precision == "fp16", "transformer graphs and plans are fp32"),
        "--frames": (args.frames is not None, "it is the frame count of text-to-video UNets' graphs"),
    }
    for flag, (given, why) in refused.items():
        if given:
            raise InputError(f"{flag} is not available for diffusion transformers ({why}): drop {flag}")
    for flag, value in (
        ("--batch", args.batch),
        ("--max-segment-steps", args.max_segment_steps),
        ("--opt-segment-steps", args.opt_segment_steps),
    ):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: pass a positive count")
    t0 = time.perf_counter()
    pipe = FasterDiffusionPipeline.from_pretrained(args.model, backend="torch", progress=False, engines=args.out)
    assert isinstance(pipe, FasterDiffusionTransformerPipeline)
    family = pipe.family.name
    blocks = len(pipe.transformer.transformer_blocks)
    print(f"model: {pipe.source} ({family}, {blocks} blocks; loaded in {time.perf_counter() - t0:.1f} s)")
    if args.split is not None and not 0 <= args.split <= blocks:
        raise InputError(
            f"--split {args.split} is out of range: this transformer has {blocks} blocks, so N (the blocks the "
            f"encoder runs) must be in 0..{blocks}"
        )
    options = {}
    if args.max_sequence_length is not None:
        if not pipe.family.takes_prompts:
            raise InputError(f"--max-sequence-length is for PixArt and SD3: {family} takes class labels, not text")
        if args.max_sequence_length < 1:
            raise InputError(f"--max-sequence-length {args.max_sequence_length}: pass a positive token count")
        options["max_sequence_length"] = args.max_sequence_length
    n = pipe.split_point if args.split is None else args.split
    height, width = pipe.image_size(args.height, args.width)
    f = pipe.vae_scale_factor
    t1 = time.perf_counter()
    folder, m, exported = pipe.export_graphs(height, width, n, force=args.force, **options)
    state = "exported" if exported else "up to date, nothing exported"
    text = "x".join(map(str, m.text_shape)) if m.text_shape else "class labels"
    print(
        f"{folder}: {state} in {time.perf_counter() - t1:.1f} s ({family} graphs at N={m.split} of {m.blocks} blocks, "
        f"{height}x{width} (latents {m.latent_hw[0]}x{m.latent_hw[1]}), text {text}, fp32)"
    )
    for role, name in m.graph_files().items():
        rec = (m.graphs or {}).get(role)
        size = f"{rec.bytes / 1e6:.1f} MB, sha256 {rec.sha256[:12]}" if rec is not None else "not recorded"
        print(f"  {role}: {name} {size}")
    if args.backend == "tensorrt":
        _build_transformer_plans(args, pipe, folder, n, (height // f, width // f))
    if args.out is None:
        print(f"a pipeline of {args.model} uses it at run time at this size, N and text length (no engines= needed)")
    else:
        print(f"run with engines={str(folder)!r} (fd-trt generate --engines {folder})")
    return 0


def _build_transformer_plans(
    args: argparse.Namespace, pipe: Any, folder: Path, n: int, latent_hw: tuple[int, int]
) -> None:
    """The TensorRT plans of a transformer folder, at the profile ``--batch``, ``--max-segment-steps``
    and ``--opt-segment-steps`` give (the pipeline's ``runner_options`` by default)."""
    from fd_trt.backends.tensorrt_build import RowProfile, runtime_problem
    from fd_trt.backends.tensorrt_dit import ensure_transformer_plans

    problem = runtime_problem(args.device)
    if problem is not None:
        print(f"  TensorRT plans: not built: {problem}")
        return
    config = pipe.transformer.config
    rows = 2 * args.batch
    steps = 4 if args.max_segment_steps is None else args.max_segment_steps
    opt_steps = 1 if args.opt_segment_steps is None else args.opt_segment_steps
    if opt_steps > steps:
        raise InputError(f"--opt-segment-steps {opt_steps} exceeds --max-segment-steps {steps}: lower it")
    records, rebuilt = ensure_transformer_plans(
        folder,
        pipe.split_for(n, latent_hw),
        int(config.patch_size),
        int(config.num_attention_heads) * int(config.attention_head_dim),
        RowProfile(1, rows, rows),
        steps,
        opt_steps,
        device=args.device,
        force=args.force,
    )
    for role, rec in records.items():
        state = f"built ({rebuilt[role]})" if role in rebuilt else "up to date"
        print(
            f"  {role} plan: {rec.file} {rec.bytes / 1e6:.1f} MB, TensorRT {rec.tensorrt_version}, {rec.gpu_name} "
            f"(compute {'.'.join(map(str, rec.compute_capability))}), rows {rec.rows[0]}/{rec.rows[1]}/{rec.rows[2]} "
            f"(min/opt/max), {state}"
        )
    print(
        f"  run them with runner_options={{'max_rows': {rows}, 'max_segment_steps': {steps}, "
        f"'opt_segment_steps': {opt_steps}}}"
    )
