"""The ControlNet graph: its contract, its export into the engine directory
(manifest record, staleness on a weight change), the onnxruntime runner against the torch
ControlNetModel, and the onnxruntime pipeline against diffusers' StableDiffusionControlNetPipeline."""

import copy

import pytest
import torch
from test_controlnet import _cn_pipeline, control_image, tiny_controlnet

from fd_trt.errors import EngineMismatchError, UnsupportedModelError
from fd_trt.graphs.build import build_controlnet_graph, build_engines
from fd_trt.graphs.contract import (
    CONDITIONING_SCALE,
    CONTROLNET_COND,
    ControlNetContract,
    GraphContract,
    controlnet_factor,
)
from fd_trt.graphs.manifest import check_controlnet_graph, controlnet_key, load_manifest
from fd_trt.graphs.weights import unet_weights_sha256
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"
TOL = 1e-4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def nets(tiny_sd):
    return tiny_controlnet(tiny_sd.unet, 1), tiny_controlnet(tiny_sd.unet, 2)


@pytest.fixture(scope="module")
def engine_dir(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn_engines")
    build_engines(tiny_sd.unet, folder, latent_size=(8, 8), text_shape=(16, 32), progress=False)
    return folder


# contract -----------------------------------------------------------------------------------
def test_contract_is_derived_from_the_controlnet_config_and_fits_the_unet(tiny_sd, nets):
    net = nets[0]
    unet = GraphContract.from_unet_config(tiny_sd.unet.config, (8, 8), (16, 32))
    cn = ControlNetContract.from_controlnet_config(net.config, (8, 8), (16, 32))
    cn.check_fits(unet)
    spec = cn.spec
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", CONTROLNET_COND, CONDITIONING_SCALE]
    assert spec.output_names == [f"down_{i:02d}" for i in range(unet.num_skips)] + ["mid"]
    # The residual shapes are the encoder's feature shapes (mid, skip_00, ..): add_residuals applies unchanged.
    assert [spec.tensor(n).tail for n in ["mid", *cn.down_names]] == [tuple(t) for t in unet.features]
    # The real ControlNet's outputs have those shapes at any row count.
    x, t, e = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 500.0, 10.0]), torch.randn(3, 16, 32)
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=e, controlnet_cond=torch.rand(3, 3, 64, 64), return_dict=False)
    assert [tuple(d.shape) for d in down] == [spec.tensor(n).shape_at(3) for n in cn.down_names]
    assert tuple(mid.shape) == spec.tensor("mid").shape_at(3)
    # Image space: the conditioning embedding's factor (the VAE's, 8) times the latents.
    assert controlnet_factor(net.config) == tiny_sd.vae_scale_factor == 8
    assert spec.tensor(CONTROLNET_COND).shape == ("rows", 3, 64, 64)
    # Every tensor but the scale has the dynamic row axis.
    scale = spec.tensor(CONDITIONING_SCALE)
    assert scale.shape == (1,) and CONDITIONING_SCALE not in spec.dynamic_axes
    assert (
        all(axes == {0: "rows"} for axes in spec.dynamic_axes.values())
        and len(spec.dynamic_axes) == 4 + unet.num_skips + 1
    )


def test_sdxl_and_mismatched_controlnets_are_refused(tiny_sd, nets):
    sdxl_like = {**dict(nets[0].config), "addition_embed_type": "text_time"}
    with pytest.raises(UnsupportedModelError, match="SDXL ControlNet.*backend='torch'"):
        ControlNetContract.from_controlnet_config(sdxl_like, (8, 8), (16, 32))
    other = {**dict(nets[0].config), "block_out_channels": [32, 64, 64]}
    unet = GraphContract.from_unet_config(tiny_sd.unet.config, (8, 8), (16, 32))
    with pytest.raises(UnsupportedModelError, match="ControlNetModel.from_unet"):
        ControlNetContract.from_controlnet_config(other, (8, 8), (16, 32)).check_fits(unet)


# export, manifest, staleness --------------------------------------------------------------------
def test_export_records_the_graph_with_its_own_weights_hash(engine_dir, nets):
    net = nets[0]
    rec = build_controlnet_graph(net, engine_dir, progress=False)
    sha = unet_weights_sha256(net)
    assert rec.controlnet_sha256 == sha and rec.file == f"controlnet-{sha[:16]}.onnx"
    assert (engine_dir / rec.file).stat().st_size == rec.bytes
    manifest = load_manifest(engine_dir)
    assert manifest.controlnets[controlnet_key(sha)] == rec
    assert rec.cond_shape == [3, 64, 64] and rec.num_down == manifest.num_skips
    mtime = (engine_dir / rec.file).stat().st_mtime_ns
    assert build_controlnet_graph(net, engine_dir, progress=False) == rec  # up to date: nothing written
    assert (engine_dir / rec.file).stat().st_mtime_ns == mtime
    assert check_controlnet_graph(engine_dir, net) == rec


