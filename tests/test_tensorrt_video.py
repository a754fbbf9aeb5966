"""Text-to-video (TextToVideoSDPipeline) and AnimateDiff on the TensorRT backend, on a CPU through
``tests/fake_tensorrt.py``: the plans' profiles over the row axes of the 5-D graphs (latents
``[rows, 4, F, h, w]``, frames, height and width fixed), the plans' frame count in the manifest
(a plan of another frame count never runs), the runner's buffers and chunking for 5-D rows, the
pipeline's ``all`` and ``paper`` schedules against the torch backend, and ``fd-trt build
--backend tensorrt --frames F``.

One export per family into a module folder (about 10 s each on a 2-core CPU), with a short decoder
profile (4 steps: rows 1..8), so that a 20-step ``paper`` run and a batch of two videos with CFG
need chunked plan calls. AnimateDiff's runs are slow tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fd_trt.backends.tensorrt import TrtRunner, build_plans
from fd_trt.errors import EngineMismatchError
from fd_trt.families.video import tiny_animatediff_pipeline, tiny_text_to_video_pipeline
from fd_trt.graphs.build import build_engines
from fd_trt.graphs.manifest import load_manifest, save_manifest
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

import fake_tensorrt

PROMPT = "a red circle moving to the left"
FRAMES = 3
TEXT = (16, 16)
LATENT = (8, 8)
MAX_SEGMENT_STEPS = 4
BUILDERS = {"text-to-video": tiny_text_to_video_pipeline, "animatediff": tiny_animatediff_pipeline}


def rel_max(a, b):
    """max |a - b| relative to b's largest value (the latents reach about 20 on these random models)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


@pytest.fixture(scope="module", params=["text-to-video", pytest.param("animatediff", marks=pytest.mark.slow)])
def video(request, tmp_path_factory):
    """``(name, diffusers pipeline, torch fd_trt pipeline, fp32 graphs of 3 frames of 64x64)``."""
    name = request.param
    sd = BUILDERS[name](seed=0)
    folder = tmp_path_factory.mktemp(f"trt_{name}") / "graphs"
    build_engines(
        sd.unet,
        folder,
        latent_size=LATENT,
        text_shape=TEXT,
        precision="fp32",
        max_segment_steps=MAX_SEGMENT_STEPS,
        progress=False,
        frames=FRAMES,
        family=name,
    )
    fd_torch = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cpu", progress=False)
    return name, sd, fd_torch, folder


def _copy(src, dst, plans=True):
    """A copy of an engine directory, without its plans (and timing cache) unless ``plans``."""
    shutil.copytree(src, dst, ignore=None if plans else shutil.ignore_patterns("*.plan", "*.cache"))
    if not plans:
        manifest = load_manifest(dst)
        manifest.plans = {}
        save_manifest(dst, manifest)
    return dst


def _trt_pipe(sd, folder, **kw):
    return FasterDiffusionPipeline.from_diffusers(
        sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=folder, **kw
    )


# plans -------------------------------------------------------------------------------------------
def test_video_plans_profile_the_row_axes_and_record_the_frame_count(trt, video, tmp_path):
    name, _, _, graphs = video
    folder = _copy(graphs, tmp_path / "e", plans=False)
    results = build_plans(folder, opt_segment_steps=3)
    assert [(r.record.role, r.built) for r in results] == [("encoder", True), ("decoder", True)]
    plans = {p.role: p for p in load_manifest(folder).plans.values()}
    assert plans["encoder"].rows == [1, 2, 2] and plans["decoder"].rows == [1, 6, 8]
    assert plans["encoder"].frames == plans["decoder"].frames == FRAMES
    assert json.loads((folder / "manifest.json").read_text())["family"] == name
    enc = fake_tensorrt.plan_header(folder / plans["encoder"].file)["profile"]
    # Only the rows vary: the frames, height and width are the export's.
    assert enc["sample"] == [[1, 4, FRAMES, *LATENT], [2, 4, FRAMES, *LATENT], [2, 4, FRAMES, *LATENT]]
    assert [shape[0] for shape in enc["timestep"]] == [1, 2, 2]
    dec = fake_tensorrt.plan_header(folder / plans["decoder"].file)["profile"]
    assert [shape[0] for shape in dec["timestep"]] == [1, 6, 8]
    assert [shape[0] for shape in dec["mid"]] == [1, 2, 8]  # the key step's rows, tuned at 2B
    assert all(len(shape) == 5 and shape[2] == FRAMES for shape in dec["mid"])
    assert all(shape[1:] == list(TEXT) for shape in dec["encoder_hidden_states"])


