"""ONNX export of the split UNet: the encoder and decoder graphs of docs/design.md section 3.

Each graph goes through the same stages: trace with the TorchScript exporter, clean up with
onnx-graphsurgeon (dead nodes, topological order), fold constants with polygraphy, infer shapes,
save (one external ``.data`` file when the model is over 2 GB) and check with ``onnx.checker``
on the saved path.

Graph names, input order, dtypes and dynamic axes come from the graph contract
([`fd_trt.graphs.contract.GraphContract`][fd_trt.graphs.contract.GraphContract]), which every backend reads too: for SD 1.x/2.x
``sample, timestep, encoder_hidden_states -> mid, skip_00 ..`` and
``mid, skip_00 .., timestep, encoder_hidden_states -> noise_pred``; SDXL UNets add
``text_embeds`` and ``time_ids`` to both graphs. Axis 0 is dynamic on every input and output;
height, width, the text shape and the added shapes are fixed per export. A text-to-video UNet
(``UNet3DConditionModel``, ``UNetMotionModel``) exports the same two graphs over video latents
``[rows, C, F, h, w]``, its frame count F fixed per export too (``frames=``).

The TorchScript exporter (``dynamo=False``) is used on purpose: on the tiny test UNet it exports
the encoder in about 1 s against about 5 s for the torch.export-based exporter, and its graphs are
what the ONNX Runtime numbers of docs/design.md section 7 were measured on.

onnx, onnx-graphsurgeon, polygraphy and onnxruntime are imported inside the functions, so that
``import fd_trt`` stays light.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fd_trt.core.features import Features
from fd_trt.errors import BackendUnavailableError, EngineMismatchError, InputError
from fd_trt.graphs.contract import (
    FLOAT32,
    NOISE_PRED,
    TEXT,
    TIMESTEP,
    ControlNetContract,
    GraphContract,
    GraphSpec,
    check_frames,
)
from fd_trt.graphs.split import ROW_SHARING_MIN_CHANNELS, SplitUNet, decoder_shares_rows, split_unet
from fd_trt.utils.files import remove_stale_temporaries, temp_prefix

if TYPE_CHECKING:  # pragma: no cover
    import onnx

logger = logging.getLogger(__name__)

#: Lowest ONNX opset the graphs may use (LayerNormalization and friends need 17).
MIN_OPSET = 17
DEFAULT_OPSET = 17
#: Protobuf cannot serialise a message of 2 GiB or more; above this the weights go to a .data file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 1
#: Steps of the decoder's tracing inputs (any S > 1: the graph takes every S).
EXAMPLE_STEPS = 3
PRECISIONS = ("fp32", "fp16")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

DECODER_OUTPUT = NOISE_PRED
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
#: ControlNet graphs are ``controlnet-<first 16 hex digits of the ControlNet's weights sha256>.onnx``:
#: one per ControlNet, so that several ControlNets (or a changed one) never overwrite each other.
CONTROLNET_PREFIX = "controlnet-"


class CorruptGraphError(EngineMismatchError):
    """A graph file is truncated, corrupt, or not the ONNX graph fd_trt wrote."""


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            f"ONNX export needs the onnx package ({exc}); reinstall fd_trt (`pip install -e .`), which requires it"
        ) from exc
    return onnx


def _require_toolchain() -> tuple[Any, Any, Any]:
    onnx = _require_onnx()
    try:
        import onnx_graphsurgeon as gs
        from polygraphy.backend import onnx as pg_onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            f"ONNX export needs onnx-graphsurgeon and polygraphy ({exc}); reinstall fd_trt (`pip install -e .`), which requires them"
        ) from exc
    return onnx, gs, pg_onnx


def encoder_output_names(num_skips: int) -> list[str]:
    """The encoder graph's output names, ``mid, skip_00 .. skip_NN``.

    Args:
        num_skips: number of skip features (12 for SD 1.x).

    Returns:
        The names, in output order ([`fd_trt.graphs.contract.GraphContract`][fd_trt.graphs.contract.GraphContract]).
    """
    return GraphContract(num_skips).encoder.output_names


def decoder_input_names(num_skips: int) -> list[str]:
    """The SD 1.x/2.x decoder graph's input names: ``mid, skip_00 .. skip_NN, timestep, encoder_hidden_states``.

    Args:
        num_skips: number of skip features.

    Returns:
        The names, in input order ([`fd_trt.graphs.contract.GraphContract`][fd_trt.graphs.contract.GraphContract]).
    """
    return GraphContract(num_skips).decoder.input_names


class DecoderForExport(nn.Module):
    """The decoder graph's module: ``(mid, *skips, timestep, encoder_hidden_states, *added) -> noise_pred``.

    The features, text and added conditioning have the key step's N rows and the timestep has S*N
    ([`fd_trt.graphs.split.SplitUNet.run_decoder_steps()`][fd_trt.graphs.split.SplitUNet.run_decoder_steps], which repeats the rows inside the graph and
    computes the skip convolutions and text projections once per distinct row). The exporter
    names graph inputs positionally, and the split decoder takes the skips as one sequence
    argument; this wrapper gives each skip its own named graph input.

    Args:
        split: the [`SplitUNet`][fd_trt.graphs.split.SplitUNet] of [`fd_trt.graphs.split.split_unet()`][fd_trt.graphs.split.split_unet].
        share: share the repeated rows' work in the graph ([`decoder_shares_rows()`][fd_trt.graphs.split.decoder_shares_rows]).
    """

    def __init__(self, split: SplitUNet, share: bool = True) -> None:
        super().__init__()
        self.decoder = split.decoder  # registered, so the exporter sees the weights as parameters
        self.split = split
        self.num_skips = split.num_skips
        self.share = share

    def forward(self, mid: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        n = self.num_skips
        return self.split.run_decoder_steps(
            Features(mid, tuple(rest[:n])), rest[n], rest[n + 1], rest[n + 2 :], self.share
        )


class ControlNetForExport(nn.Module):
    """A diffusers ``ControlNetModel`` with the ControlNet graph's flat inputs and outputs:
    ``(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale) ->
    (down_00, .., mid)``. ``conditioning_scale`` is a ``[1]`` tensor, so it stays a graph input
    (cast to the weights' precision inside, so an fp16 graph stays fp16). Guess mode is not
    part of the graph: it rescales the outputs, which the runner does
    (`fd_trt.pipelines.conditioning.guess_mode_scales()`)."""

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale.to(sample.dtype),
            return_dict=False,
        )
        return (*down, mid)


def controlnet_file_name(controlnet_sha256: str) -> str:
    """The graph file of the ControlNet whose weights digest is ``controlnet_sha256``."""
    return f"{CONTROLNET_PREFIX}{controlnet_sha256[:16]}.onnx"


def export_controlnet(
    controlnet: nn.Module,
    path: str | os.PathLike[str],
    *,
    latent_size: tuple[int, int],
    text_shape: tuple[int, int],
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    example_rows: int = 2,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: bool = True,
) -> GraphInfo:
    """Exports one ControlNet as the ControlNet graph ([`fd_trt.graphs.contract.ControlNetContract`][fd_trt.graphs.contract.ControlNetContract]).

    Args:
        controlnet: a diffusers ``ControlNetModel`` (SD 1.x/2.x; left unchanged).
        path: the ``.onnx`` file to write (replaced when it exists).
        latent_size, text_shape, precision, opset, example_rows, external_data_threshold, progress:
            as [`export_unet()`][fd_trt.graphs.export.export_unet]; the control image is ``latent_size`` times the ControlNet's factor.

    Returns:
        The graph's [`GraphInfo`][fd_trt.graphs.export.GraphInfo].

    Raises:
        UnsupportedModelError: for an SDXL (or otherwise conditioned) ControlNet.
        InputError: for a bad precision, opset or shape.
    """
    from tqdm.auto import tqdm

    latent_size, text_shape = tuple(latent_size), tuple(text_shape)  # type: ignore[assignment]
    _check_export_args(latent_size, text_shape, precision, opset, example_rows)
    contract = ControlNetContract.from_controlnet_config(controlnet.config, latent_size, text_shape)
    _require_toolchain()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _unet_for_precision(controlnet, precision)
    dtype = _TORCH_DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    spec = contract.spec
    args = []
    for t in spec.inputs:
        if t.name == TIMESTEP:
            value = torch.linspace(999.0, 1.0, example_rows)
        elif t.dtype == FLOAT32:  # conditioning_scale: not 1, so the multiplication is traced
            value = torch.full(t.shape_at(example_rows), 0.75)
        else:
            value = torch.rand(t.shape_at(example_rows), generator=gen)
        args.append(value.to(device, torch.float32 if t.dtype == FLOAT32 else dtype))
    bar = tqdm(total=3, desc=f"export controlnet {precision}", disable=not progress, leave=False)
    try:
        info = _export_graph(ControlNetForExport(model), tuple(args), path, spec, opset, external_data_threshold, bar)
    finally:
        bar.close()
    logger.info(
        "exported the %s ControlNet graph %s in %.1f s (%.1f MB)",
        precision,
        path,
        sum(info.seconds.values()),
        info.bytes / 1e6,
    )
    return info


@dataclass
class GraphInfo:
    """One exported graph.

    Attributes:
        path: the ``.onnx`` file.
        data_path: the external weights file, or ``None`` when the weights are inside ``path``.
        bytes: total size on disk (graph + external data).
        seconds: wall seconds per stage (``export``, ``cleanup``, ``fold``, ``shapes``, ``save``, ``check``).
    """

    path: Path
    data_path: Path | None
    bytes: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What [`export_unet()`][fd_trt.graphs.export.export_unet] wrote.

    Attributes:
        encoder, decoder: the two graphs.
        precision: ``fp32`` or ``fp16``.
        opset: the ONNX opset.
        num_skips: number of skip features between the graphs.
        latent_shape: ``(C, h, w)`` of the sample.
        text_shape: ``(L, D)`` of the encoder hidden states.
        seconds: total wall seconds.
        added_shapes: per-row shapes of the added conditioning (SDXL's ``text_embeds``,
            ``time_ids``); empty for SD 1.x/2.x.
        share_rows: whether the decoder graph shares the repeated rows' work.
        frames: F of a video UNet's graphs (``sample [rows,C,F,h,w]``), ``None`` for an image UNet's.
    """

    encoder: GraphInfo
    decoder: GraphInfo
    precision: str
    opset: int
    num_skips: int
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    seconds: float
    added_shapes: dict[str, list[int]] = field(default_factory=dict)
    share_rows: bool = False
    frames: int | None = None


def _check_export_args(
    latent_size: tuple[int, int], text_shape: tuple[int, int], precision: str, opset: int, example_rows: int
) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} cannot be exported: use one of {', '.join(PRECISIONS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"opset {opset!r} is too old for the graphs: use {MIN_OPSET} or later")
    for name, pair in (("latent_size", latent_size), ("text_shape", text_shape)):
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
            raise InputError(f"{name} must be two positive integers, got {pair!r}")
    if isinstance(example_rows, bool) or not isinstance(example_rows, int) or example_rows < 2:
        # One row would let the tracer specialise size-1 broadcasts into the graph.
        raise InputError(f"example_rows must be an integer >= 2, got {example_rows!r}")


def _unet_for_precision(unet: nn.Module, precision: str) -> nn.Module:
    dtype = _TORCH_DTYPES[precision]
    param = next(unet.parameters())
    if param.dtype == dtype:
        return unet
    # A copy, so the caller's UNet keeps its dtype; fp16 graphs must come from fp16 weights.
    # nn.Module.to, not diffusers' override, which warns about keep-in-fp32 modules SD UNets lack.
    return nn.Module.to(copy.deepcopy(unet), dtype=dtype).eval()


def example_inputs(
    unet: nn.Module,
    latent_size: tuple[int, int],
    text_shape: tuple[int, int],
    rows: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    added_shapes: dict[str, Sequence[int]] | None = None,
    frames: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded encoder inputs, in the encoder graph's input order.

    Args:
        unet: the UNet (for its config and device).
        latent_size: ``(h, w)``.
        text_shape: ``(L, D)``.
        rows: N.
        dtype: dtype of the graph-precision inputs (``timestep`` and ``time_ids`` are float32).
        seed: seed of the CPU generator.
        added_shapes: per-row shapes of SDXL's added conditioning; the config's defaults when omitted.
        frames: F, for a video UNet (``sample [N,C,F,h,w]``).

    Returns:
        ``(sample [N,C,h,w], timestep [N], encoder_hidden_states [N,L,D])``, followed for SDXL by
        ``text_embeds [N,P]`` and ``time_ids [N,K]``.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    spec = GraphContract.from_unet_config(unet.config, latent_size, text_shape, added_shapes, frames).encoder
    out = []
    for t in spec.inputs:
        shape = t.shape_at(rows)
        if t.name == TIMESTEP:
            # Distinct timesteps per row, so nothing in the trace can assume they are equal.
            value = torch.linspace(999.0, 1.0, rows)
        elif t.dtype == FLOAT32:
            # Timestep-like values (sizes, crop offsets in pixels), distinct per row and per column.
            value = 64.0 * (1 + torch.arange(math.prod(shape[1:]), dtype=torch.float32)).reshape(
                shape[1:]
            ) + 8.0 * torch.arange(rows).reshape(-1, *[1] * (len(shape) - 1))
        else:
            value = torch.randn(shape, generator=gen)
        out.append(value.to(device, torch.float32 if t.dtype == FLOAT32 else dtype))
    return tuple(out)


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    # The tracer warns about every Python-side shape assert in diffusers; they are expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        ort = None
        try:
            import onnxruntime as ort

            # polygraphy folds constants through onnxruntime, whose graph optimizer warns about
            # every Unsqueeze it cannot remove; 2 (warning) is onnxruntime's default to restore.
            ort.set_default_logger_severity(3)
        except ImportError:  # pragma: no cover - folding then fails with its own message
            pass
        try:
            from polygraphy.logger import G_LOGGER

            with G_LOGGER.verbosity(G_LOGGER.ERROR):
                yield
        finally:
            if ort is not None:
                ort.set_default_logger_severity(2)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's weights, without serialising it (protobuf cannot above 2 GB).

    Args:
        model: an ONNX model with its weights loaded.

    Returns:
        The summed byte size of all initializers, including those in subgraphs' constants.
    """
    import numpy as np
    import onnx

    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            total += math.prod(init.dims) * itemsize
    return total


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> Path | None:
    """Saves a model, moving its weights to ``<name>.data`` when they exceed the threshold.

    The graph (and its ``.data``) are written into a temporary folder of this process
    (``.fdtmp-<pid>-...``) next to ``path`` and renamed into place, data first: an interrupted
    save never leaves a truncated graph under the final name, and two processes never write the
    same temporary.

    Args:
        model: the model (weights loaded).
        path: the target ``.onnx`` path.
        external_data_threshold: weights above this many bytes go to one external file.

    Returns:
        The external data path, or ``None`` when the weights stay inside the graph file.
    """
    onnx = _require_onnx()
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    external = initializer_bytes(model) > external_data_threshold
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        if external:
            # The graph records the data file by its relative name, the same in the temporary folder.
            onnx.save_model(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
                size_threshold=1024,
            )
            os.replace(tmp_dir / data_path.name, data_path)
        else:
            onnx.save_model(model, tmp)
            data_path.unlink(missing_ok=True)  # an older export's weights would shadow nothing, but mislead
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return data_path if external else None


def _fits_one_message(model: onnx.ModelProto) -> bool:
    """Whether protobuf can serialise ``model`` as one message (under 2 GiB). Above the limit,
    protobuf refuses even to size it (``EncodeError``), so the weights are counted first."""
    if initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return False
    try:
        return model.ByteSize() < EXTERNAL_DATA_THRESHOLD
    except Exception:  # noqa: BLE001 - protobuf's EncodeError: too large to serialise
        return False


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation.

    The decoder graph repeats its N input rows S = step_rows / N times (a Tile by a computed
    count); only with the shape values propagated through ``Shape``, ``Div`` and ``Concat`` does
    inference find that ``noise_pred`` is ``[step_rows, C, h, w]``, with every dim after the
    rows fixed. Models above protobuf's 2 GB limit go through a temporary file.
    """
    onnx = _require_onnx()
    if _fits_one_message(model):
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("shapes")) as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(
            model,
            src,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="in.data",
            size_threshold=1024,
        )
        del model
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), strict_mode=True, data_prop=True)
        return onnx.load(str(dst), load_external_data=True)


