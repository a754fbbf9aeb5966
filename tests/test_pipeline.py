"""The Faster Diffusion pipeline against diffusers' own StableDiffusionPipeline on a tiny model."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch

from fd_trt.errors import FdTrtError, InputError, ScheduleError
from fd_trt.families.models import make_scheduler

from conftest import rel_l2

PROMPT = "a red circle on the left"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "scheduler, steps, kwargs",
    [
        ("ddim", 50, {}),
        ("ddim", 10, {"eta": 1.0}),  # stochastic DDIM: the generator drives the step noise
        ("dpmpp", 20, {}),
        ("pndm", 50, {}),
        ("euler", 30, {}),
        ("ddpm", 25, {}),
    ],
)
def test_schedule_all_reproduces_diffusers(tiny_sd, fd_pipe, use_scheduler, scheduler, steps, kwargs):
    use_scheduler(scheduler)
    common = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="latent", **kwargs)
    ref = tiny_sd(PROMPT, negative_prompt="blue", generator=_gen(7), **common).images
    out = fd_pipe(PROMPT, negative_prompt="blue", generator=_gen(7), schedule="all", **common)
    assert out.stats.encoder_calls == len(tiny_sd.scheduler.timesteps)
    assert rel_l2(out.images, ref) < 1e-5


def test_all_reproduces_diffusers_with_several_prompts_and_images(tiny_sd, fd_pipe):
    prompts = ["a red circle", "a blue square on the right"]
    lat = torch.randn(4, 4, 8, 8, generator=_gen(3))
    common = dict(num_inference_steps=20, num_images_per_prompt=2, latents=lat, output_type="latent")
    ref = tiny_sd(prompts, negative_prompt=["green", "yellow"], **common).images
    out = fd_pipe(prompts, negative_prompt=["green", "yellow"], schedule="all", **common)
    assert out.images.shape == (4, 4, 8, 8)
    assert rel_l2(out.images, ref) < 1e-5


def test_all_without_cfg_uses_batch_b_and_matches_diffusers(tiny_sd, fd_pipe, latents):
    ref = tiny_sd(PROMPT, num_inference_steps=20, guidance_scale=1.0, latents=latents, output_type="latent").images
    out = fd_pipe(
        PROMPT, num_inference_steps=20, guidance_scale=1.0, latents=latents, output_type="latent", schedule="paper"
    )
    assert out.stats.decoder_rows == 20 and out.stats.encoder_rows == 7  # B=1 rows, 7 key steps
    out_all = fd_pipe(
        PROMPT, num_inference_steps=20, guidance_scale=1.0, latents=latents, output_type="latent", schedule="all"
    )
    assert rel_l2(out_all.images, ref) < 1e-5


def test_paper_ddim50_counts_calls_and_rows(fd_pipe, latents):
    common = dict(num_inference_steps=50, latents=latents, output_type="latent")
    paper = fd_pipe(PROMPT, schedule="paper", **common)
    full = fd_pipe(PROMPT, schedule="all", **common)
    assert paper.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert paper.stats.encoder_calls == 9
    assert paper.stats.decoder_calls == 9
    assert paper.stats.decoder_rows == 100
    assert full.stats.encoder_calls == 50 and full.stats.decoder_rows == 100
    assert rel_l2(paper.images, full.images) > 1e-3


def test_parallel_sequential_and_chunked_decoding_agree(fd_pipe, use_scheduler, latents):
    use_scheduler("dpmpp")  # a multistep solver: state must survive batched decoding
    common = dict(num_inference_steps=50, latents=latents, output_type="latent", schedule="paper")
    par = fd_pipe(PROMPT, parallel=True, **common)
    seq = fd_pipe(PROMPT, parallel=False, **common)
    chunked = fd_pipe(PROMPT, max_decoder_rows=6, **common)
    assert seq.stats.decoder_calls == 50 and par.stats.decoder_calls == 9
    # 6 rows = 3 steps per call: segments 1,1,1,2,5,5,10,10,15 -> 1+1+1+1+2+2+4+4+5 calls
    assert chunked.stats.decoder_calls == 21
    assert rel_l2(seq.images, par.images) < 1e-5
    assert rel_l2(chunked.images, par.images) < 1e-5


def test_max_decoder_rows_below_one_step_is_an_error(fd_pipe):
    with pytest.raises(InputError, match="max_decoder_rows=1"):
        fd_pipe(PROMPT, num_inference_steps=5, max_decoder_rows=1, output_type="latent")


def _trajectory(fd_pipe, latents, noise_injection):
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, int(t), kw["latents"].clone()))
        return {}

    fd_pipe(
        PROMPT,
        num_inference_steps=50,
        latents=latents,
        output_type="latent",
        schedule="paper",
        noise_injection=noise_injection,
        callback_on_step_end=cb,
    )
    return seen


def test_noise_injection_first_changes_the_first_step_below_half_the_timesteps(fd_pipe, latents):
    on = _trajectory(fd_pipe, latents, True)
    off = _trajectory(fd_pipe, latents, False)
    assert [s[0] for s in on] == list(range(50))  # the callback sees every step, batched or not
    diverged = [i for (i, _, a), (_, _, b) in zip(on, off) if not torch.equal(a, b)]
    first_low = next(i for i, t, _ in on if t < 500)
    assert diverged and diverged[0] == first_low
    assert on[first_low][1] < 500 <= on[first_low - 1][1]
    # x_{i} - x_{i, off} at the first diverging step is exactly alpha * x_T passed through one DDIM step
    assert rel_l2(on[-1][2], off[-1][2]) > 1e-4


def test_noise_injection_defaults_off_for_all_and_on_for_paper(fd_pipe, latents):
    common = dict(num_inference_steps=20, latents=latents, output_type="latent")
    assert torch.equal(
        fd_pipe(PROMPT, schedule="all", **common).images,
        fd_pipe(PROMPT, schedule="all", noise_injection=False, **common).images,
    )
    assert torch.equal(
        fd_pipe(PROMPT, schedule="paper", **common).images,
        fd_pipe(PROMPT, schedule="paper", noise_injection=True, **common).images,
    )


def test_callback_can_replace_the_latents(tiny_sd, fd_pipe, latents):
    """The tensor the callback returns at step k is where step k+1 starts: checked against a plain loop."""
    k, steps = 10, 20
    z = torch.randn(latents.shape, generator=_gen(99))
    seen = {}

    def replace_at_k(pipe, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {"latents": z.clone()} if i == k else {}

    out = fd_pipe(
        PROMPT,
        num_inference_steps=steps,
        latents=latents,
        output_type="latent",
        schedule="all",
        callback_on_step_end=replace_at_k,
    )
    # independent: diffusers' UNet and a fresh DDIM scheduler run steps k+1 .. end from z
    sched = make_scheduler("ddim", tiny_sd.scheduler.config)
    sched.set_timesteps(steps)
    pos, neg = tiny_sd.encode_prompt(PROMPT, "cpu", 1, True)
    text = torch.cat([neg, pos])
    x = z.clone()
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps):
            if j <= k:
                continue
            eps_u, eps_c = tiny_sd.unet(torch.cat([x, x]), t, text).sample.chunk(2)
            x = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
            if j == k + 1:
                assert rel_l2(seen[j], x) < 1e-5  # the first step after k already started from z
    assert rel_l2(out.images, x) < 1e-5
    assert not torch.equal(seen[k], z)  # the callback saw the run's own latents, not z


def test_output_types(tiny_sd, fd_pipe, latents):
    pil = fd_pipe(PROMPT, num_inference_steps=4, latents=latents, output_type="pil")
    arr = fd_pipe(PROMPT, num_inference_steps=4, latents=latents, output_type="np")
    lat = fd_pipe(PROMPT, num_inference_steps=4, latents=latents, output_type="latent")
    assert isinstance(pil.images, list) and isinstance(pil.images[0], PIL.Image.Image)
    assert pil.images[0].size == (64, 64)
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (1, 64, 64, 3)
    assert np.array_equal(np.asarray(pil.images[0]), (arr.images[0] * 255).round().astype(np.uint8))
    # latent: the final latents, against diffusers' own pipeline (4 steps: every `paper` step is a key step)
    ref = tiny_sd(PROMPT, num_inference_steps=4, latents=latents, output_type="latent").images
    assert rel_l2(lat.images, ref) < 1e-5
    # np: the VAE decode of those latents, decoded and denormalized here without the pipeline's helpers
    with torch.no_grad():
        img = tiny_sd.vae.decode(ref / tiny_sd.vae.config.scaling_factor).sample
    expected = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(arr.images - expected).max() < 1e-4


def test_gflops_are_counted_from_the_split_modules(fd_pipe, tiny_sd, latents):
    common = dict(num_inference_steps=50, latents=latents, output_type="latent")
    full = fd_pipe(PROMPT, schedule="all", **common).stats
    paper = fd_pipe(PROMPT, schedule="paper", **common).stats
    # reference: one whole UNet forward over the CFG batch, counted on diffusers' module (with the CPU
    # attention formula; tests/test_bench.py checks that counter against a hand count)
    from fd_trt.utils.flops import flop_counter_mode

    x = torch.zeros(2, 4, 8, 8)
    text = torch.zeros(2, tiny_sd.tokenizer.model_max_length, 32)
    with torch.no_grad(), flop_counter_mode() as fc:
        tiny_sd.unet(x, torch.tensor([500.0, 500.0]), text)
    unet_step = fc.get_total_flops() / 1e9
    assert full.unet_gflops == pytest.approx(50 * unet_step, rel=5e-3)
    assert 0.15 < 1 - paper.unet_gflops / full.unet_gflops < 0.45


def test_flops_counted_on_fake_tensors_equal_a_real_count(tiny_sd):
    """The per-row count runs the split modules on fake tensors (no arithmetic); it must give the
    count of a real call, for SD and for SDXL's added inputs."""
    from fd_trt.families.models import tiny_sdxl_pipeline
    from fd_trt.graphs.split import split_unet
    from fd_trt.pipelines.pipeline import _count_split_flops

    xl = tiny_sdxl_pipeline(seed=0)
    cases = [
        (tiny_sd.unet, 32, None),
        (
            xl.unet,
            xl.unet.config.cross_attention_dim,
            {"text_embeds": torch.zeros(1, xl.text_encoder_2.config.projection_dim), "time_ids": torch.zeros(1, 6)},
        ),
    ]
    for unet, width, added in cases:
        args = (split_unet(unet), torch.zeros(1, 4, 8, 8), torch.full((1,), 500.0), torch.zeros(1, 77, width), added)
        fake, real = _count_split_flops(*args, fake=True), _count_split_flops(*args, fake=False)
        assert fake == real and min(real) > 0


