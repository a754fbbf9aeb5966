"""``fd-trt calibrate`` on diffusion transformers: N and the key steps as calibrate_transformer finds
them, --split auto | N and its refusals, the block-change plot (against diffusers' own pipeline)."""

import json

import pytest
import torch

from fd_trt import FasterDiffusionPipeline
from fd_trt.cli import main
from fd_trt.families.dit_models import tiny_dit_pipeline, tiny_pixart_pipeline

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pixart"
    tiny_pixart_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "dit"
    tiny_dit_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def _lines(tmp_path, *lines):
    path = tmp_path / "conds.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_searches_split_and_key_steps_as_calibrate_transformer(pixart_dir, tmp_path, capsys):
    from fd_trt.tools.calibrate_dit import calibrate_transformer

    out, png = tmp_path / "cal.json", tmp_path / "blocks.png"
    rc = main(
        ["calibrate", "--model", str(pixart_dir), "--steps", "6", "--prompts", _lines(tmp_path, PROMPT),
         "--out", str(out), "--plot", str(png), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())

    fd = FasterDiffusionPipeline.from_pretrained(pixart_dir, backend="torch", progress=False)
    ref = calibrate_transformer(fd, [PROMPT], steps=6)
    assert ref.split in (1, 2, 3) and len({h["split"] for h in ref.history}) == 3  # N was searched
    assert data["split"] == ref.split and data["key_steps"] == ref.key_steps
    assert data["error"] == pytest.approx(ref.error, abs=1e-6)
    assert data["scheduler"] == ref.scheduler == "dpmpp" and data["steps"] == 6
    assert f"split: {ref.split} (the encoder runs blocks 0..{ref.split - 1} of 4)" in text
    assert f"key steps: {','.join(map(str, ref.key_steps))} (K={len(ref.key_steps)})" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert "mean relative change per block:" in text


def test_cli_fixed_split_on_dit_with_save(dit_dir, tmp_path, capsys):
    from fd_trt.core.calibration import Calibration
    from fd_trt.tools.calibrate_dit import calibrate_transformer

    rc = main(
        ["calibrate", "--model", str(dit_dir), "--steps", "6", "--split", "2", "--max-error", "0.2",
         "--prompts", _lines(tmp_path, "3"), "--save", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    saved = dit_dir / "calibrations" / "ddim-6.json"
    assert f"saved {saved}" in capsys.readouterr().out
    cal = Calibration.load(saved)
    fd = FasterDiffusionPipeline.from_pretrained(dit_dir, backend="torch", progress=False)
    ref = calibrate_transformer(fd, [3], steps=6, splits=[2], tolerance=0.2)
    assert cal.split == ref.split == 2 and {h["split"] for h in cal.history} == {2}
    assert cal.key_steps == ref.key_steps and cal.error == pytest.approx(ref.error, abs=1e-6)
    assert cal.prompts == ["3"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split", "0"], "--split 0 is out of range: this transformer has 4 blocks"),
        (["--split", "4"], "--split 4 is out of range: this transformer has 4 blocks, so N"),
        (["--split", "half"], "--split 'half' is not a split point: give 'auto' or an integer N in 1..3"),
        (["--key-steps", "3"], "--key-steps is for UNet models"),
        (["--scheduler", "flow-euler"], "scheduler 'flow-euler' is a flow-matching scheduler"),
    ],
)
def test_cli_refuses_bad_transformer_options(pixart_dir, capsys, args, message):
    assert main(["calibrate", "--model", str(pixart_dir), "--steps", "6", *args, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_split_for_a_unet_model(capsys):
    assert main(["calibrate", "--backend", "torch", "--steps", "6", "--key-steps", "3", "--split", "2"]) == 2
    err = capsys.readouterr().err
    assert "--split 2: the split point N is a diffusion transformer's" in err and "drop --split" in err


def test_block_changes_equal_a_diffusers_loop():
    """The per-block change of an ``all`` run equals the one read from diffusers' PixArtAlphaPipeline
    itself (its blocks hooked), step by step."""
    from fd_trt.tools.calibrate_dit import block_changes, suggest_split

    pipe = tiny_pixart_pipeline(seed=3)
    steps = 5
    seen: list[list[torch.Tensor]] = [[] for _ in pipe.transformer.transformer_blocks]
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.detach().clone()))
        for k, b in enumerate(pipe.transformer.transformer_blocks)
    ]
    try:
        pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=4.5, generator=torch.Generator().manual_seed(7),
            output_type="latent", max_sequence_length=16, use_resolution_binning=False, clean_caption=False,
        )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    want = []
    for outs in seen:
        assert len(outs) == steps
        rel = [((b - a).norm() / a.norm()).item() for a, b in zip(outs, outs[1:])]
        want.append(sum(rel) / len(rel))
    fd = FasterDiffusionPipeline.from_diffusers(pipe, backend="torch", progress=False)
    got = block_changes(fd, PROMPT, steps=steps, seed=7, guidance_scale=4.5, max_sequence_length=16)
    assert got == pytest.approx(want, rel=1e-4)
    assert 1 <= suggest_split(got) <= len(got) - 1
    assert suggest_split([0.1, 0.2, 0.9, 1.0]) == 2 and suggest_split([1.0, 1.0, 1.0]) == 1


