"""Engine directories (DESIGN.md section 4): manifest, hashing, staleness and build orchestration.

An engine directory ``engines/<name>/`` holds ``manifest.json``, ``encoder.onnx`` and
``decoder.onnx`` (with ``.data`` files when large), one ``controlnet-<sha16>.onnx`` per ControlNet
used with the UNet (:func:`build_controlnet_graph`), and TensorRT plans with their timing cache
(:mod:`fd_trt.backends.tensorrt`). Each plan is recorded in the manifest with the TensorRT version,
GPU name and compute capability it was built for, and the graph it was built from. The manifest says
what the graphs were built from; building compares it with the model at hand and rebuilds only
when something differs, and loading refuses graphs that do not match.

What makes graphs stale:

* the UNet's weights (sha256 over every tensor's name, dtype, shape and bytes), its config,
* the latent and text shapes, the precision, the opset, the decoder row range,
* the exporting toolchain: the release line (major.minor) of torch, diffusers and onnx. Patch
  releases do not change exported graphs, and rebuilding a 3 GB export on every patch upgrade
  would be all cost.

onnxruntime's and TensorRT's versions are recorded; they matter to plans, not to ONNX graphs.

ControlNet graphs share the directory's shapes, precision, opset and toolchain (rebuilding the
UNet's graphs deletes them) and are recorded under ``controlnets``, keyed by the first 16 hex
digits of the ControlNet's weights sha256 (:func:`unet_weights_sha256` on the ControlNet: the same
digest, by the same code, as the UNet's). A ControlNet whose weights or config changed therefore
has no graph until one is exported for it; its record is compared exactly as the UNet's is.

Concurrency and interruption. Every writer (graph export, plan builds, refits, manifest updates,
the timing cache) holds the directory's inter-process lock, ``<engine_dir>/.build.lock``
(:func:`engine_dir_lock`, an OS file lock the kernel releases when its holder dies), and
re-reads the manifest after taking it. Files are written under unique temporary names
(``.fdtmp-<pid>-...``) and renamed into place; a build removes the manifest before it replaces
graphs and writes it last, so a build killed midway leaves no manifest and is redone, never
loaded. Temporaries of dead processes are removed by the next build; a live one's are left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from fd_trt.graphs.contract import GraphContract
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.export import (
    DECODER_FILE,
    DEFAULT_OPSET,
    ENCODER_FILE,
    EXTERNAL_DATA_THRESHOLD,
    CorruptGraphError,
    check_graph_file,
    controlnet_file_name,
    export_controlnet,
    export_unet,
    remove_graphs,
)
from fd_trt.utils.files import dir_lock, file_sha256, write_atomic

logger = logging.getLogger(__name__)

#: 2: the decoder graph takes the key step's N rows of features and text, and S*N timesteps
#: (DESIGN.md section 3 as amended); graphs of format 1 took the features tiled to S*N rows.
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
#: File suffix of TensorRT plans in an engine directory.
PLAN_SUFFIX = ".plan"
#: Packages whose versions the manifest records; the first three decide staleness.
TOOLCHAIN_PACKAGES = ("torch", "diffusers", "onnx")
RECORDED_PACKAGES = (*TOOLCHAIN_PACKAGES, "onnxruntime", "onnxruntime-gpu", "tensorrt", "fd_trt")
#: The inter-process lock of an engine directory, held around every build and manifest update.
LOCK_FILE = ".build.lock"


def engine_dir_lock(engine_dir: str | os.PathLike[str], what: str = "build") -> contextlib.AbstractContextManager[None]:
    """Holds the engine directory's build lock (``<engine_dir>/.build.lock``), across processes.

    Every writer of an engine directory (graph export, plan builds, refits, manifest updates,
    the timing cache) holds it, and re-reads the manifest once it has it: another process may
    have just built what it came to build. The lock is an OS file lock (``flock``), which the
    kernel drops when its holder dies, so a killed build never leaves a lock that blocks the next
    one; the lock file itself stays, harmlessly. Reentrant within a thread
    (:func:`fd_trt.utils.files.dir_lock`).

    Args:
        engine_dir: the engine directory; created when missing.
        what: what the caller is about to do, for the waiting message.

    Returns:
        A context manager that holds the lock inside its ``with`` block.
    """
    return dir_lock(engine_dir, what, LOCK_FILE)


def adapter_state(unet: nn.Module) -> list[list[Any]]:
    """What decides the output of the UNet's PEFT adapter layers besides their tensors.

    For every adapter layer (``peft``'s ``BaseTunerLayer``, which diffusers' ``load_lora_weights``
    injects): its active adapters, their scales (``set_adapters(names, weights)``), the adapters
    merged into the base weights, and whether adapters are disabled. None of this is in the
    state dict, yet it changes what the layer computes.

    Args:
        unet: any torch module.

    Returns:
        ``[[module name, active, scales, merged, disabled], ...]`` in module order; empty without
        adapters.
    """
    out: list[list[Any]] = []
    for name, m in unet.named_modules():
        scaling = getattr(m, "scaling", None)
        if not isinstance(scaling, dict) or not hasattr(m, "active_adapters"):
            continue
        active = getattr(m, "active_adapters", [])
        out.append([
            name,
            sorted(active) if isinstance(active, (list, tuple, set)) else [str(active)],
            sorted((str(k), float(v)) for k, v in scaling.items()),
            sorted(getattr(m, "merged_adapters", []) or []),
            bool(getattr(m, "disable_adapters", False)),
        ])
    return out


def unet_weights_sha256(unet: nn.Module) -> str:
    """sha256 of the UNet's effective weights.

    Covers the state dict (each tensor's name, dtype, shape and bytes, in name order; a fused
    LoRA and unfused adapter tensors are in it) and :func:`adapter_state` (which adapters are
    active, at which scales).

    Args:
        unet: any torch module.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    state = unet.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A byte view works for every dtype (bf16 included), unlike .numpy().
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    adapters = adapter_state(unet)
    if adapters:  # so that a UNet without adapters keeps the digest it always had
        h.update(json.dumps(adapters).encode())
    return h.hexdigest()


