#!/usr/bin/env python
"""Bounded load test of ``fd-trt serve`` on loopback: throughput and latency, batching on and off.

For each batching mode (``--max-batch`` for "on", 1 for "off") the script starts the HTTP server
in this process on a free 127.0.0.1 port, warms it up, then for each concurrency C sends exactly
``--requests`` requests from C client threads, each thread sending its next request when the
previous one answers (a closed loop). Every request has a client timeout; nothing else is contacted.

It reports, per (mode, C): throughput in images/s, client-side latency p50/p95/p99, the mean batch
size the server formed, and failures. Then the issue's two targets, measured with batching on:
throughput at the highest concurrency over throughput at 1, and p99 at the highest concurrency over
the solo latency (p50 at concurrency 1).

    python scripts/load_test.py --requests 48 --concurrency 1,8 --out-dir out/load

With ``--security-rounds R`` it instead compares the server with an API key, TLS (a certificate
made on the spot with ``trustme``) and its connection limit on against the same server with all
three off: one runtime, batching on, the highest concurrency, R alternating rounds of each
(off/on, then on/off, ...), and reports the ratio of their mean throughputs.

    python scripts/load_test.py --security-rounds 3 --requests 32 --concurrency 8 --out-dir out/load
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fd_trt.serving.runtime import _percentile  # noqa: E402

PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a green star at the top",
    "a yellow triangle in the center",
    "a cyan diamond on the left and a magenta circle on the right",
    "an orange star",
    "a purple square at the bottom",
    "a red triangle on the left and a blue star on the right",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--requests", type=int, default=48, help="requests per (mode, concurrency) run")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client concurrencies")
    p.add_argument("--modes", default="on,off", help="batching on (max-batch) and/or off (max batch 1)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--schedule", default="paper")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--out-dir", default="out/load")
    p.add_argument(
        "--security-rounds",
        type=int,
        default=0,
        help="compare key+TLS+limits on vs off over this many alternating rounds (0: the batching runs)",
    )
    return p.parse_args(argv)


def run_load(
    url: str,
    args: argparse.Namespace,
    concurrency: int,
    seed0: int,
    headers: dict[str, str] | None = None,
    verify: Any = True,
) -> dict[str, Any]:
    """Sends exactly ``args.requests`` requests from ``concurrency`` threads (closed loop)."""
    import httpx

    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=args.request_timeout, headers=headers, verify=verify) as client:
            while True:
                with lock:
                    i = next_i[0]
                    if i >= args.requests:
                        return
                    next_i[0] += 1
                body = {
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "seed": seed0 + i,
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "height": args.height,
                    "width": args.width,
                    "scheduler": args.scheduler,
                    "schedule": args.schedule,
                }
                t0 = time.perf_counter()
                try:
                    r = client.post(url + "/v1/generate", json=body)
                    ok = r.status_code == 200 and r.content[:4] == b"\x89PNG"
                except httpx.HTTPError as e:
                    ok, r = False, None
                    failures.append(f"request {i}: {type(e).__name__}: {e}")
                dt = time.perf_counter() - t0
                with lock:
                    if ok and r is not None:
                        latencies.append(dt)
                        batch_sizes.append(int(r.headers["x-batch-size"]))
                    elif r is not None:
                        failures.append(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": args.requests,
        "completed": len(latencies),
        "failed": len(failures),
        "failures": failures[:10],
        "wall_s": wall,
        "throughput_img_s": len(latencies) / wall,
        "latency_s": {f"p{q}": _percentile(latencies, q) for q in (50, 95, 99)},
        "mean_latency_s": sum(latencies) / max(1, len(latencies)),
        "mean_batch_size": sum(batch_sizes) / max(1, len(batch_sizes)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.serving.http import ThreadedServer, create_app
    from fd_trt.serving.runtime import ServingRuntime

    if args.threads:
        torch.set_num_threads(args.threads)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": [],
    }
    if args.security_rounds > 0:
        return compare_security(args, report, out_dir)
    for mode in modes:
        max_batch = args.max_batch if mode == "on" else 1
        pipe = FasterDiffusionPipeline.from_pretrained(args.model, backend=args.backend, progress=False)
        pipe.set_scheduler(args.scheduler)
        # As in fd-trt serve, the runtime's worker runs on the main thread (see ServingRuntime's
        # `start`); the server and the load run in other threads.
        rt = ServingRuntime(
            pipe,
            max_batch=max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=max(64, 2 * max(concurrencies)),
            default_timeout_s=args.request_timeout,
            warmup=True,
            warmup_sizes=[(args.height, args.width)],
            start=False,
        )

        def drive(mode: str = mode, max_batch: int = max_batch, rt: ServingRuntime = rt) -> None:
            try:
                with ThreadedServer(create_app(runtime=rt)) as server:
                    for c in concurrencies:
                        run = run_load(server.url, args, c, seed0=1000 * c)
                        run["batching"] = mode
                        run["max_batch"] = max_batch
                        run["server"] = {k: rt.stats()[k] for k in ("batch_sizes", "requests")}
                        report["runs"].append(run)
                        lat = run["latency_s"]
                        print(
                            f"batching {mode:3s} (max batch {max_batch}) concurrency {c:2d}: "
                            f"{run['throughput_img_s']:.2f} img/s, p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s, "
                            f"p99 {lat['p99']:.3f} s, mean batch {run['mean_batch_size']:.2f}, failed {run['failed']}",
                            flush=True,
                        )
            finally:
                rt.shutdown()

        driver = threading.Thread(target=drive, name="load-driver")
        driver.start()
        rt.run()
        driver.join()

    def find(mode: str, c: int) -> dict[str, Any] | None:
        return next((r for r in report["runs"] if r["batching"] == mode and r["concurrency"] == c), None)

    lo, hi = min(concurrencies), max(concurrencies)
    solo, busy = find("on", lo), find("on", hi)
    if solo and busy and lo == 1 and hi > 1:
        report["targets"] = {
            "throughput_ratio": busy["throughput_img_s"] / solo["throughput_img_s"],
            "p99_over_solo": busy["latency_s"]["p99"] / solo["latency_s"]["p50"],
            "concurrency": hi,
            "lost": sum(r["requests"] - r["completed"] for r in report["runs"]),
        }
        t = report["targets"]
        print(
            f"batching on: throughput at concurrency {hi} / at 1 = {t['throughput_ratio']:.2f}x (target >= 3); "
            f"p99 at {hi} / solo p50 = {t['p99_over_solo']:.2f}x (target <= 3); requests lost: {t['lost']}"
        )

    (out_dir / "load_test.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        f"Load test: {args.model}, {args.backend}, {args.height}x{args.width}, {args.scheduler}-{args.steps}, "
        f"schedule {args.schedule}, CFG {args.guidance}, {args.requests} requests per row, torch threads {report['threads']}.",
        "",
        "| batching | max batch | concurrency | throughput (img/s) | p50 (s) | p95 (s) | p99 (s) | mean batch | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lat = r["latency_s"]
        lines.append(
            f"| {r['batching']} | {r['max_batch']} | {r['concurrency']} | {r['throughput_img_s']:.2f} | {lat['p50']:.3f} | "
            f"{lat['p95']:.3f} | {lat['p99']:.3f} | {r['mean_batch_size']:.2f} | {r['failed']} |"
        )
    (out_dir / "load_test.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'load_test.json'} and {out_dir / 'load_test.md'}")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1


def compare_security(args: argparse.Namespace, report: dict[str, Any], out_dir: Path) -> int:
    """Key + TLS + connection limit on vs off, alternating rounds on one runtime (batching on)."""
    import secrets
    import ssl
    import tempfile

    import trustme

    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
    from fd_trt.serving.http import ThreadedServer, create_app
    from fd_trt.serving.options import DEFAULT_LIMIT_CONCURRENCY
    from fd_trt.serving.runtime import ServingRuntime

    c = max(int(x) for x in args.concurrency.split(","))
    pipe = FasterDiffusionPipeline.from_pretrained(args.model, backend=args.backend, progress=False)
    pipe.set_scheduler(args.scheduler)
    rt = ServingRuntime(
        pipe,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=max(64, 2 * c),
        default_timeout_s=args.request_timeout,
        warmup=True,
        warmup_sizes=[(args.height, args.width)],
        start=False,
    )
    key = secrets.token_hex(32)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tmp = Path(tempfile.mkdtemp(prefix="fd_trt-load-"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "chain.pem"))
    runs: list[dict[str, Any]] = []

    def drive() -> None:
        try:
            for i in range(args.security_rounds):
                for secure in (False, True) if i % 2 == 0 else (True, False):
                    if secure:
                        app = create_app(runtime=rt, api_keys=[key], drain_on_shutdown=False)
                        config = {
                            "ssl_keyfile": str(tmp / "key.pem"),
                            "ssl_certfile": str(tmp / "chain.pem"),
                            "limit_concurrency": DEFAULT_LIMIT_CONCURRENCY,
                        }
                        headers, verify = {"Authorization": f"Bearer {key}"}, ctx
                    else:
                        app = create_app(runtime=rt, allowed_hosts=["*"], drain_on_shutdown=False)
                        config, headers, verify = {}, None, True
                    server = ThreadedServer(app, **config)
                    server.server.config.lifespan = "off"  # the runtime outlives each server
                    with server:
                        run = run_load(server.url, args, c, seed0=1000 * (i + 1), headers=headers, verify=verify)
                    run["security"] = "on" if secure else "off"
                    run["round"] = i
                    runs.append(run)
                    print(
                        f"round {i} security {run['security']:3s}: {run['throughput_img_s']:.3f} img/s, "
                        f"p50 {run['latency_s']['p50']:.3f} s, mean batch {run['mean_batch_size']:.2f}, "
                        f"failed {run['failed']}",
                        flush=True,
                    )
        finally:
            rt.shutdown()

    driver = threading.Thread(target=drive, name="load-driver")
    driver.start()
    rt.run()
    driver.join()
    mean = {
        m: sum(r["throughput_img_s"] for r in runs if r["security"] == m) / max(1, args.security_rounds)
        for m in ("on", "off")
    }
    report["runs"] = runs
    report["security"] = {
        "concurrency": c,
        "rounds": args.security_rounds,
        "mean_throughput_img_s": mean,
        "ratio_on_over_off": mean["on"] / mean["off"] if mean["off"] else None,
    }
    print(
        f"key+TLS+limits on / off = {report['security']['ratio_on_over_off']:.3f} "
        f"({mean['on']:.3f} vs {mean['off']:.3f} img/s at concurrency {c}, {args.security_rounds} rounds each)"
    )
    (out_dir / "load_test_security.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_dir / 'load_test_security.json'}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
