"""DeepFloyd IF stage I: the family, the split of IF's UNet, and conformance with diffusers'
IFPipeline on a tiny random one (``schedule="all"``) and with an independent Faster Diffusion
loop written here (``schedule="paper"``)."""

import json

import pytest
import torch

from fd_trt.errors import UnsupportedModelError
from fd_trt.families import family_for_config, family_for_pipeline
from fd_trt.families.deepfloyd_if import if_paper_key_steps, tiny_if_pipeline
from fd_trt.families.models import read_unet_config, unet_input_kind
from fd_trt.graphs.split import if_text_conditioning, split_unet
from fd_trt.pipelines.deepfloyd_if import FasterDiffusionIFPipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def tiny_if():
    return tiny_if_pipeline(seed=0)


@pytest.fixture(scope="module")
def fd_if(tiny_if):
    return FasterDiffusionPipeline.from_diffusers(tiny_if, backend="torch", device="cpu", progress=False)


def diffusers_images(pipe, steps, guidance_scale, seed):
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        clean_caption=False,
    ).images


# the family --------------------------------------------------------------------------------------
def test_if_is_recognised_from_its_config_and_served_by_its_class(tiny_if, fd_if, tmp_path):
    assert family_for_pipeline(tiny_if).name == "if"
    assert type(fd_if) is FasterDiffusionIFPipeline
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(tiny_if.unet.config)))
    config = read_unet_config(tmp_path)
    family = family_for_config(config)
    assert family.name == "if"
    family.check_config(config)
    # The graphs take the prompt projected to the cross-attention width and its pooling.
    assert fd_if.text_shape() == (77, 32)
    assert fd_if.added_shapes() == {"text_pooled": (128,)}


def test_other_class_embeddings_and_wrong_channel_layouts_are_refused_with_what_they_are(tiny_if):
    family = family_for_pipeline(tiny_if)
    config = dict(tiny_if.unet.config)
    # Stage II's class embedding is the "if-ii" family's (tests/test_deepfloyd_if_sr.py); another is refused.
    assert family_for_config({**config, "class_embed_type": "timestep", "in_channels": 6}).name == "if-ii"
    with pytest.raises(UnsupportedModelError, match="class_embed_type='identity'.*stage II"):
        family.check_config({**config, "class_embed_type": "identity"})
    with pytest.raises(UnsupportedModelError, match="takes 3 input channels and predicts 5"):
        family.check_config({**config, "out_channels": 5})
    # An SD-family UNet with IF's channels: the message states the layouts with the right numbers.
    with pytest.raises(UnsupportedModelError) as err:
        unet_input_kind({"in_channels": 3, "out_channels": 6})
    msg = str(err.value)
    assert "takes 3 input channels and predicts 6" in msg and "learned variance" in msg
    assert "(6 in, 6 out)" not in msg


def test_the_authors_if_key_steps():
    assert if_paper_key_steps(25) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20]
    keys = if_paper_key_steps(100)
    assert keys[:11] == list(range(11)) and keys[-14:] == list(range(86, 100))
    assert len(keys) == 10 + 16 + 14


# the split ---------------------------------------------------------------------------------------
def test_the_split_of_an_if_unet_is_exact(tiny_if):
    unet = tiny_if.unet
    split = split_unet(unet)
    g = torch.Generator().manual_seed(0)
    x, raw = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 77, 24, generator=g)
    t = torch.tensor([700.0, 30.0])
    # The timestep-free text conditioning, once: the projected prompt and its pooling.
    text, pooled = if_text_conditioning(unet, raw)
    assert text.shape == (2, 77, 32) and pooled.shape == (2, 128)
    added = {"text_pooled": pooled}
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=raw).sample
        feats = split.run_encoder(x, t, text, added)
        assert torch.equal(split.run_decoder(feats, t, text, added), ref)
        # Three steps of the key step's features in one call, rows shared or not, equal one call per step.
        steps = torch.tensor([700.0, 30.0, 500.0, 20.0, 300.0, 10.0])
        per_step = torch.cat([split.run_decoder(feats, steps[2 * j : 2 * j + 2], text, added) for j in range(3)])
        for share in (True, False):
            out = split.run_decoder_steps(feats, steps, text, (pooled,), share=share)
            assert (out - per_step).abs().max() < 1e-5
    # Neither half computes the text conditioning: it is not among their modules.
    for half in (split.encoder, split.decoder):
        assert not any(m is unet.add_embedding or m is unet.encoder_hid_proj for m in half.modules())
    # The text the decoder shares is what added key/value attention projects (add_k_proj), not to_k.
    projections = split.decoder.text_projections()
    assert projections and all(p is m.add_k_proj or p is m.add_v_proj for p in projections for m in [_owner(unet, p)])


def _owner(unet, projection):
    for module in unet.modules():
        if projection in (getattr(module, "add_k_proj", None), getattr(module, "add_v_proj", None)):
            return module
    raise AssertionError("a text projection that is no added key/value projection")


# conformance -------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [7.0, 1.0], ids=["cfg", "no-cfg"])
def test_all_equals_diffusers_if_pipeline_on_torch(tiny_if, fd_if, guidance_scale):
    ref = diffusers_images(tiny_if, 8, guidance_scale, seed=3)
    # The text conditioning runs once per generation; diffusers' UNet runs it at every step.
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (tiny_if.unet.add_embedding,)]
    try:
        out = fd_if(
            PROMPT,
            num_inference_steps=8,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(3),
            output_type="pt",
            schedule="all",
        )
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 1
    assert out.images.shape == (1, 3, 16, 16)
    assert (out.images - ref).abs().max() < 1e-5
    assert out.stats.encoder_calls == 8


