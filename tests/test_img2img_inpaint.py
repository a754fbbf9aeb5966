"""img2img and inpainting against diffusers' own StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on tiny random models."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from fd_trt.core.schedule import parse_schedule
from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _image(seed, size=64):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=64):
    m = np.zeros((size, size), dtype=np.uint8)
    m[size // 4 : 3 * size // 4, size // 8 : size // 2] = 255
    return PIL.Image.fromarray(m)


@pytest.fixture(scope="module")
def img2img_ref(tiny_sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_sd():
    """A tiny StableDiffusionInpaintPipeline with a 9-channel inpainting UNet."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    base = tiny_sd_pipeline(seed=0)
    cfg = dict(base.unet.config)
    cfg["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        unet = UNet2DConditionModel.from_config(cfg).eval()
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler, steps, strength", [("ddim", 20, 0.6), ("dpmpp", 20, 0.75), ("euler", 10, 0.5)])
def test_img2img_all_reproduces_diffusers(tiny_sd, fd_pipe, img2img_ref, use_scheduler, scheduler, steps, strength):
    use_scheduler(scheduler)
    img2img_ref.scheduler = tiny_sd.scheduler
    common = dict(image=_image(1), strength=strength, num_inference_steps=steps, output_type="latent")
    ref = img2img_ref(PROMPT, negative_prompt="blue", generator=_gen(4), **common).images
    out = fd_pipe(PROMPT, negative_prompt="blue", generator=_gen(4), schedule="all", **common)
    run = int(steps * strength)
    assert out.stats.num_steps == run and out.stats.encoder_calls == run
    assert rel_l2(out.images, ref) < 1e-5


def test_img2img_paper_key_steps_index_the_steps_run(fd_pipe):
    out = fd_pipe(
        PROMPT,
        image=_image(2),
        strength=0.6,
        num_inference_steps=50,
        output_type="latent",
        generator=_gen(1),
        schedule="paper",
    )
    assert out.stats.num_steps == 30
    assert out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25] == list(parse_schedule("paper", 30).key_steps)
    assert out.stats.encoder_calls == 8 and out.stats.decoder_rows == 60


def test_img2img_from_wrapped_img2img_pipeline_matches_diffusers(img2img_ref):
    pipe = FasterDiffusionPipeline.from_diffusers(img2img_ref, backend="torch", progress=False)
    common = dict(image=[_image(3), _image(4)], strength=0.8, num_inference_steps=10, output_type="latent")
    ref = img2img_ref([PROMPT, "a blue square"], generator=_gen(2), **common).images
    out = pipe([PROMPT, "a blue square"], generator=_gen(2), schedule="all", **common)
    assert out.images.shape == (2, 4, 8, 8)
    assert rel_l2(out.images, ref) < 1e-5


def test_img2img_rejects_a_strength_that_runs_no_step(fd_pipe):
    with pytest.raises(InputError, match="runs no step"):
        fd_pipe(PROMPT, image=_image(1), strength=0.05, num_inference_steps=10, output_type="latent")
    with pytest.raises(InputError, match="strength"):
        fd_pipe(PROMPT, image=_image(1), strength=1.5, num_inference_steps=10, output_type="latent")


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9_channel_all_reproduces_diffusers(inpaint_sd, strength):
    pipe = FasterDiffusionPipeline.from_diffusers(inpaint_sd, backend="torch", progress=False)
    common = dict(image=_image(5), mask_image=_mask(), strength=strength, num_inference_steps=20, output_type="latent")
    ref = inpaint_sd(PROMPT, generator=_gen(3), **common).images
    out = pipe(PROMPT, generator=_gen(3), schedule="all", **common)
    assert out.stats.num_steps == int(20 * strength)
    assert rel_l2(out.images, ref) < 1e-5
    paper = pipe(PROMPT, generator=_gen(3), schedule="paper", **common)
    assert paper.stats.encoder_calls == len(parse_schedule("paper", int(20 * strength)).key_steps)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_4_channel_blend_reproduces_diffusers(tiny_sd, fd_pipe, strength):
    from diffusers import StableDiffusionInpaintPipeline

    ref_pipe = StableDiffusionInpaintPipeline(**tiny_sd.components)
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(image=_image(6), mask_image=_mask(), strength=strength, num_inference_steps=20, output_type="latent")
    ref = ref_pipe(PROMPT, generator=_gen(8), **common).images
    out = fd_pipe(PROMPT, generator=_gen(8), schedule="all", **common)
    assert rel_l2(out.images, ref) < 1e-5


def test_inpainting_unet_needs_image_and_mask(inpaint_sd):
    pipe = FasterDiffusionPipeline.from_diffusers(inpaint_sd, backend="torch", progress=False)
    with pytest.raises(InputError, match="mask_image"):
        pipe(PROMPT, num_inference_steps=2, output_type="latent")


def test_unsupported_unet_is_refused_before_weights_load(tmp_path):
    base = tiny_sd_pipeline(seed=0)
    cfg = {**dict(base.unet.config), "in_channels": 5}
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    # No weight file anywhere: the refusal must come from the config alone.
    with pytest.raises(UnsupportedModelError, match="5 input channels"):
        FasterDiffusionPipeline.from_pretrained(tmp_path, backend="torch", device="cpu")
