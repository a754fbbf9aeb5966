"""The benchmark suite on the tiny model: schema, counted FLOPs, output files."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fd_trt.bench import ROW_KEYS, BenchConfig, run_benchmark, write_outputs
from fd_trt.models import tiny_sd_pipeline
from fd_trt.split import split_unet


@pytest.fixture(scope="module")
def report():
    cfg = BenchConfig(model="tiny", height=64, width=64, steps=50, backends=("torch",), repeat=1, warmup=1)
    return run_benchmark(cfg, progress=False)


def _flops(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def test_rows_have_the_interface_keys(report):
    assert set(report) == {"config", "results"}
    systems = [(r["system"], r["schedule"]) for r in report["results"]]
    assert ("diffusers", "-") in systems and ("fd_trt", "all") in systems and ("fd_trt", "paper") in systems
    for row in report["results"]:
        assert tuple(row) == ROW_KEYS
    ok = [r for r in report["results"] if r["s_per_image"] is not None]
    assert all(r["s_per_image"] > 0 and r["peak_mem_mb"] > 0 for r in ok)
    by = {(r["system"], r["schedule"]): r for r in ok}
    assert by[("diffusers", "-")]["rel_l2_vs_diffusers"] == 0
    assert by[("fd_trt", "all")]["rel_l2_vs_diffusers"] < 1e-5
    assert by[("fd_trt", "paper")]["rel_l2_vs_diffusers"] > 1e-4


def test_gflops_are_counted_per_system(report):
    sd = tiny_sd_pipeline(seed=0)
    L = sd.tokenizer.model_max_length
    x, e = torch.zeros(2, 4, 8, 8), torch.zeros(2, L, 32)
    t = torch.tensor([500.0, 500.0])
    step = _flops(lambda: sd.unet(x, t, e))
    split = split_unet(sd.unet)
    enc_row = _flops(lambda: split.run_encoder(x[:1], t[:1], e[:1]))
    feats = split.run_encoder(x[:1], t[:1], e[:1])
    dec_row = _flops(lambda: split.run_decoder(feats, t[:1], e[:1]))
    by = {(r["system"], r["schedule"]): r for r in report["results"]}
    assert by[("diffusers", "-")]["unet_gflops_per_image"] == pytest.approx(50 * step, rel=1e-6)
    assert by[("fd_trt", "all")]["unet_gflops_per_image"] == pytest.approx(50 * step, rel=5e-3)
    # paper: 9 encoder passes over the 2 CFG rows, and 100 decoder rows
    assert by[("fd_trt", "paper")]["unet_gflops_per_image"] == pytest.approx(18 * enc_row + 100 * dec_row, rel=1e-6)
    assert by[("fd_trt", "paper")]["encoder_calls"] == 9 and by[("fd_trt", "paper")]["decoder_calls"] == 9


def test_json_markdown_and_plot_are_written(report, tmp_path):
    j, m, p = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    write_outputs(report, str(j), str(m), str(p))
    assert json.loads(j.read_text())["results"][0]["system"] == "diffusers"
    assert "| fd_trt | torch | paper |" in m.read_text()
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
