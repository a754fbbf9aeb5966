import pytest
import torch
from diffusers import UNet2DConditionModel

from fd_trt.core.features import Features
from fd_trt.core.runner import expand_for_steps
from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.graphs.split import check_supported_config, split_unet

from conftest import rel_l2
from tiny_sdxl import SDXL_CONFIGS, added_conditioning, tiny_sdxl_unet

CONFIGS = {
    "sd_like_2_levels": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    "3_levels_linear_proj_per_block_heads": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    "no_cross_attention": dict(
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
    "sd2_style_4_levels": dict(
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("hw", [(16, 16), (24, 20)])
def test_decoder_of_encoder_equals_the_unet(name, hw):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS[name]).eval()
    split = split_unet(unet)
    x = torch.randn(3, 4, *hw)
    t = torch.tensor([999.0, 501.0, 1.0])  # one timestep per row
    text = torch.randn(3, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = unet(x, t, text).sample
        feats = split.run_encoder(x, t, text)
        out = split.run_decoder(feats, t, text)
    assert len(feats.skips) == split.num_skips
    assert feats.mid.shape[0] == 3
    assert rel_l2(out, ref) < 1e-5


def test_decoder_rows_use_their_own_timesteps():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, **CONFIGS["sd_like_2_levels"]).eval()
    split = split_unet(unet)
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 5, 32)
    with torch.no_grad():
        feats = split.run_encoder(x, torch.tensor([900.0]), text)
        t = torch.tensor([900.0, 800.0, 700.0])
        batched = split.run_decoder(feats.repeat(3), t, text.repeat(3, 1, 1))
        for i in range(3):
            single = split.run_decoder(feats, t[i : i + 1], text)
            assert rel_l2(batched[i : i + 1], single) < 1e-5
    assert rel_l2(batched[0], batched[1]) > 1e-4  # the timestep matters


def test_unsupported_unet_options_are_named():
    unet = UNet2DConditionModel(sample_size=8, time_cond_proj_dim=8, **CONFIGS["sd_like_2_levels"])
    with pytest.raises(UnsupportedModelError, match="time_cond_proj_dim=8"):
        split_unet(unet)


def test_feature_names_follow_the_graph_contract():
    assert Features.names(3) == ["mid", "skip_00", "skip_01", "skip_02"]


@pytest.mark.parametrize("name", list(SDXL_CONFIGS))
def test_sdxl_decoder_of_encoder_equals_the_unet(name):
    unet = tiny_sdxl_unet(name)
    split = split_unet(unet)
    assert split.added_names == ("text_embeds", "time_ids")
    x = torch.randn(4, 4, 16, 12, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0, 640.0, 301.0, 1.0])
    text = torch.randn(4, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    added = added_conditioning(name, 4)
    with torch.no_grad():
        ref = unet(x, t, text, added_cond_kwargs=added).sample
        out = split.run_decoder(split.run_encoder(x, t, text, added), t, text, added)
        # The added embedding matters: other time_ids give another prediction.
        moved = {**added, "time_ids": added["time_ids"] + 32}
        other = split.run_decoder(split.run_encoder(x, t, text, moved), t, text, moved)
    assert rel_l2(out, ref) < 1e-5
    assert rel_l2(other, ref) > 1e-4


def test_sdxl_decoder_rows_mix_steps_of_one_key_step():
    unet = tiny_sdxl_unet()
    split = split_unet(unet)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    added = added_conditioning("sdxl_base_like", 2)
    steps = torch.tensor([900.0, 800.0, 700.0])
    with torch.no_grad():
        feats = split.run_encoder(x, torch.full((2,), 900.0), text, added)
        rows = {k: v.repeat(3, 1) for k, v in added.items()}
        batched = split.run_decoder(feats.repeat(3), steps.repeat_interleave(2), text.repeat(3, 1, 1), rows)
        for j in range(3):
            single = split.run_decoder(feats, steps[j].expand(2), text, added)
            assert rel_l2(batched[2 * j : 2 * j + 2], single) < 1e-5


def test_sdxl_split_asks_for_its_added_conditioning():
    split = split_unet(tiny_sdxl_unet())
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 400.0]), torch.randn(2, 5, 32)
    with pytest.raises(InputError, match="text_embeds"):
        split.run_encoder(x, t, text)
    with pytest.raises(InputError, match=r"\[2, K\]"):
        split.run_encoder(x, t, text, added_conditioning("sdxl_base_like", 1))
    sd = split_unet(UNet2DConditionModel(sample_size=8, **CONFIGS["sd_like_2_levels"]))
    with pytest.raises(InputError, match="no added conditioning"):
        sd.run_encoder(torch.randn(2, 4, 8, 8), t, torch.randn(2, 5, 32), added_conditioning("sdxl_base_like", 2))


