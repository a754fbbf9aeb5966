"""Building TensorRT plans: availability checks, profile arithmetic, plan and timing-cache names,
plan builds and their manifest records. The runner ([`fd_trt.backends.tensorrt`][fd_trt.backends.tensorrt]) loads what
this module builds, as polygraphy keeps its loaders apart from its ``TrtRunner``.

Each ONNX graph of an engine directory is parsed with the TensorRT Python API into a strongly
typed network, so the graph's own types (fp16 for ``--backend tensorrt`` exports) decide the
engine precision; this works on TensorRT 10 and 11 (11 has no FP16 builder flag and is always
strongly typed). The network's inputs and outputs are checked against the graph contract
([`fd_trt.graphs.contract.GraphContract`][fd_trt.graphs.contract.GraphContract], read from the manifest), and every contract input gets
a profile entry: SDXL's ``text_embeds`` and ``time_ids`` included. One optimization profile per
plan:

* encoder: 1 .. 2B rows, opt at 2B (B images per call, x2 for CFG);
* decoder: 1 .. 2B x ``max_segment_steps`` rows, opt at 2B x the segment length that covers the
  most decoder steps of the schedule (``paper`` at 50 steps: 10 steps, 20 rows), configurable;
* a decoder schedule's graphs ([`fd_trt.graphs.shallow`][fd_trt.graphs.shallow]): the capture and
  shallow graphs get the decoder's profile, ``input_conv`` the encoder's ([`role_rows()`][fd_trt.backends.tensorrt_build.role_rows]).

Text-to-video graphs (``frames`` in the manifest) get the same profiles over their row axes: the
latents ``[rows, C, F, h, w]``, features ``[rows, C', F, h', w']`` and ``noise_pred`` keep their
frame, height and width axes fixed at the export's, as image graphs keep height and width, and a
row is one video of F frames. Their plans record the frame count (``PlanRecord.frames``), and a
plan of another frame count is never selected.

In a graph with step rows the key step's inputs (features or skips, text, added conditioning)
have their own profile, tuned at 2B rows and allowed up to the decoder's maximum.

The lower bound of 1 row keeps runs without CFG (``guidance_scale <= 1``) inside the profiles;
TensorRT tunes its kernels at the opt shape. Plans are named by role, TensorRT version, GPU
compute capability and profile ([`plan_file_name()`][fd_trt.backends.tensorrt_build.plan_file_name]) and recorded in the manifest
([`fd_trt.graphs.manifest.PlanRecord`][fd_trt.graphs.manifest.PlanRecord]); a plan from another TensorRT version or GPU generation is
never loaded ([`fd_trt.graphs.manifest.check_plan()`][fd_trt.graphs.manifest.check_plan]). A timing cache per TensorRT version and compute
capability lives in the engine directory and makes rebuilds fast.

``tensorrt`` is imported only inside functions: importing this module needs neither TensorRT
nor CUDA, and what needs them raises [`BackendUnavailableError`][fd_trt.errors.BackendUnavailableError] with an
install hint when they are missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from fd_trt.core.schedule import KeySchedule, ScheduleSpec, parse_schedule
from fd_trt.errors import BackendUnavailableError, EngineMismatchError, FdTrtError, InputError
from fd_trt.graphs.contract import (
    CONTROLNET,
    INPUT_CONV,
    ROLES,
    ControlNetContract,
    GraphContract,
    GraphSpec,
    shallow_role_depth,
)

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type-check the calls; nothing is imported at run time
    from fd_trt.graphs.manifest import Manifest, PlanRecord

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "on a machine with an NVIDIA GPU, pip install '.[gpu]' (TensorRT 10 or 11 with a CUDA build of torch); "
    "elsewhere use backend='onnxruntime' or backend='torch'"
)
#: The schedule whose segments pick the decoder profile's opt shape when none is given.
DEFAULT_PROFILE_SCHEDULE = "paper"
DEFAULT_PROFILE_STEPS = 50
DEFAULT_OPTIMIZATION_LEVEL = 3
MAX_OPTIMIZATION_LEVEL = 5


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------
def require_tensorrt() -> ModuleType:
    """Imports TensorRT, or explains how to install it.

    Returns:
        The ``tensorrt`` module (10.x or later).

    Raises:
        BackendUnavailableError: when TensorRT is missing, too old, or only its type stubs are
            installed (``tensorrt-stubs`` alone makes ``import tensorrt`` succeed with an empty
            namespace package).
    """
    try:
        import tensorrt as trt_module
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not loadable
        raise BackendUnavailableError(f"the tensorrt backend cannot import tensorrt ({exc}): {INSTALL_HINT}") from exc
    if not hasattr(trt_module, "Builder"):
        where = getattr(trt_module, "__path__", None) or getattr(trt_module, "__file__", None)
        raise BackendUnavailableError(
            f"the tensorrt module found at {where} is not TensorRT (only its type stubs are installed): {INSTALL_HINT}"
        )
    version = str(getattr(trt_module, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise BackendUnavailableError(f"TensorRT {version} is too old: fd_trt needs TensorRT 10 or 11; {INSTALL_HINT}")
    return trt_module


def require_cuda(device: torch.device | str = "cuda") -> torch.device:
    """Checks that ``device`` is a CUDA device that torch can use.

    Args:
        device: ``"cuda"`` or ``"cuda:i"``.

    Returns:
        The device, with its index filled in.

    Raises:
        InputError: for a non-CUDA device.
        BackendUnavailableError: when torch sees no CUDA GPU.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise InputError(f"the tensorrt backend runs on NVIDIA GPUs, got device={str(device)!r}: pass device='cuda'")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"the tensorrt backend needs a CUDA GPU, but torch {torch.__version__} sees none "
            f"(torch.version.cuda={torch.version.cuda}): {INSTALL_HINT}"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InputError(
            f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    return torch.device("cuda", index)


def runtime_problem(device: torch.device | str = "cuda") -> str | None:
    """Why TensorRT plans cannot be built or run here, or ``None`` when they can.

    Args:
        device: the CUDA device to use.

    Returns:
        A message with an install hint, or ``None``.
    """
    try:
        require_tensorrt()
        require_cuda(device)
    except (BackendUnavailableError, InputError) as exc:
        return str(exc)
    return None


def tensorrt_available(device: torch.device | str = "cuda") -> bool:
    """True when TensorRT imports (the real library, not stubs) and torch sees a CUDA GPU."""
    return runtime_problem(device) is None


# --------------------------------------------------------------------------------------------
# Profiles and names: pure functions, testable without a GPU
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowProfile:
    """Axis-0 rows of one optimization profile.

    Attributes:
        min: the fewest rows a call may have.
        opt: the rows TensorRT tunes its kernels for.
        max: the most rows a call may have (buffers are allocated for this many).
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if (
            any(isinstance(v, bool) or not isinstance(v, int) for v in values)
            or not 1 <= self.min <= self.opt <= self.max
        ):
            raise InputError(f"profile rows must be integers with 1 <= min <= opt <= max, got {values}")

    def as_list(self) -> list[int]:
        """``[min, opt, max]``."""
        return [self.min, self.opt, self.max]


def most_common_segment_steps(schedule: KeySchedule) -> int:
    """The segment length that covers the most decoder steps of a schedule.

    Steps, not segments, are counted because the decoder's time is spent per step: DDIM-50
    ``paper`` has three 1-step segments but twenty steps in its two 10-step segments. Ties go to
    the longer segment.

    Args:
        schedule: a key-step schedule.

    Returns:
        A segment length in steps.
    """
    cover: Counter[int] = Counter()
    for seg in schedule.segments:
        cover[len(seg)] += len(seg)
    return max(cover, key=lambda n: (cover[n], n))


def profile_rows(
    schedule: KeySchedule | None = None,
    *,
    batch: int = 1,
    max_segment_steps: int | None = None,
    opt_segment_steps: int | None = None,
    min_rows: int = 1,
) -> dict[str, RowProfile]:
    """The encoder and decoder optimization profiles for a schedule.

    Args:
        schedule: the schedule the plans will mostly run; DDIM-50 ``paper`` when ``None``.
        batch: images per call B; one step has 2B rows with CFG.
        max_segment_steps: the longest segment decoded in one call; the schedule's longest
            segment when ``None``.
        opt_segment_steps: the segment length to tune for; [`most_common_segment_steps()`][fd_trt.backends.tensorrt_build.most_common_segment_steps]
            when ``None``. Clipped to ``max_segment_steps``.
        min_rows: the fewest rows of either graph (1 lets runs without CFG fit).

    Returns:
        ``{"encoder": RowProfile(min, 2B, 2B), "decoder": RowProfile(min, 2B*opt, 2B*max)}``.

    Raises:
        InputError: for a non-positive batch, step count or minimum.
    """
    for name, value in (
        ("batch", batch),
        ("max_segment_steps", max_segment_steps),
        ("opt_segment_steps", opt_segment_steps),
        ("min_rows", min_rows),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if schedule is None:
        schedule = parse_schedule(DEFAULT_PROFILE_SCHEDULE, DEFAULT_PROFILE_STEPS)
    rows_per_step = 2 * batch
    longest = max_segment_steps if max_segment_steps is not None else schedule.max_segment_len
    opt_steps = min(
        opt_segment_steps if opt_segment_steps is not None else most_common_segment_steps(schedule), longest
    )
    lo = min(min_rows, rows_per_step)
    return {
        "encoder": RowProfile(lo, rows_per_step, rows_per_step),
        "decoder": RowProfile(lo, rows_per_step * opt_steps, rows_per_step * longest),
    }


def profiles_for_manifest(
    encoder_rows: Sequence[int],
    decoder_rows: Sequence[int],
    schedule: KeySchedule | None = None,
    opt_segment_steps: int | None = None,
) -> dict[str, RowProfile]:
    """The profiles of an engine directory, from the row ranges its manifest records.

    Args:
        encoder_rows: the manifest's ``[min, max]`` encoder rows (max = 2B).
        decoder_rows: the manifest's ``[min, max]`` decoder rows (max = 2B x max segment steps).
        schedule: picks the decoder's opt shape (see [`profile_rows()`][fd_trt.backends.tensorrt_build.profile_rows]).
        opt_segment_steps: overrides the schedule's choice.

    Returns:
        ``{"encoder": RowProfile, "decoder": RowProfile}``.

    Raises:
        EngineMismatchError: when the recorded ranges are not of fd_trt's form.
    """
    lo_e, hi_e = int(encoder_rows[0]), int(encoder_rows[1])
    lo_d, hi_d = int(decoder_rows[0]), int(decoder_rows[1])
    if hi_e < 2 or hi_e % 2 or hi_d % hi_e or lo_e < 1 or lo_d < 1:
        raise EngineMismatchError(
            f"the manifest's row ranges (encoder {list(encoder_rows)}, decoder {list(decoder_rows)}) are not "
            "2B and 2B x steps: rebuild the engine directory with fd-trt build --backend tensorrt"
        )
    return profile_rows(
        schedule,
        batch=hi_e // 2,
        max_segment_steps=hi_d // hi_e,
        opt_segment_steps=opt_segment_steps,
        min_rows=min(lo_e, lo_d),
    )


def input_profile_shapes(
    rows: RowProfile,
    input_shapes: Mapping[str, Sequence[int]],
    fixed: Sequence[str] = (),
    own_rows: Mapping[str, RowProfile] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min / opt / max shapes of every graph input, from the profile rows.

    Args:
        rows: the profile.
        input_shapes: each input's shape as the network reports it (axis 0 dynamic, ``-1``).
        fixed: inputs without a row axis (the ControlNet's ``conditioning_scale``): their one
            static shape is min, opt and max.
        own_rows: inputs whose rows follow another profile: the decoder's features, text and
            added conditioning have the key step's rows (tuned at the encoder's), while its
            ``timestep`` has those of all the steps of a call (``rows``).

    Returns:
        ``{name: (min_shape, opt_shape, max_shape)}``.

    Raises:
        EngineMismatchError: when an input has a dynamic axis besides axis 0, or no axis at all.
    """
    out = {}
    for name, shape in input_shapes.items():
        dims = [int(d) for d in shape]
        if name in fixed:
            if any(d < 1 for d in dims):
                raise EngineMismatchError(
                    f"graph input {name!r} has shape {dims} but must be static: re-export the graphs"
                )
            out[name] = (tuple(dims), tuple(dims), tuple(dims))
            continue
        if not dims:
            raise EngineMismatchError(
                f"graph input {name!r} is a scalar; fd_trt graphs have a row axis: re-export the graphs"
            )
        tail = tuple(dims[1:])
        if any(d < 1 for d in tail):
            raise EngineMismatchError(
                f"graph input {name!r} has shape {dims}: only axis 0 may be dynamic (height and width are fixed per "
                "build); re-export with fd-trt build --backend tensorrt --height H --width W"
            )
        r = (own_rows or {}).get(name, rows)
        out[name] = ((r.min, *tail), (r.opt, *tail), (r.max, *tail))
    return out


def _version_tag(tensorrt_version: str) -> str:
    tag = re.sub(r"[^0-9A-Za-z.]+", "_", str(tensorrt_version)).strip("._")
    if not tag:
        raise InputError(f"tensorrt_version {tensorrt_version!r} is empty: pass tensorrt.__version__")
    return tag


#: The names [`plan_file_name()`][fd_trt.backends.tensorrt_build.plan_file_name] gives plans; nothing else in an engine directory is ever deleted as a plan.
PLAN_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+\.trt[0-9A-Za-z._]+\.sm\d+\.rows\d+-\d+-\d+\.plan$")


def is_plan_file_name(name: object) -> bool:
    """Whether ``name`` is a plain file name that [`plan_file_name()`][fd_trt.backends.tensorrt_build.plan_file_name] could have written."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and bool(PLAN_NAME_RE.match(name))


def _cc_tag(compute_capability: Sequence[int]) -> str:
    cc = [int(v) for v in compute_capability]
    if len(cc) != 2 or any(v < 0 for v in cc):
        raise InputError(f"compute_capability must be (major, minor), got {tuple(compute_capability)!r}")
    return f"sm{cc[0]}{cc[1]}"


def plan_file_name(
    role: str, tensorrt_version: str, compute_capability: Sequence[int], rows: RowProfile, graph_file: str | None = None
) -> str:
    """The file name of a plan: role (or ControlNet graph), TensorRT version, compute capability and profile rows.

    Args:
        role: ``encoder``, ``decoder``, ``controlnet``, or a decoder schedule's graph role
            (``decoder_capture_d<d>``, ``shallow_d<d>``, ``input_conv``).
        tensorrt_version: ``tensorrt.__version__``.
        compute_capability: ``(major, minor)`` of the GPU.
        rows: the profile.
        graph_file: for ``controlnet``, the ControlNet graph's file (``controlnet-<sha16>.onnx``),
            whose stem names the plan, so that each ControlNet has its own.

    Returns:
        For example ``decoder.trt10.13.0.35.sm90.rows1-20-30.plan`` or
        ``controlnet-0123456789abcdef.trt10.13.0.35.sm90.rows1-2-2.plan``.
    """
    if role == CONTROLNET:
        if not graph_file:
            raise InputError("a ControlNet plan is named after its graph: pass graph_file='controlnet-<sha16>.onnx'")
        stem = Path(graph_file).stem
    else:
        check_plan_role(role)
        stem = role
    return (
        f"{stem}.trt{_version_tag(tensorrt_version)}.{_cc_tag(compute_capability)}."
        f"rows{rows.min}-{rows.opt}-{rows.max}.plan"
    )


def check_plan_role(role: str) -> None:
    """Refuses a role that no plan of an engine directory's UNet graphs has.

    Raises:
        InputError: naming the roles there are.
    """
    if role not in ROLES and shallow_role_depth(role) is None:
        raise InputError(
            f"role must be one of {', '.join(ROLES)}, decoder_capture_d<d>, shallow_d<d> or {INPUT_CONV} "
            f"(or {CONTROLNET} with its graph), got {role!r}"
        )


def role_rows(profiles: Mapping[str, RowProfile], role: str) -> RowProfile:
    """The profile of a role's plan: the encoder's for ``encoder`` and ``input_conv`` (``conv_in``
    on the encoder's rows), the decoder's for ``decoder`` and the decoder schedules' capture and
    shallow graphs (S steps of N rows, as the decoder)."""
    check_plan_role(role)
    return profiles["encoder" if role in ("encoder", INPUT_CONV) else "decoder"]


def timing_cache_file_name(tensorrt_version: str, compute_capability: Sequence[int]) -> str:
    """The timing cache's file name; one per TensorRT version and compute capability.

    Args:
        tensorrt_version: ``tensorrt.__version__``.
        compute_capability: ``(major, minor)``.

    Returns:
        For example ``timing.trt10.13.0.35.sm90.cache``.
    """
    return f"timing.trt{_version_tag(tensorrt_version)}.{_cc_tag(compute_capability)}.cache"


def as_schedule(schedule: ScheduleSpec | None, num_steps: int) -> KeySchedule | None:
    if schedule is None or isinstance(schedule, KeySchedule):
        return schedule
    return parse_schedule(schedule, num_steps)


# --------------------------------------------------------------------------------------------
# Building plans and their manifest records
# --------------------------------------------------------------------------------------------
def _strongly_typed_flag() -> int:
    """The ``create_network`` flags of a strongly typed network: probed, not assumed."""
    import tensorrt as trt

    flags_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if flags_enum is not None and hasattr(flags_enum, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 11 without the flag: every network is strongly typed


def gpu_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), (int(major), int(minor))


@dataclass
class PlanBuild:
    """What [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans] did for one role.

    Attributes:
        record: the plan's manifest record.
        built: ``False`` when an up-to-date plan was kept.
        seconds: wall seconds spent on this role.
    """

    record: PlanRecord
    built: bool
    seconds: float


def check_level(level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
        raise InputError(
            f"builder_optimization_level must be an integer from 0 to {MAX_OPTIMIZATION_LEVEL}, got {level!r} "
            f"(TensorRT's default is {DEFAULT_OPTIMIZATION_LEVEL}; higher builds slower and may run faster)"
        )


def check_workspace(workspace_bytes: int | None) -> None:
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1 << 20
    ):
        raise InputError(
            f"workspace_bytes must be None (TensorRT's default: the GPU's memory) or at least 1 MiB, got {workspace_bytes!r}"
        )


@dataclass(frozen=True)
class _PlanTarget:
    """One plan to build or keep: its role, profile, the graph it comes from and that graph's contract.

    Attributes:
        role: ``encoder``, ``decoder`` or ``controlnet``.
        rows: the optimization profile.
        graph: the graph's manifest record (``None`` when the manifest records none for the role).
        spec: the graph's inputs and outputs ([`GraphContract`][fd_trt.graphs.contract.GraphContract] or [`ControlNetContract`][fd_trt.graphs.contract.ControlNetContract]).
    """

    role: str
    rows: RowProfile
    graph: Any
    spec: GraphSpec


def _build_plan(
    folder: Path,
    manifest: Manifest,
    target: _PlanTarget,
    *,
    device: torch.device,
    builder_optimization_level: int,
    workspace_bytes: int | None,
    timing_cache: bool,
    refittable: bool = False,
) -> PlanRecord:
    """Builds one plan."""
    import tensorrt as trt

    from fd_trt.graphs.manifest import PlanRecord
    from fd_trt.utils.files import write_atomic

    t0 = time.perf_counter()
    version = str(trt.__version__)
    gpu_name, cc = gpu_identity(device)
    role, rows, graph, spec = target.role, target.rows, target.graph, target.spec
    if graph is None:
        fix = (
            "the pipeline exports a decoder schedule's graphs on first use, or call "
            "fd_trt.graphs.shallow.build_shallow_graphs(unet, engine_dir, depth)"
            if shallow_role_depth(role) is not None
            else f"rebuild with fd-trt build --backend tensorrt --force --out {folder}"
        )
        raise EngineMismatchError(f"{folder}/manifest.json records no {role} graph: {fix}")
    onnx_path = folder / graph.file
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = _strongly_typed_flag()
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineMismatchError(
            f"TensorRT {version} could not parse {onnx_path}: {'; '.join(errors[:3]) or 'no detail'}; re-export the graphs "
            f"with fd-trt build --backend tensorrt --force --out {folder}"
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = builder_optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if flags == 0 and manifest.precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
        # Only where strong typing cannot be asked for but the FP16 flag exists (never on 10.x/11.x
        # as released): the graph's fp16 types then need the flag to keep fp16 kernels.
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        # REFIT, not REFIT_IDENTICAL (refits only with the build's own weights: for weight-stripped
        # plans, not for a LoRA) nor STRIP_PLAN (plans without weights, refit from the graph on
        # every load). TensorRT 11.3 lists a known issue where a REFIT plan may drop a GEMM bias;
        # tests/test_tensorrt.py compares refittable plans with ONNX Runtime on a GPU, and
        # refittable=False builds plain plans.
        if hasattr(trt.BuilderFlag, "REFIT"):
            config.set_flag(trt.BuilderFlag.REFIT)
        else:  # not in any TensorRT 10/11 release; recorded as not refittable, so weight changes rebuild
            logger.warning("TensorRT %s has no BuilderFlag.REFIT: the plans cannot take new weights in place", version)
            refittable = False
    shapes: dict[str, list[int]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tensor.shape
        shapes[tensor.name] = [int(dims[k]) for k in range(len(dims))]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    spec.check(
        list(shapes),
        outputs,
        onnx_path,
        f"re-export the graphs with fd-trt build --backend tensorrt --force --out {folder}",
    )
    profile = builder.create_optimization_profile()
    fixed = [t.name for t in spec.inputs if not t.rowed]
    own_rows = {}
    if spec.key_rowed_names:
        # The decoder (and a decoder schedule's capture and shallow graphs): the key step's rows
        # (features, text, added conditioning) are tuned at the encoder's rows but may reach the
        # decoder's maximum (a batch above the build's, one step per call); the timestep (and the
        # shallow graph's hidden state) count the rows of every step in the call (docs/design.md
        # section 3).
        enc = profiles_for_manifest(manifest.encoder_rows, manifest.decoder_rows)["encoder"]
        key_rows = RowProfile(min(enc.min, rows.min), min(enc.opt, rows.max), rows.max)
        own_rows = {name: key_rows for name in spec.key_rowed_names}
    # One profile entry per contract input (its added conditioning included), in the contract's order.
    for name, (lo, opt, hi) in input_profile_shapes(
        rows, {n: shapes[n] for n in spec.input_names}, fixed, own_rows
    ).items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    cache_path = folder / timing_cache_file_name(version, cc)
    if timing_cache:
        try:
            cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        except Exception as exc:  # noqa: BLE001 - a corrupt cache (a killed writer before atomic writes) only costs time
            logger.warning("%s is unreadable (%s); starting a new timing cache", cache_path, exc)
            cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            logger.warning(
                "%s does not fit TensorRT %s on %s; starting a new timing cache", cache_path, version, gpu_name
            )
            config.set_timing_cache(config.create_timing_cache(b""), False)
    logger.info(
        "building the TensorRT %s plan (rows %s, optimization level %d) on %s",
        role,
        rows.as_list(),
        builder_optimization_level,
        gpu_name,
    )
    with torch.cuda.device(device):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FdTrtError(
            f"TensorRT {version} could not build the {role} plan from {onnx_path} for rows {rows.as_list()} (TensorRT's "
            "own messages above say why); on a small GPU lower the decoder's rows (--max-segment-steps) or set "
            "--workspace-gb"
        )
    data = memoryview(plan)
    file = plan_file_name(role, version, cc, rows, graph.file if role == CONTROLNET else None)
    write_atomic(folder / file, data)
    if timing_cache:
        write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    logger.info("built %s (%.1f MB) in %.1f s", file, data.nbytes / 1e6, seconds)
    return PlanRecord(
        role=role,
        file=file,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=int(data.nbytes),
        tensorrt_version=version,
        gpu_name=gpu_name,
        compute_capability=list(cc),
        rows=rows.as_list(),
        graph_sha256=graph.sha256,
        builder_optimization_level=builder_optimization_level,
        workspace_bytes=workspace_bytes,
        built_at=time.time(),
        build_seconds=seconds,
        refittable=refittable,
        frames=int(manifest.frames or 0),
    )


def build_plans(
    engine_dir: str | os.PathLike[str],
    *,
    device: torch.device | str = "cuda",
    schedule: ScheduleSpec | None = None,
    num_steps: int = DEFAULT_PROFILE_STEPS,
    opt_segment_steps: int | None = None,
    builder_optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    workspace_bytes: int | None = None,
    timing_cache: bool = True,
    force: bool = False,
    roles: Sequence[str] = ROLES,
    refittable: bool = True,
) -> list[PlanBuild]:
    """Builds the TensorRT plans of an engine directory for this GPU and TensorRT version.

    Plans that are already recorded for this TensorRT version, compute capability, graph and
    profile are kept. Plans for other GPUs or versions stay in the directory and the manifest
    (an engine directory can serve several machines); they are simply not used here.

    Args:
        engine_dir: an engine directory with ``encoder.onnx`` / ``decoder.onnx``
            (``fd-trt build --backend tensorrt``).
        device: the CUDA device to build for.
        schedule: the schedule whose segments pick the decoder's opt rows (``paper`` by default).
        num_steps: the step count the schedule is read for.
        opt_segment_steps: the decoder's opt segment length, overriding the schedule's.
        builder_optimization_level: 0 (fast build) .. 5 (slow build, maybe faster engine); 3 is
            TensorRT's default.
        workspace_bytes: the builder's workspace pool limit; TensorRT's default when ``None``.
        timing_cache: read and update the timing cache file in the engine directory.
        force: rebuild even when an up-to-date plan exists.
        roles: which plans to build: ``encoder`` and ``decoder``, or a decoder schedule's graphs
            (``decoder_capture_d<d>`` and ``shallow_d<d>`` on the decoder's profile, ``input_conv``
            on the encoder's), once [`fd_trt.graphs.shallow.build_shallow_graphs()`][fd_trt.graphs.shallow.build_shallow_graphs] recorded them.
        refittable: build with ``BuilderFlag.REFIT``, so that new weights (a fused LoRA) can be
            refit into the plans in place (`TrtRunner.refit()`) instead of rebuilding them.
            ``REFIT``, not ``REFIT_IDENTICAL``: the latter only allows refitting the build's own
            weights (it exists for weight-stripped plans), not a LoRA's. Plans kept from an
            earlier build keep their own setting (recorded as ``refittable`` in the manifest).

    Returns:
        One [`PlanBuild`][fd_trt.backends.tensorrt_build.PlanBuild] per role.

    Raises:
        BackendUnavailableError: without TensorRT or a CUDA GPU.
        EngineMismatchError: for a missing or corrupt engine directory, or a graph TensorRT cannot parse.
        FdTrtError: when TensorRT fails to build.
    """
    for role in roles:
        check_plan_role(role)

    def targets(manifest: Manifest) -> list[_PlanTarget]:
        from fd_trt.graphs.shallow import shallow_spec

        profiles = profiles_for_manifest(
            manifest.encoder_rows, manifest.decoder_rows, as_schedule(schedule, num_steps), opt_segment_steps
        )
        contract = GraphContract.from_manifest(manifest)
        return [
            _PlanTarget(
                role,
                role_rows(profiles, role),
                manifest.graphs.get(role),
                contract.spec(role) if role in ROLES else shallow_spec(manifest, role),
            )
            for role in roles
        ]

    return _build_or_keep_plans(
        engine_dir,
        "TensorRT plan build",
        targets,
        device=device,
        builder_optimization_level=builder_optimization_level,
        workspace_bytes=workspace_bytes,
        timing_cache=timing_cache,
        force=force,
        refittable=refittable,
    )


def _build_or_keep_plans(
    engine_dir: str | os.PathLike[str],
    what: str,
    targets: Callable[[Manifest], list[_PlanTarget]],
    *,
    device: torch.device | str,
    builder_optimization_level: int,
    workspace_bytes: int | None,
    timing_cache: bool,
    force: bool,
    refittable: bool,
) -> list[PlanBuild]:
    """Builds the plans ``targets`` names (from the manifest read under the lock) unless up to date.

    The one implementation behind [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans] (the UNet's graphs) and
    [`build_controlnet_plan()`][fd_trt.backends.tensorrt_build.build_controlnet_plan] (a ControlNet's graph): a plan recorded for this TensorRT
    version, compute capability, graph and profile whose file is intact is kept; any other is
    built and recorded, the manifest rewritten after each plan.
    """
    from fd_trt.graphs.manifest import check_graph_files, engine_dir_lock, find_plan, save_manifest

    check_level(builder_optimization_level)
    check_workspace(workspace_bytes)
    trt_mod = require_tensorrt()
    dev = require_cuda(device)
    folder = Path(engine_dir)
    if not (folder / "manifest.json").is_file():
        check_graph_files(folder)  # raises, naming the build command; no lock file in a folder that is not one
    # Read, build and rewrite under the lock: another process may be building the same plans, and
    # each manifest update must start from the latest manifest, not from one read before a wait.
    with engine_dir_lock(folder, what):
        manifest = check_graph_files(folder)
        version = str(trt_mod.__version__)
        _, cc = gpu_identity(dev)
        results = []
        for target in targets(manifest):
            t0 = time.perf_counter()
            existing = find_plan(
                manifest,
                target.role,
                tensorrt_version=version,
                compute_capability=cc,
                rows=target.rows.as_list(),
                graph=target.graph,
            )
            if existing is not None and not force:
                path = folder / existing.file
                if path.is_file() and path.stat().st_size == existing.bytes:
                    results.append(PlanBuild(existing, False, time.perf_counter() - t0))
                    continue
            record = _build_plan(
                folder,
                manifest,
                target,
                device=dev,
                builder_optimization_level=builder_optimization_level,
                workspace_bytes=workspace_bytes,
                timing_cache=timing_cache,
                refittable=refittable,
            )
            manifest.plans[record.file] = record
            save_manifest(folder, manifest)
            results.append(PlanBuild(record, True, time.perf_counter() - t0))
    return results


def build_controlnet_plan(
    engine_dir: str | os.PathLike[str],
    controlnet_graph: Any,
    *,
    device: torch.device | str = "cuda",
    builder_optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    workspace_bytes: int | None = None,
    timing_cache: bool = True,
    force: bool = False,
    refittable: bool = False,
) -> PlanBuild:
    """Builds (or keeps) the TensorRT plan of one ControlNet graph of an engine directory.

    The ControlNet runs on the encoder's rows, so its profile is the encoder's: ``min`` .. ``2B``
    rows with ``opt = max = 2B`` ([`profiles_for_manifest()`][fd_trt.backends.tensorrt_build.profiles_for_manifest]). ``conditioning_scale`` is a
    static ``[1]`` input. The plan is recorded in the manifest with role ``controlnet`` and the
    ControlNet graph's sha256, so that a changed ControlNet (a new graph) never runs an old plan.

    Args:
        engine_dir: the engine directory.
        controlnet_graph: the graph's [`fd_trt.graphs.manifest.ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord]
            ([`fd_trt.graphs.build.build_controlnet_graph()`][fd_trt.graphs.build.build_controlnet_graph]).
        device, builder_optimization_level, workspace_bytes, timing_cache, force: as [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans].
        refittable: build with ``BuilderFlag.REFIT`` (off: a changed ControlNet gets a new graph and plan).

    Returns:
        The [`PlanBuild`][fd_trt.backends.tensorrt_build.PlanBuild].
    """
    from fd_trt.graphs.manifest import controlnet_key

    def targets(manifest: Manifest) -> list[_PlanTarget]:
        rec = manifest.controlnets.get(controlnet_key(controlnet_graph.controlnet_sha256))
        if rec is None or rec.sha256 != controlnet_graph.sha256:
            raise EngineMismatchError(
                f"{Path(engine_dir)}/manifest.json records no ControlNet graph {controlnet_graph.file} with that "
                "sha256: export it again (fd_trt.graphs.build.build_controlnet_graph)"
            )
        # The ControlNet runs on the encoder's rows.
        rows = profiles_for_manifest(manifest.encoder_rows, manifest.decoder_rows)["encoder"]
        return [_PlanTarget(CONTROLNET, rows, rec, ControlNetContract(int(rec.num_down)).spec)]

    return _build_or_keep_plans(
        engine_dir,
        "TensorRT ControlNet plan build",
        targets,
        device=device,
        builder_optimization_level=builder_optimization_level,
        workspace_bytes=workspace_bytes,
        timing_cache=timing_cache,
        force=force,
        refittable=refittable,
    )[0]


def with_plan(record: PlanRecord, **changes: Any) -> PlanRecord:
    """A copy of a plan's manifest record with some fields changed (a refit's new digest)."""
    from dataclasses import replace

    return replace(record, **changes)


def external_threshold(manifest: Manifest) -> int:
    """Keeps a refit's graphs in the layout of the build's (weights inside or in ``.data``)."""
    from fd_trt.graphs.export import EXTERNAL_DATA_THRESHOLD

    external = any(g.data_file for g in manifest.graphs.values())
    return 0 if external else EXTERNAL_DATA_THRESHOLD


__all__ = [
    "PLAN_NAME_RE",
    "is_plan_file_name",
    "DEFAULT_OPTIMIZATION_LEVEL",
    "DEFAULT_PROFILE_SCHEDULE",
    "DEFAULT_PROFILE_STEPS",
    "INSTALL_HINT",
    "MAX_OPTIMIZATION_LEVEL",
    "PlanBuild",
    "RowProfile",
    "as_schedule",
    "build_controlnet_plan",
    "build_plans",
    "check_level",
    "check_plan_role",
    "check_workspace",
    "external_threshold",
    "gpu_identity",
    "input_profile_shapes",
    "most_common_segment_steps",
    "plan_file_name",
    "profile_rows",
    "profiles_for_manifest",
    "require_cuda",
    "require_tensorrt",
    "role_rows",
    "runtime_problem",
    "tensorrt_available",
    "timing_cache_file_name",
    "with_plan",
]
