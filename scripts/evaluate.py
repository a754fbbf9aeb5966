#!/usr/bin/env python
"""Evaluates a Stable Diffusion model on the procedural shapes task, with and without Faster Diffusion.

Independent of the model under test, it measures:

- **prompt adherence**: a small CNN checker, trained on the generator's ground-truth labels
  (``fd_trt.tools.shapes``) and validated on held-out real scenes, reads the colour and shape of the
  object (single-object prompts) or of the left and right objects (two-object prompts);
- **Fréchet distance** between generated and real scenes for the same prompts, in the checker's
  128-d feature space (FID-style), with the real-vs-real distance as the floor;
- **fidelity of Faster Diffusion**: PSNR and SSIM of ``paper`` images against ``all`` images with
  the same seeds, and the relative L2 distance of the final latents;
- **the paper's Figure 3**: per step, MSE between adjacent steps of the encoder features (mid +
  skips of ``split_unet``'s encoder) and of the decoder features (output of the last up block),
  and their Frobenius norms;
- seconds per image (CFG 7.5, batch 1) of every mode, timed side by side, and its speedup over ``all``.

It runs DDIM-50 and DPM-Solver++-20, each with ``all``, ``paper`` and ``paper`` without noise
injection, on ``--num-prompts`` prompts (half single-object, half two-object) with fixed seeds.
Outputs ``evaluation.json``, ``evaluation.md``, ``figure3.png`` and ``samples.png`` in ``--out-dir``.

With ``--controlnet default`` (or a ControlNet folder conditioned on silhouette masks) it measures
**mask adherence** instead: per prompt, a control mask drawn by the generator for the prompt's
labels (held-out seeds); DDIM-50 with ``all``, ``paper`` and without the ControlNet; a small
segmentation CNN, trained on the generator's ground-truth masks and cached like the checker,
segments the generated object(s); the mean IoU with the control mask is reported, with the
segmenter's own IoU on held-out real scenes as its floor. Outputs ``evaluation.json``,
``evaluation.md`` and ``controlnet_samples.png``.

Usage::

    python scripts/evaluate.py --model default --num-prompts 128 --out-dir out/eval
    python scripts/evaluate.py --num-prompts 4 --out-dir /tmp/eval --no-timing   # smoke test
    python scripts/evaluate.py --controlnet default --num-prompts 128 --out-dir out/eval_controlnet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fd_trt.tools import shapes  # noqa: E402
from fd_trt.tools.shapes import COLOR_NAMES, SHAPES, pair_prompt, scene_from_labels, single_prompt  # noqa: E402

DEFAULT_CACHE = REPO / "out" / "checker"  # /out/ is git-ignored
#: Bump when the checker's architecture, augmentation or training loop changes: it keys the cache.
CHECKER_VERSION = 1
MODES = (("all", "all", None), ("paper", "paper", None), ("paper_no_injection", "paper", False))
SCHEDULERS = (("ddim", 50), ("dpmpp", 20))
#: Modes that ``--modes`` may add: ``uniform`` spaces as many key steps as the paper's schedule has
#: (9 for DDIM-50, 7 for DPM++-20); ``calibrated`` uses the calibration saved with the model
#: (evaluate it on prompts and seeds other than the calibration's: ``--seed``).
EXTRA_MODES = {
    "uniform": {"ddim": ("uniform:6", None), "dpmpp": ("uniform:3", None)},
    "calibrated": {"ddim": ("calibrated", None), "dpmpp": ("calibrated", None)},
}


def modes_for(names: Sequence[str], sched: str) -> list[tuple[str, str, bool | None]]:
    """``(mode, schedule, noise_injection)`` for the ``--modes`` names; ``all`` always comes first.

    Besides the named modes, a name may be an explicit ``uniform:N`` or ``power:K``, a decoder
    schedule without commas (``deepcache:N``, which equals the DeepCache package's interval N;
    ``combined:power:K|none|1|fresh``), ``tgate:G`` (T-GATE, the ``tgate`` package, at gate step G:
    the peer method, run on the wrapped diffusers pipeline), ``keys:0;2;5;9`` (a list of key steps), or the path of a calibration
    JSON (``fd-trt calibrate --out``): the mode is then called ``cal:<file stem>`` and runs only for
    the scheduler it was calibrated for.
    """
    base = {m: (m, sch, inj) for m, sch, inj in MODES}
    out = [base["all"]]
    for name in names:
        if name == "all":
            continue
        if name in base:
            out.append(base[name])
        elif name in EXTRA_MODES:
            schedule, inj = EXTRA_MODES[name][sched]
            out.append((schedule if name == "uniform" else name, schedule, inj))
        elif name.startswith(("uniform:", "power:", "deepcache:", "combined:")):
            # deepcache:N equals the DeepCache package's interval N (tests/test_decoder_schedule.py)
            out.append((name, name, None))
        elif name.startswith("tgate:"):  # T-GATE (the tgate package) at gate step G: a peer, not fd_trt
            if not name[len("tgate:") :].isdigit():
                raise SystemExit(f"bad mode {name!r}: tgate:G takes T-GATE's gate step G, e.g. tgate:10")
            out.append((name, name, None))
        elif name.startswith("keys:"):  # keys:0;2;5;9, a list of key steps
            keys = [int(k) for k in name[len("keys:") :].split(";")]
            out.append((f"keys:{len(keys)}:{'-'.join(map(str, keys))}", keys, None))
        elif name.endswith(".json"):
            from fd_trt.core.calibration import Calibration

            if Calibration.load(name).scheduler == sched:
                out.append((f"cal:{Path(name).stem}", name, None))
        else:
            raise SystemExit(
                f"unknown mode {name!r}: choose from {', '.join([*base, *EXTRA_MODES])}, uniform:N or a calibration .json"
            )
    return out


# the checker ------------------------------------------------------------------------------------
class Checker(nn.Module):
    """A small CNN reading colour and shape of one object, or of the left and right objects.

    ``forward(x [N,3,64,64] in [0,1]) -> (features [N,128], logits dict)``; logits keys are
    ``one_color, one_shape, left_color, left_shape, right_color, right_shape``.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, 32, 2),  # 32x32
            block(32, 48),
            nn.MaxPool2d(2),  # 16x16
            block(48, 96),
            nn.MaxPool2d(2),  # 8x8
            block(96, 128),
            nn.MaxPool2d(2),  # 4x4: keeps left/right layout for the position heads
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict(
            {
                f"{slot}_{attr}": nn.Linear(128, len(COLOR_NAMES) if attr == "color" else len(SHAPES))
                for slot in ("one", "left", "right")
                for attr in ("color", "shape")
            }
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(features [N,128], logits per head)`` for images in [0, 1]."""
        f = self.fc(self.body(x * 2 - 1))
        return f, {k: h(f) for k, h in self.heads.items()}


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] or float [N,H,W,3] in [0,1] -> float [N,3,H,W] in [0,1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Generated images are softer and noisier than the rasterised ones: blur and add noise so the
    # checker reads colour and shape, not edge sharpness.
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)
    xb = x.reshape(1, n * 3, *x.shape[2:])
    kh = w.repeat_interleave(3, 0).view(n * 3, 1, 1, 5)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kh, groups=n * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kh.transpose(2, 3), groups=n * 3)
    x = xb.view_as(x)
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.04)
    return x.clamp(0, 1)


def _checker_loss(
    logits: dict[str, torch.Tensor], num: torch.Tensor, colors: torch.Tensor, shapes_: torch.Tensor
) -> torch.Tensor:
    one, two = num == 1, num == 2
    loss = torch.zeros(())
    if one.any():
        loss = (
            loss
            + F.cross_entropy(logits["one_color"][one], colors[one, 0])
            + F.cross_entropy(logits["one_shape"][one], shapes_[one, 0])
        )
    if two.any():
        for j, slot in enumerate(("left", "right")):
            loss = loss + F.cross_entropy(logits[f"{slot}_color"][two], colors[two, j])
            loss = loss + F.cross_entropy(logits[f"{slot}_shape"][two], shapes_[two, j])
    return loss


@dataclass
class CheckerConfig:
    """How the checker is trained (also its cache key)."""

    num_images: int = 8000
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 1234

    def key(self) -> str:
        """A hash of the dataset code, :data:`CHECKER_VERSION` and this config: the cache file name."""
        src = Path(shapes.__file__).read_bytes() + f"v{CHECKER_VERSION}".encode()
        return hashlib.sha256(src + repr(self).encode()).hexdigest()[:16]


def train_checker(cfg: CheckerConfig = CheckerConfig(), progress: bool = True) -> Checker:
    """Trains the checker on freshly generated scenes, deterministically from ``cfg.seed``.

    Args:
        cfg: data size, steps, batch, learning rate and seed.
        progress: show a tqdm bar.

    Returns:
        The trained :class:`Checker` in eval mode.
    """
    from tqdm.auto import tqdm

    data = shapes.generate_dataset(cfg.num_images, seed=cfg.seed, p_two=0.5)
    x_all = _images_to_tensor(data.images)
    num = torch.from_numpy(data.num_objects)
    colors = torch.from_numpy(data.colors)
    shp = torch.from_numpy(data.shapes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Checker()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    for step in tqdm(range(cfg.steps), desc="checker", disable=not progress, leave=False):
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / 50)
            g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.randint(0, cfg.num_images, (cfg.batch,), generator=gen)
        _, logits = model(_augment(x_all[idx], gen))
        loss = _checker_loss(logits, num[idx], colors[idx], shp[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def load_or_train_checker(
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE,
    cfg: CheckerConfig = CheckerConfig(),
    progress: bool = True,
) -> Checker:
    """Returns the cached checker for ``cfg`` (keyed by the dataset code and config), training it if absent.

    Args:
        cache_dir: a git-ignored folder for the weights; ``None`` always retrains.
        cfg: the training configuration.
        progress: show a tqdm bar while training.

    Returns:
        The checker in eval mode.
    """
    return _load_or_train("checker", Checker, train_checker, cache_dir, cfg, progress)


def _load_or_train(
    name: str,
    make: Callable[[], nn.Module],
    train: Callable[..., nn.Module],
    cache_dir: str | os.PathLike[str] | None,
    cfg: Any,
    progress: bool,
) -> Any:
    """The cached ``<name>_<cfg.key()>.pt`` weights in ``cache_dir`` (``None``: always train), or
    ``train(cfg, progress=...)`` saved there atomically; the model comes back in eval mode."""
    path = Path(cache_dir) / f"{name}_{cfg.key()}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        model = make()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train(cfg, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model.eval()


@torch.no_grad()
def checker_read(
    model: Checker, images: np.ndarray, num_objects: Sequence[int], batch: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads colours and shapes.

    Args:
        model: the checker.
        images: ``[N,64,64,3]`` uint8, or float in [0, 1].
        num_objects: per image, 1 (read the ``one`` heads) or 2 (``left`` and ``right``).

    Returns:
        ``(colors [N,2], shapes [N,2], features [N,128])``; column 1 is -1 for single objects.
    """
    feats, cols, shps = [], [], []
    for i in range(0, len(images), batch):
        f, lg = model(_images_to_tensor(images[i : i + batch]))
        feats.append(f.numpy())
        cols.append(
            torch.stack([lg["one_color"].argmax(1), lg["left_color"].argmax(1), lg["right_color"].argmax(1)], 1).numpy()
        )
        shps.append(
            torch.stack([lg["one_shape"].argmax(1), lg["left_shape"].argmax(1), lg["right_shape"].argmax(1)], 1).numpy()
        )
    c, s = np.concatenate(cols), np.concatenate(shps)
    n = np.asarray(num_objects)
    out_c = np.where(n[:, None] == 1, np.stack([c[:, 0], np.full(len(n), -1)], 1), c[:, 1:])
    out_s = np.where(n[:, None] == 1, np.stack([s[:, 0], np.full(len(n), -1)], 1), s[:, 1:])
    return out_c, out_s, np.concatenate(feats)


def adherence(
    pred_c: np.ndarray, pred_s: np.ndarray, true_c: np.ndarray, true_s: np.ndarray, num: np.ndarray
) -> dict[str, Any]:
    """Accuracy per attribute for single- and two-object prompts.

    Returns:
        ``{"single": {color, shape, both, n}, "two": {color, shape, object_both, both_objects, n}}``:
        ``single.both`` is colour and shape right; ``two.both_objects`` is all four attributes right.
    """
    num = np.asarray(num)
    out: dict[str, Any] = {}
    one = num == 1
    if one.any():
        c = pred_c[one, 0] == true_c[one, 0]
        s = pred_s[one, 0] == true_s[one, 0]
        out["single"] = {
            "color": float(c.mean()),
            "shape": float(s.mean()),
            "both": float((c & s).mean()),
            "n": int(one.sum()),
        }
    two = num == 2
    if two.any():
        c = pred_c[two] == true_c[two]
        s = pred_s[two] == true_s[two]
        out["two"] = {
            "color": float(c.mean()),
            "shape": float(s.mean()),
            "object_both": float((c & s).mean()),
            "both_objects": float((c & s).all(1).mean()),
            "n": int(two.sum()),
        }
    return out


def real_accuracy(model: Checker, n: int = 1000, seed: int = 98765) -> dict[str, Any]:
    """The checker's accuracy on held-out real scenes (a seed the checker never saw)."""
    data = shapes.generate_dataset(n, seed=seed, p_two=0.5)
    c, s, _ = checker_read(model, data.images, data.num_objects)
    return adherence(c, s, data.colors, data.shapes, data.num_objects)


# metrics -----------------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as FID), without scipy.

    Args:
        a, b: ``[N, D]`` features.

    Returns:
        ``|mu_a - mu_b|^2 + tr(Sa) + tr(Sb) - 2 tr((Sa^1/2 Sb Sa^1/2)^1/2)``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of ``[N,H,W,C]`` images in [0, 1]."""
    mse = ((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2).reshape(len(x), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, per channel, averaged) of ``[N,H,W,C]`` images in [0, 1]."""
    a, b = _images_to_tensor(np.asarray(x, np.float32)).double(), _images_to_tensor(np.asarray(y, np.float32)).double()
    k = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    k = k / k.sum()
    win = (k[:, None] * k[None, :]).expand(a.shape[1], 1, 11, 11)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, win, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = filt(a), filt(b)
    saa, sbb, sab = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


# prompts and generation ------------------------------------------------------------------------
@dataclass
class PromptSet:
    """Evaluation prompts with their labels and seeds."""

    prompts: list[str]
    num_objects: np.ndarray
    colors: np.ndarray
    shapes: np.ndarray
    seeds: list[int]


def make_prompts(n: int, seed: int = 0) -> PromptSet:
    """``n`` prompts: the first half single-object (every colour x shape once, then random), the rest left/right pairs.

    Args:
        n: number of prompts (at least 2).
        seed: seeds the prompt choice and the per-prompt generation seeds.

    Returns:
        A :class:`PromptSet`.
    """
    rng = np.random.default_rng(seed)
    n_single = n // 2
    combos = [(c, s) for c in range(len(COLOR_NAMES)) for s in range(len(SHAPES))]
    order = rng.permutation(len(combos))
    prompts, num, cols, shps = [], [], [], []
    for i in range(n_single):
        c, s = combos[order[i % len(combos)]] if i < len(combos) else combos[int(rng.integers(len(combos)))]
        prompts.append(single_prompt(COLOR_NAMES[c], SHAPES[s]))
        num.append(1)
        cols.append((c, -1))
        shps.append((s, -1))
    for _ in range(n - n_single):
        while True:
            c1, c2 = rng.integers(len(COLOR_NAMES), size=2)
            s1, s2 = rng.integers(len(SHAPES), size=2)
            if (c1, s1) != (c2, s2):
                break
        prompts.append(pair_prompt((COLOR_NAMES[c1], SHAPES[s1]), (COLOR_NAMES[c2], SHAPES[s2])))
        num.append(2)
        cols.append((int(c1), int(c2)))
        shps.append((int(s1), int(s2)))
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, size=n)]
    return PromptSet(prompts, np.array(num), np.array(cols), np.array(shps), seeds)


