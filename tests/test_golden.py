"""fd_trt against the authors' own code, on frozen files (docs/design.md section 1, "Conformance").

tests/data/golden/ holds a tiny UNet, text embeddings, initial latents and the final latents that
hutaiHang/Faster-Diffusion's ``register_parallel_pipeline`` + ``register_faster_forward`` produced
from them (mod "50ls" and mod 5, DDIM-50, guidance 7.5, float32, diffusers 0.23.1), written by
scripts/golden_authors.py; versions.json says how. Here fd_trt's sampler runs on the same inputs
with the same scheduler settings and must land within relative L2 1e-4 of those latents.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fd_trt.backends.torch import TorchRunner
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, run_sampler
from fd_trt.core.schedule import NoiseInjection, parse_schedule
from fd_trt.families.models import make_scheduler

from conftest import rel_l2

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = 1e-4  # docs/design.md's conformance limit
CASES = [("paper", "authors_paper.npy"), ("uniform:5", "authors_uniform5.npy")]


def _load(name):
    return torch.from_numpy(np.load(GOLDEN / name))


def load_golden():
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_config(json.loads((GOLDEN / "unet_config.json").read_text()))
    unet.load_state_dict({k: v.float() for k, v in load_file(str(GOLDEN / "unet.safetensors")).items()}, strict=True)
    return dict(
        unet=unet.eval(),
        scheduler_config=json.loads((GOLDEN / "scheduler_config.json").read_text()),
        text=torch.cat([_load("uncond.npy"), _load("cond.npy")]),  # negative rows first
        latents=_load("latents.npy"),
    )


@pytest.fixture(scope="module")
def golden():
    return load_golden()


def _fd_trt(golden, runner, schedule, noise=True):
    scheduler = make_scheduler("ddim", golden["scheduler_config"])
    scheduler.set_timesteps(50)
    latents = golden["latents"] * scheduler.init_noise_sigma
    with torch.no_grad():
        return run_sampler(
            runner,
            scheduler,
            latents,
            SamplerInputs(golden["text"]),
            parse_schedule(schedule, 50),
            SamplerOptions(guidance_scale=7.5, noise=NoiseInjection(enabled=noise), progress=False),
        )


def _plain_loop(golden):
    """Plain DDIM-50 with CFG on the whole UNet: what every schedule would give without propagation."""
    scheduler = make_scheduler("ddim", golden["scheduler_config"])
    scheduler.set_timesteps(50)
    x = golden["latents"] * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = golden["unet"](torch.cat([x, x]), t, golden["text"]).sample.chunk(2)
            x = scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
    return x


def test_the_golden_files_are_what_versions_json_says():
    versions = json.loads((GOLDEN / "versions.json").read_text())
    assert versions["reference_commit"] == "d64bfed"
    assert versions["diffusers"].startswith("0.23.")
    for name in ("authors_paper.npy", "authors_uniform5.npy", "authors_all.npy"):
        assert _load(name).shape == _load("latents.npy").shape


@pytest.mark.parametrize("schedule, frozen", CASES)
def test_torch_backend_matches_the_authors_code(golden, schedule, frozen):
    with TorchRunner(golden["unet"], device="cpu") as runner:
        out = _fd_trt(golden, runner, schedule)
    assert rel_l2(out, _load(frozen)) <= TOL


def test_the_comparison_can_fail(golden):
    """The frozen outputs are far from plain DDIM, and from fd_trt without noise injection."""
    plain = _plain_loop(golden)
    # plain diffusers 0.23.1 (frozen) and today's UNet loop agree: the inputs load the same
    assert rel_l2(plain, _load("authors_all.npy")) < 1e-5
    for _, frozen in CASES:
        assert rel_l2(_load(frozen), plain) > 100 * TOL
    assert rel_l2(_load("authors_paper.npy"), _load("authors_uniform5.npy")) > 100 * TOL
    with TorchRunner(golden["unet"], device="cpu") as runner:
        no_noise = _fd_trt(golden, runner, "paper", noise=False)
    assert rel_l2(no_noise, _load("authors_paper.npy")) > 10 * TOL


def test_onnxruntime_backend_matches_the_authors_code(golden, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fd_trt.backends.onnxruntime import OrtRunner
    from fd_trt.graphs.build import build_engines

    out = tmp_path / "golden"
    build_engines(
        golden["unet"],
        out,
        latent_size=(8, 8),
        text_shape=tuple(golden["text"].shape[1:]),
        model_source="golden",
        progress=False,
    )
    with OrtRunner(out) as runner:
        for schedule, frozen in CASES:
            assert rel_l2(_fd_trt(golden, runner, schedule), _load(frozen)) <= TOL
