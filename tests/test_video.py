"""Text-to-video (ModelScope / VideoFusion's UNet3DConditionModel, AnimateDiff's UNetMotionModel):
the families, the split of both 3D UNets, and conformance on tiny random pipelines with diffusers'
own TextToVideoSDPipeline and AnimateDiffPipeline (``schedule="all"``) and with an independent
Faster Diffusion loop written here (``uniform:3``, ``paper``)."""

import json

import numpy as np
import pytest
import torch

from fd_trt.core.schedule import parse_schedule
from fd_trt.errors import BackendUnavailableError, InputError, UnsupportedModelError
from fd_trt.families import family_for_config, family_for_pipeline
from fd_trt.families.models import read_unet_config
from fd_trt.families.video import tiny_animatediff_pipeline, tiny_text_to_video_pipeline
from fd_trt.graphs.split import split_unet, up_layers
from fd_trt.graphs.split_video import VideoSplitUNet
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.video import FasterDiffusionVideoPipeline

PROMPT = "a red circle moving to the left"
FRAMES = 3
BUILDERS = {"text-to-video": tiny_text_to_video_pipeline, "animatediff": tiny_animatediff_pipeline}


@pytest.fixture(autouse=True)
def _shallow_reuse_on_tiny_unets(monkeypatch):
    """The tiny video UNets are below the size from which a shallow step keeps the hidden half of
    its first convolutions: turn it on, so that the decoder-schedule tests run it against their
    references."""
    import fd_trt.graphs.split as split_module

    monkeypatch.setattr(split_module, "SHALLOW_REUSE_MIN_MACS", 0)


@pytest.fixture(scope="module", params=list(BUILDERS))
def video_pair(request):
    """``(family name, diffusers pipeline, fd_trt pipeline)`` for each video family."""
    sd = BUILDERS[request.param](seed=0)
    fd = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cpu", progress=False)
    return request.param, sd, fd


def per_frame_text(unet, text, frames):
    """diffusers' AnimateDiffPipeline feeds its UNetMotionModel one prompt row per frame."""
    return text.repeat_interleave(frames, dim=0) if type(unet).__name__ == "UNetMotionModel" else text


# the families ------------------------------------------------------------------------------------
def test_both_families_are_recognised_and_served_by_the_video_pipeline(video_pair, tmp_path):
    name, sd, fd = video_pair
    assert family_for_pipeline(sd).name == name
    assert type(fd) is FasterDiffusionVideoPipeline
    assert fd.backend == "torch"
    (tmp_path / "unet").mkdir()
    config = {**dict(sd.unet.config), "_class_name": type(sd.unet).__name__}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    folder_config = read_unet_config(tmp_path)
    family = family_for_config(folder_config)
    assert family.name == name
    family.check_config(folder_config)
    assert fd.text_shape() == (16, 16)


def test_unsupported_video_options_and_backends_are_refused_naming_the_fix(video_pair):
    name, sd, _ = video_pair
    family = family_for_pipeline(sd)
    with pytest.raises(UnsupportedModelError, match="time_cond_proj_dim=8"):
        family.check_config({**dict(sd.unet.config), "time_cond_proj_dim": 8})
    with pytest.raises(UnsupportedModelError, match="takes 4 input channels and predicts 8"):
        family.check_config({**dict(sd.unet.config), "out_channels": 8})
    # TensorRT runs them (tests/test_tensorrt_video.py); without TensorRT or a GPU it says what is missing.
    # (Which message depends on what the process has imported: where only TensorRT's type stubs are
    # importable, the import check names them.)
    with pytest.raises(
        (BackendUnavailableError, InputError), match=r"the tensorrt backend|is not TensorRT \(only its type stubs"
    ):
        FasterDiffusionPipeline.from_diffusers(sd, backend="tensorrt", device="cpu")
    # The graphs fix the frame count (tests/test_video_onnx.py runs them).
    with pytest.raises(InputError, match="pass frames=F"):
        family.graph_contract(sd)
    contract = family.graph_contract(sd, (8, 8), frames=FRAMES)
    assert contract.encoder.tensor("sample").shape == ("rows", 4, FRAMES, 8, 8)
    assert contract.encoder.tensor("mid").shape == ("rows", 32, FRAMES, 4, 4)
    assert contract.decoder.tensor("timestep").shape == ("step_rows",)
    assert contract.decoder.tensor("noise_pred").shape == ("step_rows", 4, FRAMES, 8, 8)
    ort = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    assert ort.backend == "onnxruntime"  # graphs are built on the first call, not here
    auto = FasterDiffusionPipeline.from_diffusers(sd, backend="auto", device="cpu", progress=False)
    assert auto.backend == "torch"
    from fd_trt.tools.calibrate import calibrate

    with pytest.raises(InputError, match="does not run text-to-video models yet: pass schedule='paper'"):
        calibrate(auto, scheduler="ddim", key_steps=3, steps=6, prompts=[PROMPT])
    from fd_trt.serving.runtime import ServingRuntime

    with pytest.raises(InputError, match="the server serves image models; this is a text-to-video model"):
        ServingRuntime(auto, warmup=False, start=False)