def real_images(ps: PromptSet, seed: int) -> np.ndarray:
    """One real scene per prompt, drawn by the generator for the same labels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(len(ps.prompts)):
        objs = [(COLOR_NAMES[ps.colors[k, j]], SHAPES[ps.shapes[k, j]]) for j in range(int(ps.num_objects[k]))]
        out.append(scene_from_labels(rng, objs).image)
    return np.stack(out)


def generate(
    pipe: Any, ps: PromptSet, steps: int, schedule: str, noise_injection: bool | None, batch: int, guidance: float = 7.5
) -> tuple[np.ndarray, torch.Tensor, float]:
    """Generates one image per prompt with its fixed seed.

    Returns:
        ``(images [N,64,64,3] float in [0,1], latents [N,4,h,w], seconds)``.
    """
    images, latents = [], []
    t0 = time.perf_counter()
    for i in range(0, len(ps.prompts), batch):
        prompts = ps.prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(s) for s in ps.seeds[i : i + batch]]
        imgs, lat = run_mode(pipe, prompts, steps, schedule, noise_injection, guidance, gens)
        images.append(np.asarray(imgs))
        latents.append(lat.cpu())
    return np.concatenate(images), torch.cat(latents), time.perf_counter() - t0


def run_mode(
    pipe: Any,
    prompts: Any,
    steps: int,
    schedule: Any,
    noise_injection: bool | None,
    guidance: float,
    generator: Any,
) -> tuple[Any, torch.Tensor]:
    """One call of a mode: the fd_trt pipeline with ``schedule``, or for ``tgate:G`` T-GATE over the
    wrapped diffusers pipeline (same scheduler, seeds and guidance). Returns ``(images as np, latents)``."""
    if isinstance(schedule, str) and schedule.startswith("tgate:"):
        from fd_trt.tools.bench import run_tgate

        return run_tgate(
            pipe.sd,
            prompts,
            int(schedule[len("tgate:") :]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
        )
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
        schedule=schedule,
        noise_injection=noise_injection,
    )
    return out.images, out.latents


def figure3(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 7.5
) -> dict[str, list[float]]:
    """The paper's Figure 3 on DDIM (:func:`fd_trt.tools.calibrate.feature_changes`)."""
    from fd_trt.tools.calibrate import feature_changes

    return feature_changes(pipe, "ddim", steps, prompts, seeds, guidance)


