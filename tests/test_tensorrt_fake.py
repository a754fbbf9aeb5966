"""The TensorRT backend's own logic on a CPU, with ``tests/fake_tensorrt.py`` in place of TensorRT.

The stand-in runs each plan's ONNX graph with ONNX Runtime at the addresses and shapes the
backend binds, and simulates asynchronous streams and CUDA graphs, so these tests check what
fd_trt does with TensorRT: plan building and selection, the manifest, buffers, row slicing, step
tiling, decoder chunking, shared scratch memory, stream ordering and CUDA-graph replay. The
numbers are compared with the onnxruntime and torch backends. TensorRT's kernels are only
checked on a GPU (``tests/test_tensorrt.py``, ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import logging

import pytest
import torch

from fd_trt.backends.onnxruntime import OrtRunner
from fd_trt.backends.tensorrt import TrtRunner, build_plans
from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.build import build_engines
from fd_trt.graphs.manifest import load_manifest
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

import fake_tensorrt
from conftest import rel_l2

PROMPT = "a red circle on the left"
MAX_SEGMENT_STEPS = 4  # rows 2..8 for the decoder: a 20-step `paper` run needs chunked decoder calls


@pytest.fixture
def trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_sd):
    """ONNX graphs of the tiny model, fp32 and fp16, with a short decoder profile."""
    root = tmp_path_factory.mktemp("fake_trt")
    for precision in ("fp32", "fp16"):
        build_engines(
            tiny_sd.unet,
            root / precision,
            latent_size=(8, 8),
            text_shape=(16, 32),
            precision=precision,
            max_segment_steps=MAX_SEGMENT_STEPS,
            progress=False,
        )
    return root


def _inputs(rows: int = 2):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, 4, 8, 8, generator=gen)
    text = torch.randn(rows, 16, 32, generator=gen)
    return sample, torch.full((rows,), 900.0), text


def _plans(folder):
    return {p.role: p for p in load_manifest(folder).plans.values()}


def _copy_without_plans(src, dst):
    """A copy of an engine directory as the ONNX export left it: no plans, no timing cache."""
    import shutil

    from fd_trt.graphs.manifest import save_manifest

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.plan", "*.cache"))
    manifest = load_manifest(dst)
    manifest.plans = {}
    save_manifest(dst, manifest)
    return dst


def test_plans_are_built_into_the_manifest_with_the_asked_settings(trt, graphs, tmp_path):
    folder = _copy_without_plans(graphs / "fp16", tmp_path / "e")
    first = build_plans(folder, builder_optimization_level=1, workspace_bytes=1 << 30, opt_segment_steps=3)
    assert [(r.record.role, r.built) for r in first] == [("encoder", True), ("decoder", True)]
    plans = _plans(folder)
    assert plans["encoder"].rows == [1, 2, 2] and plans["decoder"].rows == [1, 6, 8]
    assert plans["decoder"].file == "decoder.trt10.13.0.fake.sm90.rows1-6-8.plan"
    assert plans["decoder"].tensorrt_version == "10.13.0.fake" and plans["decoder"].compute_capability == [9, 0]
    header = fake_tensorrt.plan_header(folder / plans["decoder"].file)
    assert header["strongly_typed"] and header["level"] == 1
    # The timestep has the rows of every step in a call; the features and text have the key
    # step's, once for all the steps: tuned at the encoder's 2 rows, up to the decoder's 8 (a
    # batch above the build's decodes one step per call).
    assert [shape[0] for shape in header["profile"]["timestep"]] == [1, 6, 8]
    assert [shape[0] for shape in header["profile"]["mid"]] == [1, 2, 8]
    assert [shape[0] for shape in header["profile"]["encoder_hidden_states"]] == [1, 2, 8]
    dtypes = {name: dtype for name, _, dtype in header["inputs"]}
    assert dtypes["mid"] == "HALF"  # the fp16 graph's own types decide the plan's precision
    _, config = fake_tensorrt.Builder.builds[-1]
    assert config.pool_limits == {fake_tensorrt.MemoryPoolType.WORKSPACE: 1 << 30}
    # Strongly typed: no FP16 builder flag; REFIT, so that new weights can be refit in place.
    assert config.flags == {fake_tensorrt.BuilderFlag.REFIT}
    assert plans["decoder"].refittable and header["refit"]
    cache = folder / "timing.trt10.13.0.fake.sm90.cache"
    # Two entries: the decoder's build started from the cache the encoder's build wrote.
    assert cache.read_bytes() == fake_tensorrt.ITimingCache(2).serialize()
    # A second call keeps both plans; another opt shape builds a new decoder plan beside the first.
    again = build_plans(folder, builder_optimization_level=1, opt_segment_steps=3)
    assert [r.built for r in again] == [False, False]
    other = build_plans(folder, opt_segment_steps=4, roles=("decoder",))
    assert other[0].built and other[0].record.rows == [1, 8, 8]
    assert len(load_manifest(folder).plans) == 3


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_runner_matches_onnxruntime_on_every_call_shape(trt, graphs, precision, tol):
    folder = graphs / precision
    sample, t, text = _inputs()
    with OrtRunner(folder) as ort, TrtRunner(folder, opt_segment_steps=2) as runner:
        ref_feats, feats = ort.encode(sample, t, text), runner.encode(sample, t, text)
        assert len(feats.skips) == len(ref_feats.skips)
        for a, b in zip(feats.tensors(), ref_feats.tensors()):
            assert rel_l2(a, b) < tol
        # 1 step, a full profile (4 steps = 8 rows), and 7 steps: two calls of 4 and 3 steps.
        for steps in ([800.0], [700.0, 600.0, 500.0, 400.0], [350.0, 300.0, 250.0, 200.0, 150.0, 100.0, 50.0]):
            ts = torch.tensor(steps)
            out, ref = runner.decode(feats, ts, text), ort.decode(ref_feats, ts, text)
            assert out.dtype == torch.float32 and out.shape == (2 * len(steps), 4, 8, 8)
            assert rel_l2(out, ref) < tol, steps
        dec = runner._dec
        assert dec is not None and dec.max_rows == 2 * MAX_SEGMENT_STEPS
        assert dec.context.runs == 1 + 1 + 1 + 2  # warm-up, 1 step, 4 steps, 7 steps in two calls
    # The features a caller holds survive the next encode (the runner copies them out of its buffers).
    with TrtRunner(folder) as runner:
        first = runner.encode(sample, t, text)
        kept = first.mid.clone()
        runner.encode(sample * 2, t, text)
        assert torch.equal(first.mid, kept)


def test_both_contexts_share_one_scratch_allocation(trt, graphs):
    with TrtRunner(graphs / "fp32") as runner:
        enc, dec = runner._enc, runner._dec
        assert enc is not None and dec is not None and runner._scratch is not None
        assert enc.user_managed and dec.user_managed
        assert enc.context.device_memory is not None and dec.context.device_memory is not None
        assert enc.context.device_memory[0] == dec.context.device_memory[0] == runner._scratch.data_ptr()
        need = max(enc.engine.device_memory_size_v2, dec.engine.device_memory_size_v2)
        assert runner._scratch.numel() >= need
    with TrtRunner(graphs / "fp32", share_memory=False) as runner:
        assert runner._scratch is None and runner._dec is not None and not runner._dec.user_managed
        sample, t, text = _inputs()
        assert torch.isfinite(runner.decode(runner.encode(sample, t, text), torch.tensor([500.0]), text)).all()


def test_cuda_graph_replay_equals_a_plain_run(trt, graphs):
    sample, t, text = _inputs()
    calls = ([800.0], [700.0, 600.0, 500.0], [400.0], [300.0, 200.0, 100.0])
    results = []
    for cuda_graphs in (False, True):
        with TrtRunner(graphs / "fp32", cuda_graphs=cuda_graphs) as runner:
            feats = runner.encode(sample, t, text)
            outs = [runner.decode(feats, torch.tensor(s), text) for s in calls]
            feats2 = runner.encode(sample * 0.5, t * 0.5, text)  # a replayed encoder reads the new inputs
            outs.append(runner.decode(feats2, torch.tensor([450.0]), text))
            if cuda_graphs:
                assert runner._dec is not None and runner._enc is not None
                # One graph per (decoder rows, key-step rows): 1 and 3 steps of the same 2 rows.
                assert sorted(runner._dec.graphs) == [(2, 2), (6, 2)]
                assert sorted(runner._enc.graphs) == [(2, 2)]
                assert (
                    runner._dec.graphs[(2, 2)].replays == 4 and runner._dec.graphs[(6, 2)].replays == 2
                )  # warm-up included
            results.append((feats, feats2, outs))
    for a, b in zip(results[0], results[1]):
        if isinstance(a, list):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        else:
            for x, y in zip(a.tensors(), b.tensors()):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_plan_that_cannot_be_captured_runs_with_plain_launches(trt, graphs, caplog):
    sample, t, text = _inputs()
    with TrtRunner(graphs / "fp32") as plain:
        feats = plain.encode(sample, t, text)
        ref = plain.decode(feats, torch.tensor([800.0, 700.0]), text)
    with TrtRunner(graphs / "fp32", cuda_graphs=True, warmup=False) as runner:
        assert runner._dec is not None
        runner._dec.engine._capturable = False
        with caplog.at_level(logging.WARNING, logger="fd_trt.backends.tensorrt"):
            feats = runner.encode(sample, t, text)
            outs = [runner.decode(feats, torch.tensor([800.0, 700.0]), text) for _ in range(2)]
        assert runner._dec.graphs == {(4, 2): None} and runner._enc is not None and list(runner._enc.graphs) == [(2, 2)]
    assert sum("cannot be captured" in r.message for r in caplog.records if r.name == "fd_trt.backends.tensorrt") == 1
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_the_stand_in_catches_a_missing_stream_wait(trt, graphs, monkeypatch):
    """The fake's streams have teeth: without the caller's wait, decode returns stale outputs."""
    sample, t, text = _inputs()
    with TrtRunner(graphs / "fp32") as runner:
        feats = runner.encode(sample, t, text)
        good = [runner.decode(feats, torch.tensor([s]), text) for s in (800.0, 100.0)]

        def no_wait(e, rows, key_rows=None):
            runner._set_rows(e, (rows, rows if key_rows is None else key_rows))
            with torch.cuda.stream(runner._stream):
                runner._enqueue(e, runner._stream)

        monkeypatch.setattr(runner, "_execute", no_wait)
        stale = runner.decode(feats, torch.tensor([800.0]), text)
    assert torch.equal(stale, good[1]) and not torch.equal(stale, good[0])


def test_encoder_rows_beyond_the_profile_run_in_chunks(trt, graphs):
    """6 rows through a 2-row encoder plan: 3 executions, the features of one 6-row ONNX Runtime run."""
    sample, t, text = _inputs(rows=6)
    t = torch.linspace(900.0, 100.0, 6)  # distinct per row, so a chunk that read another's rows shows
    with OrtRunner(graphs / "fp32") as ort, TrtRunner(graphs / "fp32", warmup=False) as runner:
        assert runner._enc is not None and runner._enc.max_rows == 2
        feats, ref = runner.encode(sample, t, text), ort.encode(sample, t, text)
        assert runner.launches["encoder"] == 3
        assert feats.rows == 6
        for a, b in zip(feats.tensors(), ref.tensors()):
            assert rel_l2(a, b) < 1e-5
        # 6 rows per step are within the decoder's 8: one step per execution, two steps in two.
        out = runner.decode(feats, torch.tensor([800.0, 700.0]), text)
        assert runner.launches["decoder"] == 2
        assert rel_l2(out, ort.decode(ref, torch.tensor([800.0, 700.0]), text)) < 1e-5
        # 10 rows per step exceed the decoder's 8 too: each step runs in row chunks (8 + 2).
        s10, t10, x10 = _inputs(rows=10)
        f10 = runner.encode(s10, t10, x10)
        out10 = runner.decode(f10, torch.tensor([600.0, 300.0]), x10)
        assert runner.launches["encoder"] == 3 + 5 and runner.launches["decoder"] == 2 + 4
        ref10 = ort.decode(ort.encode(s10, t10, x10), torch.tensor([600.0, 300.0]), x10)
        assert out10.shape == (20, 4, 8, 8) and rel_l2(out10, ref10) < 1e-5


def test_a_decode_split_in_two_executions_counts_two_launches(trt, graphs):
    sample, t, text = _inputs()
    with TrtRunner(graphs / "fp32", warmup=False) as runner:
        feats = runner.encode(sample, t, text)
        runner.decode(feats, torch.tensor([700.0, 600.0, 500.0, 400.0, 300.0]), text)  # 10 rows > the plan's 8
        assert runner.launches == {"encoder": 1, "decoder": 2}


def test_calls_from_two_threads_equal_sequential_calls(trt, graphs):
    """The runner's exclusive lock: two threads sharing its buffers get what one thread gets."""
    import threading

    inputs = [_inputs() for _ in range(2)]
    inputs[1] = (inputs[1][0] * -0.5, torch.full((2,), 300.0), inputs[1][2] * 2)
    steps = [torch.tensor([800.0, 600.0, 400.0, 200.0, 100.0]), torch.tensor([500.0, 50.0])]
    with TrtRunner(graphs / "fp32", warmup=False) as runner:
        sequential = []
        for (x, t, text), ts in zip(inputs, steps):
            sequential.append(runner.decode(runner.encode(x, t, text), ts, text))
        results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        barrier = threading.Barrier(2)

        def work(i: int) -> None:
            x, t, text = inputs[i]
            barrier.wait()
            for _ in range(3):
                results[i].append(runner.decode(runner.encode(x, t, text), steps[i], text))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    for i in range(2):
        assert len(results[i]) == 3
        for out in results[i]:
            torch.testing.assert_close(out, sequential[i], rtol=0, atol=0)


