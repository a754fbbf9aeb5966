"""The transformer graphs on onnxruntime: exported through the contract with dynamic rows, within
1e-4 of diffusers' pipelines; the manifest records the family and N; ``auto`` picks a backend."""

import json

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.errors import EngineMismatchError
from fd_trt.families.dit_models import tiny_dit_pipeline, tiny_pixart_pipeline
from fd_trt.graphs.contract_dit import transformer_graphs
from fd_trt.graphs.export_dit import export_transformer
from fd_trt.graphs.split_dit import split_transformer

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_dit_onnxruntime_all_equals_diffusers(guidance, tmp_path):
    pipe = tiny_dit_pipeline(seed=4)
    kw = dict(num_inference_steps=6, guidance_scale=guidance, output_type="np")
    ref = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0), **kw).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="onnxruntime", progress=False, engines=tmp_path / "e")
    out = fd(class_labels=[3, 7], generator=torch.Generator().manual_seed(0), schedule="all", **kw)
    assert out.stats.backend == "onnxruntime"
    assert abs(out.images - ref).max() <= 1e-4
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["family"] == "dit" and manifest["split"] == fd.split_point == 2
    assert manifest["kind"] == "fd_trt-transformer"


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_pixart_onnxruntime_all_and_paper_match(guidance, tmp_path):
    pipe = tiny_pixart_pipeline(seed=5)
    prompts = ["red circle", "blue square"]
    kw = dict(num_inference_steps=6, guidance_scale=guidance, output_type="latent", max_sequence_length=16)
    ref = pipe(
        prompts, generator=torch.Generator().manual_seed(0), use_resolution_binning=False, clean_caption=False, **kw
    ).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="onnxruntime", progress=False, engines=tmp_path / "e")
    out = fd(prompts, generator=torch.Generator().manual_seed(0), schedule="all", **kw)
    scale = max(1.0, ref.abs().max().item())
    assert (out.images - ref).abs().max().item() <= 1e-4 * scale
    # A propagating schedule on both backends: the batched decoder graph equals torch.
    ref_t = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)(
        prompts, generator=torch.Generator().manual_seed(0), schedule=[0, 2, 3], **kw
    )
    out_o = fd(prompts, generator=torch.Generator().manual_seed(0), schedule=[0, 2, 3], **kw)
    assert out_o.stats.decoder_calls == 3
    assert (out_o.latents - ref_t.latents).abs().max().item() <= 1e-4 * max(1.0, ref_t.latents.abs().max().item())


def test_large_transformer_graphs_keep_their_weights_in_one_data_file(tmp_path, monkeypatch):
    """Above the threshold (2 GB: protobuf's limit; 0 here) each graph's weights go to one
    ``<graph>.onnx.data`` next to it, recorded in the manifest; onnxruntime runs them as torch, and
    a truncated data file has both graphs exported again."""
    import fd_trt.graphs.export_dit as export_dit

    monkeypatch.setattr(export_dit, "EXTERNAL_DATA_THRESHOLD", 0)
    pipe = tiny_pixart_pipeline(seed=5)
    kw = dict(num_inference_steps=4, guidance_scale=4.5, output_type="latent", max_sequence_length=16)
    engines = tmp_path / "e"
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="onnxruntime", progress=False, engines=engines)
    out = fd("red circle", generator=torch.Generator().manual_seed(0), schedule=[0, 2], **kw)
    ref = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)(
        "red circle", generator=torch.Generator().manual_seed(0), schedule=[0, 2], **kw
    )
    assert (out.latents - ref.latents).abs().max().item() <= 1e-4 * max(1.0, ref.latents.abs().max().item())
    manifest = json.loads((engines / "manifest.json").read_text())
    for role, rec in manifest["graphs"].items():
        data = engines / (rec["file"] + ".data")
        assert rec["data_file"] == data.name and rec["data_bytes"] == data.stat().st_size > 0, role
    assert not [p.name for p in engines.iterdir() if p.name.startswith(".export-")]  # nothing left behind
    data = engines / (manifest["graphs"]["encoder"]["file"] + ".data")
    data.write_bytes(data.read_bytes()[:-4])  # truncated behind the manifest
    again = FasterDiffusionPipeline.from_diffusers(pipe, backend="onnxruntime", progress=False, engines=engines)
    out2 = again("red circle", generator=torch.Generator().manual_seed(0), schedule=[0, 2], **kw)
    assert data.stat().st_size == manifest["graphs"]["encoder"]["data_bytes"]  # exported again
    assert torch.equal(out2.latents, out.latents)


