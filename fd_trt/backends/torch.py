"""The PyTorch reference runner: the split UNet modules in eager mode, on CPU or CUDA.

fp32, fp16 and bf16 are supported. Inputs are cast to the runner's dtype; outputs come back as
float32 so that the scheduler arithmetic stays in full precision. On CUDA, ``channels_last``
stores weights and latents NHWC, and ``cuda_graphs`` captures one CUDA graph per module and
input shape (one per distinct decoder row count) after a warm-up, then replays it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fd_trt.core.features import Added, Features, added_tensors
from fd_trt.core.runner import Runner, expand_for_steps, same_device
from fd_trt.errors import BackendUnavailableError, InputError
from fd_trt.graphs.contract import FLOAT32_INPUTS
from fd_trt.graphs.split import SplitUNet, decoder_shares_rows, split_unet

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def converted_copy(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` with its floating-point parameters and buffers converted to
    ``dtype`` on ``device``, as ``copy.deepcopy(module).to(device, dtype)`` gives, but without
    the full-size intermediate copy: each tensor is converted straight into the copy, so the peak
    is the original plus the converted weights (sd15-arch to bf16: 3.4 + 1.7 GB, not 3.4 + 3.4).
    Shared tensors stay shared. The original is left untouched. No ``.to(dtype)`` follows: every
    tensor is already converted, and diffusers' ``ModelMixin.to`` would warn about fp32 modules
    on every call, even for a UNet that lists none."""
    memo: dict[int, Any] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(convert(p), requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = convert(b)
    return copy.deepcopy(module, memo)


def resolve_dtype(precision: str | torch.dtype) -> torch.dtype:
    """Maps ``"fp32" | "fp16" | "bf16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(precision, torch.dtype):
        if precision not in _DTYPES.values():
            raise InputError(f"unsupported dtype {precision}: use one of {', '.join(_DTYPES)}")
        return precision
    if precision not in _DTYPES:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[precision]


class _Captured:
    """One CUDA graph of one module at one input shape: static inputs, the graph and its output."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...]
    ) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs


