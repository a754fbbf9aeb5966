"""Diffusion transformers (DiT, PixArt-alpha/sigma, SD3) as an encoder and a decoder at block ``N``.

The transformer analogue of [`fd_trt.graphs.split`][fd_trt.graphs.split] (docs/guides/dit.md):

* the **encoder** is the input embedding (patchify and position embedding, the timestep and
  caption embeddings) and transformer blocks ``0..N-1``; its output tokens ``[rows,T,D]`` are the
  propagated features ([`fd_trt.core.features.Features`][fd_trt.core.features.Features] with ``mid`` = the tokens, no skips);
* the **decoder** is blocks ``N..`` and the final adaLN norm, projection and unpatchify. It embeds
  its own timestep, so every step of a segment gets that step's adaLN conditioning, and it takes
  ``S x rows`` rows at once (the segment's steps, step-major).

``decoder(encoder(x, t, c), t, c) == transformer(x, t, c)`` for every ``N`` in ``0..len(blocks)``
(``tests/test_split_dit.py``). Both halves reuse the transformer's own submodules (no weight copy).

The conditioning of a row is named as the graph inputs (`SplitTransformer.cond_names`):

* DiT: ``class_labels`` (int64 ``[rows]``); the null class (CFG) is ``num_embeds_ada_norm``;
* PixArt: ``encoder_hidden_states [rows,L,Dt]``, ``encoder_attention_mask [rows,L]`` (1 keep,
  0 drop) and, for a transformer with additional conditions (PixArt-alpha at 1024 px),
  ``resolution [rows,2]`` and ``aspect_ratio [rows,1]``;
* SD3: ``encoder_hidden_states [rows,L,Dt]`` (CLIP and T5 tokens) and ``pooled_projections
  [rows,P]``. Its joint blocks carry two token streams, so two features cross the split
  (`SplitTransformer.features`: ``tokens`` and ``context``,
  [`fd_trt.graphs.split_sd3`][fd_trt.graphs.split_sd3]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.graphs.split import text_rows_shared

#: Graph name of the propagated tokens.
TOKENS = "tokens"
#: Graph name of SD3's propagated text (context) tokens.
CONTEXT = "context"


def transformer_kind(transformer: Any) -> str:
    """``"dit"``, ``"pixart"`` or ``"sd3"`` for a diffusers transformer this module splits.

    Raises:
        UnsupportedModelError: for another class.
    """
    name = type(transformer).__name__
    if name == "DiTTransformer2DModel":
        return "dit"
    if name == "PixArtTransformer2DModel":
        return "pixart"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise UnsupportedModelError(
        f"{name} cannot be split into encoder and decoder graphs: the transformer split carries "
        "DiTTransformer2DModel (DiTPipeline), PixArtTransformer2DModel (PixArtAlphaPipeline, PixArtSigmaPipeline) "
        "and SD3Transformer2DModel (StableDiffusion3Pipeline)"
    )


def num_blocks(transformer: Any) -> int:
    """The transformer blocks of ``transformer``."""
    return len(transformer.transformer_blocks)


def check_split_point(transformer: Any, split: int) -> int:
    """``split`` checked against the transformer's blocks: ``0 <= N <= len(blocks)``.

    Raises:
        InputError: naming the valid range.
    """
    n = num_blocks(transformer)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= n:
        raise InputError(f"split point N={split!r} is outside 0..{n}: pick N in 0..{n} (the blocks the encoder runs)")
    return split


def _unpatchify(x: torch.Tensor, height: int, width: int, patch: int, channels: int) -> torch.Tensor:
    """Tokens ``[rows, h*w, p*p*C]`` to ``[rows, C, h*p, w*p]``, as diffusers' transformers do."""
    x = x.reshape(-1, height, width, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, channels, height * patch, width * patch)


class _DiTEncoder(nn.Module):
    def __init__(self, tr: Any, split: int) -> None:
        super().__init__()
        self.pos_embed = tr.pos_embed
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[:split])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.pos_embed(sample)
        for block in self.blocks:
            h = block(h, timestep=timestep, class_labels=class_labels)
        return h


