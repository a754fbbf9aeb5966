"""UNet -> encoder / decoder torch modules. The one place in fd_trt that knows UNet internals.

The encoder is conv_in, the time embedding, the down blocks and the mid block. It returns the
mid-block output and the skip features (conv_in output first), which is everything the up path
needs. The decoder is the up blocks, the output norm and conv_out; it recomputes the time
embedding from its own per-row timesteps, so that one decoder call can mix the steps of a
segment (docs/design.md section 3).

SDXL-style UNets (``addition_embed_type="text_time"``) add an embedding of the pooled text and the
micro-conditioning ``time_ids`` to the time embedding. Both halves take that conditioning per row
(``added = {"text_embeds": [N,P], "time_ids": [N,K]}``) and compute it as diffusers does, so the
decoder's rows stay independent of the encoder's.

DeepFloyd IF's UNets (``addition_embed_type="text"``, ``encoder_hid_dim_type="text_proj"``) add an
attention pooling of the raw prompt embeddings to the time embedding and project the prompt to
the cross-attention width. Neither depends on the timestep: [`TextConditioning`][fd_trt.graphs.split.TextConditioning] computes both
once per generation, and both halves take the projected prompt as their text and the pooled one
per row as the added input ``text_pooled [N,E]``. IF stage II
(``class_embed_type="timestep"``) also adds the embedding of its noise level, which both halves
take per row as the last added input (``class_labels [N,1]``).

Both modules share the UNet's parameters: nothing is copied.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fd_trt.core.features import Added, Features, added_tensors
from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.graphs.contract import ADDED_CONDITIONING, added_input_names, feature_tails

#: The one ``encoder_hid_dim_type`` the split carries: a linear projection of the prompt (DeepFloyd IF).
TEXT_PROJ = "text_proj"


def check_supported(unet: nn.Module) -> None:
    """Raises [`UnsupportedModelError`][fd_trt.errors.UnsupportedModelError] when the UNet uses a feature the split does not carry.

    It reads only the config, so a caller can check a model before its weights load.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or anything with its ``config``).
    """
    check_supported_config(unet.config)


def check_supported_config(cfg: Any) -> None:
    """[`check_supported()`][fd_trt.graphs.split.check_supported] on a UNet config alone (a ``FrozenDict``, a namespace or a dict).

    Raises:
        UnsupportedModelError: naming every option the split does not carry.
    """
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    problems = []
    carried = {"encoder_hid_dim_type": TEXT_PROJ}
    if get("addition_embed_type", None) == "text":
        # IF stage II: the noise level, whose class labels a stage-II pipeline supplies (no other does).
        carried["class_embed_type"] = "timestep"
    for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim", "num_class_embeds"):
        if get(key, None) is not None and get(key) != carried.get(key):
            problems.append(f"{key}={get(key)!r}")
    if get("addition_embed_type", None) not in ADDED_CONDITIONING:
        problems.append(f"addition_embed_type={get('addition_embed_type')!r}")
    elif get("addition_embed_type", None) == "text" and get("encoder_hid_dim", None) is None:
        problems.append("addition_embed_type='text' without encoder_hid_dim (DeepFloyd IF's projection of T5)")
    if get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        problems.append("mid_block_type=None")
    if problems:
        raise UnsupportedModelError(
            "fd_trt splits SD 1.x/2.x-, SDXL- and DeepFloyd IF-style UNets (text cross-attention, optionally SDXL's "
            "addition_embed_type='text_time' or IF's 'text' with encoder_hid_dim_type='text_proj', and, with the latter, IF "
            "stage II's class_embed_type='timestep'); this UNet has "
            + ", ".join(problems)
            + ". Use a UNet2DConditionModel without these options."
        )


def _take_time_modules(owner: nn.Module, unet: nn.Module) -> None:
    # The attribute names match the UNet's, so the graphs' initializer names (which refit
    # matches on) are the UNet's parameter names.
    owner.time_proj = unet.time_proj
    owner.time_embedding = unet.time_embedding
    owner.time_embed_act = unet.time_embed_act
    owner.added_names = added_input_names(unet.config)
    # SDXL: text_embeds and time_ids, the first added inputs.
    owner.text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if owner.text_time:
        owner.add_time_proj = unet.add_time_proj
        owner.add_embedding = unet.add_embedding
    # DeepFloyd IF stage II: class_labels (the noise level), the last added input, embedded as a
    # timestep by time_proj and class_embedding.
    owner.class_labelled = getattr(unet.config, "class_embed_type", None) == "timestep"
    owner.class_concat = bool(getattr(unet.config, "class_embeddings_concat", False))
    if owner.class_labelled:
        owner.class_embedding = unet.class_embedding
    # DeepFloyd IF: the time embedding adds an attention pooling of the raw prompt embeddings
    # (addition_embed_type="text"). It does not depend on the timestep: TextConditioning computes
    # it once per generation, with the prompt's projection, and both halves take it per row (the
    # added input text_pooled), with the projected prompt as their text.
    owner.text_pooled = getattr(unet.config, "addition_embed_type", None) == "text"


class TextConditioning(nn.Module):
    """DeepFloyd IF's text conditioning, which does not depend on the timestep: the attention
    pooling of the raw T5 embeddings (``add_embedding``, added to the time embedding) and their
    projection to the cross-attention width (``encoder_hid_proj``).

    ``forward(raw [N,L,D_t5]) -> (projected [N,L,D], pooled [N,E])``: the graphs'
    ``encoder_hidden_states`` and ``text_pooled``. The pipeline computes it once per generation;
    UNet2DConditionModel's forward does the same arithmetic at every call. Shares the UNet's
    parameters.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        if (
            getattr(unet.config, "addition_embed_type", None) != "text"
            or getattr(unet, "encoder_hid_proj", None) is None
        ):
            raise UnsupportedModelError(
                "TextConditioning is DeepFloyd IF's (addition_embed_type='text' with encoder_hid_proj); this UNet has "
                f"addition_embed_type={getattr(unet.config, 'addition_embed_type', None)!r}"
            )
        self.add_embedding = unet.add_embedding
        self.encoder_hid_proj = unet.encoder_hid_proj

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder_hid_proj(text), self.add_embedding(text)


