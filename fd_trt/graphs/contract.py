"""The graph contract (docs/design.md section 3), defined once: the inputs and outputs of the encoder
and decoder graphs, in order, with dtypes, shapes, dynamic axes and the decoder's row layout.

Export ([`fd_trt.graphs.export`][fd_trt.graphs.export]), the onnxruntime and TensorRT runners, the TensorRT profiles and
the engine-directory manifest ([`fd_trt.graphs.manifest`][fd_trt.graphs.manifest]) all read it; none of them writes a graph
name out. A new conditioning input is one entry in `ADDED_CONDITIONING` (and the split's
arithmetic for it in [`fd_trt.graphs.split`][fd_trt.graphs.split]).

The contract of one UNet, for ``C`` latent channels, ``h x w`` latents and ``L x D`` text::

    encoder  sample [rows,C,h,w], timestep [rows] f32, encoder_hidden_states [rows,L,D], *added
             -> mid, skip_00 .. skip_NN
    decoder  mid, skip_00 .. skip_NN, timestep [step_rows] f32, encoder_hidden_states [rows,L,D], *added
             -> noise_pred [step_rows,C_out,h,w]

Text-to-video UNets (``UNet3DConditionModel``, ``UNetMotionModel``; ``frames`` F fixed per
export, like ``h`` and ``w``) have the same graphs over video latents, one row per video with all
its frames (the split folds the frames into its blocks' batch inside the graph and unfolds them
before returning, [`fd_trt.graphs.split_video`][fd_trt.graphs.split_video])::

    encoder  sample [rows,C,F,h,w], timestep [rows] f32, encoder_hidden_states [rows,L,D]
             -> mid [rows,C',F,h',w'], skip_00 .. skip_NN [rows,C',F,h',w']
    decoder  mid, skip_00 .. skip_NN, timestep [step_rows] f32, encoder_hidden_states [rows,L,D]
             -> noise_pred [step_rows,C,F,h,w]

``added`` is empty for SD 1.x/2.x (their graph names on disk are unchanged) and is
``text_embeds [rows,P]``, ``time_ids [rows,K] f32`` for SDXL (``addition_embed_type="text_time"``;
P = 1280 and K = 6 for SDXL base, K = 5 for the refiner). DeepFloyd IF (``addition_embed_type="text"``)
takes its prompt projected to the cross-attention width as ``encoder_hidden_states`` and the
attention pooling of the raw prompt as ``text_pooled [rows,E]`` (E: the time embedding's width),
both computed once per generation; IF stage II (``class_embed_type="timestep"``) also takes
``class_labels [rows,1] f32``, the upscaled image's noise level. Axis 0 is the only dynamic axis.

The decoder decodes S steps of one key step in one call. Its features, text and added
conditioning are the key step's N encoder rows (axis ``rows``), given once; its ``timestep``
and ``noise_pred`` have ``S*N`` rows (axis ``step_rows``), step-major: row ``j*N + i`` is encoder
row ``i`` at step ``j``. The graph repeats the N rows S times itself and, for UNets wide enough
for it to pay ([`fd_trt.graphs.split.decoder_shares_rows()`][fd_trt.graphs.split.decoder_shares_rows]), computes what only depends on them
once (the skip half of every up-block convolution, the text's key and value projections;
[`fd_trt.graphs.split.SplitUNet.skip_rows_repeated()`][fd_trt.graphs.split.SplitUNet.skip_rows_repeated]). A decoder that took the features already
tiled to S*N rows, as engine format 1 had it, convolved the same skips S times: on sd15-arch at
256x256 the shared graph's ONNX Runtime call of 5 steps is 1.12x faster.

The optional ControlNet graph (one per ControlNet, [`ControlNetContract`][fd_trt.graphs.contract.ControlNetContract])::

    controlnet  sample [rows,C,h,w], timestep [rows] f32, encoder_hidden_states [rows,L,D],
                controlnet_cond [rows,3,h*f,w*f], conditioning_scale [1] f32
                -> down_00 .. down_NN, mid

``f`` is the ControlNet's conditioning-embedding factor (``2 ** (len(conditioning_embedding_out_channels)
- 1)``, 8 for SD ControlNets, the VAE factor). ``down_ii`` has the shape of the encoder's
``skip_ii`` and ``mid`` the shape of its ``mid``, so the residuals add to the features unchanged.
``conditioning_scale`` is the one input without the row axis.

Dtypes: ``timestep``, ``time_ids`` and ``class_labels`` are float32 in every graph (timestep-like values such as
999 or 1024 lose precision in fp16); every other tensor has the graph's precision.

This module imports neither torch modules of diffusers nor onnx: a config (a diffusers
``FrozenDict``, any mapping or attribute object) is enough.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fd_trt.core.features import MID, feature_names, skip_name  # noqa: F401 - graph names
from fd_trt.errors import EngineMismatchError, InputError

#: The dynamic axis 0 of every graph tensor but the decoder's timestep and output.
ROW_AXIS = "rows"
#: The dynamic axis 0 of the decoder's ``timestep`` and ``noise_pred``: S steps of N rows.
STEP_ROW_AXIS = "step_rows"
#: How decoder rows are laid out: row ``j*N + i`` is encoder row ``i`` at step ``j``.
ROW_LAYOUT = "step-major"
#: A tensor at the graph's precision (fp32 or fp16).
FLOAT = "float"
#: A tensor that is float32 in every graph.
FLOAT32 = "float32"

ROLES = ("encoder", "decoder")
#: The role of a ControlNet graph (not in `ROLES`: it is optional, one per ControlNet).
CONTROLNET = "controlnet"
CONTROLNET_COND = "controlnet_cond"
CONDITIONING_SCALE = "conditioning_scale"
SAMPLE = "sample"
TIMESTEP = "timestep"
TEXT = "encoder_hidden_states"
NOISE_PRED = "noise_pred"
#: the shallow-decoder graphs' reused hidden state (fd_trt.graphs.shallow)
HIDDEN = "hidden"
#: The role of the decoder schedules' graph of ``conv_in`` alone (fd_trt.graphs.shallow).
INPUT_CONV = "input_conv"
_SHALLOW_ROLE_RE = re.compile(r"^(decoder_capture|shallow)_d([1-9][0-9]*)$")

#: ``addition_embed_type`` values the split carries -> the per-row inputs each adds to both
#: graphs, in graph order, with their dtype.
ADDED_CONDITIONING: dict[str | None, tuple[tuple[str, str], ...]] = {
    None: (),
    "text_time": (("text_embeds", FLOAT), ("time_ids", FLOAT32)),
    # DeepFloyd IF: the attention pooling of the raw prompt embeddings, computed once per
    # generation with the prompt's projection (fd_trt.graphs.split.TextConditioning).
    "text": (("text_pooled", FLOAT),),
}
#: ``class_embed_type`` values the split carries -> the per-row inputs each adds to both graphs,
#: after the `ADDED_CONDITIONING` ones. DeepFloyd IF stage II: the upscaled image's noise level,
#: embedded as a timestep (``class_labels [rows,1] f32``).
CLASS_CONDITIONING: dict[str | None, tuple[tuple[str, str], ...]] = {
    None: (),
    "timestep": (("class_labels", FLOAT32),),
}
#: Inputs that are float32 in every graph, whatever its precision.
FLOAT32_INPUTS = frozenset(
    {TIMESTEP, CONDITIONING_SCALE}
    | {
        n
        for table in (ADDED_CONDITIONING, CLASS_CONDITIONING)
        for options in table.values()
        for n, dt in options
        if dt == FLOAT32
    }
)
#: SDXL base's micro-conditioning: original size, crop top-left, target size.
DEFAULT_TIME_IDS = 6

Dim = int | str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def capture_role(depth: int) -> str:
    """The role of the decoder graph that also returns the hidden state entering its last ``depth`` up layers."""
    return f"decoder_capture_d{int(depth)}"


def shallow_role(depth: int) -> str:
    """The role of the graph of the decoder's last ``depth`` up layers."""
    return f"shallow_d{int(depth)}"


