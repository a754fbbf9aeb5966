"""The Faster Diffusion sampling loop (docs/design.md section 1), independent of any backend.

For each segment: run the encoder once at the key step, decode the segment's steps in one batched
call (or one call per step, or in chunks under a row cap), then apply CFG, noise injection and the
scheduler steps in order, so that multistep solvers keep their state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fd_trt.core.features import Added, Features
from fd_trt.core.runner import Runner
from fd_trt.core.schedule import DecoderSchedule, KeySchedule, NoiseInjection
from fd_trt.errors import InputError

#: ``callback(step_index, timestep, latents) -> latents or None``; called after every scheduler step.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]

#: ``control(step_index, model_input, timestep, text) -> (down residuals, mid residual) or None``;
#: called at every key step with the scaled latents (``[rows,C,h,w]``, before any extra channels).
#: The residuals are added to the encoder's skips and mid before they are propagated (ControlNet).
KeyStepControl = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[Sequence[torch.Tensor], torch.Tensor] | None"
]


@dataclass
class SamplerStats:
    """Counters and timers of one sampler run.

    Attributes:
        encoder_calls / encoder_rows: encoder graph executions and the rows they processed.
        decoder_calls / decoder_rows: decoder graph executions and the rows they processed. A
            ``decode`` that the runner splits (a TensorRT profile smaller than the segment)
            counts as the executions it made (`Runner.launches`).
        seconds: wall seconds spent in ``encoder``, ``decoder`` and ``scheduler``.
    """

    encoder_calls: int = 0
    encoder_rows: int = 0
    decoder_calls: int = 0
    decoder_rows: int = 0
    #: shallow decoder calls and rows ([`DecoderSchedule`][fd_trt.core.schedule.DecoderSchedule]), not in ``decoder_*``.
    shallow_calls: int = 0
    shallow_rows: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"encoder": 0.0, "controlnet": 0.0, "decoder": 0.0, "scheduler": 0.0}
    )


def steps_per_call(segment_len: int, rows_per_step: int, parallel: bool, max_decoder_rows: int | None) -> int:
    """How many steps of a segment one decoder call covers.

    Args:
        segment_len: steps in the segment.
        rows_per_step: decoder rows per step (2B with CFG, B without).
        parallel: batch the segment's steps; ``False`` decodes one step per call.
        max_decoder_rows: a cap on rows per call, or ``None``.
    """
    if not parallel:
        return 1
    if max_decoder_rows is None:
        return segment_len
    if max_decoder_rows < rows_per_step:
        raise InputError(
            f"max_decoder_rows={max_decoder_rows} is below the {rows_per_step} rows of a single step "
            f"(2 x batch with CFG): raise it to at least {rows_per_step}"
        )
    return max(1, min(segment_len, max_decoder_rows // rows_per_step))


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching one (``FlowMatchEulerDiscreteScheduler``, ...):
    latents ``x_t = (1 - sigma) x0 + sigma * noise`` with ``timestep = sigma * num_train_timesteps``,
    no ``scale_model_input`` and an initial noise of unit scale."""
    return type(scheduler).__name__.startswith("FlowMatch")


def scale_input(scheduler: Any, x: torch.Tensor, timestep: Any) -> torch.Tensor:
    """``scheduler.scale_model_input(x, timestep)``; ``x`` itself for a scheduler without it (flow matching)."""
    if is_flow_matching(scheduler) or not hasattr(scheduler, "scale_model_input"):
        return x
    return scheduler.scale_model_input(x, timestep)


def model_input_scale(scheduler: Any, timestep: torch.Tensor) -> float:
    """``c_t`` that maps the scheduler's latents to the variance-preserving space, ``x_vp = c_t * x``.

    It is ``scheduler.scale_model_input(x, t) == c_t * x`` where the scheduler has it: 1 for DDIM,
    DPM-Solver, PNDM and DDPM; ``1 / sqrt(sigma_t^2 + 1)`` for Euler. For flow matching,
    ``x_t = (1 - sigma) x0 + sigma * eps`` is the variance-preserving ``sqrt(a) x0 + sqrt(1 - a) eps``
    times ``n = sqrt((1 - sigma)^2 + sigma^2)`` (with ``sqrt(a) = (1 - sigma) / n``), so
    ``c_t = 1 / n``, with ``sigma = timestep / num_train_timesteps``.

    Args:
        scheduler: a diffusers scheduler, at the step of ``timestep`` (before its ``step``).
        timestep: the step's timestep.
    """
    if is_flow_matching(scheduler):
        sigma = float(timestep) / float(scheduler.config.num_train_timesteps)
        return 1.0 / ((1.0 - sigma) ** 2 + sigma**2) ** 0.5
    probe = torch.ones(1, dtype=torch.float32)
    return float(scheduler.scale_model_input(probe, timestep).reshape(-1)[0])


