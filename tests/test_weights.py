"""Weight identity: a weight change between calls (in place, fused LoRA, adapters and scales) is
followed by every backend, never run on stale graphs; the caller's pipeline is never moved or cast."""

import copy

import pytest
import torch

from fd_trt.errors import EngineMismatchError, InputError, NotPreparedError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.graphs.build import build_engines
from fd_trt.graphs.weights import unet_weights_sha256, weights_fingerprint
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

PROMPT = "a red circle on the left"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _latents(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run(pipe: FasterDiffusionPipeline, schedule: str = "paper", steps: int = 10) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=steps, latents=_latents(), output_type="latent", schedule=schedule).latents


def _reference(sd) -> torch.Tensor:
    """The torch backend on an independent deep copy of the pipeline's current weights."""
    ref = FasterDiffusionPipeline.from_diffusers(copy.deepcopy(sd), backend="torch", progress=False)
    return _run(ref)


def _scale_up_block_in_place(unet: torch.nn.Module, factor: float = 1.5) -> None:
    # Through .data, as peft's merge and diffusers' fuse_lora write: no autograd version bump.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("up_blocks.1.") and name.endswith("weight"):
                p.data.mul_(factor)


def _lora_dir(sd, tmp_path, seed: int = 3):
    """Saves a random LoRA for the pipeline's UNet in diffusers' format, as a user would have one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    donor = copy.deepcopy(sd.unet)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    folder = tmp_path / f"lora{seed}"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(donor), safe_serialization=True
    )
    return folder


@pytest.mark.slow
def test_onnxruntime_rebuilds_graphs_after_an_in_place_weight_change(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    sd = tiny_sd_pipeline(seed=0)
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", progress=False)
    before = _run(pipe)
    assert rel_l2(before, _reference(sd)) < 1e-4
    _scale_up_block_in_place(sd.unet)
    after = _run(pipe)
    # Stale graphs would return `before` again; the new weights move the result far.
    assert rel_l2(after, before) > 0.05
    assert rel_l2(after, _reference(sd)) < 1e-4
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one graph folder per weights hash
    pipe.close()


@pytest.mark.slow
def test_lora_adapters_scales_and_fusing_match_torch_on_onnxruntime(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    sd = tiny_sd_pipeline(seed=0)
    torch_pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    ort_pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", progress=False)
    base = _run(torch_pipe)
    assert rel_l2(_run(ort_pipe), base) < 1e-4

    sd.load_lora_weights(_lora_dir(sd, tmp_path, 3), adapter_name="a")
    sd.load_lora_weights(_lora_dir(sd, tmp_path, 4), adapter_name="b")
    results = {}
    for label, change in [
        ("a", lambda: sd.set_adapters(["a"])),
        ("a+b", lambda: sd.set_adapters(["a", "b"], [1.0, 0.5])),
        ("a*0.3", lambda: sd.set_adapters(["a"], [0.3])),
        ("disabled", lambda: sd.disable_lora()),
        ("fused a", lambda: (sd.enable_lora(), sd.set_adapters(["a"]), sd.fuse_lora(lora_scale=1.0))),
    ]:
        change()
        t, o = _run(torch_pipe), _run(ort_pipe)
        assert rel_l2(o, t) < 1e-4, label
        results[label] = t
    # Every change really changed the output (so a stale graph could not pass), and the
    # disabled adapters give back the base model.
    assert rel_l2(results["a"], base) > 1e-2
    assert rel_l2(results["a+b"], results["a"]) > 1e-3
    assert rel_l2(results["a*0.3"], results["a"]) > 1e-3
    assert rel_l2(results["disabled"], base) < 1e-5
    assert rel_l2(results["fused a"], results["a"]) < 1e-4


@pytest.mark.slow
def test_engine_directory_is_refused_after_a_weight_change(tmp_path):
    sd = tiny_sd_pipeline(seed=0)
    text_shape = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False).text_shape()
    build_engines(sd.unet, tmp_path / "eng", latent_size=(8, 8), text_shape=text_shape, progress=False)
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="onnxruntime", engines=tmp_path / "eng", progress=False)
    _run(pipe)
    _scale_up_block_in_place(sd.unet)
    with pytest.raises(EngineMismatchError, match=r"unet_sha256 .*fd-trt build"):
        _run(pipe)


def test_torch_backend_follows_weight_changes_in_a_converted_copy():
    sd = tiny_sd_pipeline(seed=0)
    params = {n: (p.data_ptr(), p.dtype) for n, p in sd.unet.named_parameters()}
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", precision="bf16", progress=False)
    before = _run(pipe)
    # The caller's UNet was neither cast nor moved.
    assert {n: (p.data_ptr(), p.dtype) for n, p in sd.unet.named_parameters()} == params
    _scale_up_block_in_place(sd.unet)
    after = _run(pipe)
    fresh = _run(
        FasterDiffusionPipeline.from_diffusers(copy.deepcopy(sd), backend="torch", precision="bf16", progress=False)
    )
    assert rel_l2(after, before) > 0.05
    assert rel_l2(after, fresh) < 1e-6


def test_fingerprint_sees_every_kind_of_weight_change():
    sd = tiny_sd_pipeline(seed=0)
    unet = sd.unet
    seen = {weights_fingerprint(unet)}
    assert weights_fingerprint(unet) in seen  # unchanged weights: same fingerprint
    p = unet.up_blocks[1].resnets[0].conv1.weight
    with torch.no_grad():
        p.data.mul_(1.01)  # through .data: no version bump, caught by the samples
    seen.add(weights_fingerprint(unet))
    with torch.no_grad():
        p.add_(0.0)  # an in-place op that changes no value still bumps the version
    seen.add(weights_fingerprint(unet))
    p.data = p.data.clone()  # a swap, as LoRA fusing does
    seen.add(weights_fingerprint(unet))
    unet.load_state_dict(copy.deepcopy(unet.state_dict()))
    seen.add(weights_fingerprint(unet))
    assert len(seen) == 5


def test_weights_hash_covers_adapter_scales(tmp_path):
    pytest.importorskip("peft")
    sd = tiny_sd_pipeline(seed=0)
    sd.load_lora_weights(_lora_dir(sd, tmp_path), adapter_name="a")
    digests = {unet_weights_sha256(sd.unet)}
    sd.set_adapters(["a"], [0.5])  # no tensor changes, only a scale
    digests.add(unet_weights_sha256(sd.unet))
    sd.disable_lora()
    digests.add(unet_weights_sha256(sd.unet))
    assert len(digests) == 3


def test_from_diffusers_never_moves_the_callers_pipeline():
    sd = tiny_sd_pipeline(seed=0)
    with pytest.raises(InputError, match=r"is on cpu but device='cuda:0'.*sd_pipeline.to"):
        FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cuda:0")
    assert next(sd.unet.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_runner_cache_is_bounded_and_prepare_readies_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    sd = tiny_sd_pipeline(seed=0)
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend="onnxruntime", progress=False, max_cached_runners=1, build_on_demand=False
    )
    with pytest.raises(NotPreparedError, match=r"64x64 .*sizes ready: none.*pipe.prepare"):
        pipe(PROMPT, num_inference_steps=2, output_type="latent")
    first = pipe.prepare(64, 64)
    assert pipe.prepared_sizes() == [(64, 64)]
    pipe(PROMPT, num_inference_steps=2, output_type="latent")
    second = pipe.prepare(32, 32)
    # Past max_cached_runners the least recently used runner is closed.
    assert pipe.prepared_sizes() == [(32, 32)] and not first.is_active and second.is_active
    with pytest.raises(NotPreparedError, match="sizes ready: 32x32"):
        pipe(PROMPT, num_inference_steps=2, output_type="latent", height=64, width=64)
    pipe.close()


def test_cli_generate_fuses_a_lora_like_the_python_api(tmp_path, capsys):
    pytest.importorskip("peft")
    import numpy as np
    from PIL import Image

    from fd_trt.cli import main

    lora = _lora_dir(FasterDiffusionPipeline.from_pretrained("default", backend="torch", progress=False).sd, tmp_path)
    args = ["generate", "a red circle", "--backend", "torch", "--steps", "4", "--seed", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "lora.png"), "--lora", f"{lora}:0.7"]) == 0
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", progress=False)
    pipe.load_lora_weights(lora, adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    pipe.fuse_lora()
    want = pipe(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np"
    ).images[0]
    got = np.asarray(Image.open(tmp_path / "lora.png"), dtype=np.float32) / 255
    plain = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.float32) / 255
    assert np.abs(got - want).max() <= 1.5 / 255
    assert np.abs(plain - want).mean() > 5 * np.abs(got - want).mean()
    assert main([*args, "--lora", f"{lora}:abc"]) == 2
    assert "'abc' is not a number; write PATH or PATH:SCALE" in capsys.readouterr().err
