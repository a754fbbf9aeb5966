"""The TensorRT runner: loads an engine directory's plans, binds their buffers, executes them
(optionally through CUDA graphs) and refits new weights into them. Building the plans (profiles,
names, timing cache, manifest records) is [`fd_trt.backends.tensorrt_build`][fd_trt.backends.tensorrt_build]'s, as polygraphy
keeps its loaders apart from its ``TrtRunner``; the names it exports are re-exported here.

Runtime (docs/design.md section 5). Plans are deserialized once; every input and output is a torch
CUDA tensor preallocated at the profile's maximum rows, and each call uses its first rows, so
tensor addresses never change. Which tensors there are, and how the decoder's rows are laid out
(step-major), is the graph contract's ([`fd_trt.graphs.contract.GraphContract`][fd_trt.graphs.contract.GraphContract], read from the
manifest): the decoder takes the key step's features, text and SDXL conditioning once, at N
rows (their profile is tuned at the encoder's rows and reaches the decoder's maximum, for a
batch above the build's decoded one step per call), and S*N timesteps, and
repeats the N rows for the S steps inside the plan. Calls
run with ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` on a non-default
stream that is ordered after the caller's stream. The two execution contexts share one scratch
allocation (user-managed device memory) because they never run at the same time. With
``cuda_graphs=True`` every (graph, row counts) pair is captured into a CUDA graph after one
warm-up run, then replayed.

Encoder calls with more rows than the encoder profile's maximum run in chunks of that maximum
(plans built for one image serve eight), and decoder calls in as many executions as the profile
needs; ``launches`` counts each execution.

Decoder schedules (``deepcache:N``, ``combined:...``; [`fd_trt.graphs.shallow`][fd_trt.graphs.shallow]):
the plans of a shallow depth's capture and shallow graphs (and ``conv_in``'s at depth 1) are
selected or built on the first call that needs them, as the encoder's and decoder's are, from the
graphs the pipeline exported into the directory; they run like the decoder (the key step's rows
once, S*N step rows), share the scratch allocation, and are refit with the other plans.

Weight changes (a fused LoRA). Plans are built refittable (``BuilderFlag.REFIT``);
[`TrtRunner.refit()`][fd_trt.backends.tensorrt.TrtRunner.refit] re-exports the graphs from the new weights and refits the loaded engines
from them by initializer name, then writes the refitted plans and the manifest back, under the
directory's lock, so that no process loads a plan with old weights. Non-refittable plans make
``refit`` return ``False``, and the pipeline rebuilds.

``tensorrt`` is imported only inside functions: importing this module needs neither TensorRT
nor CUDA, and what needs them raises [`BackendUnavailableError`][fd_trt.errors.BackendUnavailableError] with an
install hint when they are missing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fd_trt.backends.tensorrt_build import (
    DEFAULT_OPTIMIZATION_LEVEL,
    DEFAULT_PROFILE_STEPS,
    INSTALL_HINT,
    PlanBuild,
    RowProfile,
    as_schedule,
    build_controlnet_plan,
    build_plans,
    check_level,
    check_workspace,
    external_threshold,
    gpu_identity,
    input_profile_shapes,
    most_common_segment_steps,
    plan_file_name,
    profile_rows,
    profiles_for_manifest,
    require_cuda,
    require_tensorrt,
    role_rows,
    runtime_problem,
    tensorrt_available,
    timing_cache_file_name,
    with_plan,
)
from fd_trt.core.features import Added, Features, added_tensors
from fd_trt.core.runner import Runner, one_capture_depth
from fd_trt.core.schedule import ScheduleSpec
from fd_trt.errors import EngineMismatchError, FdTrtError, InputError
from fd_trt.graphs.contract import (
    CONDITIONING_SCALE,
    CONTROLNET,
    CONTROLNET_COND,
    HIDDEN,
    INPUT_CONV,
    MID,
    NOISE_PRED,
    ROLES,
    SAMPLE,
    TEXT,
    TIMESTEP,
    ControlNetContract,
    GraphContract,
    capture_role,
    shallow_role,
    shallow_role_depth,
    shallow_roles,
)

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type-check the calls; nothing is imported at run time
    import tensorrt as trt

    from fd_trt.graphs.manifest import Manifest, PlanRecord

logger = logging.getLogger(__name__)


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
    }
    if trt_dtype not in table:
        raise EngineMismatchError(
            f"a plan tensor has TensorRT type {trt_dtype}, which fd_trt does not bind: rebuild the plans"
        )
    return table[trt_dtype]


def _device_memory_size(engine: trt.ICudaEngine) -> int:
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)  # TensorRT 10.0, before the _v2 property


def _create_context(engine: trt.ICudaEngine, user_memory: bool) -> tuple[trt.IExecutionContext | None, bool]:
    """An execution context, with user-managed scratch memory when asked and available.

    Returns:
        ``(context or None on failure, whether its scratch memory is user-managed)``.
    """
    import tensorrt as trt

    if user_memory:
        strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategies is not None and hasattr(strategies, "USER_MANAGED"):
            return engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED), True
        if hasattr(engine, "create_execution_context_without_device_memory"):  # before the allocation strategies
            return engine.create_execution_context_without_device_memory(), True
        logger.info("this TensorRT cannot hand scratch memory to its contexts; each context allocates its own")
    return engine.create_execution_context(), False


def _set_device_memory(context: trt.IExecutionContext, address: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:  # TensorRT 10.0: the property, before set_device_memory(address, size)
        context.device_memory = address  # type: ignore[attr-defined]  # 10.0-only property, not in the 10.13 stubs


@dataclass
class _Engine:
    """One deserialized plan, its context, buffers and captured CUDA graphs."""

    role: str
    path: Path
    engine: trt.ICudaEngine = field(repr=False)  # deleted on deactivation: repr must not read it
    context: trt.IExecutionContext = field(repr=False)
    user_managed: bool  # whether the context waits for scratch memory from us
    inputs: list[str]
    outputs: list[str]
    tails: dict[str, tuple[int, ...]]
    min_rows: int
    max_rows: int
    buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # The (rows, key rows) the context's input shapes are set for.
    rows: tuple[int, int] = (0, 0)
    # One captured graph per (rows, key rows); None where TensorRT refused the capture (plain launches then).
    graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = field(default_factory=dict, repr=False)
    # Inputs without a row axis (the ControlNet's conditioning_scale): bound at their one static shape.
    fixed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Inputs with the key step's rows (the decoder's features, text and added conditioning, one
    # copy for all the steps of a call), and the most rows their profile takes.
    key_inputs: tuple[str, ...] = ()
    key_max_rows: int = 0
    # The ``launches`` key its executions count under (the role when empty): a decoder schedule's
    # capture plan runs the whole decoder and counts as ``decoder``, its shallow plan as ``shallow``.
    counter: str = ""


class TrtRunner(Runner):
    """Runs an engine directory's TensorRT plans (built here on first use when missing).

    Args:
        engines: an engine directory built with ``fd-trt build --backend tensorrt``.
        device: the CUDA device.
        dtype: the graph precision the caller expects (``fp16`` or ``fp32``); activation fails
            with [`EngineMismatchError`][fd_trt.errors.EngineMismatchError] when the directory holds the other. ``None`` takes
            the directory's.
        schedule: the schedule whose segments pick the decoder profile's opt rows; with neither
            this nor ``opt_segment_steps``, any plan recorded for this GPU is used.
        num_steps: the step count ``schedule`` is read for.
        opt_segment_steps: the decoder's opt segment length.
        build: build missing plans on activation; ``False`` refuses instead.
        builder_optimization_level: see [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans].
        workspace_bytes: see [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans].
        timing_cache: see [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans].
        cuda_graphs: capture one CUDA graph per (graph, row count) after a warm-up run, and
            replay it afterwards.
        share_memory: give both execution contexts one user-managed scratch allocation.
        warmup: run both plans once on activation.
        full_hash: check the plans' sha256 on activation, not only their sizes.
        refittable: build missing plans refittable (see [`build_plans()`][fd_trt.backends.tensorrt_build.build_plans]), so that
            [`refit()`][fd_trt.backends.tensorrt.TrtRunner.refit] can take new weights in place.

    Encoder calls with more rows than the encoder plan's profile run in chunks of the profile's
    maximum (plans built for 1 image serve 8), as decoder calls do.

    Raises:
        BackendUnavailableError: at construction, without TensorRT or a CUDA GPU.
    """

    name = "tensorrt"
    thread_safe = False

    def __init__(
        self,
        engines: str | os.PathLike[str],
        *,
        device: torch.device | str = "cuda",
        dtype: str | torch.dtype | None = None,
        schedule: ScheduleSpec | None = None,
        num_steps: int = DEFAULT_PROFILE_STEPS,
        opt_segment_steps: int | None = None,
        build: bool = True,
        builder_optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
        workspace_bytes: int | None = None,
        timing_cache: bool = True,
        cuda_graphs: bool = False,
        share_memory: bool = True,
        warmup: bool = True,
        full_hash: bool = False,
        refittable: bool = True,
    ) -> None:
        if isinstance(engines, torch.nn.Module):
            raise InputError(
                "TrtRunner takes an engine directory, not a UNet: build one first (fd-trt build --backend tensorrt) "
                "and pass the folder"
            )
        require_tensorrt()
        dev = require_cuda(device)
        super().__init__(dev, torch.float16)
        expected = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if expected not in (None, torch.float32, torch.float16):
            raise InputError(f"TensorRT plans are built from fp16 or fp32 graphs, got dtype={dtype!r}: use 'fp16'")
        check_level(builder_optimization_level)
        check_workspace(workspace_bytes)
        self.expected_dtype: torch.dtype | None = expected
        self.engine_dir = Path(engines)
        if not self.engine_dir.is_dir():
            raise InputError(
                f"engine directory {self.engine_dir} does not exist: build it with "
                f"fd-trt build --backend tensorrt --out {self.engine_dir}"
            )
        self.schedule = as_schedule(schedule, num_steps)
        self.opt_segment_steps = opt_segment_steps
        self.build = build
        self.builder_optimization_level = builder_optimization_level
        self.workspace_bytes = workspace_bytes
        self.timing_cache = timing_cache
        self.cuda_graphs = bool(cuda_graphs)
        self.share_memory = bool(share_memory)
        self.warmup = warmup
        self.full_hash = full_hash
        self.refittable = bool(refittable)
        self._refit_failure: str | None = None  # why a refit failed; the runner then refuses to run
        self._enc: _Engine | None = None
        self._dec: _Engine | None = None
        self._runtime: trt.Runtime | None = None
        self._trt_logger: trt.Logger | None = None
        self._scratch: torch.Tensor | None = None
        self._stream: torch.cuda.Stream | None = None
        self._graph_pool: Any = None
        self._controlnets: dict[str, TrtControlNet] = {}
        # A decoder schedule's plans, by shallow depth, then role (loaded on first use).
        self._shallow: dict[int, dict[str, _Engine]] = {}
        #: The plan records in use, by role (after activation).
        self.plans: dict[str, PlanRecord] = {}
        #: The graph contract of the plans (after activation), read from the manifest.
        self.contract: GraphContract | None = None

    # lifecycle -----------------------------------------------------------------------------
    def _select_plan(self, manifest: Manifest, role: str, profiles: dict[str, RowProfile]) -> PlanRecord:
        import tensorrt as trt

        from fd_trt.graphs.manifest import check_plan, find_plan

        version = str(trt.__version__)
        _, cc = gpu_identity(self.device)
        rows = role_rows(profiles, role)
        wanted = rows.as_list() if (self.schedule is not None or self.opt_segment_steps is not None) else None
        record = find_plan(manifest, role, tensorrt_version=version, compute_capability=cc, rows=wanted)
        if record is not None:
            return record
        foreign = [r for r in manifest.plans.values() if r.role == role]
        if not self.build:
            graph = manifest.graphs.get(role)
            for rec in foreign:  # raises, naming what differs
                check_plan(
                    rec,
                    tensorrt_version=version,
                    compute_capability=cc,
                    graph_sha256=graph.sha256 if graph is not None else None,
                    engine_dir=self.engine_dir,
                    frames=manifest.frames,
                )
            build = (
                f"fd-trt build --backend tensorrt --schedule SPEC --out {self.engine_dir} (SPEC the decoder "
                f"schedule you run) or fd_trt.backends.tensorrt.build_plans({str(self.engine_dir)!r}, roles=({role!r},))"
                if shallow_role_depth(role) is not None
                else f"fd-trt build --backend tensorrt --out {self.engine_dir}"
            )
            raise EngineMismatchError(
                f"{self.engine_dir} has no TensorRT {role} plan"
                + (f" with rows {wanted}" if wanted else "")
                + f" for TensorRT {version} on this GPU (sm{cc[0]}{cc[1]}): build it with {build}, or pass build=True"
            )
        if foreign:
            logger.warning(
                "%s: the recorded %s plans are for other GPUs, TensorRT versions, graphs or profiles; "
                "building one for this GPU",
                self.engine_dir,
                role,
            )
        (res,) = build_plans(
            self.engine_dir,
            device=self.device,
            schedule=self.schedule,
            opt_segment_steps=self.opt_segment_steps,
            builder_optimization_level=self.builder_optimization_level,
            workspace_bytes=self.workspace_bytes,
            timing_cache=self.timing_cache,
            roles=(role,),
            refittable=self.refittable,
        )
        manifest.plans[res.record.file] = res.record
        return res.record

    def _rebuild_command(self) -> str:
        """The command that rebuilds this runner's plans, for the messages that refuse one."""
        return f"fd-trt build --backend tensorrt --force --out {self.engine_dir}"

    def _load(
        self,
        role: str,
        record: PlanRecord,
        fixed: tuple[str, ...] = (),
        own_memory: bool = False,
        key_inputs: tuple[str, ...] = (),
    ) -> _Engine:
        """Deserializes a plan and allocates its buffers; ``fixed`` names inputs without a row
        axis, ``own_memory`` gives the context its own scratch memory (the ControlNet's), and
        ``key_inputs`` the inputs with the key step's rows (the decoder's features and text)."""
        import tensorrt as trt

        from fd_trt.graphs.manifest import contained_path
        from fd_trt.utils.files import file_sha256

        path = contained_path(self.engine_dir, record.file)  # a manifest's names stay inside its directory
        fix = f"delete it and rebuild: {self._rebuild_command()}"
        if not path.is_file():
            raise EngineMismatchError(f"the TensorRT {role} plan {path} recorded in the manifest is missing; {fix}")
        if path.stat().st_size != record.bytes or (self.full_hash and file_sha256(path) != record.sha256):
            raise EngineMismatchError(
                f"the TensorRT {role} plan {path} does not match the manifest (truncated or replaced); {fix}"
            )
        assert self._runtime is not None
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT {trt.__version__} could not deserialize {path} (built with TensorRT {record.tensorrt_version} "
                f"on {record.gpu_name}); {fix}"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        tails: dict[str, tuple[int, ...]] = {}
        static: dict[str, tuple[int, ...]] = {}
        for n in names:
            dims = engine.get_tensor_shape(n)
            shape = [int(dims[k]) for k in range(len(dims))]
            if n in fixed:
                if any(d < 1 for d in shape):
                    raise EngineMismatchError(f"{path}: tensor {n!r} has shape {shape} but must be static; {fix}")
                static[n] = tuple(shape)
                continue
            if len(shape) < 1 or any(d < 1 for d in shape[1:]):
                raise EngineMismatchError(f"{path}: tensor {n!r} has shape {shape}; only axis 0 may be dynamic; {fix}")
            tails[n] = tuple(shape[1:])
        rowed = [n for n in inputs if n not in fixed]
        lo_dims, _, hi_dims = engine.get_tensor_profile_shape(next(n for n in rowed if n not in key_inputs), 0)
        key_max = int(engine.get_tensor_profile_shape(key_inputs[0], 0)[2][0]) if key_inputs else 0
        context, user_managed = _create_context(engine, self.share_memory and not own_memory)
        if context is None:
            raise FdTrtError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        entry = _Engine(
            role,
            path,
            engine,
            context,
            user_managed,
            inputs,
            outputs,
            tails,
            int(lo_dims[0]),
            int(hi_dims[0]),
            fixed=static,
            key_inputs=tuple(key_inputs),
            key_max_rows=key_max,
        )
        for n in names:
            rows = key_max if n in key_inputs else entry.max_rows
            entry.buffers[n] = torch.empty(
                static[n] if n in static else (rows, *tails[n]),
                dtype=_torch_dtype(engine.get_tensor_dtype(n)),
                device=self.device,
            )
        return entry

    def _check_contract(self, contract: GraphContract, enc: _Engine, dec: _Engine) -> None:
        fix = "the plans come from another export; rebuild both with fd-trt build --backend tensorrt --force"
        contract.encoder.check(enc.inputs, enc.outputs, enc.path, fix)
        contract.decoder.check(dec.inputs, dec.outputs, dec.path, fix)
        # The latents' fixed axes (a video's frames, the latent height and width): a plan of
        # another export's shape is refused here rather than failing on its first call.
        for e, spec, name in ((enc, contract.encoder, SAMPLE), (dec, contract.decoder, NOISE_PRED)):
            want = tuple(spec.tensor(name).tail)
            if all(isinstance(d, int) for d in want) and e.tails[name] != want:
                frames = f" ({contract.frames} frames)" if contract.frames else ""
                raise EngineMismatchError(
                    f"{e.path} takes {name} [rows, {', '.join(map(str, e.tails[name]))}] but the graphs' contract is "
                    f"[rows, {', '.join(map(str, want))}]{frames}: {fix}"
                )
        for n in contract.feature_names:
            if enc.tails[n] != dec.tails[n] or enc.buffers[n].dtype != dec.buffers[n].dtype:
                raise EngineMismatchError(f"{enc.path} and {dec.path} disagree on {n!r}: rebuild both plans")

    def _activate(self) -> None:
        import tensorrt as trt

        from fd_trt.graphs.manifest import engine_dir_lock

        # Under the directory's lock: the manifest and the plans it names are read as one state,
        # never halfway through another process's build or refit of this directory.
        with engine_dir_lock(self.engine_dir, "loading of the TensorRT plans"):
            self._activate_locked(trt)
        if self.warmup:
            self._warm_up()

    def _activate_locked(self, trt: Any) -> None:
        from fd_trt.graphs.manifest import check_graph_files

        manifest = check_graph_files(self.engine_dir)
        precision = {"fp16": torch.float16, "fp32": torch.float32}.get(manifest.precision)
        if self.expected_dtype is not None and precision != self.expected_dtype:
            raise EngineMismatchError(
                f"{self.engine_dir} holds {manifest.precision} graphs but {self.expected_dtype} was asked for: rebuild with "
                f"fd-trt build --backend tensorrt --precision {'fp16' if self.expected_dtype == torch.float16 else 'fp32'}, "
                "or pass dtype=None"
            )
        profiles = profiles_for_manifest(
            manifest.encoder_rows, manifest.decoder_rows, self.schedule, self.opt_segment_steps
        )
        self._open_runtime(trt)
        records = {role: self._select_plan(manifest, role, profiles) for role in ROLES}
        contract = GraphContract.from_manifest(manifest)
        key_inputs = contract.decoder.key_rowed_names
        enc, dec = (
            self._load("encoder", records["encoder"]),
            self._load("decoder", records["decoder"], key_inputs=key_inputs),
        )
        self._check_contract(contract, enc, dec)
        self._install(trt, enc, dec, records)
        self.contract = contract

    def _open_runtime(self, trt: Any) -> None:
        """TensorRT's logger and runtime, and the side stream the plans run on."""
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self._stream = torch.cuda.Stream(self.device)

    def _install(self, trt: Any, enc: _Engine, dec: _Engine, records: dict[str, PlanRecord]) -> None:
        """Binds the loaded encoder and decoder plans and makes them the ones the runner runs."""
        self._bind([enc, dec])
        self._enc, self._dec, self.plans = enc, dec, records
        self.dtype = enc.buffers[SAMPLE].dtype
        if self.cuda_graphs:
            self._graph_pool = torch.cuda.graph_pool_handle()
        logger.info(
            "tensorrt %s: %s (rows %d..%d) and %s (rows %d..%d) on %s",
            trt.__version__,
            enc.path.name,
            enc.min_rows,
            enc.max_rows,
            dec.path.name,
            dec.min_rows,
            dec.max_rows,
            torch.cuda.get_device_name(self.device),
        )

    def controlnet(self, record: Any) -> TrtControlNet:
        """The TensorRT plan of a ControlNet graph ([`fd_trt.graphs.manifest.ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord]) as a
        `fd_trt.pipelines.conditioning.ControlNetCall`; built on first use when ``build`` is on,
        loaded once, with its own context, buffers (at the encoder profile's rows) and scratch
        memory, and run on the runner's stream.

        Raises:
            EngineMismatchError: with ``build=False`` and no plan for this GPU, or a plan whose
                tensors are not the ControlNet contract's.
        """
        import tensorrt as trt

        from fd_trt.graphs.manifest import engine_dir_lock, find_plan, load_manifest

        self._check_active()
        with self.exclusive():
            cached = self._controlnets.get(record.sha256)
            if cached is not None:
                return cached
            version = str(trt.__version__)
            _, cc = gpu_identity(self.device)
            with engine_dir_lock(self.engine_dir, "loading of a TensorRT ControlNet plan"):
                manifest = load_manifest(self.engine_dir)
                rows = profiles_for_manifest(manifest.encoder_rows, manifest.decoder_rows)["encoder"]
                plan = find_plan(
                    manifest,
                    CONTROLNET,
                    tensorrt_version=version,
                    compute_capability=cc,
                    rows=rows.as_list(),
                    graph=record,
                )
                if plan is None:
                    if not self.build:
                        raise EngineMismatchError(
                            f"{self.engine_dir} has no TensorRT plan of {record.file} for TensorRT {version} on this GPU "
                            f"(sm{cc[0]}{cc[1]}): build it with fd_trt.backends.tensorrt.build_controlnet_plan, or pass build=True"
                        )
                    plan = build_controlnet_plan(
                        self.engine_dir,
                        record,
                        device=self.device,
                        builder_optimization_level=self.builder_optimization_level,
                        workspace_bytes=self.workspace_bytes,
                        timing_cache=self.timing_cache,
                    ).record
                spec = ControlNetContract(int(record.num_down)).spec
                fixed = tuple(t.name for t in spec.inputs if not t.rowed)
                entry = self._load(CONTROLNET, plan, fixed=fixed, own_memory=True)
            spec.check(
                entry.inputs,
                entry.outputs,
                entry.path,
                "delete it and rebuild: fd_trt.backends.tensorrt.build_controlnet_plan(..., force=True)",
            )
            self._bind([entry])
            pooled = bool(record.controlnet_config.get("global_pool_conditions", False))
            cn = self._controlnets[record.sha256] = TrtControlNet(self, entry, int(record.num_down), pooled)
            self.plans[f"{CONTROLNET}:{record.file}"] = plan
            return cn

    def _engines(self) -> list[_Engine]:
        """The UNet's loaded plans: encoder, decoder and a decoder schedule's (not ControlNets')."""
        out = [e for e in (self._enc, self._dec) if e is not None]
        return out + [e for entries in self._shallow.values() for e in entries.values()]

    def _bind(self, entries: list[_Engine]) -> None:
        managed = [e for e in entries if e.user_managed]
        if managed:
            size = max(_device_memory_size(e.engine) for e in managed)
            # One allocation for every context: the plans never run at the same time. Plans loaded
            # later (a decoder schedule's) that need more get a larger one, for all of them.
            if self._scratch is None or self._scratch.numel() < size:
                new = {id(e) for e in managed}
                bound = [e for e in self._engines() if e.user_managed and id(e) not in new]
                if self._stream is not None:
                    self._stream.synchronize()  # no queued work may still use the old allocation
                for e in bound:
                    e.graphs.clear()  # captured with the old allocation's address
                self._scratch = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)
                managed += bound
            for e in managed:
                _set_device_memory(e.context, self._scratch.data_ptr(), self._scratch.numel())
        for e in entries:
            for n, buf in e.buffers.items():
                # Addresses are set once: each call uses the buffers' first rows, whose address is the buffer's.
                if not e.context.set_tensor_address(n, buf.data_ptr()):
                    raise FdTrtError(f"TensorRT refused the address of {n!r} in {e.path}")

    def _deactivate(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        for e in (*self._engines(), *(c.entry for c in self._controlnets.values())):
            e.graphs.clear()
            e.buffers.clear()
            del e.context  # a context before its engine
            del e.engine
        self._enc = self._dec = None
        self._controlnets.clear()
        self._shallow.clear()
        self.contract = None
        self._scratch = None
        self._runtime = None
        self._graph_pool = None

    # weights ------------------------------------------------------------------------------
    def refit(self, unet: Any) -> bool:
        """Takes new weights from ``unet`` (same architecture) into the loaded plans, in place.

        Under the engine directory's lock: the graphs are re-exported from ``unet`` (unless the
        directory already holds these weights, refit by another process), each loaded engine is
        refit from its new graph, matching weights to graph initializers by name
        (``OnnxParserRefitter.refit_from_file``, then ``Refitter.refit_cuda_engine``), the
        refitted engines are serialized back to their plan files atomically, and the manifest is
        rewritten with the new weights' digest, graph and plan records. A later process therefore
        loads the refitted plans, never stale ones. The plans of a decoder schedule that this
        runner has loaded (capture, shallow and ``conv_in`` plans) are refit too, from their
        graphs exported again from ``unet``. Plans of other GPUs, TensorRT versions or profiles,
        and a decoder schedule's plans not loaded here, cannot be refit here and are deleted with
        their records (they would hold the old weights; a decoder schedule's graphs are exported
        again on first use). CUDA graphs are recaptured on the next call.

        Args:
            unet: the UNet with its new weights.

        Returns:
            ``True`` when the plans now compute with ``unet``'s weights. ``False`` when the plans
            were not built refittable ([`build_plans()`][fd_trt.backends.tensorrt_build.build_plans] with ``refittable=False``, or manifests
            from before refits existed), the UNet's config differs, or TensorRT refused the refit;
            the caller then rebuilds (the pipeline does).
        """
        import tensorrt as trt

        from fd_trt.backends.tensorrt_build import is_plan_file_name
        from fd_trt.graphs.build import _export_into
        from fd_trt.graphs.manifest import (
            _with,
            contained_path,
            engine_dir_lock,
            load_manifest,
            package_versions,
            save_manifest,
        )
        from fd_trt.graphs.shallow import export_shallow_into
        from fd_trt.graphs.weights import unet_config_dict, unet_weights_sha256
        from fd_trt.utils.files import file_sha256, write_atomic

        if not self.is_active or self._enc is None or self._dec is None:
            return False
        entries = self._engines()
        not_refittable = [e.path.name for e in entries if not (self.plans[e.role].refittable and e.engine.refittable)]
        if not_refittable:
            logger.warning(
                "%s: the plans %s were not built refittable; their graphs and plans are rebuilt for the new weights",
                self.engine_dir,
                ", ".join(not_refittable),
            )
            return False
        t0 = time.perf_counter()
        digest = unet_weights_sha256(unet)
        with self.exclusive(), engine_dir_lock(self.engine_dir, "TensorRT refit"):
            manifest = load_manifest(self.engine_dir)
            if unet_config_dict(unet) != manifest.unet_config:
                logger.warning("%s: the new UNet has another config; its plans cannot be refit", self.engine_dir)
                return False
            if manifest.unet_sha256 != digest:
                new = _with(manifest, unet_sha256=digest, versions=package_versions())
                new.plans = {}
                _export_into(
                    self.engine_dir,
                    unet,
                    new,
                    latent_size=(manifest.latent_shape[1], manifest.latent_shape[2]),
                    opset=manifest.opset,
                    external_data_threshold=external_threshold(manifest),
                    progress=False,
                    t0=t0,
                    keep_plans=True,
                )
                for stale in set(manifest.plans) - {e.path.name for e in entries}:
                    # Only a plan file this code names and writes, inside the directory: a manifest
                    # is untrusted input, and its names must never make a refit delete other files.
                    if not is_plan_file_name(stale):
                        logger.warning("%s: left %r alone (not a plan file name fd_trt writes)", self.engine_dir, stale)
                        continue
                    contained_path(self.engine_dir, stale).unlink(missing_ok=True)
                    logger.info(
                        "%s: removed %s (it holds the old weights; it is rebuilt where it is used)",
                        self.engine_dir,
                        stale,
                    )
            else:  # the directory holds these weights already (another process refit it, or nothing changed)
                new = manifest
                recorded = [new.plans.get(e.path.name) for e in entries]
                if all(
                    r is not None
                    and e.role in new.graphs
                    and r.sha256 == self.plans[e.role].sha256
                    and r.graph_sha256 == new.graphs[e.role].sha256
                    for r, e in zip(recorded, entries)
                ):
                    return True  # our engines are the recorded plans of these very graphs: nothing to refit
            # A decoder schedule's graphs of the loaded depths, from the new weights (the export
            # above, or another process's refit, dropped them).
            for depth in sorted(self._shallow):
                if any(role not in new.graphs for role in self._shallow[depth]):
                    export_shallow_into(unet, self.engine_dir, new, depth)
            assert self._stream is not None
            self._stream.synchronize()  # TensorRT: refitting an engine with queued work is undefined
            try:
                for e in entries:
                    self._refit_engine(trt, e, self.engine_dir / new.graphs[e.role].file)
            except FdTrtError as exc:
                # A failed refit may have changed some weights: these engines must not run again.
                self._refit_failure = str(exc)
                save_manifest(self.engine_dir, new)  # new graphs, no plans: the next load rebuilds them
                for e in entries:
                    (self.engine_dir / e.path.name).unlink(missing_ok=True)
                logger.warning("%s: %s; the plans are rebuilt", self.engine_dir, exc)
                return False
            for e in entries:
                e.graphs.clear()  # captured with the old weights' memory: recaptured on the next call
                data = e.engine.serialize()
                write_atomic(e.path, memoryview(data))
                record = with_plan(
                    self.plans[e.role],
                    sha256=file_sha256(e.path),
                    bytes=e.path.stat().st_size,
                    graph_sha256=new.graphs[e.role].sha256,
                    refitted_at=time.time(),
                )
                new.plans[record.file] = record
                self.plans[e.role] = record
            save_manifest(self.engine_dir, new)
        logger.info(
            "refit %s with the new weights in %.1f s",
            ", ".join(e.path.name for e in entries),
            time.perf_counter() - t0,
        )
        return True

    def _refit_engine(self, trt: Any, e: _Engine, onnx_path: Path) -> None:
        """Refits one engine from a graph's initializers (matched by name); raises FdTrtError."""
        assert self._trt_logger is not None
        refitter = trt.Refitter(e.engine, self._trt_logger)
        parser = trt.OnnxParserRefitter(refitter, self._trt_logger)
        if not parser.refit_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise FdTrtError(
                f"TensorRT could not refit {e.path.name} from {onnx_path.name}: {'; '.join(errors[:3]) or 'no detail'}"
            )
        missing = refitter.get_missing_weights()
        if missing:
            raise FdTrtError(f"{onnx_path.name} lacks weights that {e.path.name} needs: {', '.join(missing[:5])}")
        if not refitter.refit_cuda_engine():
            raise FdTrtError(f"TensorRT refused to refit {e.path.name} (its messages above say why)")

    def _warm_up(self) -> None:
        enc, contract = self._enc, self.contract
        assert enc is not None and contract is not None
        n = enc.max_rows
        zeros = {name: torch.zeros((n, *enc.tails[name]), device=self.device) for name in contract.encoder.input_names}
        t = torch.full((n,), 500.0, device=self.device)
        added = {name: zeros[name] for name in contract.added_names} or None
        feats = self._encode(zeros[SAMPLE], t, zeros[TEXT], added)
        self._decode(feats, t[:1], zeros[TEXT], added)
        self.synchronize()

    # execution -----------------------------------------------------------------------------
    @staticmethod
    def _check_profile(e: _Engine, rows: int) -> None:
        if not e.min_rows <= rows <= e.max_rows:
            fix = (
                f"--batch {-(-rows // 2)} (images per call; rows are 2 per image with CFG)"
                if e.role in ("encoder", INPUT_CONV)
                else "a larger --batch or --max-segment-steps"
            )
            raise InputError(
                f"{rows} rows are outside the {e.role} plan's profile ({e.min_rows}..{e.max_rows}): rebuild the engine "
                f"directory with fd-trt build --backend tensorrt {fix}"
            )

    def _set_rows(self, e: _Engine, rows: tuple[int, int]) -> None:
        """Sets the input shapes for ``rows = (rows, key rows)``."""
        if e.rows == rows:
            return
        self._check_profile(e, rows[0])
        for n in e.inputs:
            shape = e.fixed[n] if n in e.fixed else (rows[1] if n in e.key_inputs else rows[0], *e.tails[n])
            if not e.context.set_input_shape(n, shape):
                raise FdTrtError(f"TensorRT refused shape {shape} for {n!r} of {e.path}")
        e.rows = rows

    def _enqueue(self, e: _Engine, stream: torch.cuda.Stream) -> None:
        if not e.context.execute_async_v3(stream.cuda_stream):
            raise FdTrtError(f"TensorRT failed to enqueue {e.path} at {e.rows} rows (its messages above say why)")

    def _execute(self, e: _Engine, rows: int, key_rows: int | None = None) -> None:
        """Runs one plan on its buffers' first ``rows`` rows (``key_rows`` of its key-step inputs),
        ordered after the caller's stream."""
        stream = self._stream
        assert stream is not None
        shape = (rows, rows if key_rows is None else key_rows)
        self._set_rows(e, shape)
        key = e.counter or e.role
        self.launches[key] = self.launches.get(key, 0) + 1
        caller = torch.cuda.current_stream(self.device)
        stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(stream):
            if self.cuda_graphs and shape not in e.graphs:
                e.graphs[shape] = self._capture(e, rows, stream)
            graph = e.graphs.get(shape)  # always None without cuda_graphs: nothing is captured then
            if graph is not None:
                graph.replay()
            else:
                self._enqueue(e, stream)
        caller.wait_stream(stream)  # the outputs are read on the caller's stream

    def _capture(self, e: _Engine, rows: int, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph | None:
        """A CUDA graph of one plan at ``rows`` rows, or ``None`` when TensorRT cannot be captured.

        Some plans hold work that a capture cannot record (weight streaming, some plugins); then
        ``execute_async_v3`` fails inside the capture. Such a plan runs with plain launches at that
        row count, with one warning, as trtexec does.
        """
        # A plain run first: TensorRT finishes its per-shape setup, which a capture cannot record.
        self._enqueue(e, stream)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"):
                self._enqueue(e, stream)
        except (FdTrtError, RuntimeError) as exc:
            stream.synchronize()
            logger.warning(
                "%s cannot be captured into a CUDA graph at %d rows (%s); it runs with plain launches there",
                e.path.name,
                rows,
                exc,
            )
            return None
        logger.debug("captured a CUDA graph of %s at %d rows", e.path.name, rows)
        return graph

    def _check_rows(self, what: str, **tensors: torch.Tensor) -> int:
        rows = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(rows.values())) != 1:
            raise InputError(f"{what} inputs disagree on rows: {rows}; give every input the same axis 0")
        return next(iter(rows.values()))

    def _copy_in(self, e: _Engine, name: str, value: torch.Tensor) -> None:
        """Writes ``value`` into the buffer's first rows."""
        tail = e.tails[name]
        if tuple(value.shape[1:]) != tail:
            raise InputError(
                f"{name} has shape {tuple(value.shape)}, but the {e.role} plan takes [rows, {', '.join(map(str, tail))}]: "
                "pass inputs of the size the engine directory was built for"
            )
        e.buffers[name][: value.shape[0]].copy_(value)

    def _check_usable(self) -> None:
        if self._refit_failure is not None:
            raise EngineMismatchError(
                f"this TensorRT runner of {self.engine_dir} failed to refit new weights ({self._refit_failure}) and may "
                "hold a mix of old and new weights: close it and create a new runner, which rebuilds the plans"
            )

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        self._check_active()
        with self.exclusive():  # the plans' buffers and contexts are shared by every call
            self._check_usable()
            return self._encode(sample, timestep, text, added)

    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        self._check_active()
        with self.exclusive():
            self._check_usable()
            return self._decode(features, timesteps, text, added)

    @staticmethod
    def _chunks(e: _Engine, rows: int, max_rows: int | None = None) -> list[tuple[int, int]]:
        """``(start, rows)`` chunks of at most the plan's maximum rows (or ``max_rows``), each at
        least its minimum.

        Full chunks first, then the rest; a rest below the profile's minimum is balanced with the
        chunk before it. Only where no split fits (fewer rows than the minimum) is it an error.
        """
        if rows < e.min_rows:
            TrtRunner._check_profile(e, rows)  # raises, naming the rebuild
        hi = e.max_rows if max_rows is None else max_rows
        sizes = [hi] * (rows // hi)
        rest = rows - sum(sizes)
        if rest:
            sizes.append(rest)
        if len(sizes) > 1 and sizes[-1] < e.min_rows:
            both = sizes[-2] + sizes[-1]
            sizes[-2:] = [both - both // 2, both // 2]
            if sizes[-1] < e.min_rows:
                raise InputError(
                    f"{rows} rows cannot be split into {e.role} plan calls of {e.min_rows}..{e.max_rows} rows: rebuild "
                    "the engine directory with a lower minimum (fd-trt build --backend tensorrt)"
                )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return list(zip(starts, sizes))

    def _conditioning(self, added: Added, rows: int) -> dict[str, torch.Tensor]:
        """The added-conditioning inputs by name, checked against the plans' contract."""
        assert self.contract is not None
        names = self.contract.added_names
        return dict(zip(names, added_tensors(names, added, rows)))

    def _run_rows(self, e: _Engine, inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """Runs a plan whose rows stand alone (the encoder, ``conv_in``, a ControlNet) in chunks of
        its profile's rows; returns copies of the outputs ``names``, all rows."""
        rows = int(next(iter(inputs.values())).shape[0])
        chunks = self._chunks(e, rows)  # before any buffer is written
        for name, value in inputs.items():
            if tuple(value.shape[1:]) != e.tails[name]:
                self._copy_in(e, name, value)  # raises, naming the shape the plan takes
        # Outputs are copies: the next call reuses the buffers while the caller may hold these.
        out = {n: torch.empty((rows, *e.tails[n]), dtype=e.buffers[n].dtype, device=self.device) for n in names}
        for c0, c in chunks:
            for name, value in inputs.items():
                self._copy_in(e, name, value[c0 : c0 + c])
            self._execute(e, c)
            for n in names:
                out[n][c0 : c0 + c].copy_(e.buffers[n][:c])
        return out

    @torch.inference_mode()
    def _encode(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> Features:
        enc, contract = self._enc, self.contract
        assert enc is not None and contract is not None
        rows = self._check_rows("encoder", sample=sample, timestep=timestep, text=text)
        inputs = {SAMPLE: sample, TIMESTEP: timestep.reshape(rows), TEXT: text, **self._conditioning(added, rows)}
        names = contract.feature_names
        out = self._run_rows(enc, inputs, names)
        return Features(out[names[0]], tuple(out[n] for n in names[1:]))

    def _key_inputs(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added
    ) -> dict[str, torch.Tensor]:
        """The decoder's inputs with the key step's rows, checked: features, text, added conditioning."""
        contract = self.contract
        assert contract is not None
        n = features.rows
        if text.shape[0] != n:
            raise InputError(f"text has {text.shape[0]} rows but the features have {n}: pass the encoder's text")
        if timesteps.ndim != 1 or timesteps.shape[0] < 1:
            raise InputError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
        names = contract.feature_names
        if len(features.skips) + 1 != len(names):
            raise InputError(
                f"features have {len(features.skips)} skips but the plans carry {len(names) - 1}: pass the features "
                "this runner's encode() returned"
            )
        return {**dict(zip(names, features.tensors())), TEXT: text, **self._conditioning(added, n)}

    @torch.inference_mode()
    def _decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        dec = self._dec
        assert dec is not None
        (noise,) = self._run_steps(
            dec, self._key_inputs(features, timesteps, text, added), timesteps, {}, (NOISE_PRED,)
        )
        return noise

    @torch.inference_mode()
    def _run_steps(
        self,
        e: _Engine,
        key: dict[str, torch.Tensor],
        timesteps: torch.Tensor,
        step: dict[str, torch.Tensor],
        outputs: tuple[str, ...],
    ) -> list[torch.Tensor]:
        """Runs a plan with step rows (the decoder, a decoder schedule's capture and shallow plans)
        for the S ``timesteps`` of the N rows of ``key`` (the key step's features or skips, text and
        added conditioning), which the plan repeats for every step; ``step`` holds the inputs with
        S*N rows, step-major (the shallow plan's hidden state).

        Returns:
            The ``outputs``, S*N rows each, step-major (``noise_pred`` as float32).
        """
        n = int(next(iter(key.values())).shape[0])
        parts: list[list[torch.Tensor]] = [[] for _ in outputs]
        if n > e.key_max_rows:
            # More rows per step than the plan takes (a batch above the build's): each step in row chunks.
            for k, t in enumerate(timesteps.reshape(-1, 1)):
                for r0, r in self._chunks(e, n, e.key_max_rows):
                    sub_key = {name: v[r0 : r0 + r] for name, v in key.items()}
                    sub_step = {name: v[k * n + r0 : k * n + r0 + r] for name, v in step.items()}
                    for part, out in zip(parts, self._run_steps(e, sub_key, t, sub_step, outputs)):
                        part.append(out)
            return [torch.cat(part) for part in parts]
        # As many steps per execution as the profile takes. The key step's inputs go in once (N
        # rows); the plan repeats them for the S steps of each execution, whose S*N timesteps (and
        # ``step`` inputs) are step-major.
        per_call = e.max_rows // n
        for name, value in key.items():
            self._copy_in(e, name, value)
        for c0 in range(0, int(timesteps.shape[0]), per_call):
            steps = timesteps[c0 : c0 + per_call]
            s = int(steps.shape[0])
            self._check_profile(e, s * n)
            self._copy_in(e, TIMESTEP, steps.reshape(s, 1).expand(s, n).reshape(s * n))
            for name, value in step.items():
                self._copy_in(e, name, value[c0 * n : (c0 + s) * n])
            self._execute(e, s * n, n)
            for part, name in zip(parts, outputs):
                dtype = torch.float32 if name == NOISE_PRED else e.buffers[name].dtype
                part.append(e.buffers[name][: s * n].to(dtype, copy=True))
        return [part[0] if len(part) == 1 else torch.cat(part) for part in parts]

    # decoder schedules (fd_trt.graphs.shallow) ----------------------------------------------
    def _shallow_engines(self, depth: int) -> dict[str, _Engine]:
        """The plans of the depth's capture and shallow graphs (and ``conv_in``'s at depth 1), by
        role: selected, or built, as the encoder's and decoder's are (each from the graph the
        manifest records now, at the decoder's profile; ``conv_in`` at the encoder's), loaded once
        and checked against their contracts. The pipeline exports the graphs into the directory
        on first use ([`fd_trt.graphs.shallow.build_shallow_graphs()`][fd_trt.graphs.shallow.build_shallow_graphs])."""
        from fd_trt.graphs.manifest import check_graph_files, engine_dir_lock
        from fd_trt.graphs.shallow import shallow_graph_paths, shallow_spec

        self._check_active()
        with self.exclusive():
            cached = self._shallow.get(depth)
            if cached is not None:
                return cached
            entries: dict[str, _Engine] = {}
            records: dict[str, PlanRecord] = {}
            with engine_dir_lock(self.engine_dir, f"loading of the TensorRT plans of shallow depth {depth}"):
                shallow_graph_paths(self.engine_dir, depth)  # raises, naming the export, when not recorded
                manifest = check_graph_files(self.engine_dir)
                profiles = profiles_for_manifest(
                    manifest.encoder_rows, manifest.decoder_rows, self.schedule, self.opt_segment_steps
                )
                for role in shallow_roles(depth):
                    record = self._select_plan(manifest, role, profiles)
                    spec = shallow_spec(manifest, role)
                    entry = self._load(role, record, key_inputs=spec.key_rowed_names)
                    spec.check(
                        entry.inputs,
                        entry.outputs,
                        entry.path,
                        f"delete it and rebuild: fd_trt.backends.tensorrt.build_plans(engine_dir, roles=({role!r},), force=True)",
                    )
                    entry.counter = {capture_role(depth): "decoder", shallow_role(depth): "shallow"}.get(role, role)
                    entries[role], records[role] = entry, record
            self._bind(list(entries.values()))
            self._shallow[depth] = entries
            self.plans.update(records)
            logger.info(
                "tensorrt: the shallow depth-%d plans %s", depth, ", ".join(e.path.name for e in entries.values())
            )
            return entries

    def decode_capture(
        self,
        features: Features,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        depth = one_capture_depth(self.name, depths)
        self._check_active()
        with self.exclusive():
            self._check_usable()
            e = self._shallow_engines(depth)[capture_role(depth)]
            key = self._key_inputs(features, timesteps, text, added)
            noise, hidden = self._run_steps(e, key, timesteps, {}, (NOISE_PRED, HIDDEN))
        return noise, {depth: hidden}

    def decode_shallow(
        self,
        hidden: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        if not skips:
            raise InputError("a shallow decoder step needs at least skip_00")
        depth = len(skips)
        self._check_active()
        with self.exclusive():
            self._check_usable()
            e = self._shallow_engines(depth)[shallow_role(depth)]
            assert self.contract is not None
            n = int(skips[0].shape[0])
            if text.shape[0] != n:
                raise InputError(f"text has {text.shape[0]} rows but the skips have {n}: pass the encoder's text")
            if timesteps.ndim != 1 or timesteps.shape[0] < 1:
                raise InputError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
            if hidden.shape[0] != n * timesteps.shape[0]:
                raise InputError(
                    f"hidden has {hidden.shape[0]} rows but {timesteps.shape[0]} steps of {n} rows need "
                    f"{n * timesteps.shape[0]}: pass the hidden states decode_capture() returned for these steps"
                )
            key = {**dict(zip(self.contract.feature_names[1:], skips)), TEXT: text, **self._conditioning(added, n)}
            (noise,) = self._run_steps(e, key, timesteps, {HIDDEN: hidden}, (NOISE_PRED,))
        return noise

    @torch.inference_mode()
    def input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        self._check_active()
        with self.exclusive():
            self._check_usable()
            e = self._shallow_engines(1)[INPUT_CONV]
            (name,) = e.outputs
            return self._run_rows(e, {SAMPLE: sample}, [name])[name]


class TrtControlNet:
    """One ControlNet plan, called like diffusers' ``ControlNetModel``
    (`fd_trt.pipelines.conditioning.ControlNetCall`); see [`TrtRunner.controlnet()`][fd_trt.backends.tensorrt.TrtRunner.controlnet].

    Rows above the plan's maximum (the encoder profile's) run in chunks, like encoder calls.
    Guess mode runs the plan at scale 1 and applies diffusers' per-residual guess-mode scales
    (`fd_trt.pipelines.conditioning.guess_mode_scales()`), except for pooled ControlNets.
    """

    def __init__(self, runner: TrtRunner, entry: _Engine, num_down: int, pooled: bool) -> None:
        self.runner = runner
        self.entry = entry
        self.num_down = num_down
        self.pooled = pooled
        #: Plan executions so far.
        self.calls = 0

    @torch.inference_mode()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        from fd_trt.core.features import guess_mode_scales
        from fd_trt.graphs.contract import down_name

        r, e = self.runner, self.entry
        r._check_active()
        rows = int(sample.shape[0])
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).to(r.device)
        if t.numel() == 1:
            t = t.expand(rows)
        inputs = {SAMPLE: sample, TIMESTEP: t, TEXT: encoder_hidden_states, CONTROLNET_COND: controlnet_cond}
        r._check_rows("ControlNet", **inputs)
        guess = guess_mode and not self.pooled
        names = [down_name(i) for i in range(self.num_down)] + [MID]
        with r.exclusive():
            r._check_usable()
            r._chunks(e, rows)  # raises before the scale is written, for rows the profile cannot take
            e.buffers[CONDITIONING_SCALE].fill_(1.0 if guess else float(conditioning_scale))
            out = r._run_rows(e, inputs, names)
            self.calls += 1
        down, mid = [out[n] for n in names[:-1]], out[MID]
        if guess:
            scales = guess_mode_scales(self.num_down, conditioning_scale).tolist()
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        return down, mid


__all__ = [
    "INSTALL_HINT",
    "TrtControlNet",
    "PlanBuild",
    "RowProfile",
    "TrtRunner",
    "build_controlnet_plan",
    "build_plans",
    "input_profile_shapes",
    "most_common_segment_steps",
    "plan_file_name",
    "profile_rows",
    "profiles_for_manifest",
    "require_cuda",
    "require_tensorrt",
    "runtime_problem",
    "tensorrt_available",
    "timing_cache_file_name",
]