def add_residuals(features: Features, down: Sequence[torch.Tensor], mid: torch.Tensor) -> Features:
    """The key step's features plus ControlNet residuals, as diffusers' UNet adds them: one
    residual per skip (``conv_in`` output first) and one for the mid-block output.

    Args:
        features: the encoder's output.
        down: one residual per skip, same shapes.
        mid: the mid-block residual.

    Raises:
        InputError: when the residuals do not match the features.
    """
    if len(down) != len(features.skips):
        raise InputError(
            f"the ControlNet gives {len(down)} down residuals but the UNet has {len(features.skips)} skips: "
            "use a ControlNet made for this UNet (ControlNetModel.from_unet)"
        )
    skips = tuple(s + r.to(s.device, s.dtype) for s, r in zip(features.skips, down))
    return Features(features.mid + mid.to(features.mid.device, features.mid.dtype), skips)


@dataclass(frozen=True)
class SamplerInputs:
    """What every row of the sampler is conditioned on, and the unit noise of the run.

    Attributes:
        text: ``[2B,L,D]`` prompt embeddings (negative rows first) with CFG, ``[B,L,D]`` without.
        added: SDXL's added conditioning with the rows of ``text`` (``text_embeds``, ``time_ids``);
            ``None`` for SD 1.x/2.x.
        extra_channels: ``[rows,E,h,w]`` concatenated after the scaled latents along the channels
            at every encoder call (an inpainting UNet's mask and masked-image latents).
        control: called at every key step; the residuals it returns are added to the features
            (see `KeyStepControl`). Its time is counted in ``seconds["controlnet"]``.
        initial_noise: the unit initial noise for noise injection, when the latents are not x_T
            (img2img's noised image latents, a resumed run); ``latents / init_noise_sigma`` by default.
    """

    text: torch.Tensor
    added: Added = None
    extra_channels: torch.Tensor | None = None
    control: KeyStepControl | None = None
    initial_noise: torch.Tensor | None = None


@dataclass(frozen=True)
class SamplerOptions:
    """How the sampler runs: guidance, noise injection, decoder batching, the steps run.

    Attributes:
        guidance_scale: CFG weight; CFG is off when it is ``<= 1``.
        guidance_rescale: rescales the guided noise towards the conditional one's standard
            deviation (Lin et al. 2023, diffusers' ``rescale_noise_cfg``); 0 is off.
        noise: the prior noise-injection policy: ``alpha`` times the unit initial noise, added in
            the variance-preserving space (see [`model_input_scale()`][fd_trt.core.sampler.model_input_scale]).
        parallel: decode all steps of a segment in one call; ``False`` makes one call per step.
        max_decoder_rows: cap on rows per decoder call; larger segments are decoded in chunks.
        extra_step_kwargs: passed to ``scheduler.step`` (``eta``, ``generator``).
        timesteps: the steps to run, a tail (or head) of ``scheduler.timesteps`` (img2img runs the
            last ``strength`` of them); the schedule then indexes these, 0 being the first step
            run. All of ``scheduler.timesteps`` by default.
        start_step: resume at this key step: the latents and scheduler are then the state before
            that step of an earlier run (calibration reuses shared prefixes this way); needs
            `SamplerInputs.initial_noise`.
        progress: show a progress bar.
        noise_channels: for a UNet that predicts a learned variance after its noise (DeepFloyd
            IF: 3 noise and 3 variance channels), the noise channels. CFG then mixes these only
            and the variance is the conditional rows' (diffusers' ``IFPipeline``); ``None``: CFG
            mixes every channel.
        keep_variance: with ``noise_channels``, whether the scheduler takes the variance too
            (``variance_type="learned_range"``); ``False`` drops it before the scheduler step.
    """

    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    noise: NoiseInjection = field(default_factory=NoiseInjection)
    parallel: bool = True
    max_decoder_rows: int | None = None
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None
    start_step: int = 0
    progress: bool = True
    noise_channels: int | None = None
    keep_variance: bool = True

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


