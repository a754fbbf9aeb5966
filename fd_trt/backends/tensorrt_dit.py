"""TensorRT plans of the transformer graphs ([`fd_trt.graphs.export_dit`][fd_trt.graphs.export_dit]) and their runner.

Plans: one optimization profile per graph, over the row axes of [`fd_trt.graphs.contract_dit`][fd_trt.graphs.contract_dit].
The encoder's inputs take ``rows`` (``RowProfile``: min / opt / max rows of one key step). The
decoder's tokens and conditioning take the key step's rows as well, and its ``timestep`` (and
``noise_pred``) ``S x rows`` step rows, up to ``steps`` steps per call, tuned at ``opt_steps``.
They are written next to the ONNX graphs as ``encoder.plan`` and ``decoder.plan``, and recorded in
``plans.json`` ([`PlanRecord`][fd_trt.graphs.manifest.PlanRecord]: the plan's size and sha256, the TensorRT version, the GPU,
the profile rows and the sha256 of the ONNX graph it was built from, the digest the export recorded
in the manifest).

Runner: [`TrtTransformerRunner`][fd_trt.backends.tensorrt_dit.TrtTransformerRunner] is the UNet's [`TrtRunner`][fd_trt.backends.tensorrt.TrtRunner] (plan loading, buffers
at the profile's maximum rows, row chunks, the shared scratch memory, the side stream, optional
CUDA graphs) on the transformer graphs' tensors. On activation it uses a recorded plan only when
its graph sha256 is the one the manifest records for the graph (the graph files are checked by
size, not read; manifests without records have their graphs hashed), its TensorRT version and GPU
are this machine's and its profile is the one asked; any other plan (an older export, another
split ``N``, another profile) is rebuilt, or refused with ``build=False``. A graph file of another
size than recorded (replaced behind the manifest) is refused either way: the export makes it again.

TensorRT is imported only when a plan is built or loaded ([`require_tensorrt()`][fd_trt.backends.tensorrt_build.require_tensorrt]).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fd_trt.backends.tensorrt import TrtRunner
from fd_trt.backends.tensorrt_build import RowProfile, gpu_identity, input_profile_shapes, require_tensorrt
from fd_trt.backends.transformer import check_decode
from fd_trt.core.features import Added, Features
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.contract import NOISE_PRED, SAMPLE, TIMESTEP, GraphSpec
from fd_trt.graphs.contract_dit import transformer_graphs
from fd_trt.graphs.export_dit import TransformerManifest, export_command, graph_digests, read_manifest
from fd_trt.graphs.manifest import PlanRecord, engine_dir_lock
from fd_trt.graphs.split_dit import SplitTransformer
from fd_trt.utils.files import file_sha256, write_atomic

logger = logging.getLogger(__name__)

#: The file that records a transformer engine directory's plans.
PLANS_FILE = "plans.json"
ROLES = ("encoder", "decoder")
#: The runner's default key-step rows: one image with CFG per call.
DEFAULT_ROWS = RowProfile(1, 2, 2)


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
    device: torch.device | str = "cuda",
) -> dict[str, Path]:
    """Builds ``encoder.plan`` and ``decoder.plan`` from the exported graphs in ``folder``, and
    records them in ``plans.json`` (replacing the records of earlier plans).

    Args:
        folder: the engine directory ([`export_transformer()`][fd_trt.graphs.export_dit.export_transformer]).
        manifest: its manifest.
        split: the split the graphs came from.
        patch: the transformer's patch size.
        width: its token width (heads x head dim).
        rows: the key step's rows.
        steps: the most steps one decoder call covers.
        opt_steps: the steps TensorRT tunes the decoder for.
        device: the GPU the plans are for (recorded with them).

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
    gpu, cc = gpu_identity(torch.device(device))
    out = {}
    records = read_plan_records(folder)
    # The graphs' digests as the export recorded them (files checked by size); hashed for old manifests.
    graph_shas = graph_digests(folder, manifest)
    for role, onnx_name in (("encoder", manifest.encoder), ("decoder", manifest.decoder)):
        started = time.time()
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
        with engine_dir_lock(folder, f"writing of the TensorRT {role} plan"):
            write_atomic(path, plan)
            records[role] = PlanRecord(
                role,
                path.name,
                file_sha256(path),
                path.stat().st_size,
                str(trt.__version__),
                gpu,
                list(cc),
                plan_rows(rows, steps, opt_steps)[role],
                graph_shas[role],
                built_at=time.time(),
                build_seconds=time.time() - started,
            )
            write_atomic(folder / PLANS_FILE, json.dumps({k: asdict(v) for k, v in records.items()}, indent=1))
        out[role] = path
    return out


