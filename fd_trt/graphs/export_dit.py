"""ONNX export of a split diffusion transformer into an engine directory (docs/guides/dit.md).

The directory holds ``encoder.onnx``, ``decoder.onnx`` (the contract of
[`fd_trt.graphs.contract_dit`][fd_trt.graphs.contract_dit], axis 0 dynamic) and ``manifest.json``, which records the
family, the split point ``N``, the shapes and the transformer's weights hash; a directory whose
manifest does not match the asked model, ``N`` or shapes is refused
([`EngineMismatchError`][fd_trt.errors.EngineMismatchError]) rather than run wrongly. The TorchScript exporter
is used, as for the UNet graphs ([`fd_trt.graphs.export`][fd_trt.graphs.export]).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import EngineMismatchError
from fd_trt.graphs.contract import GraphSpec
from fd_trt.graphs.contract_dit import INT64, transformer_graphs
from fd_trt.graphs.split_dit import SplitTransformer
from fd_trt.graphs.weights import unet_weights_sha256
from fd_trt.utils.files import dir_lock, write_atomic

#: The manifest's ``kind`` and format of a transformer engine directory.
MANIFEST_KIND = "fd_trt-transformer"
MANIFEST_FORMAT = 1
OPSET = 17


@dataclass(frozen=True)
class TransformerManifest:
    """What a transformer engine directory was built for."""

    kind: str
    format: int
    family: str
    transformer_class: str
    split: int
    blocks: int
    latent_hw: list[int]
    text_shape: list[int] | None
    weights_sha256: str
    cond_names: list[str]
    encoder: str = "encoder.onnx"
    decoder: str = "decoder.onnx"

    def check(self, other: TransformerManifest, folder: Path) -> None:
        """Refuses a directory built for another model, ``N`` or shape than ``other`` asks."""
        mine, theirs = asdict(self), asdict(other)
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        if diff:
            raise EngineMismatchError(
                f"engine directory {folder} was built for other settings ({diff}, built vs asked): rebuild it "
                "(delete the folder, or export into a new one)"
            )


def _example(spec: GraphSpec, rows: int, step_rows: int) -> tuple[torch.Tensor, ...]:
    out = []
    for t in spec.inputs:
        shape = ((step_rows if t.step_rowed else rows), *t.tail)
        if t.dtype == INT64:
            out.append(torch.arange(rows, dtype=torch.long) % 3)
        elif t.name == "timestep":
            out.append(torch.linspace(900.0, 100.0, shape[0]))
        elif t.name == "encoder_attention_mask":
            out.append(torch.ones(shape))
        elif t.name == "resolution":
            out.append(torch.full(shape, 256.0))
        elif t.name == "aspect_ratio":
            out.append(torch.ones(shape))
        else:
            out.append(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    return tuple(out)


def _declare_output_shapes(path: Path, spec: GraphSpec) -> None:
    """Writes the contract's output shapes (rows dynamic, the rest fixed) into the graph's outputs,
    which the TorchScript exporter leaves unknown; TensorRT then binds each output's tail without
    inferring it. The weights are not read (a large graph's external data stays where it is)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        t = spec.tensor(out.name)
        dims = out.type.tensor_type.shape.dim
        row = dims[0].dim_param if len(dims) and dims[0].HasField("dim_param") else t.row_axis
        del dims[:]
        dims.add().dim_param = row
        for d in t.tail:
            if isinstance(d, int):
                dims.add().dim_value = d
            else:  # a dim fixed per export, named
                dims.add().dim_param = d
    onnx.save_model(model, str(path))


def manifest_for(
    family: str, transformer: Any, split: SplitTransformer, latent_hw: tuple[int, int], text_shape: Any
) -> TransformerManifest:
    """The manifest a directory for these settings must have."""
    return TransformerManifest(
        MANIFEST_KIND,
        MANIFEST_FORMAT,
        family,
        type(transformer).__name__,
        split.split,
        split.blocks,
        list(latent_hw),
        list(text_shape) if text_shape is not None else None,
        unet_weights_sha256(transformer),
        list(split.cond_names),
    )


def read_manifest(folder: Path) -> TransformerManifest | None:
    """The manifest of ``folder``, ``None`` when there is none.

    Raises:
        EngineMismatchError: for a manifest of another kind or format.
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("kind") != MANIFEST_KIND or data.get("format") != MANIFEST_FORMAT:
        raise EngineMismatchError(
            f"{path} is not a format-{MANIFEST_FORMAT} transformer engine directory "
            f"(kind={data.get('kind')!r}, format={data.get('format')!r}): rebuild it"
        )
    return TransformerManifest(**data)


def export_transformer(
    folder: Path,
    family: str,
    transformer: Any,
    split: SplitTransformer,
    latent_hw: tuple[int, int],
    text_shape: tuple[int, int] | None = None,
) -> TransformerManifest:
    """Exports the two graphs of ``split`` into ``folder``, or checks and reuses what is there.

    Args:
        folder: the engine directory (created).
        family: the family's name, recorded in the manifest.
        transformer: the diffusers transformer (for its class, patch size, width and weights hash).
        split: its split at ``N``.
        latent_hw: the latent height and width the graphs take.
        text_shape: PixArt's and SD3's ``(L, Dt)``; ``None`` for DiT.

    Returns:
        The manifest.

    Raises:
        EngineMismatchError: when ``folder`` holds graphs for other settings.
    """
    folder = Path(folder)
    want = manifest_for(family, transformer, split, latent_hw, text_shape)
    with dir_lock(folder, "export transformer graphs"):
        have = read_manifest(folder)
        if have is not None:
            have.check(want, folder)
            return have
        patch = int(transformer.config.patch_size)
        width = int(transformer.config.num_attention_heads) * int(transformer.config.attention_head_dim)
        specs = transformer_graphs(split, latent_hw, patch, width, text_shape)
        modules = (split.encoder, split.step_decoder())
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            for spec, module, name in zip(specs, modules, (want.encoder, want.decoder)):
                args = _example(spec, 2, 6)
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        module,
                        args,
                        str(tmp / name),
                        dynamo=False,
                        opset_version=OPSET,
                        input_names=spec.input_names,
                        output_names=spec.output_names,
                        dynamic_axes=spec.dynamic_axes,
                        do_constant_folding=True,
                    )
                _declare_output_shapes(tmp / name, spec)
                (tmp / name).replace(folder / name)
            write_atomic(folder / "manifest.json", json.dumps(asdict(want), indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return want


__all__ = ["MANIFEST_KIND", "TransformerManifest", "export_transformer", "manifest_for", "read_manifest"]
