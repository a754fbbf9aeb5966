"""TensorRT plans of the transformer graphs ([`fd_trt.graphs.export_dit`][fd_trt.graphs.export_dit]): one optimization
profile per graph, over the row axes of [`fd_trt.graphs.contract_dit`][fd_trt.graphs.contract_dit].

The encoder's inputs take ``rows`` (``RowProfile``: min / opt / max rows of one key step). The
decoder's tokens and conditioning take the key step's rows as well, and its ``timestep`` (and
``noise_pred``) ``S x rows`` step rows, up to ``steps`` steps per call, tuned at ``opt_steps``.
TensorRT is imported only when a plan is built ([`require_tensorrt()`][fd_trt.backends.tensorrt_build.require_tensorrt]). The plans are written
next to the ONNX graphs as ``encoder.plan`` and ``decoder.plan``; no runner for them is written
yet (docs/guides/dit.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fd_trt.backends.tensorrt_build import RowProfile, input_profile_shapes, require_tensorrt
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.contract import GraphSpec
from fd_trt.graphs.contract_dit import transformer_graphs
from fd_trt.graphs.export_dit import TransformerManifest
from fd_trt.graphs.split_dit import SplitTransformer


def transformer_profile_shapes(
    spec: GraphSpec, input_shapes: Mapping[str, Sequence[int]], rows: RowProfile, steps: int, opt_steps: int = 1
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min / opt / max shapes of a transformer graph's inputs (those the network has).

    Args:
        spec: the graph's contract.
        input_shapes: the network's inputs (axis 0 ``-1``); the exporter drops unused ones.
        rows: the key step's rows.
        steps: the most steps one decoder call covers.
        opt_steps: the steps TensorRT tunes the decoder for (a segment's usual length).

    Raises:
        InputError: for ``steps`` or ``opt_steps`` below 1 or out of order.
        EngineMismatchError: for an input that is not in the contract.
    """
    if not 1 <= opt_steps <= steps:
        raise InputError(f"profile steps must satisfy 1 <= opt_steps <= steps, got opt_steps={opt_steps}, {steps=}")
    extra = [n for n in input_shapes if n not in spec.input_names]
    if extra:
        raise EngineMismatchError(f"the {spec.role} graph has inputs {extra} outside its contract: re-export it")
    step_rows = RowProfile(rows.min, rows.opt * opt_steps, rows.max * steps)
    own = {t.name: rows for t in spec.inputs if t.rowed and not t.step_rowed}
    return input_profile_shapes(step_rows if spec.role == "decoder" else rows, input_shapes, (), own)


def build_transformer_plans(
    folder: Path,
    manifest: TransformerManifest,
    split: SplitTransformer,
    patch: int,
    width: int,
    rows: RowProfile,
    steps: int,
    opt_steps: int = 1,
) -> dict[str, Path]:
    """Builds ``encoder.plan`` and ``decoder.plan`` from the exported graphs in ``folder``.

    Returns:
        ``{"encoder": path, "decoder": path}``.

    Raises:
        BackendUnavailableError: without TensorRT.
        EngineMismatchError: when a graph does not parse or TensorRT refuses the profile.
    """
    trt = require_tensorrt()
    folder = Path(folder)
    text = tuple(manifest.text_shape) if manifest.text_shape else None
    hw = (manifest.latent_hw[0], manifest.latent_hw[1])
    specs = dict(zip(("encoder", "decoder"), transformer_graphs(split, hw, patch, width, text)))  # type: ignore[arg-type]
    out = {}
    for role, onnx_name in (("encoder", manifest.encoder), ("decoder", manifest.decoder)):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / onnx_name)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineMismatchError(f"TensorRT cannot parse {folder / onnx_name}: {errors}")
        shapes = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shapes[t.name] = [int(t.shape[k]) for k in range(len(t.shape))]
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in transformer_profile_shapes(specs[role], shapes, rows, steps, opt_steps).items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineMismatchError(f"TensorRT could not build the {role} plan of {folder}: see its log")
        path = folder / f"{role}.plan"
        from fd_trt.utils.files import write_atomic

        write_atomic(path, plan)
        out[role] = path
    return out


__all__ = ["build_transformer_plans", "transformer_profile_shapes"]
