"""Image inputs of a call: img2img, inpainting and ControlNet conditioning, as a pipeline mixin.

[`ImageInputsMixin`][fd_trt.pipelines.image.ImageInputsMixin] turns a call's diffusers-style image arguments (``image``, ``mask_image``,
``strength``, ``controlnet_conditioning_scale``, ...) into an [`ImageRun`][fd_trt.pipelines.image.ImageRun]: what the sampler
takes besides the prompt (the steps run, the initial latents and unit noise, extra encoder
channels, a blend after each step, the key-step ControlNet hook). The building blocks it uses
(``img2img_steps``, ``InpaintBlend``, ``KeyStepControlNet``, ...) are in
[`fd_trt.pipelines.conditioning`][fd_trt.pipelines.conditioning]. Model families override the parts that differ (SDXL's
strength default, latent images and ``denoising_start``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fd_trt.core.runner import Runner, same_device
from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.base import registered_families
from fd_trt.families.models import check_controlnet_fits, load_controlnet
from fd_trt.pipelines.conditioning import (
    InpaintBlend,
    KeyStepControlNet,
    controlnet_nets,
    encode_images,
    img2img_steps,
    repeat_to_batch,
)


@dataclass
class ImageRun:
    """What an img2img, inpainting or ControlNet call adds to the sampler's arguments."""

    latents: torch.Tensor
    timesteps: torch.Tensor | None = None
    initial_noise: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    blend: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    control: KeyStepControlNet | None = None


