#!/usr/bin/env bash
# Every GPU check of fd_trt in one call, under 8 minutes on one H100/H200; no downloads.
#
#   scripts/gpu_check.sh [--budget-s 450] [--repeat 3] [--skip-tests] [--skip-sd15] ...
#
# 1. the GPU tests (pytest -m gpu tests/test_gpu.py tests/test_tensorrt.py);
# 2. fp16 CUDA pipeline vs the fp32 CPU reference on the tiny model;
# 3. SD1.5-shaped random UNet, 512x512, DDIM-50, CFG, fp16: schedules all vs paper on torch CUDA
#    without and with CUDA graphs, with channels_last, and on TensorRT when it is importable (CUDA-event medians
#    after warm-up, peak GPU memory);
# 4. SDXL-shaped random UNet (2.6B), 1024x1024, DDIM-50, CFG 5.0, fp16: all vs paper on torch CUDA,
#    with and without CUDA graphs (--skip-sdxl leaves it out);
# 5. PixArt-alpha-shaped random transformer (0.6B), 1024x1024, DPM-Solver++ 20, CFG 4.5, fp16: all vs
#    paper on torch CUDA (--skip-pixart leaves it out).
# The table is printed last; $OUT/gpu_check.json is written when OUT is set. Without a CUDA GPU it
# says why it skips and exits 0. Uses $PYTHON, else .venv/bin/python, else python3. On a machine
# without diffusers, onnx-graphsurgeon or polygraphy, carry the wheels of scripts/gpu_wheels.sh in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
# Wheels carried to a machine that cannot download (scripts/gpu_wheels.sh makes them): install them
# into a scratch folder that comes first on the path, leaving the image's packages untouched.
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="${TMPDIR:-/tmp}/fd_trt_gpu_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(ls .whl/*.whl | wc -l) carried wheel(s) from .whl/ into $SITE"
fi
exec "$PY" scripts/gpu_check.py "$@"
