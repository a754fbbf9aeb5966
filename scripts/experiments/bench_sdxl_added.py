#!/usr/bin/env python
"""SDXL's added conditioning in the decoder graph: raw inputs against one precomputed embedding.

    python scripts/experiments/bench_sdxl_added.py [--rows 20] [--repeats 20] [--hw 32]

The decoder's time embedding includes SDXL's added embedding (``add_embedding`` of the pooled
text and ``add_time_proj(time_ids)``), so the decoder graph needs it per row. Two ways:

* ``raw`` (what fd_trt exports): ``text_embeds [M,P]`` and ``time_ids [M,K]`` are graph inputs,
  and the graph holds ``add_time_proj`` and ``add_embedding``;
* ``precomputed``: the caller computes ``add_embedding(...)`` once per encoder row and feeds
  ``added_emb [M,E]``; the decoder graph holds no add_embedding weights.

For a tiny SDXL-shaped UNet with random weights this prints, per variant, the decoder graph's
size on disk and its ONNX Runtime CPU time at ``--rows`` rows (median of ``--repeats``), checks
that both give the same noise, and prints what SDXL base's own add_embedding weighs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

TINY_SDXL = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(4, 8, 8),
    cross_attention_dim=64,
    use_linear_projection=True,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=64 + 6 * 16,
)


class PrecomputedDecoder(nn.Module):
    """The split decoder with ``emb = time_embedding(t) + added_emb`` (the added embedding precomputed)."""

    def __init__(self, decoder: nn.Module, num_skips: int) -> None:
        super().__init__()
        self.decoder, self.num_skips = decoder, num_skips

    def forward(self, mid: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        n, d = self.num_skips, self.decoder
        skips, timestep, text, added_emb = rest[:n], rest[n], rest[n + 1], rest[n + 2]
        # Same as fd_trt.graphs.split's time embedding, with the added part given.
        emb = d.time_embedding(d.time_proj(timestep).to(mid.dtype), None) + added_emb
        if d.time_embed_act is not None:
            emb = d.time_embed_act(emb)
        return _up_path(d, mid, skips, emb, text)


def _up_path(
    d: nn.Module, mid: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    # The latent size is a multiple of the upsampling factor here, so no upsample_size is needed.
    res_all, sample = tuple(skips), mid
    for block in d.up_blocks:
        n = len(block.resnets)
        res, res_all = res_all[-n:], res_all[:-n]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
    if d.conv_norm_out is not None:
        sample = d.conv_act(d.conv_norm_out(sample))
    return d.conv_out(sample)


def _time(session: object, feed: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        session.run(None, feed)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import TimestepEmbedding

    from fd_trt.graphs.build import build_engines
    from fd_trt.graphs.contract import GraphContract, TensorSpec
    from fd_trt.graphs.export import DECODER_FILE, _export_graph
    from fd_trt.graphs.split import split_unet

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.hw, **TINY_SDXL).eval()
    split = split_unet(unet)
    hw, text_shape, m = (args.hw, args.hw), (77, 64), args.rows
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(m, 4, *hw, generator=gen), torch.randn(m, *text_shape, generator=gen)
    t = torch.linspace(999.0, 1.0, m)
    added = {
        "text_embeds": torch.randn(m, 64, generator=gen),
        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(m, 1),
    }
    with torch.no_grad():
        feats = split.run_encoder(x, t, text, added)
        time_embeds = unet.add_time_proj(added["time_ids"].flatten()).reshape(m, -1)
        added_emb = unet.add_embedding(torch.cat([added["text_embeds"], time_embeds], -1))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        raw_dir = Path(tmp) / "raw"
        build_engines(unet, raw_dir, latent_size=hw, text_shape=text_shape, progress=False)
        pre_dir = Path(tmp) / "pre"
        pre_dir.mkdir()
        contract = GraphContract.from_unet_config(unet.config, hw, text_shape)
        base = GraphContract(
            contract.num_skips, (), contract.latent_tail, contract.out_tail, contract.text_tail, contract.features
        ).decoder
        spec = type(base)("decoder", (*base.inputs, TensorSpec("added_emb", (int(added_emb.shape[1]),))), base.outputs)

        class _Bar:
            def set_postfix_str(self, *_: object) -> None: ...
            def update(self, *_: object) -> None: ...

        _export_graph(
            PrecomputedDecoder(split.decoder, split.num_skips),
            (*feats.tensors(), t, text, added_emb),
            pre_dir / DECODER_FILE,
            spec,
            17,
            2**31 - 1,
            _Bar(),
        )
        feed_common = {n: v.numpy() for n, v in zip(contract.feature_names, feats.tensors())}
        feed_common.update(timestep=t.numpy(), encoder_hidden_states=text.numpy())
        results = {}
        for name, folder, extra in (
            ("raw", raw_dir, {k: v.numpy() for k, v in added.items()}),
            ("precomputed", pre_dir, {"added_emb": added_emb.numpy()}),
        ):
            sess = ort.InferenceSession(str(folder / DECODER_FILE), opts, providers=["CPUExecutionProvider"])
            feed = {**feed_common, **extra}
            out = sess.run(None, feed)[0]
            results[name] = (out, (folder / DECODER_FILE).stat().st_size, _time(sess, feed, args.repeats))
        diff = float(abs(results["raw"][0] - results["precomputed"][0]).max() / abs(results["raw"][0]).max())
        for name, (_, size, secs) in results.items():
            print(f"{name:12s} decoder.onnx {size / 1e6:7.3f} MB   ORT decode at {m} rows: {secs * 1e3:7.2f} ms")
        print(f"max relative difference raw vs precomputed: {diff:.2e}")
    sdxl_add = TimestepEmbedding(2816, 1280)
    params = sum(p.numel() for p in sdxl_add.parameters())
    print(
        f"SDXL base add_embedding: {params / 1e6:.2f} M parameters ({params * 2 / 1e6:.1f} MB fp16) of 2567 M in the UNet"
    )


if __name__ == "__main__":
    main()
