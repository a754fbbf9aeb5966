"""The graph contract (DESIGN.md section 3), defined once: the inputs and outputs of the encoder
and decoder graphs, in order, with dtypes, shapes, dynamic axes and the decoder's row layout.

Export (:mod:`fd_trt.export`), the onnxruntime and TensorRT runners, the TensorRT profiles and
the engine-directory manifest (:mod:`fd_trt.engines`) all read it; none of them writes a graph
name out. A new conditioning input is one entry in :data:`ADDED_CONDITIONING` (and the split's
arithmetic for it in :mod:`fd_trt.split`).

The contract of one UNet, for ``C`` latent channels, ``h x w`` latents and ``L x D`` text::

    encoder  sample [rows,C,h,w], timestep [rows] f32, encoder_hidden_states [rows,L,D], *added
             -> mid, skip_00 .. skip_NN
    decoder  mid, skip_00 .. skip_NN, timestep [rows] f32, encoder_hidden_states [rows,L,D], *added
             -> noise_pred [rows,C_out,h,w]

``added`` is empty for SD 1.x/2.x (their graph names on disk are unchanged) and is
``text_embeds [rows,P]``, ``time_ids [rows,K] f32`` for SDXL (``addition_embed_type="text_time"``;
P = 1280 and K = 6 for SDXL base, K = 5 for the refiner). Axis 0 (``rows``) is the only dynamic
axis. Decoder rows are step-major: for S steps of one key step with N encoder rows, row
``j*N + i`` is encoder row ``i`` at step ``j``.

Dtypes: ``timestep`` and ``time_ids`` are float32 in every graph (timestep-like values such as
999 or 1024 lose precision in fp16); every other tensor has the graph's precision.

This module imports neither torch modules of diffusers nor onnx: a config (a diffusers
``FrozenDict``, any mapping or attribute object) is enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import EngineMismatchError, InputError

#: The dynamic axis 0 of every graph tensor.
ROW_AXIS = "rows"
#: How decoder rows are laid out: row ``j*N + i`` is encoder row ``i`` at step ``j``.
ROW_LAYOUT = "step-major"
#: A tensor at the graph's precision (fp32 or fp16).
FLOAT = "float"
#: A tensor that is float32 in every graph.
FLOAT32 = "float32"

ROLES = ("encoder", "decoder")
SAMPLE = "sample"
TIMESTEP = "timestep"
TEXT = "encoder_hidden_states"
MID = "mid"
NOISE_PRED = "noise_pred"

#: ``addition_embed_type`` values the split carries -> the per-row inputs each adds to both
#: graphs, in graph order, with their dtype.
ADDED_CONDITIONING: dict[str | None, tuple[tuple[str, str], ...]] = {
    None: (),
    "text_time": (("text_embeds", FLOAT), ("time_ids", FLOAT32)),
}
#: Inputs that are float32 in every graph, whatever its precision.
FLOAT32_INPUTS = frozenset({TIMESTEP} | {n for options in ADDED_CONDITIONING.values() for n, dt in options if dt == FLOAT32})
#: SDXL base's micro-conditioning: original size, crop top-left, target size.
DEFAULT_TIME_IDS = 6

Dim = int | str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def skip_name(index: int) -> str:
    """The graph name of skip feature ``index``: ``skip_00``, ``skip_01``, ..."""
    return f"skip_{index:02d}"


def feature_names(num_skips: int) -> list[str]:
    """Graph names of the features between the graphs: ``mid, skip_00 .. skip_NN``."""
    return [MID] + [skip_name(i) for i in range(num_skips)]


def added_input_names(unet_config: Any) -> tuple[str, ...]:
    """The added-conditioning inputs of a UNet: ``()`` for SD 1.x/2.x, ``("text_embeds",
    "time_ids")`` for SDXL (``addition_embed_type="text_time"``).

    Args:
        unet_config: the UNet's config (mapping or attribute object).
    """
    return tuple(name for name, _ in ADDED_CONDITIONING.get(_get(unet_config, "addition_embed_type"), ()))


def default_added_shapes(unet_config: Any, time_ids: int = DEFAULT_TIME_IDS) -> dict[str, tuple[int, ...]]:
    """The per-row shapes of the added conditioning, read from the UNet config.

    SDXL's ``add_embedding`` takes ``P + K * addition_time_embed_dim`` features, so the config
    fixes P once K (the number of ``time_ids``) is known: 6 for SDXL base, 5 for the refiner.

    Args:
        unet_config: the UNet's config.
        time_ids: K.

    Returns:
        ``{}`` for SD 1.x/2.x, ``{"text_embeds": (P,), "time_ids": (K,)}`` for SDXL.

    Raises:
        InputError: when the config leaves no room for ``time_ids`` of that count.
    """
    if not added_input_names(unet_config):
        return {}
    total = int(_get(unet_config, "projection_class_embeddings_input_dim"))
    pooled = total - int(time_ids) * int(_get(unet_config, "addition_time_embed_dim"))
    if pooled < 1:
        raise InputError(
            f"the UNet's add_embedding takes {total} features, too few for {time_ids} time_ids of "
            f"{_get(unet_config, 'addition_time_embed_dim')} each: pass the added shapes explicitly"
        )
    return {"text_embeds": (pooled,), "time_ids": (int(time_ids),)}


def feature_tails(unet_config: Any, latent_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Per-row shapes of the features (``mid`` first, then the skips), from the UNet config.

    Follows the ``UNet2DConditionModel`` layout that the split carries: the ``conv_in`` output,
    ``layers_per_block`` resnet outputs per down block, one downsampler output per down block but
    the last (stride 2, padding 1: ``ceil(h/2)``), and the mid-block output.

    Args:
        unet_config: the UNet's config (``block_out_channels``, ``layers_per_block``).
        latent_hw: latent height and width.

    Returns:
        ``[(C, h, w) of mid, of skip_00, ...]``.
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
    return [(chans[-1], h, w), *skips]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the graph name.
        tail: the dims after the row axis; an ``int`` is fixed, a ``str`` names a dim fixed per
            export but unknown here (``"h"``, ``"L"``, ...).
        dtype: :data:`FLOAT` (the graph's precision) or :data:`FLOAT32`.
    """

    name: str
    tail: tuple[Dim, ...]
    dtype: str = FLOAT

    @property
    def shape(self) -> tuple[Dim, ...]:
        """The full shape, ``("rows", *tail)``."""
        return (ROW_AXIS, *self.tail)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{0: "rows"}``: only the row axis is dynamic."""
        return {0: ROW_AXIS}

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
            raise InputError(f"{self.name} has symbolic dims {self.shape}: build the contract with the latent and text shapes")
        return (int(rows), *(int(d) for d in self.tail))


@dataclass(frozen=True)
class GraphSpec:
    """One graph's inputs and outputs, in order.

    Attributes:
        role: ``encoder`` or ``decoder``.
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
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For ``torch.onnx.export``: every input and output has the dynamic row axis 0."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs)}

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
        for kind, want, have in (("inputs", self.input_names, input_names), ("outputs", self.output_names, output_names)):
            missing = [n for n in want if n not in set(have)]
            extra = [n for n in have if n not in set(want)]
            if missing or extra:
                problems.append(f"{kind} {list(have)} (missing {missing}, unexpected {extra})")
        if problems:
            raise EngineMismatchError(f"{where} does not fit the {self.role} graph contract: " + "; ".join(problems) + f"; {fix}")


