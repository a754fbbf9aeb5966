"""The TensorRT backend: CPU-side logic everywhere, plans and runtime where TensorRT and a GPU are.

On a machine without TensorRT or CUDA the GPU tests skip; what needs neither (profiles, plan
names, manifest checks, the errors when TensorRT is missing) runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fd_trt.backends import get_runner_class
from fd_trt.backends.tensorrt import (
    RowProfile,
    TrtRunner,
    build_plans,
    input_profile_shapes,
    most_common_segment_steps,
    plan_file_name,
    profile_rows,
    profiles_for_manifest,
    require_tensorrt,
    runtime_problem,
    timing_cache_file_name,
)
from fd_trt.core.schedule import parse_schedule
from fd_trt.errors import BackendUnavailableError, EngineMismatchError, InputError
from fd_trt.graphs.manifest import FORMAT_VERSION, GraphRecord, Manifest, PlanRecord, check_plan, find_plan

TRT_PROBLEM = runtime_problem()
needs_trt = pytest.mark.skipif(TRT_PROBLEM is not None, reason=f"TensorRT + CUDA unavailable: {TRT_PROBLEM}")


# ---- profiles ---------------------------------------------------------------------------------
def test_paper_profile_is_tuned_for_the_ten_step_segments():
    prof = profile_rows(parse_schedule("paper", 50))
    assert prof["encoder"] == RowProfile(1, 2, 2)
    # Segments 1,1,1,2,5,5,10,10,15: the 10-step ones cover the most steps (20); the longest is 15.
    assert prof["decoder"] == RowProfile(1, 20, 30)
    assert profile_rows() == prof  # DDIM-50 paper is the default


@pytest.mark.parametrize(
    "spec, steps, batch, expected_decoder",
    [
        ("all", 50, 1, RowProfile(1, 2, 2)),
        ("uniform:5", 50, 1, RowProfile(1, 10, 10)),
        ("0,1,2,3,5,10,15", 20, 1, RowProfile(1, 10, 10)),  # DPM-Solver++ 20: 5-step segments cover 15 steps
        ("paper", 50, 2, RowProfile(1, 40, 60)),
    ],
)
def test_profiles_follow_the_schedule_and_batch(spec, steps, batch, expected_decoder):
    prof = profile_rows(parse_schedule(spec, steps), batch=batch)
    assert prof["encoder"] == RowProfile(1, 2 * batch, 2 * batch)
    assert prof["decoder"] == expected_decoder


def test_profile_overrides_and_clipping():
    sched = parse_schedule("paper", 50)
    assert profile_rows(sched, opt_segment_steps=15)["decoder"] == RowProfile(1, 30, 30)
    assert profile_rows(sched, opt_segment_steps=40)["decoder"] == RowProfile(1, 30, 30)  # clipped to the max
    assert profile_rows(sched, max_segment_steps=5)["decoder"] == RowProfile(1, 10, 10)
    assert profile_rows(sched, min_rows=2)["decoder"] == RowProfile(2, 20, 30)
    with pytest.raises(InputError, match="batch"):
        profile_rows(sched, batch=0)
    with pytest.raises(InputError, match="opt_segment_steps"):
        profile_rows(sched, opt_segment_steps=-1)


def test_most_common_segment_prefers_covered_steps_then_length():
    assert most_common_segment_steps(parse_schedule("paper", 50)) == 10
    assert most_common_segment_steps(parse_schedule("0,2,4,6", 8)) == 2
    assert most_common_segment_steps(parse_schedule("0,1,2,4", 6)) == 2  # 1+1 steps vs 2+2: ties go longer


def test_profiles_from_manifest_ranges():
    assert profiles_for_manifest([1, 2], [1, 30]) == profile_rows(parse_schedule("paper", 50))
    assert profiles_for_manifest([1, 4], [1, 60], opt_segment_steps=5)["decoder"] == RowProfile(1, 20, 60)
    with pytest.raises(EngineMismatchError, match="rebuild"):
        profiles_for_manifest([1, 3], [1, 30])


def test_input_profile_shapes_fix_everything_but_rows():
    shapes = input_profile_shapes(RowProfile(1, 20, 30), {"sample": [-1, 4, 64, 64], "timestep": [-1]})
    assert shapes["sample"] == ((1, 4, 64, 64), (20, 4, 64, 64), (30, 4, 64, 64))
    assert shapes["timestep"] == ((1,), (20,), (30,))
    with pytest.raises(EngineMismatchError, match="only axis 0 may be dynamic"):
        input_profile_shapes(RowProfile(1, 2, 2), {"sample": [-1, 4, -1, 64]})
    with pytest.raises(InputError):
        RowProfile(3, 2, 4)


# ---- names ------------------------------------------------------------------------------------
def test_plan_names_carry_version_capability_and_profile():
    rows = RowProfile(1, 20, 30)
    name = plan_file_name("decoder", "10.13.0.35", (9, 0), rows)
    assert name == "decoder.trt10.13.0.35.sm90.rows1-20-30.plan"
    others = {
        plan_file_name("encoder", "10.13.0.35", (9, 0), rows),
        plan_file_name("decoder", "11.4.0.106", (9, 0), rows),
        plan_file_name("decoder", "10.13.0.35", (8, 9), rows),
        plan_file_name("decoder", "10.13.0.35", (9, 0), RowProfile(1, 10, 30)),
    }
    assert name not in others and len(others) == 4
    assert "/" not in plan_file_name("decoder", "10.1/../x", (9, 0), rows)
    assert timing_cache_file_name("11.4.0.106", (10, 0)) == "timing.trt11.4.0.106.sm100.cache"
    with pytest.raises(InputError, match="role"):
        plan_file_name("unet", "10.13.0.35", (9, 0), rows)
    with pytest.raises(InputError, match="compute_capability"):
        plan_file_name("decoder", "10.13.0.35", (9,), rows)


# ---- manifest ---------------------------------------------------------------------------------
def _record(
    version: str = "10.13.0.35",
    cc: tuple[int, int] = (9, 0),
    graph: str = "g" * 64,
    built_at: float = 1.0,
    rows: tuple[int, int, int] = (1, 20, 30),
) -> PlanRecord:
    prof = RowProfile(*rows)
    return PlanRecord(
        role="decoder",
        file=plan_file_name("decoder", version, cc, prof),
        sha256="0" * 64,
        bytes=10,
        tensorrt_version=version,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=list(cc),
        rows=prof.as_list(),
        graph_sha256=graph,
        built_at=built_at,
    )


def _manifest(*plans: PlanRecord) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        model_source="x",
        unet_sha256="u",
        unet_config={},
        latent_shape=[4, 8, 8],
        text_shape=[16, 32],
        precision="fp16",
        opset=17,
        num_skips=3,
        encoder_rows=[1, 2],
        decoder_rows=[1, 30],
        versions={},
        graphs={
            "encoder": GraphRecord("encoder.onnx", "e" * 64, 1),
            "decoder": GraphRecord("decoder.onnx", "g" * 64, 1),
        },
        plans={p.file: p for p in plans},
    )


def test_check_plan_refuses_foreign_tensorrt_gpu_and_graph(tmp_path):
    rec = _record()
    check_plan(rec, tensorrt_version="10.13.0.35", compute_capability=(9, 0), graph_sha256="g" * 64)
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.13.0.35, but this machine runs TensorRT 11.4.0.106"):
        check_plan(rec, tensorrt_version="11.4.0.106", compute_capability=(9, 0), engine_dir=tmp_path)
    with pytest.raises(
        EngineMismatchError, match=r"compute capability 9.0 \(NVIDIA H100 80GB HBM3\), but this GPU has 8.9"
    ):
        check_plan(rec, tensorrt_version="10.13.0.35", compute_capability=(8, 9), engine_dir=tmp_path)
    with pytest.raises(EngineMismatchError, match="older version of the graph") as err:
        check_plan(
            rec, tensorrt_version="10.13.0.35", compute_capability=(9, 0), graph_sha256="h" * 64, engine_dir=tmp_path
        )
    assert f"fd-trt build --backend tensorrt --out {tmp_path}" in str(err.value)


def test_check_plan_refuses_a_plan_of_another_frame_count(tmp_path):
    rec = _record()  # an image UNet's plan: frames 0
    check_plan(rec, tensorrt_version="10.13.0.35", compute_capability=(9, 0), frames=0)
    with pytest.raises(EngineMismatchError, match=r"built for images \(no frames\), but the graphs take 16 frames"):
        check_plan(rec, tensorrt_version="10.13.0.35", compute_capability=(9, 0), frames=16, engine_dir=tmp_path)
    rec.frames = 8
    with pytest.raises(
        EngineMismatchError, match=r"built for 8 frames, but the graphs take 16 frames.*--backend tensorrt"
    ):
        check_plan(rec, tensorrt_version="10.13.0.35", compute_capability=(9, 0), frames=16, engine_dir=tmp_path)
    manifest = _manifest(rec)
    manifest.frames = 16
    assert find_plan(manifest, rec.role, tensorrt_version="10.13.0.35", compute_capability=(9, 0)) is None
    manifest.frames = 8
    assert find_plan(manifest, rec.role, tensorrt_version="10.13.0.35", compute_capability=(9, 0)) is rec


def test_find_plan_takes_the_newest_plan_that_runs_here():
    old, new = _record(built_at=1.0, rows=(1, 10, 30)), _record(built_at=2.0)
    foreign = [
        _record("11.4.0.106", built_at=3.0),
        _record(cc=(8, 6), built_at=4.0),
        _record(graph="h" * 64, built_at=5.0, rows=(1, 2, 30)),
    ]
    m = _manifest(old, new, *foreign)
    here = {"tensorrt_version": "10.13.0.35", "compute_capability": (9, 0)}
    assert find_plan(m, "decoder", **here) == new
    assert find_plan(m, "decoder", rows=[1, 10, 30], **here) == old
    assert find_plan(m, "decoder", rows=[1, 2, 30], **here) is None
    assert find_plan(m, "encoder", **here) is None
    assert find_plan(_manifest(*foreign), "decoder", **here) is None


def test_manifest_round_trips_plans_and_reads_old_manifests():
    m = _manifest(_record())
    back = Manifest.from_json(m.to_json())
    assert back.plans == m.plans and isinstance(next(iter(back.plans.values())), PlanRecord)
    raw = json.loads(m.to_json())
    del raw["plans"]  # a manifest written before plans existed
    assert Manifest.from_json(json.dumps(raw)).plans == {}
    # A plan record written before refits existed reads as not refittable (weight changes rebuild it).
    raw = json.loads(m.to_json())
    for rec in raw["plans"].values():
        del rec["refittable"], rec["refitted_at"]
    old = next(iter(Manifest.from_json(json.dumps(raw)).plans.values()))
    assert old.refittable is False and old.refitted_at == 0.0


# ---- availability -----------------------------------------------------------------------------
def test_importing_the_backend_needs_no_tensorrt():
    code = "import sys, fd_trt.backends.tensorrt; print('tensorrt' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


#: The import names of the ``gpu`` extra's packages (tensorrt, cuda-python); onnxruntime-gpu
#: installs as ``onnxruntime``, which the CPU install has too.
GPU_ONLY_MODULES = ("tensorrt", "tensorrt_bindings", "tensorrt_libs", "cuda", "cudart")


def test_every_module_imports_on_a_cpu_machine_without_the_gpu_extra():
    # None in sys.modules makes `import tensorrt` (or cuda) raise ImportError, as on a bare CPU machine.
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {GPU_ONLY_MODULES!r}:\n"
        "    sys.modules[name] = None\n"
        "import fd_trt\n"
        "errors = []\n"
        "names = [m.name for m in pkgutil.walk_packages(fd_trt.__path__, 'fd_trt.', onerror=errors.append)]\n"
        "for name in names:\n"
        "    if name.rsplit('.', 1)[-1] != '__main__':  # python -m entry points run their command\n"
        "        importlib.import_module(name)\n"
        "assert not errors, errors\n"
        "print(len(names))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # Every subpackage was walked, not just the top level.
    assert int(res.stdout.split()[-1]) >= 30, res.stdout


def test_import_fd_trt_alone_loads_no_torch_diffusers_or_onnx():
    code = (
        "import sys, fd_trt\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'onnx', 'onnxruntime') + "
        f"{GPU_ONLY_MODULES!r}\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_missing_tensorrt_gives_an_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    for call in (
        require_tensorrt,
        lambda: TrtRunner(tmp_path),
        lambda: build_plans(tmp_path),
        lambda: get_runner_class("tensorrt"),
    ):
        with pytest.raises(BackendUnavailableError, match=r"pip install '\.\[gpu\]'"):
            call()
    assert "pip install" in (runtime_problem() or "")


def _real_tensorrt_installed() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin not in (None, "namespace")


@pytest.mark.skipif(_real_tensorrt_installed(), reason="a real tensorrt package would shadow the stub folder")
def test_type_stubs_alone_are_not_taken_for_tensorrt(monkeypatch, tmp_path):
    stub = tmp_path / "tensorrt"
    stub.mkdir()
    (stub / "__init__.pyi").write_text("def Builder() -> None: ...\n")  # what tensorrt-stubs installs
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="only its type stubs"):
        require_tensorrt()


def test_pipeline_with_tensorrt_fails_before_exporting_anything(monkeypatch, tiny_sd):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="tensorrt", device="cpu", progress=False)


def test_build_cli_rejects_a_bad_schedule_before_exporting(capsys):
    from fd_trt.cli import main

    assert main(["build", "--backend", "tensorrt", "--schedule", "1,2", "--quiet"]) == 2
    assert "no step 0" in capsys.readouterr().err


@pytest.mark.skipif(TRT_PROBLEM is None, reason="TensorRT is available: plans get built")
def test_build_cli_says_why_no_plans_are_built(tmp_path, capsys):
    from fd_trt.cli import main

    assert main(["build", "--backend", "tensorrt", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT plans: not built:" in out and "pip install" in out
    assert (tmp_path / "e" / "encoder.onnx").is_file()


# ---- on a GPU with TensorRT ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_engine_dir(tmp_path_factory):
    """The tiny model's fp16 graphs and plans (built once for the module)."""
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.graphs.build import build_engines

    sd = tiny_sd_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("trt_engines")
    build_engines(
        sd.unet, folder, latent_size=(8, 8), text_shape=(16, 32), precision="fp16", max_segment_steps=4, progress=False
    )
    build_plans(folder, builder_optimization_level=2, opt_segment_steps=2)
    return folder