def independent_paper_loop(pipe, steps, guidance_scale, seed, key_steps, alpha=0.003):
    """The authors' scheme written over diffusers' own UNet forward: at a key step the UNet runs
    whole and its conv_in, down-block and mid-block outputs are recorded; at the other steps
    forward hooks replace those outputs with the key step's, so only the time embedding and the up
    path see the new timestep. One UNet call per step; noise injection in pixel space; CFG on the
    noise channels with the conditional variance, as IFPipeline."""
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(seed)
    pos, neg = pipe.encode_prompt(PROMPT, True, num_images_per_prompt=1, device="cpu", clean_caption=False)
    text = torch.cat([neg, pos])
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 3, 16, 16, generator=generator) * scheduler.init_noise_sigma
    x_T = x.clone()
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
            with torch.no_grad():
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
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
def test_paper_equals_an_independent_faster_diffusion_loop(tiny_if, fd_if):
    steps = 25
    keys = if_paper_key_steps(steps)
    out = fd_if(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type="pt")
    assert out.stats.key_steps == keys  # "paper" is the default without a calibration
    assert out.stats.encoder_calls == len(keys)
    ref = independent_paper_loop(tiny_if, steps, 7.0, seed=5, key_steps=set(keys))
    assert (out.images - ref).abs().max() < 1e-5


def test_paper_injects_prior_noise_in_pixel_space(tiny_if, fd_if):
    common = dict(num_inference_steps=12, generator=None, output_type="pt")
    runs = {}
    for name, injection in (("on", None), ("off", False)):
        common["generator"] = torch.Generator().manual_seed(5)
        runs[name] = fd_if(PROMPT, noise_injection=injection, **common).images
    ref = independent_paper_loop(tiny_if, 12, 7.0, seed=5, key_steps=set(if_paper_key_steps(12)))
    assert (runs["on"] - ref).abs().max() < 1e-5
    assert (runs["off"] - runs["on"]).abs().max() > 1e-4


def test_output_types_as_ifpipeline(tiny_if, fd_if):
    def gen():
        return torch.Generator().manual_seed(2)

    arr = fd_if(PROMPT, num_inference_steps=4, generator=gen(), schedule="all", output_type="np").images
    ref = tiny_if(PROMPT, num_inference_steps=4, generator=gen(), output_type="np", clean_caption=False).images
    assert arr.shape == (1, 16, 16, 3) and abs(arr - ref).max() < 1e-5
    pil = fd_if(PROMPT, num_inference_steps=4, generator=gen(), schedule="all", output_type="pil").images
    assert pil[0].size == (16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("guidance_scale", [7.0, 1.0], ids=["cfg", "no-cfg"])
def test_all_equals_diffusers_if_pipeline_on_onnxruntime(tiny_if, guidance_scale, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path))
    fd = FasterDiffusionPipeline.from_diffusers(tiny_if, backend="onnxruntime", device="cpu", progress=False)
    ref = diffusers_images(tiny_if, 6, guidance_scale, seed=4)
    out = fd(
        PROMPT,
        num_inference_steps=6,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
        schedule="all",
    )
    assert (out.images - ref).abs().max() < 1e-4
    # paper on onnxruntime equals paper on torch
    torch_fd = FasterDiffusionPipeline.from_diffusers(tiny_if, backend="torch", device="cpu", progress=False)
    a = fd(PROMPT, num_inference_steps=12, generator=torch.Generator().manual_seed(4), output_type="pt")
    b = torch_fd(PROMPT, num_inference_steps=12, generator=torch.Generator().manual_seed(4), output_type="pt")
    assert a.stats.key_steps == b.stats.key_steps == if_paper_key_steps(12)
    assert (a.images - b.images).abs().max() < 1e-4
    # The graphs take the text conditioning computed once; neither carries its weights.
    import onnx

    graphs = sorted(tmp_path.glob("**/*coder.onnx"))
    assert [g.name for g in graphs] == ["decoder.onnx", "encoder.onnx"]
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        assert "text_pooled" in [i.name for i in model.graph.input]
        weights = [t.name for t in model.graph.initializer]
        assert weights and not any("add_embedding" in w or "encoder_hid_proj" in w for w in weights)


# calibration -------------------------------------------------------------------------------------
def test_calibration_runs_the_if_sampler(fd_if):
    from fd_trt.tools.calibrate import Evaluator

    prompts = ["a red circle", "blue square"]
    ev = Evaluator(fd_if, "ddpm", 6, prompts, [0, 1], guidance=7.0)
    assert ev.latents.shape == (2, 3, 16, 16)
    # Its reference ("all") is the pipeline's own run on the same noise: the noise channels guided,
    # the learned variance the conditional rows', the DDPM noise drawn from the same generator.
    out = fd_if(
        prompts,
        num_inference_steps=6,
        latents=ev.latents,
        generator=torch.Generator().manual_seed(0),
        guidance_scale=7.0,
        schedule="all",
        output_type="pt",
    )
    assert (out.images - ev.reference).abs().max() < 1e-5


@pytest.mark.slow
def test_calibrate_on_if_compares_with_the_if_paper_schedule(fd_if):
    from fd_trt.tools.calibrate import Evaluator, calibrate

    cal = calibrate(fd_if, scheduler="ddpm", steps=12, key_steps=3, prompts=["a red circle"], seeds=[0], guidance=7.0)
    assert len(cal.key_steps) == 3 and cal.key_steps[0] == 0
    ev = Evaluator(fd_if, "ddpm", 12, ["a red circle"], [0], guidance=7.0)
    assert cal.paper_error == pytest.approx(ev.error(if_paper_key_steps(12)), rel=1e-5)
    assert cal.error == pytest.approx(ev.error(cal.key_steps), rel=1e-5)
