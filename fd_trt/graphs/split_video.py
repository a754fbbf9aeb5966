"""Text-to-video UNets -> encoder / decoder torch modules.

Two diffusers denoisers of video latents ``[B, C, F, h, w]`` (F frames) are split here:

* ``UNet3DConditionModel`` (ModelScope / VideoFusion, diffusers' ``TextToVideoSDPipeline``): a
  temporal transformer after ``conv_in`` (``transformer_in``) and temporal convolutions and
  attentions inside every block;
* ``UNetMotionModel`` (AnimateDiff, diffusers' ``AnimateDiffPipeline``): a Stable Diffusion 1.x
  UNet with a motion adapter's temporal transformers inside its blocks.

Both run their blocks on the frames as rows (``[B*F, C, h, w]``, frame-minor) and repeat the
time embedding and the text per frame. The split keeps the rows of the sampler: one row is one
video, all its frames together. The encoder takes ``sample [N, C, F, h, w]``, ``timestep [N]``
and ``encoder_hidden_states [N, L, D]`` (one prompt per video; it is repeated per frame inside,
also for ``UNetMotionModel``, which diffusers' pipeline feeds per frame) and returns the mid
block's output and the skips as ``[N, C', F, h', w']``. The decoder takes them with any row count
M (steps x videos), recomputes the time embedding per row and returns ``[M, C, F, h, w]``. The
reshapes between ``[N, C, F, h, w]`` and ``[N*F, C, h, w]`` move no arithmetic: decoder(encoder(x))
equals the UNet's forward.

Both modules share the UNet's parameters: nothing is copied. The decoder does not share the
repeated rows' work (`fd_trt.graphs.split.SplitUNet.skip_rows_repeated()`): a video decoder
call repeats the same features per step, as the image decoder does, but every row is computed.

The decoder runs its up blocks one up layer at a time (`video_up_layer()`: an up-block resnet
with the temporal layers and attentions that follow it), the arithmetic of the blocks' own
forward, so that the shallow decoder schedules (``deepcache:N``, ``combined:...``;
docs/guides/deepcache-front.md) run on video UNets as on image UNets: the hidden state entering
the last ``k`` up layers is captured at whole-decoder steps (``[N, C, F, h, w]``) and the shallow
steps recompute only those layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fd_trt.core.features import Features
from fd_trt.errors import UnsupportedModelError
from fd_trt.graphs.split import Repeats, ShallowDecoder, SplitUNet, _run_up_layers, reusing_hidden_part

#: The video UNet classes the split carries.
VIDEO_UNET_CLASSES = ("UNet3DConditionModel", "UNetMotionModel")


def video_unet_class(unet_or_config: Any) -> str | None:
    """``"UNet3DConditionModel"``, ``"UNetMotionModel"`` or ``None``: the video UNet class of a model
    (its class name) or of a config (its ``_class_name``)."""
    name = type(unet_or_config).__name__
    if name in VIDEO_UNET_CLASSES:
        return name
    # A model's own attributes are not its config (diffusers warns on config keys read from the model).
    config = getattr(unet_or_config, "config", {}) if isinstance(unet_or_config, nn.Module) else unet_or_config
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    value = get("_class_name", None)
    return value if value in VIDEO_UNET_CLASSES else None


def check_video_config(cfg: Any) -> None:
    """Refuses the video UNet options the split does not carry.

    Raises:
        UnsupportedModelError: naming every option, for a config with an added embedding (an
            SDXL motion UNet), a hidden-state projection (IP-Adapter) or a guidance embedding.
    """
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    problems = [
        f"{key}={get(key)!r}"
        for key in ("addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
        if get(key, None) is not None
    ]
    if problems:
        raise UnsupportedModelError(
            "fd_trt splits text-to-video UNets with text cross-attention only (UNet3DConditionModel, and "
            "UNetMotionModel of a Stable Diffusion 1.x UNet); this one has "
            + ", ".join(problems)
            + ". Use a model without these options."
        )


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, F, h, w]`` -> ``[N*F, C, h, w]`` (frame-minor rows), as the video UNets run their blocks.

    Every dim but the rows is a constant (``int``) of the reshape, so that an exported graph keeps
    them static: a reshape to traced sizes leaves them unknown to ONNX shape inference.
    """
    return x.permute(0, 2, 1, 3, 4).reshape(-1, *(int(d) for d in (x.shape[1], *x.shape[3:])))


