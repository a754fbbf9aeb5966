"""The benchmark suite on the tiny model: schema, counted FLOPs, output files."""

import json

import pytest
import torch

from fd_trt.errors import InputError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.tools.bench import ROW_KEYS, BenchConfig, run_benchmark, write_outputs


@pytest.fixture(scope="module")
def report():
    cfg = BenchConfig(model="tiny", height=64, width=64, steps=50, backends=("torch", "auto"), repeat=1, warmup=1)
    return run_benchmark(cfg, progress=False)


def _hand_count(unet, x, t, e):
    """GFLOPs of one whole-UNet forward, counted by hand from the layer shapes (not FlopCounterMode).

    2 x multiply-adds of every Conv2d and Linear, split by where the layer sits: the time embedding,
    the encoder (conv_in, down_blocks, mid_block) and the decoder (up_blocks, conv_norm_out,
    conv_out). The two attention products (Q K^T and softmax(.) V, 2 N M d each) are returned
    apart under "attention" (and split as "attention_encoder" / "attention_decoder"): torch 2.13's
    FlopCounterMode has no formula for the CPU flash-attention kernel, which fd_trt adds
    (fd_trt.pipelines.pipeline.flop_counter_mode), so this checks that it is counted.
    """
    from diffusers.models.attention_processor import Attention

    parts = {"time": 0, "encoder": 0, "decoder": 0, "attention": 0, "attention_encoder": 0, "attention_decoder": 0}

    def part(name):
        if name.startswith(("time_embedding", "time_proj")):
            return "time"
        return "decoder" if name.startswith(("up_blocks", "conv_norm_out", "conv_out")) else "encoder"

    def hook(name):
        def count(mod, args, kwargs, out):
            if isinstance(mod, torch.nn.Conv2d):
                n = 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, torch.nn.Linear):
                n = 2 * out.numel() * mod.in_features
            else:  # Attention: [B, N, C] queries against [B, M, C'] keys
                q = args[0] if args else kwargs["hidden_states"]
                kv = kwargs.get("encoder_hidden_states")
                kv = q if kv is None else kv
                n = 2 * 2 * q.shape[0] * q.shape[1] * kv.shape[1] * mod.inner_dim
                parts["attention"] += n
                parts["attention_" + part(name)] += n
                return
            parts[part(name)] += n

        return count

    hooks = [
        m.register_forward_hook(hook(name), with_kwargs=True)
        for name, m in unet.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, Attention))
    ]
    try:
        with torch.no_grad():
            unet(x, t, e)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / 1e9 for k, v in parts.items()}


def test_rows_have_the_interface_keys(report):
    assert set(report) == {"config", "results"}
    systems = [(r["system"], r["schedule"]) for r in report["results"]]
    assert ("diffusers", "-") in systems and ("fd_trt", "all") in systems and ("fd_trt", "paper") in systems
    for row in report["results"]:
        assert tuple(row) == ROW_KEYS
    ok = [r for r in report["results"] if r["s_per_image"] is not None]
    assert all(r["s_per_image"] > 0 and r["peak_mem_mb"] > 0 for r in ok)
    # The torch rows: the auto rows may split a segment into several decoder calls (its measured choice).
    by = {(r["system"], r["schedule"]): r for r in ok if not str(r["backend"]).startswith("auto")}
    assert by[("diffusers", "-")]["rel_l2_vs_diffusers"] == 0
    assert by[("fd_trt", "all")]["rel_l2_vs_diffusers"] < 1e-5
    assert by[("fd_trt", "paper")]["rel_l2_vs_diffusers"] > 1e-4