def test_nan_latents_warn(tiny_sd, latents):
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    sd = tiny_sd_pipeline(seed=0)
    with torch.no_grad():
        sd.unet.conv_out.bias.fill_(float("nan"))
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = pipe(PROMPT, num_inference_steps=3, latents=latents, output_type="latent")
    assert out.stats.nonfinite


def test_bf16_torch_runner_stays_close_to_fp32(tiny_sd, fd_pipe, latents):
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    pipe16 = FasterDiffusionPipeline.from_diffusers(
        tiny_sd_pipeline(seed=0), backend="torch", precision="bf16", progress=False
    )
    common = dict(num_inference_steps=20, latents=latents, output_type="latent", schedule="paper")
    assert rel_l2(pipe16(PROMPT, **common).images, fd_pipe(PROMPT, **common).images) < 5e-2


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(height=60), InputError, "height=60 is not divisible by the VAE factor 8"),
        (dict(width=-8), InputError, "width must be a positive integer"),
        (dict(num_inference_steps=-5), InputError, "num_inference_steps must be a positive integer, got -5"),
        (dict(num_inference_steps=0), InputError, "got 0"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), InputError, "1 negative prompts for 2 prompts"),
        (dict(prompt=[]), InputError, "non-empty list"),
        (dict(schedule="1,2,3"), ScheduleError, "no step 0"),
        (dict(schedule="0,5,50"), ScheduleError, r"\[50\] are out of range for 50 steps"),
        (dict(output_type="jpg"), InputError, "output_type"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), InputError, "latents have shape"),
    ],
)
def test_bad_input_gets_a_clear_error(fd_pipe, kwargs, error, fragment):
    args = dict(prompt=PROMPT, num_inference_steps=50, output_type="latent")
    args.update(kwargs)
    with pytest.raises(error, match=fragment):
        fd_pipe(**args)