def test_graph_contract_and_dynamic_rows(tmp_path):
    import onnxruntime as ort

    tr = tiny_pixart_pipeline(seed=6, additional_conditions=True).transformer
    split = split_transformer(tr, 2)
    enc, dec = transformer_graphs(split, (8, 8), 2, 24, (16, 32))
    assert enc.input_names == [
        "sample", "timestep", "encoder_hidden_states", "encoder_attention_mask", "resolution", "aspect_ratio"
    ]  # fmt: skip
    assert dec.tensor("timestep").step_rowed and dec.tensor("noise_pred").step_rowed
    assert not dec.tensor("tokens").step_rowed
    m = export_transformer(tmp_path, "pixart", tr, split, (8, 8), (16, 32))
    assert m.split == 2 and m.family == "pixart"
    sess = ort.InferenceSession(str(tmp_path / m.decoder), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for rows, steps in ((1, 1), (3, 4)):
        tokens = torch.randn(rows, 16, 24, generator=g)
        text = torch.randn(rows, 16, 32, generator=g)
        mask = torch.ones(rows, 16)
        res, ar = torch.full((rows, 2), 64.0), torch.ones(rows, 1)
        ts = torch.linspace(900, 100, steps).repeat_interleave(rows)
        feed = dict(
            tokens=tokens, timestep=ts, encoder_hidden_states=text, encoder_attention_mask=mask, resolution=res,
            aspect_ratio=ar,
        )  # fmt: skip
        out = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.no_grad():
            ref = split.step_decoder()(tokens, ts, text, mask, res, ar)
        assert out.shape == (rows * steps, 4, 8, 8)
        assert abs(out - ref.numpy()).max() <= 1e-4
    # Another N into the same folder is refused, not run wrongly.
    with pytest.raises(EngineMismatchError, match="rebuild"):
        export_transformer(tmp_path, "pixart", tr, split_transformer(tr, 3), (8, 8), (16, 32))


def test_auto_picks_a_backend_and_matches_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path))
    pipe = tiny_dit_pipeline(seed=7)
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="auto", progress=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(class_labels=[5], num_inference_steps=6, latents=latents, output_type="latent", schedule=[0, 3])
    out = fd(**kw)
    assert out.stats.backend in ("torch", "onnxruntime")
    assert len(fd._auto_choice) == 1
    ref = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)(**kw)
    assert (out.latents - ref.latents).abs().max().item() <= 1e-4 * max(1.0, ref.latents.abs().max().item())
    assert list((tmp_path / "transformer").iterdir())  # the graphs went to the engine cache


def test_tensorrt_stand_in_profiles_cover_the_transformer_graphs(tmp_path, monkeypatch):
    from fd_trt.backends.tensorrt_build import RowProfile
    from fd_trt.backends.tensorrt_dit import build_transformer_plans

    import fake_tensorrt

    trt = fake_tensorrt.install(monkeypatch)
    for kind, pipe, text in (
        ("dit", tiny_dit_pipeline(seed=8), None),
        ("pixart", tiny_pixart_pipeline(seed=8), (16, 32)),
    ):
        tr = pipe.transformer
        split = split_transformer(tr, 2)
        folder = tmp_path / kind
        m = export_transformer(folder, kind, tr, split, (8, 8), text)
        width = tr.config.num_attention_heads * tr.config.attention_head_dim
        plans = build_transformer_plans(folder, m, split, 2, width, RowProfile(1, 2, 4), steps=5, opt_steps=3)
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plans["decoder"].read_bytes())
        lo, opt, hi = engine.get_tensor_profile_shape("timestep", 0)
        assert (lo[0], opt[0], hi[0]) == (1, 6, 20)  # step rows: up to 5 steps of 4 rows
        lo, opt, hi = engine.get_tensor_profile_shape("tokens", 0)
        assert (lo[0], opt[0], hi[0]) == (1, 2, 4) and tuple(hi)[1:] == (16, width)
        enc = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plans["encoder"].read_bytes())
        lo, opt, hi = enc.get_tensor_profile_shape("sample", 0)
        assert tuple(hi) == (4, 4, 8, 8)