class ImageInputsMixin:
    """The image stages of [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline].

    It reads the pipeline's ``sd``, ``device``, ``unet_kind``, ``controlnet``, ``vae_scale_factor``,
    ``build_on_demand`` and ``progress``, and starts text-to-image runs with its ``prepare_latents``.
    """

    sd: Any
    device: torch.device
    unet_kind: str
    controlnet: Any
    build_on_demand: bool
    progress: bool
    vae_scale_factor: int
    #: Per ControlNet (by id): its weights fingerprint and sha256, recomputed when the fingerprint changes.
    _controlnet_digests: dict[int, tuple[tuple[Any, ...], str]]
    prepare_latents: Callable[..., torch.Tensor]

    def image_mode(self, image: Any, mask_image: Any, strength: Any) -> str:
        """What a call does with its images: ``text2img``, ``img2img``, ``inpaint`` or ``controlnet``.

        Raises:
            InputError: for image arguments that do not fit the model (a mask without an image, a
                ControlNet without a conditioning image, an inpainting UNet without a mask).
        """
        if mask_image is not None and image is None:
            raise InputError("mask_image needs image=: the image to inpaint")
        if self.controlnet is not None:
            if image is None:
                raise InputError("this pipeline has a ControlNet: pass its conditioning image as image=")
            if mask_image is not None or strength is not None:
                raise InputError(
                    "with a ControlNet, image= is the conditioning image; ControlNet img2img and inpainting "
                    "(mask_image=, strength=) are not supported yet"
                )
            return "controlnet"
        if self.unet_kind == "inpaint":
            if image is None or mask_image is None:
                raise InputError("this is an inpainting UNet (9 input channels): pass image= and mask_image=")
            return "inpaint"
        if mask_image is not None:
            return "inpaint"
        if image is not None:
            return "img2img"
        if strength is not None:
            raise InputError("strength= needs image=: the image to start from")
        return "text2img"

    @staticmethod
    def resolve_strength(mode: str, strength: Any) -> float:
        """``strength`` checked, or diffusers' default: 0.8 for img2img, 1.0 for inpainting.

        Raises:
            InputError: for a value outside [0, 1].
        """
        if strength is None:
            return 1.0 if mode == "inpaint" else 0.8
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be a number in [0, 1], got {strength!r}")
        return float(strength)

    def _image_size(self, mode: str, image: Any) -> tuple[int, int]:
        """The image size of a call without height/width: the input image's size (rounded down to
        the VAE factor) for img2img and ControlNet, as diffusers does; the model's otherwise."""
        f = self.vae_scale_factor
        size = int(self.sd.unet.config.sample_size) * f
        if mode in ("img2img", "controlnet"):
            first = image[0] if isinstance(image, (list, tuple)) else image
            if isinstance(first, (list, tuple)):  # one list per ControlNet
                first = first[0]
            h, w = self._processor("image").get_default_height_width(first)
            return int(h), int(w)
        return size, size

    def _processor(self, kind: str) -> Any:
        """diffusers' image processors: ``image`` (VAE input), ``mask`` and ``control``."""
        from diffusers.image_processor import VaeImageProcessor

        f = self.vae_scale_factor
        if kind == "image":
            return getattr(self.sd, "image_processor", None) or VaeImageProcessor(vae_scale_factor=f)
        if kind == "mask":
            return VaeImageProcessor(
                vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True
            )
        return VaeImageProcessor(vae_scale_factor=f, do_convert_rgb=True, do_normalize=False)

    def prepare_run(
        self,
        mode: str,
        scheduler: Any,
        num_inference_steps: int,
        batch: int,
        height: int,
        width: int,
        latents: torch.Tensor | None,
        generator: Any,
        cfg: bool,
        num_images_per_prompt: int,
        timesteps: torch.Tensor | None,
        options: dict[str, Any],
    ) -> ImageRun:
        """Stage 2: the latents the run starts from (x_T; img2img: the noised image latents) and what
        the call's images add to the sampler's inputs.

        Args:
            mode: [`image_mode()`][fd_trt.pipelines.image.ImageInputsMixin.image_mode].
            scheduler: the call's scheduler, after ``set_timesteps``.
            num_inference_steps, latents, generator, num_images_per_prompt: the call's.
            batch: prompts x images per prompt.
            height, width: the image size in pixels.
            cfg: classifier-free guidance is on.
            timesteps: the steps run ([`steps_to_run()`][fd_trt.pipelines.image.ImageInputsMixin.steps_to_run]), ``None`` for all.
            options: the call's image options (``image``, ``mask_image``, ``strength``, the ControlNet's).
        """
        if mode == "text2img":
            return ImageRun(self.prepare_latents(batch, height, width, generator, latents, scheduler), timesteps)
        f = self.vae_scale_factor
        latent_shape = (batch, int(self.sd.unet.config.out_channels), height // f, width // f)
        return self.prepare_image_run(
            mode,
            scheduler,
            num_inference_steps,
            latent_shape,
            height,
            width,
            image=options.get("image"),
            mask_image=options.get("mask_image"),
            strength=options.get("strength"),
            latents=latents,
            generator=generator,
            cfg=cfg,
            num_images_per_prompt=num_images_per_prompt,
            controlnet_conditioning_scale=options.get("controlnet_conditioning_scale", 1.0),
            control_guidance_start=options.get("control_guidance_start", 0.0),
            control_guidance_end=options.get("control_guidance_end", 1.0),
            guess_mode=bool(options.get("guess_mode", False)),
            timesteps=timesteps,
            options=options,
        )

    def prepare_image_run(
        self,
        mode: str,
        scheduler: Any,
        num_inference_steps: int,
        latent_shape: tuple[int, int, int, int],
        height: int,
        width: int,
        *,
        image: Any,
        mask_image: Any,
        strength: float | None,
        latents: torch.Tensor | None,
        generator: Any,
        cfg: bool,
        num_images_per_prompt: int,
        controlnet_conditioning_scale: float | Sequence[float],
        control_guidance_start: float | Sequence[float],
        control_guidance_end: float | Sequence[float],
        guess_mode: bool,
        timesteps: torch.Tensor | None = None,
        options: dict[str, Any] | None = None,
    ) -> ImageRun:
        """The sampler's inputs for img2img, inpainting and ControlNet calls.

        The random draws come in diffusers' order (image latents, noise, masked-image latents), so
        that the same generator gives the same run as diffusers' own pipelines.

        Args:
            mode: [`image_mode()`][fd_trt.pipelines.image.ImageInputsMixin.image_mode].
            scheduler: the call's scheduler, after ``set_timesteps``.
            num_inference_steps: the call's step count (img2img runs the last ``strength`` of them).
            latent_shape: ``[B,C,h,w]`` of the latents.
            height, width: the image size in pixels.
            image, mask_image, strength, latents, generator, num_images_per_prompt,
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode:
                the call's, as in diffusers. ``latents`` given to img2img are its noise.
            cfg: classifier-free guidance is on.
            timesteps: the steps run ([`steps_to_run()`][fd_trt.pipelines.image.ImageInputsMixin.steps_to_run]); img2img's tail when omitted.
            options: all of the call's image options (model families read their own).

        Returns:
            The initial latents and, as the mode needs, the timesteps run, the unit noise, the
            extra encoder channels, the blend after each step and the ControlNet hook.
        """
        dev, batch = self.device, latent_shape[0]
        sigma = float(scheduler.init_noise_sigma)

        if mode == "controlnet":
            control = self.controlnet_hook(
                image,
                height,
                width,
                batch,
                num_images_per_prompt,
                cfg,
                len(scheduler.timesteps),
                controlnet_conditioning_scale,
                control_guidance_start,
                control_guidance_end,
                guess_mode,
            )
            return ImageRun(latents=self._noise(latent_shape, latents, generator) * sigma, control=control)

        strength = self.resolve_strength(mode, strength)
        if timesteps is None:
            timesteps, _ = img2img_steps(scheduler, num_inference_steps, strength)
        t_first = timesteps[:1].repeat(batch)
        vae = self.sd.vae
        init = self._processor("image").preprocess(image, height=height, width=width).to(dev, torch.float32)
        if init.shape[-2:] != (height, width):
            raise InputError(f"image preprocessed to {tuple(init.shape[-2:])}, expected {(height, width)}")

        if mode == "img2img":
            if isinstance(generator, list):
                init = repeat_to_batch(init, batch, "images")
            z0 = repeat_to_batch(encode_images(vae, init, generator), batch, "images")
            noise = self._noise(tuple(z0.shape), latents, generator)
            return ImageRun(latents=scheduler.add_noise(z0, noise, t_first), timesteps=timesteps, initial_noise=noise)

        return self._inpaint_run(
            scheduler, init, mask_image, latents, generator, latent_shape, strength, timesteps, cfg
        )

    def _inpaint_run(
        self,
        scheduler: Any,
        init: torch.Tensor,
        mask_image: Any,
        latents: torch.Tensor | None,
        generator: Any,
        latent_shape: tuple[int, int, int, int],
        strength: float,
        timesteps: torch.Tensor,
        cfg: bool,
    ) -> ImageRun:
        """Inpainting's start (``init`` is the preprocessed image), as diffusers' inpainting pipeline."""
        dev, batch, vae = self.device, latent_shape[0], self.sd.vae
        sigma = float(scheduler.init_noise_sigma)
        height, width = int(init.shape[-2]), int(init.shape[-1])
        t_first = timesteps[:1].repeat(batch)
        # Inpainting: the 9-channel UNet sees the mask and the masked image's latents; a 4-channel
        # UNet gets diffusers' blend, which keeps the unmasked image noised to each step's level.
        blend_mode = self.unet_kind != "inpaint"
        full = float(strength) == 1.0
        z0 = None
        if blend_mode or (latents is None and not full):
            z0 = encode_images(vae, init, generator)
            z0 = repeat_to_batch(z0, batch, "images")
        if latents is None:
            noise = self._noise(latent_shape, latents, generator)
            x = noise * sigma if full else scheduler.add_noise(z0, noise, t_first)
        else:  # as diffusers: given latents are the noise, and the run starts from them
            noise = latents.to(dev, torch.float32)
            x = noise * sigma
        mask_cond = self._processor("mask").preprocess(mask_image, height=height, width=width).to(dev, torch.float32)
        masked = init * (mask_cond < 0.5)
        mask = torch.nn.functional.interpolate(mask_cond, size=tuple(latent_shape[2:]))
        masked_latents = encode_images(vae, masked, generator)
        mask = repeat_to_batch(mask, batch, "masks")
        masked_latents = repeat_to_batch(masked_latents, batch, "images")
        run = ImageRun(latents=x, timesteps=timesteps, initial_noise=noise)
        if blend_mode:
            run.blend = InpaintBlend(scheduler, z0, noise, mask, timesteps)
        else:
            extra = torch.cat([mask, masked_latents], dim=1)
            run.extra_channels = torch.cat([extra, extra]) if cfg else extra
        return run

    def _noise(self, shape: tuple[int, ...], latents: torch.Tensor | None, generator: Any) -> torch.Tensor:
        """The run's unit noise: the call's ``latents`` (checked against ``shape``), or drawn from ``generator``."""
        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise InputError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
            return latents.to(self.device, torch.float32)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def controlnet_hook(
        self,
        image: Any,
        height: int,
        width: int,
        batch: int,
        num_images_per_prompt: int,
        cfg: bool,
        num_steps: int,
        conditioning_scale: float | Sequence[float],
        guidance_start: float | Sequence[float],
        guidance_end: float | Sequence[float],
        guess_mode: bool,
    ) -> KeyStepControlNet:
        """The key-step ControlNet hook of a call: the conditioning image(s) prepared per ControlNet
        (one image for all, or one per ControlNet), scales and guidance windows over ``num_steps``."""
        nets = controlnet_nets(self.controlnet)
        per_net = isinstance(image, (list, tuple)) and len(nets) > 1 and len(image) == len(nets)
        images = list(image) if per_net else [image] * len(nets)
        guess = bool(guess_mode) or any(bool(getattr(n.config, "global_pool_conditions", False)) for n in nets)
        proc = self._processor("control")
        prepared = [
            KeyStepControlNet.prepare_image(
                proc,
                img,
                height,
                width,
                batch,
                num_images_per_prompt,
                next(net.parameters()).dtype,
                self.device,
                cfg,
                guess,
            )
            for img, net in zip(images, nets)
        ]
        return KeyStepControlNet.build(
            self.controlnet,
            prepared,
            num_steps,
            conditioning_scale,
            guidance_start,
            guidance_end,
            guess_mode=guess,
            cfg=cfg,
        )

    def steps_to_run(
        self, scheduler: Any, num_inference_steps: int, mode: str, strength: Any, options: dict[str, Any]
    ) -> torch.Tensor | None:
        """The timesteps a call runs, when not all of ``scheduler.timesteps``: img2img and
        inpainting run the last ``int(strength x steps)`` ([`img2img_steps()`][fd_trt.pipelines.conditioning.img2img_steps], which also tells
        the scheduler where the run begins). ``None`` runs them all.

        Raises:
            InputError: for a bad ``strength``, or one that runs no step.
        """
        if mode in ("img2img", "inpaint"):
            return img2img_steps(scheduler, num_inference_steps, self.resolve_strength(mode, strength))[0]
        return None

    def default_size(
        self, height: int | None, width: int | None, mode: str = "text2img", image: Any = None
    ) -> tuple[int, int]:
        """The image size of a call: the given one, else the input image's for img2img and
        ControlNet (as diffusers), else the UNet's default sample size."""
        if height is not None and width is not None:
            return height, width
        dh, dw = self._image_size(mode, image)
        return (height if height is not None else dh, width if width is not None else dw)

    def controlnet_sha256(self, net: Any) -> str:
        """sha256 of a ControlNet's weights ([`fd_trt.graphs.weights.unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256]), cached
        until its weights fingerprint changes."""
        from fd_trt.graphs.weights import unet_weights_sha256, weights_fingerprint

        fp = weights_fingerprint(net)
        known = self._controlnet_digests.get(id(net))
        if known is None or known[0] != fp:
            known = self._controlnet_digests[id(net)] = (fp, unet_weights_sha256(net))
        return known[1]

    def _controlnet_calls(self, runner: Runner) -> list[Any] | None:
        """The ControlNet graphs on ``runner`` (the one ``auto`` chose), one per ControlNet, or
        ``None`` when it runs no graphs (torch): the ControlNets then run as torch modules.

        Each graph is exported into the runner's engine directory on first use when
        ``build_on_demand`` is on, and checked against the ControlNet's weights otherwise.

        Raises:
            EngineMismatchError: with ``build_on_demand`` off, for a missing or stale graph.
            UnsupportedModelError: for a ControlNet the graph cannot carry.
        """
        from fd_trt.graphs.build import build_controlnet_graph
        from fd_trt.graphs.manifest import check_controlnet_graph

        target = getattr(runner, "current_runner", runner) or runner
        folder = getattr(target, "engine_dir", None)
        if folder is None or type(target).controlnet is Runner.controlnet:
            return None
        calls = []
        for net in controlnet_nets(self.controlnet):
            sha = self.controlnet_sha256(net)
            if self.build_on_demand:
                rec = build_controlnet_graph(net, folder, controlnet_sha256=sha, progress=self.progress)
            else:
                rec = check_controlnet_graph(folder, net, controlnet_sha256=sha)
            calls.append(target.controlnet(rec))
        return calls

    def _attach_controlnet(self, controlnet: Any, owns_pipeline: bool) -> None:
        """Sets ``self.controlnet``: ``controlnet`` (a module, a folder or a list), else the wrapped
        pipeline's own; checks that it fits the model and sits on the pipeline's device (moved
        there when the pipeline owns it).

        Raises:
            UnsupportedModelError: for a family or UNet that runs no ControlNet yet.
            InputError: for a ControlNet that does not fit the UNet or sits on another device.
        """
        #: The ControlNet(s) run at key steps, or ``None``.
        self.controlnet: Any = (
            load_controlnet(controlnet) if controlnet is not None else getattr(self.sd, "controlnet", None)
        )
        if self.controlnet is not None:
            if not self.supports_controlnet:
                able = ", ".join(f.name for f in registered_families() if f.supports_controlnet) or "none so far"
                raise UnsupportedModelError(
                    f"{type(self).__name__} does not run a ControlNet yet with a {self.family.name!r} model: drop "
                    f"controlnet=, or use a model of a family that does ({able})"
                )
            if self.unet_kind != "text2img":
                raise UnsupportedModelError(
                    "ControlNet with an inpainting UNet is not supported yet: use a text-to-image UNet with the ControlNet"
                )
            for net in controlnet_nets(self.controlnet):
                check_controlnet_fits(net, self.sd.unet.config)
                here_cn = next(net.parameters()).device
                if owns_pipeline:
                    net.to(self.device)
                elif not same_device(here_cn, self.device):
                    raise InputError(
                        f"the ControlNet is on {here_cn} but the pipeline runs on {self.device}: move it first"
                    )


__all__ = ["ImageInputsMixin", "ImageRun"]
