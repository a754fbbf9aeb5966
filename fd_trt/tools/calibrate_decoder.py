"""Calibrated decoder schedules: key steps, whole-decoder steps and a shallow depth, chosen for a
speed target or an error target (docs/guides/deepcache-front.md).

The search is over a grid of combined schedules ([`fd_trt.core.schedule.combined_schedule()`][fd_trt.core.schedule.combined_schedule]):
key steps every ``n`` steps, ``paper``, a saved key-step calibration, or ``power:K:P`` (dense at the
start, with only the key steps running the whole decoder); the steps that run the
whole decoder (only the key steps, every 2nd or 3rd step, or all of them: plain encoder
propagation); the shallow depth (1 or 2 up layers); and, at depth 1, shallow steps that read their
own latents' ``conv_in`` (DeepCache's branch 0). Each candidate's UNet-time speedup over ``all``
is estimated from measured call costs ([`estimate_decoder_speedup()`][fd_trt.tools.calibrate_decoder.estimate_decoder_speedup]) before anything runs;
then the sampler measures the error (relative L2 of the final latents against ``all`` on the
calibration batch) of the candidates the target leaves:

- speed target: the candidates estimated at least that fast, cheapest first, up to
  ``max_evaluations``; the one with the least error wins;
- error target: a bisection of the candidates ranked by estimated speed for the fastest within
  the error, then the candidates just faster than it, up to ``max_evaluations``; the fastest
  within the error wins.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fd_trt.core.calibration import Calibration
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, run_sampler
from fd_trt.core.schedule import DecoderSchedule, NoiseInjection, combined_schedule
from fd_trt.errors import InputError
from fd_trt.tools.calibrate import DEFAULT_PROMPTS, Evaluator, _step_kwargs, measure_costs


def measure_shallow_costs(ev: Evaluator, depths: Sequence[int] = (1, 2), repeats: int = 3) -> dict[str, float]:
    """Seconds of shallow decoder calls of 1 and 10 steps per depth, on the batch's rows
    (``shallow_<d>_1``, ``shallow_<d>_per_step_batched``) and of one ``conv_in`` (``input_conv``)."""
    from fd_trt.pipelines.pipeline import prepare_shallow_graphs

    runner = ev.pipe.pool.runner_for(ev.latent_hw, (int(ev.text.shape[1]), int(ev.text.shape[2])))
    rows = int(ev.text.shape[0])
    for d in depths:  # a graph backend's shallow graphs, exported on first use as the pipeline does
        probe = combined_schedule("uniform:5", None, d, ev.reference_steps, fresh_input=d == 1)
        prepare_shallow_graphs(ev.pipe.sd.unet, runner, probe, rows, SamplerOptions())
    x = torch.zeros((rows, *ev.latents.shape[1:]), device=ev.pipe.device)
    t = torch.full((rows,), 500.0, device=ev.pipe.device)

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            runner.synchronize()
            t0 = time.perf_counter()
            fn()
            runner.synchronize()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    out: dict[str, float] = {}
    with torch.inference_mode():
        feats = runner.encode(x, t, ev.text, ev.added)
        for d in depths:  # one depth per capture: the onnxruntime graphs capture one each
            hidden = runner.decode_capture(feats, t[:1].repeat(10), ev.text, ev.added, (d,))[1][d]
            h1, h10 = hidden[:rows], hidden
            skips = feats.skips[:d]
            one = timed(lambda h=h1, s=skips: runner.decode_shallow(h, s, t[:1], ev.text, ev.added))
            ten = timed(lambda h=h10, s=skips: runner.decode_shallow(h, s, t[:1].repeat(10), ev.text, ev.added))
            out[f"shallow_{d}_1"] = one
            out[f"shallow_{d}_per_step_batched"] = max(ten - one, 0.0) / 9
        out["input_conv"] = timed(lambda: runner.input_conv(x))
    return out


def estimate_decoder_speedup(costs: dict[str, float], schedule: DecoderSchedule) -> float:
    """UNet-time speedup over ``all`` of a decoder schedule, from measured call costs.

    Per segment: one encoder call, one decoder call over its whole-decoder steps
    (``decoder_1 + (n - 1) * decoder_per_step_batched``), and its shallow steps: one call per
    depth modelled the same way, or, with ``fresh_input``, one call and one ``conv_in`` per step.
    """
    t = schedule.num_steps
    cost_all = t * (costs["encoder"] + costs["decoder_1"])
    cost = 0.0
    for seg in schedule.segments:
        depths = [schedule.depths[j] for j in seg.steps]
        n_full = depths.count(0)
        cost += costs["encoder"] + costs["decoder_1"] + (n_full - 1) * costs["decoder_per_step_batched"]
        for d in sorted(set(depths) - {0}):
            n = depths.count(d)
            if schedule.fresh_input:
                cost += n * (costs[f"shallow_{d}_1"] + costs.get("input_conv", 0.0))
            else:
                cost += costs[f"shallow_{d}_1"] + (n - 1) * costs[f"shallow_{d}_per_step_batched"]
    return cost_all / cost if cost > 0 else float("inf")


def candidate_schedules(num_steps: int, extra_keys: Sequence[Sequence[int]] = ()) -> list[DecoderSchedule]:
    """The search grid (see the module docstring), without duplicates."""
    keys: list[Any] = [f"uniform:{n}" for n in range(2, 11)] + ["paper", *(list(k) for k in extra_keys)]
    fulls: list[Any] = [None, "uniform:2", "uniform:3", "all"]
    # Key steps dense at the start (power:K:P), with only the key steps running the whole decoder:
    # at equal cost far less error than an even spread (docs/guides/deepcache-front.md).
    dense = [
        f"power:{n}:{p}"
        for n in range(max(2, num_steps // 8), max(3, num_steps * 3 // 5) + 1, 2)
        for p in (1.5, 2, 2.5)
        if n <= num_steps
    ]
    seen: set[tuple[Any, ...]] = set()
    out: list[DecoderSchedule] = []
    for k in keys + dense:
        for full in fulls if k not in dense else [None]:
            for depth, fresh in ((1, False), (1, True), (2, False)):
                if full == "all" and (depth, fresh) != (1, False):
                    continue  # no shallow step: one candidate is enough
                s = combined_schedule(k, full, depth, num_steps, fresh_input=fresh)
                sig = (s.key_steps, s.depths, s.fresh_input)
                if sig not in seen:
                    seen.add(sig)
                    out.append(s)
    return out


def decoder_error(ev: Evaluator, schedule: DecoderSchedule) -> float:
    """Relative L2 of the calibration batch's final latents against ``all`` with this schedule."""
    from fd_trt.pipelines.pipeline import prepare_shallow_graphs

    sched = copy.deepcopy(ev._scheduler)
    sched.set_timesteps(ev.steps, device=ev.pipe.device)
    gen = torch.Generator().manual_seed(0)
    runner = ev.pipe.pool.runner_for(ev.latent_hw, (int(ev.text.shape[1]), int(ev.text.shape[2])))
    if schedule.shallow_steps:  # a graph backend's shallow graphs, exported on first use as the pipeline does
        prepare_shallow_graphs(ev.pipe.sd.unet, runner, schedule, int(ev.text.shape[0]), SamplerOptions())
    with torch.inference_mode():
        opts = SamplerOptions(
            guidance_scale=ev.guidance,
            noise=NoiseInjection(enabled=schedule.injects_noise),
            extra_step_kwargs=_step_kwargs(sched, gen),
            progress=False,
        )
        opts = ev.pipe.sampler_options(opts, sched)  # the model's own needs (IF's learned variance)
        inputs = SamplerInputs(ev.text, added=ev.added, initial_noise=ev.latents)
        out = run_sampler(runner, sched, ev.latents * sched.init_noise_sigma, inputs, schedule, opts)
    ev.evaluations += 1
    ev.steps_run += schedule.num_steps
    return float((out - ev.reference).norm() / ev.reference.norm())


