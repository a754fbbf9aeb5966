"""LoRA on a pipeline: diffusers' own LoRA calls on the wrapped pipeline (PEFT backend), as a mixin.

They change the UNet's effective weights; the pipeline's next call notices (see
[`fd_trt.pipelines.runner_pool.RunnerPool.check_weights()`][fd_trt.pipelines.runner_pool.RunnerPool.check_weights]) and every backend follows: torch at
once, onnxruntime by rebuilding its graphs, TensorRT by refitting its plans.
"""

from __future__ import annotations

from typing import Any


class LoraMixin:
    """``load_lora_weights``, ``set_adapters``, ``fuse_lora`` ... passed to the wrapped diffusers pipeline ``sd``."""

    sd: Any

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """diffusers' ``load_lora_weights``: a local LoRA file or folder (safetensors), or a state dict."""
        self.sd.load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """diffusers' ``set_adapters``: which LoRA adapters are active, at which scales."""
        self.sd.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0, **kwargs: Any) -> None:
        """diffusers' ``fuse_lora``: merges the active adapters into the base weights."""
        self.sd.fuse_lora(lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, **kwargs: Any) -> None:
        """diffusers' ``unfuse_lora``."""
        self.sd.unfuse_lora(**kwargs)

    def disable_lora(self) -> None:
        """diffusers' ``disable_lora``: the base model, adapters kept."""
        self.sd.disable_lora()

    def enable_lora(self) -> None:
        """diffusers' ``enable_lora``."""
        self.sd.enable_lora()

    def unload_lora_weights(self) -> None:
        """diffusers' ``unload_lora_weights``: removes every adapter."""
        self.sd.unload_lora_weights()


__all__ = ["LoraMixin"]
