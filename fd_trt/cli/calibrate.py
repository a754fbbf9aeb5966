"""``fd-trt calibrate``: choose the key steps for a model, scheduler and step count (:mod:`fd_trt.tools.calibrate`);
for a diffusion transformer, the split point N with them (:mod:`fd_trt.tools.calibrate_dit`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fd_trt.cli.common import add_log_level, add_model_args, runner_options
from fd_trt.errors import InputError
from fd_trt.families.models import FLOW_SCHEDULERS, SCHEDULERS

#: Class labels a DiT model calibrates on without ``--prompts`` (ImageNet ids).
DEFAULT_CLASS_LABELS = (207, 360, 387, 974)


def add_parser(sub: Any) -> None:
    """Adds ``calibrate`` to the sub-commands."""
    p = sub.add_parser("calibrate", help="choose the key steps for a model, scheduler and step count")
    add_model_args(p)
    p.add_argument(
        "--scheduler",
        default=None,
        choices=[*SCHEDULERS, *FLOW_SCHEDULERS],
        help="the diffusers scheduler (default: ddim for UNet models, the model's own for diffusion transformers: "
        "dpmpp for PixArt, flow-euler for SD3; flow-* only for flow-matching models)",
    )
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height to calibrate at (default: the model's own size; --width defaults to it)",
    )
    p.add_argument("--width", type=int, default=None, help="image width to calibrate at (default: --height)")
    p.add_argument(
        "--split",
        default=None,
        help="diffusion transformers: the split point N (blocks 0..N-1 are the encoder): 'auto' (default) searches "
        "N with the key steps, an integer in 1..blocks-1 keeps it fixed",
    )
    budget = p.add_mutually_exclusive_group()
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
        help="with --decoder, or for a diffusion transformer (default 0.05 there): the largest rel. L2 against 'all' "
        "accepted; the fastest schedule within it wins",
    )
    p.add_argument(
        "--decoder",
        action="store_true",
        help="search decoder schedules (key steps, whole-decoder steps and a shallow depth: "
        "docs/guides/deepcache-front.md) for --speedup or --max-error, instead of key steps alone",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=["greedy", "dp", "dp+swap"],
        help="UNet models (default greedy): greedy: add key steps one at a time, then move them while that helps (slower); dp: from one 'all' run's "
        "feature changes (fast); dp+swap: dp, then greedy's moves",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="a text file, one calibration prompt (DiT: class id) per line (default: built-in)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale the calibration runs use (default: 7.5 for UNet models, the family's for transformers)",
    )
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
        "per step), with the chosen key steps marked; for a diffusion transformer, the mean relative change "
        "of each block's output between adjacent steps, with the chosen N marked",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_level(p)


def _read_prompts(path_arg: str | None) -> list[str] | None:
    if not path_arg:
        return None
    path = Path(path_arg)
    if not path.is_file():
        raise InputError(f"--prompts {path_arg}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path_arg} holds no prompt: write one prompt per line")
    return prompts


def run(args: argparse.Namespace) -> int:
    """Calibrates the key steps (and a transformer's N) and writes or saves them; returns the exit status."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline

    prompts = _read_prompts(args.prompts)
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        progress=False,
        engines=args.engines,
        runner_options=runner_options(args),
    )
    if isinstance(pipe, FasterDiffusionTransformerPipeline):
        return _run_transformer(args, pipe, prompts)
    if args.split is not None:
        raise InputError(
            f"--split {args.split}: the split point N is a diffusion transformer's (DiT, PixArt, SD3), but "
            f"{pipe.source} is a UNet model ({pipe.family.name}), whose encoder and decoder are fixed: drop --split"
        )
    if args.key_steps is None and args.speedup is None and args.max_error is None:
        raise InputError("give the budget: --key-steps K, --speedup X, or --max-error E with --decoder")
    args.scheduler = args.scheduler or "ddim"
    args.guidance = 7.5 if args.guidance is None else args.guidance
    args.method = args.method or "greedy"
    pipe.set_scheduler(args.scheduler)
    return _run_unet(args, pipe, prompts)


def _run_unet(args: argparse.Namespace, pipe: Any, prompt_list: Sequence[str] | None) -> int:
    """The key-step search of a UNet model (:mod:`fd_trt.tools.calibrate`)."""
    from fd_trt.core.calibration import calibration_file
    from fd_trt.tools.calibrate import DEFAULT_PROMPTS, calibrate

    prompts: Sequence[str] = prompt_list or DEFAULT_PROMPTS
    at = f"; {args.height or args.width}x{args.width or args.height}" if args.height or args.width else ""
    print(f"model: {pipe.source}; backend {pipe.backend}; {args.scheduler}-{args.steps}; {len(prompts)} prompts{at}")
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
        height=args.height,
        width=args.width,
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

        fc = feature_changes(
            pipe, args.scheduler, args.steps, prompts, cal.seeds, args.guidance, args.height, args.width
        )
        enc, dec = sum(fc["enc_rel"]) / len(fc["enc_rel"]), sum(fc["dec_rel"]) / len(fc["dec_rel"])
        print(
            f"mean relative change per step: encoder {enc:.4f}, decoder {dec:.4f} "
            f"(Figure 3 {'holds' if enc < dec else 'does not hold'} on this model)"
        )
        at = f" at {cal.image_size[0]}x{cal.image_size[1]}" if cal.image_size else ""
        title = f"Figure 3: {args.scheduler}-{args.steps} on {pipe.source}{at}, key steps {cal.key_steps}"
        print(f"wrote {plot_feature_changes(fc, args.plot, cal.key_steps, title)}")
    return 0