def test_gflops_are_counted_per_system(report):
    sd = tiny_sd_pipeline(seed=0)
    L = sd.tokenizer.model_max_length
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, L, 32)
    t = torch.tensor([500.0, 500.0])
    hand = _hand_count(sd.unet, x, t, e)  # the CFG pair of rows of one step
    step = hand["time"] + hand["encoder"] + hand["decoder"]
    assert hand["attention"] > 0.04 * step  # so the test fails if attention goes uncounted again
    enc_row = (hand["time"] + hand["encoder"] + hand["attention_encoder"]) / 2  # each half embeds the timestep
    dec_row = (hand["time"] + hand["decoder"] + hand["attention_decoder"]) / 2
    step += hand["attention"]
    by = {(r["system"], r["schedule"]): r for r in report["results"] if not str(r["backend"]).startswith("auto")}
    assert by[("diffusers", "-")]["unet_gflops_per_image"] == pytest.approx(50 * step, rel=1e-6)
    assert by[("fd_trt", "all")]["unet_gflops_per_image"] == pytest.approx(100 * (enc_row + dec_row), rel=1e-6)
    assert by[("fd_trt", "all")]["unet_gflops_per_image"] == pytest.approx(50 * step, rel=5e-3)
    # paper: 9 encoder passes over the 2 CFG rows, and 100 decoder rows
    assert by[("fd_trt", "paper")]["unet_gflops_per_image"] == pytest.approx(18 * enc_row + 100 * dec_row, rel=1e-6)
    assert by[("fd_trt", "paper")]["encoder_calls"] == 9 and by[("fd_trt", "paper")]["decoder_calls"] == 9


def test_json_markdown_and_plot_are_written(report, tmp_path):
    j, m, p = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    write_outputs(report, str(j), str(m), str(p))
    assert json.loads(j.read_text())["results"][0]["system"] == "diffusers"
    assert "| fd_trt | torch | paper |" in m.read_text()
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_calibrated_schedule_finds_the_model_folders_calibrations():
    """``--schedules calibrated`` uses the calibrations saved in the benchmarked model's folder."""
    from fd_trt.families.models import default_model_dir
    from fd_trt.tools.bench import _model_folder

    assert _model_folder("default") == default_model_dir()
    assert _model_folder("tiny") is None and _model_folder("sd15-arch") is None
    assert str(_model_folder("/some/model")) == "/some/model"


def test_auto_and_authors_style_rows(report):
    rows = {(r["system"], r["backend"].split(":")[0], r["schedule"]): r for r in report["results"]}
    authors, paper = rows[("authors-style", "torch", "paper")], rows[("fd_trt", "torch", "paper")]
    assert authors["s_per_image"] > 0 and authors["encoder_calls"] == 9
    # The same algorithm: the same distance from diffusers.
    assert authors["rel_l2_vs_diffusers"] == pytest.approx(paper["rel_l2_vs_diffusers"], abs=1e-6)
    auto = rows[("fd_trt", "auto", "paper")]
    assert auto["backend"].startswith("auto:") and "auto chose" in auto["note"]
    assert auto["rel_l2_vs_diffusers"] == pytest.approx(paper["rel_l2_vs_diffusers"], abs=1e-4)
    assert rows[("fd_trt", "auto", "all")]["rel_l2_vs_diffusers"] < 1e-5


def test_sdxl_rows_run_on_the_tiny_sdxl_model():
    """The benchmark's SDXL path (``--model sdxl-arch`` in small): diffusers' StableDiffusionXLPipeline
    row, fd_trt torch ``all`` / ``paper``, and the rows that say why they did not run."""
    import importlib.util

    cfg = BenchConfig(model="tiny-sdxl", height=64, width=64, steps=10, backends=("torch",), repeat=1, warmup=0)
    rep = run_benchmark(cfg, progress=False)
    rows = {(r["system"], r["schedule"]): r for r in rep["results"]}
    diffusers, all_, paper = rows[("diffusers", "-")], rows[("fd_trt", "all")], rows[("fd_trt", "paper")]
    assert diffusers["s_per_image"] > 0 and diffusers["rel_l2_vs_diffusers"] == 0
    assert all_["rel_l2_vs_diffusers"] < 1e-5 and all_["encoder_calls"] == 10
    assert paper["encoder_calls"] == 5 and paper["decoder_calls"] == 5  # key steps 0,1,2,3,5 of 10
    assert 1e-4 < paper["rel_l2_vs_diffusers"] < 0.5
    assert 0 < paper["unet_gflops_per_image"] < all_["unet_gflops_per_image"]
    authors = rows[("authors-style", "paper")]
    assert authors["s_per_image"] is None and "SD 1.x/2.x" in authors["note"]
    if importlib.util.find_spec("DeepCache") is None:
        assert rows[("deepcache", "interval=3,branch=0")]["note"].startswith("not run")


