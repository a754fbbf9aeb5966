import pytest
import torch
from diffusers import UNet2DConditionModel

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.split import Features, check_supported_config, split_unet

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


def test_sdxl_torch_runner_tiles_added_conditioning_step_major():
    from fd_trt.backends.torch import TorchRunner

    unet = tiny_sdxl_unet()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    added = added_conditioning("sdxl_base_like", 2)
    steps = torch.tensor([700.0, 600.0, 500.0])
    with TorchRunner(unet) as runner, torch.no_grad():
        feats = runner.encode(x, torch.full((2,), 700.0), text, added)
        out = runner.decode(feats, steps, text, added)
        ref_feats = runner.split.run_encoder(x, torch.full((2,), 700.0), text, added)
        for j in range(3):
            want = runner.split.run_decoder(ref_feats, steps[j].expand(2), text, added)
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-6


def _rows_seen_by_text_projections(split):
    """Records the row count of every call of the decoder's to_k / to_v (inner Linear layers)."""
    seen, handles = [], []
    for proj in split.decoder.text_projections():
        handles.append(proj.register_forward_hook(lambda m, a, out: seen.append(int(a[0].shape[0]))))
    return seen, handles


@pytest.mark.parametrize("model", ["sd_like_2_levels", "sdxl_base_like"])
def test_decoder_projects_the_text_once_per_distinct_row(model):
    # A decoder call over S steps tiles N text rows S times; the key / value projections must see N
    # rows (not S*N) and the noise must equal S separate decoder calls.
    from fd_trt.backends.torch import TorchRunner

    if model == "sdxl_base_like":
        unet, added = tiny_sdxl_unet(), added_conditioning("sdxl_base_like", 2)
        d = int(unet.config.cross_attention_dim)
    else:
        torch.manual_seed(0)
        unet, added = UNet2DConditionModel(sample_size=16, **CONFIGS[model]).eval(), None
        d = int(unet.config.cross_attention_dim)
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, d, generator=g)
    steps = torch.tensor([800.0, 700.0, 600.0, 500.0])
    with TorchRunner(unet) as runner, torch.no_grad():
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
            assert rel_l2(out[2 * j : 2 * j + 2], want) < 1e-6
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
