"""The Faster Diffusion sampling loop (DESIGN.md section 1), independent of any backend.

For each segment: run the encoder once at the key step, decode the segment's steps in one batched
call (or one call per step, or in chunks under a row cap), then apply CFG, noise injection and the
scheduler steps in order, so that multistep solvers keep their state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from fd_trt.core.runner import Runner
from fd_trt.errors import InputError
from fd_trt.core.schedule import KeySchedule, NoiseInjection
from fd_trt.core.features import Added, Features

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
            counts as the executions it made (:attr:`Runner.launches`).
        seconds: wall seconds spent in ``encoder``, ``decoder`` and ``scheduler``.
    """

    encoder_calls: int = 0
    encoder_rows: int = 0
    decoder_calls: int = 0
    decoder_rows: int = 0
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


def model_input_scale(scheduler: Any, timestep: torch.Tensor) -> float:
    """``c_t`` in ``scheduler.scale_model_input(x, t) == c_t * x``: 1 for DDIM, DPM-Solver, PNDM and
    DDPM; ``1 / sqrt(sigma_t^2 + 1)`` for Euler. It maps the scheduler's latents to the
    variance-preserving space the UNet sees.

    Args:
        scheduler: a diffusers scheduler, at the step of ``timestep`` (before its ``step``).
        timestep: the step's timestep.
    """
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


