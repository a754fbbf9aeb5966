"""``fd-trt mask``: a silhouette mask PNG, the control image of ``--controlnet default``."""

from __future__ import annotations

import argparse
from typing import Any

from fd_trt.errors import InputError


def add_parser(sub: Any) -> None:
    """Adds ``mask`` to the sub-commands."""
    p = sub.add_parser("mask", help="write a silhouette mask PNG: the control image of --controlnet default")
    p.add_argument("shape", help="circle, square, triangle, star or diamond")
    p.add_argument("--out", default="mask.png", help="output PNG (white object on black)")
    p.add_argument("--size", type=float, default=30.0, help="the shape's diameter in pixels")
    p.add_argument("--cx", type=float, default=None, help="centre x in pixels (default: the middle)")
    p.add_argument("--cy", type=float, default=None, help="centre y in pixels (default: the middle)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square mask (the default model makes 64x64)")


def run(args: argparse.Namespace) -> int:
    """Writes the mask PNG; returns the exit status."""
    from fd_trt.tools.shapes import SHAPES, mask_image, silhouette

    if args.shape not in SHAPES:
        raise InputError(f"unknown shape {args.shape!r}: choose one of {', '.join(SHAPES)}")
    n = args.image_size
    if n < 8 or not 0 < args.size <= n:
        raise InputError(f"--size must be in (0, --image-size={n}] and --image-size at least 8, got --size {args.size}")
    cx = n / 2 if args.cx is None else args.cx
    cy = n / 2 if args.cy is None else args.cy
    m = silhouette(args.shape, cx, cy, args.size, image_size=n)
    if not m.any():
        raise InputError(f"the {args.shape} at ({cx}, {cy}) with size {args.size} lies outside the {n}x{n} image")
    mask_image(m).save(args.out)
    print(f"wrote {args.out} ({n}x{n}, {args.shape}, {int(m.sum())} px)")
    return 0
