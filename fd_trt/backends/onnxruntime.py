"""The ONNX Runtime runner: the encoder and decoder graphs of [`fd_trt.graphs.export`][fd_trt.graphs.export] on ONNX Runtime.

The CPU execution provider is the default, and fd_trt's default backend on machines without a
GPU. With onnxruntime-gpu installed, the CUDA and TensorRT execution providers can be asked for.

Inputs and outputs are bound with IOBinding straight to torch tensors' memory: ONNX Runtime reads
the inputs in place and writes the outputs into tensors allocated here, so no numpy round trip
or copy happens between the graphs and the scheduler.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fd_trt.core.features import Added, Features
from fd_trt.core.runner import Runner, one_capture_depth, step_timesteps
from fd_trt.errors import BackendUnavailableError, EngineMismatchError, FdTrtError, InputError
from fd_trt.graphs.contract import (
    CONDITIONING_SCALE,
    CONTROLNET_COND,
    HIDDEN,
    MID,
    NOISE_PRED,
    SAMPLE,
    TEXT,
    TIMESTEP,
    ControlNetContract,
    GraphContract,
    down_name,
)

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install it with `pip install onnxruntime` (or `pip install .[gpu]` for onnxruntime-gpu), or use backend='torch'"
)
if importlib.util.find_spec("onnxruntime") is None:
    # Fail when the backend is chosen (get_runner_class), not at the first call; nothing is imported here.
    raise BackendUnavailableError(f"the onnxruntime backend needs the onnxruntime package: {_INSTALL_HINT}")

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"

#: Short provider names accepted by [`OrtRunner`][fd_trt.backends.onnxruntime.OrtRunner], mapped to ONNX Runtime's names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_ONNX_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}

ProviderSpec = str | tuple[str, dict[str, Any]]


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the onnxruntime backend cannot import onnxruntime ({exc}): {_INSTALL_HINT}"
        ) from exc
    return onnxruntime


def _resolve_providers(
    providers: Sequence[ProviderSpec] | None, device: torch.device, available: Sequence[str]
) -> list[ProviderSpec]:
    if providers is None:
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    resolved: list[ProviderSpec] = []
    for spec in providers:
        name, opts = (spec, None) if isinstance(spec, str) else (spec[0], spec[1])
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            hint = (
                "install onnxruntime-gpu with `pip install .[gpu]` (and uninstall the CPU-only onnxruntime)"
                if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                else "choose one of the available providers"
            )
            raise BackendUnavailableError(
                f"execution provider {name!r} is not available in this onnxruntime (available: {', '.join(available)}): {hint}"
            )
        if name != "CPUExecutionProvider" and device.type != "cuda":
            raise InputError(
                f"execution provider {name!r} runs on a GPU but the runner's device is {device}: pass device='cuda'"
            )
        resolved.append(name if opts is None else (name, dict(opts)))
    # The CPU provider takes the few nodes a GPU provider rejects, instead of failing the session.
    if not any((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in resolved):
        resolved.append("CPUExecutionProvider")
    return resolved


def _graph_paths(
    engines: str | os.PathLike[str] | None,
    encoder_path: str | os.PathLike[str] | None,
    decoder_path: str | os.PathLike[str] | None,
) -> tuple[Path, Path]:
    if engines is not None:
        folder = Path(engines)
        if not folder.is_dir():
            raise InputError(
                f"engine directory {folder} does not exist: build it first (fd-trt build --backend onnxruntime --out {folder})"
            )
        enc = Path(encoder_path) if encoder_path is not None else folder / ENCODER_FILE
        dec = Path(decoder_path) if decoder_path is not None else folder / DECODER_FILE
        return enc, dec
    if encoder_path is None or decoder_path is None:
        raise InputError(
            "OrtRunner needs an engine directory, or both encoder_path and decoder_path; got "
            f"engines=None, encoder_path={encoder_path!r}, decoder_path={decoder_path!r}"
        )
    return Path(encoder_path), Path(decoder_path)


class _Graph:
    """One inference session and what is needed to bind its inputs and outputs."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = list(session.get_outputs())
        for o in self.outputs:
            if o.type not in _ONNX_TO_TORCH:
                raise EngineMismatchError(f"{path}: output {o.name!r} has type {o.type}, expected float or float16")
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in self.outputs]

    def input_dtype(self, name: str) -> torch.dtype:
        return _ONNX_TO_TORCH[self.inputs[name].type]

    def static_shape(self, index: int, rows: int) -> tuple[int, ...] | None:
        """The output shape at ``rows`` rows, or ``None`` when a non-row axis is symbolic."""
        dims = self.outputs[index].shape
        tail = dims[1:]
        if any(not isinstance(d, int) for d in tail):
            return None
        return (rows, *tail)


