"""Text-to-video on onnxruntime: the video UNets' encoder and decoder graphs (latents
``[rows, 4, F, h, w]``, F fixed per graph), their dynamic rows against the torch split, the manifest's
frame count and family, and the pipeline against diffusers' own TextToVideoSDPipeline and
AnimateDiffPipeline (``schedule="all"``) and against the torch backend (``paper``).

One export per family (the pipeline's first use, into a throwaway engine cache, about 10 s each on a
2-core CPU). The default run keeps the text-to-video graphs' checks; AnimateDiff's graphs, the
pipeline runs against diffusers and torch and the command line are slow tests (the module takes
about 45 s with them)."""

import json

import numpy as np
import pytest
import torch

from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.families import family_for_pipeline
from fd_trt.families.video import tiny_animatediff_pipeline, tiny_text_to_video_pipeline
from fd_trt.graphs.split import split_unet
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

PROMPT = "a red circle moving to the left"
FRAMES = 3
TEXT = (16, 16)
LATENT = (8, 8)
BUILDERS = {"text-to-video": tiny_text_to_video_pipeline, "animatediff": tiny_animatediff_pipeline}


def rel_max(a, b):
    """max |a - b| relative to b's largest value (the latents reach about 20 on these random models)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A throwaway engine cache for the module: graphs built on first use go there."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("video_engines")
        mp.setenv("FD_TRT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module", params=["text-to-video", pytest.param("animatediff", marks=pytest.mark.slow)])
def video_ort(request, cache):
    """``(name, diffusers pipeline, torch fd_trt pipeline, onnxruntime fd_trt pipeline)``; the
    onnxruntime graphs of 3 frames of 64x64 are built ahead (``prepare``) into the module's cache."""
    name = request.param
    sd = BUILDERS[name](seed=0)
    fd_torch = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cpu", progress=False)
    fd_ort = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    fd_ort.prepare(num_frames=FRAMES)
    yield name, sd, fd_torch, fd_ort
    fd_ort.close()


# the graphs --------------------------------------------------------------------------------------
def test_the_video_graphs_follow_the_contract_and_the_manifest_records_frames_and_family(video_ort, cache):
    name, sd, _, fd_ort = video_ort
    runner = fd_ort.runner
    assert runner.name == "onnxruntime"
    folder = runner.engine_dir
    assert folder.parent == cache and f"-f{FRAMES}-8x8-" in folder.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["frames"] == FRAMES and manifest["family"] == name
    assert manifest["latent_shape"] == [4, *LATENT] and manifest["text_shape"] == list(TEXT)
    contract = family_for_pipeline(sd).graph_contract(sd, LATENT, frames=FRAMES)
    assert runner.contract == contract and contract.frames == FRAMES
    assert contract.encoder.tensor("sample").shape == ("rows", 4, FRAMES, *LATENT)
    assert contract.decoder.tensor("noise_pred").shape == ("step_rows", 4, FRAMES, *LATENT)
    # The graphs' own shapes: every dim but the rows fixed, and the features [rows, C, F, h', w'],
    # as the torch split returns them.
    enc = runner._enc.session
    assert enc.get_inputs()[0].shape == ["rows", 4, FRAMES, *LATENT]
    with torch.no_grad():
        split_feats = split_unet(sd.unet).run_encoder(
            torch.zeros(2, 4, FRAMES, *LATENT), torch.full((2,), 500.0), torch.zeros(2, *TEXT)
        )
    graph_tails = [tuple(o.shape[1:]) for o in enc.get_outputs()]
    assert graph_tails == [tuple(t.shape[1:]) for t in split_feats.tensors()]
    assert graph_tails == [tuple(t.tail) for t in contract.encoder.outputs]
    assert all(t[1] == FRAMES for t in graph_tails)
    dec = runner._dec.session
    assert [i.shape[0] for i in dec.get_inputs()] == ["rows"] * (len(graph_tails)) + ["step_rows", "rows"]
    assert dec.get_outputs()[0].shape == ["step_rows", 4, FRAMES, *LATENT]


