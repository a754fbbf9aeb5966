"""Schedules that recompute only the decoder's shallow end at some steps (DecoderSchedule).

References: the split's whole decoder, the DeepCache package's own pipeline output, and an
independent loop over diffusers' UNet written here (forwards replaced by recorded outputs).
"""

import copy
import importlib.util

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_split import CONFIGS

from fd_trt.core.features import Features
from fd_trt.core.runner import expand_for_steps
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, SamplerStats, run_sampler
from fd_trt.core.schedule import DecoderSchedule, KeySchedule, NoiseInjection, combined_schedule, parse_schedule
from fd_trt.errors import FdTrtError, ScheduleError
from fd_trt.families.models import random_controlnet, tiny_sd_pipeline
from fd_trt.graphs.split import split_unet, up_layers

from conftest import rel_l2


@pytest.fixture(autouse=True)
def _shallow_reuse_on_tiny_unets(monkeypatch):
    """The tiny UNets here are below the size from which a shallow step keeps the hidden half of its
    first convolutions: turn it on, so that every test below runs it against its reference."""
    import fd_trt.graphs.split as split_module

    monkeypatch.setattr(split_module, "SHALLOW_REUSE_MIN_MACS", 0)


# ---------------------------------------------------------------------------------------------
# The format


def test_deepcache_and_combined_strings():
    s = parse_schedule("deepcache:3", 10)
    assert isinstance(s, DecoderSchedule) and s.key_steps == (0, 3, 6, 9) and s.fresh_input
    assert s.depths == (0, 1, 1, 0, 1, 1, 0, 1, 1, 0) and s.shallow_steps == (1, 2, 4, 5, 7, 8)
    c = parse_schedule("combined:0,4,8|uniform:2|2", 10)
    assert c.key_steps == (0, 4, 8) and c.full_steps == (0, 2, 4, 6, 8) and c.shallow_steps == (1, 3, 5, 7, 9)
    assert set(c.depths) == {0, 2} and not c.fresh_input
    assert parse_schedule(c.spec, 10) == c and parse_schedule(s.spec, 10) == s
    # Special cases: everything recomputed is plain encoder propagation; every step a key step is `all`.
    fd = parse_schedule("combined:paper|all|1", 50)
    assert fd.key_steps == parse_schedule("paper", 50).key_steps and fd.shallow_steps == ()
    assert parse_schedule("combined:all|none|1", 20).key_steps == tuple(range(20))
    assert combined_schedule("uniform:3", None, 1, 10, fresh_input=True) == parse_schedule("deepcache:3", 10)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("deepcache:0", "positive integer interval"),
        ("deepcache:x", "positive integer interval"),
        ("combined:paper|all", "combined:KEYS|FULL|DEPTH"),
        ("combined:paper|all|x", "combined:KEYS|FULL|DEPTH"),
        ("combined:paper|all|1|stale", "combined:KEYS|FULL|DEPTH"),
        ("combined:paper|0,99|1", "out of range"),
        ("combined:1,2|none|1", "no step 0"),
        ("combined:paper|none|2|fresh", "fresh_input"),
    ],
)
def test_bad_decoder_schedules_name_the_fix(spec, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(spec, 50)


def test_noise_injection_is_on_by_default_only_where_a_step_decodes_propagated_features():
    assert parse_schedule("uniform:3", 10).injects_noise and not parse_schedule("all", 10).injects_noise
    assert not parse_schedule("deepcache:3", 10).injects_noise
    assert not parse_schedule("combined:power:4|none|1|fresh", 10).injects_noise
    # fresh shallow steps, but whole-decoder steps 2 and 6 read the key steps' propagated features
    assert parse_schedule("combined:0,4,8|2,6|1|fresh", 10).injects_noise
    assert parse_schedule("combined:0,4,8|none|1", 10).injects_noise  # shallow steps read propagated skips


def test_a_key_step_runs_the_whole_decoder():
    with pytest.raises(ScheduleError, match="key step"):
        DecoderSchedule((0, 2), 4, (0, 1, 1, 0))
    with pytest.raises(ScheduleError, match="one depth per step"):
        DecoderSchedule((0, 2), 4, (0, 1, 0))


# ---------------------------------------------------------------------------------------------
# The split: capture + shallow end == the whole decoder


@pytest.mark.parametrize("name", ["sd_like_2_levels", "3_levels_linear_proj_per_block_heads", "sd2_style_4_levels"])
@pytest.mark.parametrize("hw", [(16, 16), (24, 20)])
def test_shallow_end_from_captured_hidden_equals_the_decoder(name, hw):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS[name]).eval()
    split = split_unet(unet)
    x, t = torch.randn(2, 4, *hw), torch.tensor([700.0, 300.0])
    e = torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        feats = split.run_encoder(x, t, e)
        whole = split.run_decoder(feats, t, e)
        n_layers = split.num_up_layers
        assert n_layers == len(up_layers(unet.up_blocks)) == split.num_skips
        depths = tuple(range(1, n_layers + 1))
        noise, hidden = split.run_decoder_capture(feats, t, e, None, depths)
        assert torch.equal(noise, whole)  # the layer-by-layer decoder is the decoder
        for d in depths:
            # the first layer's hidden half is convolved apart from the skip half: another order of one sum
            shallow = split.run_decoder_shallow(hidden[d], feats.skips[:d], t, e)
            assert rel_l2(shallow, whole) < 1e-6, d
        assert torch.equal(hidden[n_layers], feats.mid)