def test_flow_schedulers_by_name():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    from fd_trt.errors import InputError
    from fd_trt.families.models import make_scheduler, scheduler_name

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    heun = make_scheduler("flow-heun", flow.config)
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler) and heun.config.shift == 3.0
    assert scheduler_name(heun) == "flow-heun" and scheduler_name(flow) == "flow-euler"
    with pytest.raises(InputError, match="'ddim' needs a model trained with betas.*flow-euler, flow-heun"):
        make_scheduler("ddim", flow.config)
    with pytest.raises(InputError, match="'flow-euler' is a flow-matching scheduler.*ddim"):
        make_scheduler("flow-euler", DDIMScheduler().config)


def test_generate_names_the_flow_schedulers_for_sd3(tmp_path, capsys):
    from fd_trt.families.dit_models import tiny_sd3_pipeline

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    common = ["generate", "a red circle", "--model", str(folder), "--backend", "torch", "--steps", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 2  # the default, ddim, is a betas scheduler
    assert "choose one of flow-euler, flow-heun" in capsys.readouterr().err
    assert main([*common, "--scheduler", "flow-heun", "--out", str(tmp_path / "b.png")]) == 0
    assert "scheduler flow-heun" in capsys.readouterr().out and (tmp_path / "b.png").is_file()


def test_schedule_calibrated_runs_the_saved_transformer_calibration(tmp_path, capsys):
    from fd_trt.core.calibration import Calibration
    from fd_trt.errors import InputError, ScheduleError

    folder = tmp_path / "pixart"
    tiny_pixart_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    rc = main(
        ["calibrate", "--model", str(folder), "--steps", "6", "--split", "2", "--max-error", "0.2",
         "--prompts", _lines(tmp_path, PROMPT), "--save", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    saved = folder / "calibrations" / "dpmpp-6.json"
    assert f"saved {saved} (schedule='calibrated')" in capsys.readouterr().out
    cal = Calibration.load(saved)
    fd = FasterDiffusionPipeline.from_pretrained(folder, backend="torch", progress=False)
    kw = dict(num_inference_steps=6, output_type="latent", max_sequence_length=16)

    def run(**args):
        return fd(PROMPT, generator=torch.Generator().manual_seed(5), **kw, **args)

    got = run(schedule="calibrated")
    assert got.stats.key_steps == cal.key_steps
    for want in (run(schedule=cal), run(schedule=list(cal.key_steps), split=cal.split)):
        assert want.stats.key_steps == cal.key_steps
        assert (got.latents - want.latents).abs().max().item() == 0
    # Its N is the calibration's: contradicting it is refused.
    with pytest.raises(InputError, match="split=3 but the calibration is for N=2"):
        run(schedule="calibrated", split=3)

    # The engine directory is looked in first.
    engines = tmp_path / "engines"
    mine = Calibration(**{**cal.__dict__, "key_steps": [0, 3]})
    mine.save(engines / "calibrations" / "dpmpp-6.json")
    first = FasterDiffusionPipeline.from_pretrained(folder, backend="torch", engines=engines, progress=False)
    out = first(PROMPT, generator=torch.Generator().manual_seed(5), schedule="calibrated", **kw)
    assert out.stats.key_steps == [0, 3]
    assert (out.latents - run(schedule=[0, 3], split=2).latents).abs().max().item() == 0

    # None saved for 8 steps: the error names the files looked for and the command that saves one.
    with pytest.raises(ScheduleError) as err:
        first(PROMPT, schedule="calibrated", num_inference_steps=8, output_type="latent", max_sequence_length=16)
    message = str(err.value)
    assert str(engines / "calibrations" / "dpmpp-8.json") in message
    assert str(folder / "calibrations" / "dpmpp-8.json") in message
    assert f"fd-trt calibrate --model {folder} --steps 8 --engines {engines} --save" in message
    # A wrapped pipeline without engines= has no folder to look in: said so, with the way out.
    wrapped = FasterDiffusionPipeline.from_diffusers(fd.sd, backend="torch", progress=False)
    with pytest.raises(ScheduleError, match=r"needs a folder to find calibrations/dpmpp-6\.json in.*from_pretrained"):
        wrapped(PROMPT, schedule="calibrated", **kw)