def test_a_controlnet_weight_change_makes_its_graph_stale(engine_dir, nets):
    net = copy.deepcopy(nets[0])
    old = build_controlnet_graph(net, engine_dir, progress=False)
    with torch.no_grad():
        net.controlnet_mid_block.weight.add_(0.05)
    with pytest.raises(EngineMismatchError, match="no ControlNet graph for weights .*ControlNet's weights changed"):
        check_controlnet_graph(engine_dir, net)
    new = build_controlnet_graph(net, engine_dir, progress=False)
    assert new.controlnet_sha256 == unet_weights_sha256(net) != old.controlnet_sha256 and new.file != old.file
    # A changed config under the same weights is stale too.
    manifest = load_manifest(engine_dir)
    manifest.controlnets[controlnet_key(new.controlnet_sha256)].controlnet_config["global_pool_conditions"] = True
    from fd_trt.graphs.manifest import save_manifest

    save_manifest(engine_dir, manifest)
    with pytest.raises(EngineMismatchError, match="controlnet_config .*global_pool_conditions"):
        check_controlnet_graph(engine_dir, net)
    assert build_controlnet_graph(net, engine_dir, progress=False).controlnet_config == new.controlnet_config


def test_rebuilding_the_unet_graphs_drops_the_controlnet_graphs(tiny_sd, nets, tmp_path):
    build_engines(tiny_sd.unet, tmp_path, latent_size=(8, 8), text_shape=(16, 32), progress=False)
    rec = build_controlnet_graph(nets[0], tmp_path, progress=False)
    build_engines(tiny_sd.unet, tmp_path, latent_size=(8, 8), text_shape=(16, 32), progress=False, force=True)
    assert not (tmp_path / rec.file).exists() and load_manifest(tmp_path).controlnets == {}


# onnxruntime runner vs torch ControlNetModel ------------------------------------------------------
@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess"])
def test_ort_controlnet_graph_matches_the_torch_controlnet(engine_dir, nets, guess_mode):
    from fd_trt.backends.onnxruntime import OrtRunner

    net = nets[1]
    rec = build_controlnet_graph(net, engine_dir, progress=False)
    gen = _gen(11)
    with OrtRunner(engine_dir, warmup=False) as runner:
        call = runner.controlnet(rec)
        assert runner.controlnet(rec) is call  # one session per graph
        for rows in (2, 3):  # the batch is dynamic
            x, e = torch.randn(rows, 4, 8, 8, generator=gen), torch.randn(rows, 16, 32, generator=gen)
            image = torch.rand(rows, 3, 64, 64, generator=gen)
            t = torch.linspace(950.0, 20.0, rows)
            with torch.no_grad():
                ref_down, ref_mid = net(
                    x,
                    t,
                    encoder_hidden_states=e,
                    controlnet_cond=image,
                    conditioning_scale=0.7,
                    guess_mode=guess_mode,
                    return_dict=False,
                )
            down, mid = call(x, t, e, image, 0.7, guess_mode)
            assert len(down) == len(ref_down)
            for got, want in zip([*down, mid], [*ref_down, ref_mid]):
                assert got.shape == want.shape and rel_l2(got, want) < TOL
        # One timestep for all rows, as the sampler passes a key step's.
        with torch.no_grad():
            ref_down, _ = net(x, torch.tensor(400.0), encoder_hidden_states=e, controlnet_cond=image, return_dict=False)
        down, _ = call(x, torch.tensor(400.0), e, image, 1.0, False)
        assert max(rel_l2(a, b) for a, b in zip(down, ref_down)) < TOL
        assert call.calls == 3