def test_a_video_manifest_records_frames_and_family_and_refuses_another_frame_count(video_pair, tmp_path):
    """The engine directory's checks, without an export (tests/test_video_onnx.py exports and runs)."""
    from fd_trt.errors import EngineMismatchError
    from fd_trt.graphs.contract import GraphContract
    from fd_trt.graphs.manifest import GraphRecord, check_engine_dir, expected_manifest, load_manifest, save_manifest

    name, sd, _ = video_pair
    shapes = dict(latent_size=(8, 8), text_shape=(16, 16))
    manifest = expected_manifest(sd.unet, frames=FRAMES, family=name, **shapes)
    assert manifest.frames == FRAMES and manifest.family == name and manifest.latent_shape == [4, 8, 8]
    manifest.graphs = {r: GraphRecord(file=f"{r}.onnx", sha256="0" * 64, bytes=1) for r in ("encoder", "decoder")}
    save_manifest(tmp_path, manifest)
    found = load_manifest(tmp_path)
    assert (found.frames, found.family) == (FRAMES, name)
    assert GraphContract.from_manifest(found) == family_for_pipeline(sd).graph_contract(sd, (8, 8), frames=FRAMES)
    with pytest.raises(EngineMismatchError, match=r"frames \(built for 3 frames, asked for 2 frames\).*--frames 2"):
        check_engine_dir(tmp_path, frames=2, **shapes)
    with pytest.raises(EngineMismatchError, match=r"family \(built for '.+', asked for 'sd'\)"):
        check_engine_dir(tmp_path, frames=FRAMES, family="sd", **shapes)
    with pytest.raises(InputError, match="pass frames=F"):
        expected_manifest(sd.unet, **shapes)


# the split ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 3])
def test_the_split_of_a_video_unet_is_exact(video_pair, frames):
    _, sd, _ = video_pair
    unet = sd.unet
    split = split_unet(unet)
    assert isinstance(split, VideoSplitUNet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 8, 8, generator=g)
    t = torch.tensor([901.0, 41.0])
    text = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        feats = split.run_encoder(x, t, text)
        assert all(f.shape[:1] == (2,) and f.shape[2] == frames for f in feats.tensors())  # [B, C, F, h, w]
        got = split.run_decoder(feats, t, text)
        ref = unet(x, t, encoder_hidden_states=per_frame_text(unet, text, frames)).sample
    assert got.shape == ref.shape == (2, 4, frames, 8, 8)
    assert (got - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.1  # not a vacuous comparison


def test_one_decoder_call_over_steps_equals_the_unet_at_each_step(video_pair):
    """Rows are steps x videos, every row with all its frames: the decoder over S timesteps from one
    key step's features equals the UNet run with that step's time embedding and the key step's
    encoder features (hooks replay them)."""
    _, sd, fd = video_pair
    unet = sd.unet
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, FRAMES, 8, 8, generator=g)
    text = torch.randn(2, 16, 16, generator=g)
    key_t, steps = torch.tensor([700.0, 700.0]), torch.tensor([700.0, 500.0, 300.0])
    runner = fd.runner
    feats = runner.encode(x, key_t, text)
    got = runner.decode(feats, steps, text).split(2)
    assert len(got) == 3
    modules = [unet.conv_in, *unet.down_blocks, unet.mid_block, getattr(unet, "transformer_in", None)]
    cache, replay = {}, {"on": False}

    def hook(module, args, out):
        if replay["on"]:
            return cache[id(module)]
        cache[id(module)] = out
        return out

    handles = [m.register_forward_hook(hook) for m in modules if m is not None]
    try:
        with torch.no_grad():
            unet(x, key_t, encoder_hidden_states=per_frame_text(unet, text, FRAMES))
            replay["on"] = True
            for s, eps in zip(steps, got):
                ref = unet(x, s.expand(2), encoder_hidden_states=per_frame_text(unet, text, FRAMES)).sample
                assert (eps - ref).abs().max().item() < 1e-5
    finally:
        for h in handles:
            h.remove()