def test_rows_the_profiles_cannot_take_are_refused(trt, graphs):
    sample, t, text = _inputs(rows=2)
    with TrtRunner(graphs / "fp32") as runner:
        with pytest.raises(InputError, match=r"sample has shape \(2, 4, 4, 4\)"):
            runner.encode(torch.zeros(2, 4, 4, 4), t[:2], text[:2])
        enc = runner._enc
        assert enc is not None
        enc.min_rows = 2  # a plan built with a minimum of 2 rows cannot take 1, nor 5 split as 2+2+1 -> 3+2
        with pytest.raises(InputError, match=r"1 rows are outside the encoder plan's profile \(2\.\.2\)"):
            runner.encode(sample[:1], t[:1], text[:1])
        s5, t5, x5 = _inputs(rows=5)
        with pytest.raises(InputError, match=r"5 rows cannot be split into encoder plan calls of 2\.\.2 rows"):
            runner.encode(s5, t5, x5)


def test_more_images_than_the_plans_were_built_for_run_in_chunks(trt, graphs, tiny_sd):
    common = dict(
        num_images_per_prompt=3, num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(3)
    )
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=graphs / "fp32"
    )
    ort = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="onnxruntime", device="cpu", progress=False, engines=graphs / "fp32"
    )
    out = pipe(PROMPT, **common)
    ref = ort(PROMPT, **{**common, "generator": torch.Generator().manual_seed(3)})
    assert out.latents.shape[0] == 3 and rel_l2(out.latents, ref.latents) < 1e-5
    pipe.close()
    ort.close()


