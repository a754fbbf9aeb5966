"""backend="auto": choice from measured (here injected) costs, the decision cache, and its keys."""

import pytest
import torch

from fd_trt.backends.auto import AutoRunner, Candidate, CostTable, choose, load_decision, predict_seconds
from fd_trt.core.features import Features
from fd_trt.core.runner import Runner
from fd_trt.core.schedule import parse_schedule
from fd_trt.errors import EngineMismatchError
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline

from conftest import rel_l2

TORCH = Candidate("torch", "fp32")
ORT = Candidate("onnxruntime", "fp32")
PAPER = [1, 1, 1, 2, 5, 5, 10, 10, 15]  # segment lengths of paper at DDIM-50


def linear(encoder_s, per_call, per_step, sizes=(1, 2, 4, 8, 15)):
    """A cost table where a decoder call costs per_call + per_step * steps."""
    return CostTable(encoder_s, {s: per_call + per_step * s for s in sizes})


def test_prediction_counts_one_encoder_call_per_segment_and_chunked_decoder_calls():
    costs = CostTable(1.0, {1: 1.0, 2: 1.5, 5: 3.0})
    # segments 5 and 2 in calls of 2 steps: 5 = 2+2+1, 2 = 2
    assert predict_seconds(costs, [5, 2], 2) == pytest.approx(2 * 1.0 + 3 * 1.5 + 1.0)
    assert predict_seconds(costs, [5, 2], 5) == pytest.approx(2 * 1.0 + 3.0 + 1.5)
    assert CostTable(0, {2: 2.0, 4: 3.0}).decoder(3) == pytest.approx(2.5)  # interpolated


def test_auto_prefers_the_backend_whose_batched_decoder_pays():
    # torch pays a large cost per call (batching pays); ORT's calls cost the same per step at any size.
    d = choose({TORCH: linear(0.02, 0.010, 0.002), ORT: linear(0.03, 0.001, 0.006)}, PAPER)
    assert d.backend == "torch" and d.steps_per_call is None  # whole segments
    labels = {row["label"]: row for row in d.table}
    assert labels["torch/fp32"]["predicted_s"] < labels["onnxruntime/fp32"]["predicted_s"]


def test_auto_picks_single_step_calls_when_batching_costs_more():
    # ORT on the CPU: a decoder call of many steps costs more per step than single steps.
    ort = CostTable(0.01, {1: 0.005, 2: 0.011, 4: 0.024, 8: 0.05, 15: 0.1})
    d = choose({ORT: ort, TORCH: linear(0.05, 0.02, 0.01)}, PAPER)
    assert (d.backend, d.steps_per_call) == ("onnxruntime", 1)


def test_near_ties_go_to_larger_calls():
    # Per-step cost flat in the call size (or 1% apart): the measurement cannot tell, so whole segments.
    flat = CostTable(0.05, {1: 0.0594, 2: 0.12, 4: 0.24, 8: 0.48, 15: 0.9})
    assert choose({TORCH: flat}, PAPER).steps_per_call is None


def test_sequential_runs_and_row_caps_limit_the_call_size():
    torch_costs = linear(0.02, 0.010, 0.002)
    assert choose({TORCH: torch_costs}, PAPER, parallel=False).steps_per_call == 1
    assert choose({TORCH: torch_costs}, PAPER, max_steps=5).steps_per_call == 5


class FakeRunner(Runner):
    """Returns zeros of the right shapes; counts launches."""

    def __init__(self, name):
        super().__init__("cpu", torch.float32)
        self.name = name

    def encode(self, sample, timestep, text, added=None):
        self.launches["encoder"] += 1
        return Features(torch.zeros(sample.shape[0], 8, 2, 2), (torch.zeros(sample.shape[0], 4, 8, 8),))

    def decode(self, features, timesteps, text, added=None):
        self.launches["decoder"] += 1
        return torch.full((features.rows * timesteps.shape[0], 4, 8, 8), float(timesteps[0]))


