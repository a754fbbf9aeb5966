"""DeepFloyd IF stage II (IFSuperResolutionPipeline): the family, the split and the graph contract
with the noise level as class labels, and conformance with diffusers' own pipeline on a tiny
random one (``schedule="all"``) and with an independent Faster Diffusion loop written here
(``schedule="paper"`` and an explicit schedule)."""

import json

import pytest
import torch
import torch.nn.functional as F

from fd_trt.errors import EngineMismatchError, InputError, UnsupportedModelError
from fd_trt.families import family_for_config, family_for_pipeline
from fd_trt.families.deepfloyd_if import (
    if_sr_paper_key_steps,
    tiny_if_pipeline,
    tiny_if_sr_pipeline,
)
from fd_trt.families.models import read_unet_config
from fd_trt.graphs.contract import FLOAT32, GraphContract
from fd_trt.graphs.split import if_text_conditioning, split_unet
from fd_trt.pipelines.deepfloyd_if import FasterDiffusionIFPipeline, FasterDiffusionIFSuperResolutionPipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

PROMPT = "a red circle on the left"
SIZE = 32  # the tiny stage II's output size; its input images are 16x16


@pytest.fixture(scope="module")
def tiny_sr():
    return tiny_if_sr_pipeline(seed=0)


@pytest.fixture(scope="module")
def fd_sr(tiny_sr):
    return FasterDiffusionPipeline.from_diffusers(tiny_sr, backend="torch", device="cpu", progress=False)


def low_res_image(seed=1, batch=1):
    """A stage-I output: 16x16 images in [-1, 1]."""
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_images(pipe, steps, guidance_scale, seed, noise_level=250, image=None):
    return pipe(
        PROMPT,
        image=low_res_image() if image is None else image,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        clean_caption=False,
    ).images


def fd_images(fd, steps, guidance_scale, seed, noise_level=250, **kwargs):
    return fd(
        PROMPT,
        image=low_res_image(),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    )


# the family --------------------------------------------------------------------------------------
def test_stage_two_is_recognised_from_its_config_and_served_by_its_class(tiny_sr, fd_sr, tmp_path):
    assert family_for_pipeline(tiny_sr).name == "if-ii"
    assert type(fd_sr) is FasterDiffusionIFSuperResolutionPipeline
    assert fd_sr.unet_kind == "superres" and fd_sr.image_channels == 3
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(tiny_sr.unet.config)))
    family = family_for_config(read_unet_config(tmp_path))
    assert family.name == "if-ii"
    family.check_config(read_unet_config(tmp_path))
    assert fd_sr.text_shape() == (77, 32)
    assert fd_sr.added_shapes() == {"text_pooled": (128,), "class_labels": (1,)}
    # Stage I's UNet stays stage I's.
    assert family_for_pipeline(tiny_if_pipeline(seed=0)).name == "if"


def test_from_pretrained_loads_a_stage_two_folder(tiny_sr, tmp_path):
    tiny_sr.save_pretrained(tmp_path / "if-ii", safe_serialization=True)
    fd = FasterDiffusionPipeline.from_pretrained(tmp_path / "if-ii", backend="torch", device="cpu", progress=False)
    assert type(fd) is FasterDiffusionIFSuperResolutionPipeline
    assert type(fd.sd).__name__ == "IFSuperResolutionPipeline"
    ref = diffusers_images(tiny_sr, 3, 4.0, seed=2)
    out = fd_images(fd, 3, 4.0, seed=2, schedule="all")
    assert (out.images - ref).abs().max() < 1e-5