# onnxruntime pipeline vs diffusers ------------------------------------------------------------
def _graph_calls(pipe):
    runner = pipe.runner
    return sum(cn.calls for cn in runner._controlnets.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"controlnet_conditioning_scale": 0.6, "control_guidance_start": 0.2, "control_guidance_end": 0.7},
        {"guess_mode": True},
    ],
    ids=["plain", "scale-window", "guess"],
)
def test_all_on_onnxruntime_with_the_controlnet_graph_reproduces_diffusers(tiny_sd, nets, kwargs):
    sd = _cn_pipeline(tiny_sd, nets[0])
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    common = dict(image=control_image(3), num_inference_steps=20, output_type="latent", **kwargs)
    ref = sd(PROMPT, negative_prompt="blue", generator=_gen(2), **common).images
    out = pipe(PROMPT, negative_prompt="blue", generator=_gen(2), schedule="all", **common)
    assert out.stats.backend == "onnxruntime"
    assert rel_l2(out.images, ref) < TOL
    # The ControlNet ran as the graph, at every step inside its window.
    assert _graph_calls(pipe) == out.stats.controlnet_calls > 0
    pipe.close()


def test_multi_controlnet_on_onnxruntime_runs_one_graph_per_net(tiny_sd, nets):
    from diffusers.models import MultiControlNetModel

    sd = _cn_pipeline(tiny_sd, MultiControlNetModel(list(nets)))
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    common = dict(
        image=[control_image(3), control_image(4)],
        num_inference_steps=20,
        output_type="latent",
        controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0],
    )
    ref = sd(PROMPT, generator=_gen(5), **common).images
    out = pipe(PROMPT, generator=_gen(5), schedule="all", **common)
    assert rel_l2(out.images, ref) < TOL
    manifest = load_manifest(pipe.runner.engine_dir)
    assert {r.controlnet_sha256 for r in manifest.controlnets.values()} >= {unet_weights_sha256(n) for n in nets}
    assert [cn.calls for cn in pipe.runner._controlnets.values()] == [12, 14]
    pipe.close()


def test_paper_on_onnxruntime_runs_the_controlnet_graph_once_per_encoder_call(tiny_sd, nets):
    sd = _cn_pipeline(tiny_sd, nets[0])
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    out = pipe(
        PROMPT,
        image=control_image(3),
        num_inference_steps=50,
        generator=_gen(1),
        output_type="latent",
        schedule="paper",
    )
    torch_out = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)(
        PROMPT,
        image=control_image(3),
        num_inference_steps=50,
        generator=_gen(1),
        output_type="latent",
        schedule="paper",
    )
    assert out.stats.controlnet_calls == out.stats.encoder_calls == 9 == _graph_calls(pipe)
    assert rel_l2(out.images, torch_out.images) < TOL  # the torch backend's key-step ControlNet, same numbers
    pipe.close()


def test_without_build_on_demand_a_changed_controlnet_is_refused(tiny_sd, nets):
    net = copy.deepcopy(nets[0])
    sd = _cn_pipeline(tiny_sd, net)
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    common = dict(image=control_image(3), num_inference_steps=4, output_type="latent", schedule="all")
    pipe(PROMPT, generator=_gen(1), **common)
    with torch.no_grad():
        net.controlnet_down_blocks[0].weight.mul_(1.5)
    pipe.build_on_demand = False
    with pytest.raises(EngineMismatchError, match="ControlNet"):
        pipe(PROMPT, generator=_gen(1), **common)
    # With building on (the default) the new weights get their own graph, and the result follows them.
    pipe.build_on_demand = True
    out = pipe(PROMPT, generator=_gen(1), **common)
    ref = sd(PROMPT, generator=_gen(1), image=control_image(3), num_inference_steps=4, output_type="latent").images
    assert rel_l2(out.images, ref) < TOL
    pipe.close()


def test_auto_runs_the_controlnet_graph_on_the_runner_it_chose(tiny_sd, nets):
    """``backend="auto"`` (the default) chooses after planning; the ControlNet follows its choice."""
    from fd_trt.backends.auto import Candidate

    sd = _cn_pipeline(tiny_sd, nets[0])
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="auto", device="cpu", progress=False)
    pipe.auto_build_graphs, pipe.auto_use_cache = True, False
    pipe.auto_candidates = lambda: [Candidate("onnxruntime", "fp32")]
    common = dict(image=control_image(3), num_inference_steps=10, output_type="latent")
    ref = sd(PROMPT, generator=_gen(4), **common).images
    out = pipe(PROMPT, generator=_gen(4), schedule="all", **common)
    assert out.stats.backend.startswith("auto:onnxruntime")
    assert rel_l2(out.images, ref) < TOL
    ort = pipe.runner.current_runner
    assert sum(cn.calls for cn in ort._controlnets.values()) == out.stats.controlnet_calls == 10
    pipe.close()
