#!/usr/bin/env python
"""DeepFloyd IF stage I, text-to-video and Token Merging: diffusers against fd_trt ``all`` / ``paper``.

Random weights at the real layouts, timed in one process side by side (compare ratios only):

* ``--case if``: IF-I-M's stage-I UNet (``if_m_arch_pipeline``) at 64x64 pixels, IF's DDPM
  scheduler, CFG 7; rows diffusers ``IFPipeline``, fd_trt ``all`` and ``paper`` (the authors' IF
  key steps), with the relative L2 of the final images against diffusers;
* ``--case video --video modelscope|animatediff``: ModelScope text-to-video's UNet3D
  (``modelscope_arch_pipeline``) or SD 1.5's UNet with AnimateDiff's v1-5-2 motion adapter
  (``animatediff_arch_pipeline``), ``--frames`` frames of ``--size`` pixels, DDIM, CFG 7.5; rows
  diffusers' ``TextToVideoSDPipeline`` / ``AnimateDiffPipeline``, fd_trt ``--schedules`` (``all``
  and ``paper`` by default; decoder schedules such as ``deepcache:3`` run on torch) per backend,
  with the relative L2 of the final latents (``output_type="latent"``) against diffusers;
* ``--case tome``: sd15-arch at ``--size`` pixels, DDIM, CFG 7.5; rows diffusers, diffusers
  patched by tomesd (``--ratio``), fd_trt ``paper`` and ``paper`` + ToMe, with the relative L2 of
  the final latents against diffusers (``--check-tomesd``: also fd_trt ``all`` + ToMe against
  the tomesd-patched diffusers).

    python scripts/experiments/bench_if_tome.py --case if --steps 25 --json if.json
    python scripts/experiments/bench_if_tome.py --case video --video modelscope --frames 8 --size 128 \
        --backends torch,onnxruntime --json modelscope.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_side_by_side(
    build,
    call,
    reference,
    backends: tuple[str, ...],
    warmup_kwargs: dict,
    latents=lambda out: out.images,
    schedules: tuple[str, ...] = ("all", "paper"),
) -> tuple[dict, list[dict]]:
    """Times a diffusers pipeline against fd_trt ``schedules`` per backend, in one process.

    ``build(backend)`` wraps the diffusers pipeline in fd_trt; ``call(pipe, schedule, **kwargs)`` runs an fd_trt
    pipeline, ``reference()`` diffusers' own call, both from the same seed and returning the output
    compared (``latents(out)`` of an fd_trt output). Each fd_trt pipeline is first called with
    ``warmup_kwargs`` for ``all`` and ``paper`` (and ``deepcache:2`` where ``schedules`` has
    decoder schedules): a graph backend exports its graphs then, timed apart. A schedule a backend
    refuses gets a row saying so.

    Returns:
        ``(warmup_seconds per backend, rows)``: a row per pipeline with ``seconds``,
        ``speedup_vs_diffusers``, ``rel_l2_vs_diffusers``, the key steps and the runner's calls and
        UNet GFLOPs where the stats have them.
    """
    from fd_trt.errors import InputError

    decoder_schedules = any(s.startswith(("deepcache:", "combined:")) for s in schedules)
    pipes, warmup = {}, {}
    for backend in backends:
        fd = build(backend)
        t0 = time.perf_counter()
        for schedule in ("all", "paper", *(("deepcache:2",) if decoder_schedules else ())):
            try:  # exports (graph backends) and warms up every call shape
                call(fd, schedule, **warmup_kwargs)
            except InputError:
                pass  # refused again, with its message, in the timed rows
        warmup[backend] = round(time.perf_counter() - t0, 1)
        pipes[backend] = fd
    ref, t_ref = timed(reference)
    rows = [{"row": "diffusers", "seconds": t_ref}]
    for backend, fd in pipes.items():
        for schedule in schedules:
            try:
                out, t = timed(lambda s=schedule, fd=fd: call(fd, s))
            except InputError as e:
                rows.append({"row": f"fd_trt {backend} {schedule}", "not_run": str(e)})
                continue
            st = out.stats
            row = {
                "row": f"fd_trt {backend} {schedule}",
                "seconds": t,
                "speedup_vs_diffusers": t_ref / t,
                "rel_l2_vs_diffusers": rel_l2(latents(out), ref),
                "key_steps": len(st.key_steps),
            }
            for key in ("encoder_calls", "decoder_calls", "shallow_calls", "shallow_rows", "unet_gflops"):
                if getattr(st, key, None) is not None:
                    row[key] = getattr(st, key)
            rows.append(row)
    return warmup, rows


def bench_if(steps: int, tiny: bool, backends: tuple[str, ...] = ("torch",)) -> dict:
    """Diffusers' ``IFPipeline`` against fd_trt ``all`` and ``paper`` per backend, from the same
    seed. A graph backend's first call exports its graphs; that warm-up is timed apart
    (``warmup_seconds``) and not in the rows."""
    from fd_trt import FasterDiffusionPipeline
    from fd_trt.families.deepfloyd_if import if_m_arch_pipeline, tiny_if_pipeline

    sd = tiny_if_pipeline(seed=0) if tiny else if_m_arch_pipeline(seed=0)
    prompt = "a lone sailboat drifting on calm waters"

    def gen():
        return torch.Generator().manual_seed(0)

    common = dict(num_inference_steps=steps, output_type="pt")
    warmup, rows = bench_side_by_side(
        lambda backend: FasterDiffusionPipeline.from_diffusers(sd, backend=backend, device="cpu", progress=False),
        lambda fd, schedule, **kw: fd(prompt, generator=gen(), schedule=schedule, **{**common, **kw}),
        lambda: sd(prompt, generator=gen(), clean_caption=False, **common).images,
        backends,
        dict(num_inference_steps=min(steps, 4)),
    )
    config = "tiny IF (smoke run)" if tiny else "IF-I-M stage I UNet, 64x64, random weights"
    return {"case": "if", "config": config, "steps": steps, "warmup_seconds": warmup, "rows": rows}


def bench_video(
    video: str,
    frames: int,
    size: int,
    steps: int,
    tiny: bool,
    backends: tuple[str, ...],
    schedules: tuple[str, ...] = ("all", "paper"),
) -> dict:
    """Diffusers' ``TextToVideoSDPipeline`` (``modelscope``) or ``AnimateDiffPipeline``
    (``animatediff``) against fd_trt ``schedules`` per backend, from the same seed, the
    final latents compared (``output_type="latent"``). A graph backend's first call exports its
    graphs for ``frames`` frames; that warm-up is timed apart (``warmup_seconds``)."""
    from fd_trt import FasterDiffusionPipeline
    from fd_trt.families import video as vf

    builders = {
        "modelscope": (vf.tiny_text_to_video_pipeline, vf.modelscope_arch_pipeline),
        "animatediff": (vf.tiny_animatediff_pipeline, vf.animatediff_arch_pipeline),
    }
    sd = builders[video][0 if tiny else 1](seed=0, sample_size=size // 8)
    prompt = "a red circle moving to the left"

    def gen():
        return torch.Generator().manual_seed(0)

    common = dict(
        num_frames=frames, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="latent"
    )
    warmup, rows = bench_side_by_side(
        lambda backend: FasterDiffusionPipeline.from_diffusers(sd, backend=backend, device="cpu", progress=False),
        lambda fd, schedule, **kw: fd(prompt, generator=gen(), schedule=schedule, **{**common, **kw}),
        lambda: sd(prompt, generator=gen(), **common).frames,
        backends,
        dict(num_inference_steps=min(steps, 4)),
        latents=lambda out: out.latents,
        schedules=schedules,
    )
    if tiny:
        config = f"tiny {video} (smoke run), {frames} frames of {size}x{size}, DDIM-{steps}, CFG 7.5"
    else:
        unet = {"modelscope": "ModelScope text-to-video UNet3D", "animatediff": "SD 1.5 UNet + AnimateDiff v1-5-2"}
        config = f"{unet[video]}, {frames} frames of {size}x{size}, DDIM-{steps}, CFG 7.5, random weights"
    return {
        "case": "video",
        "video": video,
        "config": config,
        "unet_params_millions": round(sum(p.numel() for p in sd.unet.parameters()) / 1e6, 1),
        "frames": frames,
        "size": size,
        "steps": steps,
        "warmup_seconds": warmup,
        "rows": rows,
    }


def bench_tome(steps: int, size: int, ratio: float, tiny: bool, check: bool) -> dict:
    """sd15-arch at ``size`` pixels: diffusers, diffusers patched by tomesd, fd_trt torch ``paper``
    and ``paper`` + ToMe, timed side by side from the same seed, the final latents compared against
    diffusers'. With ``check``, also fd_trt ``all`` + ToMe against the tomesd-patched diffusers
    (untimed: the conformance the tests check on a tiny model)."""
    import tomesd

    from fd_trt import FasterDiffusionPipeline
    from fd_trt.families.models import sd15_arch_pipeline, tiny_sd_pipeline

    if tiny:

        def sd15_arch_pipeline(seed):  # noqa: F811 - the smoke run's stand-in
            return tiny_sd_pipeline(seed, sample_size=size // 8)

    prompt = "a red circle on the left"
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")

    def gen():
        return torch.Generator().manual_seed(0)

    sd = sd15_arch_pipeline(0)
    plain = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", device="cpu", progress=False)
    sd.set_progress_bar_config(disable=True)
    warm = dict(num_inference_steps=2, height=size, width=size, output_type="latent")
    sd(prompt, **warm)
    plain(prompt, **warm)
    ref, t_ref = timed(lambda: sd(prompt, generator=gen(), **common).images)
    paper, t_paper = timed(lambda: plain(prompt, generator=gen(), schedule="paper", **common).images)
    merged_sd = sd15_arch_pipeline(0)
    merged_sd.set_progress_bar_config(disable=True)
    merged = FasterDiffusionPipeline.from_diffusers(
        merged_sd, backend="torch", device="cpu", progress=False, token_merging=ratio
    )

    def reset() -> None:  # tomesd draws from its own generator: the same draws for every row
        merged_sd.unet._tome_info["args"]["generator"] = None
        torch.manual_seed(1)

    reset()
    merged(prompt, **warm)
    reset()
    tome_paper, t_tome = timed(lambda: merged(prompt, generator=gen(), schedule="paper", **common).images)
    reset()
    tomesd_ref, t_tomesd = timed(lambda: merged_sd(prompt, generator=gen(), **common).images)
    rows = [
        {"row": "diffusers", "seconds": t_ref, "rel_l2_vs_diffusers": 0.0},
        {
            "row": f"diffusers + tomesd (ratio {ratio})",
            "seconds": t_tomesd,
            "speedup_vs_diffusers": t_ref / t_tomesd,
            "rel_l2_vs_diffusers": rel_l2(tomesd_ref, ref),
        },
        {
            "row": "fd_trt torch paper",
            "seconds": t_paper,
            "speedup_vs_diffusers": t_ref / t_paper,
            "rel_l2_vs_diffusers": rel_l2(paper, ref),
        },
        {
            "row": f"fd_trt torch paper + ToMe (ratio {ratio})",
            "seconds": t_tome,
            "speedup_vs_diffusers": t_ref / t_tome,
            "speedup_vs_paper": t_paper / t_tome,
            "rel_l2_vs_diffusers": rel_l2(tome_paper, ref),
        },
    ]
    if check:
        reset()
        tome_all = merged(prompt, generator=gen(), schedule="all", **common).images
        rows.append(
            {
                "row": "fd_trt torch all + ToMe vs diffusers + tomesd",
                "max_abs": float((tome_all - tomesd_ref).abs().max()),
            }
        )
    tomesd.remove_patch(merged_sd)
    config = f"sd15-arch, {size}x{size}, DDIM-{steps}, CFG 7.5, ToMe ratio {ratio}, random weights"
    return {"case": "tome", "config": config, "steps": steps, "size": size, "ratio": ratio, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("if", "tome", "video"), required=True)
    ap.add_argument("--video", choices=("modelscope", "animatediff"), default="modelscope")
    ap.add_argument("--frames", type=int, default=8, help="video: frames per video")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, help="pixels (tome: 256, video: 128)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--backends", default="torch", help="IF, video: comma-separated fd_trt backends (torch,onnxruntime)"
    )
    ap.add_argument(
        "--schedules",
        default="all;paper",
        help="video: fd_trt schedules, separated by ';' (e.g. 'all;paper;deepcache:3;combined:power:10|none|1|fresh')",
    )
    ap.add_argument(
        "--check-tomesd", action="store_true", help="tome: also compare fd_trt all + ToMe with diffusers + tomesd"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny random models: a smoke run of the script")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.case == "if":
        result = bench_if(args.steps, args.tiny, backends)
    elif args.case == "video":
        schedules = tuple(x.strip() for x in args.schedules.split(";") if x.strip())
        result = bench_video(args.video, args.frames, args.size or 128, args.steps, args.tiny, backends, schedules)
    else:
        result = bench_tome(args.steps, args.size or 256, args.ratio, args.tiny, args.check_tomesd)
    result.update(cpu=_cpu(), threads=args.threads, command=" ".join(["bench_if_tome.py", *__import__("sys").argv[1:]]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