def make_auto(tmp_path, costs, weights="w0", latent=(4, 8, 8), unavailable=()):
    calls = []

    def factory(cand):
        if cand in unavailable:
            raise EngineMismatchError(f"no graphs built for {cand.label}")
        return FakeRunner(cand.backend)

    def measurer(runner, latent_shape, text_shape, rows, steps, repeats, known=None):
        calls.append(runner.name)
        return costs[runner.name]

    auto = AutoRunner(
        [TORCH, ORT], factory, latent, (16, 32), lambda: {"unet_sha256": weights}, cache_dir=tmp_path, measurer=measurer
    ).activate()
    return auto, calls


COSTS = {
    "torch": linear(0.02, 0.010, 0.002),
    "onnxruntime": CostTable(0.01, {1: 0.005, 2: 0.011, 4: 0.024, 8: 0.05, 15: 0.1}),
}


def test_auto_runner_measures_once_then_reads_the_cache(tmp_path):
    paper = parse_schedule("paper", 50)
    auto, calls = make_auto(tmp_path, COSTS)
    d = auto.plan(paper, rows=2)
    assert (d.backend, d.steps_per_call, d.cached) == ("onnxruntime", 1, False)
    assert sorted(calls) == ["onnxruntime", "torch"] and auto.name == "auto:onnxruntime/fp32"
    assert load_decision(d.key, tmp_path).label == "onnxruntime/fp32"
    # A new process (runner) with the same key reads the decision and measures nothing.
    again, calls2 = make_auto(tmp_path, COSTS)
    d2 = again.plan(paper, rows=2)
    assert d2.cached and d2.label == d.label and calls2 == []
    # decode follows the decision: a 15-step segment is 15 single-step calls of the chosen runner.
    feats = again.encode(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 16, 32))
    out = again.decode(feats, torch.arange(15.0), torch.zeros(2, 16, 32))
    assert out.shape == (30, 4, 8, 8) and again.launches == {"encoder": 1, "decoder": 15}
    assert torch.equal(out[::2, 0, 0, 0], torch.arange(15.0))  # step-major, each step its own timestep


@pytest.mark.parametrize("change", ["schedule", "rows", "shape", "weights"])
def test_the_cache_key_changes_with_schedule_rows_shape_and_weights(tmp_path, change):
    paper = parse_schedule("paper", 50)
    auto, _ = make_auto(tmp_path, COSTS)
    base = auto.plan(paper, rows=2)
    kwargs = {"weights": "w1"} if change == "weights" else {"latent": (4, 16, 16)} if change == "shape" else {}
    other, calls = make_auto(tmp_path, COSTS, **kwargs)
    d = other.plan(
        parse_schedule("uniform:5", 50) if change == "schedule" else paper, rows=4 if change == "rows" else 2
    )
    assert d.key != base.key and not d.cached and calls  # measured again


def test_unavailable_candidates_are_skipped_with_the_reason(tmp_path):
    auto, calls = make_auto(tmp_path, COSTS, unavailable=(ORT,))
    d = auto.plan(parse_schedule("paper", 50), rows=2)
    assert d.backend == "torch" and calls == ["torch"]
    assert "onnxruntime/fp32 not measured (no graphs built for onnxruntime/fp32)" in d.summary()


def test_tuning_keeps_at_most_the_best_so_far_and_the_one_being_measured_loaded(tmp_path):
    # Three large candidates must not all sit in memory at once (sd15-arch: 24 GB and an OOM kill).
    bf16 = Candidate("torch", "bf16", exact=False)
    loaded, peak, measured = set(), [0], []

    class Tracked(FakeRunner):
        def _activate(self):
            loaded.add(self.name)
            peak[0] = max(peak[0], len(loaded))

        def _deactivate(self):
            loaded.discard(self.name)

    def factory(cand):
        r = Tracked(cand.label)
        return r

    costs = {
        "torch/fp32": linear(0.05, 0.02, 0.01),
        "onnxruntime/fp32": COSTS["onnxruntime"],
        "torch/bf16": linear(0.04, 0.02, 0.01),
    }

    def measurer(runner, latent_shape, text_shape, rows, steps, repeats, known=None):
        measured.append(runner.name)
        return costs[runner.name]

    auto = AutoRunner(
        [TORCH, ORT, bf16],
        factory,
        (4, 8, 8),
        (16, 32),
        lambda: {"unet_sha256": "w"},
        cache_dir=tmp_path,
        measurer=measurer,
    ).activate()
    d = auto.plan(parse_schedule("paper", 50), rows=2)
    assert measured == ["torch/fp32", "onnxruntime/fp32", "torch/bf16"]
    assert d.label == "onnxruntime/fp32" and loaded == {"onnxruntime/fp32"} and peak[0] == 2


