"""ControlNet at key steps only, against diffusers' StableDiffusionControlNetPipeline and an
independently written loop that applies the residuals at key steps."""

import copy

import pytest
import torch

from fd_trt.backends.torch import TorchRunner
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, run_sampler
from fd_trt.core.schedule import NoiseInjection, parse_schedule
from fd_trt.pipelines.conditioning import KeyStepControlNet

from conftest import rel_l2

PROMPT = "a red circle on the left"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_controlnet(unet, seed, vae_scale_factor=8):
    """A ControlNet shaped for ``unet`` with random weights everywhere, zero convolutions included
    (a fresh ControlNet's zero convolutions would make every residual zero and every test trivial).
    Its conditioning embedding downsamples the image by ``vae_scale_factor``."""
    from diffusers import ControlNetModel

    halvings = int(vae_scale_factor).bit_length() - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16)[: halvings + 1])
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.1)
            torch.nn.init.normal_(module.bias, std=0.01)
    return net.eval()


def control_image(seed, size=64):
    return torch.rand(1, 3, size, size, generator=_gen(seed))


@pytest.fixture(scope="module")
def controlnets(tiny_sd):
    return tiny_controlnet(tiny_sd.unet, 1), tiny_controlnet(tiny_sd.unet, 2)


def _reference_loop(unet, controlnet, scheduler, latents, text, image, key_steps, guidance_scale):
    """Encoder propagation with ControlNet written from the paper, on diffusers' UNet forward:
    at a key step the full UNet runs with the ControlNet residuals, and forward hooks record the
    mid input of the up path and each up block's skips (the sums); at other steps the UNet runs
    with those recorded tensors substituted, so only its up path's own time embedding differs."""
    cache = {}
    replay = {"on": False}

    def pre_hook(name):
        def hook(module, args, kwargs):
            if replay["on"]:
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = cache[name + ".h"] if name == "up0" else kwargs["hidden_states"]
                kwargs["res_hidden_states_tuple"] = cache[name + ".res"]
                return args, kwargs
            cache[name + ".res"] = kwargs["res_hidden_states_tuple"]
            if name == "up0":
                cache[name + ".h"] = kwargs["hidden_states"]
            return None

        return hook

    handles = [b.register_forward_pre_hook(pre_hook(f"up{i}"), with_kwargs=True) for i, b in enumerate(unet.up_blocks)]
    try:
        x = latents
        for i, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            if i in key_steps:
                replay["on"] = False
                down, mid = controlnet(x_in, t, encoder_hidden_states=text, controlnet_cond=image, return_dict=False)
                eps = unet(
                    x_in,
                    t,
                    encoder_hidden_states=text,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                    return_dict=False,
                )[0]
            else:
                replay["on"] = True
                eps = unet(x_in, t, encoder_hidden_states=text, return_dict=False)[0]
            eps_u, eps_c = eps.chunk(2)
            x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return x


@torch.no_grad()
def test_key_step_residuals_match_an_independent_loop(tiny_sd, controlnets):
    net = controlnets[0]
    text = torch.randn(2, 16, 32, generator=_gen(5))
    latents = torch.randn(1, 4, 8, 8, generator=_gen(6))
    image = torch.cat([control_image(7)] * 2)
    steps = 20
    schedule = parse_schedule("paper", steps)
    sched = copy.deepcopy(tiny_sd.scheduler)
    sched.set_timesteps(steps)
    ref = _reference_loop(tiny_sd.unet, net, sched, latents, text, image, set(schedule.key_steps), 7.5)
    sched = copy.deepcopy(tiny_sd.scheduler)
    sched.set_timesteps(steps)
    control = KeyStepControlNet.build(net, [image], steps)
    with TorchRunner(tiny_sd.unet) as runner:
        out = run_sampler(
            runner,
            sched,
            latents,
            SamplerInputs(text, control=control),
            schedule,
            SamplerOptions(noise=NoiseInjection(enabled=False), progress=False),
        )
    assert control.calls == len(schedule.key_steps) == 7
    assert rel_l2(out, ref) < 1e-5
    # The residuals matter: without them the result is far off.
    sched = copy.deepcopy(tiny_sd.scheduler)
    sched.set_timesteps(steps)
    with TorchRunner(tiny_sd.unet) as runner:
        plain = run_sampler(
            runner,
            sched,
            latents,
            SamplerInputs(text),
            schedule,
            SamplerOptions(noise=NoiseInjection(enabled=False), progress=False),
        )
    assert rel_l2(plain, ref) > 1e-3