def test_shallow_end_with_freeu_equals_the_decoder_and_the_unet():
    """FreeU scales an up layer's input in place in diffusers: a captured hidden state must stay the
    one that entered the layer, so that the shallow end scales it once."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    split = split_unet(unet)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 300.0])
    e = torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        feats = split.run_encoder(x, t, e)
        mid = feats.mid.clone()
        whole = split.run_decoder(feats, t, e)
        assert torch.equal(feats.mid, mid)  # the propagated features stay as the encoder left them
        assert rel_l2(whole, unet(x, t, encoder_hidden_states=e).sample) < 1e-5
        depths = tuple(range(1, split.num_up_layers + 1))
        noise, hidden = split.run_decoder_capture(feats, t, e, None, depths)
        assert torch.equal(noise, whole)
        for d in depths:
            assert rel_l2(split.run_decoder_shallow(hidden[d], feats.skips[:d], t, e), whole) < 1e-6, d
        unet.disable_freeu()
        assert rel_l2(split.run_decoder(feats, t, e), whole) > 1e-3  # FreeU was not a no-op


def test_shallow_end_applies_ifs_pooled_text_and_projection():
    # IF's UNet adds the pooled prompt to the time embedding and projects the prompt
    # (encoder_hid_proj), both computed once (TextConditioning): the shallow end must take both,
    # as the whole decoder does.
    from fd_trt.families.deepfloyd_if import tiny_if_pipeline
    from fd_trt.graphs.split import if_text_conditioning

    unet = tiny_if_pipeline(seed=0).unet.eval()
    assert unet.config.addition_embed_type == "text" and unet.encoder_hid_proj is not None
    split = split_unet(unet)
    torch.manual_seed(1)
    x, t = torch.randn(2, unet.config.in_channels, 16, 16), torch.tensor([700.0, 300.0])
    raw = torch.randn(2, 7, unet.config.encoder_hid_dim)
    e, pooled = if_text_conditioning(unet, raw)
    added = {"text_pooled": pooled}
    with torch.no_grad():
        feats = split.run_encoder(x, t, e, added)
        whole = split.run_decoder(feats, t, e, added)
        reference = unet(x, t, encoder_hidden_states=raw).sample
        depths = tuple(range(1, split.num_up_layers + 1))
        noise, hidden = split.run_decoder_capture(feats, t, e, added, depths)
        assert torch.equal(noise, whole)
        assert rel_l2(whole, reference) < 1e-5
        for d in depths:
            assert rel_l2(split.run_decoder_shallow(hidden[d], feats.skips[:d], t, e, added), whole) < 1e-6, d


def test_shallow_steps_reuse_the_hidden_half_of_the_first_layer_exactly(monkeypatch):
    """Consecutive shallow steps from one captured hidden state, each with its own skip (``conv_in``
    of its own latents, the two CFG halves equal): the hidden half of the first layer's convolutions
    is kept from the first step, and every step still equals the whole decoder run on the same
    features with that skip. A hidden state changed in place is convolved again."""
    import contextlib

    import fd_trt.graphs.split as split_module

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    split = split_unet(unet)
    t = torch.tensor([500.0, 500.0])
    e = torch.randn(2, 5, unet.config.cross_attention_dim)
    resnet = unet.up_blocks[-1].resnets[-1]
    with torch.inference_mode():
        x = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
        feats = split.run_encoder(x, t, e)
        _, hs = split.run_decoder_capture(feats, t, e, None, (1,))
        hidden = hs[1]
        for k in range(3):
            xk = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
            skip0 = split.run_input_conv(xk)
            shallow = split.run_decoder_shallow(hidden, (skip0,), t, e)
            ref = split.run_decoder(Features(feats.mid, (skip0, *feats.skips[1:])), t, e)
            assert rel_l2(shallow, ref) < 1e-6, k
            kept = split_module._HIDDEN_PARTS.get(resnet.conv1)
            assert kept is not None and kept[4].shape[0] == 2  # conv1's output over the hidden half, kept
            if k == 0:
                first = kept[4]
            assert kept[4] is first  # ... and reused by the later steps
        hidden.mul_(1.5)  # in place: the kept part no longer holds
        shallow = split.run_decoder_shallow(hidden, (skip0,), t, e)
        assert split_module._HIDDEN_PARTS[resnet.conv1][4] is not first
        monkeypatch.setattr(split_module, "reusing_hidden_part", lambda *a: contextlib.nullcontext())
        plain = split.run_decoder_shallow(hidden, (skip0,), t, e)
        assert rel_l2(shallow, plain) < 1e-6 and rel_l2(plain, ref) > 1e-3
        # below SHALLOW_REUSE_MIN_MACS (this UNet at 16x16 without the fixture) nothing is kept
        monkeypatch.undo()
        split_module._HIDDEN_PARTS.clear()
        assert rel_l2(split.run_decoder_shallow(hidden, (skip0,), t, e), plain) < 1e-6
        assert resnet.conv1 not in split_module._HIDDEN_PARTS


# ---------------------------------------------------------------------------------------------
# Sampler runs against references

STEPS = 12


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text(sd):
    with torch.no_grad():
        pos, neg = sd.encode_prompt("a red square", "cpu", 1, True)
    return torch.cat([neg, pos])


def _latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _fd(sd, text, schedule, noise, control=None, parallel=True, stats=None):
    from fd_trt.backends.torch import TorchRunner

    sched = copy.deepcopy(sd.scheduler)
    sched.set_timesteps(STEPS)
    ks = parse_schedule(schedule, STEPS) if not isinstance(schedule, KeySchedule) else schedule
    with TorchRunner(sd.unet) as runner:
        return run_sampler(
            runner,
            sched,
            _latents(),
            SamplerInputs(text, control=control),
            ks,
            SamplerOptions(noise=NoiseInjection(enabled=noise), parallel=parallel, progress=False),
            stats=stats,
        )


def _independent(sd, text, schedule: DecoderSchedule, noise: bool, control=None):
    """DDIM with CFG over diffusers' UNet, written without fd_trt's split: at a key step the whole
    UNet runs and every module's output is recorded; at other steps the encoder's modules
    (conv_in, down blocks, mid block) return the key step's records, and at a shallow step of
    depth d the up layers before the last d return the records of the last whole-decoder step.
    The ControlNet's residuals of the key step are passed again at every step of its segment."""
    unet = sd.unet
    sched = copy.deepcopy(sd.scheduler)
    sched.set_timesteps(STEPS)
    layers = up_layers(unet.up_blocks)
    n_layers = len(layers)
    encoder_mods = [unet.conv_in, *unet.down_blocks, unet.mid_block]

    def deep_modules(d):
        mods = []
        for i, j in layers[: n_layers - d]:
            block = unet.up_blocks[i]
            mods.append(block.resnets[j])
            if getattr(block, "attentions", None) is not None:
                mods.append(block.attentions[j])
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                mods.extend(block.upsamplers)
        return mods

    every = encoder_mods + deep_modules(0)
    rec: dict[int, object] = {}

    def recorder(m, args, out):
        rec[id(m)] = out

    x = _latents()
    x_t = x.clone()
    enc_rec, deep_rec, residuals = {}, {}, None
    hooks = [m.register_forward_hook(recorder) for m in every]
    try:
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            key = i in schedule.key_steps
            depth = schedule.depths[i]
            patched = []
            if key:
                residuals = None
                if control is not None:
                    residuals = control(i, x_in, t, text)
            else:
                mods = list(encoder_mods)
                if depth and schedule.fresh_input:
                    mods.remove(unet.conv_in)  # DeepCache: conv_in from this step's latents
                for m in mods:
                    m.forward = (lambda v: lambda *a, **k: v)(enc_rec[id(m)])
                    patched.append(m)
            if depth:
                for m in deep_modules(depth):
                    m.forward = (lambda v: lambda *a, **k: v)(deep_rec[id(m)])
                    patched.append(m)
            kwargs = {}
            if residuals is not None:
                kwargs = dict(down_block_additional_residuals=residuals[0], mid_block_additional_residual=residuals[1])
            try:
                with torch.no_grad():
                    eps = unet(x_in, t, encoder_hidden_states=text, **kwargs).sample
            finally:
                for m in patched:
                    del m.forward
            if key:
                enc_rec = {id(m): rec[id(m)] for m in encoder_mods}
            if not depth:
                deep_rec = {id(m): rec[id(m)] for m in deep_modules(0)}
            u, c = eps.chunk(2)
            eps = u + 7.5 * (c - u)
            if noise and t < 500:
                x = x + 0.003 * x_t
            x = sched.step(eps, t, x, return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return x


@pytest.mark.parametrize(
    "spec",
    ["combined:0,4,8|uniform:2|1", "combined:0,3,7|0,1,3,5,7,9|2", "combined:0,5|none|3", "deepcache:3"],
)
@pytest.mark.parametrize("noise", [False, True])
def test_decoder_schedules_equal_an_independent_loop(sd, text, spec, noise):
    sched = parse_schedule(spec, STEPS)
    got = _fd(sd, text, sched, noise)
    want = _independent(sd, text, sched, noise)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, _fd(sd, text, "all", False)) > 1e-4  # the schedule reuses something