def plan_rows(rows: RowProfile, steps: int, opt_steps: int = 1) -> dict[str, list[int]]:
    """The ``[min, opt, max]`` rows each plan's profile has, by role: the key step's rows for the
    encoder, ``S x rows`` step rows for the decoder (as [`PlanRecord.rows`][fd_trt.graphs.manifest.PlanRecord] records them)."""
    return {"encoder": rows.as_list(), "decoder": [rows.min, rows.opt * int(opt_steps), rows.max * int(steps)]}


def plan_problem(
    record: PlanRecord | None, role: str, graph_sha: str, version: str, cc: Any, rows: Sequence[int]
) -> str | None:
    """Why a recorded plan of ``role`` cannot run here, ``None`` when it can.

    Args:
        record: the plan's record, ``None`` when there is none.
        role: ``encoder`` or ``decoder``.
        graph_sha: the sha256 of the graph the plan must come from (the manifest's).
        version: the running TensorRT version.
        cc: the GPU's compute capability.
        rows: the profile rows asked ([`plan_rows()`][fd_trt.backends.tensorrt_dit.plan_rows]).
    """
    if record is None:
        return "no plan is recorded"
    if record.graph_sha256 != graph_sha:
        return "it was built from another graph (an older export, or another split N)"
    if record.tensorrt_version != version:
        return f"it was built with TensorRT {record.tensorrt_version}, this machine runs {version}"
    if list(record.compute_capability) != list(cc):
        return f"it was built for a GPU of compute capability {record.compute_capability} ({record.gpu_name})"
    if list(record.rows) != list(rows):
        return f"its profile rows {record.rows} are not the asked {list(rows)}"
    return None


def stale_plans(
    folder: str | os.PathLike[str],
    manifest: TransformerManifest,
    rows: RowProfile,
    steps: int,
    opt_steps: int = 1,
    device: torch.device | str = "cuda",
    full_hash: bool = False,
) -> dict[str, str]:
    """The plans of ``folder`` that cannot run here, by role, with the reason; ``{}`` when both can.

    A plan runs when it was built from the graph the manifest records (files checked by size, or
    by digest with ``full_hash``; hashed for manifests without records), with this TensorRT
    version, for this GPU generation and with the asked profile.

    Raises:
        BackendUnavailableError: without TensorRT.
        CorruptGraphError: for a graph file that is not the one the manifest recorded.
    """
    trt = require_tensorrt()
    version = str(trt.__version__)
    _, cc = gpu_identity(torch.device(device))
    shas = graph_digests(Path(folder), manifest, full_hash=full_hash)
    records = read_plan_records(folder)
    wanted = plan_rows(rows, steps, opt_steps)
    problems = {role: plan_problem(records.get(role), role, shas[role], version, cc, wanted[role]) for role in ROLES}
    return {role: why for role, why in problems.items() if why is not None}


def ensure_transformer_plans(
    folder: str | os.PathLike[str],
    split: SplitTransformer,
    patch: int,
    width: int,
    rows: RowProfile = DEFAULT_ROWS,
    steps: int = 4,
    opt_steps: int = 1,
    device: torch.device | str = "cuda",
    force: bool = False,
) -> tuple[dict[str, PlanRecord], dict[str, str]]:
    """Builds the plans of ``folder`` that cannot run here (ahead of time: ``fd-trt build``), under
    the directory's lock; plans that can are kept.

    Args: as [`build_transformer_plans()`][fd_trt.backends.tensorrt_dit.build_transformer_plans]'s (the
        defaults are the pipeline's), and ``force`` to rebuild both.

    Returns:
        The plan records by role, and why each rebuilt plan was rebuilt (``{}``: both up to date).

    Raises:
        BackendUnavailableError: without TensorRT.
        EngineMismatchError: for a folder without exported graphs, graphs of another split than
            ``split``, or a graph file that is not the recorded one.
    """
    folder = Path(folder)
    with engine_dir_lock(folder, "build of the TensorRT plans"):
        manifest = read_manifest(folder)
        if manifest is None:
            raise EngineMismatchError(f"{folder} holds no exported transformer graphs: {export_command(folder)}")
        if manifest.split != split.split:
            raise EngineMismatchError(
                f"{folder} holds graphs of split N={manifest.split}, not N={split.split}: export into another folder"
            )
        if force:
            stale = {role: "rebuild asked (force)" for role in ROLES}
            graph_digests(folder, manifest)  # a graph changed behind the manifest is refused, not built
        else:
            stale = stale_plans(folder, manifest, rows, steps, opt_steps, device)
        if stale:
            build_transformer_plans(folder, manifest, split, patch, width, rows, steps, opt_steps, device=device)
        return read_plan_records(folder), stale


