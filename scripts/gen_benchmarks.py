#!/usr/bin/env python
"""Writes the benchmark tables of docs/benchmarks.md and README.md from the JSON in docs/benchmarks/.

    python scripts/gen_benchmarks.py           # rewrites the generated sections
    python scripts/gen_benchmarks.py --check   # exits 1 if a section is out of date

Every number in those sections is read from a benchmark report (``fd-trt bench --json``): times,
ranges, call counts, GFLOPs, relative L2 and speedups (each row's s/image against the diffusers row
of the same report). The command of each report is rebuilt from its recorded config. Which reports
are current, and on which machine they ran, is listed in RUNS below; a report not listed there is
an error, so superseded runs are deleted rather than left behind.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "docs" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

# The machines, named as lscpu names them, with the instruction-set facts that matter here.
AMD_AVX2 = 'AMD EPYC, 2 cores (`lscpu`: "AMD EPYC"; AVX2, no AVX-512)'
AMD_AVX512 = 'AMD EPYC, 2 cores (`lscpu`: "AMD EPYC"; AVX-512 and AVX512-BF16, no AMX)'
INTEL_AMX = 'Intel Xeon, 2 cores (`lscpu`: "Intel(R) Xeon(R) Processor"; AVX-512, AVX512-BF16 and AMX)'
SHORT = {AMD_AVX2: "AMD EPYC (AVX2)", AMD_AVX512: "AMD EPYC (AVX-512, BF16)", INTEL_AMX: "Intel Xeon (AMX)"}


@dataclass
class Run:
    json: str
    note: str = ""
    env: str = ""


@dataclass
class Table:
    title: str
    machine: str
    runs: list[Run]
    text: str = ""
    # rows of this table shown in the README's speedup table: (run index, system, backend, schedule, precision)
    readme: list[tuple[int, str, str, str, str]] = field(default_factory=list)


EXPORTED_FIRST = "the ONNX graphs were exported first, in their own process, so that `auto` finds them"

RUNS: list[Table] = [
    Table(
        "sd15-arch, 128x128",
        AMD_AVX512,
        [Run("bench_sd15_128_auto_rule96_amd512_r3.json", EXPORTED_FIRST)],
        readme=[(0, "fd_trt", "auto:onnxruntime/fp32", "paper", "fp32")],
    ),
    Table(
        "sd15-arch, 256x256",
        AMD_AVX512,
        [
            Run("bench_sd15_256_auto_rule96_amd512_r3.json", EXPORTED_FIRST),
            Run("bench_sd15_256_precision_auto_idle_r3.json", EXPORTED_FIRST + "; `precision=auto` lets bf16 compete"),
        ],
        text="This CPU's AVX512-BF16 has no AMX: bf16 helps, but the decoder's matrix work bounds the speedup "
        "at about 3.2-3.4x.",
        readme=[
            (0, "fd_trt", "auto:onnxruntime/fp32", "paper", "fp32"),
            (1, "fd_trt", "auto:torch/bf16", "paper", "auto"),
        ],
    ),
    Table(
        "sd15-arch, 128x128",
        INTEL_AMX,
        [Run("bench_sd15_128_auto_intel_idle_r3.json", "the onnxruntime row built the graphs in the same process")],
        readme=[(0, "fd_trt", "auto:onnxruntime/fp32", "paper", "fp32")],
    ),
    Table(
        "sd15-arch, 256x256",
        INTEL_AMX,
        [
            Run("bench_sd15_256_torch_skipshare_intel_r3.json"),
            Run("bench_sd15_256_auto_skipshare_intel_r3.json", EXPORTED_FIRST),
            Run(
                "bench_sd15_256_auto_glibc_tunables_intel_r3.json",
                EXPORTED_FIRST + "; glibc keeps freed buffers (see the backends guide)",
                env="GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776",
            ),
        ],
        text="Compare rows within a run: this virtual machine's speed drifted by 10-30% between runs, as the "
        "three diffusers rows show. AMX makes torch bf16 the fastest backend here.",
        readme=[(0, "fd_trt", "torch", "paper", "fp32"), (0, "fd_trt", "torch", "paper", "bf16")],
    ),
    Table(
        "sd15-arch with a ControlNet, 128x128",
        AMD_AVX2,
        [Run("bench_sd15_128_controlnet_idle.json", "one timed run after a warm-up of every row")],
        text="The `+controlnet` rows' speedup and relative L2 are against `diffusers+controlnet`. The "
        "ControlNet runs at the 9 key steps instead of 50 steps, so `paper` gains more with it.",
        readme=[(0, "fd_trt+controlnet", "torch", "paper", "fp32")],
    ),
    Table(
        "sd15-arch, 128x128: DeepCache-like decoder schedules against DeepCache",
        AMD_AVX2,
        [
            Run("bench_sd15_128_decoder_schedules.json", "one timed run per row, no warm-up"),
            Run("bench_sd15_128_decoder_schedules_fast.json", "one timed run per row, no warm-up"),
            Run(
                "bench_sd15_128_decoder_schedules_ort.json",
                "one timed run per row, no warm-up: the first onnxruntime row (`power:8`) includes the 282 s "
                "export of the graphs and is not a speed figure",
            ),
        ],
        text="Random weights, so the fidelity figures say how far each method moves this UNet's output, not "
        "how an image looks. Compare rows within a run: the diffusers row took 102.9 s in one and 94.2 s in "
        "the other.",
    ),
    Table(
        "sd15-arch, 256x256: DeepCache-like decoder schedules against DeepCache",
        AMD_AVX2,
        [
            Run("bench_sd15_256_decoder_schedules.json", "one timed run per row, no warm-up"),
            Run(
                "bench_sd15_256_decoder_schedules_ort.json",
                "one timed run per row, no warm-up: the first onnxruntime row (`power:9`) includes the 303 s "
                "export of the graphs and is not a speed figure",
            ),
        ],
        text="Random weights, as at 128x128. Every DeepCache interval has an fd_trt row on torch that is at "
        "least 1.1x faster at lower rel. L2: `power:17` against interval 2 (1.43x), `power:13` and `power:10` "
        "against interval 3 (1.13x, 1.39x), `power:8` against interval 5 (1.15x). On onnxruntime, `power:8` "
        "is 1.34x faster than interval 5 of the same run at lower rel. L2 (0.036 against 0.058).",
    ),
    Table(
        "sdxl-arch, 256x256",
        AMD_AVX2,
        [Run("bench_sdxl_256_ddim50_idle.json", "no warm-up: a diffusers run takes 7-8 minutes here")],
        text="No ONNX Runtime rows: its fp32 graphs (10.3 GB of weights) loaded next to the 13 GB pipeline "
        "need more than the 23 GB of memory this CPU had.",
        readme=[(0, "fd_trt", "torch", "paper", "fp32")],
    ),
    Table(
        "The default model, 64x64: DeepCache-like decoder schedules against DeepCache",
        AMD_AVX2,
        [Run("bench_default_64_decoder_schedules.json", "two timed runs after a warm-up of every row")],
        text="Rel. L2 of the final latents against diffusers. `combined:power:K|none|1|fresh` is DeepCache's "
        "branch 0 with its K whole-decoder steps placed densely at the start; `deepcache:N` reproduces the "
        "DeepCache package's interval N. The torch rows ran in the same process as the onnxruntime rows and were 15-50% "
        "slower than in a torch-only run; the torch-only front is in the decoder-schedules guide.",
    ),
    Table(
        "The default model, 128x128: DeepCache-like decoder schedules against DeepCache",
        AMD_AVX2,
        [
            Run("bench_default_128_decoder_schedules.json", "three timed runs after a warm-up of every row"),
            Run("bench_default_128_decoder_schedules_mid.json", "three timed runs after a warm-up of every row"),
            Run(
                "bench_default_128_fast_end.json",
                "the fast end, torch and onnxruntime: five timed runs after a warm-up of every row; the two "
                "`combined:...|none|1` rows are the schedules `fd-trt calibrate --decoder --height 128` chose for "
                "`--max-error 0.11` and `0.09`",
            ),
        ],
        text="Twice the default model's native size: here a shallow step (the last up layer at full "
        "resolution) costs a larger share of a whole step, and the dense rows gain less over DeepCache than at "
        "64x64. Single timed runs varied by up to about 20%. In the fast-end run, the torch rows `power:12` "
        "(0.103) and `power:10` (0.116) are 1.22x and 1.08x faster than DeepCache's intervals 4 (0.106) and 5 "
        "(0.131); on onnxruntime 1.60x and 1.44x.",
    ),
    Table(
        "The default model, 256x256: DeepCache-like decoder schedules against DeepCache",
        AMD_AVX2,
        [
            Run("bench_default_256_decoder_schedules.json", "two timed runs after a warm-up of every row"),
            Run(
                "bench_default_256_fast_end.json",
                "the fast end, torch and onnxruntime: three timed runs after a warm-up of every row",
            ),
        ],
        text="Four times the default model's native size (its UNet was trained at 64x64, so these images are "
        "off its training distribution; the rel. L2 still measures how far each method moves the result). "
        "In the first run the dense rows are 1.19x and 1.16x faster than DeepCache's intervals 2 and 3 at lower "
        "error. In the fast-end run, torch `power:12` (0.206) is 1.12x faster than interval 4 (0.215) and "
        "`power:10` (0.233) 1.04x faster than interval 5 (0.244); on onnxruntime `power:11` and `power:10` are "
        "1.66x and 1.32x faster.",
    ),
    Table(
        "The default model, 256x256, the fast end on another machine",
        AMD_AVX512,
        [
            Run(
                "bench_default_256_fast_end_amd512.json",
                "torch only, shallow steps sharing the hidden half of their first layer; five timed runs "
                "after a warm-up of every row",
            ),
        ],
        text="On this machine the torch rows are not ahead of DeepCache at the fast end: `power:10` (0.233) "
        "took 1.717 s against interval 5's 1.519 s (0.244), and `power:13` (0.197) 1.867 s against interval 4's "
        "1.906 s (0.215). Both run ten whole UNet steps and forty shallow ones at `power:10` / interval 5: the "
        "same work, placed so that fd_trt's error is lower, and single runs spread by 10-25% (min-max column).",
    ),
]

MODELS = {
    "default": "the shipped default model (a small SD-shaped UNet trained on shapes, 64x64 images), the one "
    "the quick start runs",
    "sd15-arch": "SD1.5's exact UNet (860M parameters), a CLIP-L-width text encoder and a tiny VAE with factor 8, "
    "random weights, built in code",
    "sdxl-arch": "SDXL base's exact UNet (2567M parameters), text encoders of CLIP ViT-L's and OpenCLIP "
    "ViT-bigG's shapes and a tiny VAE, random weights, built in code",
}


def load(name: str) -> dict[str, Any]:
    return json.loads((BENCH_DIR / name).read_text())


def command(cfg: dict[str, Any], env: str = "") -> str:
    parts = [f"{env} " if env else "", "python scripts/benchmark.py"]
    parts.append(f" --model {cfg['model']} --height {cfg['height']} --width {cfg['width']} --steps {cfg['steps']}")
    if cfg.get("scheduler", "ddim") != "ddim":
        parts.append(f" --scheduler {cfg['scheduler']}")
    if cfg.get("guidance", 7.5) != 7.5:
        parts.append(f" --guidance {cfg['guidance']}")
    schedules = cfg["schedules"]
    joined = (";" if any("," in x for x in schedules) else ",").join(schedules)
    parts.append(f" --backends {','.join(cfg['backends'])} --schedules {shlex.quote(joined)}")
    parts.append(f" --precisions {','.join(cfg['precisions'])}")
    if cfg.get("controlnet"):
        parts.append(" --controlnet")
    if not cfg.get("deepcache", True):
        parts.append(" --no-deepcache")
    elif tuple(cfg.get("deepcache_intervals", (2, 3, 5))) != (2, 3, 5):
        parts.append(f" --deepcache-intervals {','.join(map(str, cfg['deepcache_intervals']))}")
    if not cfg.get("tgate", True):
        parts.append(" --no-tgate")
    if not cfg.get("authors_style", True):
        parts.append(" --no-authors-style")
    parts.append(f" --repeat {cfg['repeat']} --warmup {cfg['warmup']} --threads {cfg['threads']}")
    return "".join(parts)


def _diffusers(rows: list[dict[str, Any]], system: str) -> dict[str, Any]:
    base = "diffusers+controlnet" if system.endswith("+controlnet") else "diffusers"
    return next(r for r in rows if r["system"] == base)


def speedup(rows: list[dict[str, Any]], row: dict[str, Any]) -> float:
    return _diffusers(rows, row["system"])["s_per_image"] / row["s_per_image"]


def _cell(text: str) -> str:
    """A table cell: a decoder schedule's ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _l2(v: float | None) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")


