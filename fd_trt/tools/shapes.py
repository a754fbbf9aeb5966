"""A procedural dataset of coloured shapes with captions, generated in code (numpy + PIL).

Every scene is 64x64 RGB with one or two objects on a plain or textured, low-saturation
background. Captions read "a red circle", "a blue star on the left", or
"a red circle on the left and a blue square on the right". Each scene also carries its
ground-truth labels (colour, shape, position of every object), so that a checker can be
trained on exactly what the captions promise.

Each scene also carries the ground-truth silhouette mask of its object(s) (``Scene.mask``,
``Dataset.masks``): the union of the objects' antialiased coverage, binarised at 0.5. It comes out
of the same drawing pass as the image, so it draws no random numbers and changes no other output.

Everything is deterministic from a seed: ``generate_dataset(n, seed)`` returns the same images
and captions on every machine (PIL's rasteriser and numpy's ``Generator`` are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
#: Supersampling factor: shapes are drawn at 4x and box-filtered down, which antialiases edges.
_SS = 4

#: Object colours and their nominal RGB. Each object's colour is jittered a little around these.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 175, 50),
    "cyan": (20, 215, 225),
    "blue": (35, 65, 225),
    "purple": (125, 40, 185),
    "magenta": (235, 30, 205),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
#: Positions a single object can be asked for (None: anywhere near the centre).
SINGLE_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "dots", "noise")


@dataclass(frozen=True)
class ShapeObject:
    """One object in a scene.

    Attributes:
        color: a key of `COLORS`.
        shape: one of `SHAPES`.
        position: ``left``/``right``/``top``/``bottom``/``center``, or ``None`` when the caption
            names no position.
        cx, cy: centre in pixels.
        size: the object's diameter in pixels.
    """

    color: str
    shape: str
    position: str | None
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    """A generated image with its caption and labels.

    Attributes:
        image: ``[64, 64, 3]`` uint8 RGB.
        caption: the text prompt describing it.
        objects: one object, or two objects ordered left then right.
        background: one of `BACKGROUNDS`.
        mask: ``[64, 64]`` bool silhouette of the object(s): their union's antialiased coverage,
            binarised at 0.5 (``None`` only for scenes built by hand).
    """

    image: np.ndarray
    caption: str
    objects: list[ShapeObject] = field(default_factory=list)
    background: str = "plain"
    mask: np.ndarray | None = None


@dataclass
class Dataset:
    """A batch of scenes as arrays.

    Attributes:
        images: ``[N, 64, 64, 3]`` uint8.
        captions: N strings.
        num_objects: ``[N]`` int, 1 or 2.
        colors: ``[N, 2]`` int colour indices into `COLOR_NAMES`: single-object scenes use
            column 0 (column 1 is -1); two-object scenes hold (left, right).
        shapes: ``[N, 2]`` int shape indices into `SHAPES`, laid out like ``colors``.
        masks: ``[N, 64, 64]`` bool silhouettes of each scene's object(s) (see `Scene.mask`).
    """

    images: np.ndarray
    captions: list[str]
    num_objects: np.ndarray
    colors: np.ndarray
    shapes: np.ndarray
    masks: np.ndarray | None = None


def caption_for(objects: Sequence[ShapeObject], reverse: bool = False) -> str:
    """The caption of a scene.

    Args:
        objects: one object, or two objects ordered left then right.
        reverse: for two objects, name the right one first.

    Returns:
        e.g. ``"a red circle"`` or ``"a red circle on the left and a blue square on the right"``.
    """
    parts = []
    for o in objects:
        text = f"a {o.color} {o.shape}"
        if o.position is not None:
            text += " " + _POSITION_PHRASE[o.position]
        parts.append(text)
    if reverse:
        parts = parts[::-1]
    return " and ".join(parts)


def single_prompt(color: str, shape: str, position: str | None = None) -> str:
    """``"a {color} {shape}"``, with ``" on the left"`` etc. when a position is given."""
    return caption_for([ShapeObject(color, shape, position, 0, 0, 0)])


def pair_prompt(left: tuple[str, str], right: tuple[str, str]) -> str:
    """``"a {c1} {s1} on the left and a {c2} {s2} on the right"`` for ``(colour, shape)`` pairs."""
    return caption_for(
        [ShapeObject(left[0], left[1], "left", 0, 0, 0), ShapeObject(right[0], right[1], "right", 0, 0, 0)]
    )


def vocabulary() -> set[str]:
    """Every word any caption can contain."""
    words = {"a", "and", "on", "the", "at", "in"}
    words.update(COLOR_NAMES, SHAPES)
    for phrase in _POSITION_PHRASE.values():
        words.update(phrase.split())
    return words


# drawing -------------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    # Polygon vertices at supersampled scale; circles are drawn with ellipse() instead.
    if shape == "square":
        pts = [
            (math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
        scale = r * 0.92  # a square of circumradius r looks bigger than the circle; shrink a bit
    elif shape == "diamond":
        # A rhombus, taller than wide, so it stays distinct from a rotated square.
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
        scale = r
    elif shape == "triangle":
        pts = [
            (math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3), math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        # Push the triangle's centroid down a little so it fills its box like the others.
        pts = [(x, y + 0.15) for x, y in pts]
        scale = r * 1.1
    elif shape == "star":
        pts = []
        for k in range(10):
            a = angle - math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.45
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        scale = r * 1.1
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + scale * x, cy + scale * y) for x, y in pts]


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    # Low-saturation backgrounds, so no background can be mistaken for an object colour.
    n = IMAGE_SIZE
    base = rng.uniform(20, 235)
    tint = rng.uniform(-12, 12, size=3)
    c1 = np.clip(base + tint, 0, 255)
    contrast = rng.uniform(15, 45) * (1 if base < 128 else -1)
    c2 = np.clip(c1 + contrast, 0, 255)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if kind == "plain":
        mask = np.zeros((n, n), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        g = (np.cos(a) * xx + np.sin(a) * yy) / n
        mask = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(5, 12)
        a = rng.uniform(0, math.pi)
        mask = ((np.cos(a) * xx + np.sin(a) * yy) / period % 1.0 < 0.5).astype(np.float32)
    elif kind == "checker":
        cell = int(rng.integers(4, 11))
        mask = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    elif kind == "dots":
        period = int(rng.integers(6, 11))
        rad = rng.uniform(1.0, period / 3.0)
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        mask = (dx * dx + dy * dy < rad * rad).astype(np.float32)
    elif kind == "noise":
        coarse = rng.uniform(0, 1, size=(n // 8, n // 8)).astype(np.float32)
        mask = (
            np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((n, n), Image.BICUBIC), np.float32) / 255
        )
    else:
        raise ValueError(f"unknown background {kind!r}")
    img = c1[None, None, :] * (1 - mask[..., None]) + c2[None, None, :] * mask[..., None]
    return img


def _draw_objects(
    bg: np.ndarray, objects: Sequence[ShapeObject], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    # Returns (image uint8 [64,64,3], silhouette bool [64,64]); the mask costs no random draws.
    n = IMAGE_SIZE * _SS
    canvas = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        rgb = np.clip(np.array(COLORS[o.color], np.float32) + rng.uniform(-14, 14, size=3), 0, 255).astype(int)
        fill = (int(rgb[0]), int(rgb[1]), int(rgb[2]), 255)
        cx, cy, r = o.cx * _SS, o.cy * _SS, o.size * _SS / 2
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            angle = rng.uniform(-0.2, 0.2) if o.shape != "diamond" else 0.0
            draw.polygon(_shape_polygon(o.shape, cx, cy, r, angle), fill=fill)
    small = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), np.float32)
    alpha = small[..., 3:4] / 255.0
    # The RGBA box filter premultiplies nothing, so un-premultiply the colour by coverage.
    color = np.where(alpha > 0, small[..., :3], 0.0)
    out = bg * (1 - alpha) + color * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), alpha[..., 0] >= 0.5


def _place_single(rng: np.random.Generator, position: str | None, size: float) -> tuple[float, float]:
    n, half = IMAGE_SIZE, size / 2
    lo, hi = half + 1, n - half - 1
    if position is None:
        cx, cy = rng.uniform(n / 2 - 10, n / 2 + 10, size=2)
    elif position == "center":
        cx, cy = rng.uniform(n / 2 - 4, n / 2 + 4, size=2)
    elif position in ("left", "right"):
        cx = rng.uniform(lo, n * 0.3) if position == "left" else rng.uniform(n * 0.7, hi)
        cy = rng.uniform(n / 2 - 12, n / 2 + 12)
    else:
        cy = rng.uniform(lo, n * 0.3) if position == "top" else rng.uniform(n * 0.7, hi)
        cx = rng.uniform(n / 2 - 12, n / 2 + 12)
    return float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi))


def random_scene(
    rng: np.random.Generator, num_objects: int | None = None, p_two: float = 0.5, p_position: float = 0.4
) -> Scene:
    """Draws one random scene.

    Args:
        rng: the random source (a ``numpy.random.Generator``).
        num_objects: 1 or 2; random (two with probability ``p_two``) when ``None``.
        p_two: probability of a two-object scene when ``num_objects`` is ``None``.
        p_position: probability that a single object is placed in, and captioned with, a named position.

    Returns:
        A [`Scene`][fd_trt.tools.shapes.Scene].
    """
    if num_objects is None:
        num_objects = 2 if rng.uniform() < p_two else 1
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg = _background(rng, background)
    if num_objects == 1:
        size = float(rng.uniform(18, 38))
        position = SINGLE_POSITIONS[int(rng.integers(len(SINGLE_POSITIONS)))] if rng.uniform() < p_position else None
        if position in ("left", "right", "top", "bottom"):
            size = min(size, 28.0)
        cx, cy = _place_single(rng, position, size)
        c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        objects = [ShapeObject(c, s, position, cx, cy, size)]
        caption = caption_for(objects)
    elif num_objects == 2:
        objects = []
        for side in ("left", "right"):
            size = float(rng.uniform(18, 27))
            half = size / 2
            cx = rng.uniform(half + 1, 30 - half) if side == "left" else rng.uniform(34 + half, 63 - half)
            cy = rng.uniform(half + 8, 56 - half)
            c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            objects.append(ShapeObject(c, s, side, float(cx), float(cy), size))
        caption = caption_for(objects, reverse=bool(rng.uniform() < 0.2))
    else:
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    image, mask = _draw_objects(bg, objects, rng)
    return Scene(image=image, caption=caption, objects=objects, background=background, mask=mask)


def generate_dataset(
    n: int, seed: int, p_two: float = 0.5, num_objects: int | None = None, progress: bool = False
) -> Dataset:
    """Generates ``n`` scenes, deterministically from ``seed``.

    Args:
        n: number of scenes.
        seed: the seed; the same seed gives the same dataset.
        p_two: fraction of two-object scenes (when ``num_objects`` is ``None``).
        num_objects: force 1 or 2 objects per scene.
        progress: show a tqdm progress bar.

    Returns:
        A [`Dataset`][fd_trt.tools.shapes.Dataset].
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    num = np.empty(n, np.int64)
    colors = np.full((n, 2), -1, np.int64)
    shapes = np.full((n, 2), -1, np.int64)
    masks = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), bool)
    for i in tqdm(range(n), desc="shapes", disable=not progress, leave=False):
        scene = random_scene(rng, num_objects=num_objects, p_two=p_two)
        images[i] = scene.image
        masks[i] = scene.mask
        captions.append(scene.caption)
        num[i] = len(scene.objects)
        for j, o in enumerate(scene.objects):
            colors[i, j] = COLOR_NAMES.index(o.color)
            shapes[i, j] = SHAPES.index(o.shape)
    return Dataset(images=images, captions=captions, num_objects=num, colors=colors, shapes=shapes, masks=masks)


