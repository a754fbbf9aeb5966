"""The command line prints only its own progress and results: no library noise, no misplaced first-use warning.

The quick start's commands run in fresh processes on the embedded default model, as a user runs them,
with diffusers made to believe ``accelerate`` is missing (so that its "pip install accelerate"
warning would be printed if the command line let it through) and without the test suite's
``TRANSFORMERS_VERBOSITY``. A plain pipeline call that builds graphs still warns that it did.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]

# fd-trt with diffusers' accelerate check answering "not installed".
NO_ACCELERATE = (
    "import sys; import diffusers.utils.import_utils as iu; iu._accelerate_available = False; "
    "from fd_trt.cli import main; raise SystemExit(main(sys.argv[1:]))"
)

# What a user of the command line cannot act on.
NOISE = (
    "torchvision",  # transformers: CLIPImageProcessor / SiglipImageProcessor fall back to PIL
    "accelerate",  # diffusers: "Cannot initialize model with low cpu memory usage ... pip install accelerate"
    "on first use",  # fd_trt: graphs built by a call, wrong when the build was asked for
    "Loading pipeline components",  # diffusers' loading bar
    "Loading weights",  # transformers' loading bar
    "[transformers]",
    "WARNING",
)


def _fd_trt(args: list[str], cache: Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    env.update(FD_TRT_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", NO_ACCELERATE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


@pytest.mark.slow
def test_the_quick_start_prints_no_library_noise(tmp_path):
    cache = tmp_path / "cache"
    built = _fd_trt(["build", "--tune", "--steps", "4"], cache, tmp_path)
    assert "auto chose" in built and "tuning decisions cached in" in built
    assert list(cache.glob("*/manifest.json"))  # the build did build graphs
    out = _fd_trt(
        ["generate", "a red circle", "--steps", "4", "--compare", "--repeat", "1", "--out", "out.png"], cache, tmp_path
    )
    assert "speedup vs diffusers" in out and (tmp_path / "out.png").is_file()
    for text in (built, out):
        found = [n for n in NOISE if n in text]
        assert not found, f"{found} in:\n{text}"


def test_log_level_debug_shows_the_library_warnings(tmp_path):
    out = _fd_trt(
        ["generate", "x", "--steps", "2", "--backend", "torch", "--log-level", "debug", "--out", "o.png"],
        tmp_path / "cache",
        tmp_path,
    )
    # The check above is not vacuous: the warning is there to be hidden.
    assert "Cannot initialize model with low cpu memory usage because `accelerate`" in out


def test_accelerate_is_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("<")[0].strip() == "accelerate" for d in deps)


def test_a_call_that_builds_warns_and_prepare_does_not(tiny_sd, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    logger = "fd_trt.pipelines.runner_pool"
    with caplog.at_level(logging.INFO, logger=logger):
        pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
        pipe("x", num_inference_steps=2, output_type="latent")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "on first use" in r.message]
    assert len(warned) == 1
    pipe.close()

    # Asked for ahead of time: the build is logged at INFO, and not as a first-use build.
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache2"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger):
        pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
        pipe.prepare()
        pipe("x", num_inference_steps=2, output_type="latent")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in caplog.records if r.levelno == logging.INFO and r.message.startswith("built graphs for")]
    pipe.close()


def test_build_tune_does_not_call_its_build_a_first_use(tiny_sd, tmp_path, monkeypatch, capsys):
    from fd_trt.cli import main

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_sd.save_pretrained(folder, safe_serialization=True)
    assert main(["build", "--model", str(folder), "--tune", "--quiet", "--steps", "4", "--schedule", "paper"]) == 0
    out, err = capsys.readouterr()
    assert "auto chose" in out and list((tmp_path / "cache").glob("*/manifest.json"))
    assert "on first use" not in out + err and "WARNING" not in err
