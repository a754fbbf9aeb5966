"""Calibrated key steps: the encoder's key steps chosen per model, scheduler and step count.

The paper's key steps {0,1,2,3,5,10,15,25,35} were tuned by hand for SD 1.x with DDIM-50. This
module chooses K key steps that keep the final latents closest to ``schedule="all"`` on a few
calibration prompts and seeds, offline, so the segments stay fixed before sampling (static decoder
batches and TensorRT profiles).

Methods (``method=``):

* ``greedy``: start from {0}; add, one at a time, the step whose addition lowers the final-latent
  error most; then refine by moving single key steps to nearby steps while that lowers the error.
  Costs about ``K * T`` sampler runs of the calibration batch.
* ``dp``: one ``all`` run records the encoder features at every step; a dynamic program picks the K
  segments that minimize the summed relative change between each step's own features and its key
  step's (the error of reusing them). Costs one run plus an evaluation.
* ``dp+swap``: ``dp``, then the same refinement as ``greedy``.

A [`Calibration`][fd_trt.core.calibration.Calibration] is saved as JSON. ``schedule=`` accepts its path or the object, and
``schedule="calibrated"`` finds the one saved with the model or engine directory
([`find_calibration()`][fd_trt.core.calibration.find_calibration]), checked against the model's weights hash, scheduler and step count.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fd_trt.core.calibration import CALIBRATION_DIR, Calibration, calibration_file, find_calibration
from fd_trt.core.schedule import KeySchedule, NoiseInjection, parse_schedule
from fd_trt.errors import InputError

logger = logging.getLogger(__name__)

METHODS = ("greedy", "dp", "dp+swap")
#: Calibration prompts for the default model (held-out evaluation uses other prompts and seeds).
DEFAULT_PROMPTS = (
    "a red circle on the left",
    "a blue star at the top",
    "a green square and a yellow triangle",
    "a purple diamond in the center",
)
DEFAULT_SEEDS = (0, 1, 2, 3)


# evaluation ---------------------------------------------------------------------------------
def image_size(height: int | None, width: int | None, default: int, factor: int) -> tuple[int, int]:
    """``(height, width)`` of a calibration: the given size (either side defaults to the other,
    then to ``default``), each a positive multiple of the VAE ``factor``.

    Raises:
        InputError: naming the bad value and a size that works.
    """
    h = height if height is not None else (width if width is not None else default)
    w = width if width is not None else h
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"calibration {name} must be a positive integer, got {v!r}")
        if v % factor:
            raise InputError(
                f"calibration {name}={v} is not divisible by the VAE factor {factor}: use a multiple of {factor}, "
                f"e.g. {max(factor, v // factor * factor)}"
            )
    return int(h), int(w)


class Evaluator:
    """Runs the sampler on a fixed calibration batch and measures the error of a schedule.

    The prompts are encoded once and the initial latents drawn once; each evaluation is one
    sampler call over the whole batch (text encoder and VAE are not involved).

    Args:
        pipe: a [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline].
        scheduler: the scheduler's short name.
        steps: inference steps.
        prompts: calibration prompts.
        seeds: one seed per prompt.
        guidance: CFG scale.
        height, width: the image size calibrated at (the model's own by default); multiples of the
            VAE factor. The error of a schedule depends on the size: a shallow step's share of a
            step, and how much a reused feature moves the result, change with it
            (docs/guides/deepcache-front.md).
    """

    def __init__(
        self,
        pipe: Any,
        scheduler: str,
        steps: int,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        from diffusers.utils.torch_utils import randn_tensor

        from fd_trt.families.models import make_scheduler

        refusal = getattr(pipe, "calibration_refusal", None)
        if refusal:  # a pipeline whose latents the evaluator does not draw (text-to-video's)
            raise InputError(refusal)
        if len(prompts) != len(seeds):
            raise InputError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        if not prompts:
            raise InputError("calibration needs at least one prompt")
        if getattr(pipe, "unet_kind", "text2img") == "superres":
            raise InputError(
                "calibration samples from text alone; an upscaling model (IF stage II) needs its input images: use "
                "schedule='paper' or a list of key steps for it"
            )
        self.pipe = pipe
        self.scheduler_name = scheduler
        self._scheduler = make_scheduler(scheduler, pipe.sd.scheduler.config)
        self.steps = int(steps)
        self.guidance = float(guidance)
        sd = pipe.sd
        cfg = self.guidance > 1.0
        f = pipe.vae_scale_factor
        size = int(sd.unet.config.sample_size)
        h_img, w_img = image_size(height, width, size * f, f)
        lh, lw = h_img // f, w_img // f
        # The pipeline's own prompt stage: SDXL's pooled embeddings and time ids come with the text.
        with torch.inference_mode():
            cond = pipe.encode_prompt(list(prompts), None, 1, cfg, h_img, w_img)
        self.text = cond.text
        #: SDXL's added conditioning per row (``text_embeds``, ``time_ids``); ``None`` for SD 1.x/2.x.
        self.added = cond.added
        shape = (len(prompts), int(sd.unet.config.in_channels), lh, lw)
        self.latents = randn_tensor(
            shape,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            device=pipe.device,
            dtype=torch.float32,
        )
        self.latent_hw = (lh, lw)
        self.image_size = (h_img, w_img)
        self.evaluations = 0
        self.steps_run = 0
        self.run_seconds = 0.0
        self._base: tuple[tuple[int, ...], list[torch.Tensor], list[Any], torch.Tensor] | None = None
        probe = copy.deepcopy(self._scheduler)
        probe.set_timesteps(self.steps)
        #: T, the scheduler's number of timesteps for ``steps``.
        self.reference_steps = len(probe.timesteps)
        self.reference = self.run(tuple(range(self.reference_steps)))

    def _fresh_scheduler(self) -> Any:
        sched = copy.deepcopy(self._scheduler)
        sched.set_timesteps(self.steps, device=self.pipe.device)
        return sched

    def run(
        self, key_steps: Sequence[int], runner_wrap: Callable[[Any], Any] | None = None, record: bool = False
    ) -> torch.Tensor:
        """Final latents of the calibration batch with these key steps.

        Args:
            key_steps: the schedule.
            runner_wrap: wraps the runner (to observe its calls).
            record: keep the latents and scheduler state before every step, so that later runs
                that share a prefix with this one resume from it ([`error()`][fd_trt.tools.calibrate.Evaluator.error]).
        """
        from fd_trt.core.sampler import SamplerInputs, SamplerOptions, run_sampler

        keys = tuple(sorted(int(k) for k in key_steps))
        sched = self._fresh_scheduler()
        ks = KeySchedule(keys, len(sched.timesteps))
        # Stochastic schedulers (DDPM) draw from this generator; resuming restores its state too.
        gen = torch.Generator().manual_seed(0)
        start, x = 0, self.latents * sched.init_noise_sigma
        base = self._base
        if base is not None and not record:
            p = _first_difference(base[0], keys, ks.num_steps)
            if p == ks.num_steps:
                return base[3]
            start = max(k for k in keys if k <= p)
            x, (state, gen_state) = base[1][start], base[2][start]
            sched = copy.deepcopy(state)
            gen.set_state(gen_state)
        states_x: list[torch.Tensor] = [x]
        states_s: list[Any] = [(copy.deepcopy(sched), gen.get_state())]
        callback = None
        if record:

            def callback(j: int, t: Any, latents: torch.Tensor) -> None:
                states_x.append(latents.clone())
                states_s.append((copy.deepcopy(sched), gen.get_state()))

        runner = self.pipe.pool.runner_for(self.latent_hw, (int(self.text.shape[1]), int(self.text.shape[2])))
        if runner_wrap is not None:
            runner = runner_wrap(runner)
        t0 = time.perf_counter()
        with torch.inference_mode():
            inputs = SamplerInputs(self.text, added=self.added, initial_noise=self.latents)
            opts = SamplerOptions(
                guidance_scale=self.guidance,
                noise=NoiseInjection(enabled=ks.injects_noise),
                extra_step_kwargs=_step_kwargs(sched, gen),
                start_step=start,
                progress=False,
            )
            opts = self.pipe.sampler_options(opts, sched)  # the model's own needs (IF's learned variance)
            out = run_sampler(runner, sched, x, inputs, ks, opts, callback=callback)
        self.run_seconds += time.perf_counter() - t0
        self.evaluations += 1
        self.steps_run += ks.num_steps - start
        if record:
            self._base = (keys, states_x, states_s, out)
        return out

    def set_base(self, key_steps: Sequence[int]) -> None:
        """Records a run of ``key_steps``; later evaluations resume from where they diverge from it."""
        self._base = None
        self.run(key_steps, record=True)

    def error(self, key_steps: Sequence[int]) -> float:
        """Relative L2 of the final latents against ``all`` over the whole batch."""
        out = self.run(key_steps)
        return float((out - self.reference).norm() / self.reference.norm())


def _first_difference(a: Sequence[int], b: Sequence[int], num_steps: int) -> int:
    """The first step whose features come from different key steps under schedules a and b."""
    sa, sb = set(a), set(b)
    ka = kb = 0
    for j in range(num_steps):
        ka = j if j in sa else ka
        kb = j if j in sb else kb
        if ka != kb:
            return j
    return num_steps


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    # Stochastic schedulers: the same noise for every candidate, so only the schedule differs.
    return {"generator": generator} if "generator" in params else {}


# search -------------------------------------------------------------------------------------
def greedy_search(
    error: Callable[[Sequence[int]], float],
    num_steps: int,
    k: int,
    start: Sequence[int] = (0,),
    on_accept: Callable[[Sequence[int]], None] | None = None,
) -> tuple[list[int], float]:
    """Adds key steps one at a time, each time the one that lowers ``error`` most.

    Args:
        error: the error of a sorted key-step list.
        num_steps: T.
        k: key steps wanted (including 0).
        start: key steps to start from.
        on_accept: called with each accepted schedule (the evaluator records it as the prefix
            that the next round's candidates share).

    Returns:
        ``(key_steps, error)``.
    """
    keys = sorted(set(start) | {0})
    if on_accept is not None:
        on_accept(keys)
    best_err = error(keys)
    while len(keys) < k:
        best: tuple[float, int] | None = None
        for c in range(1, num_steps):
            if c in keys:
                continue
            e = error(sorted(keys + [c]))
            if best is None or e < best[0]:
                best = (e, c)
        assert best is not None
        best_err = best[0]
        keys = sorted(keys + [best[1]])
        if on_accept is not None:
            on_accept(keys)
    return keys, best_err


def swap_refine(
    error: Callable[[Sequence[int]], float],
    num_steps: int,
    keys: Sequence[int],
    err: float | None = None,
    radius: int = 2,
    max_passes: int = 3,
    on_accept: Callable[[Sequence[int]], None] | None = None,
) -> tuple[list[int], float]:
    """Moves single key steps (never step 0) by up to ``radius`` steps while that lowers ``error``.

    Returns:
        ``(key_steps, error)``, with an error never above the starting one.
    """
    keys = sorted(keys)
    if on_accept is not None:
        on_accept(keys)
    err = error(keys) if err is None else err
    for _ in range(max_passes):
        improved = False
        for i in range(1, len(keys)):
            for d in [d for r in range(1, radius + 1) for d in (-r, r)]:
                c = keys[i] + d
                if c <= 0 or c >= num_steps or c in keys:
                    continue
                cand = sorted(keys[:i] + keys[i + 1 :] + [c])
                e = error(cand)
                if e < err:
                    keys, err, improved = cand, e, True
                    if on_accept is not None:
                        on_accept(keys)
                    break
        if not improved:
            break
    return keys, err


def segment_dp(cost: torch.Tensor, k: int) -> list[int]:
    """The K key steps minimizing the summed cost of reusing each key step's features.

    Args:
        cost: ``[T, T]``, ``cost[i, j]`` the cost of running step ``j >= i`` on the features of key
            step ``i`` (``cost[j, j] == 0``).
        k: key steps wanted (step 0 always one of them).

    Returns:
        Sorted key steps, exactly ``min(k, T)`` of them.
    """
    t = int(cost.shape[0])
    k = min(k, t)
    c = cost.double()
    # seg[i, j]: cost of one segment [i, j) keyed at i; cumulative sums along each row.
    csum = torch.cumsum(torch.triu(c), dim=1)
    seg = torch.full((t, t + 1), float("inf"), dtype=torch.float64)
    for i in range(t):
        seg[i, i + 1 :] = csum[i, i:]  # triu zeroed the columns before i
    inf = float("inf")
    # best[m][j]: least cost covering steps [0, j) with m segments; back[m][j]: start of the last.
    best = [[inf] * (t + 1) for _ in range(k + 1)]
    back = [[-1] * (t + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for m in range(1, k + 1):
        for j in range(1, t + 1):
            for i in range(m - 1, j):
                if best[m - 1][i] == inf:
                    continue
                v = best[m - 1][i] + float(seg[i, j])
                if v < best[m][j]:
                    best[m][j], back[m][j] = v, i
    keys, j = [], t
    for m in range(k, 0, -1):
        i = back[m][j]
        keys.append(i)
        j = i
    return sorted(keys)


def encoder_feature_changes(ev: Evaluator) -> torch.Tensor:
    """``[T, T]`` relative change between the encoder features of steps ``i`` and ``j`` in an ``all`` run.

    ``cost[i, j] = ||F_j - F_i||^2 / ||F_j||^2`` over all feature tensors of the batch, for
    ``j >= i``; zero elsewhere.
    """
    feats: list[torch.Tensor] = []

    class _Recorder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Any = None) -> Any:
            f = self.inner.encode(sample, timestep, text, added)
            feats.append(torch.cat([x.reshape(-1).float() for x in f.tensors()]))
            return f

    ev._base = None
    ev.run(tuple(range(ev.reference_steps)), runner_wrap=_Recorder)
    x = torch.stack(feats).double()  # [T, F]
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    cost = torch.triu(d2 / sq[None, :].clamp_min(1e-30))
    return cost.float()


@torch.no_grad()
def feature_changes(
    pipe: Any,
    scheduler: str,
    steps: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, list[float]]:
    """The paper's Figure 3 for any model and scheduler: how encoder and decoder features change per step.

    Runs every step as a key step with CFG on the split torch UNet, and records for the
    conditional rows the encoder features (mid + all skips) and the decoder features (the last up
    block's output), at ``height`` x ``width`` (the model's own size by default).

    Returns:
        Per step (``T - 1`` values for the changes): ``enc_mse``, ``dec_mse`` (mean squared change
        from the previous step), ``enc_rel``, ``dec_rel`` (that change relative to the previous
        norm), and ``enc_fnorm``, ``dec_fnorm`` (Frobenius norms per image), averaged over prompts.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from fd_trt.families.models import make_scheduler
    from fd_trt.graphs.split import split_unet

    sd = pipe.sd
    split = split_unet(sd.unet)
    captured: dict[str, torch.Tensor] = {}
    hook = split.decoder_feature_module.register_forward_hook(lambda m, i, o: captured.__setitem__("dec", o))
    dev = next(sd.unet.parameters()).device
    try:
        sched = make_scheduler(scheduler, sd.scheduler.config)
        sched.set_timesteps(steps)
        b = len(prompts)
        f = pipe.vae_scale_factor
        h_img, w_img = image_size(height, width, int(sd.unet.config.sample_size) * f, f)
        cond = pipe.encode_prompt(list(prompts), None, 1, True, h_img, w_img)  # SDXL: with its added conditioning
        text, added = cond.text, cond.added
        shape = (b, int(sd.unet.config.in_channels), h_img // f, w_img // f)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = randn_tensor(shape, generator=gens, dtype=torch.float32).to(dev) * sched.init_noise_sigma
        enc, dec = [], []
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            tt = torch.full((2 * b,), float(t), device=dev)
            feats = split.run_encoder(xin, tt, text, added)
            eps = split.run_decoder(feats, tt, text, added)
            enc.append(torch.cat([f[b:].reshape(b, -1).float() for f in feats.tensors()], 1).cpu())
            dec.append(captured["dec"][b:].reshape(b, -1).float().cpu())
            e_u, e_c = eps.float().chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    finally:
        hook.remove()

    def stats(seq: list[torch.Tensor]) -> tuple[list[float], list[float], list[float]]:
        mse = [float(((seq[i] - seq[i - 1]) ** 2).mean()) for i in range(1, len(seq))]
        rel = [float(((seq[i] - seq[i - 1]).norm(dim=1) / seq[i - 1].norm(dim=1)).mean()) for i in range(1, len(seq))]
        fn = [float(s.norm(dim=1).mean()) for s in seq]
        return mse, rel, fn

    e_mse, e_rel, e_fn = stats(enc)
    d_mse, d_rel, d_fn = stats(dec)
    return {
        "enc_mse": e_mse,
        "dec_mse": d_mse,
        "enc_rel": e_rel,
        "dec_rel": d_rel,
        "enc_fnorm": e_fn,
        "dec_fnorm": d_fn,
    }


def plot_feature_changes(
    fc: dict[str, list[float]], path: str | os.PathLike[str], key_steps: Sequence[int] | None = None, title: str = ""
) -> Path:
    """Plots [`feature_changes()`][fd_trt.tools.calibrate.feature_changes] (MSE, relative change, norms per step) to a PNG, key steps marked.

    Raises:
        InputError: when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib (or '.[bench]')") from None
    import numpy as np

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps = np.arange(1, len(fc["enc_mse"]) + 1)
    ax[0].semilogy(steps, fc["enc_mse"], label="encoder (mid + skips)")
    ax[0].semilogy(steps, fc["dec_mse"], label="decoder (last up block)")
    ax[0].set(title="MSE between adjacent steps", xlabel="step", ylabel="MSE")
    ax[1].plot(steps, fc["enc_rel"], label="encoder")
    ax[1].plot(steps, fc["dec_rel"], label="decoder")
    ax[1].set(title="relative change ||f_t - f_t-1|| / ||f_t-1||", xlabel="step")
    s2 = np.arange(len(fc["enc_fnorm"]))
    ax[2].plot(s2, fc["enc_fnorm"], label="encoder")
    ax[2].plot(s2, fc["dec_fnorm"], label="decoder")
    ax[2].set(title="Frobenius norm", xlabel="step")
    for a in ax:
        for i, k in enumerate(key_steps or ()):
            a.axvline(k, color="gray", lw=0.8, ls=":", label="key steps" if i == 0 else None)
        a.legend()
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def calibrate(
    pipe: Any,
    *,
    scheduler: str,
    steps: int,
    key_steps: int | None = None,
    speedup: float | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seeds: Sequence[int] | None = None,
    guidance: float = 7.5,
    method: str = "greedy",
    progress: Callable[[str], None] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Calibration:
    """Chooses key steps for the pipeline's model, a scheduler and a step count.

    Args:
        pipe: a [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline] (its backend runs the search).
        scheduler: ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``.
        steps: inference steps.
        key_steps: K, the encoder runs wanted.
        speedup: instead of K, a target UNet speedup over ``all``; the largest K whose estimated
            speedup reaches it is used (the estimate depends on K only, not on where the key
            steps lie: every segment costs one encoder call and one decoder call).
        prompts: calibration prompts.
        seeds: one seed per prompt (0, 1, ... by default).
        guidance: CFG scale.
        method: ``greedy``, ``dp`` or ``dp+swap`` (see the module docstring).
        progress: called with a line of text after each stage.
        height, width: the image size to calibrate at (the model's own by default); recorded in
            the calibration's ``image_size``.

    Returns:
        The [`Calibration`][fd_trt.core.calibration.Calibration].

    Raises:
        InputError: for a bad budget or method, or a speedup that even one key step misses.
    """
    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    if (key_steps is None) == (speedup is None):
        raise InputError("give exactly one budget: key_steps=K (encoder runs) or speedup=X (target over 'all')")
    if speedup is not None and (
        isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup > 1.0
    ):
        raise InputError(f"speedup must be a number above 1, got {speedup!r}")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    ev = Evaluator(pipe, scheduler, steps, prompts, seeds, guidance, height, width)
    t_steps = ev.reference_steps
    costs = measure_costs(ev)
    if speedup is not None:
        reach = [k for k in range(1, t_steps + 1) if estimate_speedup(costs, _even(k, t_steps), t_steps) >= speedup]
        if not reach:
            raise InputError(
                f"speedup {speedup}x is out of reach: the estimate from the measured costs is at most "
                f"{estimate_speedup(costs, [0], t_steps):.2f}x (K = 1 key step) for {t_steps} steps; ask for less"
            )
        k = max(reach)
        say(f"speedup {speedup}x: K = {k} key steps (estimated from the measured encoder/decoder costs)")
    else:
        k = key_steps  # type: ignore[assignment]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= t_steps:
        raise InputError(f"key_steps must be an integer in [1, {t_steps}], got {k!r}")
    history: list[dict[str, Any]] = []

    def err(keys: Sequence[int]) -> float:
        e = ev.error(keys)
        history.append({"key_steps": list(keys), "error": e})
        return e

    if method == "greedy":
        keys, e = greedy_search(err, t_steps, k, on_accept=ev.set_base)
        say(f"greedy: {keys} error {e:.4f} ({ev.evaluations} runs)")
        keys, e = swap_refine(err, t_steps, keys, e, on_accept=ev.set_base)
    else:
        keys = segment_dp(encoder_feature_changes(ev), k)
        e = err(keys)
        say(f"dp: {keys} error {e:.4f}")
        if method == "dp+swap":
            keys, e = swap_refine(err, t_steps, keys, e, on_accept=ev.set_base)
    say(f"{method}: {keys} error {e:.4f} ({ev.evaluations} runs)")
    # The model's "paper" key steps (DeepFloyd IF has its own).
    paper = list(parse_schedule(pipe.resolve_schedule("paper", t_steps), t_steps).key_steps)
    ev._base = None
    return Calibration(
        key_steps=list(keys),
        scheduler=scheduler,
        steps=int(steps),
        model_sha256=pipe.unet_sha256,
        error=e,
        method=method,
        prompts=list(prompts),
        seeds=seeds,
        guidance=float(guidance),
        seconds=time.perf_counter() - t0,
        estimated_speedup=estimate_speedup(costs, keys, t_steps),
        paper_error=ev.error(paper),
        evaluations=ev.evaluations,
        steps_run=ev.steps_run,
        history=history[-50:],
        costs=dict(costs),
        image_size=None if height is None and width is None else list(ev.image_size),
    )


def _even(k: int, t: int) -> list[int]:
    return sorted({round(i * t / k) for i in range(k)})


def measure_costs(ev: Evaluator, repeats: int = 3) -> dict[str, float]:
    """Seconds of one encoder call and of decoder calls of 1 and of 10 steps, on the batch's rows."""
    runner = ev.pipe.pool.runner_for(ev.latent_hw, (int(ev.text.shape[1]), int(ev.text.shape[2])))
    rows = int(ev.text.shape[0])
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

    with torch.inference_mode():
        feats = runner.encode(x, t, ev.text, ev.added)
        enc = timed(lambda: runner.encode(x, t, ev.text, ev.added))
        dec1 = timed(lambda: runner.decode(feats, t[:1], ev.text, ev.added))
        dec10 = timed(lambda: runner.decode(feats, t[:1].repeat(10), ev.text, ev.added))
    return {"encoder": enc, "decoder_1": dec1, "decoder_per_step_batched": max(dec10 - dec1, 0.0) / 9}


def estimate_speedup(costs: dict[str, float], keys: Sequence[int], num_steps: int) -> float:
    """UNet-time speedup over ``all`` of these key steps, from [`measure_costs()`][fd_trt.tools.calibrate.measure_costs]' figures.

    A segment of L steps costs one encoder call plus one decoder call of L steps, modelled as
    ``decoder_1 + (L - 1) * decoder_per_step_batched``.
    """
    bounds = list(sorted(keys)) + [num_steps]
    cost_all = num_steps * (costs["encoder"] + costs["decoder_1"])
    cost = sum(
        costs["encoder"] + costs["decoder_1"] + (b - a - 1) * costs["decoder_per_step_batched"]
        for a, b in zip(bounds[:-1], bounds[1:])
    )
    return cost_all / cost if cost > 0 else float("inf")


__all__ = [
    "CALIBRATION_DIR",
    "Calibration",
    "DEFAULT_PROMPTS",
    "Evaluator",
    "METHODS",
    "calibrate",
    "calibration_file",
    "encoder_feature_changes",
    "estimate_speedup",
    "feature_changes",
    "find_calibration",
    "plot_feature_changes",
    "greedy_search",
    "segment_dp",
    "swap_refine",
]