@pytest.mark.parametrize("schedule", ["paper", "all"])
def test_pipeline_matches_onnxruntime_and_torch(trt, graphs, tiny_sd, fd_pipe, latents, schedule):
    common = dict(num_inference_steps=20, latents=latents, output_type="latent", schedule=schedule)
    ort = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="onnxruntime", device="cpu", progress=False, engines=graphs / "fp32"
    )
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=graphs / "fp32"
    )
    out = pipe(PROMPT, **common)
    ref = ort(PROMPT, **common)
    assert out.stats.backend == "tensorrt" and not out.stats.nonfinite
    assert rel_l2(out.latents, ref.latents) < 1e-5
    assert rel_l2(out.latents, fd_pipe(PROMPT, **common).latents) < 1e-4
    if schedule == "paper":
        assert out.stats.decoder_rows == 40  # 20 steps x 2 CFG rows, decoded in calls of at most 8 rows
    pipe.close()
    ort.close()


def test_fp16_pipeline_is_close_to_the_fp32_torch_reference(trt, graphs, tiny_sd, fd_pipe, latents):
    common = dict(num_inference_steps=20, latents=latents, output_type="latent", schedule="paper")
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="tensorrt", device="cpu", progress=False, engines=graphs / "fp16"
    )
    assert pipe.precision == "fp16"
    out = pipe(PROMPT, **common)
    assert rel_l2(out.latents, fd_pipe(PROMPT, **common).latents) < 2e-2
    pipe.close()


def test_foreign_plans_are_refused_or_rebuilt(trt, graphs, tmp_path, caplog):
    from fd_trt.graphs.manifest import save_manifest

    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    build_plans(folder)
    manifest = load_manifest(folder)
    foreign = {}
    for rec in manifest.plans.values():  # make them plans an A40 built
        name = rec.file.replace(".sm90.", ".sm86.")
        (folder / rec.file).rename(folder / name)
        rec.file, rec.compute_capability, rec.gpu_name = name, [8, 6], "NVIDIA A40"
        foreign[name] = rec
    manifest.plans = foreign
    save_manifest(folder, manifest)
    with pytest.raises(EngineMismatchError, match=r"compute capability 8\.6 \(NVIDIA A40\), but this GPU has 9\.0"):
        TrtRunner(folder, build=False).activate()
    with caplog.at_level(logging.WARNING, logger="fd_trt.backends.tensorrt"):
        with TrtRunner(folder) as runner:
            assert runner.plans["decoder"].compute_capability == [9, 0]
    assert any("other GPUs" in r.message for r in caplog.records)
    after = load_manifest(folder).plans
    assert len(after) == 4 and set(foreign) <= set(after)  # the A40 plans stay, for the machines they fit
    assert {tuple(r.compute_capability) for r in after.values()} == {(8, 6), (9, 0)}
    # A plan file that does not match its record is refused, never run.
    plan = folder / _plans(folder)["decoder"].file
    plan.write_bytes(plan.read_bytes()[:-10])
    with pytest.raises(EngineMismatchError, match="does not match the manifest"):
        TrtRunner(folder, build=False).activate()