@pytest.mark.parametrize("budget, rounds", [(None, 3), (1e9, 3), (0.0, 1)])
def test_measure_stops_after_a_round_that_took_the_budget(budget, rounds):
    from fd_trt.backends.auto import measure

    r = FakeRunner("torch").activate()
    costs = measure(r, (4, 8, 8), (16, 32), rows=2, steps=[1, 2], repeats=3, round_budget_s=budget)
    # encoder: the features call, the untimed call, then one per round; decoder: 2 shapes likewise.
    assert r.launches == {"encoder": 2 + rounds, "decoder": 2 * (1 + rounds)}
    assert sorted(costs.decoder_s) == [1, 2] and costs.encoder_s >= 0


@pytest.mark.slow
def test_auto_is_the_default_and_matches_the_torch_backend(tiny_sd, latents):
    auto = FasterDiffusionPipeline.from_diffusers(tiny_sd, device="cpu", progress=False)
    assert auto.backend == "auto"
    ref = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="torch", device="cpu", progress=False)
    for schedule in ("paper", "all"):
        a = auto("a red circle", latents=latents, output_type="latent", schedule=schedule, num_inference_steps=20)
        r = ref("a red circle", latents=latents, output_type="latent", schedule=schedule, num_inference_steps=20)
        assert a.stats.backend.startswith("auto:") and r.stats.backend == "torch"
        assert rel_l2(a.latents, r.latents) < 1e-4
    # A second pipeline (a later run) reads the decision from the cache.
    again = FasterDiffusionPipeline.from_diffusers(tiny_sd, device="cpu", progress=False)
    again("a red circle", latents=latents, output_type="latent", schedule="paper", num_inference_steps=20)
    assert again.runner.last_decision.cached


def test_an_explicit_backend_wins(tiny_sd, latents):
    pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="torch", device="cpu", progress=False)
    out = pipe("a red circle", latents=latents, output_type="latent", num_inference_steps=4)
    assert pipe.backend == "torch" and out.stats.backend == "torch" and not hasattr(pipe.runner, "last_decision")


def test_calls_outside_the_sampler_use_a_decision_for_single_steps(tmp_path):
    auto, calls = make_auto(tmp_path, COSTS)  # calibration probes encode/decode without a plan
    feats = auto.encode(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 16, 32))
    assert auto.decode(feats, torch.ones(3), torch.zeros(2, 16, 32)).shape == (6, 4, 8, 8)
    assert auto.decision.key["num_steps"] == 1 and sorted(calls) == ["onnxruntime", "torch"]


@pytest.mark.slow
def test_build_tune_measures_ahead_of_time_and_generate_reuses_it(tiny_sd, tmp_path, monkeypatch, capsys):
    from fd_trt.cli import main

    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_sd.save_pretrained(folder, safe_serialization=True)
    assert main(["build", "--model", str(folder), "--tune", "--quiet", "--steps", "10", "--schedule", "paper"]) == 0
    out = capsys.readouterr().out
    assert "auto chose" in out and "onnxruntime/fp32 not measured" not in out  # graphs built, then measured
    assert list((tmp_path / "cache" / "tuning").glob("*.json"))
    assert (
        main(
            [
                "generate",
                "x",
                "--model",
                str(folder),
                "--steps",
                "10",
                "--schedule",
                "paper",
                "--quiet",
                "--out",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )
    assert "(cached decision)" in capsys.readouterr().out