#: Elements sampled per tensor by :func:`weights_fingerprint`.
FINGERPRINT_SAMPLES = 8


def weights_fingerprint(unet: nn.Module) -> tuple[Any, ...]:
    """A cheap value that changes when the UNet's weights change; compared on every call.

    It covers each parameter and buffer's identity, address and autograd version counter (so
    ``load_state_dict``, in-place updates and ``param.data = ...`` swaps show), plus
    :data:`FINGERPRINT_SAMPLES` evenly spaced elements of each tensor (so in-place updates through
    ``.data``, which bypass the version counter, show too, as PEFT's merge does), plus the adapter
    layers' state (:func:`adapter_state`). A change that touches none of the sampled elements of
    any tensor and bumps no counter is missed; :meth:`FasterDiffusionPipeline.refresh_weights`
    covers that case.

    Args:
        unet: any torch module.

    Returns:
        A tuple to compare with ``==`` (not a digest: comparing is cheaper than hashing).
    """
    samples = []
    meta: list[Any] = []
    # One walk over the modules (parameters, buffers and adapter layers together): the walk and
    # the per-tensor Python work are what cost here, not the tensors.
    for mod_name, m in unet.named_modules():
        for kind in (m._parameters, m._buffers):
            for name, t in kind.items():
                if t is None:
                    continue
                try:
                    version = t._version
                except RuntimeError:  # inference tensors keep no version counter
                    version = -1
                meta.append((mod_name, name, id(t), t.data_ptr(), version))
                flat = t.detach().reshape(-1)
                n = flat.numel()
                if n:
                    # A strided view: no copy until the one cat below.
                    samples.append(flat[:: max(1, n // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES].float())
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and hasattr(m, "active_adapters"):
            meta.append((mod_name, str(m.active_adapters), str(sorted(scaling.items())),
                         str(getattr(m, "merged_adapters", None)), bool(getattr(m, "disable_adapters", False))))
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return (tuple(meta), values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def unet_config_dict(unet: nn.Module) -> dict[str, Any]:
    """The UNet's config as plain JSON values, without diffusers' bookkeeping keys.

    Keys starting with ``_`` (``_name_or_path``, ``_diffusers_version``, ...) say where the model
    was loaded from, not what it computes, so they do not make graphs stale.

    Args:
        unet: a diffusers model with a ``config``.

    Returns:
        A dict that round-trips through JSON unchanged.
    """
    return {k: _jsonable(v) for k, v in dict(unet.config).items() if not str(k).startswith("_")}


def package_versions(names: Iterable[str] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of packages, ``None`` for those missing.

    Args:
        names: distribution names.

    Returns:
        ``{name: version or None}``.
    """
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _release_line(version: str | None) -> str | None:
    if version is None:
        return None
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass
class GraphRecord:
    """One graph file in the manifest.

    Attributes:
        file: the ``.onnx`` name inside the engine directory.
        sha256: digest of the ``.onnx`` file.
        bytes: size of the ``.onnx`` file.
        data_file: the external weights file, or ``None``.
        data_sha256: digest of the external weights file.
        data_bytes: size of the external weights file.
    """

    file: str
    sha256: str
    bytes: int
    data_file: str | None = None
    data_sha256: str | None = None
    data_bytes: int | None = None


@dataclass
class ControlNetRecord(GraphRecord):
    """One ControlNet graph in the manifest (a :class:`GraphRecord` plus what it was built from).

    Attributes:
        controlnet_sha256: :func:`unet_weights_sha256` of the ControlNet (its weights and adapters).
        controlnet_config: the ControlNet's config (:func:`unet_config_dict`).
        num_down: its down residuals (the UNet's skip count).
        cond_shape: ``[3, H, W]`` of its control image.
        built_at: export time, seconds since the epoch.
    """

    controlnet_sha256: str = ""
    controlnet_config: dict[str, Any] = field(default_factory=dict)
    num_down: int = 0
    cond_shape: list[int] = field(default_factory=list)
    built_at: float = 0.0


@dataclass
class PlanRecord:
    """One TensorRT plan in the manifest (see :mod:`fd_trt.backends.tensorrt`).

    A plan runs only on the TensorRT version and GPU compute capability it was built with, and
    only serves the graph it was built from; :func:`check_plan` enforces all three.

    Attributes:
        role: ``encoder``, ``decoder`` or ``controlnet`` (one plan per ControlNet graph, told
            apart by ``graph_sha256``).
        file: the plan's name inside the engine directory.
        sha256: digest of the plan file.
        bytes: size of the plan file.
        tensorrt_version: ``tensorrt.__version__`` at build time.
        gpu_name: the GPU it was built on (informational: plans follow the compute capability).
        compute_capability: ``[major, minor]`` of that GPU.
        rows: the optimization profile's ``[min, opt, max]`` rows.
        graph_sha256: sha256 of the ONNX graph it was built from.
        builder_optimization_level: TensorRT's builder optimization level (0-5).
        workspace_bytes: the workspace pool limit, or ``None`` for TensorRT's default.
        built_at: build time, seconds since the epoch.
        build_seconds: how long the build took.
        refittable: built with ``BuilderFlag.REFIT`` (new weights can be refit in place);
            ``False`` in manifests written before refits existed.
        refitted_at: when new weights were last refit into the plan (0: never).
    """

    role: str
    file: str
    sha256: str
    bytes: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: list[int]
    rows: list[int]
    graph_sha256: str
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    built_at: float = 0.0
    build_seconds: float = 0.0
    refittable: bool = False
    refitted_at: float = 0.0


@dataclass
class Manifest:
    """The content of ``manifest.json``.

    Attributes:
        format_version: layout version of the manifest.
        model_source: where the model came from (a folder, ``default``, ...), for messages.
        unet_sha256: see :func:`unet_weights_sha256`.
        unet_config: see :func:`unet_config_dict`.
        latent_shape: ``[C, h, w]``.
        text_shape: ``[L, D]``.
        precision: ``fp32`` or ``fp16``.
        opset: ONNX opset of the graphs.
        num_skips: skip features between the graphs.
        encoder_rows: ``[min, max]`` rows of the encoder (TensorRT profiles).
        decoder_rows: ``[min, max]`` rows of the decoder (TensorRT profiles).
        versions: package versions at build time.
        graphs: ``{"encoder": GraphRecord, "decoder": GraphRecord}``.
        built_at: build time, seconds since the epoch.
        build_seconds: how long the build took.
        plans: TensorRT plans built from the graphs, by file name (empty in manifests written
            before plans existed, which therefore still load).
        added_shapes: per-row shapes of the graphs' added-conditioning inputs (SDXL:
            ``{"text_embeds": [P], "time_ids": [K]}``); empty for SD 1.x/2.x and in manifests
            written before SDXL, which therefore still load. With ``num_skips`` and the shapes
            above it is the graph contract (:meth:`fd_trt.graphs.contract.GraphContract.from_manifest`).
        controlnets: ControlNet graphs, by the first 16 hex digits of the ControlNet's weights
            sha256 (empty without ControlNets, and in older manifests, which therefore still load).
    """

    format_version: int
    model_source: str
    unet_sha256: str
    unet_config: dict[str, Any]
    latent_shape: list[int]
    text_shape: list[int]
    precision: str
    opset: int
    num_skips: int
    encoder_rows: list[int]
    decoder_rows: list[int]
    versions: dict[str, str | None]
    graphs: dict[str, GraphRecord] = field(default_factory=dict)
    built_at: float = 0.0
    build_seconds: float = 0.0
    plans: dict[str, PlanRecord] = field(default_factory=dict)
    added_shapes: dict[str, list[int]] = field(default_factory=dict)
    controlnets: dict[str, ControlNetRecord] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> "Manifest":
        """Parses ``manifest.json``.

        Args:
            text: the file's content.
            path: the file, for messages.

        Raises:
            EngineMismatchError: for unparsable JSON, another format version or missing fields.
        """
        where = path or MANIFEST_FILE
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptGraphError(f"{where} is not valid JSON ({exc}): rebuild the engine directory") from exc
        if not isinstance(raw, dict):
            raise CorruptGraphError(f"{where} holds {type(raw).__name__}, not a manifest object: rebuild the engine directory")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineMismatchError(
                f"{where} has format_version {version!r}, this fd_trt reads {FORMAT_VERSION}: rebuild the engine directory"
            )
        try:
            graphs = {k: GraphRecord(**v) for k, v in raw.pop("graphs", {}).items()}
            plans = {k: PlanRecord(**v) for k, v in raw.pop("plans", {}).items()}
            controlnets = {k: ControlNetRecord(**v) for k, v in raw.pop("controlnets", {}).items()}
            return cls(**raw, graphs=graphs, plans=plans, controlnets=controlnets)
        except TypeError as exc:
            raise CorruptGraphError(f"{where} is missing or has unknown fields ({exc}): rebuild the engine directory") from exc


def rebuild_command(engine_dir: str | os.PathLike[str], manifest: Manifest | None = None, **spec: Any) -> str:
    """The shell command that rebuilds an engine directory.

    Args:
        engine_dir: the engine directory.
        manifest: the expected manifest, for the model source, precision and image size.
        **spec: overrides (``model``, ``precision``, ``height``, ``width``).

    Returns:
        A ``fd-trt build ...`` command line.
    """
    model = spec.get("model") or (manifest.model_source if manifest else None) or "PATH"
    precision = spec.get("precision") or (manifest.precision if manifest else "fp32")
    height = spec.get("height") or (manifest.latent_shape[1] * 8 if manifest else "H")
    width = spec.get("width") or (manifest.latent_shape[2] * 8 if manifest else "W")
    backend = "tensorrt" if precision == "fp16" else "onnxruntime"
    return (
        f"fd-trt build --model {model} --out {engine_dir} --backend {backend} --precision {precision} "
        f"--height {height} --width {width}"
    )


def load_manifest(engine_dir: str | os.PathLike[str]) -> Manifest:
    """Reads ``<engine_dir>/manifest.json``.

    Args:
        engine_dir: the engine directory.

    Returns:
        The manifest.

    Raises:
        EngineMismatchError: when the manifest is missing or unreadable.
    """
    path = Path(engine_dir) / MANIFEST_FILE
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_dir} has no {MANIFEST_FILE}: it is not a built engine directory; build it with "
            f"{rebuild_command(engine_dir)}"
        )
    return Manifest.from_json(path.read_text(), path)


def _diff(expected: Manifest, found: Manifest, fields: Iterable[str]) -> list[str]:
    differences = []
    for name in fields:
        want, have = getattr(expected, name), getattr(found, name)
        if name == "versions":
            for pkg in TOOLCHAIN_PACKAGES:
                if _release_line(want.get(pkg)) != _release_line(have.get(pkg)):
                    differences.append(f"versions.{pkg} (built with {have.get(pkg)}, running {want.get(pkg)})")
        elif name == "unet_config" and want != have:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            shown = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in keys[:4])
            differences.append(f"unet_config ({shown}{', ...' if len(keys) > 4 else ''})")
        elif name == "unet_sha256" and want != have:
            differences.append(f"unet_sha256 (the UNet weights changed: built {have[:12]}.., now {want[:12]}..)")
        elif want != have:
            differences.append(f"{name} (built {have!r}, wanted {want!r})")
    return differences


_COMPARED_FIELDS = (
    "unet_sha256",
    "unet_config",
    "latent_shape",
    "text_shape",
    "precision",
    "opset",
    "encoder_rows",
    "decoder_rows",
    "added_shapes",
    "versions",
)


def check_graph_files(engine_dir: str | os.PathLike[str], full_hash: bool = False, manifest: Manifest | None = None) -> Manifest:
    """Checks that the graph files are the ones the manifest recorded.

    Sizes are always compared (this catches truncation at no cost); with ``full_hash`` the
    sha256 of every file is compared too.

    Args:
        engine_dir: the engine directory.
        full_hash: also compare sha256 digests (reads every byte).
        manifest: the manifest, when already loaded.

    Returns:
        The manifest.

    Raises:
        CorruptGraphError: for a missing, truncated or altered graph file.
    """
    folder = Path(engine_dir)
    manifest = manifest or load_manifest(folder)
    for role, rec in manifest.graphs.items():
        files = [(rec.file, rec.bytes, rec.sha256)]
        if rec.data_file:
            files.append((rec.data_file, rec.data_bytes, rec.data_sha256))
        for name, size, digest in files:
            path = folder / name
            fix = f"delete it and rebuild: {rebuild_command(folder, manifest)}"
            if not path.is_file():
                raise CorruptGraphError(f"the {role} graph file {path} is missing; {fix}")
            actual = path.stat().st_size
            if actual != size:
                raise CorruptGraphError(
                    f"the {role} graph file {path} has {actual} bytes but the manifest recorded {size}: it is "
                    f"truncated or was replaced; {fix}"
                )
            if full_hash and file_sha256(path) != digest:
                raise CorruptGraphError(f"the {role} graph file {path} does not match its sha256 in the manifest; {fix}")
    return manifest


def expected_manifest(
    unet: nn.Module,
    *,
    latent_size: tuple[int, int],
    text_shape: tuple[int, int] | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    max_segment_steps: int = 15,
    model_source: str = "",
    unet_sha256: str | None = None,
    added_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Manifest:
    """The manifest that graphs built now from this UNet would have (without graph records).

    Args:
        unet: the UNet.
        latent_size: ``(h, w)``.
        text_shape: ``(L, D)``; ``(77, cross_attention_dim)`` when omitted.
        precision: ``fp32`` or ``fp16``.
        opset: ONNX opset.
        batch: images per call; with CFG the encoder runs ``2*batch`` rows.
        max_segment_steps: the longest segment decoded in one call.
        model_source: where the model came from.
        unet_sha256: the weights digest, when already computed.
        added_shapes: per-row shapes of SDXL's added conditioning; the config's when omitted
            (:func:`fd_trt.graphs.contract.default_added_shapes`).

    Returns:
        The manifest.
    """
    for name, v in (("batch", batch), ("max_segment_steps", max_segment_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if text_shape is None:
        text_shape = (77, int(unet.config.cross_attention_dim))
    from fd_trt.graphs.split import check_supported

    check_supported(unet)
    contract = GraphContract.from_unet_config(unet.config, latent_size, text_shape, added_shapes)
    return Manifest(
        format_version=FORMAT_VERSION,
        model_source=str(model_source),
        unet_sha256=unet_sha256 or unet_weights_sha256(unet),
        unet_config=unet_config_dict(unet),
        latent_shape=[int(unet.config.in_channels), int(latent_size[0]), int(latent_size[1])],
        text_shape=[int(text_shape[0]), int(text_shape[1])],
        precision=precision,
        opset=int(opset),
        num_skips=contract.num_skips,
        encoder_rows=[1, 2 * batch],
        decoder_rows=[1, 2 * batch * max_segment_steps],
        versions=package_versions(),
        added_shapes=contract.added_shapes,
    )


def check_engine_dir(
    engine_dir: str | os.PathLike[str],
    unet: nn.Module | None = None,
    *,
    latent_size: tuple[int, int] | None = None,
    text_shape: tuple[int, int] | None = None,
    precision: str | None = None,
    full_hash: bool = False,
    unet_sha256: str | None = None,
    added_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Manifest:
    """Refuses an engine directory that was built for another model, shape, precision or toolchain.

    Args:
        engine_dir: the engine directory.
        unet: the UNet the graphs must come from; weights and config are checked when given.
        latent_size: ``(h, w)`` the caller will run at.
        text_shape: ``(L, D)`` the caller will feed.
        precision: the precision the caller expects.
        full_hash: also hash the graph files (see :func:`check_graph_files`).
        unet_sha256: the UNet's :func:`unet_weights_sha256`, when the caller already has it.
        added_shapes: the per-row shapes of the added conditioning the caller will feed (SDXL).

    Returns:
        The manifest.

    Raises:
        EngineMismatchError: naming the first differing field and the command that rebuilds.
    """
    folder = Path(engine_dir)
    found = load_manifest(folder)
    problems: list[str] = []
    if unet is not None:
        if unet_config_dict(unet) != found.unet_config:
            problems += _diff(_with(found, unet_config=unet_config_dict(unet)), found, ["unet_config"])
        digest = unet_sha256 or unet_weights_sha256(unet)
        if digest != found.unet_sha256:
            problems += _diff(_with(found, unet_sha256=digest), found, ["unet_sha256"])
    if latent_size is not None and list(latent_size) != found.latent_shape[1:]:
        problems.append(f"latent_shape (built for {found.latent_shape[1:]}, asked for {list(latent_size)})")
    if text_shape is not None and list(text_shape) != found.text_shape:
        problems.append(f"text_shape (built for {found.text_shape}, asked for {list(text_shape)})")
    if precision is not None and precision != found.precision:
        problems.append(f"precision (built {found.precision}, asked for {precision})")
    if added_shapes is not None:
        wanted = {k: [int(d) for d in v] for k, v in added_shapes.items()}
        if wanted != found.added_shapes:
            problems.append(f"added_shapes (built for {found.added_shapes}, asked for {wanted})")
    problems += _diff(_with(found, versions=package_versions()), found, ["versions"])
    if problems:
        spec: dict[str, Any] = {"precision": precision}
        if latent_size is not None:
            spec.update(height=latent_size[0] * 8, width=latent_size[1] * 8)
        raise EngineMismatchError(
            f"engine directory {folder} does not match: {'; '.join(problems)}. Rebuild it with "
            f"{rebuild_command(folder, found, **spec)}"
        )
    check_graph_files(folder, full_hash=full_hash, manifest=found)
    return found


def save_manifest(engine_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Writes ``<engine_dir>/manifest.json`` atomically (a unique temporary file, then a rename).

    Callers that read, change and rewrite a manifest hold :func:`engine_dir_lock` around all
    three, so that two processes never overwrite each other's records.

    Args:
        engine_dir: the engine directory.
        manifest: what to write.

    Returns:
        The manifest's path.
    """
    path = Path(engine_dir) / MANIFEST_FILE
    write_atomic(path, manifest.to_json().encode())
    return path


def check_plan(
    record: PlanRecord,
    *,
    tensorrt_version: str,
    compute_capability: tuple[int, int] | list[int],
    graph_sha256: str | None = None,
    engine_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Refuses a plan built for another TensorRT version, another GPU generation or another graph.

    Args:
        record: the plan's manifest record.
        tensorrt_version: the running ``tensorrt.__version__``.
        compute_capability: ``(major, minor)`` of the GPU the plan would run on.
        graph_sha256: the digest of the graph the plan must come from (the manifest's), if known.
        engine_dir: the engine directory, for the rebuild command in the message.

    Raises:
        EngineMismatchError: naming what differs and how to rebuild.
    """
    where = Path(engine_dir) / record.file if engine_dir is not None else Path(record.file)
    fix = (
        f"rebuild the plans on this machine: fd-trt build --backend tensorrt --out {engine_dir}"
        if engine_dir is not None
        else "rebuild the plans on this machine with fd-trt build --backend tensorrt"
    )
    problems = []
    if record.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {record.tensorrt_version}, but this machine runs TensorRT {tensorrt_version}")
    cc = [int(v) for v in compute_capability]
    if list(record.compute_capability) != cc:
        have = ".".join(str(v) for v in record.compute_capability)
        problems.append(
            f"a GPU of compute capability {have} ({record.gpu_name}), but this GPU has {cc[0]}.{cc[1]}"
        )
    if graph_sha256 is not None and record.graph_sha256 != graph_sha256:
        problems.append("an older version of the graph (its sha256 differs from the manifest's)")
    if problems:
        raise EngineMismatchError(f"the TensorRT plan {where} was built for {' and '.join(problems)}: {fix}")


def find_plan(
    manifest: Manifest,
    role: str,
    *,
    tensorrt_version: str,
    compute_capability: tuple[int, int] | list[int],
    rows: tuple[int, int, int] | list[int] | None = None,
    graph: GraphRecord | None = None,
) -> PlanRecord | None:
    """The newest plan of a role that runs here, or ``None``.

    Args:
        manifest: the engine directory's manifest.
        role: ``encoder`` or ``decoder``.
        tensorrt_version: the running TensorRT version.
        compute_capability: ``(major, minor)`` of the GPU.
        rows: a required ``[min, opt, max]`` profile; any profile when ``None``.
        graph: the graph the plan must come from; the manifest's graph of ``role`` by default
            (a ControlNet plan passes its :class:`ControlNetRecord`).

    Returns:
        The matching record built most recently, or ``None`` when there is none.
    """
    graph = graph if graph is not None else manifest.graphs.get(role)
    matches = []
    for rec in manifest.plans.values():
        if rec.role != role or (rows is not None and list(rec.rows) != [int(r) for r in rows]):
            continue
        try:
            check_plan(
                rec,
                tensorrt_version=tensorrt_version,
                compute_capability=compute_capability,
                graph_sha256=graph.sha256 if graph is not None else None,
            )
        except EngineMismatchError:
            continue
        matches.append(rec)
    return max(matches, key=lambda r: r.built_at) if matches else None


def _with(manifest: Manifest, **changes: Any) -> Manifest:
    data = asdict(manifest)
    data.update(changes)
    data["graphs"] = manifest.graphs
    data["plans"] = manifest.plans
    data["controlnets"] = manifest.controlnets
    return Manifest(**data)


@dataclass
class BuildResult:
    """What :func:`build_engines` did.

    Attributes:
        engine_dir: the engine directory.
        manifest: its manifest after the build.
        built: ``False`` when everything was up to date and nothing was written.
        reason: why it was (re)built, or ``"up to date"``.
        seconds: wall seconds of this call.
    """

    engine_dir: Path
    manifest: Manifest
    built: bool
    reason: str
    seconds: float


def _graph_record(folder: Path, name: str) -> GraphRecord:
    path = folder / name
    data = folder / (name + ".data")
    rec = GraphRecord(file=name, sha256=file_sha256(path), bytes=path.stat().st_size)
    if data.is_file():
        rec.data_file, rec.data_sha256, rec.data_bytes = data.name, file_sha256(data), data.stat().st_size
    return rec


def build_engines(
    unet: nn.Module,
    engine_dir: str | os.PathLike[str],
    *,
    latent_size: tuple[int, int],
    text_shape: tuple[int, int] | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    max_segment_steps: int = 15,
    model_source: str = "",
    force: bool = False,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    unet_sha256: str | None = None,
    added_shapes: Mapping[str, Sequence[int]] | None = None,
    share_rows: bool | None = None,
) -> BuildResult:
    """Builds (or keeps) the ONNX graphs of an engine directory.

    A second call with an unchanged model and settings reads the manifest and the files' hashes,
    writes nothing and reports ``built=False``. Concurrent calls on one directory (processes,
    Ray replicas warming one cache) are serialized by :func:`engine_dir_lock`: one exports, the
    others wait, find the graphs up to date and report ``built=False``.

    Args:
        unet: the UNet to export.
        engine_dir: the engine directory; created when missing.
        latent_size: ``(h, w)`` of the latents.
        text_shape: ``(L, D)``; ``(77, cross_attention_dim)`` when omitted.
        precision: ``fp32`` (CPU) or ``fp16`` (TensorRT).
        opset: ONNX opset, 17 or later.
        batch: images per call (sets the row ranges).
        max_segment_steps: the longest segment decoded in one call (sets the decoder row range).
        model_source: where the model came from, recorded for messages and rebuild commands.
        force: rebuild even when up to date.
        progress: show progress bars.
        external_data_threshold: see :func:`fd_trt.graphs.export.export_unet`.
        unet_sha256: the weights digest, when the caller already computed it.
        added_shapes: per-row shapes of SDXL's added conditioning (``{"text_embeds": (P,),
            "time_ids": (K,)}``); the config's, with K = 6, when omitted.
        share_rows: see :func:`fd_trt.graphs.export.export_unet` (``None``: decided from the UNet's
            widths). It changes speed, not numbers, so it is not a manifest field: an engine
            directory built with another setting stays up to date (``force=True`` rebuilds).

    Returns:
        A :class:`BuildResult`.
    """
    t0 = time.perf_counter()
    folder = Path(engine_dir)
    expected = expected_manifest(
        unet,
        latent_size=latent_size,
        text_shape=text_shape,
        precision=precision,
        opset=opset,
        batch=batch,
        max_segment_steps=max_segment_steps,
        model_source=model_source,
        unet_sha256=unet_sha256,
        added_shapes=added_shapes,
    )
    with engine_dir_lock(folder, "graph export"):
        # Checked under the lock: another process may have built these graphs while we waited.
        reason = "forced" if force else "no manifest"
        found = _up_to_date(folder, expected) if not force else None
        if isinstance(found, Manifest):
            logger.info("%s is up to date (%s %s graphs); nothing to build", folder, found.precision, found.latent_shape)
            return BuildResult(folder, found, False, "up to date", time.perf_counter() - t0)
        reason = found or reason
        logger.info("building %s (%s)", folder, reason)
        result = _export_into(folder, unet, expected, latent_size=latent_size, opset=opset,
                              external_data_threshold=external_data_threshold, progress=progress, t0=t0,
                              share_rows=share_rows)
    logger.info(
        "built %s in %.1f s: encoder %.1f MB, decoder %.1f MB",
        folder,
        expected.build_seconds,
        result.encoder.bytes / 1e6,
        result.decoder.bytes / 1e6,
    )
    return BuildResult(folder, expected, True, reason, time.perf_counter() - t0)


def _up_to_date(folder: Path, expected: Manifest) -> Manifest | str | None:
    """The manifest when the folder's graphs match ``expected``; else why not (``None``: no manifest)."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        found = load_manifest(folder)
        problems = _diff(expected, found, _COMPARED_FIELDS)
        if problems:
            return "stale: " + "; ".join(problems)
        check_graph_files(folder, full_hash=True, manifest=found)
        return found
    except EngineMismatchError as exc:
        return f"unusable: {exc}"


def _export_into(
    folder: Path,
    unet: nn.Module,
    expected: Manifest,
    *,
    latent_size: tuple[int, int],
    opset: int,
    external_data_threshold: int,
    progress: bool,
    t0: float,
    keep_plans: bool = False,
    share_rows: bool | None = None,
) -> Any:
    """Exports the graphs into ``folder`` and writes ``expected`` (with graph records) as its manifest.

    The caller holds :func:`engine_dir_lock`. The manifest is removed first and written last, so
    a build killed in between leaves no manifest, and nothing half-written is ever loaded (the
    next build starts over). With ``keep_plans`` the plan files stay (a refit rewrites them
    next); otherwise plans of the old graphs, which could never run again, are deleted.
    """
    manifest_path = folder / MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)
    remove_graphs(folder)  # also removes temporaries that killed builds left
    if not keep_plans:
        for stale_plan in folder.glob(f"*{PLAN_SUFFIX}"):
            stale_plan.unlink()
    result = export_unet(
        unet,
        folder,
        latent_size=latent_size,
        text_shape=tuple(expected.text_shape),  # type: ignore[arg-type]
        precision=expected.precision,
        opset=opset,
        example_rows=2,
        external_data_threshold=external_data_threshold,
        progress=progress,
        added_shapes=dict(expected.added_shapes) or None,
        share_rows=share_rows,
    )
    expected.graphs = {"encoder": _graph_record(folder, ENCODER_FILE), "decoder": _graph_record(folder, DECODER_FILE)}
    expected.controlnets = {}  # remove_graphs deleted them: they are exported again on first use
    expected.num_skips = result.num_skips
    expected.built_at = time.time()
    expected.build_seconds = time.perf_counter() - t0
    if not keep_plans:
        save_manifest(folder, expected)
    return result


def controlnet_key(controlnet_sha256: str) -> str:
    """The manifest key (and file-name part) of a ControlNet graph: 16 hex digits of its weights digest."""
    return controlnet_sha256[:16]


def _controlnet_problem(folder: Path, manifest: Manifest, sha: str, config: dict[str, Any]) -> str | None:
    """Why the directory's graph for this ControlNet cannot run (``None``: it can)."""
    rec = manifest.controlnets.get(controlnet_key(sha))
    if rec is None:
        others = sorted(r.controlnet_sha256[:12] + ".." for r in manifest.controlnets.values())
        return (f"it holds no ControlNet graph for weights {sha[:12]}.. (ControlNet graphs for "
                f"{', '.join(others) or 'no ControlNet'}; the ControlNet's weights changed or it was never exported here)")
    if rec.controlnet_sha256 != sha:
        return f"controlnet_sha256 (the ControlNet weights changed: built {rec.controlnet_sha256[:12]}.., now {sha[:12]}..)"
    if rec.controlnet_config != config:
        keys = sorted(k for k in set(config) | set(rec.controlnet_config) if config.get(k) != rec.controlnet_config.get(k))
        shown = ", ".join(f"{k}: {rec.controlnet_config.get(k)!r} -> {config.get(k)!r}" for k in keys[:4])
        return f"controlnet_config ({shown})"
    path = folder / rec.file
    if not path.is_file() or path.stat().st_size != rec.bytes:
        return f"its ControlNet graph {path} is missing or truncated"
    return None


def check_controlnet_graph(
    engine_dir: str | os.PathLike[str], controlnet: nn.Module, *, controlnet_sha256: str | None = None
) -> ControlNetRecord:
    """The directory's graph record for this ControlNet; refuses one built from other weights or config.

    Args:
        engine_dir: a built engine directory (its UNet graphs first).
        controlnet: the diffusers ``ControlNetModel``.
        controlnet_sha256: its :func:`unet_weights_sha256`, when the caller already has it.

    Raises:
        EngineMismatchError: naming what differs and how to build the graph.
    """
    folder = Path(engine_dir)
    manifest = load_manifest(folder)
    sha = controlnet_sha256 or unet_weights_sha256(controlnet)
    problem = _controlnet_problem(folder, manifest, sha, unet_config_dict(controlnet))
    if problem is not None:
        raise EngineMismatchError(
            f"engine directory {folder} does not match the ControlNet: {problem}. Build its graph with "
            f"fd_trt.graphs.engines.build_controlnet_graph(controlnet, {str(folder)!r}), or call the pipeline with "
            "build_on_demand=True (the default)"
        )
    return manifest.controlnets[controlnet_key(sha)]


def build_controlnet_graph(
    controlnet: nn.Module,
    engine_dir: str | os.PathLike[str],
    *,
    controlnet_sha256: str | None = None,
    force: bool = False,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ControlNetRecord:
    """Exports a ControlNet's graph into a built engine directory, unless an up-to-date one is there.

    The graph takes the directory's latent and text shapes, precision and opset, and its outputs
    are checked against the UNet's features (:meth:`ControlNetContract.check_fits`). Under
    :func:`engine_dir_lock`, like every writer.

    Args:
        controlnet: a diffusers ``ControlNetModel`` (SD 1.x/2.x).
        engine_dir: an engine directory whose UNet graphs are built.
        controlnet_sha256: its :func:`unet_weights_sha256`, when the caller already has it.
        force: export even when up to date.
        progress: show a progress bar.
        external_data_threshold: see :func:`fd_trt.graphs.export.export_unet`.

    Returns:
        The graph's manifest record.

    Raises:
        UnsupportedModelError: for an SDXL ControlNet, or one whose residuals do not fit the UNet.
        EngineMismatchError: when the directory has no manifest.
    """
    from fd_trt.graphs.contract import ControlNetContract

    folder = Path(engine_dir)
    sha = controlnet_sha256 or unet_weights_sha256(controlnet)
    config = unet_config_dict(controlnet)
    with engine_dir_lock(folder, "ControlNet graph export"):
        manifest = load_manifest(folder)
        key = controlnet_key(sha)
        if not force and _controlnet_problem(folder, manifest, sha, config) is None:
            return manifest.controlnets[key]
        latent = (int(manifest.latent_shape[1]), int(manifest.latent_shape[2]))
        text = (int(manifest.text_shape[0]), int(manifest.text_shape[1]))
        contract = ControlNetContract.from_controlnet_config(controlnet.config, latent, text)
        contract.check_fits(GraphContract.from_manifest(manifest), "the ControlNet")
        t0 = time.perf_counter()
        name = controlnet_file_name(sha)
        export_controlnet(controlnet, folder / name, latent_size=latent, text_shape=text, precision=manifest.precision,
                          opset=int(manifest.opset), external_data_threshold=external_data_threshold, progress=progress)
        graph = _graph_record(folder, name)
        rec = ControlNetRecord(**asdict(graph), controlnet_sha256=sha, controlnet_config=config,
                               num_down=contract.num_down, cond_shape=[int(d) for d in contract.cond_tail],
                               built_at=time.time())
        manifest.controlnets[key] = rec
        save_manifest(folder, manifest)
    logger.info("exported the ControlNet graph %s (%.1f MB) in %.1f s", folder / name, rec.bytes / 1e6,
                time.perf_counter() - t0)
    return rec


def verify_graphs_parse(engine_dir: str | os.PathLike[str]) -> None:
    """Parses both graph files (without weights), to fail with a clear error before native code.

    Args:
        engine_dir: the engine directory.

    Raises:
        CorruptGraphError: for a truncated or corrupt file.
    """
    for name in (ENCODER_FILE, DECODER_FILE):
        check_graph_file(Path(engine_dir) / name)


__all__ = [
    "BuildResult",
    "ControlNetRecord",
    "build_controlnet_graph",
    "check_controlnet_graph",
    "controlnet_key",
    "FORMAT_VERSION",
    "GraphRecord",
    "MANIFEST_FILE",
    "Manifest",
    "PLAN_SUFFIX",
    "PlanRecord",
    "build_engines",
    "check_engine_dir",
    "engine_dir_lock",
    "LOCK_FILE",
    "check_graph_files",
    "check_plan",
    "find_plan",
    "expected_manifest",
    "file_sha256",
    "load_manifest",
    "package_versions",
    "rebuild_command",
    "save_manifest",
    "unet_config_dict",
    "unet_weights_sha256",
    "verify_graphs_parse",
    "weights_fingerprint",
    "adapter_state",
]
