"""Engine directories (docs/design.md section 4): the manifest, its staleness checks and the directory lock.

An engine directory ``engines/<name>/`` holds ``manifest.json``, ``encoder.onnx`` and
``decoder.onnx`` (with ``.data`` files when large), one ``controlnet-<sha16>.onnx`` per ControlNet
used with the UNet ([`fd_trt.graphs.build.build_controlnet_graph()`][fd_trt.graphs.build.build_controlnet_graph]), and TensorRT plans with their timing cache
([`fd_trt.backends.tensorrt`][fd_trt.backends.tensorrt]). Each plan is recorded in the manifest with the TensorRT version,
GPU name and compute capability it was built for, and the graph it was built from. The manifest says
what the graphs were built from; building compares it with the model at hand and rebuilds only
when something differs, and loading refuses graphs that do not match.

What makes graphs stale:

* the UNet's weights (sha256 over every tensor's name, dtype, shape and bytes), its config,
* the latent and text shapes (and the frame count of text-to-video graphs), the model family
  where both the manifest and the caller name one, the precision, the opset, the decoder row range,
* the exporting toolchain: the release line (major.minor) of torch, diffusers and onnx. Patch
  releases do not change exported graphs, and rebuilding a 3 GB export on every patch upgrade
  would be all cost.

onnxruntime's and TensorRT's versions are recorded; they matter to plans, not to ONNX graphs.

ControlNet graphs share the directory's shapes, precision, opset and toolchain (rebuilding the
UNet's graphs deletes them) and are recorded under ``controlnets``, keyed by the first 16 hex
digits of the ControlNet's weights sha256 ([`fd_trt.graphs.weights.unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256] on the ControlNet: the same
digest, by the same code, as the UNet's). A ControlNet whose weights or config changed therefore
has no graph until one is exported for it; its record is compared exactly as the UNet's is.

Concurrency and interruption. Every writer (graph export, plan builds, refits, manifest updates,
the timing cache) holds the directory's inter-process lock, ``<engine_dir>/.build.lock``
([`engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock], an OS file lock the kernel releases when its holder dies), and
re-reads the manifest after taking it. Files are written under unique temporary names
(``.fdtmp-<pid>-...``) and renamed into place; a build removes the manifest before it replaces
graphs and writes it last, so a build killed midway leaves no manifest and is redone, never
loaded. Temporaries of dead processes are removed by the next build; a live one's are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.contract import GraphContract
from fd_trt.graphs.export import DEFAULT_OPSET, CorruptGraphError
from fd_trt.graphs.weights import unet_config_dict, unet_weights_sha256
from fd_trt.utils.files import dir_lock, file_sha256, write_atomic

#: 2: the decoder graph takes the key step's N rows of features and text, and S*N timesteps
#: (docs/design.md section 3); graphs of format 1 took the features tiled to S*N rows.
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
    ([`fd_trt.utils.files.dir_lock()`][fd_trt.utils.files.dir_lock]).

    Args:
        engine_dir: the engine directory; created when missing.
        what: what the caller is about to do, for the waiting message.

    Returns:
        A context manager that holds the lock inside its ``with`` block.
    """
    return dir_lock(engine_dir, what, LOCK_FILE)


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
    """One ControlNet graph in the manifest (a [`GraphRecord`][fd_trt.graphs.manifest.GraphRecord] plus what it was built from).

    Attributes:
        controlnet_sha256: [`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256] of the ControlNet (its
            weights and adapters).
        controlnet_config: the ControlNet's config ([`unet_config_dict()`][fd_trt.graphs.weights.unet_config_dict]).
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
    """One TensorRT plan in the manifest (see [`fd_trt.backends.tensorrt`][fd_trt.backends.tensorrt]).

    A plan runs only on the TensorRT version and GPU compute capability it was built with, and
    only serves the graph it was built from; [`check_plan()`][fd_trt.graphs.manifest.check_plan] enforces all three.

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
        frames: F of the text-to-video graph the plan was built from (its latents
            ``[rows, C, F, h, w]``); 0 for an image UNet's plan. A plan is only run where the
            manifest records the same frame count ([`check_plan()`][fd_trt.graphs.manifest.check_plan]).
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
    frames: int = 0