def _scale_up_block(unet, factor: float = 1.5) -> None:
    """New weights in place, as a fused LoRA writes them: the up blocks' first attention projections."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.startswith("up_blocks.1.") and ("to_q" in name or "proj_in" in name or "conv1" in name):
                param.mul_(factor)


@pytest.fixture
def own_sd(monkeypatch, tmp_path):
    """A tiny SD of its own (the tests change its weights) and an empty graph cache."""
    from fd_trt.families.models import tiny_sd_pipeline

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    return tiny_sd_pipeline(seed=0)


@pytest.mark.slow
def test_a_weight_change_is_refit_into_the_plans_in_place(trt, own_sd, latents):
    from fd_trt.graphs.weights import unet_weights_sha256
    from fd_trt.utils.files import file_sha256

    common = dict(num_inference_steps=6, latents=latents, output_type="latent", schedule="paper")
    pipe = FasterDiffusionPipeline.from_diffusers(
        own_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False
    )
    before = pipe(PROMPT, **common).latents
    runner = pipe.runner
    assert isinstance(runner, TrtRunner)
    folder = runner.engine_dir
    old = {role: rec for role, rec in runner.plans.items()}
    assert all(rec.refittable for rec in old.values())
    builds = len(fake_tensorrt.Builder.builds)

    _scale_up_block(own_sd.unet)
    after = pipe(PROMPT, **common).latents
    assert pipe.runner is runner  # refit in place: no new runner, no rebuilt plans
    assert len(fake_tensorrt.Builder.builds) == builds
    reference = FasterDiffusionPipeline.from_diffusers(own_sd, backend="torch", device="cpu", progress=False)
    expected = reference(PROMPT, **common).latents
    assert rel_l2(after, before) > 1e-2  # the change matters ...
    assert rel_l2(after, expected) < 1e-4  # ... and the refitted plans compute with the new weights

    manifest = load_manifest(folder)
    assert manifest.unet_sha256 == unet_weights_sha256(own_sd.unet)
    assert set(manifest.plans) == {rec.file for rec in old.values()}
    for role, rec in old.items():
        new = manifest.plans[rec.file]
        assert new.refitted_at > 0 and new.sha256 == file_sha256(folder / rec.file)
        # Only up-block (decoder) weights changed: the decoder plan's bytes change, the encoder's do not.
        assert (new.sha256 != rec.sha256) == (role == "decoder")
        assert new.graph_sha256 == manifest.graphs[role].sha256 == file_sha256(folder / manifest.graphs[role].file)
    # Another process (here: a new runner, build=False) loads the refitted plans, not stale ones.
    sample, t, text = _inputs()
    with TrtRunner(folder, build=False, warmup=False) as fresh, OrtRunner(folder) as ort:
        fresh_out = fresh.decode(fresh.encode(sample, t, text), torch.tensor([500.0]), text)
        ort_out = ort.decode(ort.encode(sample, t, text), torch.tensor([500.0]), text)
        assert rel_l2(fresh_out, ort_out) < 1e-5
    assert len(fake_tensorrt.Builder.builds) == builds
    pipe.close()


@pytest.mark.slow
def test_plans_that_are_not_refittable_are_rebuilt_for_new_weights(trt, own_sd, latents):
    common = dict(num_inference_steps=6, latents=latents, output_type="latent", schedule="paper")
    pipe = FasterDiffusionPipeline.from_diffusers(
        own_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, runner_options={"refittable": False}
    )
    pipe(PROMPT, **common)
    first = pipe.runner
    assert isinstance(first, TrtRunner) and not first.plans["decoder"].refittable
    assert not first.refit(own_sd.unet)
    _scale_up_block(own_sd.unet)
    after = pipe(PROMPT, **common).latents
    assert pipe.runner is not first and not first.is_active
    assert isinstance(pipe.runner, TrtRunner) and pipe.runner.engine_dir != first.engine_dir
    expected = FasterDiffusionPipeline.from_diffusers(own_sd, backend="torch", device="cpu", progress=False)(
        PROMPT, **common
    ).latents
    assert rel_l2(after, expected) < 1e-4
    pipe.close()


def test_a_corrupt_plan_is_refused_and_a_truncated_one_rebuilt(trt, graphs, tmp_path, caplog):
    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    build_plans(folder, opt_segment_steps=2)
    plan = folder / _plans(folder)["decoder"].file
    good = plan.read_bytes()
    plan.write_bytes(b"\0" * len(good))  # same size, garbage: only deserialization or the hash can tell
    with pytest.raises(EngineMismatchError, match=r"could not deserialize .*decoder.*rebuild"):
        TrtRunner(folder, build=False, warmup=False).activate()
    with pytest.raises(EngineMismatchError, match=r"decoder plan .* does not match the manifest .*rebuild"):
        TrtRunner(folder, build=False, warmup=False, full_hash=True).activate()
    plan.write_bytes(good[: len(good) // 2])  # cut short, as by a writer killed before atomic writes
    cache = next(folder.glob("timing.*.cache"))
    cache.write_bytes(b"garbage")  # and an unreadable timing cache: it costs time, not the build
    with caplog.at_level(logging.WARNING, logger="fd_trt.backends.tensorrt"):
        again = build_plans(folder, opt_segment_steps=2)
    assert {r.record.role: r.built for r in again} == {"encoder": False, "decoder": True}
    assert any("unreadable" in r.message for r in caplog.records)
    assert cache.read_bytes().startswith(b"FD_TRT_FAKE_TIMING")
    sample, t, text = _inputs()
    with TrtRunner(folder, build=False, warmup=False) as runner, OrtRunner(folder) as ort:
        out = runner.decode(runner.encode(sample, t, text), torch.tensor([600.0]), text)
        assert rel_l2(out, ort.decode(ort.encode(sample, t, text), torch.tensor([600.0]), text)) < 1e-5


def test_a_refused_refit_leaves_no_stale_plan(trt, graphs, tmp_path, monkeypatch, caplog):
    """TensorRT refusing a refit: refit() says False, and the directory holds the new graphs and no old plan."""
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.graphs.manifest import check_engine_dir
    from fd_trt.graphs.weights import unet_weights_sha256

    sd = tiny_sd_pipeline(seed=0)
    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    with TrtRunner(folder, warmup=False) as runner:
        old_files = {rec.file for rec in runner.plans.values()}
        _scale_up_block(sd.unet)

        def refuse(self, model):
            self._errors.append("weights 'x' changed shape")
            return False

        monkeypatch.setattr(fake_tensorrt.OnnxParserRefitter, "refit_from_file", refuse)
        with caplog.at_level(logging.WARNING, logger="fd_trt.backends.tensorrt"):
            assert runner.refit(sd.unet) is False
        sample, t, text = _inputs()
        with pytest.raises(EngineMismatchError, match=r"failed to refit .* create a new runner"):
            runner.encode(sample, t, text)  # its engines may hold a mix of old and new weights
    assert any("could not refit" in r.message and "changed shape" in r.message for r in caplog.records)
    manifest = check_engine_dir(folder, sd.unet, full_hash=True)  # the new graphs, recorded
    assert manifest.unet_sha256 == unet_weights_sha256(sd.unet) and manifest.plans == {}
    assert not any((folder / f).exists() for f in old_files)
    monkeypatch.undo()
    fake_tensorrt.install(monkeypatch)
    with TrtRunner(folder, warmup=False) as rebuilt, OrtRunner(folder) as ort:  # rebuilt from the new graphs
        sample, t, text = _inputs()
        out = rebuilt.decode(rebuilt.encode(sample, t, text), torch.tensor([400.0]), text)
        assert rel_l2(out, ort.decode(ort.encode(sample, t, text), torch.tensor([400.0]), text)) < 1e-5


@pytest.mark.slow
def test_a_fused_lora_is_refit_into_the_plans(trt, own_sd, latents):
    """diffusers + peft: a LoRA fused into the UNet (fuse_lora, unload_lora_weights) is refit, not rebuilt."""
    from peft import LoraConfig

    common = dict(num_inference_steps=6, latents=latents, output_type="latent", schedule="paper")
    pipe = FasterDiffusionPipeline.from_diffusers(
        own_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False
    )
    before = pipe(PROMPT, **common).latents
    runner, builds = pipe.runner, len(fake_tensorrt.Builder.builds)
    torch.manual_seed(0)  # the LoRA's random (non-zero) initialization
    own_sd.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False),
        adapter_name="style",
    )
    own_sd.fuse_lora(components=["unet"], lora_scale=0.7)
    own_sd.unload_lora_weights()  # the fused weights stay; the module names are the plain UNet's again
    after = pipe(PROMPT, **common).latents
    assert pipe.runner is runner and len(fake_tensorrt.Builder.builds) == builds
    assert isinstance(runner, TrtRunner) and runner.plans["decoder"].refitted_at > 0
    expected = FasterDiffusionPipeline.from_diffusers(own_sd, backend="torch", device="cpu", progress=False)(
        PROMPT, **common
    ).latents
    assert rel_l2(after, before) > 1e-3
    assert rel_l2(after, expected) < 1e-4
    pipe.close()


def test_a_directory_another_runner_refit_is_refit_from_its_graphs(trt, graphs, tmp_path):
    """Two replicas on one directory: the first refit exports the new graphs, the second only refits."""
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.utils.files import file_sha256

    sd = tiny_sd_pipeline(seed=0)
    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    sample, t, text = _inputs()
    with TrtRunner(folder, warmup=False) as a, TrtRunner(folder, warmup=False) as b:
        _scale_up_block(sd.unet)
        assert a.refit(sd.unet)
        graph = folder / "decoder.onnx"
        stamp = (graph.stat().st_mtime_ns, file_sha256(graph))
        assert b.refit(sd.unet)
        assert (graph.stat().st_mtime_ns, file_sha256(graph)) == stamp  # not exported again
        plan = folder / b.plans["decoder"].file
        plan_stamp = plan.stat().st_mtime_ns
        assert b.refit(sd.unet) and plan.stat().st_mtime_ns == plan_stamp  # up to date: nothing rewritten
        with OrtRunner(folder) as ort:
            ref = ort.decode(ort.encode(sample, t, text), torch.tensor([500.0]), text)
        for runner in (a, b):
            out = runner.decode(runner.encode(sample, t, text), torch.tensor([500.0]), text)
            assert rel_l2(out, ref) < 1e-5


# DeepFloyd IF stages I and II: the T5 pooling (text_pooled) and, for stage II, the noise level
# (class_labels [rows,1], float32 in every graph) as added inputs; 3 or 6 pixel channels in, 6 out.
IF_STAGES = {"if": (16, {"text_pooled": [128]}), "if-ii": (32, {"text_pooled": [128], "class_labels": [1]})}


@pytest.fixture(scope="module", params=list(IF_STAGES))
def if_stage(request, tmp_path_factory):
    """(stage, diffusers pipeline, fp32 engine directory with a short decoder profile)."""
    from fd_trt.families.deepfloyd_if import tiny_if_pipeline, tiny_if_sr_pipeline

    stage = request.param
    pipe = tiny_if_pipeline(seed=0) if stage == "if" else tiny_if_sr_pipeline(seed=0)
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", device="cpu", progress=False)
    size = IF_STAGES[stage][0]
    folder = tmp_path_factory.mktemp(f"fake_trt_{stage}")
    build_engines(
        pipe.unet,
        folder,
        latent_size=(size, size),
        text_shape=fd.text_shape(),
        added_shapes=fd.added_shapes(),
        max_segment_steps=MAX_SEGMENT_STEPS,
        progress=False,
    )
    return stage, pipe, fd, folder


def _if_call(fd, stage, steps, guidance_scale, schedule):
    extra = {}
    if stage == "if-ii":  # 16x16 stage-I images in [-1, 1], upscaled to 32x32
        image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        extra = dict(image=image, noise_level=250)
    return fd(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
        schedule=schedule,
        **extra,
    )


def test_if_plans_profile_the_added_inputs_and_the_manifest_records_them(trt, if_stage):
    stage, _, fd, folder = if_stage
    size, added = IF_STAGES[stage]
    manifest = load_manifest(folder)
    channels = 3 if stage == "if" else 6
    assert manifest.added_shapes == added and manifest.text_shape == [77, 32]
    assert manifest.latent_shape == [channels, size, size]
    built = {r.record.role: r.record for r in build_plans(folder, opt_segment_steps=2)}
    enc_rows, dec_rows = built["encoder"].rows, built["decoder"].rows
    assert enc_rows == [1, 2, 2] and dec_rows == [1, 4, 8]
    for role, rows in (("encoder", enc_rows), ("decoder", [1, 2, 8])):  # the decoder's key-step rows
        header = fake_tensorrt.plan_header(folder / built[role].file)
        for name, tail in added.items():
            assert header["profile"][name] == [[lo, *tail] for lo in rows], (role, name)
        assert header["profile"]["encoder_hidden_states"] == [[lo, 77, 32] for lo in rows]
        dtypes = {n: d for n, _, d in header["inputs"]}
        assert dtypes["text_pooled"] == "FLOAT" and dtypes.get("class_labels", "FLOAT") == "FLOAT"
    dec_header = fake_tensorrt.plan_header(folder / built["decoder"].file)
    assert [shape[0] for shape in dec_header["profile"]["timestep"]] == dec_rows
    with TrtRunner(folder) as runner:
        assert runner.contract is not None and list(runner.contract.added_names) == list(added)
        assert runner._dec is not None and runner._dec.tails["noise_pred"] == (6, size, size)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_if_on_tensorrt_equals_the_torch_backend(trt, if_stage, guidance_scale):
    stage, pipe, fd, folder = if_stage
    trt_fd = FasterDiffusionPipeline.from_diffusers(
        pipe, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=folder
    )
    # Stage I at 20 steps: key steps 0..10 and 15; stage II at 25: all but 21 and 23.
    steps = 20 if stage == "if" else 25
    refs = {}
    for schedule in ("all", "paper"):
        out = _if_call(trt_fd, stage, steps, guidance_scale, schedule)
        ref = refs[schedule] = _if_call(fd, stage, steps, guidance_scale, schedule)
        assert out.stats.backend == "tensorrt" and out.stats.key_steps == ref.stats.key_steps
        assert (out.images - ref.images).abs().max() < 1e-4, schedule
    assert len(refs["paper"].stats.key_steps) < steps
    # Encoder propagation changes the images by far more than the tolerance.
    assert (refs["paper"].images - refs["all"].images).abs().max() > 1e-3
    trt_fd.close()


def test_an_if_plan_from_an_older_graph_is_not_run(trt, if_stage, tmp_path, caplog):
    from fd_trt.graphs.manifest import save_manifest

    stage, _, _, graphs_dir = if_stage
    folder = _copy_without_plans(graphs_dir, tmp_path / "e")
    build_plans(folder)
    manifest = load_manifest(folder)
    for rec in manifest.plans.values():  # plans of the graphs an earlier export wrote
        rec.graph_sha256 = "0" * 64
    save_manifest(folder, manifest)
    with pytest.raises(EngineMismatchError, match="older version of the graph"):
        TrtRunner(folder, build=False).activate()
    builds = len(fake_tensorrt.Builder.builds)
    with caplog.at_level(logging.WARNING, logger="fd_trt.backends.tensorrt"):
        with TrtRunner(folder) as runner:
            graphs = load_manifest(folder).graphs
            assert {role: runner.plans[role].graph_sha256 for role in ("encoder", "decoder")} == {
                role: graphs[role].sha256 for role in ("encoder", "decoder")
            }
    assert len(fake_tensorrt.Builder.builds) == builds + 2  # both plans built anew from the current graphs
    assert any("graphs or profiles" in r.message for r in caplog.records)


def test_the_rebuild_command_of_an_if_directory_names_its_pixel_size(if_stage):
    # IF's UNet runs on pixels (no VAE): a rebuild must ask for the size it was built at, not 8x.
    from fd_trt.graphs.manifest import check_engine_dir, rebuild_command

    stage, _, _, folder = if_stage
    size = IF_STAGES[stage][0]
    assert f"--height {size} --width {size}" in rebuild_command(folder, load_manifest(folder))
    with pytest.raises(EngineMismatchError, match=f"--height {2 * size} --width {2 * size}"):
        check_engine_dir(folder, latent_size=(2 * size, 2 * size))


# Last: fd-trt's CLI points logging at the captured stderr, which pytest closes after the test;
# later tests' warnings would print 'Logging error' noise.
def test_cli_build_makes_plans_and_generate_runs_them(trt, tmp_path, capsys):
    from fd_trt.cli import main

    out = tmp_path / "eng"
    assert (
        main(
            [
                "build",
                "--backend",
                "tensorrt",
                "--precision",
                "fp32",
                "--out",
                str(out),
                "--quiet",
                "--max-segment-steps",
                "4",
                "--height",
                "64",
                "--width",
                "64",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "decoder plan: decoder.trt10.13.0.fake.sm90.rows1-8-8.plan" in printed, printed
    assert (
        main(
            [
                "generate",
                PROMPT,
                "--backend",
                "tensorrt",
                "--precision",
                "fp32",
                "--engines",
                str(out),
                "--device",
                "cpu",
                "--steps",
                "8",
                "--height",
                "64",
                "--width",
                "64",
                "--out",
                str(tmp_path / "x.png"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("name", [pytest.param("sdxl_base_like", marks=pytest.mark.slow), "sdxl_refiner_like"])
def test_sdxl_plans_profile_the_added_conditioning_and_match_onnxruntime(trt, tmp_path, name):
    """SDXL-shaped graphs: the profiles cover text_embeds and time_ids, and every call shape matches ORT."""
    from tiny_sdxl import SDXL_CONFIGS, added_conditioning, tiny_sdxl_unet

    _, pooled, k = SDXL_CONFIGS[name]
    unet = tiny_sdxl_unet(name)
    folder = tmp_path / name
    build_engines(
        unet,
        folder,
        latent_size=(8, 8),
        text_shape=(5, unet.config.cross_attention_dim),
        added_shapes={"text_embeds": [pooled], "time_ids": [k]},
        max_segment_steps=MAX_SEGMENT_STEPS,
        progress=False,
    )
    built = build_plans(folder, opt_segment_steps=2)
    enc_rows = next(r.record.rows for r in built if r.record.role == "encoder")
    for res in built:
        header = fake_tensorrt.plan_header(folder / res.record.file)
        # The decoder takes the key step's added rows: tuned at the encoder's, up to its own maximum.
        rows = (
            res.record.rows if res.record.role == "encoder" else [res.record.rows[0], enc_rows[1], res.record.rows[2]]
        )
        assert header["profile"]["text_embeds"] == [[lo, pooled] for lo in rows]
        assert header["profile"]["time_ids"] == [[lo, k] for lo in rows]
        assert dict((n, d) for n, _, d in header["inputs"])["time_ids"] == "FLOAT"
    gen = torch.Generator().manual_seed(0)
    sample, text = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.randn(2, 5, unet.config.cross_attention_dim, generator=gen),
    )
    t, added = torch.full((2,), 900.0), added_conditioning(name, 2)
    with OrtRunner(folder) as ort, TrtRunner(folder, opt_segment_steps=2, cuda_graphs=True) as runner:
        assert runner.contract is not None and runner.contract.added_names == ("text_embeds", "time_ids")
        ref_feats, feats = ort.encode(sample, t, text, added), runner.encode(sample, t, text, added)
        for a, b in zip(feats.tensors(), ref_feats.tensors()):
            assert rel_l2(a, b) < 1e-5
        # 1 step, a full profile, and 6 steps in two calls: the added rows are tiled step-major.
        for steps in ([800.0], [700.0, 600.0, 500.0, 400.0], [350.0, 300.0, 250.0, 200.0, 150.0, 100.0]):
            ts = torch.tensor(steps)
            out, ref = runner.decode(feats, ts, text, added), ort.decode(ref_feats, ts, text, added)
            assert rel_l2(out, ref) < 1e-5, steps
        other = runner.decode(feats, torch.tensor([800.0]), text, {**added, "time_ids": added["time_ids"] + 64})
        assert rel_l2(other, runner.decode(feats, torch.tensor([800.0]), text, added)) > 1e-4
        with pytest.raises(InputError, match="time_ids"):
            runner.encode(sample, t, text, {"text_embeds": added["text_embeds"]})


@pytest.mark.slow
def test_sdxl_plans_refit_new_added_embedding_weights(trt, tmp_path):
    """A LoRA-like change to SDXL's add_embedding reaches both plans (matched by initializer name)."""
    from fd_trt.backends.torch import TorchRunner

    from tiny_sdxl import added_conditioning, tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    folder = tmp_path / "sdxl"
    build_engines(unet, folder, latent_size=(8, 8), text_shape=(5, 32), max_segment_steps=2, progress=False)
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    t, steps, added = (
        torch.full((2,), 700.0),
        torch.tensor([700.0, 600.0, 500.0]),
        added_conditioning("sdxl_base_like", 2),
    )
    with TrtRunner(folder) as runner:
        before = runner.decode(runner.encode(sample, t, text, added), steps, text, added)
        with torch.no_grad():
            unet.add_embedding.linear_1.weight.mul_(1.5)
        assert runner.refit(unet)
        after = runner.decode(runner.encode(sample, t, text, added), steps, text, added)
    with TorchRunner(unet) as ref:
        want = ref.decode(ref.encode(sample, t, text, added), steps, text, added)
    assert rel_l2(after, want) < 1e-5 and rel_l2(before, want) > 1e-4
    assert load_manifest(folder).added_shapes == {"text_embeds": [24], "time_ids": [6]}


