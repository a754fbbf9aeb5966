#!/usr/bin/env python
"""Side-by-side benchmark of plain diffusers, fd_trt (per backend and schedule) and DeepCache.

Example (the README's figures):
    python scripts/benchmark.py --model sd15-arch --height 256 --width 256 --steps 50 \
        --backends torch,onnxruntime --precisions fp32,bf16 --repeat 3 --warmup 1 \
        --json bench.json --markdown bench.md --plot bench.png
"""

import sys

from fd_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