def run_sampler(
    runner: Runner,
    scheduler: Any,
    latents: torch.Tensor,
    text: torch.Tensor,
    schedule: KeySchedule,
    *,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    noise: NoiseInjection = NoiseInjection(),
    parallel: bool = True,
    max_decoder_rows: int | None = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    stats: SamplerStats | None = None,
    progress: bool = True,
    start_step: int = 0,
    initial_noise: torch.Tensor | None = None,
    added: Added = None,
    timesteps: torch.Tensor | None = None,
    extra_channels: torch.Tensor | None = None,
    control: KeyStepControl | None = None,
) -> torch.Tensor:
    """Denoises ``latents`` with encoder propagation.

    Args:
        runner: an active backend runner.
        scheduler: a diffusers scheduler whose ``set_timesteps`` has been called.
        latents: ``[B,C,h,w]`` initial latents x_T (already scaled by ``init_noise_sigma``).
        text: ``[2B,L,D]`` (negative rows first) with CFG, ``[B,L,D]`` without.
        schedule: the key steps, for ``len(scheduler.timesteps)`` steps.
        guidance_scale: CFG weight; CFG is off when it is ``<= 1``.
        guidance_rescale: rescales the guided noise towards the conditional one's standard
            deviation (Lin et al. 2023, diffusers' ``rescale_noise_cfg``); 0 is off.
        noise: the prior noise-injection policy: ``alpha`` times the unit initial noise, added in
            the variance-preserving space (see :func:`model_input_scale`).
        parallel: decode all steps of a segment in one call; ``False`` makes one call per step.
        max_decoder_rows: cap on rows per decoder call; larger segments are decoded in chunks.
        extra_step_kwargs: passed to ``scheduler.step`` (``eta``, ``generator``).
        callback: called after every scheduler step with ``(i, timestep, latents)``; a tensor it
            returns replaces the latents.
        stats: filled in place when given.
        progress: show a progress bar.
        start_step: resume at this key step: ``latents`` and ``scheduler`` are then the state
            before that step of an earlier run (calibration reuses shared prefixes this way).
        initial_noise: the unit initial noise for noise injection, when ``latents`` is not x_T
            (img2img's noised image latents, for example).
        added: SDXL's added conditioning with the rows of ``text`` (``text_embeds``, ``time_ids``);
            ``None`` for SD 1.x/2.x.
        timesteps: the steps to run, a tail of ``scheduler.timesteps`` (img2img runs the last
            ``strength`` of them); ``schedule`` then indexes these, 0 being the first step run.
            All of ``scheduler.timesteps`` by default.
        extra_channels: ``[rows,E,h,w]`` concatenated after the scaled latents along the channels
            at every encoder call (an inpainting UNet's mask and masked-image latents).
        control: called at every key step; the residuals it returns are added to the features
            (see :data:`KeyStepControl`). Its time is counted in ``seconds["controlnet"]``.

    Returns:
        The final latents, float32.
    """
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if schedule.num_steps != len(timesteps):
        raise InputError(
            f"schedule is for {schedule.num_steps} steps but the scheduler has {len(timesteps)} timesteps"
        )
    stats = stats if stats is not None else SamplerStats()
    secs = stats.seconds
    extra = extra_step_kwargs or {}
    cfg = guidance_scale > 1.0
    x = latents.float()
    # The paper injects alpha * x_T with x_T the unit initial noise, in DDIM's variance-preserving
    # latent space. Schedulers that keep latents in sigma space (Euler: x = x0 + sigma * eps, and
    # x_T = init_noise_sigma * eps) map to that space through scale_model_input, x_vp = c_t * x.
    # Adding alpha * eps / c_t in their space is the paper's injection; adding alpha * x_T there
    # would be init_noise_sigma / c_t times too strong (about 14.6x at SD's first Euler step).
    if start_step and start_step not in schedule.key_steps:
        raise InputError(f"start_step={start_step} is not a key step of {list(schedule.key_steps)}: resume at a key step")
    if start_step and initial_noise is None:
        raise InputError("start_step > 0 needs initial_noise, the unit initial noise of the run being resumed")
    eps_T = initial_noise.float() if initial_noise is not None else x / float(scheduler.init_noise_sigma)
    rows = x.shape[0] * (2 if cfg else 1)
    if text.shape[0] != rows:
        raise InputError(f"text has {text.shape[0]} rows, expected {rows} for {x.shape[0]} latents (CFG={cfg})")
    for name, value in (added or {}).items():
        if value.shape[0] != rows:
            raise InputError(f"added conditioning {name!r} has {value.shape[0]} rows, expected {rows}, like the text")
    n_train = int(scheduler.config.num_train_timesteps)
    rescale: Callable[..., torch.Tensor] | None = None
    if cfg and guidance_rescale > 0.0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        rescale = rescale_noise_cfg
    t_dev = timesteps.to(runner.device, torch.float32)
    runner.plan(schedule, rows, parallel, max_decoder_rows)

    def tick() -> float:
        runner.synchronize()
        return time.perf_counter()

    bar = tqdm(total=len(timesteps) - start_step, disable=not progress, desc="denoise", leave=False)
    try:
        for seg in schedule.segments:
            if seg.start < start_step:
                continue
            # 1. Encoder at the key step.
            t0 = tick()
            x_in = torch.cat([x, x]) if cfg else x
            x_in = scheduler.scale_model_input(x_in, timesteps[seg.start])
            unet_in = x_in if extra_channels is None else torch.cat([x_in, extra_channels.to(x_in)], dim=1)
            launched = runner.launches["encoder"]
            feats = runner.encode(unet_in, t_dev[seg.start].expand(rows), text, added)
            t1 = tick()
            secs["encoder"] += t1 - t0
            stats.encoder_calls += runner.launches["encoder"] - launched
            stats.encoder_rows += rows
            if control is not None:
                residuals = control(seg.start, x_in, timesteps[seg.start], text)
                if residuals is not None:
                    feats = add_residuals(feats, *residuals)
                secs["controlnet"] += tick() - t1

            chunk = steps_per_call(len(seg), rows, parallel, max_decoder_rows)
            for c0 in range(seg.start, seg.stop, chunk):
                steps = range(c0, min(c0 + chunk, seg.stop))
                # 2. Decoder for every step of the chunk, in one call.
                t0 = tick()
                launched = runner.launches["decoder"]
                eps_rows = runner.decode(feats, t_dev[steps.start : steps.stop], text, added)
                t1 = tick()
                secs["decoder"] += t1 - t0
                stats.decoder_calls += runner.launches["decoder"] - launched
                stats.decoder_rows += rows * len(steps)
                # 3-4. CFG, noise injection and the scheduler, step by step in order.
                for j, eps in zip(steps, eps_rows.to(x.device).split(rows)):
                    tau = timesteps[j]
                    if cfg:
                        eps_u, eps_c = eps.chunk(2)
                        eps = eps_u + guidance_scale * (eps_c - eps_u)
                        if rescale is not None:
                            eps = rescale(eps, eps_c, guidance_rescale=guidance_rescale)
                    if noise.applies(tau, n_train):
                        x = x + (noise.alpha / model_input_scale(scheduler, tau)) * eps_T
                    x = scheduler.step(eps, tau, x, **extra, return_dict=False)[0]
                    if callback is not None:
                        out = callback(j, tau, x)
                        if out is not None:
                            x = out
                    bar.update(1)
                secs["scheduler"] += tick() - t1
    finally:
        bar.close()
    return x
