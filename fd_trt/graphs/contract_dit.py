"""The graph contract of a split diffusion transformer ([`fd_trt.graphs.split_dit`][fd_trt.graphs.split_dit]), in the
terms of [`fd_trt.graphs.contract`][fd_trt.graphs.contract] ([`TensorSpec`][fd_trt.graphs.contract.TensorSpec], [`GraphSpec`][fd_trt.graphs.contract.GraphSpec])::

    encoder  sample [rows,C,H,W], timestep [rows] f32, *cond [rows,...]   -> tokens [rows,T,D]
    decoder  tokens [rows,T,D], timestep [step_rows] f32, *cond [rows,...] -> noise_pred [step_rows,C,H,W]

``cond`` is the family's conditioning (`SplitTransformer.cond_names`): DiT's
``class_labels`` (int64), PixArt's ``encoder_hidden_states [L,Dt]``, ``encoder_attention_mask [L]``
and, with size conditioning, ``resolution [2]`` and ``aspect_ratio [1]`` (float32); SD3's
``encoder_hidden_states [L,Dt]`` and ``pooled_projections [P]``. SD3 propagates its text stream
too: its encoder also returns ``context [rows,L,D]``, which its decoder takes after ``tokens``
(the decoder graph then has no use for ``encoder_hidden_states``, and the exporter drops it). As the UNet
decoder, the transformer decoder takes the key step's N rows once and a timestep per step row
(``S*N``, step-major) and tiles the rows itself; ``noise_pred`` has the noise channels only.
"""

from __future__ import annotations

from fd_trt.graphs.contract import FLOAT, FLOAT32, NOISE_PRED, SAMPLE, STEP_ROW_AXIS, TIMESTEP, GraphSpec, TensorSpec
from fd_trt.graphs.split_dit import CONTEXT, TOKENS, SplitTransformer

#: The dtype of DiT's class labels in the graphs.
INT64 = "int64"


def _cond_specs(split: SplitTransformer, text_shape: tuple[int, int] | None) -> tuple[TensorSpec, ...]:
    if split.kind == "dit":
        return (TensorSpec("class_labels", (), INT64),)
    length, width = text_shape if text_shape is not None else ("L", "Dt")
    if split.kind == "sd3":
        pooled = split.pooled_dim if split.pooled_dim is not None else "P"
        return (TensorSpec("encoder_hidden_states", (length, width)), TensorSpec("pooled_projections", (pooled,)))
    specs = [
        TensorSpec("encoder_hidden_states", (length, width)),
        TensorSpec("encoder_attention_mask", (length,), FLOAT32),
    ]
    if "resolution" in split.cond_names:
        specs += [TensorSpec("resolution", (2,), FLOAT32), TensorSpec("aspect_ratio", (1,), FLOAT32)]
    return tuple(specs)


def transformer_graphs(
    split: SplitTransformer,
    latent_hw: tuple[int, int],
    patch: int,
    width: int,
    text_shape: tuple[int, int] | None = None,
) -> tuple[GraphSpec, GraphSpec]:
    """The encoder and decoder [`GraphSpec`][fd_trt.graphs.contract.GraphSpec] of ``split`` at one latent size.

    Args:
        split: the split transformer.
        latent_hw: the latent height and width.
        patch: the patch size.
        width: the token width (heads x head dim).
        text_shape: PixArt's and SD3's ``(L, Dt)``; ``None`` for DiT.
    """
    h, w = latent_hw
    feats = [TensorSpec(TOKENS, ((h // patch) * (w // patch), width))]
    if CONTEXT in split.features:
        feats.append(TensorSpec(CONTEXT, (text_shape[0] if text_shape is not None else "L", width)))
    cond = _cond_specs(split, text_shape)
    encoder = GraphSpec(
        "encoder",
        (TensorSpec(SAMPLE, (split.in_channels, h, w)), TensorSpec(TIMESTEP, (), FLOAT32), *cond),
        tuple(feats),
    )
    decoder = GraphSpec(
        "decoder",
        (*feats, TensorSpec(TIMESTEP, (), FLOAT32, row_axis=STEP_ROW_AXIS), *cond),
        (TensorSpec(NOISE_PRED, (split.eps_channels, h, w), FLOAT, row_axis=STEP_ROW_AXIS),),
    )
    return encoder, decoder


__all__ = ["INT64", "transformer_graphs"]
