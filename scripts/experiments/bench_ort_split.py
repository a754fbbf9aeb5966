#!/usr/bin/env python
"""What does splitting the UNet cost on ONNX Runtime, and does batching the decoder pay?

Exports the whole UNet as one graph next to the split encoder/decoder graphs (the pipeline's
cache, built on first use), then times, with the same session options (CPU provider, level ALL):

* the whole UNet at 2 rows (one CFG step);
* encoder at 2 rows + decoder at 2 rows (one `all` step on the split graphs);
* the decoder at 2, 10 and 30 rows, reported per step.

    python scripts/experiments/bench_ort_split.py --model sd15-arch --height 256 --width 256 --threads 2 \
        --json split.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15-arch")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work-dir", default=None, help="where the whole-UNet graph goes (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.bench import load_model

    torch.set_num_threads(args.threads)
    sd, _ = load_model(args.model)
    f = sd.vae_scale_factor
    h, w = args.height // f, args.width // f
    L, D = int(sd.tokenizer.model_max_length), int(sd.unet.config.cross_attention_dim)

    # The split graphs: whatever the pipeline uses (built on first use, or reused from the cache).
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend="onnxruntime", device="cpu", progress=False, runner_options={"intra_op_threads": args.threads}
    )
    pipe("warm", height=args.height, width=args.width, num_inference_steps=1, output_type="latent")
    split_dir = Path(pipe.runner.engine_dir)
    pipe.close()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fd_trt_whole_"))
    work.mkdir(parents=True, exist_ok=True)
    whole = work / "unet.onnx"
    if not whole.is_file():
        t = time.perf_counter()

        class Whole(torch.nn.Module):
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states):
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        x = torch.randn(2, 4, h, w)
        with torch.no_grad():
            torch.onnx.export(
                Whole(sd.unet).eval(),
                (x, torch.tensor([500.0, 500.0]), torch.randn(2, L, D)),
                str(whole),
                input_names=["sample", "timestep", "encoder_hidden_states"],
                output_names=["noise_pred"],
                dynamic_axes={n: {0: "rows"} for n in ("sample", "timestep", "encoder_hidden_states", "noise_pred")},
                opset_version=17,
                dynamo=False,
            )
        print(f"exported the whole UNet in {time.perf_counter() - t:.1f} s -> {whole}")

    def session(path: Path) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)

    def feeds(rows: int) -> dict[str, np.ndarray]:
        return {
            "sample": rng.standard_normal((rows, 4, h, w), dtype=np.float32),
            "timestep": np.full((rows,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, L, D), dtype=np.float32),
        }

    s_whole = session(whole)
    s_enc = session(split_dir / "encoder.onnx")
    s_dec = session(split_dir / "decoder.onnx")
    enc_names = [o.name for o in s_enc.get_outputs()]
    base = feeds(2)
    feats = dict(zip(enc_names, s_enc.run(None, base)))

    def dec_feed(rows: int) -> dict[str, np.ndarray]:
        k = rows // 2
        # The decoder contract: the key step's 2 rows once, the k steps' timesteps step-major.
        d = dict(feats)
        d["timestep"] = np.repeat(np.linspace(900, 100, k, dtype=np.float32), 2)
        d["encoder_hidden_states"] = base["encoder_hidden_states"]
        return d

    res = {
        "whole_2_rows_s": _median_time(lambda: s_whole.run(None, base), args.repeat),
        "encoder_2_rows_s": _median_time(lambda: s_enc.run(None, base), args.repeat),
    }
    for rows in (2, 10, 30):
        fd = dec_feed(rows)
        res[f"decoder_{rows}_rows_per_step_s"] = _median_time(
            lambda: s_dec.run(None, fd), max(2, args.repeat // (rows // 2) + 1)
        ) / (rows // 2)
    res["split_step_s"] = res["encoder_2_rows_s"] + res["decoder_2_rows_per_step_s"]
    res["split_overhead"] = res["split_step_s"] / res["whole_2_rows_s"] - 1
    res.update(
        model=args.model, height=args.height, width=args.width, threads=args.threads, onnxruntime=ort.__version__
    )
    for k, v in res.items():
        print(f"{k:>30}: {v:.4f}" if isinstance(v, float) else f"{k:>30}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
