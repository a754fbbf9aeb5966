"""The TensorRT runner of the transformer graphs (``fd_trt.backends.tensorrt_dit``) on a CPU, with
``tests/fake_tensorrt.py`` in place of TensorRT: the stand-in runs each plan's ONNX graph at the
addresses and shapes the runner binds, so these tests check the runner's own work (plan selection
and records, buffers, row chunks, step tiling, the conditioning a graph drops) against the torch
backend. TensorRT's kernels are only checked on a GPU."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.backends.tensorrt_build import RowProfile
from fd_trt.backends.tensorrt_dit import PLANS_FILE, TrtTransformerRunner, read_plan_records
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.families.dit_models import tiny_pixart_pipeline, tiny_sd3_pipeline
from fd_trt.graphs.export import CorruptGraphError
from fd_trt.graphs.export_dit import export_transformer
from fd_trt.graphs.split_dit import split_transformer

import fake_tensorrt

PROMPTS = ["red circle", "blue square"]
# Two rows per plan call and two steps per decoder call: two prompts with CFG (4 rows) run the
# encoder in two chunks and the decoder's key rows in two, and a `paper` segment in several calls.
OPTIONS = {"max_rows": 2, "max_segment_steps": 2}


@pytest.fixture
def trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


def _rel(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _models():
    return {
        "pixart": (tiny_pixart_pipeline(seed=3), {"max_sequence_length": 16}),
        "sd3": (tiny_sd3_pipeline(seed=3), {"max_sequence_length": 16}),
    }


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_tensorrt_equals_torch_on_all_and_paper_with_and_without_cfg(trt, tmp_path, family):
    pipe, extra = _models()[family]
    fd = FasterDiffusionPipeline.from_diffusers(
        pipe, backend="tensorrt", engines=tmp_path / "e", runner_options=OPTIONS, progress=False
    )
    ref = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    kw = dict(num_inference_steps=8, output_type="latent", **extra)
    worst = 0.0
    for guidance in (4.5, 1.0):
        results = {}
        for schedule in ("all", "paper"):
            args = dict(guidance_scale=guidance, schedule=schedule, **kw)
            out = fd(PROMPTS, generator=torch.Generator().manual_seed(0), **args)
            want = ref(PROMPTS, generator=torch.Generator().manual_seed(0), **args)
            assert out.stats.backend == "tensorrt" and want.stats.backend == "torch"
            assert out.stats.key_steps == want.stats.key_steps
            assert torch.isfinite(out.latents).all()
            err = _rel(out.latents, want.latents)
            assert err <= 1e-4, (guidance, schedule, err)
            worst = max(worst, err)
            results[schedule] = out.latents
        # Propagation changes the result by more than the tolerance, and by far more than the
        # backends differ: the comparison above could not pass by ignoring the schedule.
        assert _rel(results["paper"], results["all"]) > max(1e-4, 100 * worst)
    runner = fd.runner
    assert isinstance(runner, TrtTransformerRunner)
    enc, dec = runner._enc, runner._dec
    assert enc is not None and dec is not None
    assert (enc.max_rows, dec.key_max_rows, dec.max_rows) == (2, 2, 4)
    if family == "sd3":  # the text stream crosses the split: two features
        assert set(enc.outputs) == {"tokens", "context"} and "context" in dec.key_inputs
    records = read_plan_records(tmp_path / "e")
    assert records["encoder"].rows == [1, 2, 2] and records["decoder"].rows == [1, 2, 4]


def _split_and_folder(pipe, family, folder, n):
    tr = pipe.transformer
    split = split_transformer(tr, n)
    export_transformer(folder, family, tr, split, (8, 8), (16, 32) if family == "pixart" else (32, 32))
    width = int(tr.config.num_attention_heads) * int(tr.config.attention_head_dim)
    return split, dict(patch=int(tr.config.patch_size), width=width, rows=RowProfile(1, 2, 2), steps=2)


def _inputs(pipe):
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(2, 16, 32, generator=gen)
    added = {"encoder_attention_mask": torch.ones(2, 16)}
    return torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 700.0), text, added


def test_plans_of_another_split_or_an_older_graph_are_refused_or_rebuilt(trt, tmp_path):
    pipe = tiny_pixart_pipeline(seed=4)
    split2, kw = _split_and_folder(pipe, "pixart", tmp_path / "n2", 2)
    split3, _ = _split_and_folder(pipe, "pixart", tmp_path / "n3", 3)
    sample, t, text, added = _inputs(pipe)
    with TrtTransformerRunner(split2, tmp_path / "n2", **kw) as runner:
        runner.encode(sample, t, text, added)
    # The split-2 plans, and their records, copied over the split-3 directory: never run there.
    for name in ("encoder.plan", "decoder.plan", PLANS_FILE):
        shutil.copy(tmp_path / "n2" / name, tmp_path / "n3" / name)
    with pytest.raises(EngineMismatchError, match="built from another graph") as err:
        TrtTransformerRunner(split3, tmp_path / "n3", build=False, **kw).activate()
    assert "build_transformer_plans" in str(err.value)
    builds = len(fake_tensorrt.Builder.builds)
    with TrtTransformerRunner(split3, tmp_path / "n3", **kw) as runner:
        assert len(fake_tensorrt.Builder.builds) == builds + 2  # both rebuilt from the split-3 graphs
        feats = runner.encode(sample, t, text, added)
        ts = torch.tensor([700.0, 650.0, 600.0])
        out = runner.decode(feats, ts, text, added)
    from fd_trt.backends.transformer import TorchTransformerRunner

    with TorchTransformerRunner(split3) as ref:
        want = ref.decode(ref.encode(sample, t, text, added), ts, text, added)
    assert out.shape == want.shape == (6, 4, 8, 8) and _rel(out, want) <= 1e-4
    # A graph re-exported (new weights) after the plans were built: its sha256 no longer matches.
    records = json.loads((tmp_path / "n3" / PLANS_FILE).read_text())
    records["decoder"]["graph_sha256"] = "0" * 64
    (tmp_path / "n3" / PLANS_FILE).write_text(json.dumps(records))
    with pytest.raises(EngineMismatchError, match="decoder: it was built from another graph"):
        TrtTransformerRunner(split3, tmp_path / "n3", build=False, **kw).activate()
    # Another profile than the recorded one is refused too, naming both.
    with pytest.raises(EngineMismatchError, match=r"profile rows \[1, 2, 2\] are not the asked \[1, 4, 4\]"):
        TrtTransformerRunner(split3, tmp_path / "n3", build=False, **{**kw, "rows": RowProfile(1, 4, 4)}).activate()
    # A runner given another split than the directory's graphs is refused before any plan is read.
    with pytest.raises(EngineMismatchError, match="split N=3"):
        TrtTransformerRunner(split2, tmp_path / "n3", **kw).activate()


def _counting_sha256(monkeypatch):
    """Counts every file hashed through ``file_sha256``, wherever the modules imported it from."""
    import fd_trt.backends.tensorrt_dit
    import fd_trt.graphs.manifest
    import fd_trt.utils.files

    real = fd_trt.utils.files.file_sha256
    hashed: list[str] = []

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    for module in (fd_trt.utils.files, fd_trt.graphs.manifest, fd_trt.backends.tensorrt_dit):
        monkeypatch.setattr(module, "file_sha256", counting)
    return hashed


def test_activation_takes_the_graph_digests_the_export_recorded(trt, tmp_path, monkeypatch):
    from fd_trt.backends.transformer import TorchTransformerRunner

    pipe = tiny_pixart_pipeline(seed=4)
    folder = tmp_path / "e"
    split, kw = _split_and_folder(pipe, "pixart", folder, 2)
    # The export recorded each graph's size and sha256 (checked here against the files' bytes).
    recorded = json.loads((folder / "manifest.json").read_text())["graphs"]
    for role in ("encoder", "decoder"):
        data = (folder / f"{role}.onnx").read_bytes()
        assert recorded[role]["file"] == f"{role}.onnx" and recorded[role]["bytes"] == len(data)
        assert recorded[role]["sha256"] == hashlib.sha256(data).hexdigest()
    TrtTransformerRunner(split, folder, **kw).activate().deactivate()  # builds the plans
    plans = read_plan_records(folder)
    assert {r: plans[r].graph_sha256 for r in ("encoder", "decoder")} == {r: recorded[r]["sha256"] for r in recorded}

    hashed = _counting_sha256(monkeypatch)
    builds = len(fake_tensorrt.Builder.builds)
    sample, t, text, added = _inputs(pipe)
    ts = torch.tensor([700.0, 650.0, 600.0])
    with TrtTransformerRunner(split, folder, build=False, **kw) as runner:
        out = runner.decode(runner.encode(sample, t, text, added), ts, text, added)
    assert hashed == [] and len(fake_tensorrt.Builder.builds) == builds  # no graph read, no plan rebuilt
    with TorchTransformerRunner(split) as ref:
        want = ref.decode(ref.encode(sample, t, text, added), ts, text, added)
    assert _rel(out, want) <= 1e-4

    # A manifest written before the records existed: its graphs are hashed, and the plans still match them.
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with TrtTransformerRunner(split, folder, build=False, **kw) as runner:
        out = runner.decode(runner.encode(sample, t, text, added), ts, text, added)
    assert sorted(hashed) == ["decoder.onnx", "encoder.onnx"] and len(fake_tensorrt.Builder.builds) == builds
    assert _rel(out, want) <= 1e-4
    # The next export call records them, exporting nothing; activations then read no graph again.
    exports: list = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(a))
    export_transformer(folder, "pixart", pipe.transformer, split, (8, 8), (16, 32))
    assert exports == [] and json.loads((folder / "manifest.json").read_text())["graphs"] == recorded
    hashed.clear()
    TrtTransformerRunner(split, folder, build=False, **kw).activate().deactivate()
    assert hashed == []


def test_a_graph_replaced_behind_the_manifest_is_refused_then_exported_again(trt, tmp_path):
    from fd_trt.backends.transformer import TorchTransformerRunner

    pipe = tiny_pixart_pipeline(seed=4)
    n2, n3 = tmp_path / "n2", tmp_path / "n3"
    split2, kw = _split_and_folder(pipe, "pixart", n2, 2)
    _split_and_folder(pipe, "pixart", n3, 3)
    TrtTransformerRunner(split2, n2, **kw).activate().deactivate()
    # The split-3 decoder copied over the split-2 one; the manifest and plans.json are left as they were.
    shutil.copy(n3 / "decoder.onnx", n2 / "decoder.onnx")
    size, recorded = (n2 / "decoder.onnx").stat().st_size, json.loads((n2 / "manifest.json").read_text())
    assert size != recorded["graphs"]["decoder"]["bytes"]
    message = rf"decoder graph file .*decoder\.onnx has {size} bytes but the manifest recorded"
    for build in (False, True):  # no plan is run, nor built, from a graph the manifest does not describe
        with pytest.raises(CorruptGraphError, match=message) as err:
            TrtTransformerRunner(split2, n2, build=build, **kw).activate()
        assert "export" in str(err.value) and f"--out {n2}" in str(err.value)
    # A file of the recorded size but other bytes: refused when the digests are compared (full_hash).
    export_transformer(n2, "pixart", pipe.transformer, split2, (8, 8), (16, 32))  # exports both graphs again
    assert (n2 / "decoder.onnx").stat().st_size == recorded["graphs"]["decoder"]["bytes"]
    good = (n2 / "decoder.onnx").read_bytes()
    (n2 / "decoder.onnx").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptGraphError, match="does not match its sha256 in the manifest"):
        TrtTransformerRunner(split2, n2, build=False, full_hash=True, **kw).activate()
    (n2 / "decoder.onnx").write_bytes(good)
    sample, t, text, added = _inputs(pipe)
    ts = torch.tensor([700.0, 650.0])
    with TrtTransformerRunner(split2, n2, full_hash=True, **kw) as runner:
        out = runner.decode(runner.encode(sample, t, text, added), ts, text, added)
    with TorchTransformerRunner(split2) as ref:
        want = ref.decode(ref.encode(sample, t, text, added), ts, text, added)
    assert _rel(out, want) <= 1e-4


def test_a_missing_plan_file_is_refused_with_the_rebuild_command(trt, tmp_path):
    pipe = tiny_pixart_pipeline(seed=4)
    split, kw = _split_and_folder(pipe, "pixart", tmp_path / "e", 2)
    TrtTransformerRunner(split, tmp_path / "e", **kw).activate().deactivate()
    (tmp_path / "e" / "decoder.plan").unlink()
    with pytest.raises(EngineMismatchError, match="decoder plan .* is missing") as err:
        TrtTransformerRunner(split, tmp_path / "e", **kw).activate()
    assert f"build_transformer_plans({str(tmp_path / 'e')!r}" in str(err.value)


def test_bad_profiles_and_missing_graphs_are_refused(trt, tmp_path):
    pipe = tiny_pixart_pipeline(seed=4)
    split = split_transformer(pipe.transformer, 2)
    with pytest.raises(InputError, match="opt_steps=3, steps=2"):
        TrtTransformerRunner(split, tmp_path, patch=2, width=16, steps=2, opt_steps=3)
    with pytest.raises(EngineMismatchError, match="holds no exported transformer graphs"):
        TrtTransformerRunner(split, tmp_path, patch=2, width=16).activate()
    with pytest.raises(InputError, match="does not exist: export the transformer graphs"):
        TrtTransformerRunner(split, tmp_path / "none", patch=2, width=16)


def test_cuda_graphs_replay_the_transformer_plans(trt, tmp_path):
    pipe = tiny_pixart_pipeline(seed=4)
    split, kw = _split_and_folder(pipe, "pixart", tmp_path / "e", 2)
    sample, t, text, added = _inputs(pipe)
    ts = torch.tensor([700.0, 650.0, 600.0])  # two decoder executions: 2 steps, then 1
    from fd_trt.backends.transformer import TorchTransformerRunner

    with TorchTransformerRunner(split) as ref:
        want = ref.decode(ref.encode(sample, t, text, added), ts, text, added)
    with TrtTransformerRunner(split, tmp_path / "e", cuda_graphs=True, **kw) as runner:
        outs = [runner.decode(runner.encode(sample * 1, t, text, added), ts, text, added) for _ in range(2)]
        dec = runner._dec
        assert dec is not None
        # (step rows, key rows): 2 steps of 2 rows, then 1 step; each captured once, replayed by both calls.
        assert dec.graphs[(4, 2)] is not None and dec.graphs[(2, 2)] is not None
        assert dec.graphs[(4, 2)].replays == 2 and dec.graphs[(2, 2)].replays == 2
    for out in outs:
        assert _rel(out, want) <= 1e-4