def _time_embedding(
    owner: nn.Module,
    timestep: torch.Tensor,
    dtype: torch.dtype,
    added: Sequence[torch.Tensor],
    text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Same arithmetic as UNet2DConditionModel's get_time_embed + time_embedding + get_class_embed
    # ("timestep") + get_aug_embed ("text_time", "text") + time_embed_act +
    # process_encoder_hidden_states, but with one timestep and one added conditioning per row. Returns the embedding and the text the blocks read.
    emb = owner.time_embedding(owner.time_proj(timestep).to(dtype=dtype), None)
    if owner.class_labelled:
        *added, class_labels = added
        labels = owner.time_proj(class_labels.reshape(-1)).to(dtype=dtype)
        class_emb = owner.class_embedding(labels).to(dtype)
        emb = torch.cat([emb, class_emb], dim=-1) if owner.class_concat else emb + class_emb
    if owner.text_time:
        text_embeds, time_ids = added
        time_embeds = owner.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        emb = emb + owner.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    elif owner.text_pooled:  # IF: the pooled prompt (TextConditioning), before the activation
        emb = emb + added[0].to(emb.dtype)
    if owner.time_embed_act is not None:
        emb = owner.time_embed_act(emb)
    return emb, text


#: How many times a decoder call repeats its distinct rows: an ``int``, or the traced 0-d tensor
#: S while the decoder graph is traced ([`SplitUNet.run_decoder_steps()`][fd_trt.graphs.split.SplitUNet.run_decoder_steps]).
Repeats = int | torch.Tensor

#: Rows per distinct text row in the current decoder call ([`SplitUNet.text_rows_repeated()`][fd_trt.graphs.split.SplitUNet.text_rows_repeated]);
#: a context variable, so that concurrent calls on other threads are not affected.
_TEXT_ROW_REPEATS: contextvars.ContextVar[Repeats] = contextvars.ContextVar("fd_trt_text_row_repeats", default=1)
#: Serializes installing the hooks: two threads hooking one module twice would slice its rows twice.
_HOOK_LOCK = threading.Lock()


#: The decoder shares the repeated rows' work ([`SplitUNet.run_decoder_steps()`][fd_trt.graphs.split.SplitUNet.run_decoder_steps] in the graphs,
#: [`SplitUNet.skip_rows_repeated()`][fd_trt.graphs.split.SplitUNet.skip_rows_repeated] and [`SplitUNet.text_rows_repeated()`][fd_trt.graphs.split.SplitUNet.text_rows_repeated] on torch) only
#: when every UNet block is at least this wide: on narrow convolutions the split's slices, adds
#: and (ONNX Runtime) layout reorders cost more than the skip half they save. Measured on a 2-core
#: AMD EPYC, unshared / shared time of calls of 2 rows x 5-10 steps (README, "Design choices and
#: measurements"; ``scripts/experiments/row_sharing_widths.py``), UNets of SD1.5's layout at 32x32 latents:
#: ONNX Runtime 128-256 channels 1.09-1.10, 96-384 1.03-1.11, 64-256 0.995-1.09 (two runs), the
#: default model (32-128) 0.96-1.01; torch 128-256 1.07-1.14, 96-384 1.04-1.17, 64-256 1.01-1.04,
#: the default model at 16x16 0.92-0.96 (its whole run 5% slower shared). One-step calls are slower shared:
#: up to 7% from 64 channels on, 10-16% on the default model.
ROW_SHARING_MIN_CHANNELS = 96


def decoder_shares_rows(config: Any) -> bool:
    """Whether the decoder of a UNet with this config shares the repeated rows' work (all
    ``block_out_channels`` at least `ROW_SHARING_MIN_CHANNELS`); ``config`` is the UNet's
    config or a dict of it."""
    channels = (
        config.get("block_out_channels") if isinstance(config, dict) else getattr(config, "block_out_channels", None)
    )
    return bool(channels) and min(int(c) for c in channels) >= ROW_SHARING_MIN_CHANNELS


def _sharing_off(repeats: Repeats) -> bool:
    """Whether rows are not shared: ``repeats`` is an ``int`` of at most 1. While the decoder graph
    is traced it is a traced 0-d tensor (the graph's S), and sharing is always on."""
    return isinstance(repeats, int) and repeats <= 1


def _fixed_tail(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself in eager mode. While a graph is traced, ``x`` reshaped to ``[-1, *tail]`` with
    its dims after the rows as constants: a Tile or Reshape by a traced row count leaves every dim
    unknown to ONNX shape inference, and the graph's output would lose its static shape."""
    if not torch.jit.is_tracing():
        return x
    return x.reshape(-1, *(int(d) for d in x.shape[1:]))


def _project_first_rows(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    r = _TEXT_ROW_REPEATS.get()
    if _sharing_off(r):
        return None
    x = args[0]
    if isinstance(r, int) and x.shape[0] % r:
        raise InputError(f"{x.shape[0]} text rows cannot be {r} repeats of the same rows")
    return (x[: x.shape[0] // r], *args[1:])


def _tile_projection(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
    r = _TEXT_ROW_REPEATS.get()
    return None if _sharing_off(r) else _fixed_tail(out.repeat(r, *([1] * (out.ndim - 1))))


def _unhook_text_projection(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for k in [k for k, fn in hooks.items() if fn in (_project_first_rows, _tile_projection)]:
            del hooks[k]
    module._fd_trt_text_rows_hooked = False


def _hook_text_projection(module: nn.Module) -> None:
    """Installs, once per module, the hooks that project the distinct text rows only. Outside
    [`SplitUNet.text_rows_repeated()`][fd_trt.graphs.split.SplitUNet.text_rows_repeated] they do nothing, so the UNet's other users (diffusers,
    the graph export) see the module unchanged.

    Only the outermost projection keeps them: when LoRA wraps a hooked ``Linear`` in a layer of
    its own, the inner one's hooks are removed (slicing twice would drop rows).
    """
    if getattr(module, "_fd_trt_text_rows_hooked", False):
        return
    for inner in module.modules():
        if inner is not module and getattr(inner, "_fd_trt_text_rows_hooked", False):
            _unhook_text_projection(inner)
    module.register_forward_pre_hook(_project_first_rows)
    module.register_forward_hook(_tile_projection)
    module._fd_trt_text_rows_hooked = True


@contextlib.contextmanager
def text_rows_shared(modules: Sequence[nn.Module], repeats: Repeats) -> Iterator[None]:
    """Within the block, each of ``modules`` (projections that read only text rows tiled
    ``repeats`` times, step-major) projects the first ``rows / repeats`` rows and tiles its output:
    the same numbers with ``1 / repeats`` of the work. Outside the block the hooks do nothing.
    ``repeats`` 1 turns it off; a traced 0-d tensor (a graph's S) keeps it on.

    Used by [`SplitUNet.text_rows_repeated()`][fd_trt.graphs.split.SplitUNet.text_rows_repeated] and by the
    PixArt decoder (its caption projection and cross-attention keys and values)."""
    if _sharing_off(repeats):
        yield
        return
    with _HOOK_LOCK:
        for module in modules:
            _hook_text_projection(module)
    token = _TEXT_ROW_REPEATS.set(repeats if isinstance(repeats, torch.Tensor) else int(repeats))
    try:
        yield
    finally:
        _TEXT_ROW_REPEATS.reset(token)


#: Rows per distinct feature row in the current decoder call ([`SplitUNet.skip_rows_repeated()`][fd_trt.graphs.split.SplitUNet.skip_rows_repeated]).
_SKIP_ROW_REPEATS: contextvars.ContextVar[Repeats] = contextvars.ContextVar("fd_trt_skip_row_repeats", default=1)
#: The output a periodic convolution computed in its pre-hook, handed to its forward hook (per thread).
_PERIODIC_OUT = threading.local()


def _periodic_conv_pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Computes the convolution from the periodic split of its input channels (see
    `_periodic_split()`) and lets the module itself run on zero rows."""
    r = _SKIP_ROW_REPEATS.get()
    b = getattr(module, "_fd_trt_periodic_from", None)
    x = args[0]
    if _sharing_off(r) or b is None or x.ndim != 4 or (isinstance(r, int) and x.shape[0] % r) or not 0 < b < x.shape[1]:
        return None
    out = _periodic_split(module, x, int(b), r)
    outs = getattr(_PERIODIC_OUT, "outs", None)
    if outs is None:
        outs = _PERIODIC_OUT.outs = {}
    outs[id(module)] = out
    return (x[:0], *args[1:])


def _periodic_conv_post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
    outs = getattr(_PERIODIC_OUT, "outs", None)
    return None if not outs else outs.pop(id(module), None)


def _periodic_split(conv: nn.Conv2d, x: torch.Tensor, b: int, repeats: Repeats) -> torch.Tensor:
    """``conv(x)`` where input channels ``b:`` repeat with period ``N = M / repeats`` along the rows.

    A convolution is a sum over input channels, so it splits into the part over the first ``b``
    channels (all M rows) and the part over the rest, computed on the first N rows only (with the
    bias) and tiled: the same sum, added in another order.
    """
    n = x.shape[0] // repeats
    w = conv.weight
    var = torch.nn.functional.conv2d(x[:, :b], w[:, :b], None, conv.stride, conv.padding, conv.dilation)
    inv = torch.nn.functional.conv2d(x[:n, b:], w[:, b:], conv.bias, conv.stride, conv.padding, conv.dilation)
    if var.dtype != torch.float32 and not torch.jit.is_tracing():  # one rounding of the sum, not two
        return (var.float().unflatten(0, (repeats, n)) + inv.float()).flatten(0, 1).to(var.dtype)
    if torch.jit.is_tracing():  # an ONNX graph has no views: an in-place add to one would be lost
        return _fixed_tail((var.unflatten(0, (repeats, n)) + inv).flatten(0, 1))
    var.unflatten(0, (repeats, n)).add_(inv)  # in place: no second buffer of M rows to fault in
    return var


def _splittable_conv(conv: Any) -> bool:
    """Whether ``conv`` is a plain ``Conv2d`` whose sum over input channels the hooks may split.
    Other layers (LoRA wrappers, grouped or padded-mode convolutions) compute the ordinary way."""
    return type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"


def _install_hooks(conv: nn.Module, flag: str, pre: Callable[..., Any], post: Callable[..., Any]) -> None:
    """Registers ``pre`` and ``post`` on ``conv`` once (``flag`` marks it; the callers hold `_HOOK_LOCK`)."""
    if not getattr(conv, flag, False):
        conv.register_forward_pre_hook(pre)
        conv.register_forward_hook(post)
        setattr(conv, flag, True)


def _cat_resnet_group(resnet: nn.Module, boundary: int) -> int | None:
    """The GroupNorm group size of an up-block resnet whose input is ``cat(h, skip)`` split at
    channel ``boundary`` (``h`` before it); ``None`` where the hooks do not apply (no GroupNorm
    ``norm1`` or ``conv1``, an up- or downsampling resnet, a boundary outside the channels)."""
    norm, conv1 = getattr(resnet, "norm1", None), getattr(resnet, "conv1", None)
    if (
        not isinstance(norm, nn.GroupNorm)
        or conv1 is None
        or getattr(resnet, "upsample", None) is not None
        or getattr(resnet, "downsample", None) is not None
    ):
        return None
    c = int(norm.num_channels)
    if not 0 < boundary < c or c % norm.num_groups:
        return None
    return c // int(norm.num_groups)


def _hook_periodic_conv(conv: Any, boundary: int) -> None:
    """Marks a plain ``Conv2d`` whose input channels ``boundary:`` carry the (repeated) skip, and
    installs its hooks once."""
    if not _splittable_conv(conv):
        return
    conv._fd_trt_periodic_from = int(boundary)
    _install_hooks(conv, "_fd_trt_periodic_hooked", _periodic_conv_pre, _periodic_conv_post)


def _hook_up_resnet(resnet: nn.Module, skip_channels: int) -> None:
    """Hooks the two convolutions of an up-block resnet that read its skip half.

    The resnet's input is ``cat(h, skip)``. ``conv_shortcut`` reads it raw, so its channels from
    ``C - skip_channels`` on repeat with the skip. ``conv1`` reads ``act(norm1(x))``: a GroupNorm
    normalizes each row and group on its own, so only the groups that lie wholly inside the skip
    channels repeat; a group straddling the boundary mixes in ``h`` and is computed per row.
    """
    c = int(getattr(getattr(resnet, "norm1", None), "num_channels", 0))
    c0 = c - int(skip_channels)
    g = _cat_resnet_group(resnet, c0)
    if g is None:
        return
    conv1 = resnet.conv1
    first_whole_group = -(-c0 // g) * g
    if first_whole_group < c:
        _hook_periodic_conv(conv1, first_whole_group)
    shortcut = getattr(resnet, "conv_shortcut", None)
    if shortcut is not None and getattr(shortcut, "kernel_size", None) == (1, 1):
        _hook_periodic_conv(shortcut, c0)


#: While a shallow decoder call runs on torch: the hidden state it starts from, and for the
#: convolutions of its first layer's resnet, the input channels that derive from that hidden state
#: alone (``{id(conv): boundary}``); ``None`` otherwise (per thread and task).
_SHALLOW_START: contextvars.ContextVar[tuple[torch.Tensor, dict[int, int]] | None] = contextvars.ContextVar(
    "fd_trt_shallow_start", default=None
)
#: Per convolution: ``(weak reference to the hidden state, weight, key, the input channels it
#: convolved, their part of the output)``. An entry goes with its hidden state: when the sampler
#: drops that (at the end of its segment), the kept tensors are freed.
_HIDDEN_PARTS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()
#: The output a shallow-start convolution computed in its pre-hook, handed to its forward hook.
_SHALLOW_OUT = threading.local()


@contextlib.contextmanager
def _hooks_on(var: contextvars.ContextVar[Any], value: Any, handoff: threading.local) -> Iterator[None]:
    """Sets ``var`` (what the convolution hooks read) for the block; afterwards drops any output a
    pre-hook left in ``handoff`` for a forward hook that did not run (an exception in between)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
        outs = getattr(handoff, "outs", None)
        if outs:
            outs.clear()


def _forget_hidden_part(conv_ref: weakref.ref[nn.Module], hidden_ref: weakref.ref[torch.Tensor]) -> None:
    """Drops the part kept for a hidden state that no longer exists."""
    conv = conv_ref()
    kept = None if conv is None else _HIDDEN_PARTS.get(conv)
    if kept is not None and kept[0] is hidden_ref:
        _HIDDEN_PARTS.pop(conv, None)


def _hidden_part(conv: nn.Conv2d, x: torch.Tensor, b: int, hidden: torch.Tensor) -> torch.Tensor:
    """``conv`` over input channels ``:b`` (no bias), kept from an earlier call whose channels
    ``:b`` were equal to these (compared exactly) with the same, unchanged weight."""
    xb, w = x[:, :b], conv.weight
    if w.is_inference():  # no version counter: nothing tells a weight changed in place
        return torch.nn.functional.conv2d(xb, w[:, :b], None, conv.stride, conv.padding, conv.dilation)
    key = (w._version, w.data_ptr(), tuple(xb.shape), xb.dtype, xb.device)
    kept = _HIDDEN_PARTS.get(conv)
    if kept is not None and kept[1] is w and kept[2] == key and torch.equal(kept[3], xb):
        return kept[4]
    out = torch.nn.functional.conv2d(xb, w[:, :b], None, conv.stride, conv.padding, conv.dilation)
    ref = weakref.ref(hidden, functools.partial(_forget_hidden_part, weakref.ref(conv)))
    _HIDDEN_PARTS[conv] = (ref, w, key, xb.clone(), out)
    return out


def _shallow_conv_pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """In a shallow decoder call's first layer: ``conv(x)`` as the part over the hidden state's
    channels, kept from the last call that read the same values there (every shallow step that
    reuses one cached hidden state), plus the part over the skip's channels, computed on half the
    rows when the two halves of the rows are equal there (the conditional and unconditional rows of
    CFG read one ``conv_in`` output). The same sum, added in another order. The module itself runs
    on zero rows."""
    ctx = _SHALLOW_START.get()
    x = args[0]
    b = None if ctx is None else ctx[1].get(id(module))
    if ctx is None or b is None or x.ndim != 4 or not 0 < b < x.shape[1]:
        return None
    w = module.weight
    rest = x[:, b:]
    m = x.shape[0]
    conv = torch.nn.functional.conv2d
    if m % 2 == 0 and torch.equal(rest[: m // 2], rest[m // 2 :]):
        part = conv(rest[: m // 2], w[:, b:], module.bias, module.stride, module.padding, module.dilation)
        part = part.repeat(2, 1, 1, 1)
    else:
        part = conv(rest, w[:, b:], module.bias, module.stride, module.padding, module.dilation)
    outs = getattr(_SHALLOW_OUT, "outs", None)
    if outs is None:
        outs = _SHALLOW_OUT.outs = {}
    outs[id(module)] = _hidden_part(module, x, b, ctx[0]) + part
    return (x[:0], *args[1:])


def _shallow_conv_post(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
    outs = getattr(_SHALLOW_OUT, "outs", None)
    return None if not outs else outs.pop(id(module), None)


def _shallow_start_bounds(resnet: nn.Module, hidden_channels: int) -> dict[int, int]:
    """``{id(conv): boundary}`` for the convolutions of an up-layer resnet whose leading input
    channels derive from the hidden state alone (its input is ``cat(hidden, skip)``), hooking them
    once: ``conv_shortcut`` reads the input raw (``hidden_channels``); ``conv1`` reads
    ``act(norm1(x))``, and only the GroupNorm groups wholly inside the hidden channels do."""
    g = _cat_resnet_group(resnet, hidden_channels)
    if g is None:
        return {}
    bounds = {}
    convs = ((resnet.conv1, hidden_channels // g * g), (getattr(resnet, "conv_shortcut", None), hidden_channels))
    for conv, b in convs:
        if not _splittable_conv(conv) or b <= 0:
            continue
        if not getattr(conv, "_fd_trt_shallow_hooked", False):  # every call gets here: no lock once hooked
            with _HOOK_LOCK:
                _install_hooks(conv, "_fd_trt_shallow_hooked", _shallow_conv_pre, _shallow_conv_post)
        bounds[id(conv)] = b
    return bounds


#: A shallow step keeps the hidden half of its first convolutions ([`reusing_hidden_part()`][fd_trt.graphs.split.reusing_hidden_part])
#: only where that half of ``conv1`` is at least this many multiply-adds per row: below it, the
#: split's slices, comparisons and adds cost more than they save. Measured on a 2-core AMD EPYC (AVX-512), 2
#: threads, one shallow call of 2 rows, time without / with (``scripts/experiments/shallow_reuse.py``):
#: the default model at 64x64 (2.4 M per row) 0.88x, at 128x128 (9.4 M) 0.97x, at 256x256 (38 M)
#: 1.10-1.20x (two runs); sd15-arch at 256x256 (943 M) 1.32x.
SHALLOW_REUSE_MIN_MACS = 20_000_000


@contextlib.contextmanager
def reusing_hidden_part(dec: nn.Module, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a shallow decoder call from ``hidden`` (entering up layer ``start``)
    convolves the hidden state's half of that layer's resnet input once per hidden state, not once
    per step. Every shallow step that reuses one cached hidden state concatenates its own skip to
    the same hidden channels, so ``conv1`` (over the GroupNorm groups wholly inside them) and
    ``conv_shortcut`` would convolve the same values again at each step. The part is kept while
    those input values are equal to the last call's (compared exactly, each call), the weight is
    unchanged and ``hidden`` exists; within a call, the skip's half is convolved once for two equal halves of the rows
    (CFG). Torch on the CPU only: while a graph is traced or compiled, and on a GPU, it does nothing."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or hidden.device.type != "cpu":
        yield  # on a GPU its exact comparisons would wait for the device at every step (not measured there)
        return
    i, j = up_layers(dec.up_blocks)[start]
    resnet = dec.up_blocks[i].resnets[j]
    conv1 = getattr(resnet, "conv1", None)
    kept_macs = (  # per row: a video row's frames included
        hidden[:1, :1].numel() * int(hidden.shape[1]) * conv1.out_channels * conv1.weight[0, 0].numel()
        if isinstance(conv1, nn.Conv2d)
        else 0
    )
    bounds = _shallow_start_bounds(resnet, int(hidden.shape[1])) if kept_macs >= SHALLOW_REUSE_MIN_MACS else {}
    if not bounds:
        yield
        return
    with _hooks_on(_SHALLOW_START, (hidden, bounds), _SHALLOW_OUT):
        yield


class UNetEncoder(nn.Module):
    """conv_in + time embedding + down blocks + mid block.

    ``forward(sample [N,C,h,w], timestep [N], encoder_hidden_states [N,L,D], *added) -> (mid, skip_00, ..)``,
    where ``added`` are the UNet's added-conditioning tensors in [`added_input_names()`][fd_trt.graphs.contract.added_input_names] order
    (SDXL: ``text_embeds [N,P]``, ``time_ids [N,K]``; none for SD 1.x/2.x).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_supported(unet)
        self.unet_config = unet.config
        _take_time_modules(self, unet)
        self.conv_in = unet.conv_in
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block

    @property
    def num_skips(self) -> int:
        return 1 + sum(len(b.resnets) + (len(b.downsamplers) if b.downsamplers else 0) for b in self.down_blocks)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *added: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if self.unet_config.center_input_sample:
            sample = 2 * sample - 1.0
        emb, encoder_hidden_states = _time_embedding(self, timestep, sample.dtype, added, encoder_hidden_states)
        sample = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += tuple(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = self.mid_block(sample, emb)
        return (sample, *skips)


class UNetDecoder(nn.Module):
    """Up blocks + output norm + conv_out, with the time embedding recomputed per row.

    ``forward(mid [M,..], skips (M rows each), timestep [M], encoder_hidden_states [M,L,D], *added) -> noise_pred``

    The decoder takes features already expanded to M rows: the graph contract (docs/design.md section 3)
    wants every input to carry the row axis, and the expansion is a cheap tile done by the runner.
    SDXL's added conditioning comes per row too, because the time embedding includes it.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_supported(unet)
        _take_time_modules(self, unet)
        self.up_blocks = unet.up_blocks
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out
        self.up_factor = 2 ** int(unet.num_upsamplers)

    def text_projections(self) -> list[nn.Module]:
        """The key and value projections that read the text: those of every cross-attention
        (``to_k``, ``to_v``, or the fused ``to_kv``), looked up afresh (LoRA may have wrapped them)."""
        out = []
        for module in self.up_blocks.modules():
            if getattr(module, "add_k_proj", None) is not None:
                # Added key/value attention (IF's SimpleCrossAttn blocks): to_k / to_v read the image
                # tokens; add_k_proj / add_v_proj read the (normalized) text.
                out.extend(m for m in (module.add_k_proj, module.add_v_proj) if m is not None)
            elif getattr(module, "is_cross_attention", False):
                out.extend(m for m in (getattr(module, n, None) for n in ("to_k", "to_v", "to_kv")) if m is not None)
        return out

    def forward(
        self,
        mid: torch.Tensor,
        skips: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *added: torch.Tensor,
    ) -> torch.Tensor:
        emb, encoder_hidden_states = _time_embedding(self, timestep, mid.dtype, added, encoder_hidden_states)
        res_all = tuple(skips)
        forward_upsample_size = any(int(d) % self.up_factor != 0 for d in res_all[0].shape[-2:])
        upsample_size = None
        # FreeU scales the first up block's input in place: the propagated features must not change.
        sample = mid.clone() if freeu_on(self.up_blocks[0]) else mid
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, res_all = res_all[-n:], res_all[:-n]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = res_all[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=encoder_hidden_states,
                    upsample_size=upsample_size,
                )
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if self.conv_norm_out is not None:
            sample = self.conv_norm_out(sample)
            sample = self.conv_act(sample)
        return self.conv_out(sample)


def up_layers(up_blocks: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """The decoder's up layers in the order they run: ``(block, resnet)`` pairs, one per up-block
    resnet (with its attention, and the block's upsampler after its last resnet). Layer ``f`` of
    ``L`` reads skip ``L - 1 - f``: the last layer reads the ``conv_in`` output."""
    return [(i, j) for i, block in enumerate(up_blocks) for j in range(len(block.resnets))]


def _up_layer(block: nn.Module, j: int, sample: torch.Tensor, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Up layer ``j`` of an image UNet's up block: its resnet, then its attention."""
    from diffusers.models.attention_processor import Attention  # diffusers is imported lazily

    sample = block.resnets[j](sample, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        attention = attentions[j]
        if isinstance(attention, Attention):  # IF's SimpleCrossAttnUpBlock2D: a bare attention
            sample = attention(sample, encoder_hidden_states=text)
        else:  # a Transformer2DModel
            sample = attention(sample, encoder_hidden_states=text, return_dict=False)[0]
    return sample


#: The up blocks whose forward applies FreeU (``unet.enable_freeu``) to each layer's input and skip.
FREEU_BLOCKS = (
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "UpBlock3D",
    "CrossAttnUpBlock3D",
    "UpBlockMotion",
    "CrossAttnUpBlockMotion",
)


def freeu_on(block: nn.Module) -> bool:
    """Whether the up block's own forward applies FreeU (``unet.enable_freeu``)."""
    return type(block).__name__ in FREEU_BLOCKS and all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2"))


def _freeu(block: nn.Module, sample: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FreeU on an up layer's input and skip, where the block's own forward applies it
    ([`freeu_on()`][fd_trt.graphs.split.freeu_on]). ``apply_freeu`` scales its input in place: it gets a copy, so that a
    captured hidden state (or the propagated mid-block features) stays what entered the layer."""
    if not freeu_on(block):
        return sample, skip
    from diffusers.utils.torch_utils import apply_freeu  # diffusers is imported lazily

    return apply_freeu(block.resolution_idx, sample.clone(), skip, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)


def _run_up_layers(
    dec: nn.Module,
    sample: torch.Tensor,
    skips: Sequence[torch.Tensor],
    emb: torch.Tensor,
    text: torch.Tensor,
    start: int,
    capture: Sequence[int] = (),
    layer: Callable[[nn.Module, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = _up_layer,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Runs up layers ``start .. L-1`` of [`up_layers()`][fd_trt.graphs.split.up_layers] from ``sample`` (the hidden state that
    enters layer ``start``), then the output norm and ``conv_out``: the arithmetic of
    `UNetDecoder.forward()`, one layer at a time (``start=0``, ``sample=mid``: the whole decoder).

    Args:
        skips: ``skip_00 .. skip_{L-1-start}``, the skips those layers read, ``conv_in``'s first.
        capture: layer indices whose entering hidden state is returned too.
        layer: ``layer(block, j, sample, emb, text)`` runs up layer ``j`` of ``block`` after the
            skip is concatenated (the video UNets pass theirs, with the temporal layers).

    Returns:
        ``(noise_pred, {layer: hidden state entering it})``.
    """
    from diffusers.models.resnet import ResnetBlock2D  # diffusers is imported lazily

    layers = up_layers(dec.up_blocks)
    n_layers = len(layers)
    forward_upsample_size = any(int(d) % dec.up_factor != 0 for d in skips[0].shape[-2:])
    caught: dict[int, torch.Tensor] = {}
    upsample_size = None
    for f in range(start, n_layers):
        if f in capture:
            caught[f] = sample
        i, j = layers[f]
        block = dec.up_blocks[i]
        sample, skip = _freeu(block, sample, skips[n_layers - 1 - f])
        sample = layer(block, j, torch.cat([sample, skip], dim=1), emb, text)
        if j == len(block.resnets) - 1 and block.upsamplers is not None:
            if i < len(dec.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[n_layers - 2 - f].shape[2:]
            for upsampler in block.upsamplers:
                # IF's up blocks upsample with a resnet (up=True), which reads the time embedding.
                sample = (
                    upsampler(sample, emb) if isinstance(upsampler, ResnetBlock2D) else upsampler(sample, upsample_size)
                )
    if dec.conv_norm_out is not None:
        sample = dec.conv_norm_out(sample)
        sample = dec.conv_act(sample)
    return dec.conv_out(sample), caught


class ShallowDecoder(nn.Module):
    """The shallow end of the decoder: its last ``depth`` up layers ([`up_layers()`][fd_trt.graphs.split.up_layers]), the output
    norm and ``conv_out``, from the hidden state that entered them at an earlier step.

    ``forward(hidden [M,..], skip_00 .. skip_{depth-1} (M rows each), timestep [M], encoder_hidden_states [M,L,D], *added)
    -> noise_pred``. The time embedding is recomputed per row, as in [`UNetDecoder`][fd_trt.graphs.split.UNetDecoder]. Shares
    the decoder's parameters.
    """

    def __init__(self, decoder: UNetDecoder, depth: int) -> None:
        super().__init__()
        n_layers = len(up_layers(decoder.up_blocks))
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n_layers:
            raise InputError(
                f"a shallow decoder depth must be an integer in [1, {n_layers}] (this UNet's up layers), got {depth!r}"
            )
        self.decoder = decoder
        self.depth = depth
        self.start = n_layers - depth

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        skips, (timestep, text, *added) = args[: self.depth], args[self.depth :]
        emb, text = _time_embedding(self.decoder, timestep, hidden.dtype, added, text)
        with reusing_hidden_part(self.decoder, self.start, hidden):
            return _run_up_layers(self.decoder, hidden, skips, emb, text, self.start)[0]


@dataclass
class SplitUNet:
    """The two halves of one UNet, sharing its parameters."""

    encoder: UNetEncoder
    decoder: UNetDecoder

    @property
    def num_skips(self) -> int:
        return self.encoder.num_skips

    @property
    def added_names(self) -> tuple[str, ...]:
        """The added-conditioning inputs both halves take per row (``()`` for SD 1.x/2.x)."""
        return self.encoder.added_names

    @property
    def decoder_feature_module(self) -> nn.Module:
        """The last up block: its output stands for "the decoder features" of the paper's Figure 3."""
        return self.decoder.up_blocks[-1]

    def run_encoder(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> Features:
        """Runs the encoder half.

        Args:
            sample: ``[N,C,h,w]``.
            timestep: ``[N]``, one per row.
            text: ``[N,L,D]``.
            added: SDXL's ``{"text_embeds": [N,P], "time_ids": [N,K]}``; ``None`` for SD 1.x/2.x.

        Returns:
            The features, N rows each.
        """
        extra = added_tensors(self.added_names, added, int(sample.shape[0]))
        out = self.encoder(sample, timestep, text, *extra)
        return Features(out[0], tuple(out[1:]))

    def run_decoder(
        self, features: Features, timestep: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        """Runs the decoder half on M rows (features already expanded, see [`Features.repeat()`][fd_trt.core.features.Features.repeat]).

        Args:
            features: M rows.
            timestep: ``[M]``, one per row.
            text: ``[M,L,D]``.
            added: SDXL's added conditioning with M rows; ``None`` for SD 1.x/2.x.

        Returns:
            ``[M,C,h,w]`` noise predictions.
        """
        if not (features.rows == timestep.shape[0] == text.shape[0]):
            raise InputError(
                f"decoder rows disagree: features {features.rows}, timestep {tuple(timestep.shape)}, "
                f"text {tuple(text.shape)}; expand the features with Features.repeat first"
            )
        extra = added_tensors(self.added_names, added, features.rows)
        return self.decoder(features.mid, features.skips, timestep, text, *extra)

    @property
    def num_up_layers(self) -> int:
        """The decoder's up layers ([`up_layers()`][fd_trt.graphs.split.up_layers]): the largest shallow depth."""
        return len(up_layers(self.decoder.up_blocks))

    def shallow_decoder(self, depth: int) -> ShallowDecoder:
        """The decoder's last ``depth`` up layers as a module ([`ShallowDecoder`][fd_trt.graphs.split.ShallowDecoder])."""
        return ShallowDecoder(self.decoder, depth)

    def run_decoder_capture(
        self,
        features: Features,
        timestep: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """[`run_decoder()`][fd_trt.graphs.split.SplitUNet.run_decoder], also returning the hidden state that enters the last ``d`` up
        layers for each ``d`` in ``depths``: what a later shallow step reuses.

        Returns:
            ``(noise_pred [M,..], {depth: hidden [M,..]})``.
        """
        n_layers = self.num_up_layers
        bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= n_layers]
        if bad:
            raise InputError(f"shallow depths {bad} are out of range: use integers in [1, {n_layers}]")
        if not (features.rows == timestep.shape[0] == text.shape[0]):
            raise InputError(
                f"decoder rows disagree: features {features.rows}, timestep {tuple(timestep.shape)}, "
                f"text {tuple(text.shape)}; expand the features with Features.repeat first"
            )
        extra = added_tensors(self.added_names, added, features.rows)
        noise, caught = self._decode_capturing(features, timestep, text, extra, [n_layers - d for d in depths])
        return noise, {d: caught[n_layers - d] for d in depths}

    def _decode_capturing(
        self,
        features: Features,
        timestep: torch.Tensor,
        text: torch.Tensor,
        extra: Sequence[torch.Tensor],
        capture: Sequence[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The whole decoder, layer by layer, with the hidden states entering the layers ``capture``."""
        emb, text = _time_embedding(self.decoder, timestep, features.mid.dtype, extra, text)
        return _run_up_layers(self.decoder, features.mid, features.skips, emb, text, 0, capture)

    def run_decoder_shallow(
        self,
        hidden: torch.Tensor,
        skips: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        """Runs the last ``len(skips)`` up layers from ``hidden`` ([`ShallowDecoder`][fd_trt.graphs.split.ShallowDecoder]), M rows.

        Args:
            hidden: ``[M,..]``, the hidden state that entered those layers at an earlier step
                ([`run_decoder_capture()`][fd_trt.graphs.split.SplitUNet.run_decoder_capture]).
            skips: ``skip_00 .. skip_{depth-1}``, M rows each.
            timestep: ``[M]``.
            text: ``[M,L,D]``.
            added: SDXL's added conditioning with M rows; ``None`` for SD 1.x/2.x.
        """
        m = hidden.shape[0]
        if not (timestep.shape[0] == text.shape[0] == m and all(s.shape[0] == m for s in skips)):
            raise InputError(
                f"shallow decoder rows disagree: hidden {m}, skips {[s.shape[0] for s in skips]}, "
                f"timestep {tuple(timestep.shape)}, text {tuple(text.shape)}: give every input M rows"
            )
        extra = added_tensors(self.added_names, added, m)
        return self.shallow_decoder(len(skips))(hidden, *skips, timestep, text, *extra)

    def run_input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        """``conv_in`` of the (scaled) model input: the encoder's first skip, ``skip_00``."""
        if self.encoder.unet_config.center_input_sample:
            sample = 2 * sample - 1.0
        return self.encoder.conv_in(sample)

    def run_decoder_steps(
        self,
        features: Features,
        timestep: torch.Tensor,
        text: torch.Tensor,
        added: Sequence[torch.Tensor] = (),
        share: bool = True,
    ) -> torch.Tensor:
        """Decodes S steps of one key step: the decoder graph's computation (docs/design.md section 3).

        The N rows of features, text and added conditioning are repeated S times (step-major)
        here, and the convolutions and projections that read only them run once per distinct row
        ([`skip_rows_repeated()`][fd_trt.graphs.split.SplitUNet.skip_rows_repeated], [`text_rows_repeated()`][fd_trt.graphs.split.SplitUNet.text_rows_repeated]). S is ``timestep.shape[0] / N``;
        while the graph is traced it stays a traced value, so one graph serves every S.

        Args:
            features: N rows.
            timestep: ``[S*N]``, step-major (row ``j*N + i`` is row ``i`` at step ``j``).
            text: ``[N,L,D]``.
            added: SDXL's added conditioning with N rows each, in [`added_names`][fd_trt.graphs.split.SplitUNet.added_names] order.
            share: compute the convolutions and projections of the repeated rows once (``False``:
                repeat the rows and run the plain decoder, the same numbers within rounding).

        Returns:
            ``[S*N,C,h,w]`` noise predictions.
        """
        n = features.mid.shape[0]
        if not torch.jit.is_tracing():
            if (
                text.shape[0] != n
                or any(a.shape[0] != n for a in added)
                or timestep.ndim != 1
                or timestep.shape[0] == 0
                or timestep.shape[0] % n
            ):
                raise InputError(
                    f"decoder rows disagree: features {n}, text {tuple(text.shape)}, added {[tuple(a.shape) for a in added]}, "
                    f"timestep {tuple(timestep.shape)}; give N rows of features, text and added, and S*N timesteps"
                )
        repeats = timestep.shape[0] // n

        def tile(x: torch.Tensor) -> torch.Tensor:
            return _fixed_tail(x.repeat(repeats, *([1] * (x.ndim - 1))))

        skips = [tile(s) for s in features.skips]
        shared = repeats if share else 1  # 1: the hooks stay off
        with (
            self.text_rows_repeated(shared),
            self.skip_rows_repeated(shared, [int(s.shape[1]) for s in features.skips]),
        ):
            return self.decoder(tile(features.mid), skips, timestep, tile(text), *(tile(a) for a in added))

    @contextlib.contextmanager
    def text_rows_repeated(self, repeats: Repeats) -> Iterator[None]:
        """Within the block, the decoder's text-side attention projections run once per distinct row.

        A decoder call over a segment of S steps tiles the N rows of text S times (step-major,
        [`expand_for_steps()`][fd_trt.core.runner.expand_for_steps]), so every cross-attention's key and value
        projections would compute the same S*N x L x D products S times. Inside this block they
        project the first N rows only and tile the result, which gives the same numbers. It
        matters where the text is long next to the image tokens: SDXL at 256x256 (77 text tokens
        of width 2048 against 64 image tokens at the lowest level) spends about a tenth of its
        decoder FLOPs there, SD1.5 about 1%.

        Only where the caller itself tiled the text: the rows are not compared. The decoder graph
        does it in [`run_decoder_steps()`][fd_trt.graphs.split.SplitUNet.run_decoder_steps].

        Args:
            repeats: S, the steps whose rows share one text (1 turns the sharing off).
        """
        with text_rows_shared(self.decoder.text_projections(), repeats):
            yield

    @contextlib.contextmanager
    def skip_rows_repeated(self, repeats: Repeats, skip_channels: Sequence[int]) -> Iterator[None]:
        """Within the block, the decoder computes the skip half of its up-block convolutions once
        per distinct row.

        A decoder call over a segment of S steps repeats one key step's skip features S times
        ([`Features.repeat()`][fd_trt.core.features.Features.repeat]). Every up-block resnet concatenates its skip to the hidden state,
        so ``conv1`` and ``conv_shortcut`` would convolve the same skip channels S times. Inside
        this block they convolve the skip channels of the first N rows once and add the result to
        every step's rows (a sum over channels in another order: the same numbers within float
        rounding). SD1.5 at 256x256: 14% fewer decoder FLOPs at 10 steps per call.

        Only where the caller itself tiled the skips with [`Features.repeat()`][fd_trt.core.features.Features.repeat]: the rows are
        not compared. The decoder graph does it in [`run_decoder_steps()`][fd_trt.graphs.split.SplitUNet.run_decoder_steps].

        Args:
            repeats: S, the steps whose rows share one key step's features (1 turns it off).
            skip_channels: the channel count of every skip (``[s.shape[1] for s in features.skips]``).
        """
        if _sharing_off(repeats):
            yield
            return
        with _HOOK_LOCK:
            left = list(skip_channels)
            for block in self.decoder.up_blocks:
                for resnet in block.resnets:
                    if not left:
                        break
                    _hook_up_resnet(resnet, left.pop())
        with _hooks_on(
            _SKIP_ROW_REPEATS, repeats if isinstance(repeats, torch.Tensor) else int(repeats), _PERIODIC_OUT
        ):
            yield


def feature_bytes_per_row(unet_config: Any, latent_hw: tuple[int, int], itemsize: int) -> int:
    """Bytes of the encoder features (mid + skips) that one decoder row reads.

    Args:
        unet_config: the UNet's ``config`` (``block_out_channels``, ``layers_per_block``).
        latent_hw: latent height and width.
        itemsize: bytes per element of the runner's precision (4 for fp32, 2 for fp16/bf16).

    Returns:
        The feature bytes of one row (the shapes are the graph contract's,
        [`fd_trt.graphs.contract.feature_tails()`][fd_trt.graphs.contract.feature_tails]).
    """
    return int(sum(c * h * w for c, h, w in feature_tails(unet_config, latent_hw)) * itemsize)


def split_unet(unet: nn.Module) -> SplitUNet:
    """Splits a diffusers ``UNet2DConditionModel`` into encoder and decoder modules.

    Args:
        unet: an SD 1.x/2.x- or SDXL-style ``UNet2DConditionModel`` (any block count, layers and
            transformer layers per block, head configuration, with or without cross-attention and
            linear projections, optionally ``addition_embed_type="text_time"``).

    Returns:
        A [`SplitUNet`][fd_trt.graphs.split.SplitUNet] whose modules share the UNet's weights. ``decoder(encoder(x, t), t)``
        equals ``unet(x, t)`` (with the same ``added_cond_kwargs`` for SDXL).

    Raises:
        UnsupportedModelError: for class embeddings, addition embeddings other than SDXL's
            ``text_time``, hidden-state projections or guidance embeddings, which the split graphs
            do not carry.

    A text-to-video UNet (``UNet3DConditionModel``, ``UNetMotionModel``) is split by
    [`fd_trt.graphs.split_video.split_video_unet()`][fd_trt.graphs.split_video.split_video_unet].
    """
    if type(unet).__name__ in ("UNet3DConditionModel", "UNetMotionModel"):
        from fd_trt.graphs.split_video import split_video_unet

        return split_video_unet(unet)
    return SplitUNet(UNetEncoder(unet).eval(), UNetDecoder(unet).eval())


def if_text_conditioning(unet: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projected prompt, pooled prompt)`` of raw T5 embeddings for a DeepFloyd IF UNet
    ([`TextConditioning`][fd_trt.graphs.split.TextConditioning]), in the UNet's dtype and on its device, without autograd."""
    p = next(unet.parameters())
    with torch.no_grad():
        return TextConditioning(unet)(text.to(p.device, p.dtype))