@dataclass(frozen=True)
class GraphContract:
    """The contract of one UNet's encoder and decoder graphs.

    Build it with :meth:`from_unet_config` (export, manifests), :meth:`from_manifest` (an
    engine directory) or :meth:`from_encoder_io` (a bare graph file, whose encoder names say
    everything the decoder must have).

    Attributes:
        num_skips: skip features between the graphs (12 for SD 1.x).
        added: the added-conditioning inputs of both graphs, in order (``()`` for SD 1.x/2.x).
        latent_tail: ``(C, h, w)`` of the sample.
        out_tail: ``(C_out, h, w)`` of ``noise_pred``.
        text_tail: ``(L, D)`` of the text states.
        features: per-row shapes of ``mid`` and each skip, in :func:`feature_names` order.
    """

    num_skips: int
    added: tuple[TensorSpec, ...] = ()
    latent_tail: tuple[Dim, ...] = ("C", "h", "w")
    out_tail: tuple[Dim, ...] = ("C", "h", "w")
    text_tail: tuple[Dim, ...] = ("L", "D")
    features: tuple[tuple[Dim, ...], ...] | None = None

    @property
    def row_layout(self) -> str:
        """:data:`ROW_LAYOUT`: decoder rows are step-major."""
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
        return GraphSpec("decoder", (*self._features(), *self._conditioning()), (TensorSpec(NOISE_PRED, self.out_tail),))

    def spec(self, role: str) -> GraphSpec:
        """The :class:`GraphSpec` of ``encoder`` or ``decoder``."""
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
    ) -> "GraphContract":
        """The contract of a UNet's graphs.

        Args:
            unet_config: the UNet's config (mapping or attribute object).
            latent_size: ``(h, w)``; spatial dims stay symbolic without it.
            text_shape: ``(L, D)``; ``(77, cross_attention_dim)`` when omitted.
            added_shapes: per-row shapes of the added conditioning (SDXL); the config's
                defaults (:func:`default_added_shapes`) when omitted.

        Returns:
            The contract.

        Raises:
            InputError: for added shapes that do not name the UNet's added inputs.
        """
        chans = [int(c) for c in _get(unet_config, "block_out_channels")]
        lpb = _get(unet_config, "layers_per_block")
        layers = [int(v) for v in lpb] if isinstance(lpb, (list, tuple)) else [int(lpb)] * len(chans)
        num_skips = 1 + sum(layers) + len(chans) - 1
        if text_shape is None:
            text_shape = (77, int(_get(unet_config, "cross_attention_dim")))
        spatial: tuple[Dim, Dim] = ("h", "w") if latent_size is None else (int(latent_size[0]), int(latent_size[1]))
        features = None
        if latent_size is not None:
            features = tuple(feature_tails(unet_config, (int(latent_size[0]), int(latent_size[1]))))
        dtypes = dict(ADDED_CONDITIONING.get(_get(unet_config, "addition_embed_type"), ()))
        shapes = dict(added_shapes) if added_shapes is not None else default_added_shapes(unet_config)
        if set(shapes) != set(dtypes):
            raise InputError(f"added_shapes names {sorted(shapes)}, but this UNet's added conditioning is {sorted(dtypes)}")
        added = tuple(TensorSpec(n, tuple(int(d) for d in shapes[n]), dt) for n, dt in dtypes.items())
        out_channels = int(_get(unet_config, "out_channels", _get(unet_config, "in_channels")))
        return cls(
            num_skips=num_skips,
            added=added,
            latent_tail=(int(_get(unet_config, "in_channels")), *spatial),
            out_tail=(out_channels, *spatial),
            text_tail=(int(text_shape[0]), int(text_shape[1])),
            features=features,
        )

    @classmethod
    def from_manifest(cls, manifest: Any) -> "GraphContract":
        """The contract an engine directory's manifest describes (:class:`fd_trt.engines.Manifest`).

        The recorded ``num_skips`` and ``added_shapes`` are the graphs' facts; the UNet config
        adds the feature shapes when it is complete.
        """
        latent, text = manifest.latent_shape, manifest.text_shape
        recorded = dict(getattr(manifest, "added_shapes", None) or {})
        if _get(manifest.unet_config, "block_out_channels") is not None:
            contract = cls.from_unet_config(
                manifest.unet_config,
                latent_size=(int(latent[1]), int(latent[2])),
                text_shape=(int(text[0]), int(text[1])),
                added_shapes=recorded,
            )
            if contract.num_skips == int(manifest.num_skips):
                return contract
        options = [o for o in ADDED_CONDITIONING.values() if {n for n, _ in o} == set(recorded)]
        if not options:
            raise EngineMismatchError(
                f"the manifest records added inputs {sorted(recorded)}, which this fd_trt does not know: rebuild the engine directory"
            )
        added = tuple(TensorSpec(n, tuple(int(d) for d in recorded[n]), dt) for n, dt in options[0])
        tail = tuple(int(d) for d in latent)
        return cls(num_skips=int(manifest.num_skips), added=added, latent_tail=tail, out_tail=tail,
                   text_tail=(int(text[0]), int(text[1])))

    @classmethod
    def from_encoder_io(
        cls, input_names: Sequence[str], output_names: Sequence[str], where: Any = "the encoder graph"
    ) -> "GraphContract":
        """The contract implied by an encoder graph's names, when no config is at hand.

        The added inputs must be one of :data:`ADDED_CONDITIONING`'s sets and the outputs
        ``mid, skip_00 ..``; shapes stay symbolic.

        Raises:
            EngineMismatchError: for names that are not an fd_trt encoder's.
        """
        base = {SAMPLE, TIMESTEP, TEXT}
        extra = [n for n in input_names if n not in base]
        for options in ADDED_CONDITIONING.values():
            if sorted(extra) == sorted(n for n, _ in options) and base <= set(input_names):
                added = tuple(TensorSpec(n, ("k",), dt) for n, dt in options)
                contract = cls(num_skips=max(len(output_names) - 1, 0), added=added)
                contract.encoder.check(input_names, output_names, where, "it is not an fd_trt encoder graph; rebuild it")
                return contract
        raise EngineMismatchError(
            f"{where} has inputs {list(input_names)}, expected {sorted(base)} plus one of "
            f"{[list(n for n, _ in v) for v in ADDED_CONDITIONING.values()]}: it is not an fd_trt encoder graph; rebuild it"
        )


__all__ = [
    "ADDED_CONDITIONING",
    "DEFAULT_TIME_IDS",
    "FLOAT",
    "FLOAT32",
    "FLOAT32_INPUTS",
    "GraphContract",
    "GraphSpec",
    "ROW_AXIS",
    "ROW_LAYOUT",
    "TensorSpec",
    "added_input_names",
    "default_added_shapes",
    "feature_names",
    "feature_tails",
]