@pytest.mark.parametrize("rows", [1, 3])
def test_the_graphs_take_any_rows_and_steps_and_equal_the_torch_split(video_ort, rows):
    """Dynamic rows: the encoder at 1 and 3 rows (videos), the decoder at 1 and 4 steps of those
    rows (step-major, one timestep per step row), against the torch runner on the same inputs."""
    _, _, fd_torch, fd_ort = video_ort
    ort, ref = fd_ort.runner, fd_torch.runner
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4, FRAMES, *LATENT, generator=g)
    t = torch.linspace(900.0, 300.0, rows)
    text = torch.randn(rows, *TEXT, generator=g)
    feats, ref_feats = ort.encode(x, t, text), ref.encode(x, t, text)
    assert feats.rows == rows and feats.mid.shape[2] == FRAMES
    errors = []
    for got, want in zip(feats.tensors(), ref_feats.tensors()):
        assert got.shape == want.shape
        errors.append(rel_max(got, want))
    for steps in (1, 4):
        timesteps = torch.linspace(800.0, 100.0, steps)
        got, want = ort.decode(feats, timesteps, text), ref.decode(ref_feats, timesteps, text)
        assert got.shape == want.shape == (steps * rows, 4, FRAMES, *LATENT)
        errors.append(rel_max(got, want))
        assert want.abs().max().item() > 0.1  # not a vacuous comparison
    print(f"{video_ort[0]} rows={rows}: worst relative error {max(errors):.1e}")
    assert max(errors) < 1e-4
    # Other latents than the graph's are refused naming both shapes, not run.
    with pytest.raises(InputError, match=rf"sample has shape \({rows}, 4, 2, 8, 8\).*{FRAMES} frames.*--frames F"):
        ort.encode(x[:, :, :2], t, text)


# engine directories ------------------------------------------------------------------------------
def test_a_directory_of_another_frame_count_or_family_is_refused_with_the_rebuild_command(video_ort):
    from fd_trt.graphs.manifest import check_engine_dir, expected_manifest, load_manifest, stale_fields

    name, sd, fd_torch, fd_ort = video_ort
    folder = fd_ort.runner.engine_dir
    kw = dict(latent_size=LATENT, text_shape=TEXT, unet_sha256=fd_ort.unet_sha256)
    assert check_engine_dir(folder, sd.unet, frames=FRAMES, family=name, **kw).frames == FRAMES
    with pytest.raises(EngineMismatchError, match=r"frames \(built for 3 frames, asked for 2 frames\).*--frames 2"):
        check_engine_dir(folder, sd.unet, frames=2, **kw)
    with pytest.raises(EngineMismatchError, match=r"frames \(built for 3 frames, asked for images \(no frames\)\)"):
        check_engine_dir(folder, sd.unet, frames=0, **kw)
    other = "animatediff" if name == "text-to-video" else "text-to-video"
    with pytest.raises(EngineMismatchError, match=rf"family \(built for '{name}', asked for '{other}'\)"):
        check_engine_dir(folder, sd.unet, frames=FRAMES, family=other, **kw)
    # A build for another frame count finds the directory stale.
    wanted = expected_manifest(sd.unet, frames=2, family=name, **kw)
    assert any(p.startswith("frames") for p in stale_fields(wanted, load_manifest(folder)))
    # Through the pipeline: engines= of 3 frames runs 3 frames, and refuses 2.
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend="onnxruntime", device="cpu", engines=folder, progress=False
    )
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="latent", schedule="all")
    got = pipe(PROMPT, num_frames=FRAMES, generator=torch.Generator().manual_seed(9), **kw)
    want = fd_torch(PROMPT, num_frames=FRAMES, generator=torch.Generator().manual_seed(9), **kw)
    assert got.stats.backend == "onnxruntime" and rel_max(got.latents, want.latents) < 1e-4
    with pytest.raises(EngineMismatchError, match=r"frames \(built for 3 frames, asked for 2 frames\).*--frames 2"):
        pipe(PROMPT, num_frames=2, **kw)
    pipe.close()


def test_export_needs_the_frame_count_of_a_video_unet_and_refuses_one_for_an_image_unet(video_ort, tiny_sd, tmp_path):
    from fd_trt.graphs.build import build_engines
    from fd_trt.graphs.export import export_unet

    _, sd, _, _ = video_ort
    with pytest.raises(InputError, match=r"video latents \[rows, C, F, h, w\].*pass frames=F"):
        export_unet(sd.unet, tmp_path, latent_size=LATENT, text_shape=TEXT)
    with pytest.raises(InputError, match="frames must be a positive integer.*got 0"):
        build_engines(sd.unet, tmp_path, latent_size=LATENT, text_shape=TEXT, frames=0)
    with pytest.raises(InputError, match="frames=3 is for text-to-video UNets.*leave frames unset"):
        export_unet(tiny_sd.unet, tmp_path, latent_size=LATENT, frames=3)
    assert not any(tmp_path.iterdir())  # refused before anything was written


# the pipeline against diffusers and the torch backend ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_all_on_onnxruntime_equals_diffusers_video_pipeline(video_ort, guidance_scale):
    _, sd, fd_torch, fd_ort = video_ort
    kw = dict(num_frames=FRAMES, num_inference_steps=6, guidance_scale=guidance_scale, output_type="np")
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(3), **kw).frames
    out = fd_ort(PROMPT, generator=torch.Generator().manual_seed(3), schedule="all", **kw)
    assert out.stats.backend == "onnxruntime"
    assert out.stats.encoder_calls == 6 and out.stats.decoder_calls == 6
    assert out.frames.shape == ref.shape == (1, FRAMES, 64, 64, 3)
    frames_err = np.abs(out.frames - ref).max()
    # The latents (about 20 at most here) relative to their scale, against the torch backend,
    # which equals diffusers' latents within 1e-5 (tests/test_video.py).
    latents = fd_torch(PROMPT, generator=torch.Generator().manual_seed(3), schedule="all", **kw).latents
    latents_err = rel_max(out.latents, latents)
    print(f"{video_ort[0]} all g={guidance_scale}: frames {frames_err:.1e}, latents {latents_err:.1e}")
    assert frames_err < 1e-4  # frames in [0, 1]
    assert latents_err < 1e-4