def test_mixed_depths_sequential_and_batched_agree(sd, text):
    depths = (0, 1, 2, 3, 0, 2, 1, 0, 0, 3, 3, 1)
    sched = DecoderSchedule((0, 4, 7), STEPS, depths)
    stats = SamplerStats()
    batched = _fd(sd, text, sched, True, stats=stats)
    assert rel_l2(batched, _independent(sd, text, sched, True)) < 1e-5
    assert rel_l2(batched, _fd(sd, text, sched, True, parallel=False)) < 1e-5
    # Whole-decoder steps: 0,4,7,8 in one call per segment; shallow steps: one call per depth and segment.
    assert stats.decoder_calls == 3 and stats.decoder_rows == 2 * 4
    assert stats.shallow_calls == 3 + 2 + 2 and stats.shallow_rows == 2 * 8


def test_recomputing_everything_equals_all_and_plain_propagation(sd, text):
    full = DecoderSchedule(tuple(range(STEPS)), STEPS, (0,) * STEPS)
    assert rel_l2(_fd(sd, text, full, False), _fd(sd, text, "all", False)) == 0
    fd = parse_schedule("combined:0,4,8|all|1", STEPS)
    assert rel_l2(_fd(sd, text, fd, True), _fd(sd, text, [0, 4, 8], True)) == 0