# conformance with diffusers ----------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_all_equals_diffusers_video_pipeline_on_torch(video_pair, guidance_scale):
    _, sd, fd = video_pair
    kw = dict(num_frames=FRAMES, num_inference_steps=6, guidance_scale=guidance_scale, output_type="np")
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(3), **kw).frames
    out = fd(PROMPT, generator=torch.Generator().manual_seed(3), schedule="all", **kw)
    assert out.frames.shape == ref.shape == (1, FRAMES, 64, 64, 3)
    assert np.abs(out.frames - ref).max() < 1e-5
    assert out.stats.encoder_calls == 6 and out.stats.decoder_calls == 6
    # the same latents given, diffusers' own latents path
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(4))
    ref_lat = sd(PROMPT, latents=latents.clone(), **{**kw, "output_type": "latent"}).frames
    out_lat = fd(PROMPT, latents=latents.clone(), schedule="all", **{**kw, "output_type": "latent"})
    assert (out_lat.frames - ref_lat).abs().max().item() < 1e-5


def _deep_modules(unet, d):
    """The modules of the up layers before the decoder's last ``d`` (every up layer for ``d=0``):
    each layer's resnet with the temporal layers and attentions after it, and the upsamplers."""
    layers = up_layers(unet.up_blocks)
    mods = []
    for i, j in layers[: len(layers) - d]:
        block = unet.up_blocks[i]
        for name in ("resnets", "temp_convs", "attentions", "temp_attentions", "motion_modules"):
            if hasattr(block, name):
                mods.append(getattr(block, name)[j])
        if j == len(block.resnets) - 1 and block.upsamplers is not None:
            mods.extend(block.upsamplers)
    return mods


def independent_loop(
    pipe, steps, guidance_scale, seed, key_steps, frames=FRAMES, alpha=0.003, depths=None, fresh=False, noise=True
):
    """Faster Diffusion written over diffusers' own video UNet forward: at a key step the UNet runs
    whole and its conv_in, transformer_in, down-block and mid-block outputs are recorded; at the
    other steps forward hooks replace them with the key step's, so only the time embedding and the
    up path see the new timestep. With ``depths`` (one per step), a step of depth ``d > 0`` also
    replays the up layers before the last ``d`` from the last step of depth 0 (DeepCache's reuse
    of the deep up path); with ``fresh`` such a step recomputes conv_in and transformer_in from
    its own latents. One UNet call per step; prior noise injection (alpha x_T for t < 500, when
    ``noise``) in latent space; DDIM on the video latents."""
    unet, scheduler = pipe.unet, pipe.scheduler
    depths = depths or [0] * steps
    generator = torch.Generator().manual_seed(seed)
    pos, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
    text = per_frame_text(unet, torch.cat([neg, pos]), frames)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, frames, 8, 8, generator=generator) * scheduler.init_noise_sigma
    x_T = x.clone()
    first = [m for m in (unet.conv_in, getattr(unet, "transformer_in", None)) if m is not None]
    encoder = [*first, *unet.down_blocks, unet.mid_block]
    every_deep = _deep_modules(unet, 0)
    cache, replay, record = {}, set(), set()

    def hook(module, args, out):
        if id(module) in replay:
            return cache[id(module)]
        if id(module) in record:
            cache[id(module)] = out
        return out

    handles = [m.register_forward_hook(hook) for m in encoder + every_deep]
    try:
        for i, t in enumerate(scheduler.timesteps):
            key, depth = i in key_steps, depths[i]
            replay = set() if key else {id(m) for m in encoder if not (depth and fresh and m in first)}
            replay |= {id(m) for m in _deep_modules(unet, depth)} if depth else set()
            record = ({id(m) for m in encoder} if key else set()) | (
                {id(m) for m in every_deep} if not depth else set()
            )
            with torch.no_grad():
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            if noise and float(t) < 500:
                x = x + alpha * x_T
            x = scheduler.step(eps, t, x).prev_sample
    finally:
        for h in handles:
            h.remove()
    return x