def _feeds(folder: Path, role: str, rows: int) -> dict:
    import numpy as np
    import onnx

    model = onnx.load(str(folder / f"{role}.onnx"), load_external_data=False)
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in model.graph.input:
        dims = [rows] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
        dtype = np.float16 if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
        value = rng.standard_normal(dims).astype(dtype)
        feeds[inp.name] = np.linspace(900, 10, rows).astype(dtype) if inp.name == "timestep" else value
    return feeds


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("role, rows", [("encoder", 2), ("decoder", 2), ("decoder", 8)])
def test_plans_match_onnxruntime(trt_engine_dir, role, rows):
    import tensorrt as trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes
    from polygraphy.backend.trt import TrtRunner as PolyTrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from fd_trt.graphs.manifest import find_plan, load_manifest

    manifest = load_manifest(trt_engine_dir)
    rec = find_plan(
        manifest, role, tensorrt_version=trt.__version__, compute_capability=torch.cuda.get_device_capability()
    )
    assert rec is not None
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(trt_engine_dir / f"{role}.onnx"), providers=["CPUExecutionProvider"])),
        PolyTrtRunner(EngineFromBytes((trt_engine_dir / rec.file).read_bytes())),
    ]
    results = Comparator.run(runners, data_loader=[_feeds(trt_engine_dir, role, rows)])
    assert bool(Comparator.validate(results, check_inf=True, check_nan=True))
    compare = CompareFunc.simple(atol=2e-2, rtol=2e-2, check_error_stat="median")
    assert bool(Comparator.compare_accuracy(results, compare_func=compare))