def silhouette(
    shape: str,
    cx: float = IMAGE_SIZE / 2,
    cy: float = IMAGE_SIZE / 2,
    size: float = 30.0,
    angle: float = 0.0,
    image_size: int = IMAGE_SIZE,
) -> np.ndarray:
    """The silhouette of one shape, drawn as scenes draw it (supersampled, box-filtered, binarised at 0.5).

    Args:
        shape: one of `SHAPES`.
        cx, cy: the centre in pixels of an ``image_size`` image.
        size: the diameter in pixels.
        angle: rotation in radians (scenes use -0.2 .. 0.2; diamonds are never rotated).
        image_size: the side of the square mask.

    Returns:
        ``[image_size, image_size]`` bool.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    n = image_size * _SS
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * _SS, cy * _SS, size * _SS / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, x, y, r, angle), fill=255)
    small = np.asarray(canvas.resize((image_size, image_size), Image.BOX), np.float32) / 255.0
    return small >= 0.5


def mask_image(mask: np.ndarray) -> Image.Image:
    """A bool mask as the control image of the default ControlNet: white object on black, RGB PNG-ready."""
    m = np.asarray(mask, bool).astype(np.uint8) * 255
    return Image.fromarray(np.stack([m, m, m], -1), "RGB")


def scene_from_labels(
    rng: np.random.Generator, objects: Sequence[tuple[str, str]], position: str | None = None
) -> Scene:
    """Draws a scene for given ``(colour, shape)`` objects (one, or two left-to-right).

    Args:
        rng: the random source for placement, size, background and colour jitter.
        objects: ``[(colour, shape)]`` or ``[(colour, shape), (colour, shape)]``.
        position: for one object, the named position (or ``None``).

    Returns:
        A [`Scene`][fd_trt.tools.shapes.Scene] whose caption names exactly these objects.
    """
    scene = random_scene(rng, num_objects=len(objects))
    objs = []
    for (c, s), o in zip(objects, scene.objects):
        objs.append(ShapeObject(c, s, o.position if len(objects) == 2 else position, o.cx, o.cy, o.size))
    if len(objects) == 1 and position is not None:
        size = min(objs[0].size, 28.0) if position != "center" else objs[0].size
        cx, cy = _place_single(rng, position, size)
        objs[0] = ShapeObject(objects[0][0], objects[0][1], position, cx, cy, size)
    bg = _background(rng, scene.background)
    image, mask = _draw_objects(bg, objs, rng)
    return Scene(image=image, caption=caption_for(objs), objects=objs, background=scene.background, mask=mask)


__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "SHAPES",
    "BACKGROUNDS",
    "IMAGE_SIZE",
    "ShapeObject",
    "Scene",
    "Dataset",
    "caption_for",
    "single_prompt",
    "pair_prompt",
    "vocabulary",
    "random_scene",
    "generate_dataset",
    "scene_from_labels",
    "silhouette",
    "mask_image",
]
