#!/usr/bin/env bash
# Downloads, here, the wheels that fd_trt needs and the lent GPU machine's image lacks, into .whl/.
#
#   bash scripts/gpu_wheels.sh            # then run the GPU check with .whl carried along
#
# The GPU machine (an H200, see README "GPU check") cannot reach any package registry. Its image has
# torch with CUDA, transformers, onnx, onnxruntime, numpy, safetensors, tqdm, pillow, pytest and
# huggingface-hub, but not diffusers (nor diffusers' importlib-metadata), onnx-graphsurgeon or
# polygraphy. These are pure-Python wheels, about 7 MB together, well under the 64 MiB a call may
# carry. scripts/gpu_check.sh installs whatever lies in .whl/ into a scratch folder before it runs.
# TensorRT cannot travel this way: PyPI has no wheel of its libraries (only an sdist that fetches
# them from pypi.nvidia.com), and they weigh over 1 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Pinned to the versions the CPU test suite runs with.
WHEELS=(diffusers==0.42.1 importlib-metadata==10.2.0 onnx-graphsurgeon==0.6.1 polygraphy==0.53.6)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
echo "gpu_wheels: $(du -sh .whl | cut -f1) in .whl/; carry it: run(command='bash scripts/gpu_check.sh', carry=['.whl'])"
