"""SD3 (``StableDiffusion3Pipeline``, flow matching): schedule="all" equals diffusers' own pipeline
on torch and onnxruntime; a key-step schedule equals an independent loop (front joint blocks at key
steps through a forward hook, rear blocks per step, prior noise injection by the flow-space rule
written out by hand); the graphs, the manifest and the family's dispatch."""

import json

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.core.sampler import model_input_scale
from fd_trt.errors import EngineMismatchError, InputError, UnsupportedModelError
from fd_trt.families.dit_models import tiny_sd3_pipeline
from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline

PROMPTS = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline(seed=0)


def _rel(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_sd3_all_equals_diffusers(sd3, guidance):
    kw = dict(num_inference_steps=8, guidance_scale=guidance, max_sequence_length=16)
    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)
    assert isinstance(fd, FasterDiffusionTransformerPipeline) and fd.family.name == "sd3"
    assert fd.split_point == 3  # 0.75 of 4 joint blocks
    ref = sd3(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    out = fd(PROMPTS, generator=torch.Generator().manual_seed(0), schedule="all", output_type="np", **kw)
    assert out.images.shape == ref.shape == (2, 64, 64, 3)
    assert abs(out.images - ref).max() <= 1e-5
    assert out.stats.encoder_calls == 8 and out.stats.decoder_calls == 8
    ref_l = sd3(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    out_l = fd(PROMPTS, generator=torch.Generator().manual_seed(0), schedule="all", output_type="latent", **kw)
    assert _rel(out_l.latents, ref_l) <= 1e-5
    # Propagation changes the result (the test above could not pass by ignoring the schedule).
    paper = fd(PROMPTS, generator=torch.Generator().manual_seed(0), schedule="paper", output_type="latent", **kw)
    assert paper.stats.key_steps == [0, 1, 2, 3, 5] and _rel(paper.latents, ref_l) > 1e-3


def test_sd3_heun_all_equals_diffusers():
    """FlowMatchHeunDiscreteScheduler (two model calls per step) as diffusers' SD3 pipeline runs it."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = tiny_sd3_pipeline(seed=2)
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=4, guidance_scale=7.0, max_sequence_length=16, output_type="latent")
    ref = pipe("red circle", generator=torch.Generator().manual_seed(0), **kw).images
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    out = fd("red circle", generator=torch.Generator().manual_seed(0), schedule="all", **kw)
    assert out.stats.num_steps == 7 and _rel(out.latents, ref) <= 1e-5
    paper = fd("red circle", generator=torch.Generator().manual_seed(0), schedule="paper", **kw)
    assert paper.stats.encoder_calls < 7 and torch.isfinite(paper.latents).all()


def test_sd3_non_square_and_negative_prompt_equal_diffusers(sd3):
    kw = dict(
        num_inference_steps=5, guidance_scale=5.0, max_sequence_length=16, height=48, width=80, output_type="latent"
    )
    ref = sd3("green", negative_prompt="red", generator=torch.Generator().manual_seed(1), **kw).images
    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)
    out = fd("green", negative_prompt="red", generator=torch.Generator().manual_seed(1), schedule="all", **kw)
    assert out.latents.shape == ref.shape == (1, 4, 6, 10)
    assert _rel(out.latents, ref) <= 1e-5


def test_flow_matching_noise_injection_scale():
    """c_t of flow matching by hand: x_t = (1 - s) x0 + s eps is the VP latent times sqrt((1 - s)^2 + s^2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    for t in sched.timesteps:
        s = float(t) / 1000.0
        assert abs(model_input_scale(sched, t) - 1.0 / ((1 - s) ** 2 + s**2) ** 0.5) <= 1e-9
    assert abs(model_input_scale(sched, torch.tensor(500.0)) - 2**0.5) <= 1e-9  # sigma 1/2: n = 1/sqrt(2)
    assert abs(model_input_scale(sched, torch.tensor(1000.0)) - 1.0) <= 1e-9  # pure noise: VP already


def _independent_loop(pipe, prompts, guidance, split, key_steps, steps, latents, alpha=0.003, max_len=16):
    """Flow-matching Euler with SD3 where joint blocks 0..split-1 run only at key steps: a forward
    hook on block split-1 replaces both its token streams by the key step's. Prior noise injection
    adds alpha * sqrt((1 - s)^2 + s^2) * noise (s = t / 1000) for t < 500, before the step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = pipe.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cfg = guidance > 1
    pe, ne, pp, npool = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg, max_sequence_length=max_len
    )
    text, pooled = (torch.cat([ne, pe]), torch.cat([npool, pp])) if cfg else (pe, pp)
    cache = {}

    def hook(module, inputs, output):
        if cache.get("reuse"):
            return cache["streams"]
        cache["streams"] = output
        return output

    handle = tr.transformer_blocks[split - 1].register_forward_hook(hook)
    x, noise = latents.clone(), latents.clone()
    try:
        for i, t in enumerate(sched.timesteps):
            cache["reuse"] = i not in key_steps
            x_in = torch.cat([x, x]) if cfg else x
            with torch.no_grad():
                out = tr(
                    x_in, encoder_hidden_states=text, pooled_projections=pooled, timestep=t.expand(x_in.shape[0])
                ).sample
            if cfg:
                u, c = out.chunk(2)
                out = u + guidance * (c - u)
            if t < 500:
                s = float(t) / 1000.0
                x = x + alpha * ((1 - s) ** 2 + s**2) ** 0.5 * noise
            x = sched.step(out, t, x).prev_sample
    finally:
        handle.remove()
    return x


@pytest.mark.parametrize(("guidance", "schedule"), [(7.0, "paper"), (1.0, "uniform:3")])
def test_sd3_key_steps_equal_independent_loop(sd3, guidance, schedule):
    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=10, guidance_scale=guidance, latents=latents, output_type="latent")
    out = fd(PROMPTS, schedule=schedule, max_sequence_length=16, **kw)
    keys = out.stats.key_steps
    assert keys == ([0, 1, 2, 3, 5] if schedule == "paper" else [0, 3, 6, 9])  # noqa: SIM300
    assert out.stats.decoder_calls == len(keys)  # one batched decoder call per segment
    ref = _independent_loop(sd3, PROMPTS, guidance, fd.split_point, keys, 10, latents)
    assert _rel(out.latents, ref) <= 1e-5
    # Injection on: without it the loop differs (the rule is exercised, not skipped).
    off = fd(PROMPTS, schedule=schedule, max_sequence_length=16, noise_injection=False, **kw)
    assert _rel(off.latents, ref) > 1e-4
    ref_off = _independent_loop(sd3, PROMPTS, guidance, fd.split_point, keys, 10, latents, alpha=0.0)
    assert _rel(off.latents, ref_off) <= 1e-5


def test_sd3_onnxruntime_equals_diffusers_and_torch(sd3, tmp_path):
    pytest.importorskip("onnxruntime")
    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="onnxruntime", progress=False, engines=tmp_path / "e")
    for guidance in (7.0, 1.0):
        kw = dict(num_inference_steps=6, guidance_scale=guidance, max_sequence_length=16, output_type="latent")
        ref = sd3(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
        out = fd(PROMPTS, generator=torch.Generator().manual_seed(0), schedule="all", **kw)
        assert out.stats.backend == "onnxruntime"
        assert _rel(out.latents, ref) <= 1e-4
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["family"] == "sd3" and manifest["split"] == fd.split_point == 3
    assert manifest["cond_names"] == ["encoder_hidden_states", "pooled_projections"]
    assert manifest["text_shape"] == [32, 32]  # 16 CLIP + 16 T5 tokens, joint width 32
    # A propagating schedule: the batched decoder graph (both streams) equals torch.
    kw = dict(num_inference_steps=6, guidance_scale=7.0, max_sequence_length=16, output_type="latent")
    ref_t = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)(
        PROMPTS, generator=torch.Generator().manual_seed(0), schedule=[0, 2, 3], **kw
    )
    out_o = fd(PROMPTS, generator=torch.Generator().manual_seed(0), schedule=[0, 2, 3], **kw)
    assert out_o.stats.decoder_calls == 3
    assert _rel(out_o.latents, ref_t.latents) <= 1e-4
    # Another N into the same folder is refused, not run wrongly.
    with pytest.raises(EngineMismatchError, match="rebuild"):
        fd(PROMPTS, split=1, **kw)


def test_sd3_graph_contract_and_dynamic_rows(sd3, tmp_path):
    import onnxruntime as ort

    from fd_trt.graphs.contract_dit import transformer_graphs
    from fd_trt.graphs.export_dit import export_transformer
    from fd_trt.graphs.split_dit import split_transformer

    tr = sd3.transformer
    split = split_transformer(tr, 2)
    enc, dec = transformer_graphs(split, (8, 8), 2, 16, (32, 32))
    assert enc.input_names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    assert enc.output_names == ["tokens", "context"]
    assert dec.input_names[:3] == ["tokens", "context", "timestep"]
    assert dec.tensor("context").tail == (32, 16) and not dec.tensor("context").step_rowed
    m = export_transformer(tmp_path, "sd3", tr, split, (8, 8), (32, 32))
    sess = {
        k: ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
        for k, f in (("enc", m.encoder), ("dec", m.decoder))
    }
    g = torch.Generator().manual_seed(0)
    for rows, steps in ((1, 1), (3, 4)):
        x = torch.randn(rows, 4, 8, 8, generator=g)
        text, pooled = torch.randn(rows, 32, 32, generator=g), torch.randn(rows, 64, generator=g)
        t0 = torch.full((rows,), 700.0)
        wanted = {i.name for i in sess["enc"].get_inputs()}
        feed = dict(sample=x, timestep=t0, encoder_hidden_states=text, pooled_projections=pooled)
        tokens, context = sess["enc"].run(None, {k: v.numpy() for k, v in feed.items() if k in wanted})
        ts = torch.linspace(900, 100, steps).repeat_interleave(rows)
        wanted = {i.name for i in sess["dec"].get_inputs()}
        feed = dict(
            tokens=torch.from_numpy(tokens), context=torch.from_numpy(context), timestep=ts,
            encoder_hidden_states=text, pooled_projections=pooled,
        )  # fmt: skip
        out = sess["dec"].run(None, {k: v.numpy() for k, v in feed.items() if k in wanted})[0]
        assert out.shape == (rows * steps, 4, 8, 8)
        with torch.no_grad():
            tok, ctx = torch.from_numpy(tokens), torch.from_numpy(context)
            full = tr(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t0).sample
            assert abs(split.decoder(tok, ctx, t0, pooled) - full).max().item() <= 1e-4
            for j in range(steps):  # each step's rows: the rear blocks on the key step's two streams
                ref = split.decoder(tok, ctx, ts[j * rows : (j + 1) * rows], pooled)
                assert abs(out[j * rows : (j + 1) * rows] - ref.numpy()).max() <= 1e-4


def test_sd3_tensorrt_stand_in_profiles(sd3, tmp_path, monkeypatch):
    from fd_trt.backends.tensorrt_build import RowProfile
    from fd_trt.backends.tensorrt_dit import build_transformer_plans
    from fd_trt.graphs.export_dit import export_transformer
    from fd_trt.graphs.split_dit import split_transformer

    import fake_tensorrt

    trt = fake_tensorrt.install(monkeypatch)
    tr = sd3.transformer
    split = split_transformer(tr, 2)
    m = export_transformer(tmp_path, "sd3", tr, split, (8, 8), (32, 32))
    plans = build_transformer_plans(tmp_path, m, split, 2, 16, RowProfile(1, 2, 4), steps=5, opt_steps=3)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plans["decoder"].read_bytes())
    lo, opt, hi = engine.get_tensor_profile_shape("timestep", 0)
    assert (lo[0], opt[0], hi[0]) == (1, 6, 20)
    lo, opt, hi = engine.get_tensor_profile_shape("context", 0)
    assert (lo[0], opt[0], hi[0]) == (1, 2, 4) and tuple(hi)[1:] == (32, 16)
    enc = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plans["encoder"].read_bytes())
    lo, opt, hi = enc.get_tensor_profile_shape("pooled_projections", 0)
    assert tuple(hi) == (4, 64)


def test_sd3_auto_picks_a_backend(sd3, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path))
    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="auto", progress=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=6, latents=latents, output_type="latent", schedule=[0, 3], max_sequence_length=16)
    out = fd("red circle", **kw)
    assert out.stats.backend in ("torch", "onnxruntime") and len(fd._auto_choice) == 1
    ref = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)("red circle", **kw)
    assert _rel(out.latents, ref.latents) <= 1e-4


def test_sd3_from_pretrained_and_refusals(sd3, tmp_path):
    from fd_trt.families import family_for_config, get_family

    sd3.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    fd = FasterDiffusionPipeline.from_pretrained(tmp_path / "sd3", backend="torch", progress=False)
    assert isinstance(fd, FasterDiffusionTransformerPipeline) and fd.family.name == "sd3"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, latents=latents, output_type="latent", max_sequence_length=16)
    a = fd("red circle", **kw).latents
    b = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)("red circle", **kw).latents
    assert _rel(a, b) <= 1e-5  # the reloaded weights, float32 rounding
    assert family_for_config({"_class_name": "SD3Transformer2DModel"}) is get_family("sd3")
    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel is a diffusion-transformer"):
        family_for_config({"_class_name": "FluxTransformer2DModel"}).check_config(
            {"_class_name": "FluxTransformer2DModel"}
        )
    with pytest.raises(InputError, match="class_labels is DiT's argument"):
        fd(class_labels=[1], **kw)
    with pytest.raises(InputError, match="unknown SD3 options"):
        fd("red circle", clean_caption=True, **kw)


def test_sd3_calibration_records_split_and_reproduces_its_error(sd3):
    from fd_trt.tools.calibrate_dit import calibrate_transformer

    fd = FasterDiffusionPipeline.from_diffusers(sd3, backend="torch", progress=False)
    cal = calibrate_transformer(
        fd, ["red circle"], steps=6, splits=[1, 3], schedules=[[0, 3], [0, 2, 4]], tolerance=0.5,
        max_sequence_length=16,
    )  # fmt: skip
    assert cal.split in (1, 3) and cal.guidance == 7.0 and len(cal.history) == 4
    assert cal.scheduler == "flow-euler"
    kw = dict(num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="latent")
    a = fd("red circle", schedule=cal, max_sequence_length=16, **kw)
    assert a.stats.key_steps == cal.key_steps
    kw["generator"] = torch.Generator().manual_seed(0)
    ref = fd("red circle", schedule="all", max_sequence_length=16, **kw)
    err = float((a.latents - ref.latents).norm() / ref.latents.norm())
    assert abs(err - cal.error) <= 1e-5 and err > 0
