"""``fd-trt build --schedule`` of a decoder schedule (deepcache:N, combined:...): the shallow decoder
graphs (and, for TensorRT, their plans; through ``tests/fake_tensorrt.py`` on a CPU) are built
ahead of time, so that a run of the schedule builds nothing, and it equals the torch backend."""

from __future__ import annotations

import pytest
import torch

from fd_trt.cli import main
from fd_trt.families.models import load_diffusers_pipeline
from fd_trt.graphs.manifest import load_manifest
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

import fake_tensorrt
from conftest import rel_l2

PROMPT = "a red circle on the left"
SHALLOW_ROLES = ("decoder_capture_d1", "shallow_d1", "input_conv")
SIZE = ["--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def default_sd():
    return load_diffusers_pipeline("default")[0]


def _build(backend, out, schedule="deepcache:3", *extra):
    argv = ["build", "--backend", backend, "--precision", "fp32", "--out", str(out), "--quiet", *SIZE]
    return main([*argv, "--max-segment-steps", "4", "--schedule", schedule, "--steps", "9", *extra])


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def _run(sd, backend, schedule="deepcache:3", **kwargs):
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend=backend, device="cpu", precision="fp32", progress=False, **kwargs
    )
    try:
        return pipe(
            PROMPT,
            height=64,
            width=64,
            num_inference_steps=9,
            generator=torch.Generator().manual_seed(3),
            schedule=schedule,
            output_type="latent",
        )
    finally:
        pipe.close()


def test_cli_build_of_a_decoder_schedule_builds_every_plan_a_run_needs(trt, default_sd, tmp_path, capsys):
    out = tmp_path / "eng"
    assert _build("tensorrt", out) == 0
    printed = capsys.readouterr().out
    manifest = load_manifest(out)
    plans = {p.role: p for p in manifest.plans.values()}
    assert {"encoder", "decoder", *SHALLOW_ROLES} <= set(plans), printed
    for role in SHALLOW_ROLES:
        assert plans[role].graph_sha256 == manifest.graphs[role].sha256 and (out / plans[role].file).is_file()
        assert f"  {role} plan: {plans[role].file}" in printed and f"  {role}: {manifest.graphs[role].file}" in printed
    # The capture and shallow plans take the decoder's rows, conv_in's the encoder's.
    assert plans["shallow_d1"].rows == plans["decoder"].rows and plans["input_conv"].rows == plans["encoder"].rows
    builds, stamps = len(fake_tensorrt.Builder.builds), _stamps(out)
    # A second build finds everything up to date.
    assert _build("tensorrt", out) == 0
    again = capsys.readouterr().out
    assert "up to date, nothing rebuilt" in again and "built in" not in again and "exported in" not in again, again
    assert len(fake_tensorrt.Builder.builds) == builds and _stamps(out) == stamps
    # A run of the schedule that may not build finds every plan, builds nothing, and equals torch.
    got = _run(default_sd, "tensorrt", engines=out, runner_options={"build": False})
    want = _run(default_sd, "torch")
    assert got.stats.backend == "tensorrt" and got.stats.shallow_calls == want.stats.shallow_calls > 0
    assert rel_l2(got.latents, want.latents) < 1e-4
    assert rel_l2(want.latents, _run(default_sd, "torch", schedule="all").latents) > 1e-4  # the reuse shows
    assert len(fake_tensorrt.Builder.builds) == builds and _stamps(out) == stamps


def test_cli_build_of_a_key_step_schedule_builds_no_shallow_plans(trt, default_sd, tmp_path, capsys):
    from fd_trt.errors import EngineMismatchError

    out = tmp_path / "eng"
    assert _build("tensorrt", out, "0,3,6") == 0
    manifest = load_manifest(out)
    assert sorted({p.role for p in manifest.plans.values()}) == ["decoder", "encoder"]
    assert not set(SHALLOW_ROLES) & set(manifest.graphs)
    # A decoder schedule run on it without building is refused, naming the build that fixes it.
    with pytest.raises(
        EngineMismatchError,
        match=r"no TensorRT decoder_capture_d1 plan.*fd-trt build --backend tensorrt --schedule SPEC",
    ):
        _run(default_sd, "tensorrt", engines=out, runner_options={"build": False})


def test_cli_build_exports_the_shallow_graphs_for_onnxruntime(default_sd, tmp_path, capsys, monkeypatch):
    import fd_trt.graphs.shallow as shallow

    out = tmp_path / "eng"
    assert _build("onnxruntime", out) == 0
    printed = capsys.readouterr().out
    manifest = load_manifest(out)
    for role in SHALLOW_ROLES:
        rec = manifest.graphs[role]
        assert (out / rec.file).is_file() and f"  {role}: {rec.file}" in printed, printed
    assert "exported in" in printed and not manifest.plans
    stamps = _stamps(out)
    assert _build("onnxruntime", out) == 0
    again = capsys.readouterr().out
    assert "up to date, nothing rebuilt" in again and "exported in" not in again, again
    assert _stamps(out) == stamps

    def refuse(*args, **kwargs):
        raise AssertionError("the run exported shallow graphs that fd-trt build exported ahead")

    monkeypatch.setattr(shallow, "export_shallow_into", refuse)
    got = _run(default_sd, "onnxruntime", engines=out)
    want = _run(default_sd, "torch")
    assert got.stats.backend == "onnxruntime" and got.stats.shallow_calls == want.stats.shallow_calls > 0
    assert rel_l2(got.latents, want.latents) < 1e-4
    assert _stamps(out) == stamps


def test_cli_build_refuses_a_bad_decoder_schedule(tmp_path, capsys):
    assert _build("onnxruntime", tmp_path / "eng", "deepcache:0") != 0
    assert "'deepcache:0'; e.g. deepcache:3" in capsys.readouterr().err
    assert not (tmp_path / "eng").exists()  # refused before any export


@pytest.fixture
def trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


def test_cli_build_exports_the_depths_of_a_decoder_calibration(tmp_path, capsys):
    from fd_trt.core.calibration import Calibration

    cal = Calibration(
        key_steps=[0, 3, 6],
        scheduler="ddim",
        steps=9,
        model_sha256="0" * 64,
        error=0.01,
        method="grid",
        prompts=[PROMPT],
        seeds=[0],
        depths=[0, 2, 2, 0, 2, 2, 0, 2, 2],
    ).save(tmp_path / "cal.json")
    out = tmp_path / "eng"
    # Its step count, not another one.
    assert _build("onnxruntime", out, str(cal), "--steps", "20") != 0
    assert f"--schedule {cal} was calibrated for 9 steps, but --steps is 20: pass --steps 9" in capsys.readouterr().err
    assert _build("onnxruntime", out, str(cal)) == 0
    graphs = load_manifest(out).graphs
    assert {"decoder_capture_d2", "shallow_d2"} <= set(graphs) and not set(SHALLOW_ROLES) & set(graphs)