def shallow_roles(depth: int) -> tuple[str, ...]:
    """The roles of the graphs a decoder schedule of shallow depth ``depth`` runs: the capture and
    shallow graphs, and at depth 1 `INPUT_CONV` (shallow steps that read their own latents)."""
    roles = (capture_role(depth), shallow_role(depth))
    return (*roles, INPUT_CONV) if int(depth) == 1 else roles


def shallow_role_depth(role: str) -> int | None:
    """The shallow depth of a decoder-schedule role (1 for `INPUT_CONV`), ``None`` for any other role."""
    if role == INPUT_CONV:
        return 1
    m = _SHALLOW_ROLE_RE.match(role) if isinstance(role, str) else None
    return int(m.group(2)) if m else None


def down_name(index: int) -> str:
    """The graph name of ControlNet residual ``index``: ``down_00``, ``down_01``, ..."""
    return f"down_{index:02d}"


def added_inputs(unet_config: Any) -> tuple[tuple[str, str], ...]:
    """``(name, dtype)`` of a UNet's added-conditioning inputs, in graph order: those of its
    ``addition_embed_type`` (`ADDED_CONDITIONING`), then those of its ``class_embed_type``
    (`CLASS_CONDITIONING`)."""
    return (
        *ADDED_CONDITIONING.get(_get(unet_config, "addition_embed_type"), ()),
        *CLASS_CONDITIONING.get(_get(unet_config, "class_embed_type"), ()),
    )


