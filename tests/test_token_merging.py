"""Token Merging: ``token_merging=r`` patches the UNet with tomesd; with ``schedule="all"`` the run
equals a tomesd-patched diffusers pipeline, and it combines with encoder propagation."""

import pytest
import torch

from fd_trt.errors import InputError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

pytest.importorskip("tomesd")

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def tome_pair():
    """A tiny SD pipeline at 16x16 latents (256 tokens in its first transformer blocks) and the
    fd_trt pipeline that wraps it with token_merging=0.5 (which patches the wrapped UNet)."""
    sd = tiny_sd_pipeline(seed=0, sample_size=16)
    fd = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cpu", progress=False, token_merging=0.5)
    return sd, fd


def fresh_merge_randomness(unet, seed=123):
    """tomesd forks torch's global generator on first use: the same start for every run."""
    unet._tome_info["args"]["generator"] = None
    torch.manual_seed(seed)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_all_with_token_merging_equals_tomesd_patched_diffusers(tome_pair, guidance_scale):
    sd, fd = tome_pair
    assert type(sd.unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "ToMeBlock"
    common = dict(num_inference_steps=6, guidance_scale=guidance_scale, output_type="latent")
    fresh_merge_randomness(sd.unet)
    ref = sd(PROMPT, generator=torch.Generator().manual_seed(7), **common).images
    fresh_merge_randomness(sd.unet)
    out = fd(PROMPT, generator=torch.Generator().manual_seed(7), schedule="all", **common).images
    assert (out - ref).abs().max() < 1e-5


def test_token_merging_changes_the_run_and_combines_with_paper(tome_pair):
    sd, fd = tome_pair
    common = dict(num_inference_steps=10, output_type="latent")
    fresh_merge_randomness(sd.unet)
    merged_all = fd(PROMPT, generator=torch.Generator().manual_seed(7), schedule="all", **common).images
    fresh_merge_randomness(sd.unet)
    merged_paper = fd(PROMPT, generator=torch.Generator().manual_seed(7), schedule="paper", **common)
    assert merged_paper.stats.encoder_calls == 5  # paper's key steps below 10: 0, 1, 2, 3, 5
    assert 1e-4 < rel_l2(merged_paper.images, merged_all) < 0.5
    plain = FasterDiffusionPipeline.from_diffusers(
        tiny_sd_pipeline(seed=0, sample_size=16), backend="torch", device="cpu", progress=False
    )
    unmerged = plain(PROMPT, generator=torch.Generator().manual_seed(7), schedule="all", **common).images
    assert 1e-3 < rel_l2(merged_all, unmerged) < 1.0


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, True, "0.5", float("nan")])
def test_a_bad_ratio_is_refused(ratio):
    with pytest.raises(InputError, match="token_merging must be a ratio in"):
        FasterDiffusionPipeline.from_diffusers(tiny_sd_pipeline(seed=0), backend="torch", token_merging=ratio)


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_graph_backends_are_refused_naming_torch(backend):
    sd = tiny_sd_pipeline(seed=0)
    with pytest.raises(InputError, match="backend='torch'"):
        FasterDiffusionPipeline.from_diffusers(sd, backend=backend, token_merging=0.5)
    assert not hasattr(sd.unet, "_tome_info")  # refused before anything was patched
