"""``fd-trt serve`` and ``python -m fd_trt.serve_ray`` take the same serving options (parsing only: no Ray)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from fd_trt.cli import build_parser
from fd_trt.errors import InputError
from fd_trt.serving import ray as serve_ray
from fd_trt.serving.options import runtime_kwargs
from fd_trt.serving.runtime import DEFAULT_DECODER_MEMORY_MB, Limits

RAY_ONLY = {"--address", "--replicas", "--num-cpus", "--num-gpus"}


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def options(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """Each option's long flag -> what argparse does with it (help text aside)."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        out[max(a.option_strings, key=len)] = {
            "option_strings": sorted(a.option_strings),
            "action": type(a).__name__,
            "dest": a.dest,
            "default": a.default,
            "type": a.type,
            "choices": None if a.choices is None else list(a.choices),
            "nargs": a.nargs,
            "const": a.const,
            "required": a.required,
        }
    return out


def test_serve_ray_takes_every_option_of_fd_trt_serve_with_the_same_default():
    serve, ray = options(serve_parser()), options(serve_ray.build_parser())
    assert set(ray) - set(serve) == RAY_ONLY
    for flag, spec in serve.items():
        assert ray.get(flag) == spec, flag
    # the options that had drifted apart
    assert "auto" in ray["--backend"]["choices"]
    for flag in (
        "--timeout",
        "--precision",
        "--device",
        "--max-steps",
        "--max-size",
        "--max-prompt-chars",
        "--log-level",
    ):
        assert flag in ray, flag
    assert ray["--decoder-memory-mb"]["default"] == DEFAULT_DECODER_MEMORY_MB


def test_serve_ray_parses_to_the_runtime_arguments():
    argv = ["--backend", "auto", "--precision", "fp32", "--timeout", "5", "--device", "cpu"]
    kwargs = serve_ray.app_kwargs(serve_ray.build_parser().parse_args(argv))
    assert kwargs == {
        "model": "default",
        "backend": "auto",
        "device": "cpu",
        "precision": "fp32",
        "engines": None,
        "runner_options": {},
        "max_batch": 8,
        "max_wait_ms": 10.0,
        "max_queue": 64,
        "default_timeout_s": 5.0,
        "limits": Limits(max_steps=200, max_size=1024, max_prompt_chars=1000),
        "sizes": None,
        "decoder_memory_mb": DEFAULT_DECODER_MEMORY_MB,
        "threads": None,
        "max_body_bytes": 64 * 1024,
    }
    # fd-trt serve reads the same flags into the same runtime arguments
    assert runtime_kwargs(serve_parser().parse_args(argv)) == {
        k: v for k, v in kwargs.items() if k not in ("threads", "max_body_bytes")
    }


def test_serve_ray_options_convert_as_in_fd_trt_serve():
    parse = serve_ray.build_parser().parse_args
    kw = serve_ray.app_kwargs(
        parse(
            [
                "--threads",
                "2",
                "--sizes",
                "64x64,128x96",
                "--decoder-memory-mb",
                "0",
                "--max-steps",
                "20",
                "--max-body-kb",
                "8",
            ]
        )
    )
    assert kw["threads"] == 2 and kw["runner_options"] == {"intra_op_threads": 2}  # auto passes it on
    assert kw["sizes"] == [(64, 64), (128, 96)] and kw["decoder_memory_mb"] is None
    assert kw["limits"].max_steps == 20 and kw["max_body_bytes"] == 8 * 1024
    assert serve_ray.app_kwargs(parse(["--threads", "2", "--backend", "torch"]))["runner_options"] == {}
    with pytest.raises(InputError, match="HEIGHTxWIDTH"):
        serve_ray.app_kwargs(parse(["--sizes", "big"]))


@pytest.mark.parametrize("argv, message", [(["--sizes", "big"], "HEIGHTxWIDTH"), (["--log-level", "loud"], "loud")])
def test_serve_ray_reports_bad_options_before_starting_ray(argv, message, capsys):
    assert serve_ray.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
