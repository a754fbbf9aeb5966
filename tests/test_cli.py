import json
import subprocess
import sys

import PIL.Image
import pytest

from fd_trt.cli import main


def test_generate_compare_writes_image_and_json(tmp_path, capsys):
    out, js = tmp_path / "img.png", tmp_path / "stats.json"
    rc = main(
        [
            "generate",
            "a red circle",
            "--steps",
            "12",
            "--compare",
            "--repeat",
            "2",
            "--quiet",
            "--out",
            str(out),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "relative L2" in printed and "model: default" in printed
    assert "auto chose" in printed and "speedup vs diffusers" in printed
    auto = json.loads(js.read_text())["auto"]  # the decision of the asked schedule, not of 'all'
    assert auto["key"]["key_steps"] == [0, 1, 2, 3, 5, 10] and auto["backend"] in ("torch", "onnxruntime")
    assert PIL.Image.open(out).size == (64, 64)
    report = json.loads(js.read_text())
    assert report["stats"]["encoder_calls"] == 6  # paper cut below 12 steps: 0,1,2,3,5,10
    assert report["compare"]["all_stats"]["encoder_calls"] == 12
    assert report["compare"]["rel_l2_latents_vs_all"] > 0
    assert 0 < report["compare"]["unet_flops_reduction"] < 1
    # Two alternating timed runs per schedule; the reported one is the lower median, i.e. the faster.
    cmp = report["compare"]
    assert cmp["repeat"] == 2 and len(cmp["totals_s"]) == 2 and len(cmp["all_totals_s"]) == 2
    assert report["stats"]["seconds"]["total"] == min(cmp["totals_s"])
    assert cmp["all_stats"]["seconds"]["total"] == min(cmp["all_totals_s"])
    assert cmp["speedup_total"] == pytest.approx(min(cmp["all_totals_s"]) / min(cmp["totals_s"]))
    assert "median of 2 alternating runs" in printed


def test_generate_compare_runs_plain_diffusers_on_the_same_seed(tmp_path, capsys):
    js = tmp_path / "c.json"
    rc = main(
        [
            "generate",
            "a red circle",
            "--steps",
            "12",
            "--compare",
            "--repeat",
            "1",
            "--quiet",
            "--backend",
            "torch",
            "--out",
            str(tmp_path / "a.png"),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "diffusers:" in printed and "speedup vs diffusers" in printed and "vs 'all' on torch" in printed
    report = json.loads(js.read_text())
    d = report["compare"]["diffusers"]
    assert d["pipeline"] == "StableDiffusionPipeline" and len(d["totals_s"]) == 1 and d["seconds"] > 0
    assert d["speedup"] == pytest.approx(d["seconds"] / report["stats"]["seconds"]["total"])
    # 'all' on the torch backend is plain diffusers: same seed, scheduler and steps.
    assert d["all_rel_l2_latents"] < 1e-4 and d["all_rel_l2_images"] < 1e-4
    assert d["rel_l2_latents"] > 1e-3 and 0 < d["rel_l2_images"] < 1  # paper's key steps change the result
    assert "auto" not in report  # an explicit backend: no tuning


def test_generate_rejects_a_bad_repeat(tmp_path, capsys):
    rc = main(["generate", "x", "--compare", "--repeat", "0", "--quiet", "--out", str(tmp_path / "a.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--repeat must be a positive integer, got 0" in err and "Traceback" not in err


def test_generate_reports_bad_input_without_a_traceback(tmp_path, capsys):
    rc = main(["generate", "x", "--height", "62", "--quiet", "--out", str(tmp_path / "a.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "height=62 is not divisible by the VAE factor" in err and "Traceback" not in err


def test_bad_schedule_from_the_cli(tmp_path, capsys):
    rc = main(["generate", "x", "--schedule", "2,3", "--quiet", "--out", str(tmp_path / "a.png")])
    assert rc == 2
    assert "no step 0" in capsys.readouterr().err


def test_import_fd_trt_loads_no_gpu_or_graph_runtime():
    code = (
        "import sys, fd_trt, fd_trt.backends, fd_trt.pipelines.pipeline, fd_trt.cli; "
        "bad = [m for m in ('tensorrt', 'onnxruntime', 'cuda', 'onnx', 'polygraphy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generate_suggests_bf16_only_where_the_cpu_has_bf16_units(tmp_path, capsys, monkeypatch):
    import fd_trt.cli.generate
    import fd_trt.utils.system

    js = tmp_path / "h.json"
    monkeypatch.setattr(fd_trt.utils.system, "has_fast_bf16", lambda: True)
    # The hint runs only after a cheap run; a loaded CI machine may take longer than the limit.
    monkeypatch.setattr(fd_trt.cli.generate, "BF16_HINT_MAX_S", 1e9)
    rc = main(
        [
            "generate",
            "a red circle",
            "--steps",
            "6",
            "--quiet",
            "--backend",
            "torch",
            "--out",
            str(tmp_path / "a.png"),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    assert "hint: this CPU has" in capsys.readouterr().out
    hint = json.loads(js.read_text())["bf16_hint"]
    assert hint["bf16_s"] > 0 and 0 < hint["rel_l2"] < 0.5
    monkeypatch.setattr(fd_trt.utils.system, "has_fast_bf16", lambda: False)
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--steps",
                "2",
                "--quiet",
                "--backend",
                "torch",
                "--out",
                str(tmp_path / "b.png"),
            ]
        )
        == 0
    )
    assert "hint:" not in capsys.readouterr().out


def test_the_bf16_hint_suggests_bf16_only_when_it_was_faster():
    from fd_trt.cli import bf16_hint_text

    faster = bf16_hint_text("AVX512-BF16", 0.241, 0.285, 2.6e-2, "auto:torch/fp32")
    assert "(1.18x)" in faster and faster.endswith("--precision auto lets backend auto choose it")
    slower = bf16_hint_text("AVX512-BF16", 0.267, 0.222, 2.6e-2, "auto:onnxruntime/fp32")
    assert (
        "(0.83x)" in slower and "not faster here, so fp32 stays" in slower and "lets backend auto choose" not in slower
    )