# ControlNet plans ---------------------------------------------------------------------------------
def test_controlnet_plan_has_the_encoder_profile_and_matches_torch_and_onnxruntime(trt, graphs, tiny_sd, tmp_path):
    from test_controlnet import tiny_controlnet

    from fd_trt.backends.tensorrt import build_controlnet_plan
    from fd_trt.graphs.build import build_controlnet_graph

    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    net = tiny_controlnet(tiny_sd.unet, 1)
    rec = build_controlnet_graph(net, folder, progress=False)
    gen = torch.Generator().manual_seed(5)
    x, e = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 16, 32, generator=gen)
    image, t = torch.rand(3, 3, 64, 64, generator=gen), torch.tensor([900.0, 450.0, 30.0])
    with TrtRunner(folder, device="cpu", warmup=False) as runner:
        call = runner.controlnet(rec)
        plan = _plans(folder)["controlnet"]
        assert plan.rows == _plans(folder)["encoder"].rows == [1, 2, 2]  # the encoder's rows (2B)
        assert plan.file.startswith(rec.file[: -len(".onnx")] + ".trt") and plan.graph_sha256 == rec.sha256
        header = fake_tensorrt.plan_header(folder / plan.file)
        assert header["profile"]["conditioning_scale"] == [[1], [1], [1]]  # the one static input
        assert header["profile"]["controlnet_cond"][2] == [2, 3, 64, 64]
        for guess in (False, True):
            launched = runner.launches.get("controlnet", 0)
            down, mid = call(x, t, e, image, 0.6, guess)
            assert runner.launches["controlnet"] - launched == 2  # 3 rows over a 2-row profile: two executions
            with torch.no_grad():
                ref_down, ref_mid = net(
                    x,
                    t,
                    encoder_hidden_states=e,
                    controlnet_cond=image,
                    conditioning_scale=0.6,
                    guess_mode=guess,
                    return_dict=False,
                )
            assert max(rel_l2(a, b) for a, b in zip([*down, mid], [*ref_down, ref_mid])) < 1e-5
        with OrtRunner(folder, warmup=False) as ort:
            o_down, o_mid = ort.controlnet(rec)(x, t, e, image, 0.6, False)
        down, mid = call(x, t, e, image, 0.6, False)
        assert max(rel_l2(a, b) for a, b in zip([*down, mid], [*o_down, o_mid])) < 1e-5
    # Up to date: kept, not rebuilt.
    again = build_controlnet_plan(folder, rec, device="cpu")
    assert not again.built and again.record == plan