def known_added_sets() -> list[tuple[tuple[str, str], ...]]:
    """Every set of added inputs a graph of this fd_trt may have (for a graph or manifest without
    a UNet config)."""
    return [(*a, *c) for a in ADDED_CONDITIONING.values() for c in CLASS_CONDITIONING.values()]


def added_input_names(unet_config: Any) -> tuple[str, ...]:
    """The added-conditioning inputs of a UNet: ``()`` for SD 1.x/2.x, ``("text_embeds",
    "time_ids")`` for SDXL (``addition_embed_type="text_time"``), ``("text_pooled",)`` for
    DeepFloyd IF (``addition_embed_type="text"``) and ``("text_pooled", "class_labels")`` for IF
    stage II (``class_embed_type="timestep"``).

    Args:
        unet_config: the UNet's config (mapping or attribute object).
    """
    return tuple(name for name, _ in added_inputs(unet_config))


def default_added_shapes(unet_config: Any, time_ids: int = DEFAULT_TIME_IDS) -> dict[str, tuple[int, ...]]:
    """The per-row shapes of the added conditioning, read from the UNet config.

    SDXL's ``add_embedding`` takes ``P + K * addition_time_embed_dim`` features, so the config
    fixes P once K (the number of ``time_ids``) is known: 6 for SDXL base, 5 for the refiner.

    Args:
        unet_config: the UNet's config.
        time_ids: K.

    Returns:
        ``{}`` for SD 1.x/2.x, ``{"text_embeds": (P,), "time_ids": (K,)}`` for SDXL,
        ``{"text_pooled": (E,)}`` for DeepFloyd IF (E: the time embedding's width), with
        ``"class_labels": (1,)`` for IF stage II.

    Raises:
        InputError: when the config leaves no room for ``time_ids`` of that count.
    """
    shapes: dict[str, tuple[int, ...]] = {
        n: (1,) for n, _ in CLASS_CONDITIONING.get(_get(unet_config, "class_embed_type"), ())
    }
    kind = _get(unet_config, "addition_embed_type")
    if kind == "text":  # IF: the pooled prompt has the time embedding's width
        width = _get(unet_config, "time_embedding_dim") or 4 * int(_get(unet_config, "block_out_channels")[0])
        return {"text_pooled": (int(width),), **shapes}
    if not ADDED_CONDITIONING.get(kind, ()):
        return shapes
    total = int(_get(unet_config, "projection_class_embeddings_input_dim"))
    pooled = total - int(time_ids) * int(_get(unet_config, "addition_time_embed_dim"))
    if pooled < 1:
        raise InputError(
            f"the UNet's add_embedding takes {total} features, too few for {time_ids} time_ids of "
            f"{_get(unet_config, 'addition_time_embed_dim')} each: pass the added shapes explicitly"
        )
    return {"text_embeds": (pooled,), "time_ids": (int(time_ids),), **shapes}