def test_other_addition_embeddings_are_refused_from_the_config():
    cfg = {**CONFIGS["sd_like_2_levels"], "addition_embed_type": "text"}
    with pytest.raises(UnsupportedModelError, match="addition_embed_type='text'"):
        check_supported_config(cfg)
    check_supported_config({**SDXL_CONFIGS["sdxl_base_like"][0]})  # SDXL passes, weights never built


@pytest.mark.parametrize("share_rows", [None, True])
def test_sdxl_torch_runner_tiles_added_conditioning_step_major(share_rows):
    from fd_trt.backends.torch import TorchRunner

    unet = tiny_sdxl_unet()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    added = added_conditioning("sdxl_base_like", 2)
    steps = torch.tensor([700.0, 600.0, 500.0])
    with TorchRunner(unet, share_rows=share_rows) as runner, torch.no_grad():
        feats = runner.encode(x, torch.full((2,), 700.0), text, added)
        out = runner.decode(feats, steps, text, added)
        ref_feats = runner.split.run_encoder(x, torch.full((2,), 700.0), text, added)
        for j in range(3):
            want = runner.split.run_decoder(ref_feats, steps[j].expand(2), text, added)
            # float32 sums in another order (one call of 6 rows against three of 2): a bound that holds on
            # every instruction set, as the other split tests use.
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-5


def _rows_seen_by_text_projections(split):
    """Records the row count of every call of the decoder's to_k / to_v (inner Linear layers)."""
    seen, handles = [], []
    for proj in split.decoder.text_projections():
        handles.append(proj.register_forward_hook(lambda m, a, out: seen.append(int(a[0].shape[0]))))
    return seen, handles


def _unet_and_inputs(model, seed):
    """A test UNet (CONFIGS[model] or the tiny SDXL one), its added conditioning and 2 rows of inputs."""
    if model == "sdxl_base_like":
        unet, added = tiny_sdxl_unet(), added_conditioning("sdxl_base_like", 2)
    else:
        torch.manual_seed(0)
        unet, added = UNet2DConditionModel(sample_size=16, **CONFIGS[model]).eval(), None
    d = int(unet.config.cross_attention_dim)
    g = torch.Generator().manual_seed(seed)
    return unet, added, torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, d, generator=g)


@pytest.mark.parametrize("model", ["sd_like_2_levels", "sdxl_base_like"])
def test_decoder_projects_the_text_once_per_distinct_row(model):
    # A decoder call over S steps tiles N text rows S times; the key / value projections must see N
    # rows (not S*N) and the noise must equal S separate decoder calls.
    from fd_trt.backends.torch import TorchRunner

    unet, added, x, text = _unet_and_inputs(model, seed=3)
    steps = torch.tensor([800.0, 700.0, 600.0, 500.0])
    with TorchRunner(unet, share_rows=True) as runner, torch.no_grad():
        feats = runner.encode(x, torch.full((2,), 800.0), text, added)
        # The counting hook runs after the sharing hooks (registered at the first shared call).
        runner.decode(feats, steps[:2], text, added)
        seen, handles = _rows_seen_by_text_projections(runner.split)
        try:
            out = runner.decode(feats, steps, text, added)
        finally:
            for h in handles:
                h.remove()
        assert seen and set(seen) == {2}, seen  # 2 distinct rows, not 4 steps x 2
        for j in range(4):
            want = runner.split.run_decoder(feats, steps[j].expand(2), text, added)
            # float32 sums in another order (text projected once for 4 steps, GEMMs of other shapes):
            # 1e-5 holds on every instruction set; 1e-6 failed on an AVX2-only CPU (1.016e-6).
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-5
        # Outside a decoder call the hooks change nothing: the UNet's other users see every row.
        seen, handles = _rows_seen_by_text_projections(runner.split)
        try:
            kw = {} if added is None else {"added_cond_kwargs": {k: torch.cat([v, v]) for k, v in added.items()}}
            unet(torch.cat([x, x]), torch.full((4,), 500.0), torch.cat([text, text]), **kw)
        finally:
            for h in handles:
                h.remove()
        assert set(seen) == {4}, seen


def test_text_row_sharing_is_per_thread():
    # Serving runs calls on several threads: one call's repeat count must not reach another's.
    import threading

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    split = split_unet(unet)
    x, text = torch.randn(4, 4, 16, 16), torch.randn(4, 7, 32)
    want = unet(x, torch.full((4,), 300.0), text).sample
    got = {}
    with torch.no_grad(), split.text_rows_repeated(2):
        t = threading.Thread(target=lambda: got.setdefault("other", unet(x, torch.full((4,), 300.0), text).sample))
        t.start()
        t.join()
        with pytest.raises(InputError, match="3 text rows cannot be 2 repeats"):
            split.decoder.text_projections()[0](torch.zeros(3, 7, 32))
    assert torch.equal(got["other"], want)