def read_plan_records(folder: str | os.PathLike[str]) -> dict[str, PlanRecord]:
    """The plan records of a transformer engine directory, by role (``{}`` without ``plans.json``).

    Raises:
        EngineMismatchError: for a ``plans.json`` that does not parse.
    """
    path = Path(folder) / PLANS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {role: PlanRecord(**rec) for role, rec in data.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise EngineMismatchError(f"{path} is not a plan record file ({e}): delete it and the .plan files") from e


class TrtTransformerRunner(TrtRunner):
    """Runs the TensorRT plans of a split transformer's graphs (built here on first use when
    missing or stale), with the machinery of [`TrtRunner`][fd_trt.backends.tensorrt.TrtRunner].

    Speaks the [`Runner`][fd_trt.core.runner.Runner] protocol as [`fd_trt.backends.transformer`][fd_trt.backends.transformer]'s runners do:
    ``encode`` returns the tokens (SD3: and the context), ``decode`` the noise of the S steps,
    step-major, float32.

    Args:
        split: the split the graphs came from (for the feature and conditioning names).
        engines: the engine directory ([`export_transformer()`][fd_trt.graphs.export_dit.export_transformer]).
        patch: the transformer's patch size (for building plans).
        width: its token width, heads x head dim (for building plans).
        rows: the key step's rows of the plans' profile; calls with more rows run in chunks.
        steps: the most steps one decoder execution covers; longer segments run in several.
        opt_steps: the steps TensorRT tunes the decoder for.
        device: the CUDA device.
        build: build missing or stale plans on activation; ``False`` refuses them instead.
        cuda_graphs, share_memory, warmup, full_hash: as [`TrtRunner`][fd_trt.backends.tensorrt.TrtRunner]'s.

    Raises:
        BackendUnavailableError: at construction, without TensorRT or a CUDA GPU.
        InputError: for a profile out of order.
    """

    def __init__(
        self,
        split: SplitTransformer,
        engines: str | os.PathLike[str],
        *,
        patch: int,
        width: int,
        rows: RowProfile = DEFAULT_ROWS,
        steps: int = 4,
        opt_steps: int = 1,
        device: torch.device | str = "cuda",
        build: bool = True,
        cuda_graphs: bool = False,
        share_memory: bool = True,
        warmup: bool = True,
        full_hash: bool = False,
    ) -> None:
        if not isinstance(rows, RowProfile):
            raise InputError(f"rows must be a RowProfile(min, opt, max), got {rows!r}")
        if not 1 <= int(opt_steps) <= int(steps):
            raise InputError(f"profile steps must satisfy 1 <= opt_steps <= steps, got {opt_steps=}, {steps=}")
        if not Path(engines).is_dir():
            raise InputError(
                f"engine directory {engines} does not exist: export the transformer graphs into it first "
                "(fd_trt.graphs.export_dit.export_transformer; the pipeline does on first use)"
            )
        super().__init__(
            engines,
            device=device,
            dtype="fp32",
            build=build,
            cuda_graphs=cuda_graphs,
            share_memory=share_memory,
            warmup=warmup,
            full_hash=full_hash,
            refittable=False,
        )
        self.split = split
        self.patch, self.width = int(patch), int(width)
        self.rows, self.steps, self.opt_steps = rows, int(steps), int(opt_steps)

    def _rebuild_command(self) -> str:
        return (
            f"fd_trt.backends.tensorrt_dit.build_transformer_plans({str(self.engine_dir)!r}, ...), "
            "or pass build=True to the runner"
        )

    def _select_plans(self, trt: Any, manifest: TransformerManifest) -> dict[str, PlanRecord]:
        # The manifest's graph digests: a graph of another size than recorded is refused here (the
        # export makes it again); a manifest without records has its graphs hashed, as before.
        stale = stale_plans(
            self.engine_dir, manifest, self.rows, self.steps, self.opt_steps, self.device, full_hash=self.full_hash
        )
        if stale:
            version = str(trt.__version__)
            where = "; ".join(f"{role}: {why}" for role, why in stale.items())
            if not self.build:
                raise EngineMismatchError(
                    f"{self.engine_dir} has no usable TensorRT plans for TensorRT {version} on this GPU ({where}): "
                    f"build them with {self._rebuild_command()}"
                )
            logger.info("%s: building TensorRT plans (%s)", self.engine_dir, where)
            build_transformer_plans(
                self.engine_dir,
                manifest,
                self.split,
                self.patch,
                self.width,
                self.rows,
                self.steps,
                self.opt_steps,
                device=self.device,
            )
        records = read_plan_records(self.engine_dir)
        return {role: records[role] for role in ROLES}

    def _activate_locked(self, trt: Any) -> None:
        manifest = read_manifest(self.engine_dir)
        if manifest is None:
            raise EngineMismatchError(
                f"{self.engine_dir} holds no exported transformer graphs: export them first "
                "(fd_trt.graphs.export_dit.export_transformer; the pipeline does on first use)"
            )
        if manifest.split != self.split.split or tuple(manifest.cond_names) != tuple(self.split.cond_names):
            raise EngineMismatchError(
                f"{self.engine_dir} holds graphs of split N={manifest.split} ({manifest.cond_names}), but the runner "
                f"was given N={self.split.split} ({list(self.split.cond_names)}): export into another folder"
            )
        self._open_runtime(trt)
        records = self._select_plans(trt, manifest)
        features = tuple(self.split.features)
        enc = self._load("encoder", records["encoder"])
        # The decoder's inputs with the key step's rows (once for all the steps of a call); the
        # exporter drops conditioning a graph does not use, and so does the plan.
        dec = self._load("decoder", records["decoder"], key_inputs=(*features, *self.split.cond_names))
        fix = f"the plans come from another export; rebuild them with {self._rebuild_command()}"
        for e, required, optional, outputs in (
            (enc, (SAMPLE, TIMESTEP), self.split.cond_names, features),
            (dec, (*features, TIMESTEP), self.split.cond_names, (NOISE_PRED,)),
        ):
            missing = [n for n in required if n not in e.inputs]
            extra = [n for n in e.inputs if n not in (*required, *optional)]
            if missing or extra or sorted(e.outputs) != sorted(outputs):
                raise EngineMismatchError(
                    f"{e.path} has inputs {e.inputs} and outputs {e.outputs}, not the transformer {e.role} graph's "
                    f"(missing {missing}, unexpected {extra}): {fix}"
                )
        for n in features:
            if enc.tails[n] != dec.tails[n]:
                raise EngineMismatchError(f"{enc.path} and {dec.path} disagree on {n!r}: {fix}")
        self._install(trt, enc, dec, records)

    def _cond(self, e: Any, text: torch.Tensor, added: Added) -> dict[str, torch.Tensor]:
        """The conditioning inputs the plan has, by graph name (the buffers' dtypes cast them)."""
        cond = zip(self.split.cond_names, self.split.conditioning(text, added))
        return {name: value.to(self.device) for name, value in cond if name in e.inputs}

    @torch.inference_mode()
    def _encode(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> Features:
        enc = self._enc
        assert enc is not None
        rows = self._check_rows("encoder", sample=sample, text=text)
        if timestep.numel() != rows:
            raise InputError(f"timestep has {timestep.numel()} values but the sample has {rows} rows: pass one per row")
        inputs = {SAMPLE: sample.to(self.device), TIMESTEP: timestep.reshape(rows).to(self.device)}
        out = self._run_rows(enc, {**inputs, **self._cond(enc, text, added)}, list(self.split.features))
        first, *rest = (out[n] for n in self.split.features)
        return Features(first, tuple(rest))

    @torch.inference_mode()
    def _decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        dec = self._dec
        assert dec is not None
        check_decode(features, timesteps, text)
        if len(features.skips) + 1 != len(self.split.features):
            raise InputError(
                f"features have {len(features.skips)} skips but the plans carry {len(self.split.features) - 1}: pass "
                "the features this runner's encode() returned"
            )
        key = {n: v.to(self.device) for n, v in zip(self.split.features, features.tensors())}
        key.update(self._cond(dec, text, added))
        (noise,) = self._run_steps(dec, key, timesteps.float().to(self.device), {}, (NOISE_PRED,))
        return noise

    def _warm_up(self) -> None:
        enc = self._enc
        assert enc is not None
        n = enc.min_rows
        for e in (enc, self._dec):
            assert e is not None
            for name in e.inputs:
                e.buffers[name].zero_()  # class labels must index the embedding table
            self._execute(e, n, n)
        self.synchronize()

    def refit(self, unet: Any) -> bool:
        """Transformer plans are not refit: returns ``False``, and new weights rebuild them (the
        pipeline exports into another folder, keyed by the weights' sha256)."""
        return False


__all__ = [
    "DEFAULT_ROWS",
    "PLANS_FILE",
    "TrtTransformerRunner",
    "build_transformer_plans",
    "ensure_transformer_plans",
    "plan_problem",
    "plan_rows",
    "read_plan_records",
    "stale_plans",
    "transformer_profile_shapes",
]
