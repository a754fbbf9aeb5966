"""Graphs of decoder schedules (docs/guides/deepcache-front.md): per shallow depth ``d``, two graphs.

- ``decoder-capture-d<d>.onnx`` (role ``decoder_capture_d<d>``): the decoder graph's inputs and
  ``noise_pred``, plus ``hidden``: the hidden state entering the decoder's last ``d`` up layers,
  ``S*N`` rows, step-major. Steps that run the whole decoder use it when a later step reuses
  their deep up path.
- ``shallow-d<d>.onnx`` (role ``shallow_d<d>``): ``hidden`` (``S*N`` rows), ``skip_00 ..
  skip_<d-1>``, ``timestep`` (``S*N``), the text and added conditioning (the key step's N rows,
  repeated inside the graph as the decoder graph does) -> ``noise_pred``.

Both are exported on first use (or ahead, by ``fd-trt build --schedule`` of a decoder schedule)
into a built engine directory and recorded in its manifest's ``graphs`` under their roles; directories without them stay valid (nothing else reads those
roles). A rebuild of the UNet's graphs drops the records, and the next run exports them again.
The onnxruntime runner runs the graphs; the TensorRT runner builds plans of them, recorded in
the manifest's ``plans`` under the same roles ([`fd_trt.backends.tensorrt`][fd_trt.backends.tensorrt]).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fd_trt.core.features import Features
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.contract import (
    INPUT_CONV,
    GraphContract,
    GraphSpec,
    capture_role,
    shallow_role,
    shallow_role_depth,
    shallow_roles,
)
from fd_trt.graphs.manifest import engine_dir_lock, graph_record, load_manifest, save_manifest
from fd_trt.graphs.split import SplitUNet, _fixed_tail, split_unet, up_layers

logger = logging.getLogger(__name__)


INPUT_CONV_FILE = "input-conv.onnx"
INPUT_CONV_ROLE = INPUT_CONV


class InputConvForExport(nn.Module):
    """``sample [N,C,h,w] -> skip_00``: ``conv_in`` alone (shallow steps that read their own latents)."""

    def __init__(self, split: SplitUNet) -> None:
        super().__init__()
        self.encoder = split.encoder
        self.split = split

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.split.run_input_conv(sample)


def capture_file(depth: int) -> str:
    return f"decoder-capture-d{int(depth)}.onnx"


def shallow_file(depth: int) -> str:
    return f"shallow-d{int(depth)}.onnx"


def hidden_channels(unet_config: Any, depth: int) -> int:
    """Channels of the hidden state entering the last ``depth`` up layers: the output of the up
    layer before them (the mid block's for the whole up path)."""
    get = unet_config.get if isinstance(unet_config, dict) else (lambda k: getattr(unet_config, k))
    chans = [int(c) for c in get("block_out_channels")][::-1]  # up block i outputs chans[i]
    lpb = get("layers_per_block")
    per_block = [int(v) + 1 for v in lpb][::-1] if isinstance(lpb, (list, tuple)) else [int(lpb) + 1] * len(chans)
    layers = [(i, j) for i, n in enumerate(per_block) for j in range(n)]
    if not 1 <= depth <= len(layers):
        raise InputError(f"shallow depth {depth} is out of range: this UNet has {len(layers)} up layers")
    i, j = layers[len(layers) - depth]
    return chans[i] if j > 0 else chans[max(i - 1, 0)]


def contract_with_hidden(contract: GraphContract, unet_config: Any, depth: int) -> GraphContract:
    return dataclasses.replace(contract, hidden_channels={depth: hidden_channels(unet_config, depth)})


def _tile(x: torch.Tensor, repeats: Any) -> torch.Tensor:
    return _fixed_tail(x.repeat(repeats, *([1] * (x.ndim - 1))))


class CaptureForExport(nn.Module):
    """``(mid, *skips, timestep [S*N], text [N], *added [N]) -> (noise_pred, hidden)``."""

    def __init__(self, split: SplitUNet, depth: int) -> None:
        super().__init__()
        self.decoder = split.decoder
        self.split, self.depth, self.num_skips = split, depth, split.num_skips

    def forward(self, mid: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_skips
        skips, timestep, text, added = rest[:n], rest[n], rest[n + 1], rest[n + 2 :]
        r = timestep.shape[0] // mid.shape[0]
        feats = Features(_tile(mid, r), tuple(_tile(s, r) for s in skips))
        extra = dict(zip(self.split.added_names, (_tile(a, r) for a in added))) or None
        noise, hidden = self.split.run_decoder_capture(feats, timestep, _tile(text, r), extra, (self.depth,))
        return noise, hidden[self.depth]


class ShallowForExport(nn.Module):
    """``(hidden [S*N], skip_00 .. skip_<d-1> [N], timestep [S*N], text [N], *added [N]) -> noise_pred``."""

    def __init__(self, split: SplitUNet, depth: int) -> None:
        super().__init__()
        self.decoder = split.decoder
        self.split, self.depth = split, depth
        layers = up_layers(split.decoder.up_blocks)[-depth:]
        #: Whether the shallow layers have a (cross-)attention that reads the text.
        self.reads_text = any(getattr(split.decoder.up_blocks[i], "attentions", None) is not None for i, _ in layers)

    def forward(self, hidden: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        d = self.depth
        skips, timestep, text, added = rest[:d], rest[d], rest[d + 1], rest[d + 2 :]
        r = timestep.shape[0] // skips[0].shape[0]
        extra = dict(zip(self.split.added_names, (_tile(a, r) for a in added))) or None
        noise = self.split.run_decoder_shallow(
            hidden, tuple(_tile(s, r) for s in skips), timestep, _tile(text, r), extra
        )
        if not self.reads_text:
            # The exporter drops inputs nothing reads, and the graph contract names the text input
            # of every shallow graph: tie it in with an exact zero (x + 0.0 == x).
            noise = noise + 0.0 * text[:1, :1, :1].sum()
        return noise


def export_shallow_graphs(
    unet: nn.Module,
    out_dir: str | os.PathLike[str],
    depth: int,
    contract: GraphContract,
    *,
    precision: str = "fp32",
    opset: int = 17,
    example_rows: int = 2,
    with_input_conv: bool = False,
) -> tuple[Path, Path]:
    """Exports ``decoder-capture-d<depth>.onnx`` and ``shallow-d<depth>.onnx`` into ``out_dir``.

    Args:
        unet: the UNet the engine directory was built from.
        contract: the directory's [`GraphContract`][fd_trt.graphs.contract.GraphContract] (latent and text shapes fixed).
        precision: the directory's precision.
        with_input_conv: also export ``input-conv.onnx`` (``conv_in`` alone).
    """
    from fd_trt.graphs.export import (
        _TORCH_DTYPES,
        EXTERNAL_DATA_THRESHOLD,
        _export_graph,
        _unet_for_precision,
        example_inputs,
    )

    model = _unet_for_precision(unet, precision)
    split = split_unet(model)
    n_layers = len(up_layers(split.decoder.up_blocks))
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n_layers:
        raise InputError(f"shallow depth {depth!r} is out of range: use an integer in [1, {n_layers}]")
    contract = contract_with_hidden(contract, model.config, depth)
    latent = tuple(int(d) for d in contract.latent_tail[-2:])
    text = tuple(int(d) for d in contract.text_tail)
    added_shapes = contract.added_shapes or None
    enc_args = example_inputs(
        model, latent, text, example_rows, _TORCH_DTYPES[precision], added_shapes=added_shapes, frames=contract.frames
    )
    with torch.no_grad():
        feats = split.encoder(*enc_args)
    steps = torch.linspace(900.0, 100.0, 3).repeat_interleave(example_rows).to(enc_args[1])
    dec_args = (*feats, steps, *enc_args[2:])
    capture = CaptureForExport(split, depth)
    with torch.no_grad():
        _, hidden = capture(*dec_args)
    shallow_args = (hidden, *feats[1 : 1 + depth], steps, *enc_args[2:])
    out = Path(out_dir)

    class _Bar:  # _export_graph reports its stages to a progress bar
        def set_postfix_str(self, *_: Any) -> None: ...

        def update(self, *_: Any) -> None: ...

    paths = []
    for module, args, spec, name in (
        (capture, dec_args, contract.decoder_capture(depth), capture_file(depth)),
        (ShallowForExport(split, depth), shallow_args, contract.shallow_decoder(depth), shallow_file(depth)),
    ):
        _export_graph(module, args, out / name, spec, opset, EXTERNAL_DATA_THRESHOLD, _Bar())
        paths.append(out / name)
    if with_input_conv:
        _export_graph(
            InputConvForExport(split),
            enc_args[:1],
            out / INPUT_CONV_FILE,
            contract.input_conv,
            opset,
            EXTERNAL_DATA_THRESHOLD,
            _Bar(),
        )
    return paths[0], paths[1]


def _role_files(depth: int) -> dict[str, str]:
    files = {capture_role(depth): capture_file(depth), shallow_role(depth): shallow_file(depth)}
    roles = shallow_roles(depth)  # at depth 1, shallow steps may read their own latents (DeepCache): conv_in too
    return {r: files.get(r, INPUT_CONV_FILE) for r in roles}


def export_shallow_into(
    unet: nn.Module, engine_dir: str | os.PathLike[str], manifest: Any, depth: int
) -> dict[str, Any]:
    """Exports the depth's graphs into an engine directory and records them in ``manifest`` (in
    memory: the caller holds the directory's lock and saves the manifest).

    Returns:
        The new graph records, by role.
    """
    folder = Path(engine_dir)
    t0 = time.perf_counter()
    export_shallow_graphs(
        unet,
        folder,
        depth,
        GraphContract.from_manifest(manifest),
        precision=manifest.precision,
        opset=int(manifest.opset),
        with_input_conv=depth == 1,
    )
    roles = _role_files(depth)
    for r, f in roles.items():
        manifest.graphs[r] = graph_record(folder, f)
    logger.info(
        "exported the depth-%d shallow decoder graphs into %s in %.1f s", depth, folder, time.perf_counter() - t0
    )
    return {r: manifest.graphs[r] for r in roles}


def build_shallow_graphs(unet: nn.Module, engine_dir: str | os.PathLike[str], depth: int) -> dict[str, Any]:
    """Exports the depth's two graphs into a built engine directory and records them in its
    manifest, unless they are there (under the directory's lock, like every writer).

    Returns:
        ``{"decoder_capture_d<d>": GraphRecord, "shallow_d<d>": GraphRecord}`` (and ``input_conv``
        at depth 1).

    Raises:
        EngineMismatchError: when the directory has no manifest (build the UNet's graphs first).
    """
    folder = Path(engine_dir)
    roles = _role_files(depth)
    with engine_dir_lock(folder, f"shallow decoder graphs (depth {depth})"):
        manifest = load_manifest(folder)
        if all(r in manifest.graphs and (folder / f).is_file() for r, f in roles.items()):
            recs = {r: manifest.graphs[r] for r in roles}
            if all(graph_record(folder, f).sha256 == recs[r].sha256 for r, f in roles.items()):
                return recs
        recs = export_shallow_into(unet, folder, manifest, depth)
        save_manifest(folder, manifest)
        return recs


def shallow_spec(manifest: Any, role: str) -> GraphSpec:
    """The contract of one decoder-schedule graph (capture, shallow or input-conv role) of a
    directory with this manifest."""
    depth = shallow_role_depth(role)
    if depth is None:
        raise InputError(
            f"{role!r} is not a decoder-schedule graph role: use decoder_capture_d<d>, shallow_d<d> or input_conv"
        )
    contract = contract_with_hidden(GraphContract.from_manifest(manifest), manifest.unet_config, depth)
    if role == INPUT_CONV:
        return contract.input_conv
    return contract.decoder_capture(depth) if role == capture_role(depth) else contract.shallow_decoder(depth)


def load_shallow_specs(manifest: Any, depth: int) -> tuple[GraphSpec, GraphSpec]:
    """The contracts of the depth's two graphs in a directory with this manifest."""
    return shallow_spec(manifest, capture_role(depth)), shallow_spec(manifest, shallow_role(depth))


def shallow_graph_paths(engine_dir: Path, depth: int) -> tuple[Path, Path]:
    """The depth's two graph files of a directory, once [`build_shallow_graphs()`][fd_trt.graphs.shallow.build_shallow_graphs] recorded them.

    Raises:
        EngineMismatchError: when they are not recorded, with the fix.
    """
    manifest = load_manifest(engine_dir)
    roles = (capture_role(depth), shallow_role(depth))
    missing = [r for r in roles if r not in manifest.graphs]
    if missing:
        raise EngineMismatchError(
            f"{engine_dir} has no shallow decoder graphs of depth {depth} ({', '.join(missing)}): the pipeline "
            "exports them on first use; or build them ahead with fd-trt build --schedule SPEC --out "
            f"{engine_dir} (SPEC a decoder schedule of depth {depth}: "
            f"{'deepcache:N or ' if depth == 1 else ''}combined:KEYS|FULL|{depth}), or call "
            "fd_trt.graphs.shallow.build_shallow_graphs(unet, engine_dir, depth)"
        )
    return engine_dir / manifest.graphs[roles[0]].file, engine_dir / manifest.graphs[roles[1]].file


__all__ = [
    "INPUT_CONV_FILE",
    "CaptureForExport",
    "ShallowForExport",
    "build_shallow_graphs",
    "capture_file",
    "export_shallow_graphs",
    "export_shallow_into",
    "hidden_channels",
    "shallow_file",
    "shallow_graph_paths",
    "shallow_spec",
]