def test_the_wrong_stage_classes_and_layouts_are_refused(tiny_sr):
    with pytest.raises(InputError, match="FasterDiffusionIFSuperResolutionPipeline"):
        FasterDiffusionIFPipeline(tiny_sr, backend="torch", device="cpu", progress=False)
    with pytest.raises(InputError, match="stage-II pipeline"):
        FasterDiffusionIFSuperResolutionPipeline(
            tiny_if_pipeline(seed=0), backend="torch", device="cpu", progress=False
        )
    family = family_for_pipeline(tiny_sr)
    config = dict(tiny_sr.unet.config)
    with pytest.raises(UnsupportedModelError, match="takes 7 input channels and predicts 6"):
        family.check_config({**config, "in_channels": 7})
    with pytest.raises(UnsupportedModelError, match="takes 6 input channels and predicts 4"):
        family.check_config({**config, "out_channels": 4})
    # Another class embedding is not stage II's: the stage-I family refuses it, naming it.
    other = {**config, "class_embed_type": "projection"}
    assert family_for_config(other).name == "if"
    with pytest.raises(UnsupportedModelError, match="class_embed_type='projection'"):
        family_for_config(other).check_config(other)


def test_bad_call_arguments_are_refused_with_the_fix(fd_sr):
    with pytest.raises(InputError, match="pass image="):
        fd_sr(PROMPT, num_inference_steps=2)
    with pytest.raises(InputError, match="noise_level must be an integer in \\[0, 1000\\).*got 1000"):
        fd_sr(PROMPT, image=low_res_image(), num_inference_steps=2, noise_level=1000)
    with pytest.raises(InputError, match="noise_level.*got 2.5"):
        fd_sr(PROMPT, image=low_res_image(), num_inference_steps=2, noise_level=2.5)
    with pytest.raises(InputError, match="one stage-I image per prompt"):
        fd_sr([PROMPT, PROMPT], image=low_res_image(), num_inference_steps=2)
    with pytest.raises(InputError, match="calibration"):
        from fd_trt.tools.calibrate import Evaluator

        Evaluator(fd_sr, "ddpm", 4, [PROMPT], [0], guidance=4.0)


def test_the_authors_stage_two_key_steps():
    keys = if_sr_paper_key_steps(50)
    assert [i for i in range(50) if i not in keys] == list(range(21, 40, 2))
    assert if_sr_paper_key_steps(25) == [*range(21), 22, 24]


# the split and the contract ----------------------------------------------------------------------
def test_the_split_of_a_stage_two_unet_is_exact(tiny_sr):
    unet = tiny_sr.unet
    split = split_unet(unet)
    assert split.added_names == ("text_pooled", "class_labels")
    g = torch.Generator().manual_seed(0)
    x, raw = torch.randn(2, 6, SIZE, SIZE, generator=g), torch.randn(2, 77, 24, generator=g)
    t, labels = torch.tensor([700.0, 30.0]), torch.tensor([[250.0], [20.0]])
    text, pooled = if_text_conditioning(unet, raw)
    added = {"text_pooled": pooled, "class_labels": labels}
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=raw, class_labels=labels.reshape(-1)).sample
        feats = split.run_encoder(x, t, text, added)
        assert torch.equal(split.run_decoder(feats, t, text, added), ref)
        # The noise level matters: other labels, other outputs.
        other = {"text_pooled": pooled, "class_labels": torch.tensor([[0.0], [900.0]])}
        assert (split.run_decoder(split.run_encoder(x, t, text, other), t, text, other) - ref).abs().max() > 1e-3
        # Three steps of the key step's features in one call (labels tiled per step) equal one call per step.
        steps = torch.tensor([700.0, 30.0, 500.0, 20.0, 300.0, 10.0])
        per_step = torch.cat([split.run_decoder(feats, steps[2 * j : 2 * j + 2], text, added) for j in range(3)])
        for share in (True, False):
            out = split.run_decoder_steps(feats, steps, text, (pooled, labels), share=share)
            assert (out - per_step).abs().max() < 1e-5


