"""What graphs are built from: digests of a UNet's (or ControlNet's) weights and config.

[`unet_weights_sha256()`][fd_trt.graphs.weights.unet_weights_sha256] is the digest an engine directory's manifest records (and the key of
a ControlNet's graph); [`weights_fingerprint()`][fd_trt.graphs.weights.weights_fingerprint] is the cheap value compared on every call to
notice that weights changed; [`unet_config_dict()`][fd_trt.graphs.weights.unet_config_dict] is the config as the manifest records it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def adapter_state(unet: nn.Module) -> list[list[Any]]:
    """What decides the output of the UNet's PEFT adapter layers besides their tensors.

    For every adapter layer (``peft``'s ``BaseTunerLayer``, which diffusers' ``load_lora_weights``
    injects): its active adapters, their scales (``set_adapters(names, weights)``), the adapters
    merged into the base weights, and whether adapters are disabled. None of this is in the
    state dict, yet it changes what the layer computes.

    Args:
        unet: any torch module.

    Returns:
        ``[[module name, active, scales, merged, disabled], ...]`` in module order; empty without
        adapters.
    """
    out: list[list[Any]] = []
    for name, m in unet.named_modules():
        scaling = getattr(m, "scaling", None)
        if not isinstance(scaling, dict) or not hasattr(m, "active_adapters"):
            continue
        active = getattr(m, "active_adapters", [])
        out.append(
            [
                name,
                sorted(active) if isinstance(active, (list, tuple, set)) else [str(active)],
                sorted((str(k), float(v)) for k, v in scaling.items()),
                sorted(getattr(m, "merged_adapters", []) or []),
                bool(getattr(m, "disable_adapters", False)),
            ]
        )
    return out


def unet_weights_sha256(unet: nn.Module) -> str:
    """sha256 of the UNet's effective weights.

    Covers the state dict (each tensor's name, dtype, shape and bytes, in name order; a fused
    LoRA and unfused adapter tensors are in it) and [`adapter_state()`][fd_trt.graphs.weights.adapter_state] (which adapters are
    active, at which scales).

    Args:
        unet: any torch module.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    state = unet.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A byte view works for every dtype (bf16 included), unlike .numpy().
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    adapters = adapter_state(unet)
    if adapters:  # so that a UNet without adapters keeps the digest it always had
        h.update(json.dumps(adapters).encode())
    return h.hexdigest()


#: Elements sampled per tensor by [`weights_fingerprint()`][fd_trt.graphs.weights.weights_fingerprint].
FINGERPRINT_SAMPLES = 8


def weights_fingerprint(unet: nn.Module) -> tuple[Any, ...]:
    """A cheap value that changes when the UNet's weights change; compared on every call.

    It covers each parameter and buffer's identity, address and autograd version counter (so
    ``load_state_dict``, in-place updates and ``param.data = ...`` swaps show), plus
    `FINGERPRINT_SAMPLES` evenly spaced elements of each tensor (so in-place updates through
    ``.data``, which bypass the version counter, show too, as PEFT's merge does), plus the adapter
    layers' state ([`adapter_state()`][fd_trt.graphs.weights.adapter_state]). A change that touches none of the sampled elements of
    any tensor and bumps no counter is missed; [`FasterDiffusionPipeline.refresh_weights()`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline.refresh_weights]
    covers that case.

    Args:
        unet: any torch module.

    Returns:
        A tuple to compare with ``==`` (not a digest: comparing is cheaper than hashing).
    """
    samples = []
    meta: list[Any] = []
    # One walk over the modules (parameters, buffers and adapter layers together): the walk and
    # the per-tensor Python work are what cost here, not the tensors.
    for mod_name, m in unet.named_modules():
        for kind in (m._parameters, m._buffers):
            for name, t in kind.items():
                if t is None:
                    continue
                try:
                    version = t._version
                except RuntimeError:  # inference tensors keep no version counter
                    version = -1
                meta.append((mod_name, name, id(t), t.data_ptr(), version))
                flat = t.detach().reshape(-1)
                n = flat.numel()
                if n:
                    # A strided view: no copy until the one cat below.
                    samples.append(flat[:: max(1, n // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES].float())
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and hasattr(m, "active_adapters"):
            meta.append(
                (
                    mod_name,
                    str(m.active_adapters),
                    str(sorted(scaling.items())),
                    str(getattr(m, "merged_adapters", None)),
                    bool(getattr(m, "disable_adapters", False)),
                )
            )
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return (tuple(meta), values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def unet_config_dict(unet: nn.Module) -> dict[str, Any]:
    """The UNet's config as plain JSON values, without diffusers' bookkeeping keys.

    Keys starting with ``_`` (``_name_or_path``, ``_diffusers_version``, ...) say where the model
    was loaded from, not what it computes, so they do not make graphs stale.

    Args:
        unet: a diffusers model with a ``config``.

    Returns:
        A dict that round-trips through JSON unchanged.
    """
    return {k: _jsonable(v) for k, v in dict(unet.config).items() if not str(k).startswith("_")}


__all__ = [
    "FINGERPRINT_SAMPLES",
    "adapter_state",
    "unet_config_dict",
    "unet_weights_sha256",
    "weights_fingerprint",
]
