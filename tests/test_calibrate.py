"""Calibrated key steps: the search, resumed runs, saving, loading and the checks on use."""

import itertools
import json

import pytest
import torch

from fd_trt.cli import main
from fd_trt.core.calibration import Calibration, calibration_file
from fd_trt.errors import InputError, ScheduleError
from fd_trt.families.models import tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.tools.calibrate import Evaluator, calibrate, greedy_search, segment_dp, swap_refine

from conftest import rel_l2

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return FasterDiffusionPipeline.from_diffusers(tiny_sd_pipeline(seed=0), backend="torch", progress=False)


def test_search_finds_a_known_best_schedule():
    # An error with a known minimum: the distance of the key steps to a target set. Greedy plus
    # swaps must find the target; the DP must find the segments that a block-shaped cost makes best.
    target = [0, 4, 9, 13, 17]

    def error(keys):
        return sum(min(abs(k - t) for k in keys) for t in target) + 0.01 * len(keys)

    keys, err = greedy_search(error, 20, 5)
    keys, err = swap_refine(error, 20, keys, err)
    assert keys == target and err == pytest.approx(0.05)
    # Cost of reusing step i's features at step j: zero inside the blocks [0,3) [3,8) [8,12), large across.
    blocks = [range(0, 3), range(3, 8), range(8, 12)]
    block_of = {j: b for b, r in enumerate(blocks) for j in r}
    cost = torch.tensor(
        [[0.0 if j < i else (0.0 if block_of[i] == block_of[j] else 1.0 + j - i) for j in range(12)] for i in range(12)]
    )
    assert segment_dp(cost, 3) == [0, 3, 8]

    # The DP is exact: brute force over every 3-key schedule agrees.
    def total(keys):
        b = list(keys) + [12]
        return sum(float(cost[a, a:c].sum()) for a, c in zip(b[:-1], b[1:]))

    best = min((k for k in itertools.combinations(range(12), 3) if k[0] == 0), key=total)
    assert total(segment_dp(cost, 3)) == pytest.approx(total(best))


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "ddpm"])
def test_resumed_runs_equal_full_runs(pipe, scheduler):
    # Candidates resume from the recorded run of the current schedule where they diverge from it;
    # the result must be the same as a run from step 0 (solver state and RNG state included).
    # Equal to float rounding, not bit for bit: a resumed run may decode the rest of a segment in a
    # shorter call, and the torch decoder adds the shared skip half of its convolutions only when a
    # call has more than one step (a wrong solver or RNG state would move the errors by far more).
    ev = Evaluator(pipe, scheduler, 20, PROMPTS, [0, 1])
    cands = [[0, 3, 7], [0, 3, 9], [0, 2, 7], [0, 3, 7, 12], [0, 1, 3, 7], [0, 7]]
    full = [ev.error(c) for c in cands]
    ev.set_base([0, 3, 7])
    steps_before = ev.steps_run
    resumed = [ev.error(c) for c in cands]
    assert resumed == pytest.approx(full, rel=1e-5)
    assert ev.steps_run - steps_before < 0.75 * 20 * len(cands)  # the shared prefixes were skipped
    assert len(set(full)) == len(full)


def test_calibrate_returns_sorted_unique_steps_from_zero_and_beats_uniform(pipe):
    cal = calibrate(pipe, scheduler="ddim", steps=12, key_steps=4, prompts=PROMPTS, method="greedy")
    assert len(cal.key_steps) == 4 and cal.key_steps[0] == 0
    assert cal.key_steps == sorted(set(cal.key_steps))
    ev = Evaluator(pipe, "ddim", 12, PROMPTS, [0, 1])
    assert cal.error == pytest.approx(ev.error(cal.key_steps), rel=1e-6)
    assert cal.error <= ev.error([0, 3, 6, 9]) and cal.error <= ev.error([0, 1, 2, 3])
    assert cal.model_sha256 == pipe.unet_sha256 and cal.estimated_speedup > 1
    dp = calibrate(pipe, scheduler="ddim", steps=12, key_steps=4, prompts=PROMPTS, method="dp")
    assert len(dp.key_steps) == 4 and dp.key_steps[0] == 0 and dp.evaluations < cal.evaluations
    with pytest.raises(InputError, match="exactly one budget"):
        calibrate(pipe, scheduler="ddim", steps=12, prompts=PROMPTS)
    with pytest.raises(InputError, match="key_steps must be an integer in \\[1, 12\\]"):
        calibrate(pipe, scheduler="ddim", steps=12, key_steps=13, prompts=PROMPTS)


