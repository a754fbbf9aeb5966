"""``fd-trt build`` on diffusion transformers: the two graphs exported ahead of time into the folder
a run uses (and TensorRT plans through ``tests/fake_tensorrt.py``), then run by the pipeline without
exporting or building again, equal to the torch backend; the refusals of the flags that do not
apply."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.backends.tensorrt_dit import read_plan_records
from fd_trt.cli import main
from fd_trt.families.dit_models import tiny_pixart_pipeline

import fake_tensorrt

PROMPT = "a red circle on the left"
# The graphs' text: the tiny T5's 16 tokens (the pipeline's max_sequence_length is 120 by default).
TEXT = ["--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pixart"
    tiny_pixart_pipeline(seed=2).save_pretrained(folder, safe_serialization=True)
    return folder


def _rel(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _stamps(folder: Path) -> dict[str, int]:
    return {n: (folder / n).stat().st_mtime_ns for n in ("manifest.json", "encoder.onnx", "decoder.onnx")}


def _count_exports(monkeypatch) -> list[str]:
    exports: list[str] = []
    real = torch.onnx.export

    def counting(module, args, f, *a, **kw):
        exports.append(str(f))
        return real(module, args, f, *a, **kw)

    monkeypatch.setattr(torch.onnx, "export", counting)
    return exports


def test_build_exports_the_graphs_a_run_then_uses(pixart_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    exports = _count_exports(monkeypatch)
    args = ["build", "--model", str(pixart_dir), "--split", "2", "--height", "64", "--width", "96", *TEXT, "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(exports) == 2
    match = re.search(r"^(\S+): exported in", text, re.M)
    assert match, text
    folder = Path(match.group(1))
    # The folder a run at this size, N and text length uses (no engines=), under $FD_TRT_CACHE.
    assert folder.parent == tmp_path / "cache" / "transformer"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["split"] == 2 and manifest["latent_hw"] == [8, 12] and manifest["text_shape"] == [16, 32]
    for role in ("encoder", "decoder"):
        rec = manifest["graphs"][role]
        assert f"  {role}: {role}.onnx {rec['bytes'] / 1e6:.1f} MB, sha256 {rec['sha256'][:12]}" in text
    stamps = _stamps(folder)

    assert main(args) == 0  # a second run finds it up to date
    assert f"{folder}: up to date, nothing exported" in capsys.readouterr().out
    assert len(exports) == 2 and _stamps(folder) == stamps

    kw = dict(
        height=64, width=96, num_inference_steps=6, schedule="paper", output_type="latent", max_sequence_length=16
    )
    ref = FasterDiffusionPipeline.from_pretrained(pixart_dir, backend="torch", split=2, progress=False)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), **kw)
    for engines in (None, folder):  # the cache folder found by itself, and passed as engines=
        fd = FasterDiffusionPipeline.from_pretrained(
            pixart_dir, backend="onnxruntime", engines=engines, split=2, progress=False
        )
        out = fd(PROMPT, generator=torch.Generator().manual_seed(3), **kw)
        assert out.stats.backend == "onnxruntime" and out.stats.key_steps == want.stats.key_steps
        assert _rel(out.latents, want.latents) <= 1e-4
        assert len(exports) == 2 and _stamps(folder) == stamps  # nothing exported again

    # --force exports again; another --out gets its own graphs, named in the output.
    assert main([*args, "--force"]) == 0
    assert f"{folder}: exported" in capsys.readouterr().out and len(exports) == 4
    out_dir = tmp_path / "out"
    assert main([*args, "--out", str(out_dir)]) == 0
    assert f"run with engines={str(out_dir)!r}" in capsys.readouterr().out
    assert json.loads((out_dir / "manifest.json").read_text())["split"] == 2


def test_build_tensorrt_plans_that_the_pipeline_then_runs(pixart_dir, tmp_path, monkeypatch, capsys):
    fake_tensorrt.install(monkeypatch)
    out_dir = tmp_path / "e"
    args = ["build", "--model", str(pixart_dir), "--backend", "tensorrt", "--out", str(out_dir), *TEXT]
    args += ["--max-segment-steps", "2", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(fake_tensorrt.Builder.builds) == 2
    records = read_plan_records(out_dir)
    assert records["encoder"].rows == [1, 2, 2] and records["decoder"].rows == [1, 2, 4]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["split"] == 3  # the family's default, 0.75 x 4 blocks
    for role in ("encoder", "decoder"):
        assert records[role].graph_sha256 == manifest["graphs"][role]["sha256"]
        assert f"  {role} plan: {role}.plan" in text and "built (no plan is recorded)" in text
    assert "runner_options={'max_rows': 2, 'max_segment_steps': 2, 'opt_segment_steps': 1}" in text

    assert main(args) == 0  # up to date: nothing built
    text = capsys.readouterr().out
    assert len(fake_tensorrt.Builder.builds) == 2 and text.count("(min/opt/max), up to date") == 2

    # The pipeline runs those plans as they are (build=False would refuse any other), equal to torch.
    options = {"max_rows": 2, "max_segment_steps": 2, "build": False}
    fd = FasterDiffusionPipeline.from_pretrained(
        pixart_dir, backend="tensorrt", engines=out_dir, runner_options=options, progress=False
    )
    ref = FasterDiffusionPipeline.from_pretrained(pixart_dir, backend="torch", progress=False)
    kw = dict(num_inference_steps=6, schedule="paper", output_type="latent", max_sequence_length=16)
    out = fd([PROMPT, "a blue square"], generator=torch.Generator().manual_seed(4), **kw)
    want = ref([PROMPT, "a blue square"], generator=torch.Generator().manual_seed(4), **kw)
    assert out.stats.backend == "tensorrt" and _rel(out.latents, want.latents) <= 1e-4
    assert len(fake_tensorrt.Builder.builds) == 2

    assert main([*args, "--force"]) == 0  # rebuilds both plans
    assert len(fake_tensorrt.Builder.builds) == 4 and "built (rebuild asked (force))" in capsys.readouterr().out


def test_build_without_tensorrt_exports_the_graphs_and_says_why_no_plan(pixart_dir, tmp_path, monkeypatch, capsys):
    import fd_trt.backends.tensorrt_build as build

    monkeypatch.setattr(build, "runtime_problem", lambda device="cuda": "TensorRT is not installed: pip install ...")
    out_dir = tmp_path / "e"
    assert main(["build", "--model", str(pixart_dir), "--backend", "tensorrt", "--out", str(out_dir), *TEXT]) == 0
    assert "TensorRT plans: not built: TensorRT is not installed" in capsys.readouterr().out
    assert (out_dir / "encoder.onnx").is_file() and not (out_dir / "plans.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "5"], "--split 5 is out of range: this transformer has 4 blocks"),
        (["--precision", "fp16"], "--precision fp16 is not available for diffusion transformers"),
        (["--steps", "20"], "--steps is not available for diffusion transformers"),
        (["--tune"], "--tune is not available for diffusion transformers"),
        (["--height", "72"], "height and width must be positive multiples of 16, got 72x64"),
    ],
)
def test_build_refuses_what_does_not_apply_to_a_transformer(pixart_dir, tmp_path, capsys, extra, message):
    assert main(["build", "--model", str(pixart_dir), "--out", str(tmp_path / "e"), *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e" / "encoder.onnx").exists()


@pytest.mark.parametrize("flag", [["--split", "2"], ["--max-sequence-length", "16"]])
def test_build_refuses_transformer_flags_for_a_unet_model(tmp_path, capsys, flag):
    assert main(["build", "--out", str(tmp_path / "e"), *flag, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} {flag[1]} is for diffusion transformers" in err and f"drop {flag[0]}" in err
    assert not (tmp_path / "e").exists()