def _transformer_split(arg: str | None, blocks: int) -> list[int] | None:
    """``--split``: ``None`` (search N) for ``auto`` or no ``--split``, else ``[N]`` validated."""
    if arg is None or str(arg).strip().lower() == "auto":
        return None
    try:
        n = int(str(arg))
    except ValueError:
        raise InputError(
            f"--split {arg!r} is not a split point: give 'auto' or an integer N in 1..{blocks - 1}"
        ) from None
    if not 1 <= n <= blocks - 1:
        raise InputError(
            f"--split {n} is out of range: this transformer has {blocks} blocks, so N (the blocks the encoder runs) "
            f"must be in 1..{blocks - 1}; or give --split auto"
        )
    return [n]


def _run_transformer(args: argparse.Namespace, pipe: Any, prompt_list: Sequence[str] | None) -> int:
    """A diffusion transformer: N and the key steps (:func:`fd_trt.tools.calibrate_dit.calibrate_transformer`)."""
    from fd_trt.core.calibration import calibration_file
    from fd_trt.families.models import scheduler_name
    from fd_trt.tools.calibrate import DEFAULT_PROMPTS
    from fd_trt.tools.calibrate_dit import block_changes, calibrate_transformer, plot_block_changes

    family = pipe.family.name
    for flag, given in (
        ("--key-steps", args.key_steps is not None),
        ("--speedup", args.speedup is not None),
        ("--decoder", args.decoder),
        ("--method", args.method is not None),
    ):
        if given:
            raise InputError(
                f"{flag} is for UNet models; a diffusion transformer ({family}) is calibrated by a search over N and "
                "the key steps within --max-error E (default 0.05): drop " + flag
            )
    blocks = len(pipe.transformer.transformer_blocks)
    splits = _transformer_split(args.split, blocks)
    if args.scheduler is not None:
        pipe.set_scheduler(args.scheduler)
    sched = scheduler_name(pipe.sd.scheduler) or type(pipe.sd.scheduler).__name__
    conds: list[Any]
    if pipe.family.takes_prompts:
        conds = list(prompt_list or DEFAULT_PROMPTS)
    else:  # DiT: class ids (or label words the model's id2label knows)
        raw = prompt_list or [str(c) for c in DEFAULT_CLASS_LABELS]
        conds = [int(c) if c.isdigit() else c for c in raw]
    tolerance = 0.05 if args.max_error is None else float(args.max_error)
    print(
        f"model: {pipe.source} ({family}, {blocks} blocks); backend {pipe.backend}; {sched}-{args.steps}; "
        f"{len(conds)} {'prompts' if pipe.family.takes_prompts else 'class labels'}; "
        f"N {'searched' if splits is None else 'fixed at ' + str(splits[0])}"
    )
    size = {}
    if args.height is not None or args.width is not None:  # either side defaults to the other
        size = {"height": args.height or args.width, "width": args.width or args.height}
    cal = calibrate_transformer(
        pipe, conds, steps=args.steps, splits=splits, tolerance=tolerance, guidance_scale=args.guidance, **size
    )
    if size:
        cal.image_size = [int(size["height"]), int(size["width"])]
    n = int(cal.split)  # type: ignore[arg-type]
    print(f"split: {n} (the encoder runs blocks 0..{n - 1} of {blocks})")
    print(f"key steps: {','.join(map(str, cal.key_steps))} (K={len(cal.key_steps)})")
    paper = "n/a" if cal.paper_error is None else f"{cal.paper_error:.4f}"
    print(f"calibration error (rel. L2 vs all): {cal.error:.4f} (tolerance {tolerance}); paper at N={n}: {paper}")
    if cal.error > tolerance:
        print(
            f"warning: no candidate is within --max-error {tolerance}; kept the most accurate one ({cal.error:.4f}). "
            "Accept it, or pass a larger --max-error for a faster schedule"
        )
    print(f"estimated transformer speedup over all (block evaluations): {cal.estimated_speedup:.2f}x")
    print(f"took {cal.seconds:.1f} s ({cal.evaluations} sampler runs)")
    if args.out:
        print(f"wrote {cal.save(args.out)}")
    if args.save:
        folder = pipe.engines or pipe.model_dir
        if folder is None:
            raise InputError("--save needs a model folder or --engines DIR to save into")
        print(f"saved {cal.save(calibration_file(folder, sched, args.steps))} (schedule='calibrated')")
    if args.plot:
        change = block_changes(
            pipe, conds[0], steps=args.steps, seed=cal.seeds[0], guidance_scale=args.guidance, **size
        )
        print("mean relative change per block: " + " ".join(f"{v:.4f}" for v in change))
        title = f"block change: {sched}-{args.steps} on {pipe.source}, N={n}"
        print(f"wrote {plot_block_changes(change, args.plot, n, title)}")
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
        height=args.height,
        width=args.width,
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
