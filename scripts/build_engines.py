#!/usr/bin/env python
"""Builds an engine directory: the encoder/decoder ONNX graphs (and, with TensorRT, its plans).

    python scripts/build_engines.py --model default --out engines/default --backend onnxruntime \
        [--precision fp32|fp16] [--height H --width W] [--batch 1] [--max-segment-steps 15] [--force]

It skips what is up to date (same weights, config, shapes, precision and toolchain) and prints
what it built, with sizes and times. Same as `fd-trt build`.
"""

import sys

from fd_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