def feature_tails(unet_config: Any, latent_hw: tuple[int, int], frames: int | None = None) -> list[tuple[int, ...]]:
    """Per-row shapes of the features (``mid`` first, then the skips), from the UNet config.

    Follows the ``UNet2DConditionModel`` layout that the split carries: the ``conv_in`` output,
    ``layers_per_block`` resnet outputs per down block, one downsampler output per down block but
    the last (stride 2, padding 1: ``ceil(h/2)``), and the mid-block output. The video UNets
    (``UNet3DConditionModel``, ``UNetMotionModel``) have the same layout per frame; their split
    returns every feature with the frames after the channels.

    Args:
        unet_config: the UNet's config (``block_out_channels``, ``layers_per_block``).
        latent_hw: latent height and width.
        frames: F for a video UNet's features, ``None`` for an image UNet's.

    Returns:
        ``[(C, h, w) of mid, of skip_00, ...]``; ``(C, F, h, w)`` each with ``frames``.
    """
    chans = [int(c) for c in _get(unet_config, "block_out_channels")]
    lpb = _get(unet_config, "layers_per_block")
    layers = [int(v) for v in lpb] if isinstance(lpb, (list, tuple)) else [int(lpb)] * len(chans)
    h, w = int(latent_hw[0]), int(latent_hw[1])
    skips = [(chans[0], h, w)]  # conv_in
    for i, (ch, n) in enumerate(zip(chans, layers)):
        skips += [(ch, h, w)] * n
        if i < len(chans) - 1:
            h, w = -(-h // 2), -(-w // 2)
            skips.append((ch, h, w))
    tails = [(chans[-1], h, w), *skips]
    if frames is None:
        return tails
    return [(c, int(frames), fh, fw) for c, fh, fw in tails]


def check_frames(frames: Any, where: str = "frames") -> int | None:
    """``frames`` as an ``int`` (``None`` stays ``None``: an image UNet's graphs).

    Raises:
        InputError: for anything but ``None`` or a positive integer.
    """
    if frames is None:
        return None
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InputError(f"{where} must be a positive integer (the video's frame count) or None, got {frames!r}")
    return int(frames)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the graph name.
        tail: the dims after the row axis; an ``int`` is fixed, a ``str`` names a dim fixed per
            export but unknown here (``"h"``, ``"L"``, ...).
        dtype: `FLOAT` (the graph's precision) or `FLOAT32`.
        rowed: whether axis 0 is the dynamic row axis (every tensor but the ControlNet's
            ``conditioning_scale``, whose whole shape is ``tail``).
        row_axis: the name of that axis: `ROW_AXIS`, or `STEP_ROW_AXIS` for the
            decoder's ``timestep`` and ``noise_pred``.
    """

    name: str
    tail: tuple[Dim, ...]
    dtype: str = FLOAT
    rowed: bool = True
    row_axis: str = ROW_AXIS

    @property
    def shape(self) -> tuple[Dim, ...]:
        """The full shape, ``(row_axis, *tail)`` (``tail`` for a tensor without the row axis)."""
        return (self.row_axis, *self.tail) if self.rowed else tuple(self.tail)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{0: row_axis}``: only the row axis is dynamic (``{}`` without one)."""
        return {0: self.row_axis} if self.rowed else {}

    @property
    def step_rowed(self) -> bool:
        """Whether axis 0 counts S steps of N rows (the decoder's ``timestep`` and ``noise_pred``)."""
        return self.rowed and self.row_axis == STEP_ROW_AXIS

    @property
    def concrete(self) -> bool:
        """Whether every dim after the row axis is known."""
        return all(isinstance(d, int) for d in self.tail)

    def shape_at(self, rows: int) -> tuple[int, ...]:
        """The shape at ``rows`` rows.

        Raises:
            InputError: when a dim is only symbolic here.
        """
        if not self.concrete:
            raise InputError(
                f"{self.name} has symbolic dims {self.shape}: build the contract with the latent and text shapes"
            )
        return (int(rows), *(int(d) for d in self.tail)) if self.rowed else tuple(int(d) for d in self.tail)


@dataclass(frozen=True)
class GraphSpec:
    """One graph's inputs and outputs, in order.

    Attributes:
        role: ``encoder``, ``decoder`` or ``controlnet``.
        inputs: the inputs, in graph order.
        outputs: the outputs, in graph order.
    """

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def key_rowed_names(self) -> tuple[str, ...]:
        """In a graph with step rows (the decoder, the capture and shallow graphs), the inputs with
        the key step's N rows, given once for the S steps: features, text, added conditioning.
        ``()`` in a graph without step rows."""
        if not any(t.step_rowed for t in self.inputs):
            return ()
        return tuple(t.name for t in self.inputs if t.rowed and not t.step_rowed)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For ``torch.onnx.export``: every input and output with a row axis has it dynamic."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.rowed}

    def tensor(self, name: str) -> TensorSpec:
        """The spec of one input or output, by name."""
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"the {self.role} graph has no tensor {name!r}")

    def check(self, input_names: Sequence[str], output_names: Sequence[str], where: Any, fix: str) -> None:
        """Refuses a graph or plan whose input or output names are not this contract's.

        Names are compared as sets: TensorRT may list an engine's tensors in another order, and
        every consumer binds by name.

        Args:
            input_names, output_names: what the graph or plan has.
            where: the file, for the message.
            fix: what to do, for the message.

        Raises:
            EngineMismatchError: naming the missing and the unexpected tensors.
        """
        problems = []
        for kind, want, have in (
            ("inputs", self.input_names, input_names),
            ("outputs", self.output_names, output_names),
        ):
            missing = [n for n in want if n not in set(have)]
            extra = [n for n in have if n not in set(want)]
            if missing or extra:
                problems.append(f"{kind} {list(have)} (missing {missing}, unexpected {extra})")
        if problems:
            raise EngineMismatchError(
                f"{where} does not fit the {self.role} graph contract: " + "; ".join(problems) + f"; {fix}"
            )


@dataclass(frozen=True)
class GraphContract:
    """The contract of one UNet's encoder and decoder graphs.

    Build it with [`from_unet_config()`][fd_trt.graphs.contract.GraphContract.from_unet_config] (export, manifests), [`from_manifest()`][fd_trt.graphs.contract.GraphContract.from_manifest] (an
    engine directory) or [`from_encoder_io()`][fd_trt.graphs.contract.GraphContract.from_encoder_io] (a bare graph file, whose encoder names say
    everything the decoder must have).

    Attributes:
        num_skips: skip features between the graphs (12 for SD 1.x).
        added: the added-conditioning inputs of both graphs, in order (``()`` for SD 1.x/2.x).
        latent_tail: ``(C, h, w)`` of the sample.
        out_tail: ``(C_out, h, w)`` of ``noise_pred``.
        text_tail: ``(L, D)`` of the text states.
        features: per-row shapes of ``mid`` and each skip, in `feature_names()` order.
        frames: F of a video UNet's graphs (the latents' and features' axis 2, fixed per export);
            ``None`` for an image UNet's.
    """

    num_skips: int
    added: tuple[TensorSpec, ...] = ()
    latent_tail: tuple[Dim, ...] = ("C", "h", "w")
    out_tail: tuple[Dim, ...] = ("C", "h", "w")
    text_tail: tuple[Dim, ...] = ("L", "D")
    features: tuple[tuple[Dim, ...], ...] | None = None
    #: channels of the hidden state entering the decoder's last ``d`` up layers, by ``d`` (decoder schedules)
    hidden_channels: Mapping[int, int] = field(default_factory=dict, compare=False)
    frames: int | None = None

    @property
    def row_layout(self) -> str:
        """`ROW_LAYOUT`: decoder rows are step-major."""
        return ROW_LAYOUT

    @property
    def added_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.added)

    @property
    def added_shapes(self) -> dict[str, list[int]]:
        """``{name: per-row shape}`` of the added conditioning, as the manifest records it."""
        return {t.name: [int(d) for d in t.tail] for t in self.added if t.concrete}

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.num_skips)

    def _features(self) -> tuple[TensorSpec, ...]:
        tails = self.features or tuple(("c", f"h{i}", f"w{i}") for i in range(self.num_skips + 1))
        return tuple(TensorSpec(n, tuple(t)) for n, t in zip(self.feature_names, tails))

    def _conditioning(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(TIMESTEP, (), FLOAT32), TensorSpec(TEXT, self.text_tail), *self.added)

    @property
    def encoder(self) -> GraphSpec:
        return GraphSpec("encoder", (TensorSpec(SAMPLE, self.latent_tail), *self._conditioning()), self._features())

    @property
    def decoder(self) -> GraphSpec:
        # The key step's features, text and added conditioning (N rows); the steps' timesteps (S*N).
        inputs = (
            *self._features(),
            *(replace(t, row_axis=STEP_ROW_AXIS) if t.name == TIMESTEP else t for t in self._conditioning()),
        )
        return GraphSpec("decoder", inputs, (TensorSpec(NOISE_PRED, self.out_tail, row_axis=STEP_ROW_AXIS),))

    # decoder schedules (fd_trt.graphs.shallow): the decoder that also returns the hidden state
    # entering its last `depth` up layers, and those layers alone.
    def _hidden(self, depth: int) -> TensorSpec:
        tails = self.features
        if tails is not None and 1 <= depth < len(tails):
            # The hidden state entering up layer L-d is concatenated with skip d-1: same spatial dims.
            chans = self.hidden_channels.get(depth, "c_hidden")
            tail: tuple[Dim, ...] = (chans, *tails[depth][1:])
        else:
            tail = ("c_hidden", "h_hidden", "w_hidden")
        return TensorSpec(HIDDEN, tail, row_axis=STEP_ROW_AXIS)

    def decoder_capture(self, depth: int) -> GraphSpec:
        """The decoder's inputs; outputs ``noise_pred`` and ``hidden`` (``S*N`` rows): the hidden
        state entering the last ``depth`` up layers."""
        dec = self.decoder
        return GraphSpec(capture_role(depth), dec.inputs, (*dec.outputs, self._hidden(depth)))

    def shallow_decoder(self, depth: int) -> GraphSpec:
        """``hidden`` (``S*N`` rows), ``skip_00 .. skip_{depth-1}`` (N rows), ``timestep`` (``S*N``),
        the text and added conditioning (N) -> ``noise_pred`` (``S*N``)."""
        dec = self.decoder
        skips = self._features()[1 : 1 + depth]
        cond = tuple(t for t in dec.inputs if t.name not in set(self.feature_names))
        return GraphSpec(shallow_role(depth), (self._hidden(depth), *skips, *cond), dec.outputs)

    @property
    def input_conv(self) -> GraphSpec:
        """``sample -> skip_00``: ``conv_in`` alone, on the encoder's rows."""
        return GraphSpec(INPUT_CONV, self.encoder.inputs[:1], self.decoder.inputs[1:2])

    def spec(self, role: str) -> GraphSpec:
        """The [`GraphSpec`][fd_trt.graphs.contract.GraphSpec] of ``encoder`` or ``decoder``."""
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return self.encoder if role == "encoder" else self.decoder

    # constructors -------------------------------------------------------------------------
    @classmethod
    def from_unet_config(
        cls,
        unet_config: Any,
        latent_size: tuple[int, int] | None = None,
        text_shape: tuple[int, int] | None = None,
        added_shapes: Mapping[str, Sequence[int]] | None = None,
        frames: int | None = None,
    ) -> GraphContract:
        """The contract of a UNet's graphs.

        Args:
            unet_config: the UNet's config (mapping or attribute object).
            latent_size: ``(h, w)``; spatial dims stay symbolic without it.
            text_shape: ``(L, D)``; ``(77, cross_attention_dim)`` when omitted.
            added_shapes: per-row shapes of the added conditioning (SDXL); the config's
                defaults ([`default_added_shapes()`][fd_trt.graphs.contract.default_added_shapes]) when omitted.
            frames: F, for a video UNet's graphs (latents ``[rows,C,F,h,w]``); ``None`` for an
                image UNet's.

        Returns:
            The contract.

        Raises:
            InputError: for added shapes that do not name the UNet's added inputs, or a bad ``frames``.
        """
        frames = check_frames(frames)
        chans = [int(c) for c in _get(unet_config, "block_out_channels")]
        lpb = _get(unet_config, "layers_per_block")
        layers = [int(v) for v in lpb] if isinstance(lpb, (list, tuple)) else [int(lpb)] * len(chans)
        num_skips = 1 + sum(layers) + len(chans) - 1
        if text_shape is None:
            text_shape = (77, int(_get(unet_config, "cross_attention_dim")))
        spatial: tuple[Dim, ...] = ("h", "w") if latent_size is None else (int(latent_size[0]), int(latent_size[1]))
        features = None
        if latent_size is not None:
            features = tuple(feature_tails(unet_config, (int(latent_size[0]), int(latent_size[1])), frames))
        if frames is not None:
            spatial = (frames, *spatial)
        dtypes = dict(added_inputs(unet_config))
        shapes = dict(added_shapes) if added_shapes is not None else default_added_shapes(unet_config)
        if set(shapes) != set(dtypes):
            raise InputError(
                f"added_shapes names {sorted(shapes)}, but this UNet's added conditioning is {sorted(dtypes)}"
            )
        added = tuple(TensorSpec(n, tuple(int(d) for d in shapes[n]), dt) for n, dt in dtypes.items())
        out_channels = int(_get(unet_config, "out_channels", _get(unet_config, "in_channels")))
        return cls(
            num_skips=num_skips,
            added=added,
            latent_tail=(int(_get(unet_config, "in_channels")), *spatial),
            out_tail=(out_channels, *spatial),
            text_tail=(int(text_shape[0]), int(text_shape[1])),
            features=features,
            frames=frames,
        )

    @classmethod
    def from_manifest(cls, manifest: Any) -> GraphContract:
        """The contract an engine directory's manifest describes ([`fd_trt.graphs.manifest.Manifest`][fd_trt.graphs.manifest.Manifest]).

        The recorded ``num_skips``, ``added_shapes`` and ``frames`` (video graphs) are the
        graphs' facts; the UNet config adds the feature shapes when it is complete.
        """
        latent, text = manifest.latent_shape, manifest.text_shape
        frames = int(getattr(manifest, "frames", 0) or 0) or None
        recorded = dict(getattr(manifest, "added_shapes", None) or {})
        if _get(manifest.unet_config, "block_out_channels") is not None:
            contract = cls.from_unet_config(
                manifest.unet_config,
                latent_size=(int(latent[1]), int(latent[2])),
                text_shape=(int(text[0]), int(text[1])),
                added_shapes=recorded,
                frames=frames,
            )
            if contract.num_skips == int(manifest.num_skips):
                return contract
        options = [o for o in known_added_sets() if {n for n, _ in o} == set(recorded)]
        if not options:
            raise EngineMismatchError(
                f"the manifest records added inputs {sorted(recorded)}, which this fd_trt does not know: rebuild the engine directory"
            )
        added = tuple(TensorSpec(n, tuple(int(d) for d in recorded[n]), dt) for n, dt in options[0])
        tail = tuple(int(d) for d in latent)
        if frames is not None:
            tail = (tail[0], frames, *tail[1:])
        return cls(
            num_skips=int(manifest.num_skips),
            added=added,
            latent_tail=tail,
            out_tail=tail,
            text_tail=(int(text[0]), int(text[1])),
            frames=frames,
        )

    @classmethod
    def from_encoder_io(
        cls, input_names: Sequence[str], output_names: Sequence[str], where: Any = "the encoder graph"
    ) -> GraphContract:
        """The contract implied by an encoder graph's names, when no config is at hand.

        The added inputs must be one of `ADDED_CONDITIONING`'s sets and the outputs
        ``mid, skip_00 ..``; shapes stay symbolic.

        Raises:
            EngineMismatchError: for names that are not an fd_trt encoder's.
        """
        base = {SAMPLE, TIMESTEP, TEXT}
        extra = [n for n in input_names if n not in base]
        for options in known_added_sets():
            if sorted(extra) == sorted(n for n, _ in options) and base <= set(input_names):
                added = tuple(TensorSpec(n, ("k",), dt) for n, dt in options)
                contract = cls(num_skips=max(len(output_names) - 1, 0), added=added)
                contract.encoder.check(
                    input_names, output_names, where, "it is not an fd_trt encoder graph; rebuild it"
                )
                return contract
        raise EngineMismatchError(
            f"{where} has inputs {list(input_names)}, expected {sorted(base)} plus one of "
            f"{[list(n for n, _ in v) for v in known_added_sets()]}: it is not an fd_trt encoder graph; rebuild it"
        )