@pytest.mark.parametrize("spec", ["combined:0,4,8|uniform:2|2", "deepcache:3"])
def test_controlnet_residuals_at_the_recomputed_levels(sd, text, spec):
    net = random_controlnet(sd.unet, seed=1, vae_scale_factor=sd.vae_scale_factor).eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)).repeat(2, 1, 1, 1)

    def control(i, x_in, t, e):
        with torch.no_grad():
            down, mid = net(x_in, t, encoder_hidden_states=e, controlnet_cond=image, return_dict=False)
        return list(down), mid

    sched = parse_schedule(spec, STEPS)
    got = _fd(sd, text, sched, True, control=control)
    assert rel_l2(got, _independent(sd, text, sched, True, control=control)) < 1e-5
    assert rel_l2(got, _fd(sd, text, sched, True)) > 1e-3  # the ControlNet changed the result


@pytest.mark.skipif(importlib.util.find_spec("DeepCache") is None, reason="DeepCache not installed")
@pytest.mark.parametrize("interval", [2, 3])
def test_deepcache_schedule_equals_the_deepcache_package(sd, interval):
    """`deepcache:N` through the pipeline against DeepCacheSDHelper (branch 0) on diffusers' pipeline."""
    from DeepCache import DeepCacheSDHelper

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    common = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64, output_type="latent")
    pipe = copy.copy(sd)
    pipe.unet = copy.copy(sd.unet)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        want = pipe("a red square", latents=_latents(), **common).images
    finally:
        helper.disable()
    fd = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    out = fd("a red square", latents=_latents(), schedule=f"deepcache:{interval}", **common)
    assert rel_l2(out.latents, want) < 1e-5  # the default injects no noise, as DeepCache
    injected = fd("a red square", latents=_latents(), schedule=f"deepcache:{interval}", noise_injection=True, **common)
    assert rel_l2(injected.latents, want) > 1e-4
    plain = sd("a red square", latents=_latents(), **common).images
    assert rel_l2(want, plain) > 1e-3