def test_saved_calibration_is_used_and_checked(pipe, tmp_path):
    cal = Calibration(
        key_steps=[0, 2, 5, 9],
        scheduler="ddim",
        steps=12,
        model_sha256=pipe.unet_sha256,
        error=0.1,
        method="greedy",
        prompts=PROMPTS,
        seeds=[0, 1],
    )
    path = cal.save(tmp_path / "cal.json")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=12, latents=latents, output_type="latent")
    by_path = pipe("a red circle", schedule=str(path), **kw)
    by_list = pipe("a red circle", schedule=[0, 2, 5, 9], **kw)
    assert by_path.stats.key_steps == [0, 2, 5, 9] and rel_l2(by_path.latents, by_list.latents) == 0
    assert pipe("a red circle", schedule=Calibration.load(path), **kw).stats.key_steps == [0, 2, 5, 9]
    # Wrong step count, scheduler or weights: a clear error naming the fix.
    with pytest.raises(ScheduleError, match="12 steps, but the run has 10.*fd-trt calibrate"):
        pipe("a red circle", schedule=str(path), num_inference_steps=10, output_type="latent")
    other = Calibration(**{**json.loads(cal.to_json()), "model_sha256": "0" * 64})
    with pytest.raises(ScheduleError, match="UNet weights 000000000000"):
        pipe("a red circle", schedule=other, **kw)
    with pytest.raises(ScheduleError, match="scheduler dpmpp, but the run uses ddim"):
        pipe("a red circle", schedule=Calibration(**{**json.loads(cal.to_json()), "scheduler": "dpmpp"}), **kw)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        pipe("a red circle", schedule=str(bad), **kw)
    # "calibrated": none saved is a clear error; the default falls back to paper.
    with pytest.raises(ScheduleError, match="no calibration for ddim-12.*fd-trt calibrate"):
        pipe("a red circle", schedule="calibrated", **kw)
    assert pipe("a red circle", **kw).stats.key_steps == [0, 1, 2, 3, 5, 10]
    # Saved with the model folder, it becomes "calibrated" and the default for ddim-12 only.
    model_dir = tmp_path / "model"
    cal.save(calibration_file(model_dir, "ddim", 12))
    pipe.model_dir = model_dir
    try:
        assert pipe("a red circle", schedule="calibrated", **kw).stats.key_steps == [0, 2, 5, 9]
        assert pipe("a red circle", **kw).stats.key_steps == [0, 2, 5, 9]
        assert pipe("a red circle", num_inference_steps=10, output_type="latent").stats.key_steps == [0, 1, 2, 3, 5]
    finally:
        pipe.model_dir = None


