"""Building an engine directory's graphs: the UNet's encoder and decoder, and one graph per ControlNet.

Each build takes the directory's lock ([`fd_trt.graphs.manifest.engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock]), compares
what is there with the model at hand ([`fd_trt.graphs.manifest`][fd_trt.graphs.manifest]), and exports
([`fd_trt.graphs.export`][fd_trt.graphs.export]) only what is missing or stale, writing the manifest last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from fd_trt.errors import EngineMismatchError
from fd_trt.graphs.contract import ControlNetContract, GraphContract
from fd_trt.graphs.export import (
    DECODER_FILE,
    DEFAULT_OPSET,
    ENCODER_FILE,
    EXTERNAL_DATA_THRESHOLD,
    check_graph_file,
    controlnet_file_name,
    export_controlnet,
    export_unet,
    remove_graphs,
)
from fd_trt.graphs.manifest import (
    MANIFEST_FILE,
    PLAN_SUFFIX,
    ControlNetRecord,
    Manifest,
    check_graph_files,
    controlnet_graph,
    controlnet_key,
    engine_dir_lock,
    expected_manifest,
    graph_record,
    load_manifest,
    save_manifest,
    stale_fields,
)
from fd_trt.graphs.weights import unet_config_dict, unet_weights_sha256

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BuildResult:
    """What [`build_engines()`][fd_trt.graphs.build.build_engines] did.

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
    frames: int | None = None,
    family: str = "",
) -> BuildResult:
    """Builds (or keeps) the ONNX graphs of an engine directory.

    A second call with an unchanged model and settings reads the manifest and the files' hashes,
    writes nothing and reports ``built=False``. Concurrent calls on one directory (processes,
    Ray replicas warming one cache) are serialized by [`fd_trt.graphs.manifest.engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock]:
    one exports, the others wait, find the graphs up to date and report ``built=False``.

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
        external_data_threshold: see [`fd_trt.graphs.export.export_unet()`][fd_trt.graphs.export.export_unet].
        unet_sha256: the weights digest, when the caller already computed it.
        added_shapes: per-row shapes of SDXL's added conditioning (``{"text_embeds": (P,),
            "time_ids": (K,)}``); the config's, with K = 6, when omitted.
        share_rows: see [`fd_trt.graphs.export.export_unet()`][fd_trt.graphs.export.export_unet] (``None``: decided from the UNet's
            widths). It changes speed, not numbers, so it is not a manifest field: an engine
            directory built with another setting stays up to date (``force=True`` rebuilds).
        frames: the frame count F of a text-to-video UNet's graphs (latents ``[rows, C, F, h,
            w]``; required for one, refused for an image UNet). A directory built for another F
            is stale.
        family: the model family's name, recorded in the manifest (``""``: not said).

    Returns:
        A [`BuildResult`][fd_trt.graphs.build.BuildResult].
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
        frames=frames,
        family=family,
    )

    def find() -> Manifest | str:
        return "forced" if force else _up_to_date(folder, expected)

    def export() -> Manifest:
        result = _export_into(
            folder,
            unet,
            expected,
            latent_size=latent_size,
            opset=opset,
            external_data_threshold=external_data_threshold,
            progress=progress,
            t0=t0,
            share_rows=share_rows,
        )
        logger.info(
            "built %s in %.1f s: encoder %.1f MB, decoder %.1f MB",
            folder,
            expected.build_seconds,
            result.encoder.bytes / 1e6,
            result.decoder.bytes / 1e6,
        )
        return expected

    manifest, built, reason = _build_locked(folder, "graph export", find, export)
    return BuildResult(folder, manifest, built, reason, time.perf_counter() - t0)


def _build_locked(folder: Path, what: str, find: Callable[[], T | str], export: Callable[[], T]) -> tuple[T, bool, str]:
    """Under the engine directory's lock: what ``find`` finds up to date, or what ``export`` builds.

    The one build skeleton of the UNet's graphs ([`build_engines()`][fd_trt.graphs.build.build_engines]) and a ControlNet's
    ([`build_controlnet_graph()`][fd_trt.graphs.build.build_controlnet_graph]). ``find`` runs under the lock, since another process may have
    built the graph while this one waited; it returns the up-to-date result or why to (re)build.

    Returns:
        ``(result, built, reason)``; ``reason`` is ``"up to date"`` when nothing was built.
    """
    with engine_dir_lock(folder, what):
        found = find()
        if not isinstance(found, str):
            logger.info("%s is up to date; no %s", folder, what)
            return found, False, "up to date"
        logger.info("%s into %s (%s)", what, folder, found)
        return export(), True, found


def _up_to_date(folder: Path, expected: Manifest) -> Manifest | str:
    """The manifest when the folder's graphs match ``expected``; else why not."""
    if not (folder / MANIFEST_FILE).is_file():
        return "no manifest"
    try:
        found = load_manifest(folder)
        problems = stale_fields(expected, found)
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

    The caller holds [`fd_trt.graphs.manifest.engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock]. The manifest is removed first
    and written last, so a build killed in between leaves no manifest, and nothing half-written is
    ever loaded (the next build starts over). With ``keep_plans`` the plan files stay (a refit
    rewrites them next); otherwise plans of the old graphs, which could never run again, are deleted.
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
        frames=expected.frames or None,
    )
    expected.graphs = {"encoder": graph_record(folder, ENCODER_FILE), "decoder": graph_record(folder, DECODER_FILE)}
    expected.controlnets = {}  # remove_graphs deleted them: they are exported again on first use
    expected.num_skips = result.num_skips
    expected.built_at = time.time()
    expected.build_seconds = time.perf_counter() - t0
    if not keep_plans:
        save_manifest(folder, expected)
    return result


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
    are checked against the UNet's features ([`ControlNetContract.check_fits()`][fd_trt.graphs.contract.ControlNetContract.check_fits]). Under
    [`fd_trt.graphs.manifest.engine_dir_lock()`][fd_trt.graphs.manifest.engine_dir_lock], like every writer.

    Args:
        controlnet: a diffusers ``ControlNetModel`` (SD 1.x/2.x).
        engine_dir: an engine directory whose UNet graphs are built.
        controlnet_sha256: its [`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256], when the caller has it.
        force: export even when up to date.
        progress: show a progress bar.
        external_data_threshold: see [`fd_trt.graphs.export.export_unet()`][fd_trt.graphs.export.export_unet].

    Returns:
        The graph's manifest record.

    Raises:
        UnsupportedModelError: for an SDXL ControlNet, or one whose residuals do not fit the UNet.
        EngineMismatchError: when the directory has no manifest.
    """
    folder = Path(engine_dir)
    sha = controlnet_sha256 or unet_weights_sha256(controlnet)
    config = unet_config_dict(controlnet)

    def find() -> ControlNetRecord | str:
        manifest = load_manifest(folder)  # no manifest: raises, forced or not (the UNet's graphs come first)
        if force:
            return "forced"
        try:
            return controlnet_graph(folder, manifest, sha, config)
        except EngineMismatchError as exc:
            return str(exc)

    def export() -> ControlNetRecord:
        t0 = time.perf_counter()
        manifest = load_manifest(folder)
        latent = (int(manifest.latent_shape[1]), int(manifest.latent_shape[2]))
        text = (int(manifest.text_shape[0]), int(manifest.text_shape[1]))
        contract = ControlNetContract.from_controlnet_config(controlnet.config, latent, text)
        contract.check_fits(GraphContract.from_manifest(manifest), "the ControlNet")
        name = controlnet_file_name(sha)
        export_controlnet(
            controlnet,
            folder / name,
            latent_size=latent,
            text_shape=text,
            precision=manifest.precision,
            opset=int(manifest.opset),
            external_data_threshold=external_data_threshold,
            progress=progress,
        )
        rec = ControlNetRecord(
            **asdict(graph_record(folder, name)),
            controlnet_sha256=sha,
            controlnet_config=config,
            num_down=contract.num_down,
            cond_shape=[int(d) for d in contract.cond_tail],
            built_at=time.time(),
        )
        manifest.controlnets[controlnet_key(sha)] = rec
        save_manifest(folder, manifest)
        logger.info(
            "exported the ControlNet graph %s (%.1f MB) in %.1f s",
            folder / name,
            rec.bytes / 1e6,
            time.perf_counter() - t0,
        )
        return rec

    return _build_locked(folder, "ControlNet graph export", find, export)[0]


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
    "build_controlnet_graph",
    "build_engines",
    "verify_graphs_parse",
]