class TorchRunner(Runner):
    """Runs the split UNet with PyTorch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``. When it already has the runner's device, dtype
            and memory format, the runner uses it as it is (its later weight changes show at
            once); otherwise activation makes a converted copy and leaves the caller's UNet alone.
        device: ``"cpu"`` or ``"cuda[:i]"``.
        dtype: fp32, fp16 or bf16 (string or torch dtype).
        channels_last: store the UNet's weights and the latents channels-last (NHWC), which lets
            cuDNN pick tensor-core convolution kernels without layout transposes on recent GPUs.
        cuda_graphs: on CUDA, capture one CUDA graph per (module, input shape), that is one per
            distinct decoder row count, after a warm-up run, and replay it on later calls with
            the same shape. Removes the per-kernel launch cost of eager mode.
        graph_warmup_runs: eager runs before each capture (on a side stream, as PyTorch advises).
        share_rows: whether a decoder call over S steps projects the text and convolves the skip
            half of the up-block convolutions once per distinct row instead of S times (same
            numbers within float rounding). ``None`` (default): where it pays, by the UNet's
            widths ([`fd_trt.graphs.split.decoder_shares_rows()`][fd_trt.graphs.split.decoder_shares_rows], as the decoder graphs do): SD 1.x/2.x
            and SDXL yes, the default model no.

    Raises:
        BackendUnavailableError: for a CUDA device when torch sees no GPU.
        InputError: for ``cuda_graphs`` on a CPU device, or a bad ``graph_warmup_runs``.
    """

    name = "torch"

    def __init__(
        self,
        unet: nn.Module,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "fp32",
        *,
        channels_last: bool = False,
        cuda_graphs: bool = False,
        graph_warmup_runs: int = 2,
        share_rows: bool | None = None,
    ) -> None:
        super().__init__(device, resolve_dtype(dtype))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU: use device='cpu'"
            )
        if cuda_graphs and self.device.type != "cuda":
            raise InputError(
                f"cuda_graphs=True needs a CUDA device, got device={str(device)!r}: pass device='cuda' or drop cuda_graphs"
            )
        if isinstance(graph_warmup_runs, bool) or not isinstance(graph_warmup_runs, int) or graph_warmup_runs < 1:
            raise InputError(f"graph_warmup_runs must be a positive integer, got {graph_warmup_runs!r}")
        if self.device.type == "cpu" and self.dtype == torch.float16:
            logger.warning("fp16 on CPU is slow and poorly supported; prefer bf16 or fp32")
        self.source_unet = unet
        self.unet = unet
        self.split: SplitUNet = split_unet(unet)
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_warmup_runs = graph_warmup_runs
        if share_rows is not None and not isinstance(share_rows, bool):
            raise InputError(
                f"share_rows must be True, False or None (decided by the UNet's widths), got {share_rows!r}"
            )
        self._share_rows = share_rows
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self._graph_pool: Any = None
        # Captured graphs replay into static buffers: one call at a time.
        self.thread_safe = not self.cuda_graphs

    @property
    def share_rows(self) -> bool:
        """Whether decoder calls share the repeated rows' work (the argument, or the width rule
        applied to the current UNet)."""
        if self._share_rows is not None:
            return self._share_rows
        return decoder_shares_rows(getattr(self.unet, "config", None))

    def _needs_copy(self, unet: nn.Module) -> bool:
        p = next(unet.parameters())
        return self.channels_last or p.dtype != self.dtype or not same_device(p.device, self.device)

    def _take(self, unet: nn.Module) -> None:
        """Uses ``unet`` as it is, or a copy converted to the runner's device, dtype and layout."""
        if self._needs_copy(unet):
            # A copy: .to() would convert the caller's module in place.
            unet = converted_copy(unet, self.device, self.dtype)
            if self.channels_last:
                unet.to(memory_format=torch.channels_last)
        self.unet = unet
        self.split = split_unet(unet)

    def _activate(self) -> None:
        self._take(self.source_unet)
        if self.cuda_graphs:
            self._graph_pool = torch.cuda.graph_pool_handle()

    def _deactivate(self) -> None:
        self._graphs.clear()
        self._graph_pool = None
        self.unet = self.source_unet

    def refit(self, unet: Any) -> bool:
        """Follows new weights: a fresh converted copy when one is used, and new CUDA graphs.

        Captured CUDA graphs read the parameters at the addresses of the capture, and a weight
        swap (``param.data = ...``, as LoRA fusing does) moves them, so they are recaptured.
        """
        with self.exclusive():
            self.source_unet = unet
            if self.is_active:
                self._graphs.clear()
                self._take(unet)
            else:
                self.unet, self.split = unet, split_unet(unet)
        return True

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per module and input shape)."""
        return len(self._graphs)

    def _sample(self, sample: torch.Tensor) -> torch.Tensor:
        x = sample.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _added(self, added: Added) -> dict[str, torch.Tensor] | None:
        # The contract's float32 inputs (time_ids) stay float32, as in the graphs; the rest take the dtype.
        if added is None:
            return None
        return {k: v.to(self.device, torch.float32 if k in FLOAT32_INPUTS else self.dtype) for k, v in added.items()}

    @torch.inference_mode()
    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        self._check_active()
        dev, dt = self.device, self.dtype
        args = [self._sample(sample), timestep.to(dev, torch.float32), text.to(dev, dt)]
        cond = self._added(added)
        with self.exclusive():
            self.launches["encoder"] += 1
            if self.cuda_graphs:
                extra = list(added_tensors(self.split.added_names, cond, int(args[0].shape[0])))
                out = self._replay("encoder", self.split.encoder, args + extra)
                return Features(out[0].clone(), tuple(t.clone() for t in out[1:]))
            return self.split.run_encoder(*args, cond)

    @torch.inference_mode()
    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        self._check_active()
        feats, t_rows, text_rows, added_rows = expand_for_steps(
            features, timesteps.to(self.device, torch.float32), text.to(self.device, self.dtype), self._added(added)
        )
        with self.exclusive():
            self.launches["decoder"] += 1
            if self.cuda_graphs:  # a captured graph would keep one call's repeat count
                return self._decode_rows(feats, t_rows, text_rows, added_rows)
            # The S steps' rows share the text and the skips: project the text once per distinct
            # row, and convolve the skip half of the up-block convolutions once per distinct row
            # (where that pays: share_rows; 1 turns the hooks off).
            steps = int(timesteps.shape[0]) if self.share_rows else 1
            with (
                self.split.text_rows_repeated(steps),
                self.split.skip_rows_repeated(steps, [int(s.shape[1]) for s in features.skips]),
            ):
                return self._decode_rows(feats, t_rows, text_rows, added_rows)

    @torch.inference_mode()
    def decode_capture(
        self,
        features: Features,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        self._check_active()
        feats, t_rows, text_rows, added_rows = expand_for_steps(
            features, timesteps.to(self.device, torch.float32), text.to(self.device, self.dtype), self._added(added)
        )
        with self.exclusive():
            self.launches["decoder"] += 1
            noise, hidden = self.split.run_decoder_capture(feats, t_rows, text_rows, added_rows, tuple(depths))
            return noise.float(), hidden

    @torch.inference_mode()
    def decode_shallow(
        self,
        hidden: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        self._check_active()
        s = int(timesteps.shape[0])
        n = int(text.shape[0])
        if hidden.shape[0] != s * n:
            raise InputError(f"hidden has {hidden.shape[0]} rows, expected {s} steps x {n} rows")
        key = Features(skips[0], tuple(skips)) if skips else None
        if key is None:
            raise InputError("a shallow decoder step needs at least skip_00")
        feats, t_rows, text_rows, added_rows = expand_for_steps(
            key, timesteps.to(self.device, torch.float32), text.to(self.device, self.dtype), self._added(added)
        )
        skips_rows = tuple(x.to(self.device, self.dtype) for x in feats.skips)
        with self.exclusive():
            self.launches.setdefault("shallow", 0)
            self.launches["shallow"] += 1
            return self.split.run_decoder_shallow(
                hidden.to(self.device, self.dtype), skips_rows, t_rows, text_rows, added_rows
            ).float()

    @torch.inference_mode()
    def input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        self._check_active()
        x = self._sample(sample)
        m = int(x.shape[0])
        # CFG's two halves read one latent (on the CPU: on a GPU the comparison would wait for the device)
        if x.device.type == "cpu" and m % 2 == 0 and torch.equal(x[: m // 2], x[m // 2 :]):
            half = self.split.run_input_conv(x[: m // 2])
            return half.repeat(2, *([1] * (half.ndim - 1)))
        return self.split.run_input_conv(x)

    def _decode_rows(
        self, feats: Features, t_rows: torch.Tensor, text_rows: torch.Tensor, added_rows: Added = None
    ) -> torch.Tensor:
        if self.cuda_graphs:
            if not (feats.rows == t_rows.shape[0] == text_rows.shape[0]):
                raise InputError(
                    f"decoder rows disagree: features {feats.rows}, timestep {tuple(t_rows.shape)}, text {tuple(text_rows.shape)}"
                )
            extra = list(added_tensors(self.split.added_names, added_rows, feats.rows))
            decoder, n_extra, n_skips = self.split.decoder, len(extra), len(feats.skips)

            def run(mid: torch.Tensor, t: torch.Tensor, e: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
                return decoder(mid, rest[:n_skips], t, e, *rest[n_skips : n_skips + n_extra])

            (noise,) = self._replay("decoder", run, [feats.mid, t_rows, text_rows, *feats.skips, *extra])
            # A copy even in fp32: the static output is overwritten by the next replay.
            return noise.to(torch.float32, copy=True)
        return self.split.run_decoder(feats, t_rows, text_rows, added_rows).float()

    def _replay(self, role: str, fn: Callable[..., Any], args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Runs ``fn(*args)`` through the CUDA graph captured for these shapes (capturing it first)."""
        key = (
            role,
            *(
                (tuple(a.shape), a.dtype, a.ndim == 4 and a.is_contiguous(memory_format=torch.channels_last))
                for a in args
            ),
        )
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(fn, args)
            self._graphs[key] = captured
            logger.debug("captured a CUDA graph of the %s at %s rows", role, args[0].shape[0])
        for static, value in zip(captured.inputs, args):
            static.copy_(value)
        captured.graph.replay()
        return captured.outputs

    def _capture(self, fn: Callable[..., Any], args: list[torch.Tensor]) -> _Captured:
        static = [a.clone() for a in args]  # clone keeps each input's memory format
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.graph_warmup_runs):  # lets cuDNN / cuBLAS pick and allocate outside the capture
                fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = fn(*static)
        outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return _Captured(graph, static, outputs)
