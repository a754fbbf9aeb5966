#!/usr/bin/env python
"""Every GPU check of fd_trt in one call (run through scripts/gpu_check.sh); no downloads.

1. the GPU tests (``pytest -m gpu tests/test_gpu.py tests/test_tensorrt.py``);
2. the fp16 CUDA pipeline against the fp32 CPU reference on the tiny model (relative L2 of the
   final latents, DDIM-50, schedules ``all`` and ``paper``);
3. an SD1.5-shaped UNet with random weights (:func:`fd_trt.families.models.sd15_arch_pipeline`) at
   512x512, DDIM-50, CFG 7.5, fp16: schedules ``all`` and ``paper`` on torch CUDA without and
   with CUDA graphs and with ``channels_last``, and on TensorRT when it is importable. Times
   are CUDA-event times of the whole sampling call (text encoder, UNet loop, scheduler; no
   VAE) and the UNet loop alone (the sampler's encoder + decoder seconds), the median of
   ``--repeat`` runs after
   ``--warmup`` runs, with the peak GPU memory of each configuration.
4. an SDXL-shaped UNet with random weights (:func:`fd_trt.families.models.sdxl_arch_pipeline`, 2.6 B
   parameters, both text encoders) at 1024x1024, DDIM-50, CFG 5.0, fp16: schedules ``all`` and
   ``paper`` on torch CUDA, timed the same way (``--skip-sdxl`` leaves it out).
5. PixArt-alpha's transformer with random weights (:func:`fd_trt.families.dit_models.pixart_arch_pipeline`,
   28 blocks, 0.6 B parameters, small random T5 and VAE) at 1024x1024, DPM-Solver++ 20 steps,
   CFG 4.5, fp16: schedules ``all`` and ``paper`` on torch CUDA at the family's split point,
   timed the same way (``--skip-pixart`` leaves it out).

The table comes last; ``$OUT/gpu_check.json`` holds everything when ``OUT`` is set. A global
deadline (``--budget-s``, default 450 s) skips what would not fit, saying so, so that one call
stays under 8 minutes on one H100/H200. Without a CUDA GPU it prints why it skips and exits 0.
Exit status: 2 when a package the checks need does not import (it says which, and that
``scripts/gpu_wheels.sh`` makes the wheels to carry); 1 when a GPU test or the accuracy check
fails; else 0 (speed targets are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: fp16 CUDA vs fp32 CPU, relative L2 of the final latents of the tiny model after 50 steps.
ACCURACY_TOLERANCE = 5e-2
#: The GPU speed targets (reported only).
TARGET_SPEEDUP = 1.6
TARGET_TRT_PAPER_UNET_S = 0.35


class Deadline:
    """Seconds left of the whole check's budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", flush=True)


def write_json(report: dict[str, Any]) -> None:
    """Writes the report to ``$OUT/gpu_check.json`` when ``OUT`` is set."""
    out = os.environ.get("OUT")
    if not out:
        return
    path = Path(out) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {path}")


#: What the checks import, and the package that provides it.
NEEDED = {
    "diffusers": "diffusers",
    "transformers": "transformers",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "polygraphy": "polygraphy",
    "pytest": "pytest",
}


