"""img2img, inpainting and ControlNet on the onnxruntime backend against diffusers' own pipelines
(schedule="all", within 1e-4), and the command line's image options."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from test_controlnet import _cn_pipeline, control_image, tiny_controlnet
from test_img2img_inpaint import _image, _mask, inpaint_sd  # noqa: F401 (fixture)

from fd_trt.cli import main
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"
TOL = 1e-4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ort_pipe(tiny_sd):
    pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
    yield pipe
    pipe.close()


def test_img2img_on_onnxruntime_reproduces_diffusers(tiny_sd, ort_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref_pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.components)
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(image=_image(1), strength=0.6, num_inference_steps=20, output_type="latent")
    ref = ref_pipe(PROMPT, generator=_gen(4), **common).images
    out = ort_pipe(PROMPT, generator=_gen(4), schedule="all", **common)
    assert out.stats.backend == "onnxruntime"
    assert rel_l2(out.images, ref) < TOL


def test_4_channel_inpaint_on_onnxruntime_reproduces_diffusers(tiny_sd, ort_pipe):
    from diffusers import StableDiffusionInpaintPipeline

    ref_pipe = StableDiffusionInpaintPipeline(**tiny_sd.components)
    ref_pipe.set_progress_bar_config(disable=True)
    common = dict(image=_image(6), mask_image=_mask(), strength=0.7, num_inference_steps=20, output_type="latent")
    ref = ref_pipe(PROMPT, generator=_gen(8), **common).images
    out = ort_pipe(PROMPT, generator=_gen(8), schedule="all", **common)
    assert rel_l2(out.images, ref) < TOL


def test_9_channel_inpaint_on_onnxruntime_reproduces_diffusers(inpaint_sd):  # noqa: F811
    pipe = FasterDiffusionPipeline.from_diffusers(inpaint_sd, backend="onnxruntime", device="cpu", progress=False)
    common = dict(image=_image(5), mask_image=_mask(), num_inference_steps=20, output_type="latent")
    ref = inpaint_sd(PROMPT, generator=_gen(3), **common).images
    out = pipe(PROMPT, generator=_gen(3), schedule="all", **common)
    pipe.close()
    assert rel_l2(out.images, ref) < TOL


def test_controlnet_with_an_onnxruntime_unet_reproduces_diffusers(tiny_sd):
    sd = _cn_pipeline(tiny_sd, tiny_controlnet(tiny_sd.unet, 1))
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", device="cpu", progress=False)
    common = dict(image=control_image(3), num_inference_steps=20, output_type="latent")
    ref = sd(PROMPT, generator=_gen(2), **common).images
    out = pipe(PROMPT, generator=_gen(2), schedule="all", **common)
    paper = pipe(PROMPT, generator=_gen(2), schedule="paper", **common)
    pipe.close()
    assert rel_l2(out.images, ref) < TOL
    assert paper.stats.controlnet_calls == paper.stats.encoder_calls == 7


def _png(path, array):
    PIL.Image.fromarray(array).save(path)
    return str(path)


def test_generate_img2img_and_controlnet_from_the_cli(tmp_path, capsys):
    from fd_trt.families.models import load_diffusers_pipeline

    rng = np.random.default_rng(0)
    image = _png(tmp_path / "in.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    js = tmp_path / "s.json"
    rc = main(
        [
            "generate",
            "a red star",
            "--image",
            image,
            "--strength",
            "0.5",
            "--steps",
            "20",
            "--backend",
            "torch",
            "--quiet",
            "--out",
            str(tmp_path / "a.png"),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    stats = json.loads(js.read_text())["stats"]
    assert stats["num_steps"] == 10 and stats["key_steps"] == [0, 1, 2, 3, 5]
    assert PIL.Image.open(tmp_path / "a.png").size == (64, 64)  # the input image's size, not the model's

    sd, _ = load_diffusers_pipeline("default")
    tiny_controlnet(sd.unet, 4, sd.vae_scale_factor).save_pretrained(tmp_path / "cn", safe_serialization=True)
    rc = main(
        [
            "generate",
            "a red star",
            "--controlnet",
            str(tmp_path / "cn"),
            "--image",
            image,
            "--steps",
            "20",
            "--backend",
            "torch",
            "--quiet",
            "--out",
            str(tmp_path / "b.png"),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    stats = json.loads(js.read_text())["stats"]
    assert stats["controlnet_calls"] == stats["encoder_calls"] == 7


def test_generate_mask_without_image_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "x", "--mask", "m.png", "--quiet", "--out", str(tmp_path / "a.png")])
    assert rc == 2
    assert "need --image" in capsys.readouterr().err
