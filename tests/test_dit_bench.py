"""sd3-arch (SD3-medium's transformer config) and the transformer benchmark script's rows, the
block-caching baseline included, on the tiny SD3 and PixArt models."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fd_trt.families.dit_models import SD3_MEDIUM_TRANSFORMER, sd3_arch_config, tiny_pixart_pipeline, tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _dit_bench():
    spec = importlib.util.spec_from_file_location("dit_bench", ROOT / "scripts" / "experiments" / "dit_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd3_arch_is_sd3_medium_config():
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    assert SD3_MEDIUM_TRANSFORMER == dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
    )  # fmt: skip
    cfg = sd3_arch_config(sample_size=32)
    assert cfg["sample_size"] == 32 and cfg["num_layers"] == 24 and SD3_MEDIUM_TRANSFORMER["sample_size"] == 128
    assert sd3_arch_config(32, layers=2)["num_layers"] == 2
    from diffusers import SD3Transformer2DModel

    # diffusers accepts every key, and its width is heads x head dim = the caption projection's
    assert set(cfg) <= set(SD3Transformer2DModel.extract_init_dict(cfg)[0])
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == cfg["caption_projection_dim"] == 1536


@pytest.mark.slow
def test_sd3_arch_transformer_on_the_meta_device():
    """The 24-block transformer, built without memory: SD3-medium's about 2.0 B parameters."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        tr = SD3Transformer2DModel(**sd3_arch_config(128))
    assert len(tr.transformer_blocks) == 24
    params = sum(p.numel() for p in tr.parameters())
    assert 1.9e9 < params < 2.2e9


@pytest.mark.slow
def test_sd3_arch_pipeline_runs_with_two_blocks():
    """sd3-arch's text encoders and VAE around a 2-block cut of its transformer: the widths join up
    (pooled 768 + 1280, joint 4096, 16 latent channels) and fd_trt's ``all`` equals diffusers."""
    from fd_trt import FasterDiffusionPipeline
    from fd_trt.families.dit_models import sd3_arch_pipeline

    pipe = sd3_arch_pipeline(seed=0, sample_size=4, layers=2)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.scaling_factor == 1.5305
    kw = dict(num_inference_steps=3, output_type="latent", max_sequence_length=8)
    ref = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    out = fd("a red circle", generator=torch.Generator().manual_seed(0), schedule="all", **kw).latents
    assert float((out - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_bench_rows_and_the_block_caching_baseline(family):
    bench = _dit_bench().bench
    pipe = tiny_sd3_pipeline(seed=0) if family == "sd3" else tiny_pixart_pipeline(seed=0)
    steps, split, blocks = 7, 3, 4
    res = bench(pipe, steps=steps, splits=[split], schedules=["all", "paper"], max_len=16)
    rows = {r["row"]: r for r in res["rows"]}
    assert res["blocks"] == blocks and res["guidance"] == (7.0 if family == "sd3" else 4.5)
    assert rows["fd all"]["rel_l2"] <= 1e-5  # all equals diffusers from the same embeddings and latents
    assert rows["fd all"]["encoder_calls"] == rows["fd all"]["decoder_calls"] == steps
    assert rows["fd all"]["gflops"] == pytest.approx(rows["diffusers"]["gflops"], rel=1e-3)
    cache = rows["block-caching"]
    keys = math.ceil(steps / 3)  # key steps 0, 3, 6
    assert cache["split"] == split and cache["encoder_calls"] == keys and cache["decoder_calls"] == steps
    per_forward = rows["diffusers"]["gflops"] / steps
    want = per_forward * (keys * split + steps * (blocks - split)) / blocks
    assert cache["gflops"] == pytest.approx(want, rel=1e-3)
    assert 0 < cache["rel_l2"] < 1  # blocks 0..N-1 reused: close to, not equal to, diffusers
    assert rows["fd paper"]["decoder_calls"] < steps  # the paper's steps decode segments in one call


def test_bench_calibrated_row_runs_the_calibration_at_its_split():
    """``--calibrate``: the key steps found on another prompt and seed, run at the calibration's N;
    its encoder calls are its key steps and its rel. L2 is against the diffusers row."""
    module = _dit_bench()
    pipe = tiny_pixart_pipeline(seed=0)
    res = module.bench(pipe, steps=8, splits=[2], schedules=["all"], max_len=16, calibrate=True,
                       calibration_tolerance=0.5, block_caching=False)  # fmt: skip
    cal, rows = res["calibration"], {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["diffusers", "fd all", "fd calibrated"]  # --no-block-caching
    assert cal["prompt"] == module.CALIBRATION_PROMPT and cal["split"] == 2  # --splits fixes N
    assert cal["error"] <= 0.5 and len(cal["history"]) > 1
    row = rows["fd calibrated"]
    assert row["key_steps"] == cal["key_steps"] and row["encoder_calls"] == len(cal["key_steps"])
    assert row["split"] == 2 and 0 < row["rel_l2"] < 1
    # the cheapest accepted candidate was kept
    accepted = [h for h in cal["history"] if h["error"] <= 0.5]
    assert min(h["block_evaluations"] for h in accepted) == next(
        h["block_evaluations"] for h in cal["history"] if h["key_steps"] == cal["key_steps"]
    )