def test_the_contract_carries_the_class_labels(tiny_sr):
    shapes = {"text_pooled": (128,), "class_labels": (1,)}
    contract = GraphContract.from_unet_config(tiny_sr.unet.config, (SIZE, SIZE), (77, 32), shapes)
    labels = contract.encoder.tensor("class_labels")
    assert labels.shape == ("rows", 1) and labels.dtype == FLOAT32
    assert contract.decoder.tensor("class_labels").row_axis == "rows"  # N rows, tiled per step in the graph
    assert contract.latent_tail == (6, SIZE, SIZE) and contract.out_tail == (6, SIZE, SIZE)
    # The config's defaults: the pooled prompt has the time embedding's width (4 x 32).
    assert GraphContract.from_unet_config(tiny_sr.unet.config, (SIZE, SIZE), (77, 32)).added_shapes == {
        "text_pooled": [128],
        "class_labels": [1],
    }
    names = contract.encoder.input_names
    assert GraphContract.from_encoder_io(names, contract.encoder.output_names).added_names == (
        "text_pooled",
        "class_labels",
    )
    with pytest.raises(InputError, match="class_labels"):
        GraphContract.from_unet_config(tiny_sr.unet.config, (SIZE, SIZE), (77, 32), {"text_pooled": (128,)})
    with pytest.raises(EngineMismatchError):
        GraphContract.from_encoder_io([*names, "bogus"], contract.encoder.output_names)


# conformance -------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_all_equals_diffusers_superresolution_pipeline_on_torch(tiny_sr, fd_sr, guidance_scale):
    refs = {}
    for noise_level in (250, 60):
        refs[noise_level] = ref = diffusers_images(tiny_sr, 6, guidance_scale, seed=3, noise_level=noise_level)
        out = fd_images(fd_sr, 6, guidance_scale, seed=3, noise_level=noise_level, schedule="all")
        assert out.images.shape == (1, 3, SIZE, SIZE)
        assert (out.images - ref).abs().max() < 1e-5
        assert out.stats.encoder_calls == 6
    # The noise level matters (an implementation that dropped it could not pass both), and so does the image.
    assert (refs[250] - refs[60]).abs().max() > 1e-4
    other_image = diffusers_images(tiny_sr, 6, guidance_scale, seed=3, noise_level=60, image=low_res_image(seed=9))
    assert (other_image - refs[60]).abs().max() > 1e-4


def test_two_images_per_prompt_and_two_prompts_as_diffusers(tiny_sr, fd_sr):
    images = low_res_image(seed=7, batch=2)
    common = dict(num_inference_steps=4, guidance_scale=4.0, output_type="pt")
    ref = tiny_sr(
        [PROMPT, "a blue square"],
        image=images,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(5),
        clean_caption=False,
        **common,
    ).images
    out = fd_sr(
        [PROMPT, "a blue square"],
        image=images,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(5),
        schedule="all",
        **common,
    )
    assert out.images.shape == (4, 3, SIZE, SIZE)
    assert (out.images - ref).abs().max() < 1e-5


def independent_sr_loop(pipe, steps, guidance_scale, seed, key_steps, noise_level=250, alpha=0.003):
    """The authors' scheme over diffusers' own UNet forward, for stage II: the model input is the
    noisy image and the upscaled, noised stage-I image; the noise level is the class label. At a
    key step the UNet runs whole and its conv_in, down-block and mid-block outputs are recorded; at
    the other steps forward hooks replace those outputs with the key step's. Noise injection in
    pixel space; CFG on the noise channels with the conditional variance."""
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(seed)
    pos, neg = pipe.encode_prompt(PROMPT, True, num_images_per_prompt=1, device="cpu", clean_caption=False)
    text = torch.cat([neg, pos])
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 3, SIZE, SIZE, generator=generator) * scheduler.init_noise_sigma
    x_T = x.clone()
    upscaled = F.interpolate(low_res_image(), (SIZE, SIZE), mode="bilinear", align_corners=True)
    noise = torch.randn(upscaled.shape, generator=generator)
    upscaled = pipe.image_noising_scheduler.add_noise(upscaled, noise, torch.tensor([noise_level]))
    labels = torch.tensor([noise_level, noise_level])
    modules = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    cache, replay = {}, {"on": False}

    def hook(module, args, out):
        if replay["on"]:
            return cache[id(module)]
        cache[id(module)] = out
        return out

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for i, t in enumerate(scheduler.timesteps):
            replay["on"] = i not in key_steps
            model_input = torch.cat([x, upscaled], dim=1)
            with torch.no_grad():
                eps = unet(torch.cat([model_input] * 2), t, encoder_hidden_states=text, class_labels=labels).sample
            eps_u, eps_c = eps.chunk(2)
            guided = eps_u[:, :3] + guidance_scale * (eps_c[:, :3] - eps_u[:, :3])
            eps = torch.cat([guided, eps_c[:, 3:]], dim=1)
            if float(t) < 500:
                x = x + alpha * x_T
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    finally:
        for h in handles:
            h.remove()
    return x