def plot_figure3(fig3: dict[str, list[float]], path: Path) -> None:
    """Plots :func:`figure3` to ``path`` (PNG)."""
    from fd_trt.tools.calibrate import plot_feature_changes

    plot_feature_changes(
        fig3, path, title="Figure 3 of Faster Diffusion on the default model (DDIM-50, CFG 7.5, conditional rows)"
    )


def save_samples(rows: dict[str, np.ndarray], real: np.ndarray, path: Path, n: int = 8) -> None:
    """A grid: one row per mode (first ``n`` prompts), plus the real scenes."""
    from PIL import Image, ImageDraw

    labels = ["real", *rows]
    arrays = [real[:n].astype(np.float32) / 255.0, *[v[:n] for v in rows.values()]]
    cols = min(n, len(real))
    grid = Image.new("RGB", (110 + cols * 64, len(arrays) * 64), "white")
    draw = ImageDraw.Draw(grid)
    for r, (lab, arr) in enumerate(zip(labels, arrays)):
        draw.text((2, r * 64 + 26), lab[:18], fill="black")
        for c in range(cols):
            grid.paste(Image.fromarray((np.clip(arr[c], 0, 1) * 255).round().astype(np.uint8)), (110 + c * 64, r * 64))
    grid.save(path)


def time_modes(
    pipe: Any,
    steps: int,
    modes: Sequence[tuple[str, str, bool | None]],
    repeats: int = 3,
    prompt: str = "a red circle on the left and a blue square on the right",
    guidance: float = 7.5,
) -> dict[str, dict[str, float]]:
    """Median seconds for one 64x64 image (CFG ``guidance``, batch 1) per mode, measured side by side.

    The modes run interleaved, one warm-up round then ``repeats`` timed rounds, on the pipeline's
    current scheduler, so that their ratios are not skewed by load that changes over time.

    Returns:
        ``{mode: {"wall": s, "cpu": s, "speedup_vs_all": x}}``: median wall and process CPU
        seconds, and the wall speedup over the ``all`` mode (the first one). On a shared CPU the
        CPU seconds divided by the thread count estimate the wall time on an idle machine.
    """
    wall: dict[str, list[float]] = {m: [] for m, _, _ in modes}
    cpu: dict[str, list[float]] = {m: [] for m, _, _ in modes}
    for r in range(repeats + 1):
        for mode, schedule, inj in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            run_mode(pipe, prompt, steps, schedule, inj, guidance, torch.Generator().manual_seed(r))
            if r:
                wall[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
    out = {m: {"wall": float(np.median(wall[m])), "cpu": float(np.median(cpu[m]))} for m in wall}
    ref = out[modes[0][0]]
    for m in out:
        out[m]["speedup_vs_all"] = ref["wall"] / out[m]["wall"]
        out[m]["speedup_vs_all_cpu"] = ref["cpu"] / out[m]["cpu"]
    return out


# the segmenter (mask adherence of a ControlNet) -------------------------------------------------
#: Bump when the segmenter's architecture or training changes: it keys its cache.
SEGMENTER_VERSION = 1


class Segmenter(nn.Module):
    """A small fully convolutional net: ``forward(x [N,3,64,64] in [0,1]) -> logits [N,1,64,64]``
    of "object pixel" (any coloured shape, not the background)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1 = block(3, 16)  # 64x64
        self.enc2 = nn.Sequential(block(16, 32, 2), block(32, 32))  # 32x32
        self.enc3 = nn.Sequential(block(32, 64, 2), block(64, 64))  # 16x16: context for textured backgrounds
        self.dec2 = block(64 + 32, 32)
        self.dec1 = block(32 + 16, 16)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x * 2 - 1)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.out(d1)


@dataclass
class SegmenterConfig:
    """How the segmenter is trained (also its cache key)."""

    num_images: int = 4000
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    seed: int = 4321

    def key(self) -> str:
        """A hash of the dataset code, :data:`SEGMENTER_VERSION` and this config: the cache file name."""
        src = Path(shapes.__file__).read_bytes() + f"seg-v{SEGMENTER_VERSION}".encode()
        return hashlib.sha256(src + repr(self).encode()).hexdigest()[:16]


def train_segmenter(cfg: SegmenterConfig = SegmenterConfig(), progress: bool = True) -> Segmenter:
    """Trains the segmenter on generator scenes and their ground-truth masks (``Dataset.masks``),
    with the checker's blur-and-noise augmentation; deterministic from ``cfg.seed``."""
    from tqdm.auto import tqdm

    data = shapes.generate_dataset(cfg.num_images, seed=cfg.seed, p_two=0.5)
    x_all = _images_to_tensor(data.images)
    y_all = torch.from_numpy(data.masks).float()[:, None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Segmenter()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    for step in tqdm(range(cfg.steps), desc="segmenter", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.randint(0, cfg.num_images, (cfg.batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(_augment(x_all[idx], gen)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def load_or_train_segmenter(
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE,
    cfg: SegmenterConfig = SegmenterConfig(),
    progress: bool = True,
) -> Segmenter:
    """Returns the cached segmenter for ``cfg`` (keyed like the checker), training it if absent."""
    return _load_or_train("segmenter", Segmenter, train_segmenter, cache_dir, cfg, progress)


@torch.no_grad()
def segment(model: Segmenter, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Object masks ``[N,64,64]`` bool of ``[N,64,64,3]`` images (uint8, or float in [0, 1])."""
    out = [(model(_images_to_tensor(images[i : i + batch]))[:, 0] > 0).numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image IoU of ``[N,H,W]`` bool masks (1.0 where both are empty)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    inter = (pred & target).reshape(len(pred), -1).sum(1)
    union = (pred | target).reshape(len(pred), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def segmenter_real_iou(model: Segmenter, n: int = 1000, seed: int = 97531) -> dict[str, float]:
    """The segmenter's IoU against the ground truth on held-out real scenes (its accuracy floor)."""
    data = shapes.generate_dataset(n, seed=seed, p_two=0.5)
    iou = mask_iou(segment(model, data.images), data.masks)
    return {"mean": float(iou.mean()), "min": float(iou.min()), "p05": float(np.quantile(iou, 0.05)), "n": n}


def control_masks(ps: PromptSet, seed: int) -> np.ndarray:
    """One control mask per prompt: the silhouette of a generator scene for the prompt's labels,
    drawn with held-out seeds (the default ControlNet trained on ``generate_dataset`` seeds)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(len(ps.prompts)):
        objs = [(COLOR_NAMES[ps.colors[k, j]], SHAPES[ps.shapes[k, j]]) for j in range(int(ps.num_objects[k]))]
        out.append(scene_from_labels(rng, objs).mask)
    return np.stack(out)


def generate_controlled(
    pipe: Any,
    ps: PromptSet,
    masks: np.ndarray | None,
    steps: int,
    schedule: str,
    batch: int,
    guidance: float = 7.5,
    scale: float = 1.0,
) -> tuple[np.ndarray, float]:
    """Like :func:`generate`, with one control mask per prompt (``None``: a pipeline without ControlNet)."""
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(ps.prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in ps.seeds[i : i + batch]]
        extra: dict[str, Any] = {}
        if masks is not None:
            extra = {
                "image": [shapes.mask_image(m) for m in masks[i : i + batch]],
                "controlnet_conditioning_scale": scale,
            }
        out = pipe(
            ps.prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            schedule=schedule,
            **extra,
        )
        images.append(np.asarray(out.images))
    return np.concatenate(images), time.perf_counter() - t0


def evaluate_controlnet(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Mask adherence of a ControlNet (DDIM-50): IoU between the segmented generated object(s) and
    the control mask, for ``all``, ``paper`` and the same prompts and seeds without the ControlNet."""
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seg = load_or_train_segmenter(args.checker_cache or None, progress=not args.no_progress)
    seg_real = segmenter_real_iou(seg, n=1000 if args.num_prompts >= 32 else 200)
    print(f"segmenter IoU on held-out real scenes: {seg_real['mean']:.3f}", flush=True)
    ps = make_prompts(args.num_prompts, seed=args.seed)
    masks = control_masks(ps, seed=args.seed + 7919)
    pipe = FasterDiffusionPipeline.from_pretrained(
        args.model, backend="torch", device="cpu", progress=False, controlnet=args.controlnet
    )
    plain = FasterDiffusionPipeline.from_pretrained(args.model, backend="torch", device="cpu", progress=False)
    for p_ in (pipe, plain):
        p_.set_scheduler("ddim")
    res: dict[str, Any] = {
        "model": pipe.source,
        "controlnet": args.controlnet,
        "command": "python scripts/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "num_prompts": len(ps.prompts),
        "num_single": int((ps.num_objects == 1).sum()),
        "num_two": int((ps.num_objects == 2).sum()),
        "guidance": args.guidance,
        "controlnet_scale": args.controlnet_scale,
        "threads": args.threads,
        "segmenter_real_iou": seg_real,
        "runs": {},
    }
    one = ps.num_objects == 1
    rows: dict[str, np.ndarray] = {}
    for name, p_, schedule, m in (
        ("all", pipe, "all", masks),
        ("paper", pipe, "paper", masks),
        ("no_controlnet", plain, "all", None),
    ):
        imgs, secs = generate_controlled(p_, ps, m, 50, schedule, args.batch, args.guidance, args.controlnet_scale)
        iou = mask_iou(segment(seg, imgs), masks)
        res["runs"][name] = {
            "scheduler": "ddim",
            "steps": 50,
            "schedule": schedule,
            "controlnet": m is not None,
            "iou_mean": float(iou.mean()),
            "iou_single": float(iou[one].mean()) if one.any() else None,
            "iou_two": float(iou[~one].mean()) if (~one).any() else None,
            "iou_median": float(np.median(iou)),
            "seconds": secs,
        }
        rows[name] = imgs
        print(
            f"ddim-50 {name:<14} IoU {iou.mean():.3f} (single {res['runs'][name]['iou_single']}, "
            f"two {res['runs'][name]['iou_two']})  {secs:.0f} s",
            flush=True,
        )
    res["paper_minus_all"] = res["runs"]["paper"]["iou_mean"] - res["runs"]["all"]["iou_mean"]
    masks_rgb = np.repeat(masks[..., None], 3, -1).astype(np.uint8) * 255
    save_samples(rows, masks_rgb, out_dir / "controlnet_samples.png")
    res["total_seconds"] = time.perf_counter() - t_start
    (out_dir / "evaluation.json").write_text(json.dumps(res, indent=1))
    r = res["runs"]
    lines = [
        f"# Mask adherence of ControlNet `{args.controlnet}` on `{res['model']}`",
        "",
        f"{res['num_prompts']} prompts ({res['num_single']} single-object, {res['num_two']} two-object), one control mask per "
        f"prompt (generator silhouettes, held-out seeds), fixed seeds, DDIM-50, CFG {args.guidance}, ControlNet scale "
        f"{args.controlnet_scale}. IoU between the segmented generated object(s) and the control mask; the segmenter's "
        f"IoU on held-out real scenes (its floor) is {seg_real['mean']:.3f}.",
        "",
        "| mode | mean IoU | single | two | median |",
        "|---|---|---|---|---|",
    ]
    for name, v in r.items():
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(
            f"| {name} | {v['iou_mean']:.3f} | {f(v['iou_single'])} | {f(v['iou_two'])} | {v['iou_median']:.3f} |"
        )
    lines += ["", f"`paper` - `all`: {res['paper_minus_all']:+.3f}.", "", f"Command: `{res['command']}`", ""]
    (out_dir / "evaluation.md").write_text("\n".join(lines))
    print((out_dir / "evaluation.md").read_text())
    print(
        f"wrote {out_dir}/evaluation.json, evaluation.md, controlnet_samples.png in {res['total_seconds']:.0f} s",
        flush=True,
    )
    return res


def _is_transformer(pipe: Any) -> bool:
    """Whether ``pipe`` runs a diffusion transformer (``--model default-dit``) rather than a UNet."""
    from fd_trt.pipelines.transformer import FasterDiffusionTransformerPipeline

    return isinstance(pipe, FasterDiffusionTransformerPipeline)


def _cpu_name() -> str:
    from fd_trt.tools.bench import _cpu_name as name

    return name()


# report ----------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    """Writes the results table, the VAE bound, Figure 3 and timings of ``res`` as markdown to ``path``."""
    lines = [
        f"# Evaluation of `{res['model']}`",
        "",
        f"{res['num_prompts']} prompts ({res['num_single']} single-object, {res['num_two']} two-object), fixed seeds, "
        f"CFG {res['guidance']}. Checker accuracy on held-out real scenes: single {_pct(res['checker_real']['single']['both'])}%, "
        f"two-object {_pct(res['checker_real']['two']['both_objects'])}% (both objects right). "
        f"Fréchet distance real vs real (floor): {res['fd_real_vs_real']:.2f}.",
        "",
        "| scheduler | mode | single: colour | shape | both | two: colour | shape | both objects | FD | PSNR vs all (dB) | SSIM vs all | rel. L2 latents | s | speedup vs all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        sched, mode = name.split("/")
        a = r["adherence"]
        s, t = a.get("single", {}), a.get("two", {})
        fid = r.get("fidelity_vs_all", {})
        lines.append(
            f"| {sched} | {mode} | {_pct(s.get('color'))} | {_pct(s.get('shape'))} | {_pct(s.get('both'))} | "
            f"{_pct(t.get('color'))} | {_pct(t.get('shape'))} | {_pct(t.get('both_objects'))} | {r['frechet']:.2f} | "
            + (
                f"{fid['psnr_mean']:.2f} | {fid['ssim_mean']:.4f} | {fid['rel_l2_latents_mean']:.4f}"
                if fid
                else "- | - | -"
            )
            + f" | {r['seconds']:.1f} | "
            + (f"{r['timing']['speedup_vs_all']:.2f}x |" if r.get("timing") else "- |")
        )
    if "vae_reconstruction" in res:
        a = res["vae_reconstruction"]
        lines += [
            "",
            f"Upper bound from the VAE alone (checker on VAE reconstructions of the real scenes): single "
            f"{_pct(a['single']['both'])}%, two-object {_pct(a['two']['both_objects'])}%.",
        ]
    f3 = res["figure3"]
    lines += (
        []
        if not f3
        else [
            "",
            "## Figure 3 (DDIM-50)",
            "",
            "| features | mean adjacent-step MSE | mean relative change | mean Frobenius norm |",
            "|---|---|---|---|",
            f"| encoder (mid + skips) | {f3['enc_mse_mean']:.4g} | {f3['enc_rel_mean']:.4f} | {f3['enc_fnorm_mean']:.4g} |",
            f"| decoder (last up block) | {f3['dec_mse_mean']:.4g} | {f3['dec_rel_mean']:.4f} | {f3['dec_fnorm_mean']:.4g} |",
            "",
            f"Figure 3 holds (encoder MSE below decoder MSE): **{f3['holds_mse']}**; by relative change: **{f3['holds_rel']}**.",
        ]
    )
    if res.get("timing"):
        tm = res["timing"]
        lines += [
            "",
            f"Speedup: median wall seconds per 64x64 image (CFG {res['guidance']}, batch 1, torch, {tm['threads']} threads, "
            f"{tm['cpu']}), every mode of a scheduler timed side by side, interleaved, {tm['repeats']} rounds after "
            "one warm-up round; the ratio to `all` of the same scheduler.",
            "",
        ]
        for name, r in res["runs"].items():
            if r.get("timing"):
                t = r["timing"]
                lines.append(
                    f"- {name}: {t['wall']:.3f} s wall ({t['speedup_vs_all']:.2f}x), "
                    f"{t['cpu']:.3f} s CPU ({t['speedup_vs_all_cpu']:.2f}x)"
                )
    lines += ["", f"Command: `{res['command']}`", ""]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``argv``, or ``sys.argv[1:]`` when ``None``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'default-dit' or a local diffusers folder")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--out-dir", default=str(REPO / "out" / "eval"))
    p.add_argument("--seed", type=int, default=0, help="seeds prompts and generation")
    p.add_argument("--batch", type=int, default=16, help="prompts per pipeline call")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fig3-prompts", type=int, default=8, help="prompts averaged in Figure 3")
    p.add_argument("--checker-cache", default=str(DEFAULT_CACHE), help="folder for the checker weights ('' to retrain)")
    p.add_argument("--schedulers", default="ddim,dpmpp", help="comma-separated subset of ddim,dpmpp")
    p.add_argument(
        "--modes",
        default="all,paper,paper_no_injection",
        help="comma-separated: all, paper, paper_no_injection, uniform (same K as paper), calibrated, "
        "uniform:N, power:K, keys:0;2;5;9, tgate:G (T-GATE at gate step G), a decoder schedule without commas (deepcache:N, "
        "combined:power:K|none|1|fresh), or a calibration .json",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the seconds-per-image measurement")
    p.add_argument("--timing-repeats", type=int, default=3, help="timed rounds per mode (after one warm-up round)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--controlnet",
        default=None,
        help="'default' or a ControlNet folder conditioned on silhouette masks: measure mask adherence "
        "(IoU, DDIM-50, all / paper / without the ControlNet) instead of the text-to-image evaluation",
    )
    p.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="controlnet_conditioning_scale with --controlnet"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation and writes JSON, markdown and PNGs.

    Args:
        argv: command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status, 0.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.controlnet:
        evaluate_controlnet(args, argv)
        return 0
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    checker = load_or_train_checker(args.checker_cache or None, progress=not args.no_progress)
    checker_real = real_accuracy(checker, n=1000 if args.num_prompts >= 32 else 200)
    print(
        f"checker on held-out real scenes: single {checker_real['single']['both']:.3f}, two {checker_real['two']['both_objects']:.3f}",
        flush=True,
    )

    ps = make_prompts(args.num_prompts, seed=args.seed)
    real = real_images(ps, seed=args.seed + 1)
    real2 = real_images(ps, seed=args.seed + 2)
    _, _, f_real = checker_read(checker, real, ps.num_objects)
    _, _, f_real2 = checker_read(checker, real2, ps.num_objects)

    pipe = FasterDiffusionPipeline.from_pretrained(args.model, backend="torch", device="cpu", progress=False)
    res: dict[str, Any] = {
        "model": pipe.source,
        "command": "python scripts/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "num_prompts": len(ps.prompts),
        "num_single": int((ps.num_objects == 1).sum()),
        "num_two": int((ps.num_objects == 2).sum()),
        "guidance": args.guidance,
        "threads": args.threads,
        "checker_real": checker_real,
        "fd_real_vs_real": frechet_distance(f_real, f_real2),
        "runs": {},
    }
    # The VAE alone bounds what any UNet can reach through it.
    with torch.no_grad():
        vae = pipe.sd.vae
        x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        rec_np = ((rec + 1) / 2).permute(0, 2, 3, 1).numpy()
    rc, rs, _ = checker_read(checker, rec_np, ps.num_objects)
    res["vae_reconstruction"] = adherence(rc, rs, ps.colors, ps.shapes, ps.num_objects)

    sample_rows: dict[str, np.ndarray] = {}
    for sched, steps in SCHEDULERS:
        if sched not in args.schedulers.split(","):
            continue
        pipe.set_scheduler(sched)
        base_imgs, base_lat = None, None
        modes = modes_for(args.modes.split(","), sched)
        for mode, schedule, inj in modes:
            imgs, lat, secs = generate(pipe, ps, steps, schedule, inj, args.batch, args.guidance)
            c, s, f = checker_read(checker, imgs, ps.num_objects)
            run: dict[str, Any] = {
                "steps": steps,
                "schedule": schedule,
                "noise_injection": inj,
                "adherence": adherence(c, s, ps.colors, ps.shapes, ps.num_objects),
                "frechet": frechet_distance(f, f_real),
                "seconds": secs,
                "nonfinite": bool(not np.isfinite(imgs).all()),
            }
            if mode == "all":
                base_imgs, base_lat = imgs, lat
            else:
                p_ = psnr(imgs, base_imgs)
                rel = ((lat - base_lat).flatten(1).norm(dim=1) / base_lat.flatten(1).norm(dim=1)).numpy()
                run["fidelity_vs_all"] = {
                    "psnr_mean": float(np.mean(np.minimum(p_, 100.0))),
                    "psnr_median": float(np.median(p_)),
                    "ssim_mean": float(ssim(imgs, base_imgs).mean()),
                    "rel_l2_latents_mean": float(rel.mean()),
                }
            res["runs"][f"{sched}/{mode}"] = run
            sample_rows[f"{sched}-{steps} {mode}"] = imgs
            a = run["adherence"]
            print(
                f"{sched:>6} {mode:<19} single {a['single']['both']:.3f}  two {a.get('two', {}).get('both_objects', float('nan')):.3f}  "
                f"FD {run['frechet']:.2f}  {secs:.0f} s",
                flush=True,
            )
        if not args.no_timing:
            tm = time_modes(pipe, steps, modes, repeats=args.timing_repeats, guidance=args.guidance)
            for mode, _, _ in modes:
                res["runs"][f"{sched}/{mode}"]["timing"] = tm[mode]
                print(
                    f"{sched:>6} {mode:<19} {tm[mode]['wall']:.3f} s/image  speedup vs all {tm[mode]['speedup_vs_all']:.2f}x",
                    flush=True,
                )
    if _is_transformer(pipe):
        # Figure 3 is the UNet's encoder against its decoder; a transformer's per-block change is
        # what `fd-trt calibrate --plot` draws (docs/guides/dit.md).
        res["figure3"] = None
    else:
        pipe.set_scheduler("ddim")
        n3 = max(1, min(args.fig3_prompts, len(ps.prompts)))
        pick = np.linspace(0, len(ps.prompts) - 1, n3).round().astype(int)
        fig3 = figure3(
            pipe, [ps.prompts[i] for i in pick], [ps.seeds[i] for i in pick], steps=50, guidance=args.guidance
        )
        summary = {f"{k}_mean": float(np.mean(v)) for k, v in fig3.items()}
        summary["holds_mse"] = bool(summary["enc_mse_mean"] < summary["dec_mse_mean"])
        summary["holds_rel"] = bool(summary["enc_rel_mean"] < summary["dec_rel_mean"])
        res["figure3"] = {**summary, "per_step": fig3, "num_prompts": int(n3)}
        plot_figure3(fig3, out_dir / "figure3.png")
    save_samples(sample_rows, real, out_dir / "samples.png")
    if not args.no_timing:
        res["timing"] = {"threads": args.threads, "repeats": args.timing_repeats, "cpu": _cpu_name()}
    res["total_seconds"] = time.perf_counter() - t_start
    (out_dir / "evaluation.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / "evaluation.md")
    print((out_dir / "evaluation.md").read_text())
    print(
        f"wrote {out_dir}/evaluation.json, evaluation.md, {'figure3.png, ' if res['figure3'] else ''}samples.png "
        f"in {res['total_seconds']:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