@pytest.mark.gpu
@needs_trt
def test_tensorrt_pipeline_matches_torch(trt_engine_dir, latents):
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    outs = {}
    for backend, engines in (("torch", None), ("tensorrt", trt_engine_dir)):
        pipe = FasterDiffusionPipeline.from_diffusers(
            tiny_sd_pipeline(seed=0), backend=backend, device="cuda", precision="fp16", progress=False, engines=engines
        )
        out = pipe(
            "a red circle", num_inference_steps=20, output_type="latent", schedule="paper", latents=latents.clone()
        )
        assert not out.stats.nonfinite
        outs[backend] = out.latents.float().cpu()
        pipe.close()
    rel = float((outs["tensorrt"] - outs["torch"]).norm() / outs["torch"].norm())
    assert rel < 2e-2, rel


@pytest.mark.gpu
@needs_trt
def test_tensorrt_cuda_graph_replay_equals_a_plain_run(trt_engine_dir):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen).cuda()
    text = torch.randn(2, 16, 32, generator=gen).cuda()
    t = torch.tensor([900.0, 900.0], device="cuda")
    results = []
    for graphs in (False, True):
        with TrtRunner(trt_engine_dir, cuda_graphs=graphs) as runner:
            feats = runner.encode(sample, t, text)
            outs = [
                runner.decode(feats, torch.tensor(s, device="cuda"), text)
                for s in ([800.0], [700.0, 600.0, 500.0], [400.0])
            ]
            if graphs:
                assert runner._dec is not None and sorted(runner._dec.graphs) == [
                    (2, 2),
                    (6, 2),
                ]  # one graph per row counts
            results.append((feats, outs))
    (f0, o0), (f1, o1) = results
    for a, b in zip(f0.tensors(), f1.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    for a, b in zip(o0, o1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.gpu
@needs_trt
def test_plans_are_reused_and_foreign_plans_refused(trt_engine_dir):
    import tensorrt as trt

    from fd_trt.graphs.manifest import load_manifest, save_manifest

    again = build_plans(trt_engine_dir, builder_optimization_level=2, opt_segment_steps=2)
    assert not any(r.built for r in again)
    manifest = load_manifest(trt_engine_dir)
    for rec in manifest.plans.values():
        rec.tensorrt_version = "0.0.0"  # pretend another TensorRT built them
    save_manifest(trt_engine_dir, manifest)
    try:
        with pytest.raises(EngineMismatchError, match=f"this machine runs TensorRT {trt.__version__}"):
            TrtRunner(trt_engine_dir, build=False).activate()
    finally:
        for rec in manifest.plans.values():
            rec.tensorrt_version = trt.__version__
        save_manifest(trt_engine_dir, manifest)


@pytest.mark.gpu
@needs_trt
def test_encoder_calls_beyond_the_profile_run_in_chunks_on_the_gpu(trt_engine_dir):
    """6 rows through the 2-row fp16 encoder plan: 3 launches, the features of 3 separate 2-row calls."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 4, 8, 8, generator=gen).cuda()
    text = torch.randn(6, 16, 32, generator=gen).cuda()
    t = torch.linspace(900.0, 100.0, 6, device="cuda")
    with TrtRunner(trt_engine_dir, warmup=False) as runner:
        whole = runner.encode(sample, t, text)
        assert runner.launches["encoder"] == 3
        parts = [runner.encode(sample[i : i + 2], t[i : i + 2], text[i : i + 2]) for i in (0, 2, 4)]
    for k, tensor in enumerate(whole.tensors()):
        torch.testing.assert_close(tensor, torch.cat([p.tensors()[k] for p in parts]), rtol=0, atol=0)


@pytest.mark.gpu
@needs_trt
def test_refit_on_the_gpu_equals_a_rebuild(tmp_path):
    """Refit plans with new weights against plans built from those weights (same TensorRT, same GPU).

    Also guards TensorRT 11.3's known issue (a REFIT plan may drop a GEMM bias): the refittable
    plan is compared with ONNX Runtime on the new graph.
    """
    from fd_trt.backends.onnxruntime import OrtRunner
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.graphs.build import build_engines
    from fd_trt.graphs.manifest import load_manifest

    sd = tiny_sd_pipeline(seed=0)
    common = dict(latent_size=(8, 8), text_shape=(16, 32), precision="fp16", max_segment_steps=4, progress=False)
    build_engines(sd.unet, tmp_path / "refit", **common)
    with torch.no_grad():
        for name, param in sd.unet.named_parameters():
            if name.startswith("up_blocks.1."):
                param.mul_(1.25)
    build_engines(sd.unet, tmp_path / "rebuilt", **common)
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 32, generator=gen)
    t, steps = torch.tensor([900.0, 900.0]), torch.tensor([700.0, 300.0])
    outs = {}
    with TrtRunner(tmp_path / "refit", opt_segment_steps=2) as runner:
        assert runner.refit(sd.unet)
        outs["refit"] = runner.decode(
            runner.encode(sample.cuda(), t.cuda(), text.cuda()), steps.cuda(), text.cuda()
        ).cpu()
    assert all(r.refitted_at > 0 for r in load_manifest(tmp_path / "refit").plans.values())
    with TrtRunner(tmp_path / "rebuilt", opt_segment_steps=2) as runner:
        outs["rebuilt"] = runner.decode(
            runner.encode(sample.cuda(), t.cuda(), text.cuda()), steps.cuda(), text.cuda()
        ).cpu()
    with OrtRunner(tmp_path / "rebuilt") as ort:
        ref = ort.decode(ort.encode(sample, t, text), steps, text)
    for key, out in outs.items():
        rel = float((out - ref).norm() / ref.norm())
        assert rel < 2e-2, (key, rel)