@pytest.fixture(scope="module")
def cn_report():
    cfg = BenchConfig(
        model="tiny",
        height=64,
        width=64,
        steps=20,
        backends=("torch",),
        repeat=1,
        warmup=0,
        authors_style=False,
        controlnet=True,
    )
    return run_benchmark(cfg, progress=False)


def test_controlnet_rows_are_compared_with_diffusers_controlnet_pipeline(cn_report):
    """``--controlnet``: the same rows with a ControlNet, each against diffusers' ControlNet pipeline."""
    from fd_trt.tools.bench import controlnet_ratio, to_markdown

    rows = {(r["system"], r["schedule"]): r for r in cn_report["results"]}
    for tag in ("", "+controlnet"):
        ref = rows[("diffusers" + tag, "-")]
        assert ref["rel_l2_vs_diffusers"] == 0 and ref["speedup_vs_diffusers"] == 1.0
        assert rows[("fd_trt" + tag, "all")]["rel_l2_vs_diffusers"] < 1e-5  # "all" reproduces its own reference
        paper = rows[("fd_trt" + tag, "paper")]
        assert paper["speedup_vs_diffusers"] == pytest.approx(ref["s_per_image"] / paper["s_per_image"])
    # diffusers runs the ControlNet every step; fd_trt's paper schedule only at its key steps.
    assert rows[("diffusers+controlnet", "-")]["controlnet_calls"] == 20
    assert rows[("fd_trt+controlnet", "all")]["controlnet_calls"] == 20
    paper_cn = rows[("fd_trt+controlnet", "paper")]
    assert paper_cn["controlnet_calls"] == paper_cn["encoder_calls"] == 7
    assert rows[("fd_trt", "paper")]["controlnet_calls"] == 0
    # The ratio the issue asks for, from the measured speedups.
    ratio = cn_report["config"]["controlnet_ratio"]
    assert ratio == pytest.approx(paper_cn["speedup_vs_diffusers"] / rows[("fd_trt", "paper")]["speedup_vs_diffusers"])
    assert ratio == controlnet_ratio(cn_report["results"])
    # DeepCache with the ControlNet gets its own row (a note when DeepCache is not installed).
    assert ("deepcache+controlnet", "interval=3,branch=0") in rows
    assert "with the ControlNet is" in to_markdown(cn_report)


def test_controlnet_rows_differ_from_the_plain_ones():
    """The bench's ControlNet changes the images: its zero convolutions are not zero."""
    from fd_trt.families.models import tiny_sd_pipeline
    from fd_trt.tools.bench import controlnet_pipeline

    sd = tiny_sd_pipeline(seed=0)
    cn_sd, image = controlnet_pipeline(sd, 64, 64)
    assert image.shape == (1, 3, 64, 64)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=4, output_type="latent", latents=lat)
    plain = sd("a red circle", **common).images
    with_cn = cn_sd("a red circle", image=image, **common).images
    assert float((with_cn - plain).norm() / plain.norm()) > 1e-3


def test_controlnet_rows_refuse_an_sdxl_model_before_loading_it():
    with pytest.raises(InputError, match="'sdxl-arch' is SDXL"):
        run_benchmark(BenchConfig(model="sdxl-arch", controlnet=True), progress=False)