@pytest.mark.parametrize("rows", [1, 5])
def test_the_runner_equals_the_torch_split_on_5d_rows_and_chunks_beyond_the_profile(trt, video, rows):
    """1 row, and 5 rows: the encoder (profile max 2) in chunks of 2, 2, 1; the decoder in
    executions of at most 8 step rows (1 step of 5 rows, or up to 8 steps of 1 row)."""
    _, _, fd_torch, graphs = video
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4, FRAMES, *LATENT, generator=g)
    t = torch.linspace(900.0, 300.0, rows)
    text = torch.randn(rows, *TEXT, generator=g)
    ref = fd_torch.runner
    with TrtRunner(graphs, opt_segment_steps=2) as runner:
        enc = runner._enc
        assert enc.buffers["sample"].shape == (2, 4, FRAMES, *LATENT)
        before = enc.context.runs
        feats, ref_feats = runner.encode(x, t, text), ref.encode(x, t, text)
        assert enc.context.runs - before == -(-rows // 2)
        errors = []
        for got, want in zip(feats.tensors(), ref_feats.tensors()):
            assert got.shape == want.shape and got.shape[2] == FRAMES
            errors.append(rel_max(got, want))
        dec = runner._dec
        for steps in (1, 3):
            timesteps = torch.linspace(800.0, 100.0, steps)
            before = dec.context.runs
            got, want = runner.decode(feats, timesteps, text), ref.decode(ref_feats, timesteps, text)
            assert got.shape == want.shape == (steps * rows, 4, FRAMES, *LATENT)
            assert dec.context.runs - before == -(-steps // (8 // rows))
            assert want.abs().max().item() > 0.1
            errors.append(rel_max(got, want))
    assert max(errors) < 1e-4, errors


# the pipeline against the torch backend ----------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("schedule", ["all", "paper", [0, 2, 5]])
def test_key_step_schedules_on_tensorrt_equal_the_torch_backend(trt, video, schedule, guidance_scale):
    _, sd, fd_torch, graphs = video
    steps = {"all": 4, "paper": 20}.get(schedule, 8) if isinstance(schedule, str) else 8
    kw = dict(
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="latent",
        schedule=schedule,
    )
    pipe = _trt_pipe(sd, graphs)
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    assert out.stats.backend == "tensorrt" and not out.stats.nonfinite
    assert out.stats.key_steps == ref.stats.key_steps
    assert out.latents.shape == ref.latents.shape == (1, 4, FRAMES, *LATENT)
    rows = 2 if guidance_scale > 1 else 1
    assert out.stats.decoder_rows == rows * steps
    if schedule == "paper":
        assert out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15]
        # Segments of 5 steps in executions of at most 8 step rows: more launches than calls.
        assert pipe.runner._dec.context.runs > out.stats.decoder_calls
    err = rel_max(out.latents, ref.latents)
    print(f"{video[0]} {schedule} g={guidance_scale}: {err:.1e}")
    assert err < 1e-4
    pipe.close()


def test_more_videos_than_the_plans_were_built_for_run_in_chunks(trt, video):
    """Two videos with CFG: 4 rows per step, above the encoder profile's 2."""
    _, sd, fd_torch, graphs = video
    kw = dict(num_frames=FRAMES, num_inference_steps=4, output_type="latent", schedule=[0, 2], num_videos_per_prompt=2)
    pipe = _trt_pipe(sd, graphs)
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(7), **kw)
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(7), **kw)
    assert out.latents.shape == (2, 4, FRAMES, *LATENT)
    assert pipe.runner._enc.context.runs > out.stats.encoder_calls  # chunked encoder calls
    assert rel_max(out.latents, ref.latents) < 1e-4
    pipe.close()


# a plan of another frame count -------------------------------------------------------------------
def test_a_plan_of_another_frame_count_is_refused_without_build_and_rebuilt_with_it(trt, video, tmp_path, caplog):
    _, sd, fd_torch, graphs = video
    folder = _copy(graphs, tmp_path / "e")
    with TrtRunner(folder):  # the plans of this frame count, built once
        pass
    manifest = load_manifest(folder)
    for rec in manifest.plans.values():
        rec.frames = 2  # as a plan built from a 2-frame export of the same graphs would record
    save_manifest(folder, manifest)
    with pytest.raises(
        EngineMismatchError, match=r"built for 2 frames, but the graphs take 3 frames.*--backend tensorrt"
    ):
        TrtRunner(folder, build=False).activate()
    kw = dict(num_frames=FRAMES, num_inference_steps=4, output_type="latent", schedule=[0, 2])
    with pytest.raises(EngineMismatchError, match=r"2 frames, but the graphs take 3 frames"):
        _trt_pipe(sd, folder, runner_options={"build": False})(PROMPT, **kw)
    # With build on (the default) plans of this frame count are built beside them and run.
    pipe = _trt_pipe(sd, folder)
    with caplog.at_level("WARNING"):
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw)
    assert "building one for this GPU" in caplog.text
    assert {rec.frames for rec in pipe.runner.plans.values()} == {FRAMES}
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(1), **kw)
    assert rel_max(out.latents, ref.latents) < 1e-4
    pipe.close()