def run_sampler(
    runner: Runner,
    scheduler: Any,
    latents: torch.Tensor,
    inputs: SamplerInputs,
    schedule: KeySchedule,
    options: SamplerOptions | None = None,
    *,
    callback: StepCallback | None = None,
    stats: SamplerStats | None = None,
) -> torch.Tensor:
    """Denoises ``latents`` with encoder propagation.

    Args:
        runner: an active backend runner.
        scheduler: a diffusers scheduler whose ``set_timesteps`` has been called.
        latents: ``[B,C,h,w]`` initial latents x_T (already scaled by ``init_noise_sigma``).
        inputs: the rows' conditioning ([`SamplerInputs`][fd_trt.core.sampler.SamplerInputs]).
        schedule: the key steps, one entry per step run.
        options: guidance, noise injection, batching and the steps run ([`SamplerOptions`][fd_trt.core.sampler.SamplerOptions]).
        callback: called after every scheduler step with ``(i, timestep, latents)``; a tensor it
            returns replaces the latents.
        stats: filled in place when given.

    Returns:
        The final latents, float32.
    """
    opts = options if options is not None else SamplerOptions()
    run = _Run(runner, scheduler, latents, inputs, schedule, opts, stats if stats is not None else SamplerStats())
    x, rows, timesteps = run.x, run.rows, run.timesteps
    runner.plan(schedule, rows, opts.parallel, opts.max_decoder_rows)
    if isinstance(schedule, DecoderSchedule) and schedule.shallow_steps:
        return _run_decoder_schedule(run, schedule, callback)
    bar = tqdm(total=len(timesteps) - opts.start_step, disable=not opts.progress, desc="denoise", leave=False)
    try:
        for seg in schedule.segments:
            if seg.start < opts.start_step:
                continue
            # 1. Encoder at the key step (plus the ControlNet's residuals).
            feats = run.encode(x, seg.start)
            chunk = steps_per_call(len(seg), rows, opts.parallel, opts.max_decoder_rows)
            for c0 in range(seg.start, seg.stop, chunk):
                steps = range(c0, min(c0 + chunk, seg.stop))
                # 2. Decoder for every step of the chunk, in one call.
                eps_rows = run.decode(feats, steps)
                # 3-4. CFG, noise injection and the scheduler, step by step in order.
                for j, eps in zip(steps, eps_rows.to(x.device).split(rows)):
                    x = run.step(j, run.guide(eps), x)
                    if callback is not None:
                        out = callback(j, timesteps[j], x)
                        if out is not None:
                            x = out
                    bar.update(1)
                run.lap("scheduler")
    finally:
        bar.close()
    return x


