"""SDXL img2img and the refiner against diffusers' own StableDiffusionXLImg2ImgPipeline.

Two tiny random pipelines built in code: the refiner's layout (no first text encoder, five time
ids with the aesthetic score, ``requires_aesthetics_score=True``) and the base model's (six time
ids) wrapped in diffusers' img2img class.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from fd_trt.errors import InputError
from fd_trt.families.models import make_scheduler, tiny_sdxl_pipeline, tiny_sdxl_refiner_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _image(seed=3, n=1):
    return torch.rand(n, 3, 64, 64, generator=_gen(seed))  # in [0, 1], as diffusers expects of tensors


@pytest.fixture(scope="module")
def refiner():
    sd = tiny_sdxl_refiner_pipeline(seed=0)
    sd.scheduler = make_scheduler("ddim", sd.scheduler.config)
    return sd


@pytest.fixture(scope="module")
def fd_refiner(refiner):
    return FasterDiffusionPipeline.from_diffusers(refiner, backend="torch", device="cpu", progress=False)


@pytest.fixture(scope="module")
def base_i2i():
    """diffusers' SDXL img2img pipeline on the tiny base model's components."""
    sd = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_pipeline(seed=0).components)
    sd.scheduler = make_scheduler("ddim", sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.fixture(scope="module")
def fd_base(base_i2i):
    return FasterDiffusionPipeline.from_diffusers(base_i2i, backend="torch", device="cpu", progress=False)


REFINER_ARGS = dict(
    prompt=PROMPT,
    negative_prompt="green",
    guidance_scale=5.0,
    aesthetic_score=7.0,
    negative_aesthetic_score=2.0,
    output_type="latent",
)


def test_the_refiner_has_five_time_ids_and_no_first_encoder(refiner, fd_refiner):
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert type(fd_refiner) is FasterDiffusionXLPipeline
    assert fd_refiner.added_shapes() == {"text_embeds": (32,), "time_ids": (5,)}
    assert fd_refiner.aesthetic_time_ids() and fd_refiner.text_shape() == (16, 32)


@pytest.mark.parametrize(
    "scheduler, steps, strength",
    [pytest.param("ddim", 50, 0.6, marks=pytest.mark.slow), ("euler", 30, 0.3), ("dpmpp", 20, 0.5)],
)
def test_refiner_schedule_all_reproduces_diffusers(refiner, fd_refiner, scheduler, steps, strength):
    original = refiner.scheduler
    refiner.scheduler = make_scheduler(scheduler, original.config)
    try:
        common = dict(image=_image(), num_inference_steps=steps, strength=strength, **REFINER_ARGS)
        ref = refiner(generator=_gen(5), **common).images
        out = fd_refiner(generator=_gen(5), schedule="all", **common)
    finally:
        refiner.scheduler = original
    run = int(steps * strength)
    assert out.stats.num_steps == run and out.stats.encoder_calls == run
    assert rel_l2(out.latents, ref) < 1e-5


def test_refiner_continues_base_latents_with_denoising_start(refiner, fd_refiner):
    """The ensemble-of-experts hand-over: latents as image=, denoising_start, no noise added."""
    latents = torch.randn(1, 4, 8, 8, generator=_gen(8))
    common = dict(image=latents, num_inference_steps=50, denoising_start=0.7, **REFINER_ARGS)
    ref = refiner(**common).images
    out = fd_refiner(schedule="all", **common)
    assert out.stats.num_steps == 15  # the DDIM timesteps below 300
    assert rel_l2(out.latents, ref) < 1e-5
    # The same hand-over on the paper's key steps: they index the 15 steps run, starting with 0.
    paper = fd_refiner(schedule="paper", **common)
    assert paper.stats.key_steps == [0, 1, 2, 3, 5, 10] and paper.stats.encoder_calls == 6
    assert 1e-4 < rel_l2(paper.latents, ref) < 0.5


def test_refiner_paper_runs_the_key_steps_of_the_steps_run(refiner, fd_refiner):
    common = dict(image=_image(), num_inference_steps=50, strength=0.6, **REFINER_ARGS)
    ref = refiner(generator=_gen(5), **common).images
    out = fd_refiner(generator=_gen(5), schedule="paper", **common)
    assert out.stats.num_steps == 30
    assert out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25] and out.stats.encoder_calls == 8
    assert out.stats.decoder_calls == 8 and out.stats.decoder_rows == 2 * 30
    assert 1e-4 < rel_l2(out.latents, ref) < 0.5  # propagation differs from diffusers, but not wildly


def test_base_img2img_matches_diffusers(base_i2i, fd_base):
    # Two images per prompt from one generator, and the VAE decode.
    common = dict(
        prompt=PROMPT,
        negative_prompt="green",
        image=_image(),
        num_inference_steps=30,
        strength=0.5,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        original_size=(128, 96),
        crops_coords_top_left=(8, 0),
    )
    ref = base_i2i(generator=_gen(9), output_type="np", **common).images
    out = fd_base(generator=_gen(9), output_type="np", schedule="all", **common)
    assert out.stats.num_steps == 15 and out.latents.shape[0] == 2
    assert float(abs(out.images - ref).max()) < 1e-4
    lat_ref = base_i2i(generator=_gen(9), output_type="latent", **common).images
    assert rel_l2(out.latents, lat_ref) < 1e-5


def test_base_img2img_default_strength_and_generator_list(base_i2i, fd_base):
    # diffusers' SDXL img2img default strength is 0.3: 15 of 50 steps.
    common = dict(prompt=[PROMPT, "blue"], image=_image(n=2), num_inference_steps=50, output_type="latent")
    ref = base_i2i(generator=[_gen(1), _gen(2)], **common).images
    out = fd_base(generator=[_gen(1), _gen(2)], schedule="all", **common)
    assert out.stats.num_steps == 15
    assert rel_l2(out.latents, ref) < 1e-5


def test_text2img_denoising_end_matches_diffusers():
    xl = tiny_sdxl_pipeline(seed=0)
    xl.scheduler = make_scheduler("ddim", xl.scheduler.config)
    fd = FasterDiffusionPipeline.from_diffusers(xl, backend="torch", device="cpu", progress=False)
    common = dict(prompt=PROMPT, num_inference_steps=50, denoising_end=0.7, output_type="latent")
    ref = xl(generator=_gen(4), **common).images
    out = fd(generator=_gen(4), schedule="all", **common)
    assert out.stats.num_steps == 35  # the timesteps >= 300 of DDIM-50 (981, 961, ..., 301)
    assert rel_l2(out.latents, ref) < 1e-5


@pytest.mark.slow
def test_refiner_onnxruntime_all_reproduces_diffusers(refiner, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(refiner, backend="onnxruntime", device="cpu", progress=False)
    common = dict(image=_image(), num_inference_steps=50, strength=0.6, **REFINER_ARGS)
    ref = refiner(generator=_gen(5), **common).images
    out = pipe(generator=_gen(5), schedule="all", **common)
    assert out.stats.backend == "onnxruntime"
    assert rel_l2(out.latents, ref) < 1e-4
    # The graphs were built for the refiner's five time ids (derived from the model, not assumed).
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert manifests and all(
        json.loads(m.read_text())["added_shapes"] == {"text_embeds": [32], "time_ids": [5]} for m in manifests
    )


def test_bad_img2img_arguments_are_refused_by_name(fd_refiner):
    img = _image()
    with pytest.raises(InputError, match="strength"):
        fd_refiner(PROMPT, image=img, strength=1.5, num_inference_steps=4)
    with pytest.raises(InputError, match="denoising_start needs image="):
        fd_refiner(PROMPT, denoising_start=0.5, num_inference_steps=4)
    with pytest.raises(InputError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        fd_refiner(PROMPT, image=img, denoising_start=0.8, denoising_end=0.5, num_inference_steps=4)
    with pytest.raises(InputError, match="denoising_end must be a number strictly between 0 and 1"):
        fd_refiner(PROMPT, image=img, denoising_end=1.5, num_inference_steps=4)
    with pytest.raises(InputError, match="noise_injection"):
        fd_refiner(PROMPT, image=img, denoising_start=0.5, noise_injection=True, num_inference_steps=4)
    with pytest.raises(InputError, match="aesthetic_score"):
        fd_refiner(PROMPT, image=img, aesthetic_score="high", num_inference_steps=4)
    with pytest.raises(InputError, match="latents given as image="):
        fd_refiner(PROMPT, image=torch.zeros(1, 4, 8, 8), height=128, width=128, num_inference_steps=4)


def test_a_time_id_layout_that_contradicts_the_unet_is_refused():
    sd = tiny_sdxl_refiner_pipeline(seed=0)
    sd.register_to_config(requires_aesthetics_score=False)  # the UNet still takes 5 time ids
    with pytest.raises(InputError, match="requires_aesthetics_score=True"):
        FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)


@pytest.mark.slow
def test_from_pretrained_loads_a_refiner_folder_and_build_derives_its_time_ids(refiner, tmp_path):
    from fd_trt.cli import main

    refiner.save_pretrained(tmp_path / "refiner", safe_serialization=True)
    pipe = FasterDiffusionPipeline.from_pretrained(tmp_path / "refiner", backend="torch", device="cpu", progress=False)
    assert type(pipe.sd) is StableDiffusionXLImg2ImgPipeline and pipe.sd.text_encoder is None
    assert pipe.added_shapes() == {"text_embeds": (32,), "time_ids": (5,)}
    pytest.importorskip("onnxruntime")
    out = tmp_path / "engines"
    assert main(["build", "--model", str(tmp_path / "refiner"), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["added_shapes"] == {"text_embeds": [32], "time_ids": [5]}
    assert manifest["text_shape"] == [16, 32]