def _periodic_convs(split):
    """(conv, first shared input channel) of every up-block convolution hooked for skip sharing."""
    out = []
    for block in split.decoder.up_blocks:
        for resnet in block.resnets:
            for conv in (resnet.conv1, resnet.conv_shortcut):
                b = getattr(conv, "_fd_trt_periodic_from", None)
                if b is not None:
                    out.append((conv, b))
    return out


@pytest.mark.parametrize("model", [*CONFIGS, "sdxl_base_like"])
def test_decoder_convolves_the_skips_once_per_distinct_row(model):
    # A decoder call over S steps repeats the key step's skips S times; the up-block convolutions
    # convolve the skip channels of the N distinct rows once. The noise must equal S separate
    # decoder calls, and the FLOPs must drop by exactly the skip part of those convolutions.
    from torch.utils.flop_counter import FlopCounterMode

    from fd_trt.backends.torch import TorchRunner

    unet, added, x, text = _unet_and_inputs(model, seed=5)
    steps = torch.tensor([800.0, 700.0, 600.0, 500.0])
    s, n = len(steps), 2
    with TorchRunner(unet, share_rows=True) as runner, torch.no_grad():
        feats = runner.encode(x, torch.full((2,), 800.0), text, added)
        out = runner.decode(feats, steps, text, added)
        for j in range(s):
            want = runner.split.run_decoder(feats, steps[j].expand(2), text, added)
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-5, j
        hooked = _periodic_convs(runner.split)
        assert hooked, "no up-block convolution reads a skip"
        # Hand count of the saving: each hooked conv skips (S-1)*N rows of its channels b: on.
        out_hw = {}
        handles = [
            c.register_forward_hook(lambda m, a, o: out_hw.__setitem__(m, tuple(o.shape[-2:]))) for c, _ in hooked
        ]
        try:
            runner.split.run_decoder(*expand_for_steps(feats, steps, text, added))  # outside the block: plain convs
        finally:
            for h in handles:
                h.remove()
        saved = sum(
            (s - 1)
            * n
            * 2
            * c.out_channels
            * (c.in_channels - b)
            * c.kernel_size[0]
            * c.kernel_size[1]
            * out_hw[c][0]
            * out_hw[c][1]
            for c, b in hooked
        )
        with runner.split.text_rows_repeated(s), FlopCounterMode(display=False) as plain:
            runner.split.run_decoder(*expand_for_steps(feats, steps, text, added))
        with FlopCounterMode(display=False) as shared:
            runner.decode(feats, steps, text, added)
    assert saved > 0 and plain.get_total_flops() - shared.get_total_flops() == saved


@pytest.mark.parametrize("model", ["sd_like_2_levels", "sdxl_base_like"])
def test_run_decoder_steps_is_the_decoder_graph_computation(model):
    # The decoder graph's module: N rows of features, text and added conditioning, S*N step-major
    # timesteps. It must equal S separate decoder calls, with the shared FLOPs of the torch runner.
    from torch.utils.flop_counter import FlopCounterMode

    from fd_trt.backends.torch import TorchRunner

    unet, added, x, text = _unet_and_inputs(model, seed=7)
    steps = torch.tensor([900.0, 650.0, 400.0])
    extra = () if added is None else tuple(added[k] for k in ("text_embeds", "time_ids"))
    with TorchRunner(unet, share_rows=True) as runner, torch.no_grad():
        split = runner.split
        feats = split.run_encoder(x, torch.full((2,), 900.0), text, added)
        with FlopCounterMode(display=False) as graph_flops:
            out = split.run_decoder_steps(feats, steps.repeat_interleave(2), text, extra)
        assert out.shape == (6, 4, 16, 16)
        for j in range(3):
            want = split.run_decoder(feats, steps[j].expand(2), text, added)
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-5, j
        with FlopCounterMode(display=False) as runner_flops:
            runner.decode(feats, steps, text, added)
        assert graph_flops.get_total_flops() == runner_flops.get_total_flops()
        with pytest.raises(InputError, match=r"timestep \(5,\).*S\*N timesteps"):
            split.run_decoder_steps(feats, torch.linspace(900.0, 100.0, 5), text, extra)
        with pytest.raises(InputError, match=r"text \(1, 7"):
            split.run_decoder_steps(feats, steps.repeat_interleave(2), text[:1], extra)