def test_graph_backends_refuse_shallow_steps_clearly(sd, text):
    from fd_trt.core.runner import Runner

    class NoShallow(Runner):
        name = "stand-in"

        def encode(self, sample, timestep, text, added=None):
            return Features(sample, (sample,))

        def decode(self, features, timesteps, text, added=None):
            return expand_for_steps(features, timesteps, text)[0].mid

    with pytest.raises(FdTrtError, match="stand-in runner runs no shallow decoder steps"):
        NoShallow().decode_shallow(torch.zeros(1), (), torch.zeros(1), torch.zeros(1))


@pytest.mark.slow
def test_onnxruntime_runs_decoder_schedules_on_graphs_recorded_in_the_manifest(sd, tmp_path, monkeypatch):
    """The shallow graphs are exported on first use into the engine directory and recorded in its
    manifest; the encoder and decoder graphs (and so directories written before) are left as they were."""
    from fd_trt.graphs.manifest import check_graph_files, load_manifest
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    common = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64, output_type="latent")
    ort = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", progress=False)
    tch = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    ort("a red square", latents=_latents(), schedule="paper", **common)
    (folder,) = list((tmp_path / "cache").iterdir())
    before = load_manifest(folder).graphs
    for spec in ("deepcache:3", "combined:0,4,8|uniform:2|2", "combined:power:4|none|1|fresh"):
        got = ort("a red square", latents=_latents(), schedule=spec, **common)
        want = tch("a red square", latents=_latents(), schedule=spec, **common)
        assert rel_l2(got.latents, want.latents) < 1e-4, spec
        assert got.stats.shallow_calls == want.stats.shallow_calls > 0
    manifest = check_graph_files(folder, full_hash=True)
    assert {"decoder_capture_d1", "shallow_d1", "input_conv", "decoder_capture_d2", "shallow_d2"} <= set(
        manifest.graphs
    )
    assert manifest.graphs["encoder"] == before["encoder"] and manifest.graphs["decoder"] == before["decoder"]
    ort.close()