#: Session config entries the runner sets on CPU unless the caller's ``session_config`` names them.
#: Spinning intra-op threads wait hot for the next operator after a call ends, which is when the
#: pipeline runs torch on the same cores. Measured in the pipeline on a 2-core AMD EPYC, idle: the
#: default model 0.319 s per image without spinning against 0.630 s with it (whole-segment
#: decoder calls, median of 3), sd15-arch at 128x128 28.2-28.9 s against 30.1-30.6 s.
CPU_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


class OrtRunner(Runner):
    """Runs ``encoder.onnx`` and ``decoder.onnx`` on ONNX Runtime.

    Args:
        engines: a folder with ``encoder.onnx`` and ``decoder.onnx`` (an engine directory).
        encoder_path: the encoder graph, when not ``<engines>/encoder.onnx``.
        decoder_path: the decoder graph, when not ``<engines>/decoder.onnx``.
        device: ``"cpu"``, or ``"cuda[:i]"`` with the CUDA / TensorRT providers.
        providers: execution providers by ONNX Runtime name or alias (``"cpu"``, ``"cuda"``,
            ``"tensorrt"``), optionally as ``(name, options)``; the CPU provider on a CPU device
            and the CUDA provider on a CUDA device when omitted.
        intra_op_threads: threads per operator; ONNX Runtime's default (one per physical core)
            when ``None``.
        inter_op_threads: threads across independent operators (only used by parallel execution).
        warmup: run both graphs once on activation, so that the first real call is not slow.
        warmup_rows: rows of the warm-up calls.
        session_options: extra ``onnxruntime.SessionOptions`` attributes, set as given.
        session_config: session config entries (``add_session_config_entry``). On a CPU device
            the runner sets ``{"session.intra_op.allow_spinning": "0"}`` unless this names the
            key: between two graph calls the pipeline runs torch (the scheduler step, the
            feature tiling, the VAE), and ONNX Runtime threads spinning for their next task
            take the cores from it (README, "ONNX Runtime's batched decoder"). Pass ``"1"`` to
            spin anyway.
        dtype: the precision the caller expects (``fp32`` / ``fp16``); activation fails with
            [`EngineMismatchError`][fd_trt.errors.EngineMismatchError] when the graphs have another. ``None`` takes the graphs'.

    The graphs' float precision (fp32 or fp16) is read from the graphs on activation and becomes
    `dtype`. Constructing the runner reads nothing.
    """

    name = "onnxruntime"

    def __init__(
        self,
        engines: str | os.PathLike[str] | None = None,
        *,
        encoder_path: str | os.PathLike[str] | None = None,
        decoder_path: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        providers: Sequence[ProviderSpec] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        warmup: bool = True,
        warmup_rows: int = 2,
        session_options: dict[str, Any] | None = None,
        session_config: dict[str, str] | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(device, torch.float32)
        if isinstance(engines, torch.nn.Module):
            raise InputError(
                "OrtRunner takes an engine directory, not a UNet: export the graphs first "
                "(fd_trt.graphs.build.build_engines or fd-trt build --backend onnxruntime) and pass the folder"
            )
        if self.device.type not in ("cpu", "cuda"):
            raise InputError(f"device {device!r} is not supported by the onnxruntime runner: use 'cpu' or 'cuda'")
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(warmup_rows, bool) or not isinstance(warmup_rows, int) or warmup_rows < 1:
            raise InputError(f"warmup_rows must be a positive integer, got {warmup_rows!r}")
        expected = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if expected not in (None, torch.float32, torch.float16):
            raise InputError(
                f"onnxruntime graphs are fp32 or fp16, got dtype={dtype!r}: build the graphs at one of those"
            )
        self.expected_dtype: torch.dtype | None = expected
        self.engine_dir = Path(engines) if engines is not None else None
        self.encoder_path, self.decoder_path = _graph_paths(engines, encoder_path, decoder_path)
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.warmup = warmup
        self.warmup_rows = warmup_rows
        self.session_options = dict(session_options or {})
        self.session_config = {str(k): str(v) for k, v in (session_config or {}).items()}
        if self.device.type == "cpu":
            for key, value in CPU_SESSION_CONFIG.items():
                self.session_config.setdefault(key, value)
        self._enc: _Graph | None = None
        self._dec: _Graph | None = None
        self._controlnets: dict[tuple[str, str], OrtControlNet] = {}
        self._shallow: dict[int, tuple[_Graph, _Graph, _Graph | None]] = {}
        #: The graphs' contract (after activation): their names, order and added conditioning.
        self.contract: GraphContract | None = None

    # lifecycle -----------------------------------------------------------------------------
    def _make_options(self, ort: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if self.intra_op_threads is not None:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            opts.inter_op_num_threads = self.inter_op_threads
        for key, value in self.session_options.items():
            if not hasattr(opts, key):
                raise InputError(f"session_options has {key!r}, which onnxruntime.SessionOptions does not know")
            setattr(opts, key, value)
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        return opts

    def _load(self, ort: Any, path: Path, providers: list[ProviderSpec], parse_first: bool) -> _Graph:
        from fd_trt.graphs.export import check_graph_file

        if parse_first:
            check_graph_file(path)
        try:
            session = ort.InferenceSession(str(path), self._make_options(ort), providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind types, with no public base
            raise EngineMismatchError(
                f"onnxruntime could not load {path} ({type(exc).__name__}: {exc}); the graph is corrupt or was built "
                "by an incompatible exporter: rebuild it (fd-trt build --backend onnxruntime)"
            ) from exc
        return _Graph(session, path)

    def _activate(self) -> None:
        ort = _import_ort()
        # With a manifest, comparing file sizes catches truncation for free; without one, each
        # graph is parsed in Python first, because onnxruntime reports a broken protobuf poorly.
        verified = False
        manifest = None
        if self.engine_dir is not None and (self.engine_dir / MANIFEST_FILE).is_file():
            from fd_trt.graphs.manifest import check_graph_files

            manifest = check_graph_files(self.engine_dir)
            names = {rec.file for rec in manifest.graphs.values()}
            verified = (
                self.encoder_path.parent == self.engine_dir
                and self.decoder_path.parent == self.engine_dir
                and {
                    self.encoder_path.name,
                    self.decoder_path.name,
                }
                <= names
            )
        providers = _resolve_providers(self.providers, self.device, ort.get_available_providers())
        enc = self._load(ort, self.encoder_path, providers, parse_first=not verified)
        dec = self._load(ort, self.decoder_path, providers, parse_first=not verified)
        self.contract = self._check_contract(enc, dec, manifest if verified else None)
        graph_dtype = enc.input_dtype(SAMPLE)
        if self.expected_dtype is not None and graph_dtype != self.expected_dtype:
            raise EngineMismatchError(
                f"{enc.path} holds {graph_dtype} graphs but {self.expected_dtype} was asked for: rebuild with "
                f"--precision {'fp16' if self.expected_dtype == torch.float16 else 'fp32'}, or pass dtype=None"
            )
        self._enc, self._dec = enc, dec
        self.dtype = graph_dtype
        logger.info(
            "onnxruntime %s: %s graphs on %s (%s), %s intra-op threads",
            ort.__version__,
            "fp16" if self.dtype == torch.float16 else "fp32",
            self.device,
            ", ".join(p if isinstance(p, str) else p[0] for p in enc.session.get_providers()),
            self.intra_op_threads or "default",
        )
        if self.warmup:
            self._warm_up()

    def _deactivate(self) -> None:
        self._enc = self._dec = None
        self._controlnets.clear()
        self._shallow.clear()
        self.contract = None

    def controlnet(self, record: Any) -> OrtControlNet:
        """The ControlNet graph of ``record`` ([`fd_trt.graphs.manifest.ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord], a file of
        this runner's engine directory) in its own session, with this runner's providers and
        options; loaded on first use and kept until `deactivate()`.

        Raises:
            EngineMismatchError: when the graph's names are not the ControlNet contract's.
        """
        self._check_active()
        if self.engine_dir is None:
            raise InputError(
                "this OrtRunner was given graph paths, not an engine directory: ControlNet graphs live in one"
            )
        key = (str(record.file), str(record.sha256))
        with self._lock:
            cn = self._controlnets.get(key)
            if cn is None:
                ort = _import_ort()
                providers = _resolve_providers(self.providers, self.device, ort.get_available_providers())
                graph = self._load(ort, self.engine_dir / record.file, providers, parse_first=True)
                spec = ControlNetContract(int(record.num_down)).spec
                spec.check(graph.input_names, graph.output_names, graph.path, "rebuild it (delete it and call again)")
                pooled = bool(record.controlnet_config.get("global_pool_conditions", False))
                cn = self._controlnets[key] = OrtControlNet(self, graph, int(record.num_down), pooled)
            return cn

    def _check_contract(self, enc: _Graph, dec: _Graph, manifest: Any = None) -> GraphContract:
        """The graphs' contract: the manifest's when there is one, else the one the encoder's names imply."""
        if manifest is not None:
            contract = GraphContract.from_manifest(manifest)
            contract.encoder.check(enc.input_names, enc.output_names, enc.path, "rebuild the engine directory")
        else:
            contract = GraphContract.from_encoder_io(enc.input_names, enc.output_names, enc.path)
        contract.decoder.check(
            dec.input_names,
            dec.output_names,
            dec.path,
            f"it does not fit {enc.path} (the graphs come from different exports); rebuild both",
        )
        if enc.input_dtype(SAMPLE) != dec.input_dtype(MID):
            raise EngineMismatchError(
                f"{enc.path} is {enc.inputs['sample'].type} but {dec.path} is {dec.inputs['mid'].type}: "
                "rebuild both graphs at one precision"
            )
        return contract

    def _warm_up(self) -> None:
        enc, contract = self._enc, self.contract
        assert enc is not None and contract is not None
        n = self.warmup_rows
        shapes = {name: enc.inputs[name].shape for name in contract.encoder.input_names if name != TIMESTEP}
        if any(not isinstance(d, int) for s in shapes.values() for d in s[1:]):
            logger.debug("skipping warm-up: the encoder's input shapes are not static")
            return
        zeros = {name: torch.zeros((n, *shape[1:]), device=self.device) for name, shape in shapes.items()}
        t = torch.full((n,), 500.0, device=self.device)
        added = {name: zeros[name] for name in contract.added_names} or None
        feats = self._encode(zeros[SAMPLE], t, zeros[TEXT], added)
        self._decode(feats, t[:1], zeros[TEXT], added)

    # inference -----------------------------------------------------------------------------
    def _bind_input(self, binding: Any, name: str, tensor: torch.Tensor) -> None:
        import numpy as np

        elem = np.float16 if tensor.dtype == torch.float16 else np.float32
        binding.bind_input(
            name,
            self.device.type,
            self.device.index or 0,
            elem,
            tuple(tensor.shape),
            tensor.data_ptr(),
        )

    def _run(self, graph: _Graph, feeds: dict[str, torch.Tensor], rows: int) -> list[torch.Tensor]:
        import numpy as np

        binding = graph.session.io_binding()
        # Keep every bound tensor referenced until the run is over: ONNX Runtime holds raw pointers.
        held: dict[str, torch.Tensor] = {}
        for name in graph.input_names:
            value = feeds[name].to(self.device, graph.input_dtype(name)).contiguous()
            held[name] = value
            self._bind_input(binding, name, value)
        outputs: list[torch.Tensor | None] = []
        for i, out in enumerate(graph.outputs):
            shape = graph.static_shape(i, rows)
            if shape is None:
                binding.bind_output(out.name, self.device.type, self.device.index or 0)
                outputs.append(None)
                continue
            buf = torch.empty(shape, device=self.device, dtype=_ONNX_TO_TORCH[out.type])
            elem = np.float16 if buf.dtype == torch.float16 else np.float32
            binding.bind_output(out.name, self.device.type, self.device.index or 0, elem, shape, buf.data_ptr())
            outputs.append(buf)
        if self.device.type == "cuda":
            # ONNX Runtime computes on its own stream; the inputs must be ready before it starts.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            graph.session.run_with_iobinding(binding)
        except Exception as exc:
            raise FdTrtError(
                f"onnxruntime failed running {graph.path.name} with input shapes "
                f"{ {k: tuple(v.shape) for k, v in held.items()} }: {exc}"
            ) from exc
        if any(o is None for o in outputs):
            ort_values = binding.get_outputs()
            outputs = [
                o if o is not None else torch.from_numpy(ort_values[i].numpy()).to(self.device)
                for i, o in enumerate(outputs)
            ]
        return [o for o in outputs if o is not None]

    def _check_rows(self, what: str, **tensors: torch.Tensor) -> int:
        rows = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(rows.values())) != 1:
            raise InputError(f"{what} inputs disagree on rows: {rows}; give every input the same axis 0")
        return next(iter(rows.values()))

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        self._check_active()
        self.launches["encoder"] += 1
        return self._encode(sample, timestep, text, added)

    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        self._check_active()
        self.launches["decoder"] += 1
        return self._decode(features, timesteps, text, added)

    def _conditioning(self, added: Added) -> dict[str, torch.Tensor]:
        """The added-conditioning feeds, checked against the graphs' contract."""
        assert self.contract is not None
        names = self.contract.added_names
        given = dict(added or {})
        if set(given) != set(names):
            raise InputError(
                f"these graphs take added conditioning {list(names) or 'none'}, got {sorted(given) or 'none'}"
                + ("" if names else ": pass added=None")
            )
        return given

    def _check_sample(self, sample: torch.Tensor) -> None:
        """Refuses latents of another shape than the encoder graph's (fixed after the rows), naming both."""
        assert self._enc is not None and self.contract is not None
        want = self._enc.inputs[SAMPLE].shape[1:]
        if not all(isinstance(d, int) for d in want) or tuple(sample.shape[1:]) == tuple(want):
            return
        frames = self.contract.frames
        what = f"video latents of {frames} frames" if frames else "latents"
        raise InputError(
            f"sample has shape {tuple(sample.shape)}, but {self._enc.path} takes {what} [rows, "
            f"{', '.join(str(d) for d in want)}]: build graphs for this shape (the pipeline builds them on first use; "
            "fd-trt build --height H --width W" + (" --frames F" if frames else "") + ")"
        )

    def _encode(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> Features:
        assert self._enc is not None and self.contract is not None
        cond = self._conditioning(added)
        rows = self._check_rows("encoder", sample=sample, timestep=timestep, text=text, **cond)
        self._check_sample(sample)
        feeds = {SAMPLE: sample, TIMESTEP: timestep.float(), TEXT: text, **cond}
        out = self._run(self._enc, feeds, rows)
        by_name = dict(zip(self._enc.output_names, out))
        names = self.contract.feature_names
        return Features(by_name[names[0]], tuple(by_name[n] for n in names[1:]))

    def _decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        assert self._dec is not None and self.contract is not None
        cond, text = self._conditioning(added), text.to(self.device)
        t_rows = step_timesteps(features, timesteps.to(self.device, torch.float32), text, cond)
        names = self.contract.feature_names
        if len(features.skips) + 1 != len(names):
            raise InputError(
                f"features have {len(features.skips)} skips but the graphs carry {len(names) - 1}: pass the features "
                "this runner's encode() returned"
            )
        # The graph repeats the key step's rows for the S steps itself (docs/design.md section 3).
        feeds: dict[str, torch.Tensor] = dict(zip(names, features.tensors()))
        feeds.update({TIMESTEP: t_rows, TEXT: text, **cond})
        (noise,) = self._run(self._dec, feeds, int(t_rows.shape[0]))
        return noise.float()

    # shallow decoder steps (fd_trt.graphs.shallow) -----------------------------------------
    def _shallow_graphs(self, depth: int) -> tuple[_Graph, _Graph, _Graph | None]:
        """The depth's capture and shallow graphs (and ``conv_in``'s at depth 1) of the runner's engine
        directory ([`fd_trt.graphs.shallow`][fd_trt.graphs.shallow]), loaded once and checked against their contracts."""
        from fd_trt.graphs.manifest import load_manifest
        from fd_trt.graphs.shallow import INPUT_CONV_ROLE, load_shallow_specs, shallow_graph_paths

        self._check_active()
        if self.engine_dir is None:
            raise InputError(
                "this OrtRunner was given graph paths, not an engine directory: shallow graphs live in one"
            )
        cache = self._shallow
        with self._lock:
            if depth not in cache:
                ort = _import_ort()
                providers = _resolve_providers(self.providers, self.device, ort.get_available_providers())
                cap_path, sh_path = shallow_graph_paths(self.engine_dir, depth)
                manifest = load_manifest(self.engine_dir)
                cap_spec, sh_spec = load_shallow_specs(manifest, depth)
                cap = self._load(ort, cap_path, providers, parse_first=True)
                sh = self._load(ort, sh_path, providers, parse_first=True)
                fix = "rebuild it (delete it and run again)"
                cap_spec.check(cap.input_names, cap.output_names, cap.path, fix)
                sh_spec.check(sh.input_names, sh.output_names, sh.path, fix)
                conv = None
                rec = manifest.graphs.get(INPUT_CONV_ROLE)
                if rec is not None:
                    conv = self._load(ort, self.engine_dir / rec.file, providers, parse_first=True)
                cache[depth] = (cap, sh, conv)
            return cache[depth]

    def decode_capture(
        self,
        features: Features,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        depth = one_capture_depth(self.name, depths)
        cap, _, _ = self._shallow_graphs(depth)
        assert self.contract is not None
        cond, text = self._conditioning(added), text.to(self.device)
        t_rows = step_timesteps(features, timesteps.to(self.device, torch.float32), text, cond)
        feeds: dict[str, torch.Tensor] = dict(zip(self.contract.feature_names, features.tensors()))
        feeds.update({TIMESTEP: t_rows, TEXT: text, **cond})
        self.launches["decoder"] += 1
        by_name = dict(zip(cap.output_names, self._run(cap, feeds, int(t_rows.shape[0]))))
        return by_name[NOISE_PRED].float(), {depth: by_name[HIDDEN]}

    def decode_shallow(
        self,
        hidden: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        _, sh, _ = self._shallow_graphs(len(skips))
        assert self.contract is not None
        cond, text = self._conditioning(added), text.to(self.device)
        t_rows = step_timesteps(Features(skips[0], tuple(skips)), timesteps.to(self.device, torch.float32), text, cond)
        feeds: dict[str, torch.Tensor] = {HIDDEN: hidden, **dict(zip(self.contract.feature_names[1:], skips))}
        feeds.update({TIMESTEP: t_rows, TEXT: text, **cond})
        self.launches["shallow"] = self.launches.get("shallow", 0) + 1
        (noise,) = self._run(sh, feeds, int(t_rows.shape[0]))
        return noise.float()

    def input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        _, _, conv = self._shallow_graphs(1)
        if conv is None:
            raise EngineMismatchError(
                f"{self.engine_dir} has no input-conv graph: rebuild the shallow graphs of depth 1 (delete "
                "decoder-capture-d1.onnx and run again)"
            )
        (out,) = self._run(conv, {SAMPLE: sample}, int(sample.shape[0]))
        return out


class OrtControlNet:
    """One ControlNet graph on ONNX Runtime, called like diffusers' ``ControlNetModel``
    (`fd_trt.pipelines.conditioning.ControlNetCall`): ``(sample, timestep, encoder_hidden_states,
    controlnet_cond, conditioning_scale, guess_mode) -> (down residuals, mid residual)``.

    The timestep may be one value for all rows (the sampler's key step) or one per row. Guess
    mode runs the graph at scale 1 and applies diffusers' per-residual guess-mode scales
    (`fd_trt.pipelines.conditioning.guess_mode_scales()`), except for pooled ControlNets, as diffusers.
    """

    def __init__(self, runner: OrtRunner, graph: _Graph, num_down: int, pooled: bool) -> None:
        self.runner = runner
        self.graph = graph
        self.num_down = num_down
        self.pooled = pooled
        #: Graph executions so far.
        self.calls = 0

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

        rows = int(sample.shape[0])
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).to(self.runner.device)
        if t.numel() == 1:
            t = t.expand(rows)
        guess = guess_mode and not self.pooled
        scale = torch.tensor([1.0 if guess else float(conditioning_scale)], dtype=torch.float32)
        feeds = {
            SAMPLE: sample,
            TIMESTEP: t,
            TEXT: encoder_hidden_states,
            CONTROLNET_COND: controlnet_cond,
            CONDITIONING_SCALE: scale,
        }
        bad = {k: tuple(v.shape) for k, v in feeds.items() if k != CONDITIONING_SCALE and int(v.shape[0]) != rows}
        if bad:
            raise InputError(
                f"ControlNet inputs disagree on rows: sample has {rows}, {bad}; give every input the same axis 0"
            )
        out = self.runner._run(self.graph, feeds, rows)
        self.calls += 1
        by_name = dict(zip(self.graph.output_names, out))
        down = [by_name[down_name(i)] for i in range(self.num_down)]
        mid = by_name[MID]
        if guess:
            scales = guess_mode_scales(self.num_down, conditioning_scale).tolist()
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        return down, mid


__all__ = ["OrtControlNet", "OrtRunner", "PROVIDER_ALIASES"]
