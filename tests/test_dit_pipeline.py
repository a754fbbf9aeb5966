"""DiT and PixArt pipelines: schedule="all" equals diffusers' own pipelines; "paper" equals an
independent loop (front blocks at key steps through a forward hook, rear blocks per step); the
transformer pipelines fd_trt does not run are refused clearly."""

import importlib.util

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.errors import BackendUnavailableError, InputError, UnsupportedModelError
from fd_trt.families.dit_models import tiny_dit_pipeline, tiny_pixart_pipeline
from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline


@pytest.fixture(scope="module")
def dit():
    return tiny_dit_pipeline(seed=0)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline(seed=0)


@pytest.mark.parametrize("learned_sigma", [True, False])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_dit_all_equals_diffusers(learned_sigma, guidance):
    pipe = tiny_dit_pipeline(seed=1, learned_sigma=learned_sigma)
    kw = dict(num_inference_steps=8, guidance_scale=guidance, output_type="np")
    ref = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0), **kw).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    assert isinstance(fd, FasterDiffusionTransformerPipeline)
    out = fd(class_labels=[3, 7], generator=torch.Generator().manual_seed(0), schedule="all", **kw)
    assert abs(out.images - ref).max() <= 1e-5
    assert out.stats.encoder_calls == 8 and out.stats.decoder_calls == 8


@pytest.mark.parametrize("sigma", [False, True])
@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_pixart_all_equals_diffusers(sigma, guidance):
    pipe = tiny_pixart_pipeline(seed=2, sigma=sigma)
    prompts = ["red circle", "blue square"]
    kw = dict(num_inference_steps=8, guidance_scale=guidance, output_type="latent", max_sequence_length=16)
    ref = pipe(
        prompts, generator=torch.Generator().manual_seed(0), use_resolution_binning=False, clean_caption=False, **kw
    ).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    out = fd(prompts, generator=torch.Generator().manual_seed(0), schedule="all", **kw)
    scale = ref.abs().max().item()
    assert (out.images - ref).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert out.stats.backend == "torch"