def test_cli_calibrate_writes_json_and_saves(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cal.json"
    engines = tmp_path / "eng"
    engines.mkdir()
    rc = main(
        [
            "calibrate",
            "--backend",
            "torch",
            "--steps",
            "8",
            "--key-steps",
            "3",
            "--method",
            "dp",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "fig3.png"),
            "--quiet",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["steps"] == 8 and len(data["key_steps"]) == 3 and data["key_steps"][0] == 0
    assert {"scheduler", "model_sha256", "error", "method", "prompts", "seconds"} <= set(data)
    assert f"key steps: {','.join(map(str, data['key_steps']))}" in text and "estimated UNet speedup" in text
    assert "mean relative change per step: encoder" in text and (tmp_path / "fig3.png").stat().st_size > 10_000
    assert main(["calibrate", "--backend", "torch", "--steps", "8", "--key-steps", "0", "--quiet"]) == 2
    assert "key_steps must be an integer in [1, 8]" in capsys.readouterr().err


def test_speedup_estimate_is_the_cost_model_by_hand(pipe):
    from fd_trt.tools.calibrate import estimate_speedup

    costs = {"encoder": 1.0, "decoder_1": 1.0, "decoder_per_step_batched": 0.5}
    # all: 10 x (1 + 1) = 20; [0, 5]: two segments of 5 steps, each 1 + 1 + 4 x 0.5 = 4.
    assert estimate_speedup(costs, [0, 5], 10) == pytest.approx(20 / 8)
    assert estimate_speedup(costs, list(range(10)), 10) == pytest.approx(1.0)
    with pytest.raises(InputError, match="speedup must be a number above 1"):
        calibrate(pipe, scheduler="ddim", steps=8, speedup=0.5, prompts=PROMPTS)


@pytest.fixture(scope="module")
def tiny_model_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    pipe.sd.save_pretrained(folder, safe_serialization=True)  # the fixture's tiny model, as a model folder
    return folder


def _speedup_by_hand(costs, k, t):
    # K segments: K encoder calls and K decoder calls; the T - K other steps ride in batched decoder calls.
    return (
        t
        * (costs["encoder"] + costs["decoder_1"])
        / (k * (costs["encoder"] + costs["decoder_1"]) + (t - k) * costs["decoder_per_step_batched"])
    )


def test_cli_speedup_picks_the_largest_k_that_reaches_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import fd_trt.tools.calibrate as calmod

    t = 6
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = [
        "--model",
        str(tiny_model_dir),
        "--backend",
        "torch",
        "--threads",
        "1",
        "--steps",
        str(t),
        "--method",
        "dp",
        "--prompts",
        str(prompts),
        "--quiet",
    ]

    # 1. The costs measured on the backend (written to the JSON): the chosen K reaches the target,
    # K + 1 does not.
    out = tmp_path / "measured.json"
    assert main(["calibrate", *common, "--speedup", "1.2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    k, costs = len(data["key_steps"]), data["costs"]
    assert data["key_steps"][0] == 0 and data["key_steps"] == sorted(set(data["key_steps"]))
    assert data["estimated_speedup"] == pytest.approx(_speedup_by_hand(costs, k, t), rel=1e-9)
    assert data["estimated_speedup"] >= 1.2
    assert k == t or _speedup_by_hand(costs, k + 1, t) < 1.2
    assert f"estimated UNet speedup over all: {data['estimated_speedup']:.2f}x" in capsys.readouterr().out

    # 2. A hand-made cost model, so that the answer is known: encoder 1, decoder 1 per call, 0.25 per
    # extra batched step. T = 6: 12 / (1.75 K + 1.5), so K = 1..5 give 3.69, 2.40, 1.78, 1.41, 1.17.
    hand = {"encoder": 1.0, "decoder_1": 1.0, "decoder_per_step_batched": 0.25}
    monkeypatch.setattr(calmod, "measure_costs", lambda ev, repeats=3: dict(hand))
    for target, want in ((1.7, 3), (1.4, 4)):
        out = tmp_path / f"hand-{target}.json"
        assert main(["calibrate", *common, "--speedup", str(target), "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        assert len(data["key_steps"]) == want and data["costs"] == hand
        assert data["estimated_speedup"] == pytest.approx(_speedup_by_hand(hand, want, t))
        assert data["estimated_speedup"] >= target
        assert _speedup_by_hand(hand, want + 1, t) < target
    capsys.readouterr()
    # Out of reach even with one key step (3.69x): a clear error, not a silent K = 1.
    assert main(["calibrate", *common, "--speedup", "4"]) == 2
    assert "speedup 4.0x is out of reach" in capsys.readouterr().err


def test_calibrate_runs_sdxl_with_its_added_conditioning():
    """``fd-trt calibrate`` on SDXL: the evaluator passes the pooled embeddings and time ids, so its
    ``all`` reference is diffusers' StableDiffusionXLPipeline, and the saved key steps run through
    the pipeline with the error the search measured."""
    from fd_trt.families.models import make_scheduler, tiny_sdxl_pipeline
    from fd_trt.tools.calibrate import feature_changes

    xl = tiny_sdxl_pipeline(seed=0)
    xl.scheduler = make_scheduler("ddim", xl.scheduler.config)
    xl_pipe = FasterDiffusionPipeline.from_diffusers(xl, backend="torch", device="cpu", progress=False)
    ev = Evaluator(xl_pipe, "ddim", 12, PROMPTS, [0, 1])
    assert set(ev.added) == {"text_embeds", "time_ids"} and ev.added["time_ids"].shape == (4, 6)
    ref = xl(PROMPTS, latents=ev.latents, num_inference_steps=12, guidance_scale=7.5, output_type="latent").images
    assert rel_l2(ev.reference, ref) < 1e-5
    cal = calibrate(xl_pipe, scheduler="ddim", steps=12, key_steps=4, prompts=PROMPTS, method="greedy")
    assert cal.key_steps[0] == 0 and len(cal.key_steps) == 4 and 0 < cal.error < 1
    out = xl_pipe(
        PROMPTS, latents=ev.latents, num_inference_steps=12, guidance_scale=7.5, schedule=cal, output_type="latent"
    )
    assert out.stats.key_steps == cal.key_steps
    assert rel_l2(out.latents, ref) == pytest.approx(cal.error, rel=1e-4)
    fc = feature_changes(xl_pipe, "ddim", 12, PROMPTS[:1], [0])
    assert len(fc["enc_rel"]) == 11 and all(v > 0 for v in fc["enc_rel"])
    # At another size (fd-trt calibrate --height/--width): SDXL's time ids carry it, as diffusers'
    # pipeline builds them (original size, crop (0, 0), target size), and the latents follow it.
    f = xl_pipe.vae_scale_factor
    h, w = 2 * int(xl.unet.config.sample_size) * f, int(xl.unet.config.sample_size) * f
    ev2 = Evaluator(xl_pipe, "ddim", 12, PROMPTS, [0, 1], height=h, width=w)
    assert ev2.added["time_ids"][0].tolist() == [h, w, 0, 0, h, w]
    assert ev2.latents.shape[-2:] == (h // f, w // f)
    ref2 = xl(PROMPTS, latents=ev2.latents, num_inference_steps=12, guidance_scale=7.5, height=h, width=w,
              output_type="latent").images  # fmt: skip
    assert rel_l2(ev2.reference, ref2) < 1e-5
    fc2 = feature_changes(xl_pipe, "ddim", 12, PROMPTS[:1], [0], height=h, width=w)
    assert len(fc2["enc_rel"]) == 11 and fc2["enc_fnorm"] != fc["enc_fnorm"]
