"""The transformer split: decoder(encoder(x)) equals the diffusers transformer for every N, and the
runners' batched decode equals one transformer call per step."""

import pytest
import torch

from fd_trt.backends.transformer import TorchTransformerRunner
from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families.dit_models import tiny_dit_pipeline, tiny_pixart_pipeline
from fd_trt.graphs.split_dit import split_transformer


def _pixart_inputs(rows: int, extra: bool):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(rows, 16, 32, generator=g)
    mask = torch.ones(rows, 16)
    mask[0, 5:] = 0
    added = {"encoder_attention_mask": mask}
    kwargs = {"resolution": None, "aspect_ratio": None}
    if extra:
        added["resolution"] = torch.tensor([[64.0, 48.0]] * rows)
        added["aspect_ratio"] = torch.full((rows, 1), 0.75)
        kwargs = {"resolution": added["resolution"], "aspect_ratio": added["aspect_ratio"]}
    return text, added, kwargs


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_dit_split_exact_for_every_n(learned_sigma):
    tr = tiny_dit_pipeline(learned_sigma=learned_sigma).transformer
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 500.0, 999.0])
    labels = torch.tensor([1, 7, 1000])  # 1000: the null class
    with torch.no_grad():
        ref = tr(x, timestep=t, class_labels=labels).sample
        for n in range(len(tr.transformer_blocks) + 1):
            s = split_transformer(tr, n)
            out = s.decoder(s.encoder(x, t, labels), t, labels)
            assert out.shape == ref.shape
            assert (out - ref).abs().max().item() <= 1e-5, n


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("sigma", [False, True])
def test_pixart_split_exact_for_every_n(extra, sigma):
    tr = tiny_pixart_pipeline(additional_conditions=extra, sigma=sigma).transformer
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 500.0, 999.0])
    text, added, kwargs = _pixart_inputs(3, extra)
    with torch.no_grad():
        ref = tr(
            x,
            encoder_hidden_states=text,
            encoder_attention_mask=added["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=kwargs,
        ).sample
        for n in range(len(tr.transformer_blocks) + 1):
            s = split_transformer(tr, n)
            cond = s.conditioning(text, added)
            out = s.decoder(s.encoder(x, t, *cond), t, *cond)
            assert (out - ref).abs().max().item() <= 1e-5, n


def test_runner_batched_decode_equals_one_call_per_step():
    """decode(features of step t0, [t0, t1, t2]) == the rear blocks per step on the same tokens;
    at the key step it is the full transformer's noise channels."""
    tr = tiny_pixart_pipeline().transformer
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text, added, kwargs = _pixart_inputs(2, False)
    s = split_transformer(tr, 2)
    ts = torch.tensor([900.0, 700.0, 500.0])
    seen: dict[str, list[int]] = {"caption": [], "to_k": []}

    def spy(name, module):  # the rows a module's own forward computes (after any pre-hook)
        forward = module.forward
        module.forward = lambda x, *a, **k: (seen[name].append(x.shape[0]), forward(x, *a, **k))[1]

    spy("caption", tr.caption_projection)
    spy("to_k", tr.transformer_blocks[-1].attn2.to_k)
    with TorchTransformerRunner(s) as runner:
        feats = runner.encode(x, ts[0].expand(2), text, added)
        seen = {k: [] for k in seen}  # the decoder's calls only
        eps = runner.decode(feats, ts, text, added)
    del tr.caption_projection.forward, tr.transformer_blocks[-1].attn2.to_k.forward
    # the text is the same at the three steps: projected for the 2 key-step rows once, not 6
    assert seen == {"caption": [2], "to_k": [2]}
    assert eps.shape == (6, 4, 8, 8)
    mask = added["encoder_attention_mask"]
    with torch.no_grad():
        full = tr(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=ts[0].expand(2)).sample
        assert (eps[:2] - full[:, :4]).abs().max().item() <= 1e-5
        for j in range(3):
            one = s.decoder(feats.mid, ts[j].expand(2), text, mask)[:, :4]
            assert (eps[2 * j : 2 * j + 2] - one).abs().max().item() <= 1e-5
    assert runner.launches == {"encoder": 1, "decoder": 1}


def test_split_refusals():
    tr = tiny_dit_pipeline().transformer
    with pytest.raises(InputError, match="outside 0..4"):
        split_transformer(tr, 5)
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel"):
        split_transformer(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("dual", [(), (0,)])
def test_sd3_joint_split_exact_for_every_n(dual):
    """Both token streams after block N are propagated; the pooled text goes to both halves."""
    from diffusers import SD3Transformer2DModel

    from fd_trt.graphs.split_sd3 import split_sd3

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=dual,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, text, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 12, generator=g),
    )
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        ref = tr(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
        for n in range(4):
            enc, dec = split_sd3(tr, n)
            tokens, ctx = enc(x, t, text, pooled)
            assert (dec(tokens, ctx, t, pooled) - ref).abs().max().item() <= 1e-5, n


def test_sd3_runner_batched_decode_non_square():
    """SD3 through split_transformer: both streams cross the split (Features.skips holds the
    context), non-square latents; the batched decode equals the full transformer at the key step
    and the rear blocks per step after it."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, text, pooled = (
        torch.randn(2, 4, 8, 6, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 12, generator=g),
    )
    added = {"pooled_projections": pooled}
    ts = torch.tensor([900.0, 700.0, 500.0])
    for n in range(4):
        s = split_transformer(tr, n, (8, 6))
        assert s.kind == "sd3" and s.features == ("tokens", "context") and s.pooled_dim == 12
        with TorchTransformerRunner(s) as runner:
            feats = runner.encode(x, ts[0].expand(2), text, added)
            eps = runner.decode(feats, ts, text, added)
        assert feats.mid.shape == (2, 12, 16) and feats.skips[0].shape == (2, 5, 16)
        assert eps.shape == (6, 4, 8, 6)
        with torch.no_grad():
            full = tr(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=ts[0].expand(2)).sample
            assert (eps[:2] - full).abs().max().item() <= 1e-5, n
            for j in range(1, 3):
                one = s.decoder(feats.mid, feats.skips[0], ts[j].expand(2), pooled)
                assert (eps[2 * j : 2 * j + 2] - one).abs().max().item() <= 1e-5, n
    with pytest.raises(InputError, match="pooled_projections"):
        s.conditioning(text, {})
