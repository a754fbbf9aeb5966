"""Runners of split diffusion transformers ([`fd_trt.graphs.split_dit`][fd_trt.graphs.split_dit]), torch and onnxruntime.

They speak the [`Runner`][fd_trt.core.runner.Runner] protocol, so [`fd_trt.core.sampler.run_sampler()`][fd_trt.core.sampler.run_sampler]
runs them unchanged:

* ``encode(sample, timestep [N], text, added) -> Features(mid=tokens [N,T,D], skips=())``; for
  SD3 the text stream crosses the split too: ``skips=(context [N,L,D],)``;
* ``decode(features, timesteps [S], text, added) -> [S*N,C,h,w]``: the key step's tokens, tiled to
  the S steps (step-major) inside the decoder, each step with its own timestep, in one call. Only the noise channels
  come back (the first ``C`` of a transformer with learned variance, as diffusers' pipelines keep).

``text`` and ``added`` map to the graphs' conditioning as [`SplitTransformer.conditioning()`][fd_trt.graphs.split_dit.SplitTransformer.conditioning]
says: DiT's class labels travel as ``text`` (int64 ``[N]``); PixArt's prompt embeddings as
``text`` and its attention mask (and size conditioning) in ``added``; SD3's joint CLIP + T5
embeddings as ``text`` and its pooled text as ``added["pooled_projections"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fd_trt.core.features import Added, Features
from fd_trt.core.runner import Runner
from fd_trt.errors import BackendUnavailableError, InputError
from fd_trt.graphs.split_dit import SplitTransformer


def check_decode(features: Features, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The decoder's ``S*N`` per-row timesteps (step-major), once the rows agree.

    Raises:
        InputError: when the text rows differ from the features' or the timesteps are not 1-D.
    """
    n = features.rows
    if text.shape[0] != n:
        raise InputError(f"text has {text.shape[0]} rows but the features have {n}: pass the encoder's text")
    if timesteps.ndim != 1 or timesteps.shape[0] < 1:
        raise InputError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    return timesteps.float().repeat_interleave(n)


class TorchTransformerRunner(Runner):
    """Eager PyTorch on the split transformer's modules (the reference backend).

    Args:
        split: the split transformer; its modules must already be on ``device`` in ``dtype``.
        device: where the modules run; inputs are moved there.
        dtype: the modules' dtype; latents and floating conditioning are cast to it, timesteps
            stay float32 (the embeddings cast their own), the predicted noise comes back float32.
    """

    name = "torch"

    def __init__(
        self, split: SplitTransformer, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(device, dtype)
        self.split = split
        self._decoder = split.step_decoder()

    def _cond(self, text: torch.Tensor, added: Added) -> tuple[torch.Tensor, ...]:
        return tuple(
            c.to(self.device, self.dtype) if c.is_floating_point() else c.to(self.device)
            for c in self.split.conditioning(text, added)
        )

    @torch.inference_mode()
    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        self._check_active()
        out = self.split.encoder(
            sample.to(self.device, self.dtype), timestep.to(self.device, torch.float32), *self._cond(text, added)
        )
        self.launches["encoder"] += 1
        return Features(out[0], tuple(out[1:])) if isinstance(out, tuple) else Features(out, ())

    @torch.inference_mode()
    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        self._check_active()
        t = check_decode(features, timesteps, text).to(self.device)
        out = self._decoder(*features.tensors(), t, *self._cond(text, added))
        self.launches["decoder"] += 1
        return out.float()


class OrtTransformerRunner(Runner):
    """ONNX Runtime on the two exported graphs of a split transformer ([`fd_trt.graphs.export_dit`][fd_trt.graphs.export_dit]).

    Args:
        split: the split the graphs came from (for the conditioning names and channels).
        encoder_path, decoder_path: the ``.onnx`` files.
        intra_op_threads: onnxruntime's intra-op threads (0: its default).
    """

    name = "onnxruntime"

    def __init__(
        self, split: SplitTransformer, encoder_path: Path, decoder_path: Path, intra_op_threads: int = 0
    ) -> None:
        super().__init__("cpu", torch.float32)
        self.split = split
        self.paths = (Path(encoder_path), Path(decoder_path))
        self.intra_op_threads = int(intra_op_threads)
        self._sessions: tuple[Any, Any] | None = None

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        self._sessions = tuple(
            ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in self.paths
        )  # type: ignore[assignment]

    def _deactivate(self) -> None:
        self._sessions = None

    def _feed(
        self, which: int, first: tuple[torch.Tensor, ...], t: torch.Tensor, cond: tuple[torch.Tensor, ...]
    ) -> list[Any]:
        assert self._sessions is not None
        names = (*(("sample",) if which == 0 else self.split.features), "timestep", *self.split.cond_names)
        session = self._sessions[which]
        wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs a graph does not use
        feed = {}
        for name, value in zip(names, (*first, t.float(), *cond)):
            if name not in wanted:
                continue
            v = value.detach().cpu()
            v = v.long() if name == "class_labels" else v.float()
            feed[name] = v.numpy()
        return session.run(None, feed)

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        self._check_active()
        out = self._feed(0, (sample,), timestep, self.split.conditioning(text, added))
        self.launches["encoder"] += 1
        return Features(torch.from_numpy(out[0]), tuple(torch.from_numpy(o) for o in out[1:]))

    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        self._check_active()
        t = check_decode(features, timesteps, text)
        out = torch.from_numpy(self._feed(1, features.tensors(), t, self.split.conditioning(text, added))[0])
        self.launches["decoder"] += 1
        return out.float()


__all__ = ["OrtTransformerRunner", "TorchTransformerRunner", "check_decode"]
