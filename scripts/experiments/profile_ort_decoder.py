#!/usr/bin/env python
"""Why is ONNX Runtime's batched decoder not faster per step than single-step calls?

On the pipeline's own decoder graph (built on first use into the engine cache), this times one
decoder step inside calls of S steps (2S rows with CFG), side by side and alternating, under:

* ``runner``: fd_trt's OrtRunner as the pipeline runs it (IOBinding on torch memory; the key
  step's 2 rows of features and text go in once, the graph repeats them for the S steps);
* ``run``: a plain ``session.run`` on numpy inputs (no binding);
* session option variants: no thread spinning, no memory pattern, no CPU memory arena, 1 thread;

then profiles the decoder with ONNX Runtime's own profiler at 2 and 2S rows and groups the node
times by operator type, per step, so that per-call costs (ReorderInput / ReorderOutput of the
NCHWc layout, small MatMuls, Softmax...) show against the convolutions.

    python scripts/experiments/profile_ort_decoder.py --model default --threads 2 --steps 1,2,5,10,15 \
        --json ort_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default | tiny | sd15-arch | a local diffusers folder")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default="1,2,5,10,15", help="decoder call sizes in steps (2 rows each)")
    ap.add_argument("--repeat", type=int, default=5, help="alternating rounds; the median per variant is kept")
    ap.add_argument(
        "--profile-steps", type=int, default=10, help="the batched call size the op profile compares with 1"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    from fd_trt.backends.onnxruntime import OrtRunner
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.tools.bench import load_model

    torch.set_num_threads(args.threads)
    sd, _ = load_model(args.model)
    f = sd.vae_scale_factor
    height = args.height or int(sd.unet.config.sample_size) * f
    width = args.width or int(sd.unet.config.sample_size) * f
    pipe = FasterDiffusionPipeline.from_diffusers(
        sd, backend="onnxruntime", device="cpu", progress=False, runner_options={"intra_op_threads": args.threads}
    )
    pipe.prepare(height, width)
    folder = Path(pipe.runner.engine_dir)
    pipe.close()
    steps = [int(s) for s in args.steps.split(",")]

    runner = OrtRunner(folder, intra_op_threads=args.threads).activate()
    L, D = int(sd.tokenizer.model_max_length), int(sd.unet.config.cross_attention_dim)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, int(sd.unet.config.in_channels), height // f, width // f, generator=g)
    text = torch.randn(2, L, D, generator=g)
    feats = runner.encode(sample, torch.full((2,), 500.0), text)
    names = [o.name for o in runner._enc.outputs]  # mid, skip_00..

    def session(**opts):
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads = opts.pop("threads", args.threads)
        o.log_severity_level = 3
        for k, v in opts.pop("config", {}).items():
            o.add_session_config_entry(k, v)
        for k, v in opts.items():
            setattr(o, k, v)
        return ort.InferenceSession(str(folder / "decoder.onnx"), o, providers=["CPUExecutionProvider"])

    def np_feed(s):
        # The decoder contract: the key step's rows once, the S steps' timesteps step-major.
        d = {n: t.numpy() for n, t in zip(names, feats.tensors())}
        d["timestep"] = np.repeat(np.linspace(900, 100, s, dtype=np.float32), 2)
        d["encoder_hidden_states"] = text.numpy()
        return d

    variants = {
        "default": session(),
        "no_spinning": session(config={"session.intra_op.allow_spinning": "0"}),
        "no_mem_pattern": session(enable_mem_pattern=False),
        "no_cpu_arena": session(enable_cpu_mem_arena=False),
        "1_thread": session(threads=1),
    }
    feeds = {s: np_feed(s) for s in steps}
    ts = {s: torch.linspace(900, 100, s) for s in steps}
    timings: dict[str, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # Warm-up: every variant once at every size (ORT plans memory per new shape).
    for s in steps:
        runner.decode(feats, ts[s], text)
        for sess in variants.values():
            sess.run(None, feeds[s])
    for _ in range(args.repeat):
        for s in steps:
            timings["runner"][s].append(timed(lambda: runner.decode(feats, ts[s], text)) / s)
            for name, sess in variants.items():
                timings["run_" + name][s].append(timed(lambda: sess.run(None, feeds[s])) / s)

    med = {v: {s: statistics.median(x) for s, x in by.items()} for v, by in timings.items()}
    print(
        f"onnxruntime {ort.__version__}, {args.model} {height}x{width}, {args.threads} threads; "
        f"seconds per decoder step (2 rows) inside calls of S steps, median of {args.repeat} alternating rounds"
    )
    print(f"{'variant':>22} | " + " | ".join(f"S={s:>2}" for s in steps) + f" | S={steps[-1]} / S=1")
    for v, by in med.items():
        print(
            f"{v:>22} | "
            + " | ".join(f"{by[s] * 1e3:6.2f} ms" for s in steps)
            + f" | {by[steps[-1]] / by[steps[0]]:.2f}"
        )

    # Operator profile at 1 step and at --profile-steps steps.
    prof: dict[int, dict[str, float]] = {}
    for s in (1, args.profile_steps):
        tmp = tempfile.mkdtemp(prefix="fd_trt_ortprof_")
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads = args.threads
        o.enable_profiling = True
        o.profile_file_prefix = str(Path(tmp) / "dec")
        o.log_severity_level = 3
        sess = ort.InferenceSession(str(folder / "decoder.onnx"), o, providers=["CPUExecutionProvider"])
        feed = np_feed(s)
        for _ in range(1 + args.repeat):
            sess.run(None, feed)
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        by_op: dict[str, float] = collections.defaultdict(float)
        runs = 0
        for e in events:
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs += 1
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                by_op[e["args"].get("op_name", "?")] += e["dur"]
        # per step, per run, microseconds (the first run is a warm-up)
        prof[s] = {k: v / max(1, runs) / s for k, v in by_op.items()}
    total = {s: sum(p.values()) for s, p in prof.items()}
    print(
        f"\noperator time per decoder step (us, ORT profiler, mean over {args.repeat + 1} runs): "
        f"S=1 vs S={args.profile_steps}"
    )
    ops = sorted(prof[1], key=lambda k: -prof[1][k])
    for op in ops[:14]:
        a, b = prof[1].get(op, 0.0), prof[args.profile_steps].get(op, 0.0)
        print(f"{op:>24}: {a:9.0f} -> {b:9.0f} ({b / a if a else float('nan'):.2f}x)")
    print(
        f"{'all nodes':>24}: {total[1]:9.0f} -> {total[args.profile_steps]:9.0f} "
        f"({total[args.profile_steps] / total[1]:.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "onnxruntime": ort.__version__,
                    "model": args.model,
                    "height": height,
                    "width": width,
                    "threads": args.threads,
                    "per_step_s": {v: {str(s): t for s, t in by.items()} for v, by in med.items()},
                    "op_us_per_step": {str(s): p for s, p in prof.items()},
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
