"""Faster Diffusion on diffusion transformers: DiT (``DiTPipeline``), PixArt-alpha/sigma
(``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``) and SD3 (``StableDiffusion3Pipeline``, flow
matching); docs/guides/dit.md.

[`FasterDiffusionTransformerPipeline`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline] is what ``FasterDiffusionPipeline.from_diffusers`` (and
``from_pretrained`` of a folder with ``transformer/config.json``) returns for these pipelines. It
splits the transformer at block ``N`` ([`fd_trt.graphs.split_dit`][fd_trt.graphs.split_dit]), runs the encoder (embedding
+ blocks ``0..N-1``) at key steps and the decoder (blocks ``N..`` + output) for all the steps of a
segment in one call, with [`fd_trt.core.sampler.run_sampler()`][fd_trt.core.sampler.run_sampler] (the UNet pipelines' loop).
It also serves the ``transformer-unsupported`` family, to refuse Flux and the others clearly.

Backends: ``torch`` (default), ``onnxruntime`` (graphs exported on first use into the engine
directory, [`fd_trt.graphs.export_dit`][fd_trt.graphs.export_dit]), ``tensorrt`` (plans of those graphs built on first use,
[`fd_trt.backends.tensorrt_dit`][fd_trt.backends.tensorrt_dit]), ``auto`` (times one key step and segment on torch and
onnxruntime on the first call at a shape and keeps the faster), or a ready runner.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fd_trt.backends import tensorrt as trt_backend
from fd_trt.backends.tensorrt_build import RowProfile
from fd_trt.backends.tensorrt_dit import TrtTransformerRunner
from fd_trt.backends.transformer import OrtTransformerRunner, TorchTransformerRunner
from fd_trt.core.calibration import Calibration
from fd_trt.core.runner import Runner
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, SamplerStats, run_sampler
from fd_trt.core.schedule import KeySchedule, NoiseInjection, ScheduleSpec, parse_schedule
from fd_trt.errors import InputError
from fd_trt.families.base import PromptEmbeddings, family_for_pipeline
from fd_trt.families.transformer import TransformerFamily
from fd_trt.graphs.export_dit import TransformerManifest, export_transformer, graph_problem, read_manifest
from fd_trt.graphs.split_dit import SplitTransformer, check_split_point
from fd_trt.graphs.weights import unet_weights_sha256
from fd_trt.pipelines.pipeline import FasterDiffusionOutput, FasterDiffusionPipeline, PipelineStats
from fd_trt.pipelines.pipeline import scheduler_step_kwargs as _step_kwargs
from fd_trt.utils.cache import engine_cache_root

logger = logging.getLogger(__name__)

#: The backends a transformer pipeline runs on.
TRANSFORMER_BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")

#: The ``runner_options`` of the tensorrt backend: the plans' profile and the runner's switches.
_TRT_OPTIONS = ("max_rows", "max_segment_steps", "opt_segment_steps", "cuda_graphs", "build")

#: The precisions of the torch backend.
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GraphExport(NamedTuple):
    """What [`FasterDiffusionTransformerPipeline.export_graphs()`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline.export_graphs] did."""

    #: The engine directory.
    folder: Path
    #: Its manifest (with each graph's size and sha256).
    manifest: TransformerManifest
    #: Whether the graphs were exported now (``False``: the folder was up to date).
    exported: bool


class FasterDiffusionTransformerPipeline(FasterDiffusionPipeline):
    """A diffusers DiT, PixArt or SD3 pipeline with encoder propagation over transformer blocks.

    Args:
        sd_pipeline: a ``DiTPipeline``, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline`` or
            ``StableDiffusion3Pipeline`` (its components are used, not copied).
        backend: ``"torch"`` (default), ``"onnxruntime"``, ``"tensorrt"``, ``"auto"`` or a ready runner.
        device: ``"cpu"`` or ``"cuda"`` (torch backend; tensorrt runs on ``"cuda"``); where the
            transformer is by default. The
            wrapped pipeline is not moved: the text encoders and VAE run where they are, and a
            transformer on another device or dtype than the run's is copied once for the runner.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (torch backend; the graph backends run
            fp32); fp16 on CUDA and fp32 on the CPU by default.
        progress: show progress bars.
        source: where the model came from, for messages.
        engines: the engine directory of the onnxruntime graphs and TensorRT plans;
            ``$FD_TRT_CACHE/transformer/...`` keyed by family, weights, ``N`` and shapes by default.
        runner_options: ``intra_op_threads`` for onnxruntime; for tensorrt ``max_rows`` (key-step
            rows per plan call, default 2), ``max_segment_steps`` (steps per decoder call, default
            4), ``opt_segment_steps`` (default 1), ``cuda_graphs`` and ``build`` (default ``True``:
            build missing or stale plans; ``False`` refuses them).
        split: the split point ``N`` (blocks run by the encoder); the family's default when omitted.
        owns_pipeline: accepted for ``from_pretrained``; the pipeline is not moved either way.
        **kwargs: the UNet pipelines' other options (``controlnet``, ...) are refused.
    """

    def __init__(
        self,
        sd_pipeline: Any,
        backend: str | Runner | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        progress: bool = True,
        source: str = "diffusers pipeline",
        engines: str | os.PathLike[str] | None = None,
        runner_options: dict[str, Any] | None = None,
        split: int | None = None,
        owns_pipeline: bool = False,
        **kwargs: Any,
    ) -> None:
        self.sd = sd_pipeline
        self.family = family_for_pipeline(sd_pipeline)
        self.family.check_pipeline(sd_pipeline)  # the refusal family raises here
        if not isinstance(self.family, TransformerFamily):
            raise InputError(
                f"{type(sd_pipeline).__name__} is a {self.family.name!r} model: wrap it with "
                "FasterDiffusionPipeline.from_diffusers(pipe)"
            )
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("max_cached_runners",))
        if unknown:
            raise InputError(f"{', '.join(unknown)} not supported with diffusion transformers ({self.family.name})")
        self.unet_kind = "text2img"
        self.source = source
        self.progress = progress
        tr = sd_pipeline.transformer
        self.engines = Path(engines) if engines is not None else None
        self.runner_options = dict(runner_options or {})
        self.model_dir: Path | None = None
        self._fixed_runner = backend if isinstance(backend, Runner) else None
        name = backend.name if isinstance(backend, Runner) else (backend or "torch")
        if name not in TRANSFORMER_BACKENDS and self._fixed_runner is None:
            raise InputError(f"unknown backend {name!r} for a diffusion transformer: choose {TRANSFORMER_BACKENDS}")
        self.backend = name
        if (
            name == "tensorrt" and self._fixed_runner is None
        ):  # raises without TensorRT or a CUDA GPU, naming the install
            trt_backend.require_tensorrt()
            self.device = trt_backend.require_cuda(device if device is not None else "cuda")
        else:
            self.device = torch.device(device) if device is not None else next(tr.parameters()).device
        if self.device.type not in ("cpu", "cuda"):
            raise InputError(f"device={device!r}: the transformer pipelines run on 'cpu' or 'cuda'")
        if self.device.type == "cuda" and self.backend != "tensorrt":
            if name != "torch":
                raise InputError(
                    f"backend {name!r} runs the transformer on the CPU: pass backend='torch' for device='cuda'"
                )
            if not torch.cuda.is_available():
                raise InputError(f"device={device!r} but torch sees no CUDA GPU: pass device='cpu'")
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" and name == "torch" else "fp32"
        if precision not in _DTYPES:
            raise InputError(f"precision={precision!r}: choose one of {', '.join(_DTYPES)}")
        if precision != "fp32" and name != "torch":
            raise InputError(f"precision={precision!r} needs backend='torch'; the {name} backend runs fp32")
        self.precision = precision
        #: The transformer the torch runners run: the pipeline's own, or a copy on the run's device and dtype.
        self._run_transformer: Any = None
        #: The split point ``N``: the encoder runs the embedding and blocks ``0..N-1``.
        self.split_point = self.family.default_split(tr) if split is None else check_split_point(tr, split)
        self._runners: dict[tuple[Any, ...], Runner] = {}
        self._auto_choice: dict[tuple[Any, ...], str] = {}
        self._sha: str | None = None

    # construction helpers ------------------------------------------------------------------------
    @property
    def transformer(self) -> Any:
        return self.sd.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.sd.vae.config.block_out_channels) - 1)

    @property
    def runner(self) -> Runner | None:
        """The runner of the latest call's backend, ``None`` before the first call."""
        return self._fixed_runner or next(reversed(self._runners.values()), None)

    @property
    def unet_sha256(self) -> str:
        """sha256 of the transformer's weights (the name is the UNet pipelines')."""
        if self._sha is None:
            self._sha = unet_weights_sha256(self.transformer)
        return self._sha

    def close(self) -> None:
        for r in self._runners.values():
            r.deactivate()
        self._runners.clear()

    def set_scheduler(self, name: str) -> None:
        from fd_trt.families.models import make_scheduler

        self.sd.scheduler = make_scheduler(name, self.sd.scheduler.config)

    def run_transformer(self) -> Any:
        """The transformer on the run's device and dtype: the pipeline's own when it is there
        already, else a copy made once (the wrapped pipeline is neither moved nor cast; weight
        changes made to it later do not reach the copy)."""
        tr = self.transformer
        dtype = _DTYPES[self.precision]
        p = next(tr.parameters())
        here = p.device.type == self.device.type and self.device.index in (None, p.device.index)
        if here and p.dtype == dtype:
            return tr
        if self._run_transformer is None:
            self._run_transformer = copy.deepcopy(tr).to(self.device, dtype).eval()
        return self._run_transformer

    def split_for(self, n: int, latent_hw: tuple[int, int]) -> SplitTransformer:
        return self.family.split(self.transformer, n, latent_hw)

    def engine_dir(self, n: int, latent_hw: tuple[int, int], text_shape: tuple[int, int] | None) -> Path:
        """The onnxruntime graphs' folder for ``N`` and the shapes."""
        if self.engines is not None:
            return self.engines
        if self._sha is None:
            self._sha = unet_weights_sha256(self.transformer)
        text = "x".join(map(str, text_shape)) if text_shape else "labels"
        name = f"{self.family.name}-{self._sha[:16]}-n{n}-{latent_hw[0]}x{latent_hw[1]}-{text}"
        return engine_cache_root() / "transformer" / name

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """A call's ``(height, width)``: the model's own by default, checked against the VAE factor and
        the patch size (and DiT's square images).

        Raises:
            InputError: for a size the transformer cannot take.
        """
        tr = self.transformer
        f = self.vae_scale_factor
        height = int(height or tr.config.sample_size * f)
        width = int(width or tr.config.sample_size * f)
        patch = int(tr.config.patch_size)
        if height <= 0 or width <= 0 or height % (f * patch) or width % (f * patch):
            raise InputError(f"height and width must be positive multiples of {f * patch}, got {height}x{width}")
        if self.family.name == "dit" and height != width:
            raise InputError(f"DiT draws square images: got {height}x{width}")
        return height, width

    def graph_text_shape(
        self, height: int | None = None, width: int | None = None, **family_options: Any
    ) -> tuple[int, int] | None:
        """The ``(L, Dt)`` text the graphs of a call with these options take (PixArt's and SD3's
        ``max_sequence_length`` set ``L``), read from one row encoded as a call encodes it; ``None``
        for DiT's class labels."""
        height, width = self.image_size(height, width)
        probe: Any = "" if self.family.takes_prompts else [0]
        cond = self.family.conditioning(self.sd, probe, None, 1, False, height=height, width=width, **family_options)
        text = cond.text
        return (int(text.shape[1]), int(text.shape[2])) if text.ndim == 3 else None

    def export_graphs(
        self,
        height: int | None = None,
        width: int | None = None,
        split: int | None = None,
        force: bool = False,
        **family_options: Any,
    ) -> GraphExport:
        """Exports the two graphs a call at this size, ``N`` and text shape runs on (ahead of time:
        ``fd-trt build``), into the folder such a call uses, or checks and reuses what is there.

        Args:
            height, width: the image size; the model's by default.
            split: ``N``; the pipeline's by default.
            force: export again even when the folder holds these graphs.
            **family_options: PixArt's and SD3's ``max_sequence_length``.

        Returns:
            The engine directory, its manifest and whether the graphs were exported now.

        Raises:
            InputError: for a size or ``N`` the transformer cannot take.
            EngineMismatchError: when the folder holds graphs for other settings (without ``force``).
        """
        height, width = self.image_size(height, width)
        n = self.split_point if split is None else check_split_point(self.transformer, split)
        f = self.vae_scale_factor
        latent_hw = (height // f, width // f)
        text_shape = self.graph_text_shape(height, width, **family_options)
        folder = self.engine_dir(n, latent_hw, text_shape)
        have = None if force else read_manifest(folder)
        fresh = have is not None and graph_problem(folder, have) is None
        split_tr = self.split_for(n, latent_hw)
        m = export_transformer(folder, self.family.name, self.transformer, split_tr, latent_hw, text_shape, force)
        return GraphExport(folder, m, not fresh)

    def runner_for(self, backend: str, n: int, latent_hw: tuple[int, int], text: torch.Tensor) -> Runner:
        """The active runner of ``backend`` for ``N`` and the shapes, made once."""
        if self._fixed_runner is not None:
            return self._fixed_runner.activate()
        text_shape = (int(text.shape[1]), int(text.shape[2])) if text.ndim == 3 else None
        key = (backend, n, latent_hw, text_shape)
        if key not in self._runners:
            if backend == "torch":
                split = self.family.split(self.run_transformer(), n, latent_hw)
                runner: Runner = TorchTransformerRunner(split, self.device, _DTYPES[self.precision])
            else:
                split = self.split_for(n, latent_hw)
                folder = self.engine_dir(n, latent_hw, text_shape)
                m = export_transformer(folder, self.family.name, self.transformer, split, latent_hw, text_shape)
                if backend == "tensorrt":
                    runner = self._trt_runner(split, folder)
                else:
                    threads = int(self.runner_options.get("intra_op_threads", 0))
                    runner = OrtTransformerRunner(split, folder / m.encoder, folder / m.decoder, threads)
            self._runners[key] = runner.activate()
        return self._runners[key]

    def _trt_runner(self, split: SplitTransformer, folder: Path) -> Runner:
        """The TensorRT runner of the graphs in ``folder``, with ``runner_options``' profile."""
        opts = self.runner_options
        config = self.transformer.config
        max_rows = int(opts.get("max_rows", 2))
        if max_rows < 1:
            raise InputError(f"runner_options max_rows={max_rows}: pass at least 1 (2 rows per image with CFG)")
        return TrtTransformerRunner(
            split,
            folder,
            patch=int(config.patch_size),
            width=int(config.num_attention_heads) * int(config.attention_head_dim),
            rows=RowProfile(1, max_rows, max_rows),
            steps=int(opts.get("max_segment_steps", 4)),
            opt_steps=int(opts.get("opt_segment_steps", 1)),
            device=self.device,
            build=bool(opts.get("build", True)),
            cuda_graphs=bool(opts.get("cuda_graphs", False)),
        )

    def _choose_auto(self, n: int, latent_hw: tuple[int, int], latents: torch.Tensor, cond: PromptEmbeddings) -> str:
        """``auto``: the faster of torch and onnxruntime on one key step and a 3-step segment at these shapes."""
        text_shape = tuple(cond.text.shape[1:])
        key = (n, latent_hw, text_shape, cond.rows)
        if key not in self._auto_choice:
            rows = cond.rows
            x = torch.randn(rows, *latents.shape[1:], generator=torch.Generator().manual_seed(0))
            t = torch.full((rows,), 500.0)
            ts = torch.tensor([500.0, 480.0, 460.0])
            best: tuple[float, str] | None = None
            for name in ("torch", "onnxruntime"):
                runner = self.runner_for(name, n, latent_hw, cond.text)
                runner.decode(runner.encode(x, t, cond.text, cond.added), ts, cond.text, cond.added)  # warm-up
                t0 = time.perf_counter()
                feats = runner.encode(x, t, cond.text, cond.added)
                runner.decode(feats, ts, cond.text, cond.added)
                took = time.perf_counter() - t0
                if best is None or took < best[0]:
                    best = (took, name)
            assert best is not None
            self._auto_choice[key] = best[1]
        return self._auto_choice[key]

    # a call --------------------------------------------------------------------------------------
    def resolve_key_schedule(
        self, schedule: ScheduleSpec | Calibration | None, num_steps: int, split: int | None
    ) -> tuple[KeySchedule, int]:
        """The key steps and ``N`` of a call. A [`Calibration`][fd_trt.core.calibration.Calibration] (or the path of its JSON) gives
        both; it must be for this transformer's weights, scheduler and step count. ``"calibrated"``
        reads the one saved for the scheduler and step count (``calibrations/<scheduler>-<steps>.json``,
        as ``fd-trt calibrate --save`` writes it) in the engine directory, then the model folder.

        Raises:
            ScheduleError: for a calibration of another model, scheduler or step count, and for
                ``"calibrated"`` when none is saved (naming the files looked for and the command
                that makes one).
            InputError: for a ``split`` that contradicts the calibration's.
        """
        tr = self.transformer
        where = ""
        if schedule is None:
            # The default: the calibration saved for this scheduler and step count (as the UNet
            # families do), when it is for these weights and for the asked N; else the paper's key steps.
            saved = self._saved_default(num_steps)
            fits = saved is not None and (split is None or saved.split in (None, split))
            schedule = saved if fits else "paper"
        if isinstance(schedule, str) and schedule.strip().lower() == "calibrated":
            path = self.saved_calibration(num_steps)
            schedule, where = Calibration.load(path), str(path)
        elif isinstance(schedule, (str, os.PathLike)) and str(schedule).endswith(".json"):
            schedule = Calibration.load(schedule)
        if isinstance(schedule, Calibration):
            from fd_trt.families.models import scheduler_name

            schedule.check(
                model_sha256=unet_weights_sha256(tr),
                scheduler=scheduler_name(self.sd.scheduler),
                steps=num_steps,
                where=where,
            )
            n_cal = schedule.split
            if split is not None and n_cal is not None and split != n_cal:
                raise InputError(f"split={split} but the calibration is for N={n_cal}: drop split= or recalibrate")
            n = split if split is not None else (n_cal if n_cal is not None else self.split_point)
            return schedule.schedule(), check_split_point(tr, n)
        n = self.split_point if split is None else check_split_point(tr, split)
        return parse_schedule(schedule, num_steps), n

    def _saved_default(self, num_steps: int) -> Calibration | None:
        """The saved calibration for the current scheduler and ``num_steps``, when there is one for
        these weights (``None`` otherwise: another model's is not used, and is logged)."""
        from fd_trt.core.calibration import find_calibration
        from fd_trt.errors import ScheduleError
        from fd_trt.families.models import scheduler_name

        name = scheduler_name(self.sd.scheduler) or type(self.sd.scheduler).__name__
        path = find_calibration(self.calibration_folders(), name, num_steps)
        if path is None:
            return None
        cal = Calibration.load(path)
        try:
            cal.check(model_sha256=self.unet_sha256, scheduler=name, steps=num_steps)
        except ScheduleError as exc:
            logger.info("not using the saved calibration %s: %s", path, exc)
            return None
        return cal

    def saved_calibration(self, num_steps: int) -> Path:
        """The saved calibration ``schedule="calibrated"`` runs for ``num_steps`` steps of the current
        scheduler: ``calibrations/<scheduler>-<steps>.json`` in the engine directory (``engines=``),
        then in the model folder (``from_pretrained``).

        Raises:
            ScheduleError: when none is saved, naming the files looked for and the command that
                saves one.
        """
        from fd_trt.core.calibration import calibration_file, find_calibration
        from fd_trt.errors import ScheduleError
        from fd_trt.families.models import scheduler_name

        # The name fd-trt calibrate --save gives the file (the class name for a scheduler without a short one).
        short = scheduler_name(self.sd.scheduler)
        name = short or type(self.sd.scheduler).__name__
        folders = self.calibration_folders()
        path = find_calibration(folders, name, num_steps)
        if path is not None:
            return path
        model = str(self.model_dir) if self.model_dir is not None else "FOLDER"
        engines = f" --engines {self.engines}" if self.engines is not None else ""
        make = f"fd-trt calibrate --model {model} --steps {num_steps}{engines} --save"
        if short is not None:
            make += f" (with --scheduler {short} if that is not the model's own scheduler)"
        if folders:
            looked = " nor ".join(str(calibration_file(f, name, num_steps)) for f in folders)
            raise ScheduleError(
                f"schedule='calibrated' but no calibration for {name}-{num_steps} is saved: there is no {looked}. "
                f"Make one with {make}, or pass a calibration JSON path as schedule"
            )
        raise ScheduleError(
            f"schedule='calibrated' needs a folder to find calibrations/{name}-{num_steps}.json in, and this "
            "pipeline has none: load it with FasterDiffusionPipeline.from_pretrained(FOLDER) or pass engines=DIR, "
            f"after {make}; or pass a calibration JSON path as schedule"
        )

    @torch.inference_mode()
    def generate(
        self,
        cond_input: Any,
        negative: Any = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        schedule: ScheduleSpec | Calibration | None = None,
        split: int | None = None,
        noise_injection: bool | NoiseInjection | None = None,
        parallel: bool = True,
        max_decoder_rows: int | None = None,
        **family_options: Any,
    ) -> FasterDiffusionOutput:
        """The stages of a call: conditioning, latents, the sampler, the VAE (see [`__call__()`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline.__call__])."""
        t_start = time.perf_counter()
        seconds: dict[str, float] = {}
        tr = self.transformer
        f = self.vae_scale_factor
        height, width = self.image_size(height, width)
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        cfg = guidance_scale > 1.0
        t0 = time.perf_counter()
        cond = self.family.conditioning(
            self.sd, cond_input, negative, num_images_per_prompt, cfg, height=height, width=width, **family_options
        )
        seconds["text_encoder"] = time.perf_counter() - t0
        batch = cond.rows // (2 if cfg else 1)

        scheduler = copy.deepcopy(self.sd.scheduler)
        scheduler.set_timesteps(
            num_inference_steps, device=self.device, **self._timestep_kwargs(scheduler, height, width)
        )
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        num_steps = len(scheduler.timesteps)
        key_schedule, n = self.resolve_key_schedule(schedule, num_steps, split)
        if isinstance(noise_injection, NoiseInjection):
            noise = noise_injection
        else:
            noise = NoiseInjection(
                enabled=key_schedule.injects_noise if noise_injection is None else bool(noise_injection)
            )

        latent_hw = (height // f, width // f)
        shape = (batch, int(tr.config.in_channels), *latent_hw)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        sigma0 = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching: none, 1
        x_t = latents.to(self.device).float() * sigma0

        backend = self.backend
        if backend == "auto" and self._fixed_runner is None:
            backend = self._choose_auto(n, latent_hw, x_t, cond)
        runner = self.runner_for(backend, n, latent_hw, cond.text)
        options = SamplerOptions(
            guidance_scale=float(guidance_scale),
            noise=noise,
            parallel=parallel,
            max_decoder_rows=max_decoder_rows,
            # StableDiffusion3Pipeline passes no generator to the scheduler's step (FlowMatchLCM draws its own noise)
            extra_step_kwargs={} if self.family.name == "sd3" else _step_kwargs(scheduler, eta, generator),
            progress=self.progress,
        )
        sstats = SamplerStats()
        x0 = run_sampler(
            runner, scheduler, x_t, SamplerInputs(cond.text, added=cond.added), key_schedule, options, stats=sstats
        )
        seconds.update(sstats.seconds)
        t0 = time.perf_counter()
        images = self.decode_latents(x0, output_type)
        seconds["vae"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        stats = PipelineStats(
            num_steps=num_steps,
            key_steps=list(key_schedule.key_steps),
            encoder_calls=sstats.encoder_calls,
            encoder_rows=sstats.encoder_rows,
            decoder_calls=sstats.decoder_calls,
            decoder_rows=sstats.decoder_rows,
            unet_gflops=0.0,
            seconds=seconds,
            backend=runner.name,
            nonfinite=not bool(torch.isfinite(x0).all()),
        )
        return FasterDiffusionOutput(images=images, stats=stats, latents=x0)

    def _timestep_kwargs(self, scheduler: Any, height: int, width: int) -> dict[str, Any]:
        """``mu`` for a flow-matching scheduler with dynamic shifting, as ``StableDiffusion3Pipeline``
        computes it from the image tokens; nothing otherwise."""
        if not scheduler.config.get("use_dynamic_shifting", None):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        f, patch = self.vae_scale_factor, int(self.transformer.config.patch_size)
        seq = (height // f // patch) * (width // f // patch)
        cfg = scheduler.config
        mu = calculate_shift(
            seq,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """The VAE decode; DiT's output as ``DiTPipeline`` makes it, PixArt's and SD3's through their
        image processor (SD3's latents are shifted by the VAE's ``shift_factor``)."""
        if output_type == "latent":
            return latents
        vae = self.sd.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if self.family.name == "sd3":
            latents = latents + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        if self.family.name == "dit":
            image = (image / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                return image
            arr = image.cpu().permute(0, 2, 3, 1).float().numpy()
            return self.sd.numpy_to_pil(arr) if output_type == "pil" else arr
        return self.sd.image_processor.postprocess(image.float(), output_type=output_type)

    def __call__(  # type: ignore[override]
        self,
        prompt: Any = None,
        negative_prompt: Any = None,
        *,
        class_labels: Any = None,
        guidance_scale: float | None = None,
        **kwargs: Any,
    ) -> FasterDiffusionOutput:
        """Generates images.

        Args:
            prompt: PixArt, SD3: the prompt(s). DiT: class ids or label words (or pass ``class_labels``).
            negative_prompt: PixArt's and SD3's negative prompt(s) (``""`` by default, as diffusers').
            class_labels: DiT's ImageNet class ids or label words.
            guidance_scale: CFG weight; 4.0 for DiT, 4.5 for PixArt and 7.0 for SD3 by default
                (their pipelines').
            **kwargs: ``height``, ``width``, ``num_inference_steps``, ``num_images_per_prompt``,
                ``eta``, ``generator``, ``latents``, ``output_type`` as in diffusers; ``schedule``
                (by default the calibration saved for the scheduler and step count with the model
                when it is for these weights, else ``"paper"``; ``"all"``, ``"uniform:N"``, key steps, a transformer
                [`Calibration`][fd_trt.core.calibration.Calibration] or its JSON path, which also gives ``N``, or
                ``"calibrated"``: the one ``fd-trt calibrate --save`` saved for the scheduler and step
                count in the engine directory or the model folder),
                ``split`` (``N`` for this call), ``noise_injection``, ``parallel``, ``max_decoder_rows``;
                PixArt: ``max_sequence_length`` (120, or the text encoder's positions when fewer);
                SD3: ``prompt_2``, ``prompt_3``, ``negative_prompt_2``, ``negative_prompt_3``, ``max_sequence_length`` (256), ``clip_skip``.
        """
        if self.family.takes_prompts:
            if class_labels is not None:
                raise InputError(f"class_labels is DiT's argument: pass prompt= to a {self.family.name} pipeline")
            cond = prompt
        else:
            if negative_prompt is not None:
                raise InputError("DiT takes no negative_prompt (the null class is its unconditional row)")
            cond = class_labels if class_labels is not None else prompt
        if cond is None:
            raise InputError("nothing to draw: pass a prompt (PixArt) or class_labels (DiT)")
        return self.generate(
            cond,
            negative_prompt,
            guidance_scale=self.family.default_guidance if guidance_scale is None else guidance_scale,
            **kwargs,
        )


#: The UNet pipelines' methods that the transformer pipelines do not offer yet.
_UNSUPPORTED_METHODS = (
    "prepare",
    "prepared_sizes",
    "load_lora_weights",
    "fuse_lora",
    "unfuse_lora",
    "set_adapters",
    "enable_lora",
    "disable_lora",
    "unload_lora_weights",
    "refresh_weights",
    "auto_candidates",
    "denoise",
    "prepare_run",
    "prepare_image_run",
    "controlnet_hook",
)


def _unsupported(name: str) -> Any:
    def method(self: FasterDiffusionTransformerPipeline, *args: Any, **kwargs: Any) -> Any:
        raise InputError(
            f"{name}() is not supported with diffusion transformers ({self.family.name}) yet: see docs/guides/dit.md"
        )

    method.__name__ = name
    return method


for _name in _UNSUPPORTED_METHODS:
    setattr(FasterDiffusionTransformerPipeline, _name, _unsupported(_name))


__all__ = ["TRANSFORMER_BACKENDS", "FasterDiffusionTransformerPipeline", "GraphExport"]
