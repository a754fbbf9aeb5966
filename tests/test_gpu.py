"""The torch backend on CUDA (fp16, bf16, channels_last, CUDA graphs), and gpu_check.sh on CPU.

The CUDA tests skip without a GPU; ``scripts/gpu_check.sh`` runs them (with the TensorRT ones)
where there is one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fd_trt.backends.torch import TorchRunner
from fd_trt.errors import InputError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_cuda_graphs_need_a_cuda_device(tiny_sd):
    with pytest.raises(InputError, match="cuda_graphs=True needs a CUDA device"):
        TorchRunner(tiny_sd.unet, device="cpu", cuda_graphs=True)
    with pytest.raises(InputError, match="graph_warmup_runs"):
        TorchRunner(tiny_sd.unet, device="cpu", graph_warmup_runs=0)


def test_channels_last_keeps_the_cpu_results():
    unet = tiny_sd_pipeline(seed=0).unet
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 32, generator=gen)
    t = torch.tensor([900.0, 900.0])
    outs = []
    for channels_last in (False, True):
        with TorchRunner(unet, device="cpu", channels_last=channels_last) as runner:
            feats = runner.encode(sample, t, text)
            outs.append(runner.decode(feats, torch.tensor([800.0, 700.0]), text))
    assert outs[0].shape == (4, 4, 8, 8)
    assert rel_l2(outs[1], outs[0]) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs every check instead of skipping")
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=os.environ.get("PYTHON", __import__("sys").executable))
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gpu_check: SKIPPED: no CUDA GPU visible to torch" in res.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["skipped"] is True and "no CUDA GPU" in report["reason"]


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _HostEvent:
    """torch.cuda.Event on a host clock, for timing a CPU run through gpu_check's code."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1000.0


def test_gpu_check_timing_flow_on_cpu(monkeypatch, tiny_sd):
    """gpu_check's timing, speedup, target and table code, run on the tiny model with host timers."""
    gc = _gpu_check_module()
    for name, value in {
        "Event": _HostEvent,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda: None,
        "synchronize": lambda *a: None,
        "max_memory_allocated": lambda *a: 3 * 2**30,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def make():
        return FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="torch", device="cpu", progress=False)

    rows = gc.time_config(
        make,
        ["all", "paper"],
        repeat=3,
        warmup=1,
        deadline=gc.Deadline(300),
        label="torch fp32",
        size=64,
        steps=20,
        device="cpu",
    )
    assert [(r["config"], r["schedule"], r["runs"]) for r in rows] == [
        ("torch fp32", "all", 3),
        ("torch fp32", "paper", 3),
    ]
    assert all(r["total_s"] >= r["unet_loop_s"] > 0 and r["peak_mem_gib"] == 3.0 for r in rows)
    gc.add_speedups(rows)
    assert rows[0]["speedup_vs_all"] == 1.0
    assert rows[1]["speedup_vs_all"] == pytest.approx(rows[0]["unet_loop_s"] / rows[1]["unet_loop_s"])
    targets = gc.check_targets(
        rows + [{"config": "tensorrt", "schedule": "paper", "unet_loop_s": 0.3, "speedup_vs_all": 1.7}]
    )
    assert targets["tensorrt: paper >= 1.6x all"] and targets["tensorrt: paper UNet loop < 0.35 s"]
    assert targets["torch fp32: paper >= 1.6x all"] == (rows[1]["speedup_vs_all"] >= 1.6)
    lines = gc.table({"sd15": {"rows": rows}}).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| torch fp32 | all |")
    assert lines[3].split("|")[5].strip() == f"{rows[1]['speedup_vs_all']:.2f}x"
    # Out of time: a schedule is skipped rather than run past the deadline.
    assert (
        gc.time_config(
            make, ["all"], repeat=3, warmup=1, deadline=gc.Deadline(0), label="late", size=64, steps=4, device="cpu"
        )
        == []
    )


@pytest.mark.slow
def test_gpu_check_names_a_missing_package_before_using_the_gpu(tmp_path):
    """On a lent GPU machine without onnxruntime (say), the script stops at once and says how to carry it."""
    shadow = tmp_path / "shadow" / "onnxruntime"  # not among the wheels gpu_wheels.sh fetches, which would win
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime (shadowed by the test)')\n")
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        PYTHON=os.environ.get("PYTHON", __import__("sys").executable),
        PYTHONPATH=str(shadow.parent),
    )
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "gpu_check: FAILED: cannot import onnxruntime (ImportError" in res.stdout
    assert "bash scripts/gpu_wheels.sh" in res.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] is False and "onnxruntime" in report["reason"]


