"""``fd-trt bench``: diffusers, fd_trt and DeepCache side by side (:mod:`fd_trt.tools.bench`)."""

from __future__ import annotations

import argparse
from typing import Any

from fd_trt.cli.common import add_log_level
from fd_trt.families.models import FLOW_SCHEDULERS, SCHEDULERS


def add_parser(sub: Any) -> None:
    """Adds ``bench`` to the sub-commands."""
    p = sub.add_parser("bench", help="benchmark diffusers, fd_trt and DeepCache side by side")
    p.add_argument(
        "--model",
        default="sd15-arch",
        help="default | tiny | tiny-sdxl | sd15-arch | sdxl-arch | a local diffusers folder",
    )
    p.add_argument("--height", type=int, default=256, help="image height in pixels")
    p.add_argument("--width", type=int, default=256, help="image width in pixels")
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=[*SCHEDULERS, *FLOW_SCHEDULERS],
        help="the diffusers scheduler (flow-euler, flow-heun: flow-matching models such as SD3)",
    )
    p.add_argument(
        "--backends",
        default="auto,torch",
        help="comma-separated: auto,torch,onnxruntime,tensorrt (auto runs last, so that it can measure "
        "the graphs the others built)",
    )
    p.add_argument("--schedules", default="all,paper", help="comma-separated fd_trt schedules (';' separates lists)")
    p.add_argument("--precisions", default="fp32", help="torch runner precisions, e.g. fp32,bf16")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per system (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system first")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--no-deepcache", action="store_true", help="skip the DeepCache rows")
    p.add_argument(
        "--deepcache-intervals", default="2,3,5", help="comma-separated DeepCache cache intervals (branch 0)"
    )
    p.add_argument("--no-tgate", action="store_true", help="skip the T-GATE rows")
    p.add_argument("--tgate-gate-steps", default="10,20", help="comma-separated T-GATE gate steps")
    p.add_argument(
        "--controlnet",
        action="store_true",
        help="also run every row with a random ControlNet made from the model's UNet (ControlNetModel.from_unet) "
        "and a random control image, against diffusers' StableDiffusionControlNetPipeline",
    )
    p.add_argument(
        "--authors-style",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the peer baseline row: Faster Diffusion ('paper') run the authors' way on diffusers modules "
        "(fd_trt/authors_style.py); on by default",
    )
    p.add_argument(
        "--front",
        action="store_true",
        help="the speed-fidelity front: every method across its knob (fd_trt's key-step and decoder schedules, "
        "DeepCache's intervals, T-GATE's gate steps); --json gains the points, --plot draws speedup against rel. L2",
    )
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--markdown", default=None, help="write the results as a markdown table to this file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of the results to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_level(p)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and writes its reports; returns the exit status."""
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
        deepcache_intervals=_ints(args.deepcache_intervals, "--deepcache-intervals"),
        tgate=not args.no_tgate,
        tgate_gate_steps=_ints(args.tgate_gate_steps, "--tgate-gate-steps"),
        authors_style=args.authors_style,
        threads=args.threads,
        controlnet=args.controlnet,
    )
    if args.front:
        from fd_trt.tools.bench import front_config

        cfg = front_config(cfg)
    report = run_benchmark(cfg, progress=not args.quiet)
    write_outputs(report, args.json, args.markdown, args.plot)
    print(to_markdown(report))
    for path in (args.json, args.markdown, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or an :class:`~fd_trt.errors.InputError` naming the flag."""
    from fd_trt.errors import InputError

    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise InputError(f"{flag} takes comma-separated positive integers, e.g. 2,3,5; got {text!r}")
    return values