def optimize_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cleans up, folds constants and infers shapes.

    Args:
        model: a freshly exported model with its weights loaded.

    Returns:
        The optimized model.
    """
    _, gs, pg_onnx = _require_toolchain()
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model = pg_onnx.fold_constants(model, num_passes=2, error_ok=False, allow_onnxruntime_shape_inference=False)
    model = infer_shapes(model)
    # Folding can orphan nodes and initializers; one more cleanup keeps the files minimal.
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    spec: GraphSpec,
    opset: int,
    external_data_threshold: int,
    bar: Any,
) -> GraphInfo:
    onnx = _require_onnx()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        t0 = time.perf_counter()
        bar.set_postfix_str(f"{path.stem}: trace")
        with torch.no_grad(), _quiet_exporters():
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
        # Large models come back with one file per tensor next to raw.onnx; onnx.load gathers them.
        model = onnx.load(str(raw), load_external_data=True)
        seconds["export"] = time.perf_counter() - t0
        bar.update(1)

    t0 = time.perf_counter()
    bar.set_postfix_str(f"{path.stem}: optimize")
    with _quiet_exporters():
        model = optimize_onnx(model)
    seconds["optimize"] = time.perf_counter() - t0
    bar.update(1)

    t0 = time.perf_counter()
    bar.set_postfix_str(f"{path.stem}: save + check")
    data_path = save_onnx(model, path, external_data_threshold)
    del model
    # The path form of the checker reads external data itself and works above 2 GB.
    onnx.checker.check_model(str(path))
    seconds["save"] = time.perf_counter() - t0
    bar.update(1)
    size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    return GraphInfo(path=path, data_path=data_path, bytes=size, seconds=seconds)


def export_unet(
    unet: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    latent_size: tuple[int, int],
    text_shape: tuple[int, int] | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    example_rows: int = 2,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: bool = True,
    added_shapes: dict[str, Sequence[int]] | None = None,
    share_rows: bool | None = None,
    frames: int | None = None,
) -> ExportResult:
    """Exports the encoder and decoder of a UNet as ``encoder.onnx`` and ``decoder.onnx``.

    Args:
        unet: a diffusers ``UNet2DConditionModel``, or a text-to-video ``UNet3DConditionModel`` /
            ``UNetMotionModel`` (with ``frames``); left unchanged, an fp16 export works on a copy.
        out_dir: folder for the two graphs; created when missing. Existing graphs are replaced.
        latent_size: ``(h, w)`` of the latents (image size / 8 for SD).
        text_shape: ``(L, D)`` of the text states; ``(77, cross_attention_dim)`` when omitted.
        precision: ``fp32`` (CPU) or ``fp16`` (exported from a half-precision copy, for TensorRT).
        opset: ONNX opset, 17 or later.
        example_rows: rows of the tracing inputs (axis 0 stays dynamic whatever it is).
        external_data_threshold: weights above this many bytes are saved to ``<graph>.onnx.data``.
        progress: show a progress bar over the export stages.
        added_shapes: per-row shapes of SDXL's added conditioning, ``{"text_embeds": (P,),
            "time_ids": (K,)}``; from the config with K = 6 (SDXL base) when omitted; pass
            ``K = 5`` for the refiner.
        share_rows: whether the decoder graph computes the work of the rows it repeats once
            (``None``: [`decoder_shares_rows()`][fd_trt.graphs.split.decoder_shares_rows] decides from the UNet's widths). Either
            graph takes the same inputs and gives the same numbers within rounding. A video
            UNet's decoder repeats the rows unshared (its split has no sharing).
        frames: the frame count F of a video UNet's graphs (required for one, refused for an
            image UNet): the latents are ``[rows, C, F, h, w]`` and F is fixed in the graphs.

    Returns:
        An [`ExportResult`][fd_trt.graphs.export.ExportResult] with paths, sizes and timings.

    Raises:
        InputError: for a bad precision, opset, shape or frame count.
        UnsupportedModelError: when the UNet cannot be split.
        BackendUnavailableError: when onnx, onnx-graphsurgeon or polygraphy is missing.
    """
    from tqdm.auto import tqdm

    frames = check_unet_frames(unet, frames)
    if text_shape is None:
        text_shape = (77, int(unet.config.cross_attention_dim))
    latent_size, text_shape = tuple(latent_size), tuple(text_shape)  # type: ignore[assignment]
    _check_export_args(latent_size, text_shape, precision, opset, example_rows)
    _require_toolchain()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    model = _unet_for_precision(unet, precision)
    split = split_unet(model)
    num_skips = split.num_skips
    contract = GraphContract.from_unet_config(model.config, latent_size, text_shape, added_shapes, frames)
    if contract.num_skips != num_skips or contract.added_names != split.added_names:
        raise InputError(  # the contract and the split read one config: only a non-diffusers UNet gets here
            f"the graph contract ({contract.num_skips} skips, added {contract.added_names}) does not fit the split UNet "
            f"({num_skips} skips, added {split.added_names})"
        )
    enc_args = example_inputs(
        model,
        latent_size,
        text_shape,
        example_rows,
        _TORCH_DTYPES[precision],
        added_shapes=added_shapes,
        frames=frames,
    )
    with torch.no_grad():
        feats = split.encoder(*enc_args)
    # The decoder's inputs after the features are the encoder's after the sample, but for the
    # timestep: EXAMPLE_STEPS steps of N rows, distinct per step, so that the trace keeps S and N apart.
    steps = torch.linspace(900.0, 100.0, EXAMPLE_STEPS).repeat_interleave(example_rows).to(enc_args[1])
    dec_args = (*feats, steps, *enc_args[2:])
    share = decoder_shares_rows(model.config) if share_rows is None else bool(share_rows)
    share = share and frames is None  # the video split repeats its rows unshared

    bar = tqdm(total=6, desc=f"export {precision}", disable=not progress, leave=False)
    try:
        encoder = _export_graph(
            split.encoder,
            enc_args,
            out / ENCODER_FILE,
            contract.encoder,
            opset,
            external_data_threshold,
            bar,
        )
        decoder = _export_graph(
            DecoderForExport(split, share),
            dec_args,
            out / DECODER_FILE,
            contract.decoder,
            opset,
            external_data_threshold,
            bar,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    logger.info(
        "exported %s graphs to %s in %.1f s: encoder %.1f MB, decoder %.1f MB (%s)",
        precision,
        out,
        seconds,
        encoder.bytes / 1e6,
        decoder.bytes / 1e6,
        "shares the repeated rows' work" if share else "repeats the rows, unshared",
    )
    return ExportResult(
        encoder=encoder,
        decoder=decoder,
        precision=precision,
        opset=opset,
        num_skips=num_skips,
        latent_shape=(int(model.config.in_channels), *latent_size),
        text_shape=text_shape,
        seconds=seconds,
        added_shapes=contract.added_shapes,
        share_rows=share,
        frames=frames,
    )


def check_unet_frames(unet: nn.Module, frames: Any) -> int | None:
    """The frame count of a UNet's graphs: ``frames`` for a text-to-video UNet, ``None`` for an image UNet.

    Raises:
        InputError: when a video UNet comes without a frame count, an image UNet with one, or
            ``frames`` is not a positive integer.
    """
    from fd_trt.graphs.split_video import video_unet_class

    frames = check_frames(frames)
    video = video_unet_class(unet)
    if video is not None and frames is None:
        raise InputError(
            f"a {video}'s graphs take video latents [rows, C, F, h, w] with the frame count F fixed: pass frames=F "
            "(fd-trt build --frames F)"
        )
    if video is None and frames is not None:
        raise InputError(
            f"frames={frames} is for text-to-video UNets; this {type(unet).__name__} takes image latents: leave frames unset"
        )
    return frames


def check_graph_file(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parses a graph file without its external weights, turning corruption into a clear error.

    Native runtimes report a truncated protobuf poorly (or crash); parsing it in Python first
    gives a message that names the file and the fix.

    Args:
        path: an ``.onnx`` file.

    Returns:
        The model proto, without external weights loaded.

    Raises:
        CorruptGraphError: when the file is missing, truncated, or not an ONNX model.
    """
    onnx = _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise CorruptGraphError(f"graph file {path} does not exist: rebuild the engine directory (fd-trt build)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends, with no common base
        raise CorruptGraphError(
            f"graph file {path} ({path.stat().st_size} bytes) is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "delete it and rebuild the engine directory (fd-trt build)"
        ) from exc
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise CorruptGraphError(
            f"graph file {path} parses but holds no graph ({path.stat().st_size} bytes): it is truncated or not an "
            "fd_trt graph; delete it and rebuild the engine directory (fd-trt build)"
        )
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for location in sorted(locations):
        data = path.parent / location
        if not data.is_file():
            raise CorruptGraphError(
                f"graph file {path} keeps its weights in {data}, which is missing: rebuild the engine directory (fd-trt build)"
            )
    return model


@dataclass
class PrecisionReport:
    """fp16 graph against fp32 graph on the same inputs (ONNX Runtime CPU).

    Attributes:
        max_abs_error: per output name, max |fp16 - fp32|.
        max_abs_reference: per output name, max |fp32|, to judge the error against.
        finite: ``False`` when an fp16 output holds NaN or Inf (fp16 overflow).
    """

    max_abs_error: dict[str, float]
    max_abs_reference: dict[str, float]
    finite: bool

    @property
    def worst_relative(self) -> float:
        """The largest ``max_abs_error / max_abs_reference`` over the outputs."""
        return max(e / max(self.max_abs_reference[k], 1e-12) for k, e in self.max_abs_error.items())


def _ort_feed(session: Any, values: dict[str, torch.Tensor]) -> dict[str, Any]:
    import numpy as np

    feed = {}
    for inp in session.get_inputs():
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        feed[inp.name] = values[inp.name].detach().cpu().numpy().astype(dtype)
    return feed


def compare_precisions(
    fp32_dir: str | os.PathLike[str],
    fp16_dir: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor],
    decoder_timesteps: torch.Tensor | None = None,
) -> dict[str, PrecisionReport]:
    """Runs the fp16 and fp32 graphs on the same real inputs and reports the fp16 error.

    The decoder of each precision is fed its own encoder's features, so the decoder report is
    the error of the whole fp16 UNet, overflow included.

    Args:
        fp32_dir: folder with the fp32 ``encoder.onnx`` / ``decoder.onnx``.
        fp16_dir: folder with the fp16 graphs.
        inputs: the encoder's inputs in graph order ([`example_inputs()`][fd_trt.graphs.export.example_inputs]): ``(sample [N,C,h,w],
            timestep [N], encoder_hidden_states [N,L,D])`` and, for SDXL, ``text_embeds`` and
            ``time_ids``; real values where possible (latents and text states of an actual prompt).
        decoder_timesteps: ``[S]`` timesteps to decode the features at (step-major rows); the
            encoder's own timesteps when omitted.

    Returns:
        ``{"encoder": report, "decoder": report}``.
    """
    import numpy as np

    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise BackendUnavailableError(f"the fp16 check runs on onnxruntime ({exc}); `pip install onnxruntime`") from exc
    sample, timestep = inputs[0], inputs[1]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    results: dict[str, dict[str, np.ndarray]] = {}
    for tag, folder in (("fp32", Path(fp32_dir)), ("fp16", Path(fp16_dir))):
        for f in (ENCODER_FILE, DECODER_FILE):
            check_graph_file(folder / f)
        enc = ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(str(folder / DECODER_FILE), opts, providers=["CPUExecutionProvider"])
        contract = GraphContract.from_encoder_io(
            [i.name for i in enc.get_inputs()], [o.name for o in enc.get_outputs()], folder / ENCODER_FILE
        )
        names = contract.feature_names
        enc_values = dict(zip(contract.encoder.input_names, inputs))
        enc_out = enc.run(names, _ort_feed(enc, enc_values))
        as_f32 = [torch.from_numpy(a.astype(np.float32)) for a in enc_out]
        feats = Features(as_f32[0], tuple(as_f32[1:]))
        steps = decoder_timesteps if decoder_timesteps is not None else timestep[:1]
        s = int(steps.shape[0])
        feats = feats.repeat(s)
        dec_values = {n: t for n, t in zip(names, feats.tensors())}
        # Step-major rows: the per-row conditioning is tiled like the features.
        for name in (TEXT, *contract.added_names):
            value = enc_values[name].float()
            dec_values[name] = value.repeat(s, *[1] * (value.ndim - 1))
        dec_values[TIMESTEP] = steps.float().repeat_interleave(int(sample.shape[0]))
        noise = dec.run(None, _ort_feed(dec, dec_values))[0]
        results[tag] = {
            **{n: a.astype(np.float32) for n, a in zip(names, enc_out)},
            DECODER_OUTPUT: noise.astype(np.float32),
        }

    reports = {}
    for graph, keys in (
        ("encoder", [k for k in results["fp32"] if k != DECODER_OUTPUT]),
        ("decoder", [DECODER_OUTPUT]),
    ):
        errs, refs, finite = {}, {}, True
        for k in keys:
            a, b = results["fp16"][k], results["fp32"][k]
            finite = finite and bool(np.isfinite(a).all())
            errs[k] = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else float("inf")
            refs[k] = float(np.abs(b).max())
        reports[graph] = PrecisionReport(errs, refs, finite)
        if not finite:
            logger.warning(
                "fp16 %s graph produced NaN/Inf on real inputs: fp16 overflow; keep this model in fp32", graph
            )
        else:
            logger.info(
                "fp16 %s graph: max |error| vs fp32 %.3g (relative %.3g)",
                graph,
                max(errs.values()),
                reports[graph].worst_relative,
            )
    return reports


