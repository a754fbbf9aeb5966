"""ONNX export, engine directories and the ONNX Runtime runner, on a tiny random SD (CPU, no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# onnx, onnxruntime, onnx-graphsurgeon and polygraphy are core dependencies: a missing one fails here.
import onnx  # noqa: E402,F401
import onnxruntime as ort  # noqa: E402,F401
import pytest
import torch

from fd_trt.backends.onnxruntime import OrtRunner  # noqa: E402
from fd_trt.core.features import Features
from fd_trt.errors import EngineMismatchError, FdTrtError  # noqa: E402
from fd_trt.families.models import tiny_sd_pipeline  # noqa: E402
from fd_trt.graphs.build import build_engines  # noqa: E402
from fd_trt.graphs.export import (  # noqa: E402
    CorruptGraphError,
    compare_precisions,
    decoder_input_names,
    encoder_output_names,
    example_inputs,
    export_unet,
)
from fd_trt.graphs.manifest import MANIFEST_FILE, check_engine_dir, load_manifest  # noqa: E402
from fd_trt.graphs.split import split_unet  # noqa: E402

LATENT = (8, 8)
TEXT = (16, 32)  # the tiny tokenizer's length and the tiny text encoder's width
REL_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def engine_dir(sd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny"
    # share_rows: the tiny UNet is too narrow for the rule to share, and these tests check the shared graph.
    result = build_engines(
        sd.unet, out, latent_size=LATENT, text_shape=TEXT, model_source="tiny", progress=False, share_rows=True
    )
    assert result.built
    return out


@pytest.fixture(scope="module")
def runner(engine_dir):
    with OrtRunner(engine_dir, intra_op_threads=2) as r:
        yield r


@pytest.fixture(scope="module")
def split(sd):
    return split_unet(sd.unet)


def _inputs(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn((rows, 4, *LATENT), generator=g),
        torch.linspace(981.0, 1.0, rows),
        torch.randn((rows, *TEXT), generator=g),
    )


def test_graphs_carry_the_contract_names_with_dynamic_rows(engine_dir, split):
    enc = onnx.load(str(engine_dir / "encoder.onnx"))
    dec = onnx.load(str(engine_dir / "decoder.onnx"))
    names = encoder_output_names(split.num_skips)
    assert [i.name for i in enc.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in enc.graph.output] == names
    assert [i.name for i in dec.graph.input] == decoder_input_names(split.num_skips)
    assert [o.name for o in dec.graph.output] == ["noise_pred"]
    assert enc.opset_import[0].version >= 17
    for value in [*enc.graph.input, *enc.graph.output, *dec.graph.input, *dec.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{value.name} has a fixed axis 0"
        assert all(d.dim_value > 0 for d in dims[1:]), f"{value.name} has a symbolic non-row axis"
    ts = next(i for i in dec.graph.input if i.name == "timestep")
    assert ts.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_ort_encoder_matches_torch_split(runner, split):
    sample, t, text = _inputs(2)
    feats = runner.encode(sample, t, text)
    with torch.no_grad():
        ref = split.run_encoder(sample, t, text)
    assert len(feats.skips) == len(ref.skips)
    for got, want in zip(feats.tensors(), ref.tensors()):
        assert got.shape == want.shape
        assert rel_err(got, want) < REL_TOL


@pytest.mark.parametrize("rows", [2, 6, 30])
def test_ort_decoder_matches_torch_split_with_mixed_timesteps(runner, split, rows):
    sample, t, text = _inputs(2)
    steps = torch.linspace(961.0, 21.0, rows // 2)  # a different timestep per step of the segment
    feats = runner.encode(sample, t, text)
    got = runner.decode(feats, steps, text)
    with torch.no_grad():
        ref_feats = split.run_encoder(sample, t, text)
        expanded = ref_feats.repeat(rows // 2)
        want = split.run_decoder(expanded, steps.repeat_interleave(2), text.repeat(rows // 2, 1, 1))
    assert got.shape == (rows, 4, *LATENT)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < REL_TOL


def test_ort_decoder_graph_takes_independent_rows(runner, split, engine_dir):
    # Every row with its own features, text and timestep: the graph must not mix rows.
    rows = 6
    g = torch.Generator().manual_seed(3)
    sample, _, text = _inputs(rows, seed=4)
    t = torch.rand(rows, generator=g) * 999
    with torch.no_grad():
        feats = split.run_encoder(sample, torch.full((rows,), 500.0), text)
        want = split.run_decoder(feats, t, text)
    sess = ort.InferenceSession(str(engine_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed = {n: v.numpy() for n, v in zip(Features.names(len(feats.skips)), feats.tensors())}
    feed.update(timestep=t.numpy(), encoder_hidden_states=text.numpy())
    got = torch.from_numpy(sess.run(None, feed)[0])
    assert rel_err(got, want) < REL_TOL


@pytest.mark.parametrize("rows,steps", [(2, 1), (2, 3), (2, 7), (4, 2)])
def test_decoder_graph_repeats_the_key_step_rows_itself(split, engine_dir, rows, steps):
    # The contract: N rows of features and text, S*N step-major timesteps -> S*N predictions, equal
    # to the torch decoder on the features tiled S times.
    sample, _, text = _inputs(rows, seed=5)
    t = torch.linspace(950.0, 30.0, steps).repeat_interleave(rows)
    with torch.no_grad():
        feats = split.run_encoder(sample, torch.full((rows,), 700.0), text)
        want = split.run_decoder(feats.repeat(steps), t, text.repeat(steps, 1, 1))
    sess = ort.InferenceSession(str(engine_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed = {n: v.numpy() for n, v in zip(Features.names(len(feats.skips)), feats.tensors())}
    feed.update(timestep=t.numpy(), encoder_hidden_states=text.numpy())
    got = torch.from_numpy(sess.run(None, feed)[0])
    assert got.shape == (steps * rows, 4, *LATENT)
    assert rel_err(got, want) < REL_TOL


def test_decoder_graph_convolves_the_skips_once_per_distinct_row(engine_dir):
    dec = onnx.load(str(engine_dir / "decoder.onnx"))
    dims = {t.name: list(t.dims) for t in dec.graph.initializer}
    in_channels = sorted(dims[n.input[1]][1] for n in dec.graph.node if n.op_type == "Conv")
    # The tiny UNet's decoder has 18 convolutions (17 in its up blocks, conv_out). Its four
    # up-block resnets read cat(h, skip) with 128 = 64 + 64, 96 = 64 + 32 (twice) and 64 = 32 + 32
    # channels, GroupNorm of 32 groups: conv1 and the 1x1 conv_shortcut of each split in two, the
    # skip half computed on N rows only. conv1 splits at the first whole group inside the skip:
    # 64 of 128 (groups of 4), 66 of 96 (groups of 3: the group 63..65 mixes h and skip), 32 of 64.
    assert len(in_channels) == 18 + 8
    for split_at, total in [(64, 128), (66, 96), (32, 64)]:
        assert split_at in in_channels and total - split_at in in_channels
    assert 128 not in in_channels and 96 not in in_channels  # no resnet convolves its whole input at once


def test_the_unshared_decoder_graph_takes_the_same_inputs_and_gives_the_same_noise(sd, split, engine_dir, tmp_path):
    # The width rule: the default model (32-128 channels) and this tiny UNet export the unshared
    # graph, SD1.5's widths (320-1280) the shared one; the measured boundary lies between 64-256
    # (no gain) and 96-384 (gain), see ROW_SHARING_MIN_CHANNELS.
    import json

    from fd_trt.families.models import default_model_dir
    from fd_trt.graphs.export import decoder_shares_rows

    folder = default_model_dir()
    assert folder is not None
    default_cfg = json.loads((folder / "unet" / "config.json").read_text())
    assert not decoder_shares_rows(default_cfg) and not decoder_shares_rows(sd.unet.config)
    assert decoder_shares_rows({"block_out_channels": [320, 640, 1280, 1280]})
    assert decoder_shares_rows({"block_out_channels": [96, 192, 384, 384]})
    assert not decoder_shares_rows({"block_out_channels": [64, 128, 256, 256]})
    result = export_unet(sd.unet, tmp_path / "plain", latent_size=LATENT, text_shape=TEXT, progress=False)
    assert not result.share_rows
    plain = onnx.load(str(tmp_path / "plain" / "decoder.onnx"))
    assert sum(n.op_type == "Conv" for n in plain.graph.node) == 18  # no convolution split
    rows, steps = 2, 4
    sample, _, text = _inputs(rows, seed=9)
    t = torch.linspace(900.0, 60.0, steps).repeat_interleave(rows)
    with torch.no_grad():
        feats = split.run_encoder(sample, torch.full((rows,), 600.0), text)
        want = split.run_decoder(feats.repeat(steps), t, text.repeat(steps, 1, 1))
    feed = {n: v.numpy() for n, v in zip(Features.names(len(feats.skips)), feats.tensors())}
    feed.update(timestep=t.numpy(), encoder_hidden_states=text.numpy())
    outs = [
        torch.from_numpy(
            ort.InferenceSession(str(d / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        )
        for d in (tmp_path / "plain", engine_dir)
    ]
    for got in outs:
        assert rel_err(got, want) < REL_TOL


def test_pipeline_latents_match_torch_backend(sd, engine_dir):
    from fd_trt import FasterDiffusionPipeline

    latents = torch.randn((1, 4, *LATENT), generator=torch.Generator().manual_seed(7))
    pipe_t = FasterDiffusionPipeline(sd, backend="torch", device="cpu", progress=False)
    pipe_o = FasterDiffusionPipeline(sd, backend=OrtRunner(engine_dir), device="cpu", progress=False)
    for schedule in ("paper", "all"):
        kw = dict(num_inference_steps=20, latents=latents, output_type="latent", schedule=schedule)
        a = pipe_o("a red circle", **kw).images
        b = pipe_t("a red circle", **kw).images
        assert rel_err(a, b) < REL_TOL, schedule
    pipe_o.close()


def test_polygraphy_comparator_accepts_graphs_against_torch_reference(engine_dir, split):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    sample, t, text = _inputs(2, seed=9)
    feed = {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy()}
    with torch.no_grad():
        ref = split.encoder(sample, t, text)
    names = encoder_output_names(split.num_skips)
    reference = RunResults()
    reference.append(("torch", [IterationResult({n: r.numpy() for n, r in zip(names, ref)}, runner_name="torch")]))
    results = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(engine_dir / "encoder.onnx")))], data_loader=[feed])
    reference.extend(results)
    ok = Comparator.compare_accuracy(reference, compare_func=SimpleCompareFunc(atol=1e-4, rtol=1e-4))
    assert bool(ok)


def test_truncated_decoder_gives_clear_error(engine_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    dec = broken / "decoder.onnx"
    dec.write_bytes(dec.read_bytes()[: dec.stat().st_size // 3])
    with pytest.raises(CorruptGraphError, match="decoder.onnx.*truncated"):
        OrtRunner(broken).activate()
    # Without the manifest the file is parsed before onnxruntime sees it.
    (broken / MANIFEST_FILE).unlink()
    with pytest.raises(FdTrtError, match="decoder.onnx.*truncated or corrupt"):
        OrtRunner(broken).activate()
    with pytest.raises(FdTrtError, match="decoder.onnx"):
        OrtRunner(encoder_path=broken / "encoder.onnx", decoder_path=broken / "decoder.onnx").activate()


def test_second_build_is_a_no_op(sd, engine_dir):
    before = {p.name: p.stat().st_mtime_ns for p in engine_dir.iterdir()}
    result = build_engines(
        sd.unet, engine_dir, latent_size=LATENT, text_shape=TEXT, model_source="tiny", progress=False
    )
    assert not result.built and result.reason == "up to date"
    assert {p.name: p.stat().st_mtime_ns for p in engine_dir.iterdir()} == before


def test_changed_unet_weight_is_stale(sd, engine_dir, tmp_path):
    check_engine_dir(engine_dir, sd.unet, latent_size=LATENT, text_shape=TEXT, precision="fp32")
    changed = tiny_sd_pipeline(seed=0).unet
    with torch.no_grad():
        changed.conv_out.bias[0] += 1e-3
    with pytest.raises(EngineMismatchError, match="unet_sha256.*fd-trt build"):
        check_engine_dir(engine_dir, changed)
    copy_dir = tmp_path / "copy"
    shutil.copytree(engine_dir, copy_dir)
    result = build_engines(changed, copy_dir, latent_size=LATENT, text_shape=TEXT, progress=False)
    assert result.built and "unet_sha256" in result.reason
    check_engine_dir(copy_dir, changed)


def test_engines_for_another_shape_are_refused(engine_dir):
    with pytest.raises(
        EngineMismatchError, match=r"latent_shape \(built for \[8, 8\], asked for \[16, 16\]\).*--height 128"
    ):
        check_engine_dir(engine_dir, latent_size=(16, 16))
    assert load_manifest(engine_dir).decoder_rows == [1, 30]


def test_fp16_graphs_stay_close_to_fp32(sd, engine_dir, tmp_path):
    result = export_unet(
        sd.unet, tmp_path / "fp16", latent_size=LATENT, text_shape=TEXT, precision="fp16", progress=False
    )
    assert next(sd.unet.parameters()).dtype == torch.float32  # the caller's UNet is untouched
    enc = onnx.load(str(result.encoder.path), load_external_data=False)
    assert enc.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    reports = compare_precisions(
        engine_dir, tmp_path / "fp16", example_inputs(sd.unet, LATENT, TEXT), torch.tensor([900.0, 20.0])
    )
    for report in reports.values():
        assert report.finite
        assert report.worst_relative < 1e-2
    with pytest.raises(EngineMismatchError, match="float16.*--precision fp32"):
        OrtRunner(tmp_path / "fp16", dtype="fp32").activate()
    with OrtRunner(tmp_path / "fp16") as r:
        assert r.dtype == torch.float16
        sample, t, text = _inputs(2)
        assert r.decode(r.encode(sample, t, text), t[:1], text).dtype == torch.float32


def test_external_data_export_runs(sd, tmp_path, split):
    result = export_unet(
        sd.unet, tmp_path / "ext", latent_size=LATENT, text_shape=TEXT, external_data_threshold=0, progress=False
    )
    assert result.decoder.data_path is not None and result.decoder.data_path.is_file()
    sample, t, text = _inputs(2)
    with OrtRunner(tmp_path / "ext") as r:
        got = r.decode(r.encode(sample, t, text), t[:1], text)
    with torch.no_grad():
        want = split.run_decoder(split.run_encoder(sample, t, text), t[:1].expand(2), text)
    assert rel_err(got, want) < REL_TOL


def test_import_fd_trt_loads_no_onnx():
    code = (
        "import sys, fd_trt, fd_trt.graphs.export, fd_trt.graphs.manifest, fd_trt.graphs.build, "
        "fd_trt.backends.onnxruntime;"
        "bad = [m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'polygraphy') if m in sys.modules];"
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_bad_arguments_name_the_value():
    from fd_trt.errors import InputError

    with pytest.raises(InputError, match="opset 11"):
        export_unet(tiny_sd_pipeline().unet, "/nonexistent-never-created", latent_size=LATENT, opset=11)
    with pytest.raises(InputError, match="does not exist"):
        OrtRunner("/nonexistent-engine-dir")
    with pytest.raises(FdTrtError, match="CUDAExecutionProvider|device"):
        OrtRunner(encoder_path="a.onnx", decoder_path="b.onnx", providers=["cuda"]).activate()


# ---- SDXL-shaped UNets: the added conditioning through export, manifest and runner ----------------
SDXL_LATENT = (16, 12)
SDXL_TEXT = (7, 32)


@pytest.fixture(scope="module")
def sdxl():
    from tiny_sdxl import tiny_sdxl_unet

    return tiny_sdxl_unet("sdxl_base_like")


@pytest.fixture(scope="module")
def sdxl_dir(sdxl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "sdxl"
    build_engines(sdxl, out, latent_size=SDXL_LATENT, text_shape=SDXL_TEXT, model_source="tiny-sdxl", progress=False)
    return out


def test_sdxl_graphs_and_manifest_carry_the_added_conditioning(sdxl, sdxl_dir):
    from fd_trt.graphs.contract import GraphContract

    manifest = check_engine_dir(
        sdxl_dir,
        sdxl,
        latent_size=SDXL_LATENT,
        text_shape=SDXL_TEXT,
        added_shapes={"text_embeds": [24], "time_ids": [6]},
    )
    assert manifest.added_shapes == {"text_embeds": [24], "time_ids": [6]}
    contract = GraphContract.from_manifest(manifest)
    enc = onnx.load(str(sdxl_dir / "encoder.onnx"), load_external_data=False)
    dec = onnx.load(str(sdxl_dir / "decoder.onnx"), load_external_data=False)
    assert [i.name for i in enc.graph.input] == contract.encoder.input_names
    assert contract.encoder.input_names[-2:] == ["text_embeds", "time_ids"]
    assert [i.name for i in dec.graph.input] == contract.decoder.input_names
    assert [o.name for o in dec.graph.output] == ["noise_pred"]
    for model in (enc, dec):
        types = {i.name: i.type.tensor_type for i in model.graph.input}
        assert types["time_ids"].elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_value for d in types["time_ids"].shape.dim[1:]] == [6]
        assert [d.dim_value for d in types["text_embeds"].shape.dim[1:]] == [24]
        assert types["text_embeds"].shape.dim[0].dim_param  # rows stay dynamic
    with pytest.raises(EngineMismatchError, match="added_shapes"):
        check_engine_dir(sdxl_dir, sdxl, added_shapes={"text_embeds": [24], "time_ids": [5]})


def test_sdxl_onnxruntime_matches_torch_over_several_timesteps(sdxl, sdxl_dir):
    from tiny_sdxl import added_conditioning

    g = torch.Generator().manual_seed(5)
    sample, text = torch.randn((2, 4, *SDXL_LATENT), generator=g), torch.randn((2, *SDXL_TEXT), generator=g)
    added = added_conditioning("sdxl_base_like", 2)
    split = split_unet(sdxl)
    with OrtRunner(sdxl_dir, intra_op_threads=2) as r:
        assert r.contract.added_names == ("text_embeds", "time_ids")
        for key in (961.0, 501.0):
            t = torch.full((2,), key)
            steps = torch.tensor([key, key - 40.0, key - 80.0])
            feats = r.encode(sample, t, text, added)
            got = r.decode(feats, steps, text, added)
            with torch.no_grad():
                ref = split.run_encoder(sample, t, text, added)
                rows = {k: v.repeat(3, 1) for k, v in added.items()}
                want = split.run_decoder(ref.repeat(3), steps.repeat_interleave(2), text.repeat(3, 1, 1), rows)
                unet = sdxl(
                    sample.repeat(3, 1, 1, 1), steps.repeat_interleave(2), text.repeat(3, 1, 1), added_cond_kwargs=rows
                ).sample
            for a, b in zip(feats.tensors(), ref.tensors()):
                assert rel_err(a, b) < REL_TOL
            assert rel_err(got, want) < REL_TOL
            assert rel_err(got[:2], unet[:2]) < REL_TOL  # the key step's rows are the whole UNet's
        with pytest.raises(FdTrtError, match="added conditioning"):
            r.encode(sample, torch.full((2,), 500.0), text)


def test_cpu_sessions_do_not_spin_unless_asked(engine_dir):
    # Spinning intra-op threads take the cores from the torch work between two graph calls (the
    # README's measurement: 0.630 s against 0.319 s per image on the default model), so the CPU
    # runner turns spinning off; a caller's session_config still wins.
    def spin_entry(runner):
        opts = runner._make_options(ort)
        return opts.get_session_config_entry("session.intra_op.allow_spinning")

    assert spin_entry(OrtRunner(engine_dir)) == "0"
    asked = OrtRunner(engine_dir, session_config={"session.intra_op.allow_spinning": "1"})
    assert spin_entry(asked) == "1"
    with OrtRunner(engine_dir) as runner:  # the sessions load with it
        x, t, text = _inputs(2)
        assert runner.encode(x, t, text).rows == 2