def test_deepcache_and_tgate_rows_per_knob():
    """One DeepCache row per interval and one T-GATE row per gate step, each against diffusers;
    T-GATE leaves the shared UNet's attention modules as it found them."""
    import importlib.util

    from fd_trt.tools import bench

    cfg = BenchConfig(
        model="tiny",
        height=64,
        width=64,
        steps=10,
        backends=("torch",),
        schedules=("all",),
        repeat=1,
        warmup=0,
        authors_style=False,
        tgate_gate_steps=(4, 20),
    )
    sd, _ = bench.load_model("tiny", 0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    names = [(s.system, s.schedule) for s in bench.build_systems(cfg, sd, latents)]
    assert [n for n in names if n[0] == "deepcache"] == [("deepcache", f"interval={i},branch=0") for i in (2, 3, 5)]
    assert [n for n in names if n[0] == "tgate"] == [("tgate", "gate_step=4"), ("tgate", "gate_step=20")]
    rep = run_benchmark(cfg, progress=False)
    rows = {(r["system"], r["schedule"]): r for r in rep["results"]}
    assert "not below the 10 steps" in rows[("tgate", "gate_step=20")]["note"]
    if importlib.util.find_spec("DeepCache") is not None:
        l2 = [rows[("deepcache", f"interval={i},branch=0")]["rel_l2_vs_diffusers"] for i in (2, 3, 5)]
        assert 0 < l2[0] < l2[2]  # a longer interval reuses more: further from diffusers
        assert rows[("deepcache", "interval=5,branch=0")]["encoder_calls"] == 2
    if importlib.util.find_spec("tgate") is not None:
        tg = rows[("tgate", "gate_step=4")]
        assert tg["s_per_image"] > 0 and 0 < tg["rel_l2_vs_diffusers"] < 1
        # After a T-GATE run, the shared UNet computes as before.
        x, e = torch.randn(2, 4, 8, 8), torch.randn(2, sd.tokenizer.model_max_length, 32)
        before = sd.unet(x, 500, e).sample
        tg_sys = [s for s in bench.build_systems(cfg, sd, latents) if s.schedule == "gate_step=4"][0]
        tg_sys.run()
        assert all("forward" not in m.__dict__ for m in sd.unet.modules() if type(m).__name__ == "Attention")
        assert torch.equal(sd.unet(x, 500, e).sample, before)
    else:
        assert rows[("tgate", "gate_step=4")]["note"].startswith("not run")


def test_front_points_plot_and_config(tmp_path):
    """``--front``: every method's knob swept; the JSON gains each method's points and Pareto front."""
    from fd_trt.tools.bench import FRONT_SCHEDULES, front_config, front_points

    cfg = front_config(BenchConfig(model="tiny", steps=20, schedules=("all", "paper")))
    assert cfg.front and cfg.schedules[:2] == ("all", "paper") and "calibrated" not in cfg.schedules
    assert set(FRONT_SCHEDULES) - {"calibrated"} <= set(cfg.schedules)
    # DeepCache-like rows with the whole-decoder steps dense at the start: K = round(20 * f) for
    # f in 0.16, 0.2, 0.26, 0.34, 0.4, 0.44, 0.5 -> 3, 4, 5, 7, 8, 9, 10.
    dense = [s for s in cfg.schedules if s.startswith("combined:power:")]
    assert dense == [f"combined:power:{k}|none|1|fresh" for k in (3, 4, 5, 7, 8, 9, 10)]
    assert cfg.tgate_gate_steps == (5, 10) and len(cfg.deepcache_intervals) >= 3
    assert "calibrated" in front_config(BenchConfig(model="default")).schedules

    def row(system, schedule, speedup, l2, backend="torch"):
        r = {k: None for k in ROW_KEYS}
        r.update(system=system, backend=backend, schedule=schedule, precision="fp32", s_per_image=1.0 / speedup)
        r.update(speedup_vs_diffusers=speedup, rel_l2_vs_diffusers=l2)
        return r

    report = {
        "config": {"model": "tiny", "height": 64, "width": 64, "scheduler": "ddim", "steps": 20, "front": True},
        "results": [
            row("diffusers", "-", 1.0, 0.0),
            row("fd_trt", "paper", 2.0, 0.05),
            row("fd_trt", "uniform:3", 1.8, 0.06),  # beaten by paper on both axes
            row("fd_trt", "combined:uniform:3|uniform:2|1", 2.5, 0.04),
            row("deepcache", "interval=3,branch=0", 2.2, 0.05),
            row("tgate", "gate_step=10", 1.3, 0.2),
        ],
    }
    front = front_points(report)
    assert {p["method"] for p in front["points"]} == {
        "fd_trt torch, encoder propagation",
        "fd_trt torch, decoder schedules",
        "DeepCache",
        "T-GATE",
    }
    assert [p["knob"] for p in front["fronts"]["fd_trt torch, encoder propagation"]] == ["paper"]
    j, p = tmp_path / "f.json", tmp_path / "f.png"
    write_outputs(report, str(j), None, str(p))
    assert json.loads(j.read_text())["front"]["fronts"]["DeepCache"][0]["speedup"] == 2.2
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_knob_flags_are_checked():
    from fd_trt.cli.bench import _ints

    assert _ints("2,3, 5", "--deepcache-intervals") == (2, 3, 5)
    for bad in ("", "0", "2,x"):
        with pytest.raises(InputError, match="--tgate-gate-steps takes comma-separated positive integers"):
            _ints(bad, "--tgate-gate-steps")