@pytest.mark.slow
def test_paper_equals_an_independent_faster_diffusion_loop(tiny_sr, fd_sr):
    steps = 50  # the steps the authors' rule was made for: 10 of them are not key steps
    keys = if_sr_paper_key_steps(steps)
    out = fd_images(fd_sr, steps, 4.0, seed=5)
    assert out.stats.key_steps == keys  # "paper" is the default without a calibration
    assert out.stats.encoder_calls == len(keys)
    ref = independent_sr_loop(tiny_sr, steps, 4.0, seed=5, key_steps=set(keys))
    assert (out.images - ref).abs().max() < 1e-5


def test_a_sparse_schedule_equals_the_independent_loop(tiny_sr, fd_sr):
    keys = [0, 1, 2, 5, 9]
    ref = independent_sr_loop(tiny_sr, 12, 4.0, seed=6, key_steps=set(keys), noise_level=100)
    # One decoder call per step: the loop's arithmetic row for row.
    out = fd_images(fd_sr, 12, 4.0, seed=6, noise_level=100, schedule=keys, parallel=False)
    assert out.stats.encoder_calls == len(keys) and out.stats.decoder_calls == 12
    assert (out.images - ref).abs().max() < 1e-5
    # All steps between two key steps in one call (the noise level tiled per step): the same
    # within the rounding of the larger batch, which DDPM's thresholding steps amplify.
    batched = fd_images(fd_sr, 12, 4.0, seed=6, noise_level=100, schedule=keys)
    assert batched.stats.decoder_calls == len(keys)
    assert (batched.images - ref).abs().max() < 1e-4
    # Encoder propagation (with noise injection) changes the result by far more than these tolerances.
    assert (ref - diffusers_images(tiny_sr, 12, 4.0, seed=6, noise_level=100)).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_all_equals_diffusers_superresolution_pipeline_on_onnxruntime(tiny_sr, guidance_scale, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path))
    fd = FasterDiffusionPipeline.from_diffusers(tiny_sr, backend="onnxruntime", device="cpu", progress=False)
    for noise_level in (250, 60):
        ref = diffusers_images(tiny_sr, 6, guidance_scale, seed=4, noise_level=noise_level)
        out = fd_images(fd, 6, guidance_scale, seed=4, noise_level=noise_level, schedule="all")
        assert (out.images - ref).abs().max() < 1e-4
    # A schedule that decodes several steps per call (the class labels tiled per step in the graph)
    # on onnxruntime equals it on torch.
    torch_fd = FasterDiffusionPipeline.from_diffusers(tiny_sr, backend="torch", device="cpu", progress=False)
    a = fd_images(fd, 12, guidance_scale, seed=4, noise_level=100, schedule=[0, 3, 7])
    b = fd_images(torch_fd, 12, guidance_scale, seed=4, noise_level=100, schedule=[0, 3, 7])
    assert a.stats.decoder_calls == b.stats.decoder_calls == 3
    assert (a.images - b.images).abs().max() < 1e-4
