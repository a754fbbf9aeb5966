"""SD3's joint transformer (``SD3Transformer2DModel``) as an encoder and a decoder at block ``N``.

The joint blocks carry two token streams, the image tokens and the text (context) tokens, and both
are propagated:

* encoder ``(sample, timestep, encoder_hidden_states, pooled_projections) -> (tokens, context)``:
  patch and position embedding, the timestep + pooled-text embedding, the context embedder and
  joint blocks ``0..N-1``;
* decoder ``(tokens, context, timestep, [encoder_hidden_states,] pooled_projections) -> output``:
  its own timestep + pooled-text embedding (the pooled text goes to both graphs), joint blocks
  ``N..`` (the last one updates only the image stream) and the final adaLN norm, projection and
  unpatchify. The text embeddings, when passed, are not used (the context carries them): the
  graphs of [`fd_trt.graphs.split_dit.split_transformer()`][fd_trt.graphs.split_dit.split_transformer] pass every row's conditioning
  to both halves.

``decoder(*encoder(x), t, pooled) == transformer(x)`` for every ``N`` in ``0..len(blocks)``
(``tests/test_split_dit.py``). For ``N == len(blocks)`` the context after the last block does not
exist (that block is context-pre-only); the encoder then returns the context entering it, which
the decoder does not use. The ``"sd3"`` family (``StableDiffusion3Pipeline``, docs/guides/dit.md)
runs on this split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fd_trt.errors import UnsupportedModelError
from fd_trt.graphs.split_dit import _unpatchify, check_split_point


class _SD3Encoder(nn.Module):
    def __init__(self, tr: Any, split: int) -> None:
        super().__init__()
        self.pos_embed, self.time_text_embed, self.context_embedder = (
            tr.pos_embed,
            tr.time_text_embed,
            tr.context_embedder,
        )
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[:split])

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pos_embed(sample)
        temb = self.time_text_embed(timestep, pooled)
        ctx = self.context_embedder(text)
        for block in self.blocks:
            new_ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
            ctx = new_ctx if new_ctx is not None else ctx
        return h, ctx


class _SD3Decoder(nn.Module):
    def __init__(self, tr: Any, split: int, latent_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.latent_hw = latent_hw
        self.time_text_embed = tr.time_text_embed
        self.blocks = nn.ModuleList(list(tr.transformer_blocks)[split:])
        self.norm_out, self.proj_out = tr.norm_out, tr.proj_out
        self.patch, self.out_channels = int(tr.config.patch_size), int(tr.out_channels)

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor
    ) -> torch.Tensor:
        temb = self.time_text_embed(timestep, cond[-1])  # the pooled text; the text itself is in the context
        h, ctx = tokens, context
        for block in self.blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
        h = self.proj_out(self.norm_out(h, temb))
        if self.latent_hw is not None:
            hp, wp = self.latent_hw[0] // self.patch, self.latent_hw[1] // self.patch
        else:  # square latents
            hp = wp = int(h.shape[1] ** 0.5)
        return _unpatchify(h, hp, wp, self.patch, self.out_channels)


def split_sd3(transformer: Any, split: int, latent_hw: tuple[int, int] | None = None) -> tuple[nn.Module, nn.Module]:
    """``(encoder, decoder)`` of an ``SD3Transformer2DModel`` split after ``split`` joint blocks.

    Args:
        transformer: the ``SD3Transformer2DModel`` (its modules are shared, not copied).
        split: ``N`` in ``0..len(transformer_blocks)``.
        latent_hw: the latent height and width, for non-square latents; square by default.

    Raises:
        UnsupportedModelError: for another class.
        InputError: for ``N`` out of range.
    """
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise UnsupportedModelError(f"split_sd3 takes an SD3Transformer2DModel, got {type(transformer).__name__}")
    split = check_split_point(transformer, split)
    return _SD3Encoder(transformer, split).eval(), _SD3Decoder(transformer, split, latent_hw).eval()


__all__ = ["split_sd3"]
