"""The default ControlNet (silhouette masks) and the shapes' ground-truth masks."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from fd_trt.errors import InputError
from fd_trt.families.models import default_controlnet_dir, default_model_dir, load_controlnet
from fd_trt.tools import shapes

needs_default = pytest.mark.skipif(
    default_controlnet_dir() is None or default_model_dir() is None, reason="no shipped default model / ControlNet"
)


# masks of the procedural scenes -------------------------------------------------------------------
def test_dataset_masks_are_bool_and_cover_the_objects_colour():
    data = shapes.generate_dataset(64, seed=3, p_two=0.5)
    assert data.masks.shape == (64, 64, 64) and data.masks.dtype == bool
    for k in range(64):
        m = data.masks[k]
        assert 0.02 < m.mean() < 0.6
        # Inside the mask (away from its antialiased rim) every pixel has an object colour: close to
        # a nominal colour (jitter is at most 14 per channel); outside, a low-saturation background.
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        img = data.images[k].astype(np.int32)
        nominal = np.array([shapes.COLORS[shapes.COLOR_NAMES[c]] for c in data.colors[k] if c >= 0])
        dist = np.abs(img[inner][:, None, :] - nominal[None]).max(-1).min(-1)
        # (a few pixels in a star's concave corners are partly covered: blended with the background)
        assert (dist <= 15).mean() > 0.98 and dist.max() <= 60
        near = m.copy()
        for dy in range(-2, 3):  # 2 px around the mask: thin star tips stay under 0.5 coverage
            for dx in range(-2, 3):
                near |= np.roll(np.roll(m, dy, 0), dx, 1)
        outer = ~near
        sat = img[outer].max(-1) - img[outer].min(-1)
        assert sat.max() <= 30  # background tint: +-12 per channel


def test_scene_mask_matches_an_independently_drawn_silhouette():
    # Circles have no random rotation, so shapes.silhouette (a separate one-channel drawing) must give
    # the scene's mask exactly; for a pair, the union of the two.
    for seed in range(5):
        scene = shapes.scene_from_labels(np.random.default_rng(seed), [("red", "circle"), ("blue", "circle")])
        ref = np.zeros((64, 64), bool)
        for o in scene.objects:
            ref |= shapes.silhouette("circle", o.cx, o.cy, o.size)
        assert (scene.mask == ref).mean() > 0.998  # identical up to a rounding pixel on the rim
    one = shapes.random_scene(np.random.default_rng(7), num_objects=1)
    assert one.mask.dtype == bool and one.mask.shape == (64, 64) and one.mask.any()


def test_masks_draw_no_random_numbers():
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    shapes.random_scene(a)
    shapes.random_scene(b)
    assert a.uniform() == b.uniform()
    d1 = shapes.generate_dataset(8, seed=2)
    d2 = shapes.generate_dataset(8, seed=2)
    assert (d1.images == d2.images).all() and (d1.masks == d2.masks).all()


# the shipped ControlNet ----------------------------------------------------------------------------
@needs_default
def test_default_controlnet_is_small_and_fits_the_default_unet():
    from diffusers import ControlNetModel

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    folder = default_controlnet_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 5e6, f"default ControlNet is {size / 1e6:.2f} MB"
    net = load_controlnet("default")
    assert isinstance(net, ControlNetModel)
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    unet = pipe.sd.unet
    # The residuals must have the shapes of the UNet encoder's skips and mid (fd_trt's split).
    from fd_trt.graphs.split import split_unet

    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.randn(2, 32, 64)
    with torch.no_grad():
        feats = split_unet(unet).run_encoder(x, t, text)
        down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    assert [tuple(d.shape) for d in down] == [tuple(s.shape) for s in feats.skips]
    assert tuple(mid.shape) == tuple(feats.mid.shape)
    # Trained: the zero-initialised output convolutions have moved.
    assert max(float(c.weight.detach().abs().max()) for c in net.controlnet_down_blocks) > 1e-3


def _red_mask(images: np.ndarray) -> np.ndarray:
    """Pixels of the "red" object colour (225, 30, 30) +- jitter; no background is that saturated."""
    x = (np.asarray(images) * 255).astype(np.int32)
    return (x[..., 0] > 150) & (x[..., 1] < 100) & (x[..., 2] < 100)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@needs_default
def test_default_controlnet_steers_the_object_into_the_mask():
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    pipe = FasterDiffusionPipeline.from_pretrained(
        "default", backend="torch", device="cpu", progress=False, controlnet="default"
    )
    # Masks away from the centre, where the model puts an unplaced object by itself.
    masks = [shapes.silhouette("star", 18, 20, 26), shapes.silhouette("star", 44, 42, 28)]
    with_cn, without = [], []
    for i, m in enumerate(masks):
        kw = dict(
            num_inference_steps=20, guidance_scale=7.5, output_type="np", schedule="all", image=shapes.mask_image(m)
        )
        a = pipe("a red star", generator=torch.Generator().manual_seed(i), **kw).images[0]
        b = pipe(
            "a red star", generator=torch.Generator().manual_seed(i), controlnet_conditioning_scale=0.0, **kw
        ).images[0]
        with_cn.append(_iou(_red_mask(a), m))
        without.append(_iou(_red_mask(b), m))
    assert min(with_cn) > 0.5, (with_cn, without)
    assert np.mean(with_cn) > np.mean(without) + 0.25, (with_cn, without)


@needs_default
def test_default_controlnet_with_another_model_is_a_clear_error():
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    with pytest.raises(
        InputError, match="default ControlNet was trained for fd_trt's default model.*block_out_channels"
    ):
        FasterDiffusionPipeline.from_diffusers(tiny_sd_pipeline(), backend="torch", device="cpu", controlnet="default")


def test_missing_default_controlnet_is_a_clear_error(monkeypatch):
    import fd_trt.families.models as models

    monkeypatch.setattr(models, "default_controlnet_dir", lambda: None)
    with pytest.raises(InputError, match="no default ControlNet.*train_default_controlnet.py"):
        models.load_controlnet("default")


# the command line ------------------------------------------------------------------------------------
def test_cli_mask_writes_the_silhouette(tmp_path, capsys):
    from fd_trt.cli import main

    out = tmp_path / "m.png"
    assert main(["mask", "triangle", "--out", str(out), "--cx", "20", "--size", "24"]) == 0
    img = np.asarray(PIL.Image.open(out))
    assert img.shape == (64, 64, 3)
    assert ((img[..., 0] > 127) == shapes.silhouette("triangle", 20, 32, 24)).all()
    assert main(["mask", "hexagon", "--out", str(out)]) == 2
    assert "unknown shape 'hexagon'" in capsys.readouterr().err


@needs_default
def test_cli_generate_with_the_default_controlnet(tmp_path, capsys):
    from fd_trt.cli import main

    mask, out = tmp_path / "mask.png", tmp_path / "star.png"
    assert main(["mask", "star", "--out", str(mask), "--cx", "20", "--cy", "22", "--size", "28"]) == 0
    rc = main(
        [
            "generate",
            "a red star",
            "--controlnet",
            "default",
            "--image",
            str(mask),
            "--steps",
            "20",
            "--backend",
            "torch",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    img = np.asarray(PIL.Image.open(out).convert("RGB")).astype(np.float32) / 255
    assert img.shape == (64, 64, 3)
    assert _iou(_red_mask(img[None])[0], shapes.silhouette("star", 20, 22, 28)) > 0.4