@pytest.mark.parametrize(
    "schedule, keys", [("uniform:3", [0, 3, 6]), pytest.param("paper", None, marks=pytest.mark.slow)]
)
def test_key_step_schedules_equal_an_independent_faster_diffusion_loop(video_pair, schedule, keys):
    _, sd, fd = video_pair
    steps = 9
    out = fd(
        PROMPT,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        schedule=schedule,
    )
    if keys is not None:
        assert out.stats.key_steps == keys
    assert len(out.stats.key_steps) < steps  # propagated features at some steps
    assert out.stats.decoder_calls == len(out.stats.key_steps)  # one batched decoder call per segment
    ref = independent_loop(sd, steps, 7.5, seed=5, key_steps=set(out.stats.key_steps))
    # the latents (of magnitude ~10 here) within float32 rounding, the frames within 1e-5
    assert (out.latents - ref).abs().max().item() < 1e-6 * ref.abs().max().item() * 10
    with torch.no_grad():
        ref_frames = sd.video_processor.postprocess_video(video=sd.decode_latents(ref), output_type="np")
    assert np.abs(out.frames - ref_frames).max() < 1e-5
    # and the propagation is not a no-op: every step's own encoder gives other latents
    full = independent_loop(sd, steps, 7.5, seed=5, key_steps=set(range(steps)))
    assert (full - ref).abs().max().item() > 1e-3


def assert_shallow_ends_equal_the_decoder(unet, seed):
    """The layer-by-layer decoder with the hidden states captured equals the decoder, and so does the
    last ``d`` up layers from the captured state, at every depth; ``conv_in`` (+ ``transformer_in``)
    of the latents is ``skip_00``."""
    split = split_unet(unet)
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, FRAMES, 8, 8, generator=g), torch.tensor([800.0, 200.0])
    text = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        feats = split.run_encoder(x, t, text)
        mid = feats.mid.clone()
        whole = split.run_decoder(feats, t, text)
        assert torch.equal(feats.mid, mid)  # the propagated features stay as the encoder left them
        n_layers = split.num_up_layers
        assert n_layers == len(up_layers(unet.up_blocks)) == split.num_skips
        noise, hidden = split.run_decoder_capture(feats, t, text, None, tuple(range(1, n_layers + 1)))
        assert torch.equal(noise, whole)
        for d in range(1, n_layers + 1):
            assert hidden[d].shape[:3] == (2, hidden[d].shape[1], FRAMES)  # [N, C, F, h, w]
            shallow = split.run_decoder_shallow(hidden[d], feats.skips[:d], t, text)
            assert float((shallow - whole).norm() / whole.norm()) < 1e-6, d  # the hidden half apart: one sum reordered
        assert torch.equal(hidden[n_layers], feats.mid)
        assert torch.equal(split.run_input_conv(x), feats.skips[0])


def test_the_shallow_end_of_a_video_decoder_from_captured_hidden_equals_the_decoder(video_pair):
    assert_shallow_ends_equal_the_decoder(video_pair[1].unet, seed=8)


@pytest.mark.parametrize(
    "spec, noise",
    [
        ("deepcache:3", False),  # DeepCache's branch 0: shallow steps one at a time from their own conv_in
        ("combined:0,4|uniform:2|1", True),  # shallow steps batched, reading the key step's skips
        ("combined:0,5|none|2", True),
    ],
)
def test_decoder_schedules_on_video_equal_an_independent_loop(video_pair, spec, noise):
    _, sd, fd = video_pair
    steps = 9
    schedule = parse_schedule(spec, steps)
    out = fd(
        PROMPT,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        schedule=spec,
    )
    assert out.stats.key_steps == list(schedule.key_steps)
    assert out.stats.shallow_rows == 2 * len(schedule.shallow_steps)  # CFG rows x shallow steps
    if not schedule.fresh_input:  # one batched shallow call per segment
        assert out.stats.shallow_calls == len(schedule.key_steps)
    ref = independent_loop(
        sd,
        steps,
        7.5,
        seed=5,
        key_steps=set(schedule.key_steps),
        depths=list(schedule.depths),
        fresh=schedule.fresh_input,
        noise=noise,
    )
    assert (out.latents - ref).abs().max().item() < 1e-6 * ref.abs().max().item() * 10
    # the reuse is not a no-op: encoder propagation alone at the same key steps gives other latents
    plain = independent_loop(sd, steps, 7.5, seed=5, key_steps=set(schedule.key_steps), noise=noise)
    assert (plain - ref).abs().max().item() > 1e-3