def test_a_missing_controlnet_plan_is_refused_without_build(trt, graphs, tiny_sd, tmp_path):
    from test_controlnet import tiny_controlnet

    from fd_trt.graphs.build import build_controlnet_graph

    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    build_plans(folder)
    rec = build_controlnet_graph(tiny_controlnet(tiny_sd.unet, 2), folder, progress=False)
    with TrtRunner(folder, device="cpu", build=False, warmup=False) as runner:
        with pytest.raises(EngineMismatchError, match="no TensorRT plan of controlnet-.*build_controlnet_plan"):
            runner.controlnet(rec)


@pytest.mark.slow
def test_pipeline_with_controlnet_on_tensorrt_reproduces_diffusers(trt, graphs, tiny_sd, tmp_path):
    import shutil

    from test_controlnet import _cn_pipeline, control_image, tiny_controlnet

    folder = tmp_path / "e"
    shutil.copytree(graphs / "fp32", folder)
    sd = _cn_pipeline(tiny_sd, tiny_controlnet(tiny_sd.unet, 1))
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=folder
    )
    common = dict(
        image=control_image(3), num_inference_steps=8, output_type="latent", controlnet_conditioning_scale=0.7
    )
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(2), **common).images
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(2), schedule="all", **common)
    assert out.stats.backend == "tensorrt" and rel_l2(out.images, ref) < 1e-4
    paper = pipe(
        PROMPT,
        generator=torch.Generator().manual_seed(2),
        num_inference_steps=20,
        image=control_image(3),
        output_type="latent",
        schedule="paper",
    )
    (call,) = pipe.runner._controlnets.values()
    assert paper.stats.controlnet_calls == paper.stats.encoder_calls == 7
    assert call.calls == 8 + 7  # every ControlNet forward of both calls ran as the plan
    pipe.close()