def _cn_pipeline(tiny_sd, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(**{**tiny_sd.components, "controlnet": controlnet, "image_encoder": None})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fd(sd):
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    return FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"controlnet_conditioning_scale": 0.6, "control_guidance_start": 0.2, "control_guidance_end": 0.7},
        {"guess_mode": True},
    ],
    ids=["plain", "scale-window", "guess"],
)
def test_all_reproduces_diffusers_controlnet_pipeline(tiny_sd, controlnets, kwargs):
    sd = _cn_pipeline(tiny_sd, controlnets[0])
    common = dict(image=control_image(3), num_inference_steps=20, output_type="latent", **kwargs)
    ref = sd(PROMPT, negative_prompt="blue", generator=_gen(2), **common).images
    out = _fd(sd)(PROMPT, negative_prompt="blue", generator=_gen(2), schedule="all", **common)
    assert rel_l2(out.images, ref) < 1e-5
    plain = tiny_sd(
        PROMPT, negative_prompt="blue", generator=_gen(2), num_inference_steps=20, output_type="latent"
    ).images
    assert rel_l2(plain, ref) > 1e-3  # the ControlNet changed the result


def test_all_reproduces_diffusers_multi_controlnet(tiny_sd, controlnets):
    from diffusers.models import MultiControlNetModel

    sd = _cn_pipeline(tiny_sd, MultiControlNetModel(list(controlnets)))
    common = dict(
        image=[control_image(3), control_image(4)],
        num_inference_steps=20,
        output_type="latent",
        controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0],
    )
    ref = sd(PROMPT, generator=_gen(5), **common).images
    fd = _fd(sd)
    out = fd(PROMPT, generator=_gen(5), schedule="all", **common)
    assert rel_l2(out.images, ref) < 1e-5
    # Net 0 runs in steps 0..11, net 1 in steps 6..19: 12 + 14 forward passes.
    assert out.stats.controlnet_calls == 26


def test_paper_runs_the_controlnet_once_per_key_step(tiny_sd, controlnets):
    sd = _cn_pipeline(tiny_sd, controlnets[0])
    fd = _fd(sd)
    out = fd(
        PROMPT,
        image=control_image(3),
        num_inference_steps=50,
        generator=_gen(1),
        output_type="latent",
        schedule="paper",
    )
    assert out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert out.stats.controlnet_calls == out.stats.encoder_calls == 9
    assert out.stats.seconds["controlnet"] > 0


def test_a_guidance_window_edge_inside_a_segment_starts_a_key_step(tiny_sd, controlnets):
    sd = _cn_pipeline(tiny_sd, controlnets[0])
    fd = _fd(sd)
    # 50 steps, window [0.14, 0.6]: steps 7..29 are inside; 7 and 30 are edges inside paper's segments.
    out = fd(
        PROMPT,
        image=control_image(3),
        num_inference_steps=50,
        generator=_gen(1),
        output_type="latent",
        schedule="paper",
        control_guidance_start=0.14,
        control_guidance_end=0.6,
    )
    assert out.stats.key_steps == [0, 1, 2, 3, 5, 7, 10, 15, 25, 30, 35]
    assert out.stats.controlnet_calls == 4  # key steps 7, 10, 15 and 25 are inside the window


def test_all_reproduces_diffusers_with_several_prompts_images_and_control_images(tiny_sd, controlnets):
    sd = _cn_pipeline(tiny_sd, controlnets[0])
    prompts = [PROMPT, "a blue square"]
    common = dict(
        image=[control_image(3), control_image(4)], num_inference_steps=6, num_images_per_prompt=2, output_type="latent"
    )
    ref = sd(prompts, generator=_gen(9), **common).images
    out = _fd(sd)(prompts, generator=_gen(9), schedule="all", **common)
    assert out.images.shape == (4, 4, 8, 8)
    assert rel_l2(out.images, ref) < 1e-5
