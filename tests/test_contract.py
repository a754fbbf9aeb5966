"""The graph contract (fd_trt/contract.py): one definition that export, runners, profiles and manifests read."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_split import CONFIGS

from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.graphs.contract import FLOAT32, GraphContract, default_added_shapes
from fd_trt.graphs.split import feature_bytes_per_row, split_unet

from tiny_sdxl import SDXL_CONFIGS, tiny_sdxl_unet


def test_sd_contract_keeps_the_graph_names_on_disk(tiny_sd):
    contract = GraphContract.from_unet_config(tiny_sd.unet.config, (8, 8), (16, 32))
    skips = [f"skip_{i:02d}" for i in range(contract.num_skips)]
    assert contract.encoder.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert contract.encoder.output_names == ["mid", *skips]
    assert contract.decoder.input_names == ["mid", *skips, "timestep", "encoder_hidden_states"]
    assert contract.decoder.output_names == ["noise_pred"]
    assert contract.added == () and contract.added_shapes == {}
    assert contract.row_layout == "step-major"
    assert contract.decoder.tensor("timestep").dtype == FLOAT32
    assert contract.encoder.tensor("sample").shape_at(3) == (3, 4, 8, 8)
    # The decoder takes the key step's N rows of features and text, and S*N timesteps (step-major).
    axes = contract.decoder.dynamic_axes
    assert axes.pop("timestep") == axes.pop("noise_pred") == {0: "step_rows"}
    assert axes == {n: {0: "rows"} for n in ["mid", *skips, "encoder_hidden_states"]}


@pytest.mark.parametrize("name", ["sd_like_2_levels", "3_levels_linear_proj_per_block_heads", "sd2_style_4_levels"])
@pytest.mark.parametrize("hw", [(16, 16), (24, 20), (9, 7)])
def test_contract_feature_shapes_are_the_encoders(name, hw):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **CONFIGS[name]).eval()
    split = split_unet(unet)
    contract = GraphContract.from_unet_config(unet.config, hw, (5, unet.config.cross_attention_dim))
    with torch.no_grad():
        feats = split.run_encoder(
            torch.randn(2, 4, *hw), torch.tensor([900.0, 10.0]), torch.randn(2, 5, unet.config.cross_attention_dim)
        )
    assert contract.num_skips == split.num_skips
    assert [tuple(t.shape) for t in feats.tensors()] == [s.shape_at(2) for s in contract.encoder.outputs]
    assert feature_bytes_per_row(unet.config, hw, 4) == sum(t[0].numel() * 4 for t in feats.tensors())


@pytest.mark.parametrize("name", list(SDXL_CONFIGS))
def test_sdxl_contract_adds_text_embeds_and_time_ids_to_both_graphs(name):
    unet = tiny_sdxl_unet(name)
    _, pooled, k = SDXL_CONFIGS[name]
    contract = GraphContract.from_unet_config(unet.config, (8, 8), (5, 32), {"text_embeds": [pooled], "time_ids": [k]})
    for spec in (contract.encoder, contract.decoder):
        assert spec.input_names[-4:] == ["timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert contract.added_shapes == {"text_embeds": [pooled], "time_ids": [k]}
    assert contract.decoder.tensor("time_ids").dtype == FLOAT32
    assert contract.decoder.tensor("text_embeds").dtype != FLOAT32
    # The config fixes P + K * addition_time_embed_dim; K = 6 (SDXL base) by default.
    assert default_added_shapes(unet.config, time_ids=k) == {"text_embeds": (pooled,), "time_ids": (k,)}
    with pytest.raises(InputError, match="added_shapes"):
        GraphContract.from_unet_config(unet.config, added_shapes={"pooled": [pooled]})


def test_contract_from_encoder_names_refuses_foreign_graphs():
    sd = GraphContract.from_encoder_io(["sample", "timestep", "encoder_hidden_states"], ["mid", "skip_00", "skip_01"])
    assert sd.num_skips == 2 and sd.added_names == ()
    xl = GraphContract.from_encoder_io(
        ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["mid", "skip_00"]
    )
    assert xl.added_names == ("text_embeds", "time_ids")
    assert xl.decoder.input_names == ["mid", "skip_00", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    with pytest.raises(EngineMismatchError, match="not an fd_trt encoder graph"):
        GraphContract.from_encoder_io(["sample", "timestep", "encoder_hidden_states", "text_embeds"], ["mid"])
    with pytest.raises(EngineMismatchError, match=r"missing \['time_ids'\]"):
        xl.decoder.check(
            ["mid", "skip_00", "timestep", "encoder_hidden_states", "text_embeds"],
            ["noise_pred"],
            "decoder.onnx",
            "rebuild",
        )


def test_contract_from_a_manifest_without_a_full_config_uses_its_records():
    from types import SimpleNamespace

    manifest = SimpleNamespace(
        unet_config={},
        latent_shape=[4, 8, 8],
        text_shape=[5, 32],
        num_skips=3,
        added_shapes={"time_ids": [6], "text_embeds": [24]},
    )
    contract = GraphContract.from_manifest(manifest)
    assert contract.added_names == ("text_embeds", "time_ids")  # graph order, not the record's
    assert contract.encoder.tensor("time_ids").shape_at(2) == (2, 6)
    with pytest.raises(EngineMismatchError, match="does not know"):
        GraphContract.from_manifest(SimpleNamespace(**{**vars(manifest), "added_shapes": {"image_embeds": [8]}}))