# Decoder schedules (deepcache:N, combined:...) -----------------------------------------------------
def _with_shallow_graphs(graphs, tmp_path, unet, depths=(1,)):
    """A copy of the fp32 directory, without plans, with the decoder schedules' graphs of ``depths``."""
    from fd_trt.graphs.shallow import build_shallow_graphs

    folder = _copy_without_plans(graphs / "fp32", tmp_path / "e")
    for depth in depths:
        build_shallow_graphs(unet, folder, depth)
    return folder


def _shallow_calls(runner, depth, sample, t, text, steps):
    """decode_capture, decode_shallow (and conv_in's at depth 1) of one runner on the same inputs."""
    feats = runner.encode(sample, t, text)
    noise, hidden = runner.decode_capture(feats, steps, text, None, (depth,))
    shallow = runner.decode_shallow(hidden[depth], feats.skips[:depth], steps, text)
    out = [noise, hidden[depth], shallow]
    if depth == 1:
        out.append(runner.input_conv(sample * 0.5))
    return out


@pytest.mark.parametrize("depth", [1, 2])
def test_shallow_plans_are_built_into_the_manifest_and_match_torch(trt, graphs, tiny_sd, tmp_path, depth):
    from fd_trt.backends.torch import TorchRunner
    from fd_trt.graphs.contract import shallow_roles

    folder = _with_shallow_graphs(graphs, tmp_path, tiny_sd.unet, (depth,))
    roles = shallow_roles(depth)
    build_plans(folder, opt_segment_steps=2)
    built = build_plans(folder, roles=roles, opt_segment_steps=2)
    assert [r.record.role for r in built] == list(roles) and all(r.built for r in built)
    manifest = load_manifest(folder)
    plans = _plans(folder)
    for role in roles:
        rec = plans[role]
        # capture and shallow plans take the decoder's rows (S steps of N), conv_in the encoder's
        assert rec.rows == ([1, 2, 2] if role == "input_conv" else [1, 4, 8]), role
        assert rec.file == f"{role}.trt10.13.0.fake.sm90.rows{'-'.join(map(str, rec.rows))}.plan"
        assert rec.graph_sha256 == manifest.graphs[role].sha256 and rec.refittable
        assert (folder / rec.file).stat().st_size == rec.bytes
    header = fake_tensorrt.plan_header(folder / plans[f"shallow_d{depth}"].file)
    # The hidden state and timestep have the rows of every step of a call; the skips and text the
    # key step's, once for all the steps (as the decoder's features).
    assert [s[0] for s in header["profile"]["hidden"]] == [1, 4, 8]
    assert [s[0] for s in header["profile"]["timestep"]] == [1, 4, 8]
    assert [s[0] for s in header["profile"]["skip_00"]] == [1, 2, 8]
    assert [s[0] for s in header["profile"]["encoder_hidden_states"]] == [1, 2, 8]
    capture = fake_tensorrt.plan_header(folder / plans[f"decoder_capture_d{depth}"].file)
    assert [s[0] for s in capture["profile"]["mid"]] == [1, 2, 8]
    gen = torch.Generator().manual_seed(4)
    # 2 rows x 5 steps (10 rows: two executions of a 4-step profile), and 10 rows x 2 steps (each
    # step in row chunks of 8 and 2, and the encoder and conv_in in chunks of 2).
    for rows, steps in ((2, [900.0, 700.0, 500.0, 300.0, 100.0]), (10, [800.0, 200.0])):
        sample, text = torch.randn(rows, 4, 8, 8, generator=gen), torch.randn(rows, 16, 32, generator=gen)
        t, ts = torch.linspace(950.0, 50.0, rows), torch.tensor(steps)
        with TrtRunner(folder, build=False, warmup=False) as runner, TorchRunner(tiny_sd.unet) as ref:
            got = _shallow_calls(runner, depth, sample, t, text, ts)
            want = _shallow_calls(ref, depth, sample, t, text, ts)
            assert (
                runner.launches["shallow"] == {2: 2, 10: 4}[rows]
            )  # 2 rows: 5 steps in 4 + 1; 10 rows: 8 + 2 per step
        assert len(got) == len(want) == (4 if depth == 1 else 3)
        for a, b in zip(got, want):
            assert a.shape == b.shape and rel_l2(a, b) < 1e-5


@pytest.mark.parametrize(
    "schedule",
    ["deepcache:3", "combined:0,8|none|2", "combined:0,4,8|uniform:2|1|fresh"],
)
def test_decoder_schedules_on_tensorrt_equal_torch(trt, graphs, tiny_sd, fd_pipe, latents, tmp_path, schedule):
    import shutil

    folder = tmp_path / "e"
    shutil.copytree(graphs / "fp32", folder)
    common = dict(num_inference_steps=12, latents=latents, output_type="latent", schedule=schedule)
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=folder
    )
    out = pipe(PROMPT, **common)
    want = fd_pipe(PROMPT, **common)
    assert out.stats.backend == "tensorrt" and not out.stats.nonfinite
    assert out.stats.shallow_calls == want.stats.shallow_calls > 0
    assert rel_l2(out.latents, want.latents) < 1e-4
    assert rel_l2(out.latents, fd_pipe(PROMPT, **{**common, "schedule": "all"}).latents) > 1e-4  # reuse shows
    # The plans of the schedule's graphs are in the manifest, built from the graphs it records.
    manifest = load_manifest(folder)
    depth = 2 if schedule.endswith("|2") else 1
    roles = {f"decoder_capture_d{depth}", f"shallow_d{depth}"} | ({"input_conv"} if depth == 1 else set())
    plans = {p.role: p for p in manifest.plans.values()}
    assert roles <= set(plans)
    for role in roles:
        assert plans[role].graph_sha256 == manifest.graphs[role].sha256 and (folder / plans[role].file).is_file()
    pipe.close()