def test_skip_sharing_splits_at_whole_groupnorm_groups():
    # sd_like_2_levels, first up block (64 channels out, 32 groups): its last resnet reads
    # cat(h [64], skip [32]) = 96 channels in groups of 3, so the group at channels 63..65 mixes h
    # and skip; conv1 may share from channel 66 only, conv_shortcut (raw input) from 64.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    split = split_unet(unet)
    feats = split.run_encoder(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 32))
    with split.skip_rows_repeated(2, [int(t.shape[1]) for t in feats.skips]):
        pass
    last = split.decoder.up_blocks[0].resnets[-1]
    assert last.conv1.in_channels == 96
    assert last.conv1._fd_trt_periodic_from == 66 and last.conv_shortcut._fd_trt_periodic_from == 64
    first = split.decoder.up_blocks[0].resnets[0]  # 64 + 64 in groups of 4: the boundary is whole
    assert first.conv1._fd_trt_periodic_from == 64 and first.conv_shortcut._fd_trt_periodic_from == 64


def test_skip_sharing_in_bf16_stays_as_close_to_fp32_as_plain_bf16():
    # Splitting the convolution adds its two halves in another order; in bf16 the halves are added
    # in fp32 and rounded once, so the shared decoder is no further from fp32 than the plain one.
    from fd_trt.backends.torch import converted_copy

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    bf = converted_copy(unet, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    steps = torch.tensor([900.0, 800.0, 700.0, 600.0, 500.0])
    with torch.no_grad():
        ref_split = split_unet(unet)
        ref = ref_split.run_decoder(
            *expand_for_steps(ref_split.run_encoder(x, torch.full((2,), 900.0), text), steps, text, None)
        )
        split = split_unet(bf)
        feats = split.run_encoder(x.bfloat16(), torch.full((2,), 900.0), text.bfloat16())
        tiled = expand_for_steps(feats, steps, text.bfloat16(), None)
        plain = split.run_decoder(*tiled).float()
        with split.skip_rows_repeated(len(steps), [int(t.shape[1]) for t in feats.skips]):
            shared = split.run_decoder(*tiled).float()
    e_plain, e_shared = rel_l2(plain, ref), rel_l2(shared, ref)
    assert 0 < e_plain < 3e-2 and e_shared < 1.5 * e_plain, (e_plain, e_shared)
    assert not torch.equal(plain, shared)  # the split did run


def test_skip_sharing_is_per_thread_and_off_outside_the_block():
    import threading

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS["sd_like_2_levels"]).eval()
    split = split_unet(unet)
    x, text = torch.randn(4, 4, 16, 16), torch.randn(4, 7, 32)  # 4 distinct rows: not periodic
    with torch.no_grad():
        want = unet(x, torch.full((4,), 300.0), text).sample
        feats = split.run_encoder(x, torch.full((4,), 300.0), text)
        got = {}
        with split.skip_rows_repeated(2, [int(t.shape[1]) for t in feats.skips]):
            t = threading.Thread(target=lambda: got.setdefault("other", unet(x, torch.full((4,), 300.0), text).sample))
            t.start()
            t.join()
        after = unet(x, torch.full((4,), 300.0), text).sample
    assert torch.equal(got["other"], want) and torch.equal(after, want)


def test_torch_runner_shares_rows_only_for_wide_unets():
    # The width rule (ROW_SHARING_MIN_CHANNELS = 96): a 32-64 channel UNet decodes plainly (the
    # hooks cost more than they save there), a 96-channel one shares; the noise is the same.
    from torch.utils.flop_counter import FlopCounterMode

    from fd_trt.backends.torch import TorchRunner
    from fd_trt.graphs.split import ROW_SHARING_MIN_CHANNELS

    assert ROW_SHARING_MIN_CHANNELS == 96
    wide_cfg = {**CONFIGS["sd_like_2_levels"], "block_out_channels": (96, 96), "layers_per_block": 1}
    steps = torch.tensor([800.0, 600.0, 400.0])
    for cfg, shares in ((CONFIGS["sd_like_2_levels"], False), (wide_cfg, True)):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=16, **cfg).eval()
        g = torch.Generator().manual_seed(4)
        x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
        with TorchRunner(unet) as runner, torch.no_grad():
            assert runner.share_rows is shares
            feats = runner.encode(x, torch.full((2,), 800.0), text)
            with FlopCounterMode(display=False) as plain:
                want = runner.split.run_decoder(*expand_for_steps(feats, steps, text, None))
            with FlopCounterMode(display=False) as used:
                got = runner.decode(feats, steps, text)
        assert rel_l2(got, want) < 1e-5
        if shares:
            assert used.get_total_flops() < plain.get_total_flops()
        else:
            assert used.get_total_flops() == plain.get_total_flops()
    with pytest.raises(InputError, match="share_rows must be True, False or None"):
        TorchRunner(unet, share_rows="yes")