def missing_packages() -> list[str]:
    """The packages of :data:`NEEDED` that do not import here, as ``"name (error)"``."""
    import importlib

    missing = []
    for module, package in NEEDED.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install
            missing.append(f"{package} ({type(exc).__name__}: {exc})")
    if not missing:
        try:
            import fd_trt.pipelines.pipeline  # noqa: F401 - the whole package imports with what is installed
        except Exception as exc:
            missing.append(f"fd_trt ({type(exc).__name__}: {exc})")
    return missing


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    """Runs the GPU-marked tests in a subprocess with a time limit."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
        "tests/test_tensorrt.py",
    ]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ, HF_HUB_OFFLINE="1")
        )
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        rc = res.returncode
    except subprocess.TimeoutExpired as exc:
        tail, rc = [f"timed out after {timeout_s:.0f} s", str(exc.stdout or "")[-2000:]], 124
    for line in tail:
        print(f"  | {line}")
    # 5: no test collected (everything deselected) is not a failure.
    return {"returncode": rc, "ok": rc in (0, 5), "seconds": time.perf_counter() - t0, "tail": tail}


def tiny_accuracy() -> dict[str, Any]:
    """fp16 CUDA pipeline vs fp32 CPU reference on the tiny model."""
    import torch

    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    results: dict[str, Any] = {}
    for schedule in ("all", "paper"):
        outs = {}
        for device, precision in (("cpu", "fp32"), ("cuda", "fp16")):
            pipe = FasterDiffusionPipeline.from_diffusers(
                tiny_sd_pipeline(seed=0), backend="torch", device=device, precision=precision, progress=False
            )
            out = pipe(
                "a red circle on the left",
                num_inference_steps=50,
                output_type="latent",
                schedule=schedule,
                latents=latents.clone(),
                generator=torch.Generator().manual_seed(0),
            )
            outs[device] = out.latents.float().cpu()
        ref, got = outs["cpu"], outs["cuda"]
        rel = float((got - ref).norm() / ref.norm())
        results[schedule] = {"rel_l2": rel, "finite": bool(torch.isfinite(got).all()), "ok": rel < ACCURACY_TOLERANCE}
        log(f"tiny model, {schedule}: fp16 CUDA vs fp32 CPU relative L2 {rel:.3e} (tolerance {ACCURACY_TOLERANCE})")
    results["ok"] = all(v["ok"] and v["finite"] for v in results.values() if isinstance(v, dict))
    return results


def time_config(
    make_pipe: Callable[[], Any],
    schedules: list[str],
    repeat: int,
    warmup: int,
    deadline: Deadline,
    label: str,
    *,
    size: int = 512,
    steps: int = 50,
    device: str = "cuda",
    guidance_scale: float = 7.5,
) -> list[dict[str, Any]]:
    """Times one backend configuration on each schedule (CUDA events, median of ``repeat`` runs).

    Args:
        make_pipe: builds the pipeline to time.
        schedules: the schedules to time, in order.
        repeat: timed runs per schedule (fewer when the deadline is near).
        warmup: untimed runs per schedule first.
        deadline: the whole check's deadline.
        label: the configuration's name in the table.
        size: image height and width.
        steps: DDIM steps.
        device: where the generator lives (the pipeline's device).
        guidance_scale: CFG weight.

    Returns:
        One row per timed schedule.
    """
    import torch

    rows: list[dict[str, Any]] = []
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe = make_pipe()
    try:
        for schedule in schedules:

            def once() -> tuple[float, float]:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = pipe(
                    "a photo of an astronaut riding a horse",
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=size,
                    width=size,
                    output_type="latent",
                    schedule=schedule,
                    generator=torch.Generator(device).manual_seed(0),
                )
                end.record()
                end.synchronize()
                unet = out.stats.seconds["encoder"] + out.stats.seconds["decoder"]
                return start.elapsed_time(end) / 1000.0, unet

            t0 = time.monotonic()
            for _ in range(warmup):
                once()
            per_run = (time.monotonic() - t0) / max(1, warmup)
            n = repeat
            while n > 1 and per_run * n > deadline.left() - 30:
                n -= 1
            if per_run > deadline.left() - 30:
                log(f"{label} {schedule}: skipped, {deadline.left():.0f} s left of the budget")
                continue
            runs = [once() for _ in range(n)]
            total = statistics.median(r[0] for r in runs)
            unet = statistics.median(r[1] for r in runs)
            rows.append(
                {
                    "config": label,
                    "schedule": schedule,
                    "total_s": total,
                    "unet_loop_s": unet,
                    "runs": n,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            log(f"{label} {schedule}: {total:.3f} s per image ({unet:.3f} s UNet loop), median of {n}")
    finally:
        runner = getattr(pipe, "runner", None)
        pipe.close() if hasattr(pipe, "close") else None
        del pipe, runner
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


def sd15_timings(args: argparse.Namespace, deadline: Deadline, trt_problem: str | None) -> dict[str, Any]:
    """The SD1.5-shaped timing table."""
    import torch

    from fd_trt.families.models import sd15_arch_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    t0 = time.perf_counter()
    sd = sd15_arch_pipeline(seed=0)
    sd.to("cuda", torch.float16)
    log(f"SD1.5-shaped pipeline ready in {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name()}")
    schedules = ["all", "paper"]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def torch_pipe(**options: bool) -> Callable[[], Any]:
        return lambda: FasterDiffusionPipeline.from_diffusers(
            sd, backend="torch", device="cuda", precision="fp16", progress=False, runner_options=options
        )

    # channels_last is timed to see whether it helps on this GPU (the torch backend's option).
    for label, make in (
        ("torch fp16", torch_pipe()),
        ("torch fp16 + CUDA graphs", torch_pipe(cuda_graphs=True)),
        ("torch fp16 channels_last", torch_pipe(channels_last=True)),
    ):
        if deadline.left() < 60:
            notes.append(f"{label}: skipped, out of time")
            continue
        rows += time_config(make, schedules, args.repeat, args.warmup, deadline, label)

    if trt_problem is not None:
        notes.append(f"tensorrt: not timed: {trt_problem}")
    elif deadline.left() < args.trt_min_s:
        notes.append(
            f"tensorrt: not timed: {deadline.left():.0f} s left, building SD1.5 plans needs about {args.trt_min_s} s"
        )
    else:
        from fd_trt.backends.tensorrt import build_plans
        from fd_trt.graphs.build import build_engines

        folder = Path(tempfile.mkdtemp(prefix="fd_trt_gpu_check_"))
        t1 = time.perf_counter()
        build_engines(
            sd.unet,
            folder,
            latent_size=(64, 64),
            text_shape=(77, 768),
            precision="fp16",
            model_source="sd15-arch",
            progress=False,
        )
        built = build_plans(folder, builder_optimization_level=args.trt_opt_level)
        notes.append(
            f"tensorrt: graphs + plans built in {time.perf_counter() - t1:.0f} s at optimization level "
            f"{args.trt_opt_level} ({', '.join(b.record.file for b in built)})"
        )
        for label, graphs in (("tensorrt", False), ("tensorrt + CUDA graphs", True)):
            if deadline.left() < 40:
                notes.append(f"{label}: skipped, out of time")
                continue
            rows += time_config(
                lambda g=graphs: FasterDiffusionPipeline.from_diffusers(
                    sd,
                    backend="tensorrt",
                    device="cuda",
                    precision="fp16",
                    progress=False,
                    engines=folder,
                    runner_options={"cuda_graphs": g},
                ),
                schedules,
                args.repeat,
                args.warmup,
                deadline,
                label,
            )

    add_speedups(rows)
    return {"rows": rows, "notes": notes}


def sdxl_timings(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    """The SDXL-shaped timing table: 1024x1024, DDIM-50, CFG 5.0, fp16, torch CUDA, all and paper."""
    import torch

    from fd_trt.families.models import make_scheduler, sdxl_arch_pipeline
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    t0 = time.perf_counter()
    with torch.device("cuda"):  # random init of 2.6 B parameters on the GPU, not the host
        sd = sdxl_arch_pipeline(seed=0)
    sd.to("cuda", torch.float16)
    sd.scheduler = make_scheduler("ddim", sd.scheduler.config)
    log(f"SDXL-shaped pipeline ready in {time.perf_counter() - t0:.1f} s")
    notes = ["tensorrt: not timed for SDXL (building 2.6B-parameter fp16 plans does not fit this check's budget)"]
    rows: list[dict[str, Any]] = []
    for label, options in (("sdxl torch fp16", {}), ("sdxl torch fp16 + CUDA graphs", {"cuda_graphs": True})):
        if deadline.left() < 60:
            notes.append(f"{label}: skipped, out of time")
            continue
        rows += time_config(
            lambda o=options: FasterDiffusionPipeline.from_diffusers(
                sd, backend="torch", device="cuda", precision="fp16", progress=False, runner_options=o
            ),
            ["all", "paper"],
            args.repeat,
            args.warmup,
            deadline,
            label,
            size=1024,
            guidance_scale=5.0,
        )
    add_speedups(rows)
    del sd
    torch.cuda.empty_cache()
    return {"rows": rows, "notes": notes}


def pixart_timings(
    args: argparse.Namespace,
    deadline: Deadline,
    *,
    build: Callable[[], Any] | None = None,
    device: str = "cuda",
    precision: str = "fp16",
    size: int = 1024,
) -> dict[str, Any]:
    """The PixArt table: pixart-arch at ``size`` x ``size``, DPM-Solver++ 20 steps, CFG 4.5, on
    the torch backend, schedules ``all`` and ``paper`` (the transformer loop is the encoder + decoder
    seconds). ``build`` makes the diffusers pipeline (pixart-arch on ``device`` in ``precision`` by
    default; a tiny PixArt runs the same code on the CPU)."""
    import torch

    from fd_trt.families.dit_models import pixart_arch_pipeline
    from fd_trt.families.models import scheduler_name
    from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

    t0 = time.perf_counter()
    if build is None:
        with torch.device(device):  # random init of 0.6 B parameters where they run
            sd = pixart_arch_pipeline(seed=0, sample_size=size // 8)
        sd.to(device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32))
    else:
        sd = build()
    if scheduler_name(sd.scheduler) != "dpmpp":
        raise RuntimeError(f"the PixArt check runs DPM-Solver++, got {type(sd.scheduler).__name__}")
    log(f"PixArt pipeline ready in {time.perf_counter() - t0:.1f} s")
    label = f"pixart torch {precision}"
    rows = time_config(
        lambda: FasterDiffusionPipeline.from_diffusers(
            sd, backend="torch", device=device, precision=precision, progress=False
        ),
        ["all", "paper"],
        args.repeat,
        args.warmup,
        deadline,
        label,
        size=size,
        steps=20,
        device=device,
        guidance_scale=4.5,
    )
    add_speedups(rows)
    del sd
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "notes": []}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Sets each row's ``speedup_vs_all``: the UNet loop time of ``all`` in its configuration over its own."""
    by = {(r["config"], r["schedule"]): r for r in rows}
    for r in rows:
        base = by.get((r["config"], "all"))
        r["speedup_vs_all"] = base["unet_loop_s"] / r["unet_loop_s"] if base else None


def check_targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The GPU speed targets, per configuration: ``{description: met}``."""
    targets = {}
    for r in rows:
        if r["schedule"] == "paper" and r.get("speedup_vs_all"):
            targets[f"{r['config']}: paper >= {TARGET_SPEEDUP}x all"] = r["speedup_vs_all"] >= TARGET_SPEEDUP
        if r["config"].startswith("tensorrt") and r["schedule"] == "paper":
            targets[f"{r['config']}: paper UNet loop < {TARGET_TRT_PAPER_UNET_S} s"] = (
                r["unet_loop_s"] < TARGET_TRT_PAPER_UNET_S
            )
    return targets


def table(report: dict[str, Any]) -> str:
    """The summary table, as markdown."""
    lines = [
        "| config | schedule | s / image | UNet loop s | paper speedup (UNet) | peak GiB | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [row for part in ("sd15", "sdxl", "pixart") for row in report.get(part, {}).get("rows", [])]:
        sp = r.get("speedup_vs_all")
        lines.append(
            f"| {r['config']} | {r['schedule']} | {r['total_s']:.3f} | {r['unet_loop_s']:.3f} | "
            f"{'' if sp is None or r['schedule'] == 'all' else f'{sp:.2f}x'} | {r['peak_mem_gib']:.1f} | {r['runs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    p = argparse.ArgumentParser(description="fd_trt GPU checks")
    p.add_argument("--budget-s", type=float, default=450.0, help="overall time budget (default 450 s)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (they also capture CUDA graphs)")
    p.add_argument("--tests-timeout-s", type=float, default=200.0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-sd15", action="store_true")
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--sdxl-min-s", type=int, default=120, help="seconds that must be left to time SDXL")
    p.add_argument("--skip-pixart", action="store_true")
    p.add_argument("--pixart-min-s", type=int, default=90, help="seconds that must be left to time PixArt")
    p.add_argument("--trt-opt-level", type=int, default=2, help="builder optimization level of the SD1.5 plans")
    p.add_argument("--trt-min-s", type=int, default=240, help="seconds that must be left to build SD1.5 plans")
    args = p.parse_args(argv)
    deadline = Deadline(args.budget_s)
    t_start = time.perf_counter()

    import torch

    report: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    missing = missing_packages()
    if missing:  # before the GPU is used: on a lent machine, a missing package must not cost a run
        reason = (
            f"cannot import {'; '.join(missing)}. On a machine without a package registry, run "
            "bash scripts/gpu_wheels.sh where pip works and carry .whl/ along; elsewhere pip install -e '.[test]'"
        )
        log(f"FAILED: {reason}")
        report.update(skipped=True, ok=False, reason=reason)
        write_json(report)
        return 2
    if not torch.cuda.is_available():
        reason = (
            f"no CUDA GPU visible to torch {torch.__version__} (torch.version.cuda={torch.version.cuda}): "
            "skipping the GPU tests, the fp16-vs-fp32 comparison and the SD1.5, SDXL and PixArt timings"
        )
        log(f"SKIPPED: {reason}")
        report.update(skipped=True, reason=reason)
        write_json(report)
        return 0

    from fd_trt.backends.tensorrt import runtime_problem

    trt_problem = runtime_problem()
    report.update(
        skipped=False,
        gpu=torch.cuda.get_device_name(),
        capability=list(torch.cuda.get_device_capability()),
        tensorrt=None if trt_problem else __import__("tensorrt").__version__,
        tensorrt_problem=trt_problem,
    )
    log(
        f"{report['gpu']} (compute {'.'.join(map(str, report['capability']))}), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, TensorRT: {report['tensorrt'] or 'not importable'}"
    )
    ok = True
    if not args.skip_tests:
        log("1/5 GPU tests")
        report["tests"] = run_gpu_tests(min(args.tests_timeout_s, max(30.0, deadline.left() - 200)))
        ok &= report["tests"]["ok"]
    log("2/5 fp16 CUDA vs fp32 CPU on the tiny model")
    try:
        report["accuracy"] = tiny_accuracy()
        ok &= report["accuracy"]["ok"]
    except Exception as exc:  # report and go on: the timings are still worth having
        report["accuracy"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        log(f"accuracy check failed: {exc}")
        ok = False
    if not args.skip_sd15:
        log("3/5 SD1.5-shaped UNet, 512x512, DDIM-50, CFG, fp16")
        try:
            report["sd15"] = sd15_timings(args, deadline, trt_problem)
        except Exception as exc:
            report["sd15"] = {"rows": [], "notes": [f"failed: {type(exc).__name__}: {exc}"]}
            log(f"timings failed: {type(exc).__name__}: {exc}")
            ok = False
    if not args.skip_sdxl:
        if deadline.left() < args.sdxl_min_s:
            report["sdxl"] = {
                "rows": [],
                "notes": [f"not timed: {deadline.left():.0f} s left, SDXL needs about {args.sdxl_min_s} s"],
            }
        else:
            log("4/5 SDXL-shaped UNet, 1024x1024, DDIM-50, CFG 5.0, fp16")
            try:
                report["sdxl"] = sdxl_timings(args, deadline)
            except Exception as exc:
                report["sdxl"] = {"rows": [], "notes": [f"failed: {type(exc).__name__}: {exc}"]}
                log(f"SDXL timings failed: {type(exc).__name__}: {exc}")
                ok = False
    if not args.skip_pixart:
        if deadline.left() < args.pixart_min_s:
            report["pixart"] = {
                "rows": [],
                "notes": [f"not timed: {deadline.left():.0f} s left, PixArt needs about {args.pixart_min_s} s"],
            }
        else:
            log("5/5 PixArt-alpha-shaped transformer, 1024x1024, DPM-Solver++ 20, CFG 4.5, fp16")
            try:
                report["pixart"] = pixart_timings(args, deadline)
            except Exception as exc:
                report["pixart"] = {"rows": [], "notes": [f"failed: {type(exc).__name__}: {exc}"]}
                log(f"PixArt timings failed: {type(exc).__name__}: {exc}")
                ok = False
    rows = report.get("sd15", {}).get("rows", [])
    targets = check_targets(rows)
    report.update(targets=targets, ok=ok, seconds=time.perf_counter() - t_start)
    write_json(report)
    print()
    for note in [n for part in ("sd15", "sdxl", "pixart") for n in report.get(part, {}).get("notes", [])]:
        print(f"note: {note}")
    for name, met in targets.items():
        print(f"target {'met' if met else 'MISSED'}: {name}")
    acc = report.get("accuracy", {})
    print(
        f"tests: {'ok' if report.get('tests', {}).get('ok', True) else 'FAILED'}; accuracy: "
        f"all {acc.get('all', {}).get('rel_l2', float('nan')):.2e}, paper {acc.get('paper', {}).get('rel_l2', float('nan')):.2e} "
        f"({'ok' if acc.get('ok') else 'FAILED'}); {report['seconds']:.0f} s in all"
    )
    print(table(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
