"""Image conditioning around the sampler: img2img, inpainting and ControlNet.

Each piece turns diffusers-style arguments (``image``, ``strength``, ``mask_image``,
``controlnet_conditioning_scale``, ...) into what [`fd_trt.core.sampler.run_sampler()`][fd_trt.core.sampler.run_sampler] takes: the
steps to run, the initial latents, extra encoder channels, a step callback, and a key-step
control hook. The arithmetic follows diffusers' ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline`` and ``StableDiffusionControlNetPipeline`` (random draws in the
same order, so that ``schedule="all"`` reproduces them); the loop stays fd_trt's one sampler.

ControlNet under encoder propagation: the ControlNet runs only at key steps, on the key step's
input, and its down / mid residuals are added to the encoder's skips and mid before they are
propagated. The decoder therefore reuses the sums for the whole segment and does not change.
On the graph backends each ControlNet runs as its own graph (a `ControlNetCall` given by
the runner); on the torch backend it is the diffusers module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fd_trt.errors import InputError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# img2img


def img2img_steps(scheduler: Any, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """The timesteps an img2img run covers: the last ``int(strength * steps)`` of the schedule.

    As diffusers' ``get_timesteps``: the scheduler (whose ``set_timesteps`` was called) is told
    where the run begins, so that solvers that count steps start there.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps(num_inference_steps)``.
        num_inference_steps: the call's step count.
        strength: in [0, 1]; 1 runs every step from pure noise.

    Returns:
        ``(timesteps, first)``: the timesteps run and the index of the first in the full schedule.

    Raises:
        InputError: when no step would run.
    """
    run = min(int(num_inference_steps * strength), num_inference_steps)
    first = max(num_inference_steps - run, 0)
    order = int(getattr(scheduler, "order", 1))
    if run < 1:
        raise InputError(
            f"strength={strength} with num_inference_steps={num_inference_steps} runs no step "
            f"(int({num_inference_steps} x {strength}) = 0): raise strength or num_inference_steps"
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * order)
    return scheduler.timesteps[first * order :], first


def _retrieve_latents(vae: Any, image: torch.Tensor, generator: Any) -> torch.Tensor:
    dist = vae.encode(image).latent_dist
    return dist.sample(generator)


def encode_images(vae: Any, images: torch.Tensor, generator: Any) -> torch.Tensor:
    """VAE latents of preprocessed images (``[-1, 1]``), sampled from the posterior, times the scaling factor.

    Args:
        vae: the pipeline's ``AutoencoderKL``.
        images: ``[N,3,H,W]``; a tensor with the latent channel count is taken as latents already.
        generator: one generator, or one per image.
    """
    if images.shape[1] == int(vae.config.latent_channels):
        return images
    images = images.to(next(vae.parameters()).dtype)
    if isinstance(generator, list):
        lat = torch.cat([_retrieve_latents(vae, images[i : i + 1], generator[i]) for i in range(images.shape[0])])
    else:
        lat = _retrieve_latents(vae, images, generator)
    return (float(vae.config.scaling_factor) * lat).float()


def repeat_to_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Tiles ``x`` along axis 0 to ``batch`` rows (one image for all prompts, or one per prompt).

    Raises:
        InputError: when ``batch`` is not a multiple of the rows given.
    """
    n = int(x.shape[0])
    if n == batch:
        return x
    if batch % n != 0:
        raise InputError(f"{n} {what} for {batch} images: give one, or one per prompt (times num_images_per_prompt)")
    return torch.cat([x] * (batch // n))


# ---------------------------------------------------------------------------------------------
# inpainting


@dataclass
class InpaintBlend:
    """The 4-channel inpainting blend of diffusers' ``StableDiffusionInpaintPipeline``.

    After every scheduler step the latents outside the mask are replaced by the image latents
    noised to the next step's level: ``x = (1 - m) * add_noise(z0, noise, t_next) + m * x``.

    Attributes:
        scheduler: the run's scheduler (for ``add_noise``).
        image_latents: ``[B,C,h,w]`` latents of the original image.
        noise: ``[B,C,h,w]`` the run's initial noise.
        mask: ``[B,1,h,w]``, 1 where the image is repainted.
        timesteps: the timesteps of the run.
    """

    scheduler: Any
    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor
    timesteps: torch.Tensor

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keep = self.image_latents
        if i < len(self.timesteps) - 1:
            keep = self.scheduler.add_noise(keep, self.noise, self.timesteps[i + 1 : i + 2])
        return (1 - self.mask) * keep + self.mask * x


# ---------------------------------------------------------------------------------------------
# ControlNet


def controlnet_nets(controlnet: Any) -> list[Any]:
    """The ControlNets of a ``ControlNetModel``, a ``MultiControlNetModel`` or a list of them."""
    if controlnet is None:
        return []
    if isinstance(controlnet, (list, tuple)):
        return [n for c in controlnet for n in controlnet_nets(c)]
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


def _per_net(value: Any, n: int, name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(
                f"{name} has {len(value)} values for {n} ControlNets: give one per ControlNet, or one for all"
            )
        return [float(v) for v in value]
    return [float(value)] * n


#: ``call(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, guess_mode)
#: -> (down residuals, mid residual)``: one ControlNet's forward, as diffusers' ``ControlNetModel``
#: computes it (``return_dict=False``); the graph runners' ControlNet graphs have this signature.
ControlNetCall = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, bool], "tuple[Sequence[torch.Tensor], torch.Tensor]"
]


@dataclass
class KeyStepControlNet:
    """ControlNet(s) run at key steps only, as a `fd_trt.core.sampler.KeyStepControl` hook.

    At a key step each ControlNet whose guidance window covers the step runs on the key step's
    model input with its conditioning scale; the residuals of several ControlNets are summed,
    as diffusers' ``MultiControlNetModel`` does. Outside every window nothing runs and the
    features are left unchanged (zero residuals).

    Attributes:
        nets: the ControlNet models.
        images: per net, the prepared conditioning image with as many rows as the ControlNet sees.
        scales: per net, ``controlnet_conditioning_scale``.
        keep: per step of the run, per net, 1.0 inside the guidance window and 0.0 outside
            (diffusers' ``controlnet_keep``).
        guess_mode: run the ControlNets on the conditional rows only (with CFG), diffusers' way.
        cfg: whether the rows are ``[negative, positive]`` CFG halves.
        calls: ControlNet forward passes so far (one per net that ran).
        runners: per net, the graph backend's `ControlNetCall` that runs it instead of the
            torch module (set by the pipeline for the onnxruntime and tensorrt backends), or
            ``None``: the diffusers modules run.
        resolve_runners: called once, at the first key step (after the runner has planned the
            run, so ``backend="auto"`` has chosen), to set `runners`.
    """

    nets: list[Any]
    images: list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]
    guess_mode: bool = False
    cfg: bool = True
    calls: int = field(default=0)
    runners: list[ControlNetCall] | None = None
    resolve_runners: Callable[[], list[ControlNetCall] | None] | None = None

    @classmethod
    def build(
        cls,
        controlnet: Any,
        images: list[torch.Tensor],
        num_steps: int,
        conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        cfg: bool = True,
    ) -> KeyStepControlNet:
        """Resolves per-net scales and guidance windows over ``num_steps`` steps.

        Args:
            controlnet: a ``ControlNetModel``, a ``MultiControlNetModel`` or a list of them.
            images: per net, the prepared conditioning image ([`prepare_image()`][fd_trt.pipelines.conditioning.KeyStepControlNet.prepare_image]).
            num_steps: steps in the run.
            conditioning_scale: one scale for all nets, or one per net.
            control_guidance_start, control_guidance_end: fractions of the run where each net applies.
            guess_mode: diffusers' guess mode; also on when a net has ``global_pool_conditions``.
            cfg: the run uses classifier-free guidance.

        Raises:
            InputError: for mismatched list lengths or a window outside [0, 1] or reversed.
        """
        nets = controlnet_nets(controlnet)
        n = len(nets)
        if n == 0:
            raise InputError("no ControlNet given")
        if len(images) != n:
            raise InputError(
                f"{len(images)} control images for {n} ControlNets: give one image (or batch) per ControlNet"
            )
        scales = _per_net(conditioning_scale, n, "controlnet_conditioning_scale")
        starts = _per_net(control_guidance_start, n, "control_guidance_start")
        ends = _per_net(control_guidance_end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not (0.0 <= s < e <= 1.0):
                raise InputError(
                    f"control guidance window [{s}, {e}] is not inside [0, 1] with start < end: e.g. start=0.0, end=1.0"
                )
        keep = [
            [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends)]
            for i in range(num_steps)
        ]
        guess = bool(guess_mode) or any(bool(getattr(net.config, "global_pool_conditions", False)) for net in nets)
        return cls(nets, images, scales, keep, guess_mode=guess, cfg=cfg)

    def window_edges(self) -> list[int]:
        """Steps at which some net's guidance window opens or closes: each must be a key step,
        so that a segment never mixes steps with and without a ControlNet's residuals."""
        return [i for i in range(1, len(self.keep)) if self.keep[i] != self.keep[i - 1]]

    @staticmethod
    def prepare_image(
        processor: Any,
        image: Any,
        height: int | None,
        width: int | None,
        batch: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        cfg: bool,
        guess_mode: bool,
    ) -> torch.Tensor:
        """A conditioning image as the ControlNet takes it: resized, in [0, 1], one row per image
        (one image for all, or one per prompt), doubled for CFG unless in guess mode.

        Args:
            processor: a ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``.
            image: a PIL image, array, tensor or a list of them.
            height, width: the output size in pixels; the image's own size when ``None``.
            batch: prompts x images per prompt.
            num_images_per_prompt: images per prompt.
            dtype, device: the ControlNet's.
            cfg, guess_mode: as the run.
        """
        img = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        n, prompts = int(img.shape[0]), batch // num_images_per_prompt
        if n not in (1, prompts):
            raise InputError(
                f"{n} control images for {prompts} prompts: give one image for all prompts, or one per prompt"
            )
        img = img.repeat_interleave(batch if n == 1 else num_images_per_prompt, dim=0)
        img = img.to(device=device, dtype=dtype)
        return torch.cat([img, img]) if cfg and not guess_mode else img

    def __call__(
        self, step: int, model_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        if self.resolve_runners is not None:
            self.runners, self.resolve_runners = self.resolve_runners(), None
        halve = self.guess_mode and self.cfg
        x = model_input.chunk(2)[1] if halve else model_input
        emb = text.chunk(2)[1] if halve else text
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for i, (net, image, scale) in enumerate(zip(self.nets, self.images, self.scales)):
            s = scale * self.keep[step][i]
            if s == 0.0:
                continue  # outside its window (or scale 0) a net adds exactly zero: skip it
            if self.runners is not None:
                d, m = self.runners[i](x, timestep, emb, image, s, self.guess_mode)
            else:
                p = next(net.parameters())
                d, m = net(
                    x.to(p.device, p.dtype),
                    timestep,
                    encoder_hidden_states=emb.to(p.device, p.dtype),
                    controlnet_cond=image,
                    conditioning_scale=s,
                    guess_mode=self.guess_mode,
                    return_dict=False,
                )
            self.calls += 1
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        if down is None or mid is None:
            return None
        if halve:
            # The negative rows get no ControlNet residual (diffusers adds zeros there).
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


def with_key_steps(key_steps: Sequence[int], extra: Sequence[int]) -> list[int]:
    """``key_steps`` plus ``extra`` steps, sorted and unique."""
    return sorted(set(int(k) for k in key_steps) | set(int(k) for k in extra))


__all__ = [
    "ControlNetCall",
    "InpaintBlend",
    "KeyStepControlNet",
    "controlnet_nets",
    "encode_images",
    "img2img_steps",
    "repeat_to_batch",
    "with_key_steps",
]