def test_unsupported_scheduler_is_rejected(fd_pipe):
    with pytest.raises(InputError, match="unsupported scheduler 'lms'"):
        fd_pipe.set_scheduler("lms")
    with pytest.raises(FdTrtError):
        make_scheduler("heun")


def test_from_pretrained_rejects_a_missing_folder(tmp_path):
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    with pytest.raises(InputError, match="never downloads"):
        FasterDiffusionPipeline.from_pretrained(str(tmp_path / "nope"))


def test_from_pretrained_loads_a_saved_diffusers_folder_with_safetensors(tiny_sd, fd_pipe, tmp_path, latents):
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    tiny_sd.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert not list((tmp_path / "m").rglob("*.bin"))
    pipe = FasterDiffusionPipeline.from_pretrained(tmp_path / "m", backend="torch", progress=False)
    common = dict(num_inference_steps=10, latents=latents, output_type="latent")
    assert rel_l2(pipe(PROMPT, **common).images, fd_pipe(PROMPT, **common).images) < 1e-6


def test_converted_copy_matches_deepcopy_then_to_and_leaves_the_original_alone():
    from fd_trt.backends.torch import converted_copy

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    net[2].weight = net[0].weight  # tied weights stay tied in the copy
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = copy.deepcopy(net).to(dtype=torch.bfloat16)
    got = converted_copy(net, "cpu", torch.bfloat16)
    assert got[2].weight is got[0].weight and got[0].weight is not net[0].weight
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert got[1].num_batches_tracked.dtype == torch.long  # integer buffers keep their dtype
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in net.state_dict().items())
    x = torch.randn(3, 4)
    assert torch.equal(got.eval()(x.bfloat16()), ref.eval()(x.bfloat16()))


def test_converted_copy_of_a_diffusers_unet_is_bf16_and_logs_no_fp32_module_warning(tiny_sd):
    """diffusers' ``ModelMixin.to(dtype)`` warns about fp32 modules even when a UNet lists none;
    the bf16 copy (the bf16 hint of ``fd-trt generate`` makes one) must not print that."""
    import logging

    from fd_trt.backends.torch import converted_copy

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    root = logging.getLogger("diffusers")  # diffusers' library logger does not propagate to the root
    root.addHandler(handler)
    try:
        got = converted_copy(tiny_sd.unet, "cpu", torch.bfloat16)
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16} and got.dtype == torch.bfloat16
    assert {p.dtype for p in tiny_sd.unet.parameters()} == {torch.float32}