@pytest.mark.slow
def test_a_plan_of_other_latents_is_refused_at_load(trt, video, tmp_path):
    """A plan file of a 2-frame export under a 3-frame directory's record (a hand-copied plan): its
    tensors' fixed axes are checked against the contract when it loads, never run."""
    name, sd, _, graphs = video
    folder = _copy(graphs, tmp_path / "three")
    other = tmp_path / "two"
    build_engines(
        sd.unet,
        other,
        latent_size=LATENT,
        text_shape=TEXT,
        precision="fp32",
        max_segment_steps=MAX_SEGMENT_STEPS,
        progress=False,
        frames=2,
        family=name,
    )
    (theirs,) = [r.record for r in build_plans(other, roles=("encoder",))]
    # every plan the runner loads is there; only the encoder's is then replaced by the 2-frame one
    (ours,) = [r.record for r in build_plans(folder, roles=("encoder", "decoder")) if r.record.role == "encoder"]
    shutil.copyfile(other / theirs.file, folder / ours.file)
    manifest = load_manifest(folder)
    rec = manifest.plans[ours.file]
    rec.sha256, rec.bytes = theirs.sha256, theirs.bytes
    save_manifest(folder, manifest)
    with pytest.raises(
        EngineMismatchError, match=r"takes sample \[rows, 4, 2, 8, 8\].*\[rows, 4, 3, 8, 8\] \(3 frames\)"
    ):
        TrtRunner(folder, build=False).activate()


# the command line --------------------------------------------------------------------------------
@pytest.mark.slow
def test_fd_trt_build_backend_tensorrt_frames_and_generate(trt, tmp_path, capsys):
    from fd_trt.cli import main

    model = tmp_path / "t2v"
    tiny_text_to_video_pipeline(seed=0).save_pretrained(model, safe_serialization=True)
    out = tmp_path / "eng"
    build = ["build", "--model", str(model), "--out", str(out), "--quiet", "--backend", "tensorrt"]
    build += ["--precision", "fp32", "--max-segment-steps", "4"]
    assert main(build) == 2
    assert "pass --frames F" in capsys.readouterr().err
    assert main([*build, "--frames", "2"]) == 0
    printed = capsys.readouterr().out
    assert (
        "latents [4, 8, 8] x 2 frames" in printed
        and "decoder plan: decoder.trt10.13.0.fake.sm90.rows1-8-8.plan" in printed
    )
    manifest = load_manifest(out)
    assert manifest.frames == 2 and {r.frames for r in manifest.plans.values()} == {2}
    clip = tmp_path / "clip.gif"
    gen = ["generate", PROMPT, "--model", str(model), "--backend", "tensorrt", "--precision", "fp32"]
    gen += [
        "--engines",
        str(out),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--schedule",
        "all",
        "--quiet",
        "--out",
        str(clip),
    ]
    assert main([*gen, "--frames", "2"]) == 0
    assert "backend: tensorrt" in capsys.readouterr().out and clip.is_file()
    assert main([*gen, "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert "frames (built for 2 frames, asked for 3 frames)" in err and "--frames 3" in err


@pytest.mark.parametrize("schedule", ["deepcache:3", "combined:0,4|uniform:2|1", "combined:0,5|none|2"])
def test_decoder_schedules_on_tensorrt_equal_the_torch_backend(trt, video, schedule, tmp_path):
    """Shallow steps on the stand-in: the capture, shallow and (depth 1) ``conv_in`` plans of the
    5-D graphs, exported and built on first use, recorded with their frame count."""
    _, sd, fd_torch, graphs = video
    folder = _copy(graphs, tmp_path / "e")
    kw = dict(num_frames=FRAMES, num_inference_steps=9, guidance_scale=7.5, output_type="latent", schedule=schedule)
    pipe = _trt_pipe(sd, folder)
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    ref = fd_torch(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    assert out.stats.backend == "tensorrt" and out.stats.key_steps == ref.stats.key_steps
    assert out.stats.shallow_rows == ref.stats.shallow_rows > 0
    depth = 2 if schedule.endswith("|2") else 1
    plans = {p.role: p for p in load_manifest(folder).plans.values()}
    roles = {f"decoder_capture_d{depth}", f"shallow_d{depth}"} | ({"input_conv"} if depth == 1 else set())
    assert roles <= set(plans) and all(plans[r].frames == FRAMES for r in roles)
    err = rel_max(out.latents, ref.latents)
    print(f"{video[0]} {schedule}: {err:.1e}")
    assert err < 1e-4
    pipe.close()