def _run(
    device: str, precision: str, latents: torch.Tensor, schedule: str = "paper", steps: int = 50, **options
) -> torch.Tensor:
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd_pipeline(seed=0),
        backend="torch",
        device=device,
        precision=precision,
        progress=False,
        runner_options=options,
    )
    out = pipe(
        "a red circle on the left",
        num_inference_steps=steps,
        output_type="latent",
        schedule=schedule,
        latents=latents.clone(),
    )
    assert not out.stats.nonfinite
    pipe.close()
    return out.latents.float().cpu()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("schedule", ["all", "paper"])
def test_fp16_cuda_matches_the_fp32_cpu_reference(latents, schedule):
    ref = _run("cpu", "fp32", latents, schedule)
    got = _run("cuda", "fp16", latents, schedule)
    assert rel_l2(got, ref) < 5e-2


@pytest.mark.gpu
@needs_cuda
def test_bf16_and_channels_last_on_cuda(latents):
    ref = _run("cuda", "fp32", latents, steps=20)
    assert rel_l2(_run("cuda", "bf16", latents, steps=20), ref) < 1e-1
    assert rel_l2(_run("cuda", "fp16", latents, steps=20, channels_last=True), ref) < 5e-2


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_graph_replay_equals_eager():
    sd = tiny_sd_pipeline(seed=0)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen).cuda()
    text = torch.randn(2, 16, 32, generator=gen).cuda()
    t = torch.tensor([900.0, 900.0], device="cuda")
    steps = ([800.0], [700.0, 600.0, 500.0], [400.0])
    results = []
    for graphs in (False, True):
        with TorchRunner(sd.unet, device="cuda", dtype="fp16", cuda_graphs=graphs) as runner:
            feats = runner.encode(sample, t, text)
            outs = [runner.decode(feats, torch.tensor(s, device="cuda"), text) for s in steps]
            if graphs:
                assert runner.num_graphs == 3  # encoder at 2 rows, decoder at 2 and 6 rows; the repeat reused one
            results.append((feats, outs))
    (f0, o0), (f1, o1) = results
    for a, b in zip(f0.tensors(), f1.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    for a, b in zip(o0, o1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_pipeline_with_cuda_graphs_matches_eager(latents):
    eager = _run("cuda", "fp16", latents)
    graphs = _run("cuda", "fp16", latents, cuda_graphs=True)
    assert rel_l2(graphs, eager) < 1e-3


def test_gpu_check_pixart_step_on_cpu(monkeypatch):
    """gpu_check's PixArt step (DPM-Solver++ 20, CFG, all and paper) on a tiny PixArt on the CPU,
    with host timers; it refuses a PixArt pipeline that does not run DPM-Solver++."""
    import argparse

    from fd_trt.families.dit_models import tiny_pixart_pipeline
    from fd_trt.families.models import make_scheduler

    gc = _gpu_check_module()
    for name, value in {
        "Event": _HostEvent,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda: None,
        "synchronize": lambda *a: None,
        "max_memory_allocated": lambda *a: 2**30,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    args = argparse.Namespace(repeat=2, warmup=1)
    res = gc.pixart_timings(
        args, gc.Deadline(300), build=lambda: tiny_pixart_pipeline(seed=0), device="cpu", precision="fp32", size=64
    )
    rows = res["rows"]
    assert [(r["config"], r["schedule"], r["runs"]) for r in rows] == [
        ("pixart torch fp32", "all", 2),
        ("pixart torch fp32", "paper", 2),
    ]
    assert all(r["total_s"] >= r["unet_loop_s"] > 0 for r in rows)
    assert rows[1]["speedup_vs_all"] == pytest.approx(rows[0]["unet_loop_s"] / rows[1]["unet_loop_s"])
    lines = gc.table({"pixart": res}).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| pixart torch fp32 | paper |")

    def ddim():
        pipe = tiny_pixart_pipeline(seed=0)
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
        return pipe

    with pytest.raises(RuntimeError, match="runs DPM-Solver\\+\\+, got DDIMScheduler"):
        gc.pixart_timings(args, gc.Deadline(300), build=ddim, device="cpu", precision="fp32", size=64)
