"""The PyTorch reference runner: the split UNet modules in eager mode, on CPU or CUDA.

fp32, fp16 and bf16 are supported. Inputs are cast to the runner's dtype; outputs come back as
float32 so that the scheduler arithmetic stays in full precision.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import BackendUnavailableError, InputError
from ..split import Features, SplitUNet, split_unet
from .base import Runner, expand_for_steps

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(precision: str | torch.dtype) -> torch.dtype:
    """Maps ``"fp32" | "fp16" | "bf16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(precision, torch.dtype):
        if precision not in _DTYPES.values():
            raise InputError(f"unsupported dtype {precision}: use one of {', '.join(_DTYPES)}")
        return precision
    if precision not in _DTYPES:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[precision]


class TorchRunner(Runner):
    """Runs the split UNet with PyTorch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``. It is moved to ``device`` / ``dtype`` on activation.
        device: ``"cpu"`` or ``"cuda[:i]"``.
        dtype: fp32, fp16 or bf16 (string or torch dtype).
    """

    name = "torch"

    def __init__(self, unet: nn.Module, device: torch.device | str = "cpu", dtype: str | torch.dtype = "fp32") -> None:
        super().__init__(device, resolve_dtype(dtype))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU: use device='cpu'"
            )
        if self.device.type == "cpu" and self.dtype == torch.float16:
            logger.warning("fp16 on CPU is slow and poorly supported; prefer bf16 or fp32")
        self.unet = unet
        self.split: SplitUNet = split_unet(unet)

    def _activate(self) -> None:
        self.unet.to(device=self.device)
        if next(self.unet.parameters()).dtype != self.dtype:
            self.unet.to(dtype=self.dtype)

    @torch.inference_mode()
    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> Features:
        self._check_active()
        dev, dt = self.device, self.dtype
        return self.split.run_encoder(
            sample.to(dev, dt), timestep.to(dev, torch.float32), text.to(dev, dt)
        )

    @torch.inference_mode()
    def decode(self, features: Features, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self._check_active()
        feats, t_rows, text_rows = expand_for_steps(features, timesteps.to(self.device, torch.float32), text.to(self.device, self.dtype))
        return self.split.run_decoder(feats, t_rows, text_rows).float()