def _independent_paper_loop(pipe, labels, guidance, split, key_steps, steps, latents, alpha=0.003):
    """DDIM with DiT where blocks 0..split-1 run only at key steps: a forward hook on block split-1
    replaces its output by the key step's (the tiled rows of the full transformer call)."""
    tr, sched = pipe.transformer, pipe.scheduler
    sched = type(sched).from_config(sched.config)
    sched.set_timesteps(steps)
    null = torch.full_like(labels, 1000)
    rows_labels = torch.cat([null, labels]) if guidance > 1 else labels
    cache = {}

    def hook(module, inputs, output):
        if cache.get("reuse"):
            return cache["tokens"]
        cache["tokens"] = output
        return output

    handle = tr.transformer_blocks[split - 1].register_forward_hook(hook)
    x, eps_t, c = latents.clone(), latents.clone(), int(tr.config.in_channels)
    try:
        for i, t in enumerate(sched.timesteps):
            cache["reuse"] = i not in key_steps
            x_in = torch.cat([x, x]) if guidance > 1 else x
            with torch.no_grad():
                out = tr(x_in, timestep=t.expand(x_in.shape[0]).float(), class_labels=rows_labels).sample[:, :c]
            if guidance > 1:
                u, cnd = out.chunk(2)
                out = u + guidance * (cnd - u)
            if t < 500:  # prior noise injection (DDIM: variance-preserving latents)
                x = x + alpha * eps_t
            x = sched.step(out, t, x).prev_sample
    finally:
        handle.remove()
    return x


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_dit_paper_ddim50_equals_independent_loop(dit, guidance):
    fd = FasterDiffusionPipeline.from_diffusers(dit, backend="torch", progress=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = fd(
        class_labels=[3, 7], num_inference_steps=50, guidance_scale=guidance, latents=latents, output_type="latent"
    )
    assert out.stats.encoder_calls == 9 and out.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert out.stats.decoder_calls == 9  # one batched decoder call per segment
    ref = _independent_paper_loop(dit, torch.tensor([3, 7]), guidance, fd.split_point, out.stats.key_steps, 50, latents)
    # The random model's latents grow to a few hundred: 1e-5 of their scale (float32 rounding).
    assert (out.latents - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_split_point_per_call_and_refusals(dit):
    fd = FasterDiffusionPipeline.from_diffusers(dit, backend="torch", progress=False, split=1)
    assert fd.split_point == 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=6, latents=latents, output_type="latent")
    a = fd(class_labels=[1], schedule="all", split=3, **kw).latents
    b = fd(class_labels=[1], schedule="all", split=0, **kw).latents
    assert (a - b).abs().max().item() <= 1e-5  # every step a key step: N does not matter
    with pytest.raises(InputError, match="outside 0..4"):
        fd(class_labels=[1], split=9, **kw)
    with pytest.raises(InputError, match="outside 0..999"):
        fd(class_labels=[1000], **kw)
    with pytest.raises(InputError, match="negative_prompt"):
        fd(class_labels=[1], negative_prompt="x", **kw)


def test_pixart_paper_runs_and_propagates(pixart):
    fd = FasterDiffusionPipeline.from_diffusers(pixart, backend="torch", progress=False)
    assert fd.split_point == 3  # 0.75 of 4 blocks
    out = fd("red circle", num_inference_steps=20, schedule="paper", output_type="latent", max_sequence_length=16)
    assert out.stats.encoder_calls == 7 and out.stats.decoder_calls == 7
    assert torch.isfinite(out.latents).all()


def _sd3_like(cls_name):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tr = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    return getattr(diffusers, cls_name)(
        transformer=tr,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def test_unsupported_transformer_pipelines_are_refused_clearly():
    """SD3's img2img pipeline (the SD3 family runs text-to-image only) is refused with the supported list."""
    sd3 = _sd3_like("StableDiffusion3Img2ImgPipeline")
    with pytest.raises(UnsupportedModelError, match="StableDiffusion3Img2ImgPipeline is a diffusion-transformer") as e:
        FasterDiffusionPipeline.from_diffusers(sd3, backend="torch")
    assert "StableDiffusion3Pipeline" in str(e.value)


def test_from_pretrained_of_a_dit_folder(dit, tmp_path):
    dit.save_pretrained(tmp_path / "dit", safe_serialization=True)
    fd = FasterDiffusionPipeline.from_pretrained(tmp_path / "dit", backend="torch", progress=False)
    assert isinstance(fd, FasterDiffusionTransformerPipeline) and fd.family.name == "dit"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = fd(class_labels=[2], num_inference_steps=4, latents=latents, output_type="latent").latents
    b = FasterDiffusionPipeline.from_diffusers(dit, backend="torch", progress=False)(
        class_labels=[2], num_inference_steps=4, latents=latents, output_type="latent"
    ).latents
    assert (a - b).abs().max().item() <= 1e-6


def test_calibration_searches_split_and_key_steps(dit, tmp_path):
    from fd_trt.core.calibration import Calibration
    from fd_trt.errors import ScheduleError
    from fd_trt.tools.calibrate_dit import block_evaluations, calibrate_transformer, candidate_schedules

    fd = FasterDiffusionPipeline.from_diffusers(dit, backend="torch", progress=False)
    cal = calibrate_transformer(fd, [3], steps=10, splits=[1, 3], tolerance=0.5)
    assert cal.split in (1, 3) and cal.steps == 10 and len(cal.history) == 2 * len(candidate_schedules(10))
    chosen = [h for h in cal.history if h["split"] == cal.split and h["key_steps"] == cal.key_steps][0]
    accepted = [h for h in cal.history if h["error"] <= 0.5]
    assert chosen["block_evaluations"] == min(h["block_evaluations"] for h in accepted)
    assert chosen["block_evaluations"] == block_evaluations(cal.key_steps, 10, cal.split, 4)
    path = cal.save(tmp_path / "cal.json")
    assert Calibration.load(path).split == cal.split
    g = torch.Generator().manual_seed(0)
    a = fd(class_labels=[3], num_inference_steps=10, generator=g, schedule=str(path), output_type="latent")
    assert a.stats.key_steps == cal.key_steps
    g = torch.Generator().manual_seed(0)
    b = fd(
        class_labels=[3], num_inference_steps=10, generator=g, schedule=cal.key_steps, split=cal.split,
        output_type="latent",
    )  # fmt: skip
    assert torch.equal(a.latents, b.latents)
    ref = fd(class_labels=[3], num_inference_steps=10, generator=torch.Generator().manual_seed(0), schedule="all")
    err = float((a.latents - ref.latents).norm() / ref.latents.norm())
    assert abs(err - cal.error) <= 1e-4
    with pytest.raises(InputError, match="calibration is for N="):
        fd(class_labels=[3], num_inference_steps=10, schedule=cal, split=2 if cal.split != 2 else 1)
    with pytest.raises(ScheduleError, match="steps"):
        fd(class_labels=[3], num_inference_steps=12, schedule=cal)


def test_calibration_candidates():
    """The transformer search's key-step candidates: the paper's steps scaled, uniform 2..5, the
    dense head, and power:K (dense at the start) for K = 3 .. T/2; each valid, starting at 0."""
    from fd_trt.core.schedule import KeySchedule, parse_schedule
    from fd_trt.tools.calibrate_dit import candidate_schedules

    cands = candidate_schedules(20)
    assert len(set(cands)) == len(cands)
    assert [len(c) for c in cands] == sorted(len(c) for c in cands)  # cheapest first
    for c in cands:
        KeySchedule(c, 20)
        assert c[0] == 0
    for every in (2, 3, 4, 5):
        assert tuple(range(0, 20, every)) in cands
    for k in range(3, 11):  # steps // 20 == 1: every K
        assert parse_schedule(f"power:{k}", 20).key_steps in cands
    # power:3 of 20 at P = 1.5: round(20 (i/3)^1.5) for i = 0, 1, 2 -> 0, 4, 11
    assert (0, 4, 11) in cands
    assert all(parse_schedule(f"power:{k}", 50).key_steps in candidate_schedules(50) for k in range(3, 26, 2))


def test_unet_only_features_are_refused_clearly(dit):
    fd = FasterDiffusionPipeline.from_diffusers(dit, backend="torch", progress=False)
    with pytest.raises(InputError, match="load_lora_weights.. is not supported with diffusion transformers"):
        fd.load_lora_weights("x")
    with pytest.raises(InputError, match="prepare.. is not supported"):
        fd.prepare(height=64, width=64)
    assert fd.runner is None and len(fd.unet_sha256) == 64
    with pytest.raises(InputError, match="controlnet not supported"):
        FasterDiffusionPipeline.from_diffusers(dit, backend="torch", controlnet=object())
    with pytest.raises(InputError, match="unknown backend 'coreml'"):
        FasterDiffusionPipeline.from_diffusers(dit, backend="coreml")
    # tensorrt is a transformer backend (tests/test_tensorrt_dit.py); without TensorRT it is refused
    # at construction, naming the install and the other backends.
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendUnavailableError, match=r"pip install '.\[gpu\]'.*backend='onnxruntime'"):
            FasterDiffusionPipeline.from_diffusers(dit, backend="tensorrt")


def test_pixart_bf16_runs_a_copy_close_to_fp32(pixart):
    """precision='bf16' on the torch backend: the runner works on a bf16 copy of the transformer
    (the wrapped pipeline stays fp32) and the latents stay close to fp32's."""
    kw = dict(num_inference_steps=6, output_type="latent", max_sequence_length=16, schedule="paper")
    ref = FasterDiffusionPipeline.from_diffusers(pixart, backend="torch", progress=False)
    assert ref.precision == "fp32" and ref.run_transformer() is pixart.transformer
    a = ref("red circle", generator=torch.Generator().manual_seed(0), **kw).latents
    fd = FasterDiffusionPipeline.from_diffusers(pixart, backend="torch", precision="bf16", progress=False)
    b = fd("red circle", generator=torch.Generator().manual_seed(0), **kw).latents
    assert next(pixart.transformer.parameters()).dtype == torch.float32
    assert next(fd.run_transformer().parameters()).dtype == torch.bfloat16
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    err = float((b - a).norm() / a.norm())
    assert 0 < err < 5e-2  # bf16 rounding: different from fp32, but close


def test_transformer_device_and_precision_refusals(pixart):
    with pytest.raises(InputError, match="precision='fp16' needs backend='torch'"):
        FasterDiffusionPipeline.from_diffusers(pixart, backend="onnxruntime", precision="fp16", progress=False)
    with pytest.raises(InputError, match="precision='int8': choose one of fp32, fp16, bf16"):
        FasterDiffusionPipeline.from_diffusers(pixart, backend="torch", precision="int8", progress=False)
    with pytest.raises(InputError, match="backend 'onnxruntime' runs the transformer on the CPU"):
        FasterDiffusionPipeline.from_diffusers(pixart, backend="onnxruntime", device="cuda", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="torch sees no CUDA GPU"):
            FasterDiffusionPipeline.from_diffusers(pixart, backend="torch", device="cuda", progress=False)