def from_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[N*F, C, h, w]`` -> ``[N, C, F, h, w]``, the inverse of `to_frames()` (static dims but the rows, as it)."""
    return x.reshape(-1, int(frames), *(int(d) for d in x.shape[1:])).permute(0, 2, 1, 3, 4)


def _time_embedding(owner: nn.Module, timestep: torch.Tensor, dtype: torch.dtype, frames: int) -> torch.Tensor:
    # The video UNets' forward: time_proj, time_embedding, then one row per frame.
    emb = owner.time_embedding(owner.time_proj(timestep).to(dtype=dtype), None)
    return emb.repeat_interleave(frames, dim=0)


def _block_kwargs(block: nn.Module, text: torch.Tensor, frames: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_frames": frames}
    if getattr(block, "has_cross_attention", False):
        kwargs["encoder_hidden_states"] = text
    return kwargs


class VideoUNetEncoder(nn.Module):
    """conv_in (+ ``transformer_in``) + time embedding + down blocks + mid block of a video UNet.

    ``forward(sample [N,C,F,h,w], timestep [N], encoder_hidden_states [N,L,D]) -> (mid, skip_00, ..)``,
    every output ``[N, C', F, h', w']``.
    """

    added_names: tuple[str, ...] = ()

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_video_config(unet.config)
        self.unet_config = unet.config
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.conv_in = unet.conv_in
        self.transformer_in = getattr(unet, "transformer_in", None)
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        # UNetMotionModel's mid block without motion modules (use_motion_mid_block=False) takes no num_frames.
        self.mid_frames = video_unet_class(unet) == "UNet3DConditionModel" or hasattr(unet.mid_block, "motion_modules")

    @property
    def num_skips(self) -> int:
        return 1 + sum(len(b.resnets) + (len(b.downsamplers) if b.downsamplers else 0) for b in self.down_blocks)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        frames = int(sample.shape[2])
        emb = _time_embedding(self, timestep, sample.dtype, frames)
        text = encoder_hidden_states.repeat_interleave(frames, dim=0)
        x = self.conv_in(to_frames(sample))
        if self.transformer_in is not None:
            x = self.transformer_in(x, num_frames=frames, return_dict=False)[0]
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(hidden_states=x, temb=emb, **_block_kwargs(block, text, frames))
            skips += tuple(res)
        mid_kwargs = _block_kwargs(self.mid_block, text, frames)
        if not self.mid_frames:
            mid_kwargs.pop("num_frames")
        x = self.mid_block(x, emb, **mid_kwargs)
        return tuple(from_frames(t, frames) for t in (x, *skips))


class VideoUNetDecoder(nn.Module):
    """Up blocks + output norm + conv_out of a video UNet, with the time embedding per row.

    ``forward(mid [M,C,F,h,w], skips (M rows each), timestep [M], encoder_hidden_states [M,L,D]) -> [M,C,F,h,w]``.
    """

    added_names: tuple[str, ...] = ()

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_video_config(unet.config)
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.up_blocks = unet.up_blocks
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out
        self.up_factor = 2 ** int(unet.num_upsamplers)

    def forward(
        self,
        mid: torch.Tensor,
        skips: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        return run_video_up_layers(self, mid, skips, timestep, encoder_hidden_states, 0)[0]


def video_up_layer(
    block: nn.Module, j: int, sample: torch.Tensor, emb: torch.Tensor, text: torch.Tensor, frames: int
) -> torch.Tensor:
    """Up layer ``j`` of a video up block (``UpBlock3D``, ``CrossAttnUpBlock3D``, ``UpBlockMotion``,
    ``CrossAttnUpBlockMotion``), after its skip is concatenated: the resnet, then what follows it
    in the block's own forward (temporal convolution, attention, temporal attention; or attention,
    motion module), on ``[N*F, C, h, w]`` rows.

    FreeU, where enabled, is applied before (`fd_trt.graphs.split._run_up_layers`).
    """
    sample = block.resnets[j](sample, emb)
    if hasattr(block, "temp_convs"):
        sample = block.temp_convs[j](sample, num_frames=frames)
    if hasattr(block, "attentions"):
        sample = block.attentions[j](sample, encoder_hidden_states=text, return_dict=False)[0]
    if hasattr(block, "temp_attentions"):
        sample = block.temp_attentions[j](sample, num_frames=frames, return_dict=False)[0]
    if hasattr(block, "motion_modules"):
        sample = block.motion_modules[j](sample, num_frames=frames)
    return sample


def run_video_up_layers(
    decoder: VideoUNetDecoder,
    hidden: torch.Tensor,
    skips: Sequence[torch.Tensor],
    timestep: torch.Tensor,
    text: torch.Tensor,
    start: int,
    capture: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Up layers ``start ..`` of a video decoder from ``hidden`` (``[M, C, F, h, w]``, the state
    entering layer ``start``; the mid block's output for ``start=0``), with the time embedding and
    the text per frame.

    Returns:
        ``(noise_pred [M, C, F, h, w], {layer: hidden state entering it, [M, C', F, h', w']})``.
    """
    frames = int(hidden.shape[2])
    emb = _time_embedding(decoder, timestep, hidden.dtype, frames)
    text = text.repeat_interleave(frames, dim=0)
    layer = functools.partial(video_up_layer, frames=frames)
    out, caught = _run_up_layers(
        decoder, to_frames(hidden), [to_frames(s) for s in skips], emb, text, start, capture, layer=layer
    )
    return from_frames(out, frames), {f: from_frames(h, frames) for f, h in caught.items()}