class _DiTDecoder(nn.Module):
    def __init__(self, tr: Any, split: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[split:])
        self.emb = tr.transformer_blocks[0].norm1.emb
        self.proj_out_1, self.proj_out_2, self.norm_out = tr.proj_out_1, tr.proj_out_2, tr.norm_out
        self.patch, self.out_channels = int(tr.patch_size), int(tr.out_channels)

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = tokens
        for block in self.blocks:
            h = block(h, timestep=timestep, class_labels=class_labels)
        conditioning = self.emb(timestep, class_labels, hidden_dtype=h.dtype)
        shift, scale = self.proj_out_1(nn.functional.silu(conditioning)).chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = self.proj_out_2(h)
        side = int(h.shape[1] ** 0.5)
        return _unpatchify(h, side, side, self.patch, self.out_channels)


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PixArt's cross-attention bias of a ``[rows,L]`` keep-mask: 0 kept, -10000 dropped, ``[rows,1,L]``."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class _PixArtCommon(nn.Module):
    def __init__(self, tr: Any) -> None:
        super().__init__()
        self.adaln_single = tr.adaln_single
        self.caption_projection = tr.caption_projection
        self.extra = bool(tr.use_additional_conditions)

    def condition(
        self, timestep: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, rest: tuple[torch.Tensor, ...], dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = text.shape[0]
        added = {"resolution": rest[0], "aspect_ratio": rest[1]} if self.extra else None
        t6, embedded = self.adaln_single(timestep, added, batch_size=rows, hidden_dtype=text.dtype)
        if self.caption_projection is not None:
            text = self.caption_projection(text).view(rows, -1, dim)
        return t6, embedded, text, _mask_bias(mask, text.dtype)


class _PixArtEncoder(_PixArtCommon):
    def __init__(self, tr: Any, split: int) -> None:
        super().__init__(tr)
        self.pos_embed = tr.pos_embed
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[:split])

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *added: torch.Tensor,
    ) -> torch.Tensor:
        h = self.pos_embed(sample)
        t6, _, text, bias = self.condition(timestep, encoder_hidden_states, encoder_attention_mask, added, h.shape[-1])
        for block in self.blocks:
            h = block(h, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t6)
        return h