def controlnet_factor(controlnet_config: Any) -> int:
    """How much a ControlNet's conditioning embedding downsamples the control image: one stride-2
    convolution between consecutive ``conditioning_embedding_out_channels`` (8 for SD ControlNets)."""
    chans = _get(controlnet_config, "conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return 2 ** (len(tuple(chans)) - 1)


def check_controlnet_config(controlnet_config: Any) -> None:
    """Refuses ControlNets the ControlNet graph cannot carry, naming why.

    Raises:
        UnsupportedModelError: for SDXL ControlNets (added ``text_embeds`` / ``time_ids``), class
            or time conditioning, or ``encoder_hid_proj`` inputs.
    """
    from fd_trt.errors import UnsupportedModelError

    added = _get(controlnet_config, "addition_embed_type")
    if added is not None:
        raise UnsupportedModelError(
            f"this ControlNet has addition_embed_type={added!r} (an SDXL ControlNet, with added text_embeds / time_ids): "
            "fd_trt's ControlNet graph carries SD 1.x/2.x ControlNets only; use backend='torch' for it"
        )
    for key in ("class_embed_type", "encoder_hid_dim_type"):
        if _get(controlnet_config, key) is not None:
            raise UnsupportedModelError(
                f"this ControlNet has {key}={_get(controlnet_config, key)!r}: the ControlNet graph takes no such input; "
                "use backend='torch' for it"
            )


@dataclass(frozen=True)
class ControlNetContract:
    """The contract of one ControlNet's graph (see the module's docstring).

    Attributes:
        num_down: down residuals (the UNet's skip count: 12 for SD 1.x).
        latent_tail, text_tail: as the UNet's ([`GraphContract`][fd_trt.graphs.contract.GraphContract]).
        cond_tail: ``(3, h*f, w*f)`` of the control image.
        features: per-row shapes of ``mid`` then each ``down_ii`` (the UNet's ``mid``, ``skip_ii``;
            ``(C, 1, 1)`` for a ControlNet with ``global_pool_conditions``), or ``None``.
    """

    num_down: int
    latent_tail: tuple[Dim, ...] = ("C", "h", "w")
    text_tail: tuple[Dim, ...] = ("L", "D")
    cond_tail: tuple[Dim, ...] = (3, "H", "W")
    features: tuple[tuple[Dim, ...], ...] | None = None

    @property
    def down_names(self) -> list[str]:
        return [down_name(i) for i in range(self.num_down)]

    @property
    def spec(self) -> GraphSpec:
        tails = self.features or tuple(("c", f"h{i}", f"w{i}") for i in range(self.num_down + 1))
        inputs = (
            TensorSpec(SAMPLE, self.latent_tail),
            TensorSpec(TIMESTEP, (), FLOAT32),
            TensorSpec(TEXT, self.text_tail),
            TensorSpec(CONTROLNET_COND, self.cond_tail),
            TensorSpec(CONDITIONING_SCALE, (1,), FLOAT32, rowed=False),
        )
        outputs = (
            *(TensorSpec(n, tuple(t)) for n, t in zip(self.down_names, tails[1:])),
            TensorSpec(MID, tuple(tails[0])),
        )
        return GraphSpec(CONTROLNET, inputs, outputs)

    @classmethod
    def from_controlnet_config(
        cls,
        controlnet_config: Any,
        latent_size: tuple[int, int] | None = None,
        text_shape: tuple[int, int] | None = None,
    ) -> ControlNetContract:
        """The contract of a ControlNet's graph, from its config (as the UNet's from the UNet's).

        Args:
            controlnet_config: a ``ControlNetModel``'s config (mapping or attribute object).
            latent_size: ``(h, w)``; spatial dims stay symbolic without it.
            text_shape: ``(L, D)``; ``(77, cross_attention_dim)`` when omitted.

        Raises:
            UnsupportedModelError: see [`check_controlnet_config()`][fd_trt.graphs.contract.check_controlnet_config].
        """
        check_controlnet_config(controlnet_config)
        unet_like = GraphContract.from_unet_config(
            {
                **{
                    k: _get(controlnet_config, k)
                    for k in ("block_out_channels", "layers_per_block", "in_channels", "cross_attention_dim")
                }
            },
            latent_size,
            text_shape,
            {},
        )
        features = unet_like.features
        if features is not None and _get(controlnet_config, "global_pool_conditions", False):
            features = tuple((t[0], 1, 1) for t in features)
        f = controlnet_factor(controlnet_config)
        channels = int(_get(controlnet_config, "conditioning_channels", 3) or 3)
        cond: tuple[Dim, ...] = (channels, "H", "W")
        if latent_size is not None:
            cond = (channels, int(latent_size[0]) * f, int(latent_size[1]) * f)
        return cls(
            num_down=unet_like.num_skips,
            latent_tail=unet_like.latent_tail,
            text_tail=unet_like.text_tail,
            cond_tail=cond,
            features=features,
        )

    def check_fits(self, unet: GraphContract, where: Any = "the ControlNet") -> None:
        """Refuses a ControlNet whose residuals do not add to this UNet's features one to one.

        Raises:
            UnsupportedModelError: naming the first mismatch and the fix.
        """
        from fd_trt.errors import UnsupportedModelError

        fix = "use a ControlNet made for this UNet (ControlNetModel.from_unet, or one trained on this base model)"
        if self.num_down != unet.num_skips:
            raise UnsupportedModelError(
                f"{where} gives {self.num_down} down residuals but the UNet has {unet.num_skips} skips: {fix}"
            )
        if tuple(self.latent_tail) != tuple(unet.latent_tail) or tuple(self.text_tail) != tuple(unet.text_tail):
            raise UnsupportedModelError(
                f"{where} takes sample {self.latent_tail} and text {self.text_tail}, the UNet {unet.latent_tail} and "
                f"{unet.text_tail}: {fix}"
            )
        if self.features is not None and unet.features is not None:
            for name, mine, theirs in zip([MID, *self.down_names], self.features, unet.features):
                pooled = tuple(mine[1:]) == (1, 1)
                if mine[0] != theirs[0] or (not pooled and tuple(mine) != tuple(theirs)):
                    raise UnsupportedModelError(
                        f"{where}'s {name} is {tuple(mine)} per row but the UNet's feature is {tuple(theirs)}: {fix}"
                    )


__all__ = [
    "ADDED_CONDITIONING",
    "CLASS_CONDITIONING",
    "CONDITIONING_SCALE",
    "CONTROLNET",
    "CONTROLNET_COND",
    "ControlNetContract",
    "check_controlnet_config",
    "controlnet_factor",
    "down_name",
    "DEFAULT_TIME_IDS",
    "FLOAT",
    "FLOAT32",
    "FLOAT32_INPUTS",
    "GraphContract",
    "GraphSpec",
    "INPUT_CONV",
    "ROW_AXIS",
    "ROW_LAYOUT",
    "STEP_ROW_AXIS",
    "TensorSpec",
    "added_input_names",
    "added_inputs",
    "capture_role",
    "check_frames",
    "default_added_shapes",
    "known_added_sets",
    "feature_names",
    "feature_tails",
    "shallow_role",
    "shallow_role_depth",
    "shallow_roles",
]