def table_md(t: Table) -> str:
    letters = "abcdefgh"
    out = [f"### {t.title}: {SHORT[t.machine]}", "", f"Machine: {t.machine}; idle; 2 threads.", ""]
    if t.text:
        out += [t.text, ""]
    out += [
        "| run | system | backend | schedule | precision | s/image (min-max) | UNet s | vs diffusers | enc / dec calls "
        "| UNet GFLOP | rel. L2 vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(t.runs):
        rows = load(run.json)["results"]
        for r in rows:
            tag = f"[{letters[i]}]"
            if r.get("s_per_image") is None:
                out.append(
                    f"| {tag} | {r['system']} | {r['backend']} | {_cell(r['schedule'])} | {r['precision']} | "
                    f"{(r.get('note') or 'not run').replace('|', '/')} | | | | | |"
                )
                continue
            sp = speedup(rows, r)
            mark = f"**{sp:.2f}x**" if r["system"].startswith("fd_trt") else f"{sp:.2f}x"
            calls = f"{r['encoder_calls']} / {r['decoder_calls']}"
            if r.get("controlnet_calls"):
                calls += f" (+{r['controlnet_calls']} CN)"
            gf = r.get("unet_gflops_per_image")
            out.append(
                f"| {tag} | {r['system']} | {r['backend']} | {_cell(r['schedule'])} | {r['precision']} | "
                f"{_s(r['s_per_image'])} ({_s(r.get('s_min'))}-{_s(r.get('s_max'))}) | {_s(r.get('unet_s_per_image'))} "
                f"| {mark} | {calls} | {'-' if not gf else f'{gf:.1f}'} | {_l2(r.get('rel_l2_vs_diffusers'))} |"
            )
    out.append("")
    for i, run in enumerate(t.runs):
        cfg = load(run.json)["config"]
        note = f" ({run.note})" if run.note else ""
        out.append(
            f"- [{letters[i]}] [`benchmarks/{run.json}`](benchmarks/{run.json}), median of {cfg['repeat']} "
            f"alternating run(s) after {cfg['warmup']} warm-up(s){note}:"
        )
        out += ["", "    ```bash", f"    {command(cfg, run.env)}", "    ```", ""]
    return "\n".join(out)


def page_section() -> str:
    out = []
    model = None
    for t in RUNS:
        m = load(t.runs[0].json)["config"]["model"]
        if m != model:
            model = m
            out += [f"## {m}", "", f"`{m}`: {MODELS[m]}.", ""]
        out.append(table_md(t))
    out += [
        "## Index of the JSON reports",
        "",
        "| report | model | size | machine | backends | precisions | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in RUNS:
        for run in t.runs:
            cfg = load(run.json)["config"]
            out.append(
                f"| [`{run.json}`](benchmarks/{run.json}) | {cfg['model']}{' + ControlNet' if cfg.get('controlnet') else ''} "
                f"| {cfg['height']}x{cfg['width']} | {SHORT[t.machine]} | {', '.join(cfg['backends'])} "
                f"| {', '.join(cfg['precisions'])} | {cfg['repeat']} |"
            )
    out.append("")
    return "\n".join(out)


def readme_section() -> str:
    out = [
        "| model, size | machine (2 cores) | fd_trt backend | fd_trt s/image | diffusers s/image | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for t in RUNS:
        for idx, system, backend, schedule, precision in t.readme:
            rows = load(t.runs[idx].json)["results"]
            r = next(
                x
                for x in rows
                if (x["system"], x["backend"], x["schedule"], x["precision"]) == (system, backend, schedule, precision)
            )
            cfg = load(t.runs[idx].json)["config"]
            name = f"{cfg['model']}{' + ControlNet' if system.endswith('+controlnet') else ''}, {cfg['height']}x{cfg['width']}"
            label = backend if backend.startswith("auto") else f"{backend} {precision}"
            out.append(
                f"| {name} | {SHORT[t.machine]} | {label} | {_s(r['s_per_image'])} | "
                f"{_s(_diffusers(rows, system)['s_per_image'])} | **{speedup(rows, r):.2f}x** |"
            )
    return "\n".join(out)


def replace(text: str, begin: str, end: str, body: str, path: Path) -> str:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0:
        raise SystemExit(f"{path}: markers {begin!r} ... {end!r} not found")
    return text[: i + len(begin)] + "\n" + body + "\n" + text[j:]


PAGE_BEGIN = "<!-- tables:begin (generated by scripts/gen_benchmarks.py from docs/benchmarks/*.json; do not edit) -->"
PAGE_END = "<!-- tables:end -->"
README_BEGIN = "<!-- speedups:begin (generated by scripts/gen_benchmarks.py; do not edit) -->"
README_END = "<!-- speedups:end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
    args = ap.parse_args(argv)
    listed = {run.json for t in RUNS for run in t.runs}
    present = {p.name for p in BENCH_DIR.glob("bench_*.json")}
    if listed != present:
        print(
            f"docs/benchmarks: reports not listed in RUNS: {sorted(present - listed)}; "
            f"listed but missing: {sorted(listed - present)}",
            file=sys.stderr,
        )
        return 1
    stale = []
    for path, begin, end, body in (
        (PAGE, PAGE_BEGIN, PAGE_END, page_section()),
        (README, README_BEGIN, README_END, readme_section()),
    ):
        text = path.read_text()
        new = replace(text, begin, end, body, path)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
                print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python scripts/gen_benchmarks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