def test_a_stale_or_missing_shallow_plan_never_runs(trt, graphs, tmp_path):
    from fd_trt.backends.torch import TorchRunner
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.graphs.manifest import engine_dir_lock, save_manifest
    from fd_trt.graphs.shallow import export_shallow_into

    sd = tiny_sd_pipeline(seed=0)
    folder = _with_shallow_graphs(graphs, tmp_path, sd.unet)
    build_plans(folder)
    build_plans(folder, roles=("decoder_capture_d1", "shallow_d1", "input_conv"))
    old = _plans(folder)
    # The depth-1 graphs exported again from other weights: the plans recorded for them are stale.
    _scale_up_block(sd.unet)
    with engine_dir_lock(folder):
        manifest = load_manifest(folder)
        export_shallow_into(sd.unet, folder, manifest, 1)
        save_manifest(folder, manifest)
    sample, t, text = _inputs()
    steps = torch.tensor([700.0, 400.0])
    with TrtRunner(folder, build=False, warmup=False) as runner:
        feats = runner.encode(sample, t, text)
        with pytest.raises(EngineMismatchError, match=r"decoder_capture_d1.*older version of the graph"):
            runner.decode_capture(feats, steps, text, None, (1,))
        assert "shallow" not in runner.launches and runner.launches.get("decoder", 0) == 0
    # With builds allowed the runner builds plans of the current graphs, and they compute with the new weights.
    with TrtRunner(folder, warmup=False) as runner, TorchRunner(sd.unet) as ref:
        feats, ref_feats = runner.encode(sample, t, text), ref.encode(sample, t, text)
        _, hidden = runner.decode_capture(feats, steps, text, None, (1,))
        _, ref_hidden = ref.decode_capture(ref_feats, steps, text, None, (1,))
        assert rel_l2(hidden[1], ref_hidden[1]) < 1e-5
        out = runner.decode_shallow(hidden[1], feats.skips[:1], steps, text)
        assert rel_l2(out, ref.decode_shallow(ref_hidden[1], ref_feats.skips[:1], steps, text)) < 1e-5
    new = _plans(folder)
    assert new["shallow_d1"].file == old["shallow_d1"].file  # same name, rebuilt for the new graph
    assert new["shallow_d1"].graph_sha256 != old["shallow_d1"].graph_sha256
    # A recorded plan whose file is gone is refused, not rebuilt behind the record's back.
    (folder / new["input_conv"].file).unlink()
    with TrtRunner(folder, warmup=False) as runner:
        with pytest.raises(EngineMismatchError, match=r"input_conv plan .* is missing"):
            runner.input_conv(sample)
    # Graphs not exported yet: the message names the export.
    bare = _copy_without_plans(graphs / "fp32", tmp_path / "bare")
    with TrtRunner(bare, warmup=False) as runner:
        with pytest.raises(EngineMismatchError, match=r"no shallow decoder graphs of depth 2.*build_shallow_graphs"):
            runner.decode_shallow(hidden[1], (feats.skips[0], feats.skips[1]), steps, text)


def test_a_weight_change_is_refit_into_the_shallow_plans(trt, graphs, tmp_path):
    from fd_trt.backends.torch import TorchRunner
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.utils.files import file_sha256

    sd = tiny_sd_pipeline(seed=0)
    folder = _with_shallow_graphs(graphs, tmp_path, sd.unet)
    sample, t, text = _inputs()
    steps = torch.tensor([700.0, 500.0, 300.0])
    with TrtRunner(folder, warmup=False) as runner:
        before = _shallow_calls(runner, 1, sample, t, text, steps)
        old = {role: rec for role, rec in runner.plans.items()}
        builds = len(fake_tensorrt.Builder.builds)
        _scale_up_block(sd.unet)
        conv = sd.unet.conv_in.weight
        with torch.no_grad():
            conv.mul_(1.25)  # conv_in too: the input-conv plan must follow
        assert runner.refit(sd.unet)
        assert len(fake_tensorrt.Builder.builds) == builds  # refit, not rebuilt
        after = _shallow_calls(runner, 1, sample, t, text, steps)
    with TorchRunner(sd.unet) as ref:
        want = _shallow_calls(ref, 1, sample, t, text, steps)
    for a, b, w in zip(before, after, want):
        assert rel_l2(b, w) < 1e-5 and rel_l2(a, w) > 1e-4
    manifest = load_manifest(folder)
    for role in ("decoder_capture_d1", "shallow_d1", "input_conv"):
        rec = manifest.plans[old[role].file]
        assert rec.refitted_at > 0 and rec.sha256 == file_sha256(folder / rec.file)
        assert rec.graph_sha256 == manifest.graphs[role].sha256 == file_sha256(folder / manifest.graphs[role].file)
    # Another process (a new runner that may not build) loads the refitted plans.
    with TrtRunner(folder, build=False, warmup=False) as fresh:
        again = _shallow_calls(fresh, 1, sample, t, text, steps)
    for a, w in zip(again, want):
        assert rel_l2(a, w) < 1e-5
    assert len(fake_tensorrt.Builder.builds) == builds


def test_the_server_serves_a_decoder_schedule_on_tensorrt(trt, graphs, tiny_sd, fd_pipe, tmp_path):
    import shutil

    from fd_trt.serving.runtime import GenerateRequest, ServingRuntime

    folder = tmp_path / "e"
    shutil.copytree(graphs / "fp32", folder)
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="tensorrt", device="cpu", precision="fp32", progress=False, engines=folder
    )
    rt = ServingRuntime(pipe, warmup=False)
    try:
        req = GenerateRequest(prompt=PROMPT, seed=3, steps=9, schedule="deepcache:3")
        res = rt.submit(req).result(timeout=300)
    finally:
        rt.shutdown()
    want = fd_pipe(
        PROMPT,
        num_inference_steps=9,
        generator=torch.Generator().manual_seed(3),
        schedule="deepcache:3",
        output_type="latent",
    )
    assert rel_l2(res.latents, want.latents[0]) < 1e-4
    assert "shallow_d1" in {p.role for p in load_manifest(folder).plans.values()}


def test_shallow_plans_that_need_more_scratch_grow_it_for_every_context(trt, graphs, tiny_sd, tmp_path, monkeypatch):
    """A decoder schedule's plan loaded later that needs more scratch than the encoder and decoder:
    one larger allocation for every context, and CUDA graphs captured with the old one are dropped."""
    folder = _with_shallow_graphs(graphs, tmp_path, tiny_sd.unet)
    base = fake_tensorrt.ICudaEngine.device_memory_size_v2.fget
    monkeypatch.setattr(
        fake_tensorrt.ICudaEngine,
        "device_memory_size_v2",
        property(lambda self: base(self) * (4 if "hidden" in self.profile else 1)),
    )
    sample, t, text = _inputs()
    steps = torch.tensor([800.0, 600.0])
    with TrtRunner(folder, warmup=False) as plain:
        feats = plain.encode(sample, t, text)
        want = [plain.decode(feats, steps, text), *_shallow_calls(plain, 1, sample, t, text, steps)]
    with TrtRunner(folder, warmup=False, cuda_graphs=True) as runner:
        feats = runner.encode(sample, t, text)
        first = runner.decode(feats, steps, text)
        assert runner._dec is not None and runner._enc is not None and runner._dec.graphs
        assert runner._scratch is not None
        small = runner._scratch.numel()
        got = _shallow_calls(runner, 1, sample, t, text, steps)
        scratch = runner._scratch
        assert scratch is not None and scratch.numel() > small
        for e in runner._engines():
            assert e.context.device_memory == (scratch.data_ptr(), scratch.numel()), e.role
        assert not runner._dec.graphs and not runner._enc.graphs  # captured with the old allocation
        again = runner.decode(runner.encode(sample, t, text), steps, text)  # recaptured with the new allocation
    for a, b in zip([first, *got], want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(again, want[0], rtol=0, atol=0)


def test_cli_builds_plans_of_a_pixel_space_if_model(trt, tmp_path, capsys):
    """``fd-trt build`` on a DeepFloyd IF folder: no VAE, so the graphs take the pixels themselves."""
    from fd_trt.cli import main
    from fd_trt.families.deepfloyd_if import tiny_if_pipeline

    model, out = tmp_path / "if", tmp_path / "eng"
    tiny_if_pipeline(seed=0).save_pretrained(model)
    args = ["build", "--model", str(model), "--backend", "tensorrt", "--precision", "fp32", "--out", str(out)]
    assert main([*args, "--quiet", "--max-segment-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "decoder plan: decoder.trt10.13.0.fake.sm90.rows1-4-4.plan" in printed, printed
    manifest = load_manifest(out)
    assert manifest.latent_shape == [3, 16, 16] and manifest.added_shapes == {"text_pooled": [128]}
    assert {r.role for r in manifest.plans.values()} == {"encoder", "decoder"}