class VideoShallowDecoder(ShallowDecoder):
    """The last ``depth`` up layers of a video decoder ([`ShallowDecoder`][fd_trt.graphs.split.ShallowDecoder]'s interface):
    ``forward(hidden [M,C,F,h,w], skip_00 .. skip_{depth-1} (M rows each), timestep [M],
    encoder_hidden_states [M,L,D]) -> [M,C,F,h,w]``."""

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        skips, (timestep, text) = args[: self.depth], args[self.depth :]
        with reusing_hidden_part(self.decoder, self.start, hidden):
            return run_video_up_layers(self.decoder, hidden, skips, timestep, text, self.start)[0]  # type: ignore[arg-type]


class VideoSplitUNet(SplitUNet):
    """The two halves of a video UNet ([`SplitUNet`][fd_trt.graphs.split.SplitUNet]'s interface: ``run_encoder``,
    ``run_decoder``, ``run_decoder_steps``, and the shallow decoder's ``run_decoder_capture``,
    ``run_decoder_shallow``, ``run_input_conv``); rows are videos, features ``[N, C, F, h, w]``.

    The row-sharing blocks are no-ops.
    """

    @contextlib.contextmanager
    def text_rows_repeated(self, repeats: Repeats) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def skip_rows_repeated(self, repeats: Repeats, skip_channels: Sequence[int]) -> Iterator[None]:
        yield

    def shallow_decoder(self, depth: int) -> VideoShallowDecoder:
        """The video decoder's last ``depth`` up layers as a module ([`VideoShallowDecoder`][fd_trt.graphs.split_video.VideoShallowDecoder])."""
        return VideoShallowDecoder(self.decoder, depth)  # type: ignore[arg-type]

    def _decode_capturing(
        self,
        features: Features,
        timestep: torch.Tensor,
        text: torch.Tensor,
        extra: Sequence[torch.Tensor],
        capture: Sequence[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return run_video_up_layers(self.decoder, features.mid, features.skips, timestep, text, 0, capture)  # type: ignore[arg-type]

    def run_input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        """``conv_in`` (and ``transformer_in``) of the video latents ``[N, C, F, h, w]``: the encoder's first
        skip, ``skip_00``, as ``[N, C', F, h, w]``."""
        enc = self.encoder
        frames = int(sample.shape[2])
        x = enc.conv_in(to_frames(sample))
        if enc.transformer_in is not None:
            x = enc.transformer_in(x, num_frames=frames, return_dict=False)[0]
        return from_frames(x, frames)


def split_video_unet(unet: nn.Module) -> VideoSplitUNet:
    """Splits a diffusers ``UNet3DConditionModel`` or ``UNetMotionModel`` into encoder and decoder.

    Returns:
        A [`VideoSplitUNet`][fd_trt.graphs.split_video.VideoSplitUNet] whose modules share the UNet's weights.
        ``from_frames``-shaped ``decoder(encoder(x, t, e), t, e)`` equals ``unet(x, t, e)`` (for
        ``UNetMotionModel``, diffusers' ``e`` repeated per frame).

    Raises:
        UnsupportedModelError: for another UNet class, or options the split does not carry.
    """
    if video_unet_class(unet) is None:
        raise UnsupportedModelError(
            f"split_video_unet splits {' and '.join(VIDEO_UNET_CLASSES)}, got a {type(unet).__name__}"
        )
    return VideoSplitUNet(VideoUNetEncoder(unet).eval(), VideoUNetDecoder(unet).eval())  # type: ignore[arg-type]


__all__ = [
    "VIDEO_UNET_CLASSES",
    "VideoShallowDecoder",
    "VideoSplitUNet",
    "VideoUNetDecoder",
    "VideoUNetEncoder",
    "check_video_config",
    "from_frames",
    "run_video_up_layers",
    "split_video_unet",
    "to_frames",
    "video_unet_class",
    "video_up_layer",
]