class _PixArtDecoder(_PixArtCommon):
    def __init__(self, tr: Any, split: int, latent_hw: tuple[int, int] | None) -> None:
        super().__init__(tr)
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[split:])
        self.scale_shift_table, self.norm_out, self.proj_out = tr.scale_shift_table, tr.norm_out, tr.proj_out
        self.patch, self.out_channels = int(tr.config.patch_size), int(tr.out_channels)
        self.latent_hw = latent_hw

    def text_projections(self) -> list[nn.Module]:
        """What reads only the text rows: the caption projection and every decoder block's
        cross-attention key and value projections (shared across a segment's steps by
        [`StepDecoder`][fd_trt.graphs.split_dit.StepDecoder])."""
        out: list[nn.Module] = [self.caption_projection] if self.caption_projection is not None else []
        for block in self.blocks:
            attn = getattr(block, "attn2", None)
            if attn is not None:
                out.extend(m for m in (getattr(attn, n, None) for n in ("to_k", "to_v")) if m is not None)
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *added: torch.Tensor,
    ) -> torch.Tensor:
        h = tokens
        t6, embedded, text, bias = self.condition(
            timestep, encoder_hidden_states, encoder_attention_mask, added, h.shape[-1]
        )
        for block in self.blocks:
            h = block(h, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t6)
        shift, scale = (self.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.proj_out(h)
        if self.latent_hw is not None:
            hp, wp = self.latent_hw[0] // self.patch, self.latent_hw[1] // self.patch
        else:  # square latents
            hp = wp = int(h.shape[1] ** 0.5)
        return _unpatchify(h, hp, wp, self.patch, self.out_channels)


class StepDecoder(nn.Module):
    """The decoder as the graphs run it: features (tokens; SD3 also its context) and conditioning
    of the key step's N rows, a timestep per step row (``S*N``, step-major); it tiles the N rows S
    times itself and returns the noise channels only (``[S*N, eps_channels, H, W]``).

    PixArt's text is the same at every step of a segment, so its caption projection and the
    decoder blocks' cross-attention keys and values are computed for the N rows once and tiled
    ([`text_rows_shared()`][fd_trt.graphs.split.text_rows_shared]). SD3's context is a propagated
    feature that every joint block updates with the step's own timestep: nothing to share there.

    ``forward(*features, timestep, *cond)`` with ``num_features`` feature tensors first."""

    def __init__(self, decoder: nn.Module, eps_channels: int, num_features: int = 1) -> None:
        super().__init__()
        self.decoder, self.eps_channels, self.num_features = decoder, eps_channels, num_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        k = self.num_features
        feats, timestep, cond = inputs[:k], inputs[k], inputs[k + 1 :]
        s = timestep.shape[0] // feats[0].shape[0]
        tiled = [c.repeat(s, *([1] * (c.dim() - 1))) for c in (*feats, *cond)]
        projections = getattr(self.decoder, "text_projections", None)
        with text_rows_shared(projections() if projections is not None else (), s):
            return self.decoder(*tiled[:k], timestep, *tiled[k:])[:, : self.eps_channels]


@dataclass
class SplitTransformer:
    """A diffusion transformer as encoder (embedding + blocks ``0..N-1``) and decoder (blocks ``N..`` + output).

    Attributes:
        kind: ``"dit"``, ``"pixart"`` or ``"sd3"``.
        split: ``N``, the blocks the encoder runs.
        encoder: ``(sample [R,C,H,W], timestep [R], *cond) -> tokens [R,T,D]`` (SD3: the tuple
            ``(tokens, context [R,L,D])``).
        decoder: ``(*features, timestep [R], *cond) -> output [R,C_out,H,W]`` (``C_out`` is
            ``2C`` for a transformer with learned variance; `eps_channels` are the noise).
        cond_names: the graph names of ``*cond``, in order.
        in_channels: latent channels.
        eps_channels: the output channels that are the noise prediction (the first ones).
        blocks: the transformer's blocks.
        features: the graph names of the features that cross the split (``tokens``; SD3 also
            ``context``).
        pooled_dim: SD3's pooled text width ``P``; ``None`` for the others.
    """

    kind: str
    split: int
    encoder: nn.Module
    decoder: nn.Module
    cond_names: tuple[str, ...]
    in_channels: int
    eps_channels: int
    blocks: int
    features: tuple[str, ...] = (TOKENS,)
    pooled_dim: int | None = None

    def step_decoder(self) -> StepDecoder:
        """The decoder with the graphs' row convention ([`StepDecoder`][fd_trt.graphs.split_dit.StepDecoder])."""
        return StepDecoder(self.decoder, self.eps_channels, len(self.features)).eval()

    def conditioning(self, text: torch.Tensor, added: Any) -> tuple[torch.Tensor, ...]:
        """The ``*cond`` tensors of the graphs from the sampler's ``text`` and ``added``.

        DiT: ``text`` is the class labels ``[rows]``. PixArt: ``text`` is the prompt embeddings and
        ``added`` holds ``encoder_attention_mask`` (and ``resolution``, ``aspect_ratio``). SD3:
        ``text`` is the joint CLIP + T5 embeddings and ``added`` holds ``pooled_projections``.

        Raises:
            InputError: for a missing tensor.
        """
        if self.kind == "dit":
            return (text.long(),)
        missing = [n for n in self.cond_names[1:] if added is None or n not in added]
        if missing:
            what = "SD3" if self.kind == "sd3" else "PixArt"
            raise InputError(f"the {what} transformer needs {missing} per row in the added conditioning")
        return (text, *(added[n] for n in self.cond_names[1:]))


def split_transformer(transformer: Any, split: int, latent_hw: tuple[int, int] | None = None) -> SplitTransformer:
    """Splits a ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel``
    after ``split`` blocks.

    Args:
        transformer: the diffusers transformer (its modules are shared, not copied).
        split: ``N`` in ``0..len(transformer_blocks)``.
        latent_hw: the latent height and width, for non-square PixArt or SD3 latents; square by default.

    Raises:
        UnsupportedModelError: for another transformer class or an option the split does not carry.
        InputError: for ``N`` out of range.
    """
    kind = transformer_kind(transformer)
    split = check_split_point(transformer, split)
    cfg = transformer.config
    in_ch = int(cfg.in_channels)
    out_ch = int(transformer.out_channels)
    eps = in_ch if out_ch == 2 * in_ch else out_ch
    if kind == "sd3":
        from fd_trt.graphs.split_sd3 import split_sd3

        sd3_enc, sd3_dec = split_sd3(transformer, split, latent_hw)
        return SplitTransformer(
            kind,
            split,
            sd3_enc,
            sd3_dec,
            ("encoder_hidden_states", "pooled_projections"),
            in_ch,
            out_ch,
            num_blocks(transformer),
            (TOKENS, CONTEXT),
            int(cfg.pooled_projection_dim),
        )
    if kind == "dit":
        if getattr(cfg, "norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise UnsupportedModelError(f"DiT with norm_type={cfg.norm_type!r}: the split carries ada_norm_zero")
        enc: nn.Module = _DiTEncoder(transformer, split)
        dec: nn.Module = _DiTDecoder(transformer, split)
        names: tuple[str, ...] = ("class_labels",)
    else:
        if getattr(cfg, "norm_type", "ada_norm_single") != "ada_norm_single":
            raise UnsupportedModelError(f"PixArt with norm_type={cfg.norm_type!r}: the split carries ada_norm_single")
        enc = _PixArtEncoder(transformer, split)
        dec = _PixArtDecoder(transformer, split, latent_hw)
        names = ("encoder_hidden_states", "encoder_attention_mask")
        if transformer.use_additional_conditions:
            names += ("resolution", "aspect_ratio")
    return SplitTransformer(kind, split, enc.eval(), dec.eval(), names, in_ch, eps, num_blocks(transformer))


__all__ = [
    "CONTEXT",
    "TOKENS",
    "SplitTransformer",
    "StepDecoder",
    "check_split_point",
    "num_blocks",
    "split_transformer",
    "transformer_kind",
]