def test_freeu_runs_as_in_diffusers_video_pipelines_also_on_shallow_steps(video_pair):
    _, sd, fd = video_pair
    kw = dict(num_frames=FRAMES, num_inference_steps=4, guidance_scale=7.5, output_type="latent")
    plain = fd(PROMPT, generator=torch.Generator().manual_seed(3), schedule="all", **kw).latents
    sd.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        ref = sd(PROMPT, generator=torch.Generator().manual_seed(3), **kw).frames
        out = fd(PROMPT, generator=torch.Generator().manual_seed(3), schedule="all", **kw).latents
        assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
        assert (plain - ref).abs().max().item() > 1e-3  # FreeU changes the result
        # FreeU scales a layer's input once, not again on a captured state, nor the propagated mid features
        assert_shallow_ends_equal_the_decoder(sd.unet, seed=9)
    finally:
        sd.unet.disable_freeu()


def test_the_decoder_row_cap_counts_frames(video_pair):
    _, _, fd = video_pair
    kw = dict(
        num_frames=FRAMES,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(6),
        output_type="latent",
        schedule="uniform:3",
    )
    whole = fd(PROMPT, **kw)
    assert whole.stats.key_steps == [0, 3]
    assert whole.stats.decoder_calls == 2
    # one step is 2 rows (CFG) x 3 frames = 6 frames: a cap of 13 frames decodes 2 steps per call
    capped = fd(PROMPT, max_decoder_rows=13, **{**kw, "generator": torch.Generator().manual_seed(6)})
    assert capped.stats.decoder_calls == 4
    # Other batch sizes sum in another order: equal to float rounding, relative to the latents'
    # size (they reach about 20 on these random models).
    assert ((capped.latents - whole.latents).abs().max() / whole.latents.abs().max()).item() < 1e-5
    with pytest.raises(InputError, match=r"max_decoder_rows=5 .*at least 6"):
        fd(PROMPT, max_decoder_rows=5, **kw)


def test_output_types_as_diffusers_video_pipelines(video_pair):
    name, sd, fd = video_pair
    kw = dict(num_frames=2, num_inference_steps=2, guidance_scale=1.0)
    pil = fd(PROMPT, generator=torch.Generator().manual_seed(7), output_type="pil", **kw).frames
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(7), output_type="pil", **kw).frames
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][0].size == (64, 64)
    assert np.array_equal(np.asarray(pil[0][1]), np.asarray(ref[0][1]))
    pt = fd(PROMPT, generator=torch.Generator().manual_seed(7), output_type="pt", **kw).frames
    ref_pt = sd(PROMPT, generator=torch.Generator().manual_seed(7), output_type="pt", **kw).frames
    assert pt.shape == ref_pt.shape == (1, 2, 3, 64, 64)
    assert (pt - ref_pt).abs().max().item() < 1e-5
    default = fd(PROMPT, generator=torch.Generator().manual_seed(7), **kw).frames
    assert isinstance(default, np.ndarray) if name == "text-to-video" else isinstance(default[0], list)
    with pytest.raises(InputError, match="output_type must be one of np, pil, pt, latent, got 'gif'"):
        fd(PROMPT, output_type="gif", **kw)
    with pytest.raises(InputError, match="num_frames must be a positive integer, got 0"):
        fd(PROMPT, **{**kw, "num_frames": 0})


# from_pretrained and the command line ------------------------------------------------------------
def test_a_saved_video_folder_loads_and_generate_writes_a_clip(video_pair, tmp_path, capsys):
    import PIL.Image

    from fd_trt.cli import main

    name, sd, _ = video_pair
    folder = tmp_path / name
    sd.save_pretrained(folder, safe_serialization=True)
    fd = FasterDiffusionPipeline.from_pretrained(str(folder), device="cpu", progress=False)
    assert type(fd) is FasterDiffusionVideoPipeline and fd.family.name == name
    kw = dict(num_frames=2, num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(8), **kw).frames
    got = fd(PROMPT, generator=torch.Generator().manual_seed(8), schedule="all", **kw).frames
    assert (got - ref).abs().max().item() < 1e-5  # the saved weights are the wrapped ones
    out = tmp_path / "clip.gif"
    args = ["generate", PROMPT, "--model", str(folder), "--frames", "2", "--steps", "3", "--schedule", "uniform:2"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    with PIL.Image.open(out) as gif:
        assert gif.n_frames == 2 and gif.size == (64, 64)
    assert "key steps: 0,2" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "clip.png"), "--quiet"]) != 0
    assert "name a .gif or .mp4 file" in capsys.readouterr().err