@pytest.mark.slow
def test_onnxruntime_shallow_graphs_of_a_last_up_block_without_attention(tmp_path, monkeypatch):
    """The default model's last up block has no attention: its depth-1 shallow graph reads no text,
    and must still take the text input its contract names."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    ort = FasterDiffusionPipeline.from_pretrained("default", backend="onnxruntime", progress=False)
    assert getattr(ort.sd.unet.up_blocks[-1], "attentions", None) is None
    tch = FasterDiffusionPipeline.from_pretrained("default", backend="torch", progress=False)
    common = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent")
    for spec in ("deepcache:3", "combined:power:4|none|1|fresh"):
        got = ort("a red square", generator=torch.Generator().manual_seed(0), schedule=spec, **common)
        want = tch("a red square", generator=torch.Generator().manual_seed(0), schedule=spec, **common)
        assert rel_l2(got.latents, want.latents) < 1e-4, spec
        assert got.stats.shallow_calls == want.stats.shallow_calls > 0
    ort.close()


# ---------------------------------------------------------------------------------------------
# Calibration of decoder schedules


def test_decoder_speedup_estimate_by_hand():
    from fd_trt.tools.calibrate import estimate_speedup
    from fd_trt.tools.calibrate_decoder import estimate_decoder_speedup

    costs = {
        "encoder": 4.0,
        "decoder_1": 6.0,
        "decoder_per_step_batched": 2.0,
        "shallow_1_1": 1.0,
        "shallow_1_per_step_batched": 0.5,
        "input_conv": 0.25,
    }
    plain = combined_schedule([0, 5], "all", 1, 10)
    assert estimate_decoder_speedup(costs, plain) == pytest.approx(estimate_speedup(costs, [0, 5], 10))
    # segments [0,5) and [5,10), whole decoder at 0,2,4 / 5,6,8: 2 x (4 + 6 + 2*2) + 2 x (1 + 0.5) shallow calls
    s = combined_schedule([0, 5], "0,2,4,6,8", 1, 10)
    assert estimate_decoder_speedup(costs, s) == pytest.approx(100 / (2 * 14 + 2 * 1.5))
    fresh = combined_schedule([0, 5], "0,2,4,6,8", 1, 10, fresh_input=True)
    assert estimate_decoder_speedup(costs, fresh) == pytest.approx(100 / (2 * 14 + 4 * 1.25))


@pytest.mark.slow
def test_calibration_finds_a_decoder_schedule_and_the_file_runs_it(sd, tmp_path, monkeypatch):
    import fd_trt.tools.calibrate_decoder as calibrate_module
    from fd_trt.core.calibration import Calibration
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.calibrate_decoder import calibrate_decoder, decoder_error

    # The three calibrations rank candidates by the call costs they measure: measured once and
    # reused, so that a busy machine ranks them alike in all three (the search, not the timer, is tested).
    def measured_once(measure):
        kept = []

        def costs(ev):
            if not kept:
                kept.append(measure(ev))
            return kept[0]

        return costs

    for name in ("measure_costs", "measure_shallow_costs"):
        monkeypatch.setattr(calibrate_module, name, measured_once(getattr(calibrate_module, name)))
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    kw = dict(scheduler="ddim", steps=STEPS, prompts=["a red square", "a blue circle"], max_evaluations=4)
    fast = calibrate_decoder(pipe, speedup=1.5, **kw)
    assert fast.depths is not None and fast.estimated_speedup >= 1.5 and fast.method == "decoder-grid"
    assert 0 < fast.error == min(h["error"] for h in fast.history)
    loose = calibrate_decoder(pipe, max_error=10.0, **kw)
    assert len(loose.history) == 1  # the fastest candidate is within any error
    # An error target between: a bisection over the ranked candidates, within the budget.
    mid_error = sorted(h["error"] for h in fast.history)[len(fast.history) // 2] * 1.5
    mid = calibrate_decoder(pipe, max_error=mid_error, **{**kw, "max_evaluations": 6})
    assert mid.error <= mid_error and 1 < len(mid.history) <= 6
    within = [h for h in mid.history if h["error"] <= mid_error]
    assert mid.estimated_speedup == max(h["estimated_speedup"] for h in within)
    # The file records the schedule; the pipeline runs it as saved.
    path = fast.save(tmp_path / "ddim-12.json")
    again = Calibration.load(path)
    assert again.schedule() == fast.schedule() and isinstance(again.schedule(), DecoderSchedule)
    common = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    a = pipe("a red square", latents=_latents(), schedule=str(path), **common)
    b = pipe("a red square", latents=_latents(), schedule=fast.schedule(), **common)
    assert torch.equal(a.latents, b.latents) and a.stats.shallow_calls > 0
    assert callable(decoder_error)


@pytest.mark.slow
def test_decoder_calibration_on_onnxruntime_exports_what_it_measures(sd, tmp_path, monkeypatch):
    """The cost measurement and the error runs export the shallow graphs on first use, one capture
    depth per call, as the pipeline does; the chosen schedule's error is the pipeline's."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.calibrate_decoder import calibrate_decoder

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", progress=False)
    cal = calibrate_decoder(
        pipe, scheduler="ddim", steps=STEPS, prompts=["a red square"], speedup=1.5, max_evaluations=2
    )
    assert {"shallow_1_1", "shallow_2_1", "input_conv"} <= set(cal.costs) and cal.depths is not None
    assert 0 < cal.error < 1 and len(cal.history) == 2
    pipe.close()


