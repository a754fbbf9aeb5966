"""Side-by-side benchmark: plain diffusers, fd_trt per backend and schedule, DeepCache and T-GATE.

All systems run in one process, interleaved repeat by repeat, with the same weights, prompt and
initial latents. Each result row has the keys of `ROW_KEYS`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import InputError

logger = logging.getLogger(__name__)

ROW_KEYS = (
    "system",
    "backend",
    "schedule",
    "precision",
    "s_per_image",
    "s_min",
    "s_max",
    "unet_s_per_image",
    "encoder_calls",
    "decoder_calls",
    "controlnet_calls",
    "unet_gflops_per_image",
    "peak_mem_mb",
    "rel_l2_vs_diffusers",
    "speedup_vs_diffusers",
    "note",
)

MODELS = ("default", "tiny", "tiny-sdxl", "sd15-arch", "sdxl-arch")


@dataclass
class BenchConfig:
    """What to benchmark.

    Attributes:
        model: ``default``, ``tiny``, ``tiny-sdxl``, ``sd15-arch``, ``sdxl-arch`` or a local diffusers folder.
        height, width, steps, guidance: generation settings (CFG on when guidance > 1).
        scheduler: ``ddim``, ``dpmpp``, ``pndm``, ``euler`` or ``ddpm``.
        backends: fd_trt backends to run.
        schedules: fd_trt schedules to run (``all`` and ``paper`` by default).
        precisions: runner precisions for the torch and auto backends (``fp32``, ``bf16``, ...;
            ``auto`` for backend auto only: bf16 may compete).
        repeat, warmup: timed and untimed runs per system.
        deepcache: also run DeepCache (branch 0) when it is installed, one row per interval.
        deepcache_intervals: DeepCache's cache intervals (2, 3 and 5 by default).
        tgate: also run T-GATE (the ``tgate`` package's ``TgateSDLoader``) when it is installed, one
            row per gate step; SD 1.x/2.x only (its SDXL loader needs SDXL's own pipeline call).
        tgate_gate_steps: T-GATE's gate steps (10 and 20 by default; the package's other knobs at
            their defaults: ``sp_interval=5``, ``fi_interval=1``, ``warm_up=2``).
        authors_style: also run the authors' way of running Faster Diffusion on diffusers modules
            ([`fd_trt.tools.authors_style`][fd_trt.tools.authors_style], ``paper`` key steps), the peer baseline.
        threads: torch / ORT intra-op threads (None: library default).
        controlnet: also run every row with a ControlNet ([`fd_trt.families.models.random_controlnet()`][fd_trt.families.models.random_controlnet]
            of the model's UNet, random weights, and a random control image): diffusers'
            ``StableDiffusionControlNetPipeline`` as ``diffusers+controlnet``, fd_trt's rows as
            ``fd_trt+controlnet`` and DeepCache's as ``deepcache+controlnet``. Their speedup and
            relative L2 are against ``diffusers+controlnet``; the report's ``controlnet_ratio``
            is the ``paper`` speedup with the ControlNet over the one without.
        prompt, seed: the shared prompt and latent seed.
        front: run every method across its knob (`FRONT_SCHEDULES` for fd_trt on top of
            ``schedules``; DeepCache's intervals, T-GATE's gate steps) for [`front_points()`][fd_trt.tools.bench.front_points].
    """

    model: str = "sd15-arch"
    height: int = 256
    width: int = 256
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    backends: tuple[str, ...] = ("auto", "torch")
    schedules: tuple[str, ...] = ("all", "paper")
    precisions: tuple[str, ...] = ("fp32",)
    repeat: int = 1
    warmup: int = 1
    deepcache: bool = True
    deepcache_intervals: tuple[int, ...] = (2, 3, 5)
    tgate: bool = True
    tgate_gate_steps: tuple[int, ...] = (10, 20)
    authors_style: bool = True
    threads: int | None = None
    controlnet: bool = False
    prompt: str = "a red circle on the left and a blue square on the right"
    seed: int = 0
    front: bool = False


#: fd_trt's knobs on the speed-fidelity front (``--front``): encoder propagation over the number
#: of key steps (``all``, uniform spacings, ``paper``, the saved calibration where there is one),
#: and decoder schedules that also reuse the deep part of the up path (docs/guides/deepcache-front.md).
FRONT_SCHEDULES: tuple[str, ...] = (
    "all",
    "uniform:2",
    "uniform:3",
    "paper",
    "calibrated",
    "uniform:5",
    "combined:uniform:3|uniform:2|1",
    "combined:uniform:5|uniform:2|1",
    "combined:uniform:4|none|1",
    "combined:paper|uniform:2|1",
    "deepcache:3",
)
#: DeepCache-like decoder schedules with their whole-decoder steps dense at the start
#: (``combined:power:K|none|1|fresh``), K as these fractions of the step count.
FRONT_DENSE_FRACTIONS: tuple[float, ...] = (0.16, 0.2, 0.26, 0.34, 0.4, 0.44, 0.5)


def dense_front_schedules(steps: int) -> tuple[str, ...]:
    """The ``power:K`` DeepCache-like rows of the front for a run of ``steps`` steps."""
    counts = dict.fromkeys(k for k in (round(steps * f) for f in FRONT_DENSE_FRACTIONS) if 2 <= k < steps)
    return tuple(f"combined:power:{k}|none|1|fresh" for k in counts)


#: DeepCache's intervals and T-GATE's gate steps on the front.
FRONT_DEEPCACHE_INTERVALS: tuple[int, ...] = (2, 3, 4, 5, 7)
FRONT_TGATE_GATE_STEPS: tuple[int, ...] = (5, 10, 20, 30)


def front_config(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with every method's knob swept (``--front``): fd_trt's `FRONT_SCHEDULES` and
    [`dense_front_schedules()`][fd_trt.tools.bench.dense_front_schedules] after its own schedules, and the peers' knobs. ``calibrated`` only where a calibration is saved."""
    folder = _model_folder(cfg.model)
    calibrated = folder is not None and (folder / "calibrations").is_dir()
    extra = tuple(
        x
        for x in FRONT_SCHEDULES + dense_front_schedules(cfg.steps)
        if x not in cfg.schedules and (x != "calibrated" or calibrated)
    )
    return dataclasses.replace(
        cfg,
        schedules=tuple(cfg.schedules) + extra,
        deepcache_intervals=FRONT_DEEPCACHE_INTERVALS,
        tgate_gate_steps=tuple(g for g in FRONT_TGATE_GATE_STEPS if g < cfg.steps),
        front=True,
    )


@dataclass
class _System:
    system: str
    backend: str
    schedule: str
    precision: str
    run: Callable[[], tuple[torch.Tensor, dict[str, Any]]]
    note: str = ""
    note_ok: str = ""
    times: list[float] = field(default_factory=list)
    unet_times: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    latents: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    gflops: float | None = None
    #: The system whose latents and time the row is compared with (``diffusers`` or ``diffusers+controlnet``).
    ref: str = "diffusers"


class _PeakRss:
    """Samples this process's resident memory in a thread; CUDA peak comes from torch."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.01)

    def __enter__(self) -> _PeakRss:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def load_model(name: str, seed: int = 0) -> tuple[Any, str]:
    """Loads a benchmark model by name (see `MODELS`) or local folder."""
    from fd_trt.families.models import load_diffusers_pipeline, sd15_arch_pipeline, sdxl_arch_pipeline, tiny_sd_pipeline

    if name == "tiny":
        return tiny_sd_pipeline(seed), "tiny random-weight SD"
    if name == "tiny-sdxl":
        from fd_trt.families.models import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed), "tiny random-weight SDXL"
    if name == "sd15-arch":
        return sd15_arch_pipeline(seed), "SD1.5-shaped UNet, CLIP-L-width text encoder, random weights"
    if name == "sdxl-arch":
        return sdxl_arch_pipeline(seed), "SDXL-shaped UNet (2.6B), CLIP-L and bigG-shaped text encoders, random weights"
    return load_diffusers_pipeline(name)


def _unet_timer(unet: torch.nn.Module) -> tuple[list[float], Callable[[], None]]:
    """Accumulates wall time inside ``unet.forward`` via hooks; returns (box, remove)."""
    box = [0.0]
    start: list[float] = []

    def pre(*_: Any) -> None:
        start.append(time.perf_counter())

    def post(*_: Any) -> None:
        box[0] += time.perf_counter() - start.pop()

    h1 = unet.register_forward_pre_hook(pre)
    h2 = unet.register_forward_hook(post)

    def remove() -> None:
        h1.remove()
        h2.remove()

    return box, remove


def _count_unet_gflops(unet: torch.nn.Module, fn: Callable[[], Any]) -> float:
    """Counts the FLOPs inside ``unet.forward`` calls while ``fn`` runs (text encoder and VAE excluded)."""
    from fd_trt.utils.flops import flop_counter_mode

    total = [0]
    active: list[Any] = []

    def pre(*_: Any) -> None:
        mode = flop_counter_mode()
        mode.__enter__()
        active.append(mode)

    def post(*_: Any) -> None:
        mode = active.pop()
        mode.__exit__(None, None, None)
        total[0] += mode.get_total_flops()

    h1 = unet.register_forward_pre_hook(pre)
    h2 = unet.register_forward_hook(post)
    try:
        fn()
    finally:
        h1.remove()
        h2.remove()
    return total[0] / 1e9


def _sdxl_controlnet_error(model: str) -> InputError:
    return InputError(
        f"--controlnet builds an SD 1.x/2.x ControlNet; model {model!r} is SDXL, whose ControlNets "
        "fd_trt does not drive yet: drop --controlnet or use an SD model"
    )


def build_systems(cfg: BenchConfig, sd: Any, latents: torch.Tensor) -> list[_System]:
    """Creates the callables of every system in the benchmark (with ``cfg.controlnet``, twice:
    without and with the ControlNet)."""
    from fd_trt.families.models import make_scheduler

    sd.scheduler = make_scheduler(cfg.scheduler, sd.scheduler.config)
    systems = _systems(cfg, sd, latents, "", {})
    if cfg.controlnet:
        from fd_trt.families.sdxl import is_sdxl

        if is_sdxl(sd):
            raise _sdxl_controlnet_error(cfg.model)
        cn_sd, image = controlnet_pipeline(sd, cfg.height, cfg.width, cfg.seed)
        systems += _systems(cfg, cn_sd, latents, "+controlnet", {"image": image})
    return systems


def controlnet_pipeline(sd: Any, height: int, width: int, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """diffusers' ``StableDiffusionControlNetPipeline`` over ``sd``'s components (shared, not
    copied) with a random ControlNet made from its UNet, and a random ``[1,3,H,W]`` control image."""
    from diffusers import StableDiffusionControlNetPipeline

    from fd_trt.families.models import random_controlnet

    net = random_controlnet(sd.unet, seed=seed + 1, vae_scale_factor=sd.vae_scale_factor)
    comps = {
        k: v
        for k, v in sd.components.items()
        if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    }
    cn_sd = StableDiffusionControlNetPipeline(
        **comps, controlnet=net, image_encoder=None, requires_safety_checker=False
    )
    cn_sd.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed + 2))
    return cn_sd, image


def _systems(cfg: BenchConfig, sd: Any, latents: torch.Tensor, tag: str, extra: dict[str, Any]) -> list[_System]:
    """The rows of one pipeline: diffusers, authors-style (not with a ControlNet), fd_trt per
    backend, precision and schedule, and DeepCache. ``tag`` is appended to each system name and
    ``extra`` to each call's arguments (the control image)."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    common = dict(
        num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.height, width=cfg.width, **extra
    )
    ref = "diffusers" + tag
    systems: list[_System] = []

    def diffusers_run(pipe: Any) -> Callable[[], tuple[torch.Tensor, dict[str, Any]]]:
        def run() -> tuple[torch.Tensor, dict[str, Any]]:
            last: list[torch.Tensor] = []

            def grab(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                last[:] = [kw["latents"]]
                return {}

            box, remove = _unet_timer(pipe.unet)
            try:
                pipe(cfg.prompt, latents=latents.clone(), output_type="np", callback_on_step_end=grab, **common)
            finally:
                remove()
            n = len(pipe.scheduler.timesteps)
            nets = len(getattr(getattr(pipe, "controlnet", None), "nets", [None])) if hasattr(pipe, "controlnet") else 0
            return last[0].float(), {
                "unet_s": box[0],
                "encoder_calls": n,
                "decoder_calls": n,
                "controlnet_calls": n * nets,
            }

        return run

    systems.append(_System(ref, "torch", "-", "fp32", diffusers_run(sd), ref=ref))

    from fd_trt.families.sdxl import is_sdxl

    if cfg.authors_style and not tag and is_sdxl(sd):
        # authors_style.py drives SD 1.x/2.x UNets; it has no SDXL added conditioning.
        systems.append(
            _System(
                "authors-style",
                "torch",
                "paper",
                "fp32",
                _fail(RuntimeError("SD only")),
                note="not run: the authors-style baseline is written for SD 1.x/2.x UNets "
                "(no SDXL text_embeds / time_ids)",
                ref=ref,
            )
        )
    elif cfg.authors_style and not tag:
        from fd_trt.tools.authors_style import authors_style_images

        def authors_run() -> tuple[torch.Tensor, dict[str, Any]]:
            # The blocks are called directly, not unet.forward: the UNet time is the whole loop's.
            t = time.perf_counter()
            lat, _ = authors_style_images(
                sd, cfg.prompt, latents.clone(), num_inference_steps=cfg.steps, guidance_scale=cfg.guidance
            )
            keys = [k for k in _paper_keys() if k < cfg.steps]
            return lat, {"unet_s": time.perf_counter() - t, "encoder_calls": len(keys), "decoder_calls": len(keys)}

        systems.append(
            _System(
                "authors-style",
                "torch",
                "paper",
                "fp32",
                authors_run,
                note_ok="diffusers modules, encoder at key steps, decoder batched by repeating features",
            )
        )

    # auto last: the graphs other rows build on their first run are then there for it to measure.
    order = sorted(cfg.backends, key=lambda b: b == "auto")
    for backend in order:
        # precision "auto" (bf16 may compete) is for backend auto only.
        precisions = tuple(p for p in cfg.precisions if p != "auto" or backend == "auto") or ("fp32",)
        precisions = precisions if backend in ("torch", "auto") else ("fp32",)
        for precision in precisions:
            try:
                # One pipeline for every row: a torch runner at another precision converts its own
                # copy of the UNet, and the fp32 runners share the caller's.
                opts = {"intra_op_threads": cfg.threads} if (backend in ("onnxruntime", "auto") and cfg.threads) else {}
                fd = FasterDiffusionPipeline.from_diffusers(
                    sd, backend=backend, device="cpu", precision=precision, progress=False, runner_options=opts
                )
            except Exception as e:  # a backend that cannot start still gets a row that says why
                systems.append(
                    _System(
                        "fd_trt" + tag,
                        backend,
                        ",".join(cfg.schedules),
                        precision,
                        _fail(e),
                        note=f"unavailable: {e}",
                        ref=ref,
                    )
                )
                continue
            # schedule="calibrated" finds the calibrations saved in the model folder, as with from_pretrained.
            fd.model_dir = _model_folder(cfg.model)
            for schedule in cfg.schedules:

                def run(fd: Any = fd, schedule: str = schedule) -> tuple[torch.Tensor, dict[str, Any]]:
                    out = fd(cfg.prompt, latents=latents.clone(), output_type="np", schedule=schedule, **common)
                    s = out.stats
                    info = {
                        "unet_s": s.seconds["encoder"] + s.seconds["decoder"],
                        "encoder_calls": s.encoder_calls,
                        "decoder_calls": s.decoder_calls,
                        "gflops": s.unet_gflops,
                        "backend": s.backend,
                        "controlnet_calls": s.controlnet_calls,
                    }
                    d = getattr(fd.runner, "last_decision", None)
                    if d is not None:
                        info["auto"] = d.summary()
                    return out.latents, info

                systems.append(_System("fd_trt" + tag, backend, schedule, precision, run, ref=ref))

    if cfg.deepcache:
        for interval in cfg.deepcache_intervals:
            dc = _deepcache_system(cfg, sd, latents, common, diffusers_run, interval)
            dc.system, dc.ref = dc.system + tag, ref
            systems.append(dc)
    if cfg.tgate and not tag:  # T-GATE's pipeline call has no ControlNet
        systems += [_tgate_system(cfg, sd, latents, common, g) for g in cfg.tgate_gate_steps]
    return systems


def _model_folder(model: str) -> Path | None:
    """The folder of a benchmark model that may hold saved calibrations (``None`` for the random ones)."""
    from fd_trt.families.models import BUILTIN_MODELS, model_folder

    if model in BUILTIN_MODELS:
        return model_folder(model)
    if model in MODELS:
        return None
    return Path(model)


def _paper_keys() -> list[int]:
    from fd_trt.core.schedule import PAPER_KEY_STEPS

    return list(PAPER_KEY_STEPS)


def _fail(e: Exception) -> Callable[[], tuple[torch.Tensor, dict[str, Any]]]:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        raise RuntimeError(str(e))

    return run


def _deepcache_system(
    cfg: BenchConfig, sd: Any, latents: torch.Tensor, common: dict[str, Any], diffusers_run: Any, interval: int = 3
) -> _System:
    knob = f"interval={interval},branch=0"
    try:
        from DeepCache import DeepCacheSDHelper  # type: ignore[import-not-found]
    except Exception as e:  # not installed, or broken against this diffusers
        return _System("deepcache", "torch", knob, "fp32", _fail(e), note=f"not run: {type(e).__name__}: {e}")
    try:
        # DeepCache patches the pipeline in place, so it gets its own shallow copy sharing the weights.
        dc_pipe = copy.copy(sd)
        dc_pipe.unet = copy.copy(sd.unet)
        helper = DeepCacheSDHelper(pipe=dc_pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
    except Exception as e:
        return _System("deepcache", "torch", knob, "fp32", _fail(e), note=f"not run: {type(e).__name__}: {e}")
    inner = diffusers_run(dc_pipe)

    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        helper.enable()
        try:
            lat, info = inner()
        finally:
            helper.disable()
        n = len(dc_pipe.scheduler.timesteps)
        info["encoder_calls"] = len(range(0, n, interval))  # full UNet passes; the others run its shallow end
        return lat, info

    return _System("deepcache", "torch", knob, "fp32", run)


def run_tgate(sd: Any, prompt: Any, gate_step: int, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """One T-GATE run (the ``tgate`` package's ``TgateSDLoader``) over the SD 1.x/2.x pipeline
    ``sd``'s modules and scheduler: cross-attention cached after ``gate_step``, CFG dropped with it.

    T-GATE replaces ``forward`` on every ``Attention`` module of the UNet it is given; those
    instance attributes (and the caches) are removed after the run, so the UNet computes as before.

    Args:
        sd: a diffusers ``StableDiffusionPipeline``.
        prompt: the prompt (or list).
        gate_step: T-GATE's gate step.
        kwargs: the other arguments of the diffusers call (``num_inference_steps``, ``guidance_scale``,
            ``generator``, ``latents``, ``output_type``).

    Returns:
        ``(images as output_type, final latents)``.

    Raises:
        ImportError: when tgate is not installed (``pip install 'fd_trt[bench]'``).
    """
    from tgate import TgateSDLoader  # type: ignore[import-not-found]

    last: list[torch.Tensor] = []

    def grab(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        last[:] = [kw["latents"]]
        return {}

    try:
        out = TgateSDLoader(copy.copy(sd)).tgate(prompt, callback_on_step_end=grab, gate_step=gate_step, **kwargs)
    finally:
        for m in sd.unet.modules():
            if type(m).__name__ == "Attention":
                m.__dict__.pop("forward", None)
                m.__dict__.pop("cache", None)
    return out.images, last[0]


def _tgate_system(cfg: BenchConfig, sd: Any, latents: torch.Tensor, common: dict[str, Any], gate_step: int) -> _System:
    """T-GATE at ``gate_step`` ([`run_tgate()`][fd_trt.tools.bench.run_tgate])."""
    knob = f"gate_step={gate_step}"
    try:
        import tgate  # type: ignore[import-not-found]  # noqa: F401
    except Exception as e:  # not installed, or broken against this diffusers
        return _System("tgate", "torch", knob, "fp32", _fail(e), note=f"not run: {type(e).__name__}: {e}")
    from fd_trt.families.sdxl import is_sdxl

    if is_sdxl(sd):
        return _System(
            "tgate",
            "torch",
            knob,
            "fp32",
            _fail(RuntimeError("SD only")),
            note="not run: the row drives T-GATE's SD 1.x/2.x loader (TgateSDLoader)",
        )
    if gate_step >= cfg.steps:
        return _System(
            "tgate",
            "torch",
            knob,
            "fp32",
            _fail(RuntimeError("gate step")),
            note=f"not run: gate_step {gate_step} is not below the {cfg.steps} steps",
        )

    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        box, remove = _unet_timer(sd.unet)
        try:
            _, last = run_tgate(sd, cfg.prompt, gate_step, latents=latents.clone(), output_type="np", **common)
        finally:
            remove()
        n = len(sd.scheduler.timesteps)
        return last.float(), {"unet_s": box[0], "encoder_calls": n, "decoder_calls": n}

    return _System("tgate", "torch", knob, "fp32", run)


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Runs every system ``warmup`` + ``repeat`` times, interleaved, and returns the report.

    Returns:
        ``{"config": {...}, "results": [row, ...]}`` with rows keyed by `ROW_KEYS`.
    """
    from tqdm.auto import tqdm

    if cfg.height % 8 or cfg.width % 8 or cfg.height <= 0 or cfg.width <= 0:
        raise InputError(f"height and width must be positive multiples of 8, got {cfg.height}x{cfg.width}")
    if cfg.controlnet and cfg.model in ("tiny-sdxl", "sdxl-arch"):  # before building a 2.6 B-parameter model
        raise _sdxl_controlnet_error(cfg.model)
    if cfg.repeat < 1 or cfg.warmup < 0:
        raise InputError(f"repeat must be >= 1 and warmup >= 0, got repeat={cfg.repeat} warmup={cfg.warmup}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    sd, model_desc = load_model(cfg.model, cfg.seed)
    load_s = time.perf_counter() - t0
    f = sd.vae_scale_factor
    shape = (1, int(sd.unet.config.in_channels), cfg.height // f, cfg.width // f)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    systems = build_systems(cfg, sd, latents)
    live = [s for s in systems if not s.note]

    bar = tqdm(total=len(live) * (cfg.warmup + cfg.repeat), disable=not progress, desc="benchmark")
    for w in range(cfg.warmup):
        for s in list(live):
            try:
                if w == 0 and not s.system.startswith(("fd_trt", "authors-style")):
                    # diffusers and DeepCache FLOPs are counted on their own UNet calls, untimed
                    s.gflops = _count_unet_gflops(sd.unet, s.run)
                else:
                    s.run()
            except Exception as e:
                s.note = f"failed: {type(e).__name__}: {e}"
                live.remove(s)
            bar.update(1)
    for _ in range(cfg.repeat):
        for s in list(live):
            try:
                with _PeakRss(cuda=False) as mem:
                    t = time.perf_counter()
                    lat, info = s.run()
                    s.times.append(time.perf_counter() - t)
                s.peak_mb = max(s.peak_mb, mem.mb)
                s.unet_times.append(info["unet_s"])
                s.latents, s.info = lat, info
                if "gflops" in info:
                    s.gflops = info["gflops"]
            except Exception as e:
                s.note = f"failed: {type(e).__name__}: {e}"
                live.remove(s)
            bar.update(1)
    bar.close()

    refs = {s.system: s for s in systems if s.system == s.ref}
    rows = []
    for s in systems:
        ref = refs[s.ref]
        row: dict[str, Any] = {k: None for k in ROW_KEYS}
        backend = s.info.get("backend", s.backend) if s.backend == "auto" else s.backend
        row.update(
            system=s.system,
            backend=backend,
            schedule=s.schedule,
            precision=s.precision,
            note=s.note or s.info.get("auto", s.note_ok),
        )
        if s.times:
            med = statistics.median(s.times)
            row.update(
                s_per_image=med,
                s_min=min(s.times),
                s_max=max(s.times),
                unet_s_per_image=statistics.median(s.unet_times),
                encoder_calls=s.info.get("encoder_calls"),
                decoder_calls=s.info.get("decoder_calls"),
                controlnet_calls=s.info.get("controlnet_calls"),
                unet_gflops_per_image=s.gflops,
                peak_mem_mb=round(s.peak_mb, 1),
            )
            if ref.latents is not None and s.latents is not None:
                row["rel_l2_vs_diffusers"] = float((s.latents - ref.latents).norm() / ref.latents.norm())
            if ref.times:
                row["speedup_vs_diffusers"] = statistics.median(ref.times) / med
        rows.append(row)
    config = dataclasses.asdict(cfg)
    if cfg.controlnet:
        config["controlnet_ratio"] = controlnet_ratio(rows)
    config.update(
        model_description=model_desc,
        model_load_s=load_s,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=_cpu_name(),
        latent_shape=list(shape),
    )
    return {"config": config, "results": rows}


def controlnet_ratio(rows: list[dict[str, Any]], schedule: str = "paper") -> float | None:
    """fd_trt's ``schedule`` speedup over diffusers with the ControlNet, divided by the same speedup
    without it (first backend with both rows); ``None`` when a row is missing."""
    by = {(r["system"], r["backend"], r["schedule"], r["precision"]): r["speedup_vs_diffusers"] for r in rows}
    for (system, backend, sched, precision), speedup in by.items():
        if system == "fd_trt" and sched == schedule and speedup:
            with_cn = by.get(("fd_trt+controlnet", backend, sched, precision))
            if with_cn:
                return with_cn / speedup
    return None


def _cpu_name() -> str:
    from fd_trt.utils.system import cpu_model  # the one reader of /proc/cpuinfo's model name (cached)

    return cpu_model()


def to_markdown(report: dict[str, Any]) -> str:
    """Renders the report as a markdown table."""
    c = report["config"]
    head = (
        f"{c['model']} at {c['height']}x{c['width']}, {c['scheduler']}-{c['steps']}, guidance {c['guidance']}, "
        f"{c['threads']} threads, {c['cpu']}; median of {c['repeat']} after {c['warmup']} warm-up\n\n"
    )
    cols = [
        "system",
        "backend",
        "schedule",
        "precision",
        "s/image",
        "min-max",
        "UNet s",
        "speedup",
        "enc calls",
        "dec calls",
        "CN calls",
        "UNet GFLOP",
        "peak MB",
        "rel L2 vs diffusers",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        if r["s_per_image"] is None:
            lines.append(
                f"| {r['system']} | {r['backend']} | {r['schedule']} | {r['precision']} | {r['note']} |"
                + " |" * (len(cols) - 5)
            )
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    r["system"],
                    r["backend"],
                    r["schedule"],
                    r["precision"],
                    f"{r['s_per_image']:.3f}",
                    f"{r['s_min']:.3f}-{r['s_max']:.3f}",
                    f"{r['unet_s_per_image']:.3f}",
                    f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else "-",
                    str(r["encoder_calls"]),
                    str(r["decoder_calls"]),
                    str(r.get("controlnet_calls") or 0),
                    f"{r['unet_gflops_per_image']:.1f}" if r["unet_gflops_per_image"] is not None else "-",
                    f"{r['peak_mem_mb']:.0f}",
                    f"{r['rel_l2_vs_diffusers']:.2e}" if r["rel_l2_vs_diffusers"] is not None else "-",
                ]
            )
            + " |"
        )
    if c.get("controlnet_ratio"):
        head += (
            f"ControlNet: fd_trt paper's speedup over diffusers with the ControlNet is "
            f"{c['controlnet_ratio']:.2f}x its speedup without it\n\n"
        )
    notes = [
        f"- {r['system']} {r['backend']} {r['schedule']}: {r['note']}"
        for r in report["results"]
        if r["s_per_image"] is not None and r["note"]
    ]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes a bar chart of s/image with the speedup on each bar and the UNet-FLOP cut beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["s_per_image"] is not None]
    ref_flops = rows[0]["unet_gflops_per_image"] if rows else None
    labels = [f"{r['system']}\n{r['backend']} {r['schedule']}\n{r['precision']}" for r in rows]
    vals = [r["s_per_image"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    bars = ax.bar(range(len(rows)), vals, color=["#888888"] + ["#3b7dd8"] * (len(rows) - 1))
    for b, r in zip(bars, rows):
        text = f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else ""
        if ref_flops and r["unet_gflops_per_image"]:
            text += f"\nFLOPs {100 * (r['unet_gflops_per_image'] / ref_flops - 1):+.0f}%"
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("s / image")
    c = report["config"]
    ax.set_title(f"{c['model']} {c['height']}x{c['width']} {c['scheduler']}-{c['steps']} CFG {c['guidance']}")
    ax.set_ylim(0, max(vals) * 1.25 if vals else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _method(row: dict[str, Any]) -> str:
    """The front's curve of a result row."""
    system, schedule = row["system"], str(row["schedule"])
    if system.startswith("fd_trt"):
        backend = str(row["backend"]).split(":")[-1].split("/")[0]
        if schedule.startswith(("combined:", "deepcache:")):
            return f"fd_trt {backend}, decoder schedules"
        return f"fd_trt {backend}, encoder propagation"
    return {"deepcache": "DeepCache", "tgate": "T-GATE", "authors-style": "authors-style"}.get(system, system)


def front_points(report: dict[str, Any]) -> dict[str, Any]:
    """The speed-fidelity front of a ``--front`` report: every measured row as a point
    ``(speedup over diffusers, rel. L2 vs diffusers)``, grouped by method, and for each method the
    points no other point of the same method beats on both axes (its Pareto front)."""
    points = [
        {
            "method": _method(r),
            "system": r["system"],
            "backend": r["backend"],
            "knob": r["schedule"],
            "speedup": r["speedup_vs_diffusers"],
            "rel_l2": r["rel_l2_vs_diffusers"],
            "s_per_image": r["s_per_image"],
        }
        for r in report["results"]
        if r["s_per_image"] is not None and r["speedup_vs_diffusers"] and r["system"] != "diffusers"
    ]
    methods: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        methods.setdefault(p["method"], []).append(p)
    fronts = {
        m: sorted(
            (
                p
                for p in ps
                if not any(
                    q["speedup"] >= p["speedup"]
                    and q["rel_l2"] <= p["rel_l2"]
                    and (q["speedup"], q["rel_l2"]) != (p["speedup"], p["rel_l2"])
                    for q in ps
                )
            ),
            key=lambda p: p["rel_l2"],
        )
        for m, ps in methods.items()
    }
    return {"config": report["config"], "points": points, "fronts": fronts}


def plot_front(front: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Speedup over diffusers against rel. L2 vs diffusers: every point, and each method's front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (method, pts) in enumerate(sorted(front["fronts"].items())):
        color = f"C{i}"
        every = [p for p in front["points"] if p["method"] == method]
        ax.scatter(
            [max(p["rel_l2"], 1e-4) for p in every], [p["speedup"] for p in every], color=color, alpha=0.35, s=18
        )
        ax.plot(
            [max(p["rel_l2"], 1e-4) for p in pts], [p["speedup"] for p in pts], "o-", color=color, label=method, ms=5
        )
        for p in pts:
            ax.annotate(str(p["knob"]), (max(p["rel_l2"], 1e-4), p["speedup"]), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("rel. L2 of the final latents vs diffusers (lower is more faithful)")
    ax.set_ylabel("speedup over diffusers (same run)")
    c = front["config"]
    ax.set_title(f"{c['model']} {c['height']}x{c['width']} {c['scheduler']}-{c['steps']}: speed-fidelity front")
    ax.axvspan(0.02, 0.1, color="0.9", zorder=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], json_path: str | None, md_path: str | None, plot_path: str | None) -> None:
    """Writes the report as JSON, markdown and a PNG: with ``front`` in its config, the JSON gains
    the front's points and the PNG is the front ([`plot_front()`][fd_trt.tools.bench.plot_front]), else the bar chart."""
    front = front_points(report) if report["config"].get("front") else None
    if json_path:
        out = dict(report, front=front) if front else report
        Path(json_path).write_text(json.dumps(out, indent=2))
    if md_path:
        Path(md_path).write_text(to_markdown(report))
    if plot_path:
        if front:
            plot_front(front, plot_path)
        else:
            plot(report, plot_path)
