"""The SDXL pipeline against diffusers' own StableDiffusionXLPipeline on a tiny model built in code."""

import json

import pytest
import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.models import make_scheduler, tiny_sdxl_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_xl():
    """A tiny random-weight StableDiffusionXLPipeline (diffusers' own class), built in code."""
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def fd_xl(tiny_xl):
    return FasterDiffusionPipeline.from_diffusers(tiny_xl, backend="torch", device="cpu", progress=False)


@pytest.fixture
def xl_scheduler(tiny_xl):
    """Sets the shared SDXL pipeline's scheduler for one test, then restores its own."""
    original = tiny_xl.scheduler

    def set_(name: str):
        tiny_xl.scheduler = make_scheduler(name, original.config)

    yield set_
    tiny_xl.scheduler = original


def test_from_diffusers_dispatches_sdxl_to_its_class(fd_xl):
    assert type(fd_xl) is FasterDiffusionXLPipeline
    assert fd_xl.text_shape() == (16, 64)


def test_the_sd_class_refuses_an_sdxl_pipeline_it_would_condition_wrongly(tiny_xl):
    with pytest.raises(InputError, match="FasterDiffusionXLPipeline"):
        FasterDiffusionPipeline(tiny_xl, backend="torch", progress=False)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("scheduler, steps", [("ddim", 50), ("euler", 30), ("dpmpp", 20)])
def test_schedule_all_reproduces_diffusers_sdxl(tiny_xl, fd_xl, xl_scheduler, scheduler, steps, guidance_scale):
    xl_scheduler(scheduler)
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
    prompts = dict(prompt=PROMPT, prompt_2="a blue square", negative_prompt="green", negative_prompt_2="dotted")
    ref = tiny_xl(**prompts, generator=_gen(7), **common).images
    out = fd_xl(**prompts, generator=_gen(7), schedule="all", **common)
    assert out.stats.encoder_calls == steps
    assert out.stats.encoder_rows == steps * (2 if guidance_scale > 1 else 1)
    assert rel_l2(out.images, ref) < 1e-5


def test_micro_conditioning_guidance_rescale_and_empty_negative_match_diffusers(tiny_xl, fd_xl):
    # No negative prompt with CFG: force_zeros_for_empty_prompt gives zero negative embeddings.
    common = dict(
        num_inference_steps=20,
        guidance_scale=6.0,
        guidance_rescale=0.7,
        output_type="latent",
        original_size=(128, 96),
        crops_coords_top_left=(8, 16),
        target_size=(64, 48),
        negative_original_size=(32, 32),
        negative_crops_coords_top_left=(4, 0),
        negative_target_size=(40, 40),
    )
    ref = tiny_xl(PROMPT, generator=_gen(3), **common).images
    out = fd_xl(PROMPT, generator=_gen(3), schedule="all", **common)
    assert rel_l2(out.images, ref) < 1e-5
    plain = fd_xl(
        PROMPT, generator=_gen(3), schedule="all", num_inference_steps=20, guidance_scale=6.0, output_type="latent"
    )
    assert rel_l2(plain.images, ref) > 1e-3  # the conditioning does reach the UNet


def test_several_prompts_and_images_match_diffusers(tiny_xl, fd_xl):
    prompts = ["a red circle", "a blue square on the right"]
    lat = torch.randn(4, 4, 8, 8, generator=_gen(5))
    common = dict(num_inference_steps=10, num_images_per_prompt=2, latents=lat, output_type="latent")
    ref = tiny_xl(prompts, negative_prompt=["green", "yellow"], **common).images
    out = fd_xl(prompts, negative_prompt=["green", "yellow"], schedule="all", **common)
    assert out.images.shape == (4, 4, 8, 8)
    assert rel_l2(out.images, ref) < 1e-5


def test_images_match_diffusers_through_the_vae(tiny_xl, fd_xl):
    ref = tiny_xl(PROMPT, num_inference_steps=5, generator=_gen(1), output_type="np").images
    out = fd_xl(PROMPT, num_inference_steps=5, generator=_gen(1), schedule="all", output_type="np")
    assert out.images.shape == ref.shape == (1, 64, 64, 3)
    assert abs(out.images - ref).max() < 1e-4