def remove_graphs(out_dir: str | os.PathLike[str]) -> None:
    """Deletes the graph files (encoder, decoder and ControlNet graphs, and their external data) in a
    folder, and dead processes' temporaries.

    Temporaries of live processes are left alone (see [`fd_trt.utils.files.remove_stale_temporaries()`][fd_trt.utils.files.remove_stale_temporaries]): a
    concurrent export's work is not this call's to delete.

    Args:
        out_dir: an export folder.
    """
    out = Path(out_dir)
    names = [ENCODER_FILE, DECODER_FILE, *(p.name for p in out.glob(f"{CONTROLNET_PREFIX}*.onnx"))]
    # the decoder schedules' graphs (fd_trt.graphs.shallow), exported again on first use
    names += [
        p.name for pat in ("decoder-capture-d*.onnx", "shallow-d*.onnx", "input-conv.onnx") for p in out.glob(pat)
    ]
    for name in names:
        for p in (out / name, out / (name + ".data")):
            p.unlink(missing_ok=True)
    remove_stale_temporaries(out)


__all__ = [
    "CONTROLNET_PREFIX",
    "ControlNetForExport",
    "controlnet_file_name",
    "export_controlnet",
    "CorruptGraphError",
    "DecoderForExport",
    "ROW_SHARING_MIN_CHANNELS",
    "decoder_shares_rows",
    "ExportResult",
    "GraphInfo",
    "PrecisionReport",
    "check_graph_file",
    "compare_precisions",
    "decoder_input_names",
    "encoder_output_names",
    "check_unet_frames",
    "example_inputs",
    "export_unet",
    "optimize_onnx",
    "remove_graphs",
    "save_onnx",
]