class _Run:
    """One sampler run's checked inputs, its clock and counters, and its per-step arithmetic."""

    def __init__(
        self,
        runner: Runner,
        scheduler: Any,
        latents: torch.Tensor,
        inputs: SamplerInputs,
        schedule: KeySchedule,
        opts: SamplerOptions,
        stats: SamplerStats,
    ) -> None:
        self.runner, self.scheduler, self.inputs, self.opts, self.stats = runner, scheduler, inputs, opts, stats
        self.timesteps = scheduler.timesteps if opts.timesteps is None else opts.timesteps
        self.x = latents.float()
        self.rows = _check_run(self.x, inputs, schedule, opts, len(self.timesteps))
        # The paper injects alpha * x_T with x_T the unit initial noise, in DDIM's variance-preserving
        # latent space. Schedulers that keep latents in sigma space (Euler: x = x0 + sigma * eps, and
        # x_T = init_noise_sigma * eps) map to that space through scale_model_input, x_vp = c_t * x.
        # Adding alpha * eps / c_t in their space is the paper's injection; adding alpha * x_T there
        # would be init_noise_sigma / c_t times too strong (about 14.6x at SD's first Euler step).
        # Flow matching (x = (1 - sigma) x0 + sigma * eps) is the VP space scaled by
        # sqrt((1 - sigma)^2 + sigma^2): model_input_scale gives c_t for it too.
        noise0 = inputs.initial_noise
        # Flow matching has no init_noise_sigma: it starts from the unit noise itself.
        init_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        self.eps_T = noise0.float() if noise0 is not None else self.x / init_sigma
        self.n_train = int(scheduler.config.num_train_timesteps)
        self.rescale: Callable[..., torch.Tensor] | None = None
        if opts.cfg and opts.guidance_rescale > 0.0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            self.rescale = rescale_noise_cfg
        self.t_dev = self.timesteps.to(runner.device, torch.float32)
        self.t0 = 0.0
        #: the ControlNet's residual for skip_00 at the last key step (DecoderSchedule.fresh_input)
        self.residual_00: torch.Tensor | None = None

    def mark(self) -> None:
        self.runner.synchronize()
        self.t0 = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Adds the seconds since the last mark (or lap) to ``stage``."""
        self.runner.synchronize()
        t = time.perf_counter()
        self.stats.seconds[stage] += t - self.t0
        self.t0 = t

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet's input at step ``i``: CFG rows, ``scale_model_input``, extra channels."""
        x_in = torch.cat([x, x]) if self.opts.cfg else x
        x_in = scale_input(self.scheduler, x_in, self.timesteps[i])
        extra = self.inputs.extra_channels
        return x_in if extra is None else torch.cat([x_in, extra.to(x_in)], dim=1)

    def encode(self, x: torch.Tensor, i: int) -> Features:
        """The encoder's features at key step ``i``, with the ControlNet's residuals added."""
        runner, inputs, stats = self.runner, self.inputs, self.stats
        self.mark()
        x_in = torch.cat([x, x]) if self.opts.cfg else x
        x_in = scale_input(self.scheduler, x_in, self.timesteps[i])
        extra = inputs.extra_channels
        unet_in = x_in if extra is None else torch.cat([x_in, extra.to(x_in)], dim=1)
        launched = runner.launches["encoder"]
        feats = runner.encode(unet_in, self.t_dev[i].expand(self.rows), inputs.text, inputs.added)
        self.lap("encoder")
        stats.encoder_calls += runner.launches["encoder"] - launched
        stats.encoder_rows += self.rows
        if inputs.control is not None:
            residuals = inputs.control(i, x_in, self.timesteps[i], inputs.text)
            if residuals is not None:
                feats = add_residuals(feats, *residuals)
                self.residual_00 = residuals[0][0]
            self.lap("controlnet")
        return feats

    def decode(self, feats: Features, steps: range) -> torch.Tensor:
        """The noise predictions of ``steps``, ``rows`` per step, from one decoder call."""
        self.mark()
        launched = self.runner.launches["decoder"]
        eps_rows = self.runner.decode(feats, self.t_dev[steps.start : steps.stop], self.inputs.text, self.inputs.added)
        self.lap("decoder")
        self.stats.decoder_calls += self.runner.launches["decoder"] - launched
        self.stats.decoder_rows += self.rows * len(steps)
        return eps_rows

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (and its rescale) of one step's rows."""
        c = self.opts.noise_channels
        if not self.opts.cfg:
            return eps if c is None or self.opts.keep_variance else eps[:, :c]
        eps_u, eps_c = eps.chunk(2)
        if c is not None:  # a learned variance: guide the noise, keep the conditional variance
            eps_u, (eps_c, variance) = eps_u[:, :c], eps_c.split([c, eps_c.shape[1] - c], dim=1)
        eps = eps_u + self.opts.guidance_scale * (eps_c - eps_u)
        if self.rescale is not None:
            eps = self.rescale(eps, eps_c, guidance_rescale=self.opts.guidance_rescale)
        if c is not None and self.opts.keep_variance:
            eps = torch.cat([eps, variance], dim=1)
        return eps

    def step(self, j: int, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Noise injection, then the scheduler's step ``j``."""
        tau, noise = self.timesteps[j], self.opts.noise
        if noise.applies(tau, self.n_train):
            x = x + (noise.alpha / model_input_scale(self.scheduler, tau)) * self.eps_T
        return self.scheduler.step(eps, tau, x, **self.opts.extra_step_kwargs, return_dict=False)[0]


def _run_decoder_schedule(run: _Run, schedule: DecoderSchedule, callback: StepCallback | None) -> torch.Tensor:
    """[`run_sampler()`][fd_trt.core.sampler.run_sampler] for a schedule with shallow steps (docs/guides/deepcache-front.md).

    Per segment: the encoder at the key step; the steps that run the whole decoder, batched, each
    also giving the hidden states the shallow steps reuse; then the shallow steps, each reusing
    the hidden state of the last earlier whole-decoder step: batched per depth when they read the
    key step's skips, one at a time from their own latents' ``conv_in`` with ``fresh_input``;
    finally CFG, noise injection and the scheduler, step by step in order.
    """
    runner, opts, stats, rows = run.runner, run.opts, run.stats, run.rows
    x = run.x
    bar = tqdm(total=len(run.timesteps) - opts.start_step, disable=not opts.progress, desc="denoise", leave=False)

    def steps_slice(idx: Sequence[int]) -> torch.Tensor:
        return run.t_dev[torch.tensor(list(idx), dtype=torch.long, device=run.t_dev.device)]

    try:
        for seg in schedule.segments:
            if seg.start < opts.start_step:
                continue
            run.residual_00 = None
            feats = run.encode(x, seg.start)
            full = [j for j in seg.steps if not schedule.depths[j]]
            # Every shallow step reuses the hidden state of the last whole-decoder step before it.
            source = {}
            for j in seg.steps:
                if schedule.depths[j]:
                    source[j] = max(f for f in full if f < j)
            needed: dict[int, set[int]] = {}
            for j, f in source.items():
                needed.setdefault(f, set()).add(schedule.depths[j])
            depths = tuple(sorted({schedule.depths[j] for j in source}))
            eps: dict[int, torch.Tensor] = {}
            hidden: dict[tuple[int, int], torch.Tensor] = {}
            chunk = steps_per_call(len(full), rows, opts.parallel, opts.max_decoder_rows)
            for c0 in range(0, len(full), chunk):
                part = full[c0 : c0 + chunk]
                run.mark()
                launched = runner.launches["decoder"]
                if depths:
                    e, hs = runner.decode_capture(feats, steps_slice(part), run.inputs.text, run.inputs.added, depths)
                else:  # a segment without shallow steps (a key step followed by the next): the plain decoder
                    e, hs = runner.decode(feats, steps_slice(part), run.inputs.text, run.inputs.added), {}
                run.lap("decoder")
                stats.decoder_calls += runner.launches["decoder"] - launched
                stats.decoder_rows += rows * len(part)
                for k, (j, e_j) in enumerate(zip(part, e.split(rows))):
                    eps[j] = e_j
                    for d in needed.get(j, ()):
                        hidden[(j, d)] = hs[d][k * rows : (k + 1) * rows]
            if not schedule.fresh_input:
                # Shallow steps of one depth depend only on cached features: decoded together.
                for d in depths:
                    group = [j for j in source if schedule.depths[j] == d]
                    chunk = steps_per_call(len(group), rows, opts.parallel, opts.max_decoder_rows)
                    for c0 in range(0, len(group), chunk):
                        part = group[c0 : c0 + chunk]
                        h = torch.cat([hidden[(source[j], d)] for j in part])
                        eps.update(zip(part, _shallow(run, h, feats.skips[:d], part, steps_slice).split(rows)))
            for j in seg.steps:
                if j not in eps:  # fresh_input: skip_00 from this step's own latents
                    skip0 = runner.input_conv(run.model_input(x, j))
                    if run.residual_00 is not None:
                        skip0 = skip0 + run.residual_00.to(skip0.device, skip0.dtype)
                    eps[j] = _shallow(run, hidden[(source[j], 1)], (skip0,), [j], steps_slice)
                x = run.step(j, run.guide(eps.pop(j).to(x.device)), x)
                if callback is not None:
                    out = callback(j, run.timesteps[j], x)
                    if out is not None:
                        x = out
                bar.update(1)
            run.lap("scheduler")
    finally:
        bar.close()
    return x


def _shallow(
    run: _Run,
    hidden: torch.Tensor,
    skips: Sequence[torch.Tensor],
    part: Sequence[int],
    steps_slice: Callable[[Sequence[int]], torch.Tensor],
) -> torch.Tensor:
    """One shallow decoder call for the steps ``part``, timed and counted."""
    run.mark()
    eps = run.runner.decode_shallow(hidden, tuple(skips), steps_slice(part), run.inputs.text, run.inputs.added)
    run.lap("decoder")
    run.stats.shallow_calls += 1
    run.stats.shallow_rows += run.rows * len(part)
    return eps


def _check_run(
    x: torch.Tensor, inputs: SamplerInputs, schedule: KeySchedule, opts: SamplerOptions, num_steps: int
) -> int:
    """The rows per step (2B with CFG, B without), once the inputs agree with each other.

    Raises:
        InputError: naming the input that does not fit.
    """
    if schedule.num_steps != num_steps:
        raise InputError(f"schedule is for {schedule.num_steps} steps but the scheduler has {num_steps} timesteps")
    start = opts.start_step
    if start and start not in schedule.key_steps:
        raise InputError(f"start_step={start} is not a key step of {list(schedule.key_steps)}: resume at a key step")
    if start and inputs.initial_noise is None:
        raise InputError("start_step > 0 needs initial_noise, the unit initial noise of the run being resumed")
    rows = x.shape[0] * (2 if opts.cfg else 1)
    if inputs.text.shape[0] != rows:
        raise InputError(
            f"text has {inputs.text.shape[0]} rows, expected {rows} for {x.shape[0]} latents (CFG={opts.cfg})"
        )
    for name, value in (inputs.added or {}).items():
        if value.shape[0] != rows:
            raise InputError(f"added conditioning {name!r} has {value.shape[0]} rows, expected {rows}, like the text")
    return rows