def test_added_key_steps_keep_the_depths():
    """A ControlNet guidance window's edges become key steps; the other steps keep their depths."""
    from fd_trt.core.schedule import with_keys

    s = parse_schedule("deepcache:4", 10)
    t = with_keys(s, (0, 3, 4, 8))
    assert isinstance(t, DecoderSchedule) and t.fresh_input
    assert t.depths == (0, 1, 1, 0, 0, 1, 1, 1, 0, 1)
    assert with_keys(parse_schedule("paper", 10), (0, 4)) == KeySchedule((0, 4), 10)


@pytest.mark.slow
def test_calibration_at_another_image_size(sd, tmp_path):
    """``height``/``width``: the evaluator samples at that size, its error of a schedule is the
    pipeline's own rel. L2 against ``all`` at that size, and the calibration records the size."""
    from fd_trt.errors import InputError
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.calibrate import Evaluator
    from fd_trt.tools.calibrate_decoder import calibrate_decoder

    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    pipe.set_scheduler("ddim")
    f = pipe.vae_scale_factor
    native = int(sd.unet.config.sample_size)
    h, w = 2 * native * f, native * f  # twice the height: non-square on purpose
    ev = Evaluator(pipe, "ddim", STEPS, ["a red square"], [4], 7.5, height=h, width=w)
    assert ev.latents.shape == (1, 4, 2 * native, native) and ev.image_size == (h, w)
    schedule = parse_schedule("deepcache:3", STEPS)
    common = dict(num_inference_steps=STEPS, height=h, width=w, guidance_scale=7.5, output_type="latent")
    ref = pipe("a red square", latents=ev.latents.clone(), schedule="all", **common).latents
    out = pipe("a red square", latents=ev.latents.clone(), schedule=schedule, **common).latents
    from fd_trt.tools.calibrate_decoder import decoder_error

    assert decoder_error(ev, schedule) == pytest.approx(rel_l2(out, ref), rel=1e-4, abs=1e-6)
    with pytest.raises(InputError, match=f"height=30 is not divisible by the VAE factor {f}"):
        Evaluator(pipe, "ddim", STEPS, ["a red square"], [4], height=30)
    cal = calibrate_decoder(pipe, scheduler="ddim", steps=STEPS, prompts=["a red square"], speedup=1.5,
                            max_evaluations=1, height=h, width=w)  # fmt: skip
    assert cal.image_size == [h, w]
    from fd_trt.core.calibration import Calibration

    assert Calibration.load(cal.save(tmp_path / "c.json")).image_size == [h, w]
    # without a size the field stays out of the file, as in calibrations written before it existed
    plain = calibrate_decoder(pipe, scheduler="ddim", steps=STEPS, prompts=["a red square"], speedup=1.5,
                              max_evaluations=1)  # fmt: skip
    assert plain.image_size is None and "image_size" not in plain.to_json()