@dataclass
class Manifest:
    """The content of ``manifest.json``.

    Attributes:
        format_version: layout version of the manifest.
        model_source: where the model came from (a folder, ``default``, ...), for messages.
        unet_sha256: see [`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256].
        unet_config: see [`unet_config_dict()`][fd_trt.graphs.weights.unet_config_dict].
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
            above it is the graph contract ([`fd_trt.graphs.contract.GraphContract.from_manifest()`][fd_trt.graphs.contract.GraphContract.from_manifest]).
        controlnets: ControlNet graphs, by the first 16 hex digits of the ControlNet's weights
            sha256 (empty without ControlNets, and in older manifests, which therefore still load).
        family: the model family the graphs were built for (``"sd"``, ``"text-to-video"``,
            ``"animatediff"``, ...); ``""`` when the builder did not say, as in manifests written
            before the field existed, which therefore still load.
        frames: F of text-to-video graphs (latents ``[rows, C, F, h, w]``, with ``latent_shape``
            ``[C, h, w]``); 0 for image graphs and older manifests.
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
    family: str = ""
    frames: int = 0

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> Manifest:
        """Parses ``manifest.json``.

        Args:
            text: the file's content.
            path: the file, for messages.

        Raises:
            EngineMismatchError: for unparsable JSON, another format version or missing fields.
        """
        where = path or MANIFEST_FILE
        fix = (
            f"delete it and rebuild: {rebuild_command(path.parent)}"
            if path is not None
            else "rebuild the engine directory"
        )
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise CorruptGraphError(f"{where} is not valid JSON ({exc}): {fix}") from exc
        if not isinstance(raw, dict):
            raise CorruptGraphError(f"{where} holds {type(raw).__name__}, not a manifest object: {fix}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineMismatchError(
                f"{where} has format_version {version!r}, this fd_trt reads {FORMAT_VERSION}: rebuild the engine directory"
            )
        try:
            tables = {}
            for name, record in (("graphs", GraphRecord), ("plans", PlanRecord), ("controlnets", ControlNetRecord)):
                table = raw.pop(name, {})
                if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                    raise TypeError(f"{name!r} must map names to records, got {type(table).__name__}")
                tables[name] = {str(k): _typed(record(**v), f"{name}[{k!r}]") for k, v in table.items()}
            manifest = _typed(cls(**raw, **tables), "manifest")
        except (TypeError, ValueError, AttributeError) as exc:
            raise CorruptGraphError(f"{where} is missing fields or has malformed ones ({exc}): {fix}") from exc
        for role in ("encoder", "decoder"):
            if role not in manifest.graphs:
                raise CorruptGraphError(f"{where} records no {role} graph: {fix}")
        for what, name in manifest.file_names():
            problem = unsafe_name(name)
            if problem:
                raise CorruptGraphError(f"{where}: the {what} file name {name[:200]!r} {problem}: {fix}")
        return manifest

    def file_names(self) -> list[tuple[str, str]]:
        """``(what, name)`` of every file the manifest names: graphs, their weights, ControlNet graphs and plans."""
        out: list[tuple[str, str]] = []
        for kind, records in (("graph", self.graphs), ("ControlNet graph", self.controlnets)):
            for rec in records.values():
                out.append((kind, rec.file))
                if rec.data_file is not None:
                    out.append((f"{kind} weights", rec.data_file))
        for key, plan in self.plans.items():
            out += [("plan", key), ("plan", plan.file)]
        return out


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a (simple) type hint of the manifest's records."""
    import types
    import typing

    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(hint) or (str, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _typed(obj: Any, where: str) -> Any:
    """``obj`` (a manifest dataclass read from JSON) when every field has its declared type; raises TypeError."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("graphs", "plans", "controlnets") and isinstance(obj, Manifest):
            continue  # records, checked one by one
        if not _matches(value, hints[f.name]):
            raise TypeError(f"{where}.{f.name} is {type(value).__name__} {str(value)[:60]!r}, not {hints[f.name]}")
    return obj


def unsafe_name(name: Any) -> str | None:
    """Why a file name from a manifest may not be used, or ``None`` when it may.

    A manifest is untrusted input: its names must be plain relative names inside the engine
    directory, never absolute, never with ``..``, never empty.
    """
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(name, str) or not name or "\x00" in name:
        return "is not a file name"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path; a manifest names files inside its directory"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "leaves the engine directory ('..')"
    return None


def contained_path(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder / name`` for a manifest's file name, after checking it stays inside ``folder``.

    The check runs after resolving symbolic links, so a link inside the directory that points
    elsewhere is refused too.

    Raises:
        CorruptGraphError: naming the file and the rebuild command.
    """
    folder = Path(folder)
    problem = unsafe_name(name)
    if problem is None:
        path = folder / name
        try:
            path.resolve().relative_to(folder.resolve())
        except ValueError:
            problem = "resolves (through a symbolic link) to a file outside the engine directory"
        else:
            return path
    raise CorruptGraphError(
        f"{folder / MANIFEST_FILE}: the file name {str(name)[:200]!r} {problem}: delete the directory and rebuild: "
        f"{rebuild_command(folder)}"
    )


def pixels_per_latent(unet_config: Mapping[str, Any] | None) -> int:
    """Image pixels per latent pixel of a UNet's engine directory: 1 for DeepFloyd IF's pixel-space
    UNets (``addition_embed_type="text"``), else the VAE's 8, for the ``--height/--width`` of a
    rebuild command."""
    return 1 if (unet_config or {}).get("addition_embed_type") == "text" else 8


def rebuild_command(engine_dir: str | os.PathLike[str], manifest: Manifest | None = None, **spec: Any) -> str:
    """The shell command that rebuilds an engine directory.

    Args:
        engine_dir: the engine directory.
        manifest: the expected manifest, for the model source, precision and image size.
        **spec: overrides (``model``, ``precision``, ``height``, ``width``, ``frames``).

    Returns:
        A ``fd-trt build ...`` command line.
    """
    model = spec.get("model") or (manifest.model_source if manifest else None) or "PATH"
    precision = spec.get("precision") or (manifest.precision if manifest else "fp32")
    scale = pixels_per_latent(manifest.unet_config) if manifest else 8
    height = spec.get("height") or (manifest.latent_shape[1] * scale if manifest else "H")
    width = spec.get("width") or (manifest.latent_shape[2] * scale if manifest else "W")
    frames = spec["frames"] if spec.get("frames") is not None else (manifest.frames if manifest else 0)
    backend = "tensorrt" if precision == "fp16" else "onnxruntime"
    return (
        f"fd-trt build --model {model} --out {engine_dir} --backend {backend} --precision {precision} "
        f"--height {height} --width {width}" + (f" --frames {frames}" if frames else "")
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
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptGraphError(
            f"{path} cannot be read ({exc.__class__.__name__}): delete it and rebuild: {rebuild_command(engine_dir)}"
        ) from exc
    manifest = Manifest.from_json(text, path)
    for _, name in manifest.file_names():
        contained_path(engine_dir, name)
    return manifest


def _source_problems(
    kind: str, built_sha: str, built_config: Mapping[str, Any], sha: str, config: Mapping[str, Any]
) -> list[str]:
    """How the module at hand differs from the one a graph was exported from.

    Args:
        kind: ``unet`` (the manifest's ``unet_*`` fields) or ``controlnet`` (a
            [`ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord]'s ``controlnet_*`` fields).
        built_sha, built_config: the recorded weights digest and config.
        sha, config: the module's ([`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256],
            [`unet_config_dict()`][fd_trt.graphs.weights.unet_config_dict]).
    """
    label = "ControlNet" if kind == "controlnet" else "UNet"
    problems = []
    if sha != built_sha:
        problems.append(f"{kind}_sha256 (the {label} weights changed: built {built_sha[:12]}.., now {sha[:12]}..)")
    if dict(config) != dict(built_config):
        keys = sorted(k for k in set(config) | set(built_config) if config.get(k) != built_config.get(k))
        shown = ", ".join(f"{k}: {built_config.get(k)!r} -> {config.get(k)!r}" for k in keys[:4])
        problems.append(f"{kind}_config ({shown}{', ...' if len(keys) > 4 else ''})")
    return problems


def _version_problems(built: Mapping[str, str | None], running: Mapping[str, str | None]) -> list[str]:
    """The toolchain packages whose release line (major.minor) changed since the build."""
    return [
        f"versions.{pkg} (built with {built.get(pkg)}, running {running.get(pkg)})"
        for pkg in TOOLCHAIN_PACKAGES
        if _release_line(running.get(pkg)) != _release_line(built.get(pkg))
    ]


#: The manifest fields that make graphs stale besides the UNet's weights, config and the toolchain.
_COMPARED_FIELDS = (
    "latent_shape",
    "text_shape",
    "precision",
    "opset",
    "encoder_rows",
    "decoder_rows",
    "added_shapes",
    "frames",
)


def stale_fields(expected: Manifest, found: Manifest) -> list[str]:
    """Why graphs built as ``found`` records are not the ones ``expected`` describes (empty: they are).

    Args:
        expected: what graphs built now would record ([`expected_manifest()`][fd_trt.graphs.manifest.expected_manifest]).
        found: the engine directory's manifest.
    """
    problems = _source_problems(
        "unet", found.unet_sha256, found.unet_config, expected.unet_sha256, expected.unet_config
    )
    for name in _COMPARED_FIELDS:
        want, have = getattr(expected, name), getattr(found, name)
        if want != have:
            problems.append(f"{name} (built {have!r}, wanted {want!r})")
    problems += _family_problems(found.family, expected.family)
    return problems + _version_problems(found.versions, expected.versions)


def _family_problems(built: str, wanted: str | None) -> list[str]:
    """The model family, when both the manifest and the caller name one (``""``: not recorded)."""
    if built and wanted and built != wanted:
        return [f"family (built for {built!r}, asked for {wanted!r})"]
    return []


def _frames_phrase(frames: int) -> str:
    return f"{frames} frames" if frames else "images (no frames)"


def _frames_problem(built: int, wanted: int) -> str:
    return f"frames (built for {_frames_phrase(built)}, asked for {_frames_phrase(wanted)})"


def check_graph_record(folder: str | os.PathLike[str], role: str, rec: GraphRecord, full_hash: bool, fix: str) -> None:
    """Refuses a graph file (and its ``.data`` file) that is missing or not the one ``rec`` recorded.

    Sizes are always compared (a truncated or replaced file is caught without reading it); with
    ``full_hash`` the sha256 digests too. The UNet's, a ControlNet's and the diffusion
    transformers' graphs ([`fd_trt.graphs.export_dit`][fd_trt.graphs.export_dit]) are checked by it.

    Args:
        folder: the engine directory.
        role: the graph's role, for the message.
        rec: its record ([`graph_record()`][fd_trt.graphs.manifest.graph_record] at export time).
        full_hash: also compare sha256 digests (reads every byte).
        fix: how to rebuild, appended to the message.

    Raises:
        CorruptGraphError: for a missing, truncated or altered file.
    """
    folder = Path(folder)
    files = [(rec.file, rec.bytes, rec.sha256)]
    if rec.data_file:
        files.append((rec.data_file, rec.data_bytes, rec.data_sha256))
    for name, size, digest in files:
        path = contained_path(folder, name)
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


def _check_graphs(
    folder: Path,
    what: str,
    problems: list[str],
    records: Mapping[str, GraphRecord],
    *,
    full_hash: bool,
    fix: str,
    file_fix: str,
) -> None:
    """Refuses graphs made from something else (``problems``), then missing or altered graph files.

    The one check behind [`check_engine_dir()`][fd_trt.graphs.manifest.check_engine_dir] (the UNet's graphs) and
    [`check_controlnet_graph()`][fd_trt.graphs.manifest.check_controlnet_graph] (one ControlNet's).

    Args:
        folder: the engine directory.
        what: the model the graphs must come from, for the message (``""`` for the UNet).
        problems: how they differ from it (weights, config, shapes, toolchain); empty when they do not.
        records: the graph records to check the files of, by role.
        full_hash: also compare sha256 digests (reads every byte).
        fix: how to rebuild, for a mismatch; file_fix: the same for a bad file.

    Raises:
        EngineMismatchError: for ``problems``; CorruptGraphError: for a missing, truncated or altered file.
    """
    if problems:
        raise EngineMismatchError(f"engine directory {folder} does not match{what}: {'; '.join(problems)}. {fix}")
    for role, rec in records.items():
        check_graph_record(folder, role, rec, full_hash, file_fix)


def check_graph_files(
    engine_dir: str | os.PathLike[str], full_hash: bool = False, manifest: Manifest | None = None
) -> Manifest:
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
    fix = f"delete it and rebuild: {rebuild_command(folder, manifest)}"
    _check_graphs(folder, "", [], manifest.graphs, full_hash=full_hash, fix=fix, file_fix=fix)
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
    frames: int | None = None,
    family: str = "",
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
            ([`fd_trt.graphs.contract.default_added_shapes()`][fd_trt.graphs.contract.default_added_shapes]).
        frames: F, for a text-to-video UNet (required for one, refused for an image UNet).
        family: the model family's name, recorded (``""``: not said).

    Returns:
        The manifest.

    Raises:
        InputError: for a bad count, or frames missing for a video UNet (or given for an image UNet).
        UnsupportedModelError: for a UNet the split does not carry.
    """
    for name, v in (("batch", batch), ("max_segment_steps", max_segment_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if text_shape is None:
        text_shape = (77, int(unet.config.cross_attention_dim))
    from fd_trt.graphs.export import check_unet_frames
    from fd_trt.graphs.split import check_supported
    from fd_trt.graphs.split_video import check_video_config

    frames = check_unet_frames(unet, frames)
    if frames is None:
        check_supported(unet)
    else:
        check_video_config(unet.config)
    contract = GraphContract.from_unet_config(unet.config, latent_size, text_shape, added_shapes, frames)
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
        family=str(family or ""),
        frames=int(frames or 0),
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
    frames: int | None = None,
    family: str | None = None,
) -> Manifest:
    """Refuses an engine directory that was built for another model, shape, frame count, precision or toolchain.

    Args:
        engine_dir: the engine directory.
        unet: the UNet the graphs must come from; weights and config are checked when given.
        latent_size: ``(h, w)`` the caller will run at.
        text_shape: ``(L, D)`` the caller will feed.
        precision: the precision the caller expects.
        full_hash: also hash the graph files (see [`check_graph_files()`][fd_trt.graphs.manifest.check_graph_files]).
        unet_sha256: the UNet's [`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256], when the caller already has it.
        added_shapes: the per-row shapes of the added conditioning the caller will feed (SDXL).
        frames: the frame count the caller will run at (text-to-video; 0 for image latents);
            not checked when ``None``.
        family: the model family the caller runs; checked when both it and the manifest name one.

    Returns:
        The manifest.

    Raises:
        EngineMismatchError: naming the first differing field and the command that rebuilds.
    """
    folder = Path(engine_dir)
    found = load_manifest(folder)
    problems: list[str] = []
    if unet is not None:
        problems += _source_problems(
            "unet",
            found.unet_sha256,
            found.unet_config,
            unet_sha256 or unet_weights_sha256(unet),
            unet_config_dict(unet),
        )
    if latent_size is not None and list(latent_size) != found.latent_shape[1:]:
        problems.append(f"latent_shape (built for {found.latent_shape[1:]}, asked for {list(latent_size)})")
    if text_shape is not None and list(text_shape) != found.text_shape:
        problems.append(f"text_shape (built for {found.text_shape}, asked for {list(text_shape)})")
    if frames is not None and int(frames) != found.frames:
        problems.append(_frames_problem(found.frames, int(frames)))
    problems += _family_problems(found.family, family)
    if precision is not None and precision != found.precision:
        problems.append(f"precision (built {found.precision}, asked for {precision})")
    if added_shapes is not None:
        wanted = {k: [int(d) for d in v] for k, v in added_shapes.items()}
        if wanted != found.added_shapes:
            problems.append(f"added_shapes (built for {found.added_shapes}, asked for {wanted})")
    problems += _version_problems(found.versions, package_versions())
    spec: dict[str, Any] = {"precision": precision}
    if frames is not None:
        spec["frames"] = int(frames)
    if latent_size is not None:
        scale = pixels_per_latent(found.unet_config)
        spec.update(height=latent_size[0] * scale, width=latent_size[1] * scale)
    _check_graphs(
        folder,
        "",
        problems,
        found.graphs,
        full_hash=full_hash,
        fix=f"Rebuild it with {rebuild_command(folder, found, **spec)}",
        file_fix=f"delete it and rebuild: {rebuild_command(folder, found)}",
    )
    return found


def save_manifest(engine_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Writes ``<engine_dir>/manifest.json`` atomically (a unique temporary file, then a rename).

    Callers that read, change and rewrite a manifest hold [`engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock] around all
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
    frames: int | None = None,
) -> None:
    """Refuses a plan built for another TensorRT version, another GPU generation, another graph or
    another frame count.

    Args:
        record: the plan's manifest record.
        tensorrt_version: the running ``tensorrt.__version__``.
        compute_capability: ``(major, minor)`` of the GPU the plan would run on.
        graph_sha256: the digest of the graph the plan must come from (the manifest's), if known.
        engine_dir: the engine directory, for the rebuild command in the message.
        frames: the frame count of the graphs the plan must serve (the manifest's ``frames``; 0
            for an image UNet's), if known.

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
        problems.append(f"a GPU of compute capability {have} ({record.gpu_name}), but this GPU has {cc[0]}.{cc[1]}")
    if graph_sha256 is not None and record.graph_sha256 != graph_sha256:
        problems.append("an older version of the graph (its sha256 differs from the manifest's)")
    if frames is not None and int(record.frames) != int(frames):
        problems.append(f"{_frames_phrase(int(record.frames))}, but the graphs take {_frames_phrase(int(frames))}")
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
            (a ControlNet plan passes its [`ControlNetRecord`][fd_trt.graphs.manifest.ControlNetRecord]).

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
                frames=manifest.frames,
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


def graph_record(folder: Path, name: str) -> GraphRecord:
    """The manifest record of a graph file in ``folder`` (its size and sha256, and its ``.data`` file's)."""
    path = folder / name
    data = folder / (name + ".data")
    rec = GraphRecord(file=name, sha256=file_sha256(path), bytes=path.stat().st_size)
    if data.is_file():
        rec.data_file, rec.data_sha256, rec.data_bytes = data.name, file_sha256(data), data.stat().st_size
    return rec


def controlnet_key(controlnet_sha256: str) -> str:
    """The manifest key (and file-name part) of a ControlNet graph: 16 hex digits of its weights digest."""
    return controlnet_sha256[:16]


def controlnet_graph(folder: Path, manifest: Manifest, sha: str, config: Mapping[str, Any]) -> ControlNetRecord:
    """The manifest's graph record for the ControlNet of weights ``sha`` and ``config``, its file checked by size.

    Raises:
        EngineMismatchError: naming what differs and how to build the graph; CorruptGraphError:
            for a missing or truncated graph file.
    """
    rec = manifest.controlnets.get(controlnet_key(sha))
    if rec is None:
        others = sorted(r.controlnet_sha256[:12] + ".." for r in manifest.controlnets.values())
        problems = [
            f"it holds no ControlNet graph for weights {sha[:12]}.. (ControlNet graphs for "
            f"{', '.join(others) or 'no ControlNet'}; the ControlNet's weights changed or it was never "
            "exported here)"
        ]
    else:
        problems = _source_problems("controlnet", rec.controlnet_sha256, rec.controlnet_config, sha, config)
    how = (
        f"fd_trt.graphs.build.build_controlnet_graph(controlnet, {str(folder)!r}), or call the pipeline with "
        "build_on_demand=True (the default)"
    )
    _check_graphs(
        folder,
        " the ControlNet",
        problems,
        {"ControlNet": rec} if rec is not None else {},
        full_hash=False,
        fix=f"Build its graph with {how}",
        file_fix=f"export it again with {how}",
    )
    assert rec is not None  # no record is a problem above
    return rec


def check_controlnet_graph(
    engine_dir: str | os.PathLike[str], controlnet: nn.Module, *, controlnet_sha256: str | None = None
) -> ControlNetRecord:
    """The directory's graph record for this ControlNet; refuses one built from other weights or config.

    Args:
        engine_dir: a built engine directory (its UNet graphs first).
        controlnet: the diffusers ``ControlNetModel``.
        controlnet_sha256: its [`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256], when the caller has it.

    Raises:
        EngineMismatchError: naming what differs and how to build the graph.
    """
    folder = Path(engine_dir)
    sha = controlnet_sha256 or unet_weights_sha256(controlnet)
    return controlnet_graph(folder, load_manifest(folder), sha, unet_config_dict(controlnet))


__all__ = [
    "ControlNetRecord",
    "FORMAT_VERSION",
    "GraphRecord",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "Manifest",
    "PLAN_SUFFIX",
    "PlanRecord",
    "RECORDED_PACKAGES",
    "TOOLCHAIN_PACKAGES",
    "check_controlnet_graph",
    "check_engine_dir",
    "check_graph_files",
    "check_graph_record",
    "check_plan",
    "contained_path",
    "controlnet_graph",
    "controlnet_key",
    "engine_dir_lock",
    "expected_manifest",
    "find_plan",
    "graph_record",
    "load_manifest",
    "package_versions",
    "pixels_per_latent",
    "rebuild_command",
    "save_manifest",
    "stale_fields",
    "unsafe_name",
]
