"""``fd-trt calibrate``: choose the key steps for a model, scheduler and step count (:mod:`fd_trt.tools.calibrate`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fd_trt.cli.common import add_log_level, add_model_args, runner_options
from fd_trt.errors import InputError
from fd_trt.families.models import SCHEDULERS


def add_parser(sub: Any) -> None:
    """Adds ``calibrate`` to the sub-commands."""
    p = sub.add_parser("calibrate", help="choose the key steps for a model, scheduler and step count")
    add_model_args(p)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="the diffusers scheduler")
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--key-steps", type=int, default=None, help="K: encoder runs (key steps, step 0 included)")
    budget.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="target UNet speedup over 'all', estimated from encoder/decoder costs measured here",
    )
    budget.add_argument(
        "--max-error",
        type=float,
        default=None,
        help="with --decoder: the largest rel. L2 against 'all' accepted; the fastest schedule within it wins",
    )
    p.add_argument(
        "--decoder",
        action="store_true",
        help="search decoder schedules (key steps, whole-decoder steps and a shallow depth: "
        "docs/guides/deepcache-front.md) for --speedup or --max-error, instead of key steps alone",
    )
    p.add_argument(
        "--method",
        default="greedy",
        choices=["greedy", "dp", "dp+swap"],
        help="greedy: add key steps one at a time, then move them while that helps (slower); dp: from one 'all' run's "
        "feature changes (fast); dp+swap: dp, then greedy's moves",
    )
    p.add_argument("--prompts", default=None, help="a text file, one calibration prompt per line (default: built-in)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale the calibration runs use")
    p.add_argument("--out", default=None, help="write the calibration JSON here")
    p.add_argument(
        "--save",
        action="store_true",
        help="save it with the engine directory (--engines) or the model folder, for schedule='calibrated'",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="PNG: the paper's Figure 3 for this model and scheduler (encoder vs decoder feature change "
        "per step), with the chosen key steps marked",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_level(p)


def run(args: argparse.Namespace) -> int:
    """Calibrates the key steps and writes or saves them; returns the exit status."""
    from fd_trt.core.calibration import calibration_file
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.calibrate import DEFAULT_PROMPTS, calibrate

    prompts: Sequence[str] = DEFAULT_PROMPTS
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise InputError(f"--prompts {args.prompts}: no such file; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"--prompts {args.prompts} holds no prompt: write one prompt per line")
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        scheduler=args.scheduler,
        progress=False,
        engines=args.engines,
        runner_options=runner_options(args),
    )
    print(f"model: {pipe.source}; backend {pipe.backend}; {args.scheduler}-{args.steps}; {len(prompts)} prompts")
    if args.decoder or args.max_error is not None:
        return _run_decoder(args, pipe, prompts)
    cal = calibrate(
        pipe,
        scheduler=args.scheduler,
        steps=args.steps,
        key_steps=args.key_steps,
        speedup=args.speedup,
        prompts=prompts,
        guidance=args.guidance,
        method=args.method,
        progress=None if args.quiet else (lambda line: print(f"  {line}", flush=True)),
    )
    print(f"key steps: {','.join(map(str, cal.key_steps))} (K={len(cal.key_steps)})")
    print(f"calibration error (rel. L2 vs all): {cal.error:.4f}; paper: {cal.paper_error:.4f}")
    print(f"estimated UNet speedup over all: {cal.estimated_speedup:.2f}x")
    if cal.costs:
        c = cal.costs
        print(
            f"  from measured costs ({len(cal.prompts)} prompts, CFG rows): encoder {1e3 * c['encoder']:.2f} ms, "
            f"decoder {1e3 * c['decoder_1']:.2f} ms per call + {1e3 * c['decoder_per_step_batched']:.2f} ms per "
            "extra batched step"
        )
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
        print(
            f"mean relative change per step: encoder {enc:.4f}, decoder {dec:.4f} "
            f"(Figure 3 {'holds' if enc < dec else 'does not hold'} on this model)"
        )
        title = f"Figure 3: {args.scheduler}-{args.steps} on {pipe.source}, key steps {cal.key_steps}"
        print(f"wrote {plot_feature_changes(fc, args.plot, cal.key_steps, title)}")
    return 0


def _run_decoder(args: argparse.Namespace, pipe: Any, prompts: Sequence[str]) -> int:
    """``--decoder``: the decoder-schedule search (:mod:`fd_trt.tools.calibrate_decoder`)."""
    from fd_trt.core.calibration import calibration_file
    from fd_trt.tools.calibrate_decoder import calibrate_decoder

    if args.key_steps is not None:
        raise InputError("--decoder searches for --speedup X or --max-error E, not --key-steps")
    if not args.decoder:
        raise InputError("--max-error is the decoder-schedule search's target: add --decoder")
    cal = calibrate_decoder(
        pipe,
        scheduler=args.scheduler,
        steps=args.steps,
        speedup=args.speedup,
        max_error=args.max_error,
        prompts=prompts,
        guidance=args.guidance,
        progress=None if args.quiet else (lambda line: print(f"  {line}", flush=True)),
    )
    print(f"schedule: {cal.schedule().spec}")  # type: ignore[attr-defined]
    print(
        f"calibration error (rel. L2 vs all): {cal.error:.4f}; estimated UNet speedup over all: {cal.estimated_speedup:.2f}x"
    )
    print(f"took {cal.seconds:.1f} s ({cal.evaluations} sampler runs)")
    if args.out:
        print(f"wrote {cal.save(args.out)}")
    if args.save:
        folder = pipe.engines or pipe.model_dir
        if folder is None:
            raise InputError("--save needs a model folder or --engines DIR to save into")
        print(f"saved {cal.save(calibration_file(folder, args.scheduler, args.steps))} (schedule='calibrated')")
    return 0
