"""A CPU stand-in for the part of TensorRT's Python API (and of ``torch.cuda``) that fd_trt calls.

CI has no GPU, so the real TensorRT tests skip there. This stand-in lets the CPU run everything
of :mod:`fd_trt.backends.tensorrt` that is fd_trt's own: building plans into the engine
directory and its manifest, plan selection, buffer binding, row slicing, step tiling, decoder
chunking, the shared scratch memory, stream ordering and CUDA-graph replay. It proves nothing
about TensorRT's kernels; ``tests/test_tensorrt.py`` and ``scripts/gpu_check.sh`` do that on a GPU.

It follows the TensorRT 10 API (the names and signatures of ``tensorrt-stubs`` 10.13, which CI
type-checks the backend against) and is strict where TensorRT is:

* a "plan" is the ONNX graph plus its optimization profile; engines run it with ONNX Runtime on
  host memory read from, and written to, the addresses given with ``set_tensor_address``;
* ``execute_async_v3`` fails (returns ``False``) when an input shape or a tensor address is not
  set, a user-managed context has no scratch memory, or the stream is the default one; each run
  fills the scratch memory with NaN bytes, so scratch that overlaps a live buffer shows;
* ``set_input_shape`` refuses shapes outside the profile; ``set_device_memory`` refuses a size
  below ``device_memory_size_v2``; the builder refuses inputs without a profile shape;
* streams are asynchronous: work queued with ``execute_async_v3`` runs only when its stream is
  synchronized or another stream waits for it, so a missing ``wait_stream`` reads stale outputs;
* a captured CUDA graph replays the shapes and addresses it was captured with; an engine marked
  not capturable fails inside a capture, which then raises as torch's does.

Use :func:`install` (with pytest's ``monkeypatch``) to put it in place of ``tensorrt`` and of
the ``torch.cuda`` calls, with the runner's device being the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import io
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__version__ = "10.13.0.fake"
GPU_NAME = "Fake GPU (CPU stand-in)"
COMPUTE_CAPABILITY = (9, 0)
_PLAN_MAGIC = b"FD_TRT_FAKE_PLAN\n"
_CACHE_MAGIC = b"FD_TRT_FAKE_TIMING\n"
#: Scratch bytes an execution context needs per row of its profile's maximum.
SCRATCH_BYTES_PER_ROW = 4096

log = logging.getLogger("fake_tensorrt")


# ---- enums and small types ----------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class BuilderFlag(enum.Enum):
    FP16 = 0
    REFIT = 4


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Dims(tuple):
    def __new__(cls, shape: Any = ()) -> Dims:
        return super().__new__(cls, (int(d) for d in shape))


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}
_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 16: DataType.BF16}


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity


# ---- builder -----------------------------------------------------------------------------------
class _Tensor:
    def __init__(self, name: str, shape: Dims, dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_bytes = b""
        self._inputs: list[_Tensor] = []
        self._outputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, index: int) -> _Tensor:
        return self._inputs[index]

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]


class _ParserErrors:
    """The error list both ONNX parsers of TensorRT report through."""

    _errors: list[str]

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]


class OnnxParser(_ParserErrors):
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[str] = []

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            proto = onnx.load(model)  # with its external data, as TensorRT's parser reads it
        except Exception as exc:  # noqa: BLE001 - the parser reports, it does not raise
            self._errors.append(f"cannot read {model}: {exc}")
            return False

        def tensors(values: Any) -> list[_Tensor]:
            out = []
            for v in values:
                tt = v.type.tensor_type
                dims = Dims(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
                out.append(_Tensor(v.name, dims, _ONNX_TO_TRT[tt.elem_type]))
                # The symbol of a dynamic axis 0: TensorRT derives an output's rows from the inputs'.
                self.network.row_symbols[v.name] = tt.shape.dim[0].dim_param if tt.shape.dim else ""
            return out

        self.network.row_symbols = {}
        self.network._inputs = tensors(proto.graph.input)
        self.network._outputs = tensors(proto.graph.output)
        buf = io.BytesIO()
        onnx.save_model(proto, buf)
        self.network.onnx_bytes = buf.getvalue()
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Dims, opt: Dims, max: Dims) -> None:  # noqa: A002 - TensorRT's names
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        if not (len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi))):
            raise ValueError(f"profile shapes of {input!r} are not min <= opt <= max: {lo}, {mid}, {hi}")
        self.shapes[input] = (lo, mid, hi)


class ITimingCache:
    def __init__(self, entries: int) -> None:
        self.entries = entries

    def serialize(self) -> bytes:
        return _CACHE_MAGIC + str(self.entries).encode()


class IBuilderConfig:
    def __init__(self) -> None:
        self.builder_optimization_level = 3
        self.pool_limits: dict[MemoryPoolType, int] = {}
        self.flags: set[BuilderFlag] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pool_limits[pool] = int(pool_size)

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(0)
        if not data.startswith(_CACHE_MAGIC):
            raise ValueError("not a timing cache")
        return ITimingCache(int(data[len(_CACHE_MAGIC) :]))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        assert self.timing_cache is not None
        return self.timing_cache


class Builder:
    #: Every plan this process built: (network flags, config) pairs, for tests to inspect.
    builds: list[tuple[int, IBuilderConfig]] = []

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if len(config.profiles) != 1:
            log.error("fd_trt plans have one optimization profile, got %d", len(config.profiles))
            return None
        profile = config.profiles[0].shapes
        for t in network._inputs:
            if t.name not in profile:
                log.error("input %r has dynamic shape %s but no profile", t.name, t.shape)
                return None
            for shape in profile[t.name]:
                if len(shape) != len(t.shape) or any(d != s for d, s in zip(t.shape, shape) if d >= 0):
                    log.error("profile shape %s of %r does not fit the network's %s", shape, t.name, t.shape)
                    return None
        if config.timing_cache is not None:
            config.timing_cache.entries += 1
        Builder.builds.append((network.flags, config))
        header = {
            "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))),
            "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
            "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network._outputs],
            "row_symbols": network.row_symbols,
            "level": config.builder_optimization_level,
            "refit": BuilderFlag.REFIT in config.flags,
        }
        return _PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.onnx_bytes


# ---- runtime -----------------------------------------------------------------------------------
def _host_array(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))
    return raw.view(dtype).reshape(shape)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        self.header = header
        self.onnx_bytes = onnx_bytes
        self._io = {name: (Dims(shape), DataType[dtype], TensorIOMode.INPUT) for name, shape, dtype in header["inputs"]}
        self._io.update(
            {name: (Dims(shape), DataType[dtype], TensorIOMode.OUTPUT) for name, shape, dtype in header["outputs"]}
        )
        self._names = list(self._io)
        self.profile = {k: tuple(Dims(s) for s in v) for k, v in header["profile"].items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.contexts: list[IExecutionContext] = []
        #: False makes execute_async_v3 fail during a CUDA-graph capture, as plans TensorRT cannot capture do.
        self._capturable = True

    @property
    def refittable(self) -> bool:
        return bool(self.header.get("refit", False))

    def serialize(self) -> bytes:
        """The plan, with the weights of the latest refit."""
        return _PLAN_MAGIC + json.dumps(self.header).encode() + b"\n" + self.onnx_bytes

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][2] if name in self._io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> Dims:
        return self._io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or name not in self.profile:
            raise ValueError(f"no profile {profile_index} for {name!r}")
        return list(self.profile[name])

    @property
    def device_memory_size_v2(self) -> int:
        max_rows = max(v[2][0] for v in self.profile.values())
        return SCRATCH_BYTES_PER_ROW * max_rows

    def create_execution_context(
        self, strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC
    ) -> IExecutionContext:
        ctx = IExecutionContext(self, strategy)
        self.contexts.append(ctx)
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine = engine
        self.strategy = strategy
        self.shapes: dict[str, Dims] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.runs = 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        dims = Dims(shape)
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            log.error("%r is not an input", name)
            return False
        lo, _, hi = self.engine.profile[name]
        if len(dims) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, dims, hi)):
            log.error("shape %s of %r is outside the profile %s..%s", dims, name, lo, hi)
            return False
        self.shapes[name] = dims
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._io or not memory:
            return False
        self.addresses[name] = int(memory)
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        if self.strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            raise RuntimeError("set_device_memory on a context that manages its own memory")
        if size < self.engine.device_memory_size_v2:
            raise ValueError(
                f"device memory of {size} bytes < the {self.engine.device_memory_size_v2} the engine needs"
            )
        self.device_memory = (int(memory), int(size))

    def _output_shapes(self) -> dict[str, Dims]:
        # Inputs whose axis 0 is static in the network (the ControlNet's conditioning_scale) have no
        # rows; the others have the rows of their axis' symbol ("rows", or the decoder's "step_rows"),
        # and each output those of its own symbol.
        symbols = self.engine.header["row_symbols"]
        rows: dict[str, set[int]] = {}
        for k, s in self.shapes.items():
            if self.engine._io[k][0][0] < 0:
                rows.setdefault(symbols[k], set()).add(int(s[0]))
        assert all(len(v) == 1 for v in rows.values()), f"inputs disagree on rows: {self.shapes}"
        by_symbol = {k: next(iter(v)) for k, v in rows.items()}
        out = {}
        for k, v in self.engine._io.items():
            if v[2] == TensorIOMode.OUTPUT:
                assert symbols[k] in by_symbol, f"output {k!r} has rows {symbols[k]!r}, no input has: {self.shapes}"
                out[k] = Dims((by_symbol[symbols[k]], *v[0][1:]))
        return out

    def execute_async_v3(self, stream_handle: int) -> bool:
        inputs = [n for n in self.engine._names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in self.shapes] + [
            n for n in self.engine._names if n not in self.addresses
        ]
        if missing:
            log.error("execute_async_v3: no shape or address for %s", missing)
            return False
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            log.error("execute_async_v3: a user-managed context without device memory")
            return False
        if stream_handle == 0:
            log.error("execute_async_v3 on the default stream (fd_trt runs on its own stream)")
            return False
        stream = _STREAMS[stream_handle]
        if stream.capture is not None and not self.engine._capturable:
            log.error("execute_async_v3: this engine cannot be captured into a CUDA graph")
            stream.capture.failed = True
            return False
        # What a CUDA graph freezes: the shapes and addresses of this moment.
        job = _Job(self, dict(self.shapes), dict(self.addresses), self._output_shapes(), self.device_memory)
        stream.submit(job)
        return True


class _Job:
    def __init__(
        self,
        ctx: IExecutionContext,
        shapes: dict[str, Dims],
        addresses: dict[str, int],
        out_shapes: dict[str, Dims],
        scratch: tuple[int, int] | None,
    ) -> None:
        self.ctx, self.shapes, self.addresses, self.out_shapes, self.scratch = (
            ctx,
            shapes,
            addresses,
            out_shapes,
            scratch,
        )

    def run(self) -> None:
        engine = self.ctx.engine
        feeds = {
            n: _host_array(self.addresses[n], s, _NP[engine.get_tensor_dtype(n)]).copy() for n, s in self.shapes.items()
        }
        if self.scratch is not None:  # TensorRT's scratch is garbage between runs; make any reader of it see NaN
            ctypes.memset(self.scratch[0], 0xFF, engine.device_memory_size_v2)
        names = list(self.out_shapes)
        for name, value in zip(names, engine.session.run(names, feeds)):
            dst = _host_array(self.addresses[name], self.out_shapes[name], _NP[engine.get_tensor_dtype(name)])
            assert value.shape == dst.shape, (name, value.shape, dst.shape)
            dst[...] = value
        self.ctx.runs += 1


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_PLAN_MAGIC):
            log.error("not a plan")
            return None
        header, onnx_bytes = data[len(_PLAN_MAGIC) :].split(b"\n", 1)
        return ICudaEngine(json.loads(header), onnx_bytes)


# ---- refit ---------------------------------------------------------------------------------------
def _initializers(proto: Any) -> dict[str, Any]:
    return {t.name: t for t in proto.graph.initializer}


class Refitter:
    """Stages new weights for an engine, by name, and swaps them in with ``refit_cuda_engine``.

    Strict where TensorRT is: only a refittable engine (built with ``BuilderFlag.REFIT``) can be
    refit; every weight of the engine must be given (``get_missing_weights``), with its count and
    type unchanged; refitting while the engine has queued work fails (TensorRT: undefined).
    """

    def __init__(self, engine: ICudaEngine, logger: Logger) -> None:
        import onnx

        self.engine = engine
        self.staged: dict[str, Any] = {}
        self._proto = onnx.load_from_string(engine.onnx_bytes)
        if not engine.refittable:
            log.error("Refitter: the engine was not built with BuilderFlag.REFIT")

    def get_missing_weights(self) -> list[str]:
        return sorted(set(_initializers(self._proto)) - set(self.staged))

    def refit_cuda_engine(self) -> bool:
        import onnx
        import onnxruntime as ort

        if not self.engine.refittable:
            log.error("refit_cuda_engine: the engine is not refittable")
            return False
        if self.get_missing_weights():
            log.error("refit_cuda_engine: missing weights %s", self.get_missing_weights()[:5])
            return False
        busy = [h for h, st in _STREAMS.items() if any(job.ctx.engine is self.engine for job in st.pending)]
        if busy:
            log.error("refit_cuda_engine with work queued on streams %s (undefined in TensorRT)", busy)
            return False
        current = _initializers(self._proto)
        for name, tensor in self.staged.items():
            current[name].CopyFrom(tensor)
        self.engine.onnx_bytes = self._proto.SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.engine.session = ort.InferenceSession(self.engine.onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self._proto = onnx.load_from_string(self.engine.onnx_bytes)
        return True


class OnnxParserRefitter(_ParserErrors):
    """Reads an ONNX file's initializers into a :class:`Refitter`, matched to the engine's by name."""

    def __init__(self, refitter: Refitter, logger: Logger) -> None:
        self.refitter = refitter
        self._errors: list[str] = []

    def refit_from_file(self, model: str) -> bool:
        import onnx

        try:
            proto = onnx.load(model)
        except Exception as exc:  # noqa: BLE001 - the parser reports, it does not raise
            self._errors.append(f"cannot read {model}: {exc}")
            return False
        have = _initializers(self.refitter._proto)
        for name, tensor in _initializers(proto).items():
            old = have.get(name)
            if old is None:
                self._errors.append(f"weights {name!r} are not in the engine")
            elif list(old.dims) != list(tensor.dims) or old.data_type != tensor.data_type:
                self._errors.append(f"weights {name!r} changed shape or type: {list(old.dims)} -> {list(tensor.dims)}")
            else:
                self.refitter.staged[name] = tensor
        return not self._errors and not self.refitter.get_missing_weights()


# ---- torch.cuda stand-ins ------------------------------------------------------------------------
_handles = itertools.count(1)
_STREAMS: dict[int, FakeStream] = {}


class FakeStream:
    """An asynchronous stream: queued jobs run when it is synchronized or waited for."""

    def __init__(self, device: Any = None, priority: int = 0, *, handle: int | None = None) -> None:
        self.cuda_stream = next(_handles) if handle is None else handle
        self.pending: list[_Job] = []
        self.capture: FakeCUDAGraph | None = None
        _STREAMS[self.cuda_stream] = self

    def submit(self, job: _Job) -> None:
        if self.capture is not None:
            self.capture.jobs.append(job)
        else:
            self.pending.append(job)

    def synchronize(self) -> None:
        jobs, self.pending = self.pending, []
        for job in jobs:
            job.run()

    def wait_stream(self, stream: FakeStream) -> None:
        # Later work on self runs after stream's queued work: on a host, run that work now.
        stream.synchronize()


class FakeCUDAGraph:
    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.replays = 0
        self.failed = False  # an invalidated capture cannot be replayed

    def replay(self) -> None:
        assert not self.failed, "replay of a graph whose capture failed"
        stream = _current[-1]
        for job in self.jobs:
            stream.pending.append(job)
        self.replays += 1


_current: list[FakeStream] = []


def current_stream(device: Any = None) -> FakeStream:
    return _current[-1]


@contextlib.contextmanager
def stream_context(stream: FakeStream | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    _current.append(stream)
    try:
        yield
    finally:
        _current.pop()


@contextlib.contextmanager
def graph_context(
    cuda_graph: FakeCUDAGraph, pool: Any = None, stream: FakeStream | None = None, capture_error_mode: str = "global"
) -> Iterator[None]:
    assert stream is not None and stream is not _current[0], "capture on a side stream, as torch requires"
    assert not stream.pending, "capture starts with the stream's work done"
    stream.capture = cuda_graph
    _current.append(stream)
    try:
        yield
    finally:
        _current.pop()
        stream.capture = None
    if cuda_graph.failed:  # as torch's capture_end does on an invalidated capture
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def install(monkeypatch: Any) -> Any:
    """Puts this module in place of ``tensorrt`` and the CUDA calls the TensorRT backend makes.

    The backend's ``require_cuda`` then accepts the CPU as its device.

    Returns:
        This module.
    """
    import sys

    import torch

    import fd_trt.backends.tensorrt as backend
    import fd_trt.backends.tensorrt_build as build

    this = sys.modules[__name__]
    _STREAMS.clear()
    _current[:] = [FakeStream(handle=0)]  # the default ("legacy") stream
    Builder.builds = []
    monkeypatch.setitem(sys.modules, "tensorrt", this)
    for module in (backend, build):  # the runner's checks and the builder's
        monkeypatch.setattr(module, "require_cuda", lambda device="cuda": torch.device("cpu"))
    for name, value in {
        "Stream": FakeStream,
        "current_stream": current_stream,
        "stream": stream_context,
        "device": lambda device=None: contextlib.nullcontext(),
        "get_device_capability": lambda device=None: COMPUTE_CAPABILITY,
        "get_device_name": lambda device=None: GPU_NAME,
        "CUDAGraph": FakeCUDAGraph,
        "graph": graph_context,
        "graph_pool_handle": lambda: object(),
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return this


def plan_header(path: Path) -> dict[str, Any]:
    """The build settings a fake plan file records."""
    data = path.read_bytes()
    assert data.startswith(_PLAN_MAGIC), path
    return json.loads(data[len(_PLAN_MAGIC) :].split(b"\n", 1)[0])