def calibrate_decoder(
    pipe: Any,
    *,
    scheduler: str,
    steps: int,
    speedup: float | None = None,
    max_error: float | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seeds: Sequence[int] | None = None,
    guidance: float = 7.5,
    extra_keys: Sequence[Sequence[int]] = (),
    max_evaluations: int = 24,
    progress: Callable[[str], None] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Calibration:
    """Chooses a decoder schedule for a speed target or an error target.

    Args:
        pipe: a [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline] whose backend runs
            shallow steps (torch, onnxruntime, tensorrt, or auto).
        scheduler, steps, prompts, seeds, guidance: as [`fd_trt.tools.calibrate.calibrate()`][fd_trt.tools.calibrate.calibrate].
        speedup: the target UNet speedup over ``all`` (estimated), or
        max_error: the largest relative L2 against ``all`` accepted.
        extra_keys: more key-step sets for the grid (a saved calibration's).
        max_evaluations: sampler runs at most.
        height, width: the image size to calibrate at (the model's own by default): the call costs
            and the errors both depend on it; recorded in the calibration's ``image_size``.

    Returns:
        A [`Calibration`][fd_trt.core.calibration.Calibration] with ``depths`` and ``fresh_input`` set (method ``decoder-grid``).

    Raises:
        InputError: for a bad or missing target, or one no candidate reaches.
    """
    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    if (speedup is None) == (max_error is None):
        raise InputError("give exactly one target: speedup=X (over 'all', estimated) or max_error=E (rel. L2)")
    for name, v, low in (("speedup", speedup, 1.0), ("max_error", max_error, 0.0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > low):
            raise InputError(f"{name} must be a number above {low:g}, got {v!r}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise InputError(f"max_evaluations must be a positive integer, got {max_evaluations!r}")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    ev = Evaluator(pipe, scheduler, steps, prompts, seeds, guidance, height, width)
    costs = {**measure_costs(ev), **measure_shallow_costs(ev)}
    ranked = sorted(
        ((estimate_decoder_speedup(costs, s), s) for s in candidate_schedules(ev.reference_steps, extra_keys)),
        key=lambda p: -p[0],
    )
    history: list[dict[str, Any]] = []

    def err(s: DecoderSchedule, est: float) -> float:
        e = decoder_error(ev, s)
        history.append({"schedule": s.spec, "estimated_speedup": est, "error": e})
        say(f"{s.spec}: estimated {est:.2f}x, error {e:.4f}")
        return e

    best: tuple[float, float, DecoderSchedule] | None = None
    if speedup is not None:
        fast = [(est, s) for est, s in ranked if est >= speedup]
        if not fast:
            raise InputError(
                f"speedup {speedup}x is out of reach: the fastest candidate is estimated at {ranked[0][0]:.2f}x; ask for less"
            )
        for est, s in list(reversed(fast))[:max_evaluations]:  # cheapest first: closest to the target
            e = err(s, est)
            if best is None or e < best[1]:
                best = (est, e, s)
    else:
        # The error grows with the estimated speed only roughly: bisect the ranked list for the
        # fastest candidate within the error, then spend what is left of the budget on the
        # candidates just faster than that boundary (another family may be faster and as good).
        errors: dict[int, float] = {}

        def error_at(i: int) -> float:
            if i not in errors:
                errors[i] = err(ranked[i][1], ranked[i][0])
            return errors[i]

        lo, hi = 0, len(ranked) - 1
        if error_at(0) <= max_error:  # type: ignore[operator]
            hi = 0  # the fastest candidate is within the error: done
        else:
            lo = 1
        while lo < hi and len(errors) < max_evaluations:
            mid = (lo + hi) // 2
            if error_at(mid) <= max_error:  # type: ignore[operator]
                hi = mid
            else:
                lo = mid + 1
        for i in range(hi - 1, -1, -1):
            if len(errors) >= max_evaluations:
                break
            error_at(i)
        within = sorted(i for i, e in errors.items() if e <= max_error)  # type: ignore[operator]
        if not within:
            raise InputError(
                f"no candidate within {max_error} among the {len(errors)} evaluated: raise max_error or max_evaluations"
            )
        est, s = ranked[within[0]]
        best = (est, errors[within[0]], s)
    est, e, s = best
    say(f"chose {s.spec}: estimated {est:.2f}x, error {e:.4f}")
    return Calibration(
        key_steps=list(s.key_steps),
        scheduler=scheduler,
        steps=int(steps),
        model_sha256=pipe.unet_sha256,
        error=e,
        method="decoder-grid",
        prompts=list(prompts),
        seeds=seeds,
        guidance=float(guidance),
        seconds=time.perf_counter() - t0,
        estimated_speedup=est,
        evaluations=ev.evaluations,
        steps_run=ev.steps_run,
        history=history[-50:],
        costs=dict(costs),
        depths=list(s.depths),
        fresh_input=bool(s.fresh_input),
        image_size=None if height is None and width is None else list(ev.image_size),
    )


__all__ = [
    "calibrate_decoder",
    "candidate_schedules",
    "decoder_error",
    "estimate_decoder_speedup",
    "measure_shallow_costs",
]
