"""Construction of a pipeline from a model folder or a diffusers pipeline.

[`LoadingMixin.from_pretrained()`][fd_trt.pipelines.loading.LoadingMixin.from_pretrained] and [`LoadingMixin.from_diffusers()`][fd_trt.pipelines.loading.LoadingMixin.from_diffusers] pick the model's
family ([`fd_trt.families`][fd_trt.families]) and the class registered to serve it
([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]), as diffusers' ``DiffusionPipeline.from_pretrained`` picks a
pipeline class from a model folder.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from fd_trt.core.runner import Runner
from fd_trt.families.base import family_for_pipeline
from fd_trt.families.models import load_diffusers_pipeline
from fd_trt.pipelines.registry import pipeline_class_for

if TYPE_CHECKING:  # pragma: no cover
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline


class LoadingMixin:
    """``from_pretrained`` and ``from_diffusers`` for [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline]."""

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = "default",
        backend: str | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        scheduler: str | None = None,
        progress: bool = True,
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> FasterDiffusionPipeline:
        """Loads a local diffusers folder of a registered model family, or a shipped model by name.

        The folder's ``unet/config.json`` picks its family ([`fd_trt.families.base.family_for_config()`][fd_trt.families.base.family_for_config])
        and is checked by it before any weights load: a UNet no family recognises, or one its
        family refuses, raises [`UnsupportedModelError`][fd_trt.errors.UnsupportedModelError] at once. The result
        is the class registered for the family ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]) when called on
        this class: a [`FasterDiffusionXLPipeline`][fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline] for an SDXL folder
        (``addition_embed_type="text_time"``).

        Args:
            model: a local folder, ``"default"`` (the shipped model) or ``"default-dit"`` (the
                shipped diffusion transformer, a PixArt-shaped ``PixArtAlphaPipeline``).
            backend: ``"auto"`` (default), ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``. ``auto``
                measures the available backends and decoder call sizes on the first call at each
                shape, batch and schedule, caches the choice, and never builds graphs by surprise.
            device: ``"cpu"`` or ``"cuda"``; CUDA when available by default.
            precision: ``fp32``, ``fp16`` or ``bf16`` (torch); ``fp32`` or ``fp16`` (graphs);
                ``auto`` with ``backend="auto"`` (bf16 may compete). Default: ``fp16`` for
                ``tensorrt`` and on CUDA, ``fp32`` otherwise.
            scheduler: ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``; the folder's own when omitted.
            progress: show progress bars.
            engines: a built engine directory (``fd-trt build``) for graph backends. Without one,
                graphs are built on first use into ``$FD_TRT_CACHE`` (``~/.cache/fd_trt/engines``),
                keyed by the UNet weights' hash and the shapes, and reused afterwards.
            runner_options: extra keyword arguments for the runner (e.g. ``intra_op_threads``).
            **kwargs: ``max_cached_runners``, ``build_on_demand``, ``controlnet`` (see the class;
                here ``controlnet`` may also be a local ControlNet folder or a list of folders).
        """
        sd, source = load_diffusers_pipeline(model)
        pipe = cls._class_for(sd)(
            sd,
            backend=backend,
            device=device,
            precision=precision,
            progress=progress,
            source=source,
            engines=engines,
            runner_options=runner_options,
            owns_pipeline=True,
            **kwargs,
        )
        from fd_trt.families.models import model_folder

        pipe.model_dir = model_folder(model)
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe

    @classmethod
    def from_diffusers(
        cls,
        sd_pipeline: Any,
        backend: str | Runner | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        progress: bool = True,
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> FasterDiffusionPipeline:
        """Wraps an existing diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
        pipeline of another registered model family, sharing its components. Called on this class,
        it returns the class registered for the model's family ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]):
        a [`FasterDiffusionXLPipeline`][fd_trt.pipelines.sdxl.FasterDiffusionXLPipeline] for SDXL.

        The img2img, inpainting and ControlNet pipelines of Stable Diffusion wrap the same way; a
        ``StableDiffusionControlNetPipeline``'s ControlNet is taken along and run at key steps.

        The wrapped pipeline is neither moved nor cast: ``device`` defaults to where it is, and a
        runner that needs another dtype or device works on its own copy of the UNet. Weight changes
        made to it later (``fuse_lora``, ``set_adapters``, ``load_state_dict``) are followed.

        Args: as [`from_pretrained()`][fd_trt.pipelines.loading.LoadingMixin.from_pretrained], with ``sd_pipeline`` in place of ``model``.
        """
        return cls._class_for(sd_pipeline)(
            sd_pipeline,
            backend=backend,
            device=device,
            precision=precision,
            progress=progress,
            engines=engines,
            runner_options=runner_options,
            **kwargs,
        )

    @classmethod
    def _class_for(cls, sd_pipeline: Any) -> type[FasterDiffusionPipeline]:
        """The class that serves a diffusers pipeline: its family's registered class
        ([`fd_trt.pipelines.registry`][fd_trt.pipelines.registry]) where that specialises ``cls`` (SDXL's, called on the
        base class), else ``cls`` (whose construction then refuses a model it cannot serve)."""
        served = pipeline_class_for(family_for_pipeline(sd_pipeline).name)
        if served is not None and issubclass(served, cls):
            return served
        return cls