@pytest.mark.slow
def test_paper_on_onnxruntime_equals_the_torch_backend(video_ort):
    """A propagating schedule: each segment's steps decoded in one call of several step rows."""
    _, _, fd_torch, fd_ort = video_ort
    kw = dict(num_frames=FRAMES, num_inference_steps=20, guidance_scale=7.5, output_type="latent", schedule="paper")
    out = fd_ort(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    assert out.stats.key_steps == ref.stats.key_steps == [0, 1, 2, 3, 5, 10, 15]
    assert out.stats.decoder_calls == 7 and out.stats.decoder_rows == 2 * 20
    # The decoder row cap still counts frames: 2 CFG rows x 3 frames x 2 steps per call at most.
    capped = fd_ort(PROMPT, generator=torch.Generator().manual_seed(5), max_decoder_rows=12, **kw)
    assert capped.stats.decoder_calls == 13  # segments of 1, 1, 1, 2, 5, 5, 5 steps, 2 per call
    errors = rel_max(out.latents, ref.latents), rel_max(capped.latents, ref.latents)
    print(f"{video_ort[0]} paper: {errors[0]:.1e}, capped {errors[1]:.1e}")
    assert max(errors) < 1e-4


@pytest.mark.parametrize("schedule", ["deepcache:3", "combined:0,4|uniform:2|1", "combined:0,5|none|2"])
def test_decoder_schedules_on_onnxruntime_equal_the_torch_backend(video_ort, schedule):
    """Shallow steps on the 5-D graphs: the capture and shallow graphs of the depth (and ``conv_in``'s
    at depth 1) are exported into the engine directory on first use, with the video's frames; the
    torch backend is checked against an independent loop in tests/test_video.py."""
    from fd_trt.graphs.manifest import load_manifest

    _, _, fd_torch, fd_ort = video_ort
    kw = dict(num_frames=FRAMES, num_inference_steps=9, guidance_scale=7.5, output_type="latent", schedule=schedule)
    out = fd_ort(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    assert out.stats.backend == "onnxruntime" and out.stats.key_steps == ref.stats.key_steps
    assert out.stats.shallow_calls == ref.stats.shallow_calls and out.stats.shallow_rows == ref.stats.shallow_rows > 0
    depth = 2 if schedule.endswith("|2") else 1
    graphs = load_manifest(fd_ort.runner.engine_dir).graphs
    roles = {f"decoder_capture_d{depth}", f"shallow_d{depth}"} | ({"input_conv"} if depth == 1 else set())
    assert roles <= set(graphs)
    err = rel_max(out.latents, ref.latents)
    print(f"{video_ort[0]} {schedule}: {err:.1e}")
    assert err < 1e-4


# the command line --------------------------------------------------------------------------------
@pytest.mark.slow
def test_fd_trt_build_frames_and_generate_on_onnxruntime(tmp_path, capsys):
    """``fd-trt build --frames F`` builds a video engine directory (refused without --frames), and
    ``fd-trt generate --backend onnxruntime --engines DIR`` runs it at F frames and refuses another F."""
    from fd_trt.cli import main

    folder = tmp_path / "t2v"
    tiny_text_to_video_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "eng"
    build = ["build", "--model", str(folder), "--out", str(out), "--quiet"]
    assert main(build) == 2
    assert "pass --frames F" in capsys.readouterr().err
    assert not out.exists()
    # a decoder schedule builds its capture, shallow and conv_in graphs too
    assert main([*build, "--frames", "2", "--schedule", "deepcache:3"]) == 0
    assert "latents [4, 8, 8] x 2 frames" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["frames"], manifest["family"]) == (2, "text-to-video")
    assert {"decoder_capture_d1", "shallow_d1", "input_conv"} <= set(manifest["graphs"])
    clip = tmp_path / "clip.gif"
    gen = ["generate", PROMPT, "--model", str(folder), "--backend", "onnxruntime", "--engines", str(out)]
    gen += ["--steps", "4", "--schedule", "deepcache:2", "--quiet", "--out", str(clip)]
    assert main([*gen, "--frames", "2"]) == 0
    assert "backend: onnxruntime" in capsys.readouterr().out and clip.is_file()
    assert main([*gen, "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert "frames (built for 2 frames, asked for 3 frames)" in err and "--frames 3" in err