def test_paper_ddim50_runs_nine_encoder_calls(tiny_xl, fd_xl, xl_scheduler):
    xl_scheduler("ddim")
    out = fd_xl(PROMPT, num_inference_steps=50, generator=_gen(2), schedule="paper", output_type="latent")
    assert out.stats.encoder_calls == 9 and out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert out.stats.decoder_rows == 100 and out.stats.decoder_calls == 9
    ref = tiny_xl(PROMPT, num_inference_steps=50, generator=_gen(2), output_type="latent").images
    assert torch.isfinite(out.images).all() and rel_l2(out.images, ref) < 0.5
    full = fd_xl(PROMPT, num_inference_steps=50, generator=_gen(2), schedule="all", output_type="latent")
    assert out.stats.unet_gflops < full.stats.unet_gflops


def test_bad_sdxl_arguments_are_refused_by_name(fd_xl):
    with pytest.raises(InputError, match="original_size"):
        fd_xl(PROMPT, original_size=(64,), num_inference_steps=2)
    with pytest.raises(InputError, match="prompt_2"):
        fd_xl(["a", "b"], prompt_2=["x"], num_inference_steps=2)
    with pytest.raises(InputError, match="guidance_rescale"):
        fd_xl(PROMPT, guidance_rescale=2.0, num_inference_steps=2)


def test_from_pretrained_loads_an_sdxl_folder(tiny_xl, tmp_path):
    tiny_xl.save_pretrained(tmp_path / "xl", safe_serialization=True)
    pipe = FasterDiffusionPipeline.from_pretrained(tmp_path / "xl", backend="torch", device="cpu", progress=False)
    assert type(pipe) is FasterDiffusionXLPipeline
    lat = torch.randn(1, 4, 8, 8, generator=_gen(4))
    ref = tiny_xl(PROMPT, num_inference_steps=10, latents=lat, output_type="latent").images
    out = pipe(PROMPT, num_inference_steps=10, latents=lat, schedule="all", output_type="latent")
    assert rel_l2(out.images, ref) < 1e-5


def test_from_pretrained_refuses_an_unsupported_unet_before_loading_weights(tmp_path):
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    # No weights at all: the refusal must come from the config, not from a failed load.
    (folder / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", "addition_embed_type": "image", "cross_attention_dim": 64})
    )
    with pytest.raises(UnsupportedModelError, match="addition_embed_type='image'"):
        FasterDiffusionPipeline.from_pretrained(folder, backend="torch", progress=False)


@pytest.mark.slow
def test_onnxruntime_all_reproduces_diffusers_sdxl(tiny_xl, xl_scheduler, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(tiny_xl, backend="onnxruntime", device="cpu", progress=False)
    for scheduler, steps in (("ddim", 50), ("euler", 30), ("dpmpp", 20)):
        xl_scheduler(scheduler)
        for guidance_scale in (5.0, 1.0):
            common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
            ref = tiny_xl(PROMPT, negative_prompt="green", generator=_gen(7), **common).images
            out = pipe(PROMPT, negative_prompt="green", generator=_gen(7), schedule="all", **common)
            assert out.stats.backend == "onnxruntime"
            assert rel_l2(out.images, ref) < 1e-4, (scheduler, guidance_scale)


def test_default_backend_auto_runs_sdxl_like_the_torch_backend(tiny_xl, fd_xl):
    """``backend="auto"`` (the default) measures its candidates with SDXL's added conditioning."""
    auto = FasterDiffusionPipeline.from_diffusers(tiny_xl, device="cpu", progress=False)
    assert auto.backend == "auto"
    common = dict(num_inference_steps=10, guidance_scale=5.0, output_type="latent", schedule="paper")
    out = auto(PROMPT, generator=_gen(3), **common)
    ref = fd_xl(PROMPT, generator=_gen(3), **common).images
    assert out.stats.backend.startswith("auto:")
    assert rel_l2(out.images, ref) < 1e-4


def test_sdxl_refuses_a_controlnet_it_would_ignore(tiny_xl):
    from test_controlnet import tiny_controlnet

    from fd_trt.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="does not run a ControlNet"):
        FasterDiffusionPipeline.from_diffusers(
            tiny_xl, backend="torch", progress=False, controlnet=tiny_controlnet(tiny_xl.unet, 0)
        )
