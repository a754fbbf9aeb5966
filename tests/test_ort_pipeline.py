"""The pipeline on the onnxruntime backend: graphs built on first use, engine directories, CLI build."""

import logging

import pytest

from fd_trt.cli import main
from fd_trt.errors import EngineMismatchError
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"


def test_the_default_backend_is_auto_on_every_device(tiny_sd):
    from fd_trt.backends import default_backend

    assert default_backend("cpu") == default_backend("cuda") == "auto"
    assert FasterDiffusionPipeline.from_diffusers(tiny_sd, device="cpu", progress=False).backend == "auto"


def test_onnxruntime_backend_builds_on_first_use_and_matches_torch(
    tiny_sd, fd_pipe, latents, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    common = dict(num_inference_steps=50, latents=latents, output_type="latent")
    with caplog.at_level(logging.WARNING, logger="fd_trt.pipelines.runner_pool"):
        pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
        paper = pipe(PROMPT, schedule="paper", **common)
    assert any("on first use" in r.message for r in caplog.records)
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and (built[0] / "manifest.json").is_file()
    assert paper.stats.backend == "onnxruntime" and paper.stats.decoder_rows == 100
    assert rel_l2(paper.images, fd_pipe(PROMPT, schedule="paper", **common).images) < 1e-4
    assert (
        rel_l2(pipe(PROMPT, schedule="all", **common).images, fd_pipe(PROMPT, schedule="all", **common).images) < 1e-4
    )
    pipe.close()
    # A new pipeline on the same weights reuses the cached graphs without rebuilding.
    caplog.clear()
    mtimes = {p.name: p.stat().st_mtime_ns for p in built[0].iterdir()}
    with caplog.at_level(logging.WARNING, logger="fd_trt.pipelines.runner_pool"):
        again = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
        again(PROMPT, num_inference_steps=3, latents=latents, output_type="latent")
    assert not any("on first use" in r.message for r in caplog.records)
    assert {p.name: p.stat().st_mtime_ns for p in built[0].iterdir()} == mtimes
    again.close()


def test_onnxruntime_rejects_bf16(tiny_sd):
    with pytest.raises(Exception, match="fp32 or fp16"):
        FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", precision="bf16")


def test_cli_build_is_idempotent_and_generate_refuses_other_shapes(tmp_path, capsys):
    out = tmp_path / "eng"
    assert main(["build", "--out", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "built (no manifest)" in first and "encoder.onnx" in first and "MB" in first
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["build", "--out", str(out), "--quiet"]) == 0
    assert "up to date, nothing rebuilt" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    png = tmp_path / "a.png"
    assert main(["generate", "x", "--engines", str(out), "--steps", "3", "--quiet", "--out", str(png)]) == 0
    assert png.is_file()
    import json

    built_hw = json.loads((out / "manifest.json").read_text())["latent_shape"][1:]
    rc = main(
        ["generate", "x", "--engines", str(out), "--height", "128", "--width", "64", "--quiet", "--out", str(png)]
    )
    err = capsys.readouterr().err
    asked = [built_hw[0] * 2, built_hw[1]]  # 128x64 against graphs built for the model's 64x64
    assert rc == 2 and f"latent_shape (built for {built_hw}, asked for {asked})" in err and "fd-trt build" in err


def test_explicit_engine_dir_for_other_weights_is_refused(tmp_path, latents):
    from fd_trt.families.models import tiny_sd_pipeline

    out = tmp_path / "eng"
    assert main(["build", "--out", str(out), "--quiet"]) == 0
    other = tiny_sd_pipeline(seed=1)  # same architecture, different weights
    pipe = FasterDiffusionPipeline.from_diffusers(
        other, backend="onnxruntime", device="cpu", engines=out, progress=False
    )
    with pytest.raises(EngineMismatchError, match="unet_sha256"):
        pipe(PROMPT, num_inference_steps=3, latents=latents, output_type="latent")
