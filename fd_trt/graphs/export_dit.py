"""ONNX export of a split diffusion transformer into an engine directory (docs/guides/dit.md).

The directory holds ``encoder.onnx``, ``decoder.onnx`` (the contract of
[`fd_trt.graphs.contract_dit`][fd_trt.graphs.contract_dit], axis 0 dynamic) and ``manifest.json``, which records the
family, the split point ``N``, the shapes and the transformer's weights hash; a directory whose
manifest does not match the asked model, ``N`` or shapes is refused
([`EngineMismatchError`][fd_trt.errors.EngineMismatchError]) rather than run wrongly. The TorchScript exporter
is used, as for the UNet graphs ([`fd_trt.graphs.export`][fd_trt.graphs.export]).

The manifest also records each graph file's size and sha256 as it is written
([`GraphRecord`][fd_trt.graphs.manifest.GraphRecord], the UNet directories' record), so that the TensorRT plans
([`fd_trt.backends.tensorrt_dit`][fd_trt.backends.tensorrt_dit]) are matched to their graphs without reading
multi-gigabyte files again. A graph file whose size is no longer the recorded one (truncated, or
replaced behind the manifest) is exported again here, and refused by the TensorRT runner.
Manifests written before the records existed (no ``graphs``) still load: the TensorRT runner
hashes their graphs, and the next export call records them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fd_trt.errors import EngineMismatchError
from fd_trt.graphs.contract import GraphSpec
from fd_trt.graphs.contract_dit import INT64, transformer_graphs
from fd_trt.graphs.export import EXTERNAL_DATA_THRESHOLD, CorruptGraphError, save_onnx
from fd_trt.graphs.manifest import GraphRecord, check_graph_record, engine_dir_lock, graph_record
from fd_trt.graphs.split_dit import SplitTransformer
from fd_trt.graphs.weights import unet_weights_sha256
from fd_trt.utils.files import write_atomic

#: The manifest's ``kind`` and format of a transformer engine directory.
MANIFEST_KIND = "fd_trt-transformer"
MANIFEST_FORMAT = 1
OPSET = 17

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransformerManifest:
    """What a transformer engine directory was built for.

    ``graphs`` records each graph file by role (``encoder``, ``decoder``): its size and sha256 at
    export time; ``None`` in manifests written before the records existed. It says what was
    written, not what was asked, so [`check()`][fd_trt.graphs.export_dit.TransformerManifest.check] leaves it out.
    """

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
    graphs: dict[str, GraphRecord] | None = field(default=None, compare=False)

    def check(self, other: TransformerManifest, folder: Path) -> None:
        """Refuses a directory built for another model, ``N`` or shape than ``other`` asks."""
        mine, theirs = asdict(self), asdict(other)
        diff = {k: (mine[k], theirs[k]) for k in mine if k != "graphs" and mine[k] != theirs[k]}
        if diff:
            raise EngineMismatchError(
                f"engine directory {folder} was built for other settings ({diff}, built vs asked): rebuild it "
                "(delete the folder, or export into a new one)"
            )

    def graph_files(self) -> dict[str, str]:
        """The graph file names by role."""
        return {"encoder": self.encoder, "decoder": self.decoder}


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
    try:
        graphs = data.get("graphs")
        if graphs is not None:
            data["graphs"] = {role: GraphRecord(**rec) for role, rec in graphs.items()}
        return TransformerManifest(**data)
    except (TypeError, AttributeError) as e:
        raise EngineMismatchError(
            f"{path} has missing or unknown fields ({e}): delete the folder and export again"
        ) from None


def export_command(folder: Path) -> str:
    """How to export a transformer engine directory again, for messages."""
    return (
        f"export the graphs again with fd-trt build --model MODEL --out {folder} --force, or delete "
        f"{Path(folder) / 'manifest.json'} and run the pipeline again (it exports them on first use)"
    )


def graph_problem(folder: Path, manifest: TransformerManifest) -> str | None:
    """Why the graph files in ``folder`` are not the ones the manifest recorded (a file missing, or
    of another size than written), ``None`` when they are. A manifest without records is only
    checked for missing files."""
    if manifest.graphs is None:
        missing = [n for n in manifest.graph_files().values() if not (Path(folder) / n).is_file()]
        return f"the graph files {missing} in {folder} are missing" if missing else None
    for role, rec in manifest.graphs.items():
        try:
            check_graph_record(folder, role, rec, False, "")
        except CorruptGraphError as e:
            return str(e).rstrip("; ")
    return None


def graph_digests(folder: Path, manifest: TransformerManifest, full_hash: bool = False) -> dict[str, str]:
    """The sha256 of each graph by role, as a TensorRT plan records the graph it was built from.

    Recorded graphs (manifests written since the records exist) take the manifest's digests, after
    their files are checked by size (and by digest with ``full_hash``): nothing is read. A manifest
    without records has its graph files hashed.

    Raises:
        CorruptGraphError: for a graph file that is missing or not the recorded one, naming how to
            export it again.
    """
    folder = Path(folder)
    names = manifest.graph_files()
    if manifest.graphs is None:
        from fd_trt.utils.files import file_sha256

        return {role: file_sha256(folder / name) for role, name in names.items()}
    fix = f"it changed behind the manifest, so no plan built from it runs; {export_command(folder)}"
    out = {}
    for role in names:
        rec = manifest.graphs.get(role)
        if rec is None or rec.file != names[role]:
            raise CorruptGraphError(f"{folder}/manifest.json records no {role} graph {names[role]}; {fix}")
        check_graph_record(folder, role, rec, full_hash, fix)
        out[role] = rec.sha256
    return out


def export_transformer(
    folder: Path,
    family: str,
    transformer: Any,
    split: SplitTransformer,
    latent_hw: tuple[int, int],
    text_shape: tuple[int, int] | None = None,
    force: bool = False,
    external_data_threshold: int | None = None,
) -> TransformerManifest:
    """Exports the two graphs of ``split`` into ``folder``, or checks and reuses what is there.

    Graphs are reused when the manifest is for these settings and each recorded graph file still
    has its recorded size; a file of another size (truncated, or replaced behind the manifest) has
    both graphs exported again.

    Args:
        folder: the engine directory (created).
        family: the family's name, recorded in the manifest.
        transformer: the diffusers transformer (for its class, patch size, width and weights hash).
        split: its split at ``N``.
        latent_hw: the latent height and width the graphs take.
        text_shape: PixArt's and SD3's ``(L, Dt)``; ``None`` for DiT.
        force: export again whatever the folder holds (``fd-trt build --force``).
        external_data_threshold: a graph whose weights exceed this many bytes keeps them in one
            ``<graph>.onnx.data`` file next to it (recorded with the graph; protobuf cannot hold
            2 GB in one message); ``None``: `fd_trt.graphs.export.EXTERNAL_DATA_THRESHOLD`.

    Returns:
        The manifest.

    Raises:
        EngineMismatchError: when ``folder`` holds graphs for other settings.
    """
    folder = Path(folder)
    want = manifest_for(family, transformer, split, latent_hw, text_shape)
    # The engine directory's build lock, which the TensorRT plans' builds and loads hold too: a
    # graph is never replaced while plans are being built from it or matched to it.
    with engine_dir_lock(folder, "export of the transformer graphs"):
        have = None if force else read_manifest(folder)
        if have is not None:
            have.check(want, folder)
            problem = graph_problem(folder, have)
            if problem is None and have.graphs is None:
                # A manifest written before the graph records: its graphs are hashed once, here, and
                # recorded, so that later activations read the digests instead of the files.
                have = replace(have, graphs={role: graph_record(folder, n) for role, n in have.graph_files().items()})
                write_atomic(folder / "manifest.json", json.dumps(asdict(have), indent=1))
            if problem is None:
                return have
            # A graph changed behind the manifest: export both again, never keep a stale one.
            logger.warning("%s: exporting the transformer graphs again (%s)", folder, problem)
        # The manifest goes first and comes back last: an export cut short is redone, never loaded.
        (folder / "manifest.json").unlink(missing_ok=True)
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
                # Above 2 GB the exporter leaves one file per weight next to the graph, in tmp: the
                # graph is saved into the folder with its weights in one ``<graph>.data`` file.
                import onnx

                threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
                save_onnx(onnx.load(str(tmp / name), load_external_data=True), folder / name, threshold)
            # Each graph's size and sha256, hashed once here, while the file is fresh in the page cache.
            want = replace(want, graphs={role: graph_record(folder, n) for role, n in want.graph_files().items()})
            write_atomic(folder / "manifest.json", json.dumps(asdict(want), indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return want


__all__ = [
    "MANIFEST_KIND",
    "TransformerManifest",
    "export_command",
    "export_transformer",
    "graph_digests",
    "graph_problem",
    "manifest_for",
    "read_manifest",
]
