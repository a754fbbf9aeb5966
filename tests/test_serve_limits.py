"""Serving limits (#13): hostile bodies, served sizes, no builds in the worker, decoder memory cap."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from fd_trt.errors import EngineMismatchError, InputError
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.serving.runtime import (
    DECODER_ACTIVATION_FACTOR,
    GenerateRequest,
    Limits,
    ServingRuntime,
    feature_bytes_per_row,
    parse_sizes,
)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402

STEPS = 10


def load(**kw: Any) -> FasterDiffusionPipeline:
    return FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False, **kw)


def healthz_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    """Polls /healthz until ``stop``; records each latency (inf for an error or a timeout)."""
    with httpx.Client(timeout=5) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = c.get(url + "/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(time.perf_counter() - t0 if ok else float("inf"))
            time.sleep(0.02)


def probe(url: str, content: bytes) -> tuple[httpx.Response, float, list[float]]:
    """POSTs ``content`` while /healthz is polled; returns the answer, its time and the healthz latencies."""
    stop, lat = threading.Event(), []
    poller = threading.Thread(target=healthz_latencies, args=(url, stop, lat))
    poller.start()
    try:
        time.sleep(0.1)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/generate", content=content, headers={"content-type": "application/json"}, timeout=60)
        took = time.perf_counter() - t0
        time.sleep(0.2)
    finally:
        stop.set()
        poller.join(10)
    return r, took, lat


ZEROS = b'{"prompt": "a red circle", "steps": 10, "schedule": [' + b",".join([b"0"] * 200_000) + b"]}"


@pytest.fixture
def rt() -> ServingRuntime:
    # One per test: the app's lifespan shuts its runtime down when its server stops.
    r = ServingRuntime(load(), max_batch=8, max_wait_ms=20, warmup=False, limits=Limits(max_steps=100, max_size=256))
    yield r
    r.shutdown()


def test_200k_zero_schedule_gets_413_fast_and_healthz_keeps_answering(rt, capsys):
    # Regression: this body timed out after 60 s and froze /healthz (O(n^2) check on the event loop).
    with ThreadedServer(create_app(runtime=rt)) as s:
        r, took, lat = probe(s.url, ZEROS)
    assert r.status_code == 413, r.text
    assert "limit is 65536 bytes" in r.json()["detail"] and "--max-body-kb" in r.json()["detail"]
    assert took < 2.0
    assert lat and max(lat) < 1.0, lat
    with capsys.disabled():
        print(
            f"\n200k-zero schedule, 64 KiB limit: {r.status_code} in {took:.3f} s; healthz max {max(lat) * 1000:.1f} ms "
            f"over {len(lat)} polls"
        )


def test_200k_zero_schedule_under_a_large_body_limit_gets_422_fast(rt, capsys):
    # With the byte limit out of the way, the schedule-length bound must still refuse it at once.
    with ThreadedServer(create_app(runtime=rt, max_body_bytes=8 * 2**20)) as s:
        r, took, lat = probe(s.url, ZEROS)
    assert r.status_code == 422, r.text
    assert "schedule has 200000 key steps but the request has 10 steps" in r.text
    assert took < 3.0
    assert lat and max(lat) < 1.0, lat
    with capsys.disabled():
        print(
            f"\n200k-zero schedule, 8 MiB limit: {r.status_code} in {took:.3f} s; healthz max {max(lat) * 1000:.1f} ms"
        )


def test_chunked_body_over_the_limit_is_cut_off(rt):
    def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 4096

    with ThreadedServer(create_app(runtime=rt)) as s:
        r = httpx.post(
            s.url + "/v1/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=30
        )
    assert r.status_code == 413 and "limit is 65536 bytes" in r.text


def test_parse_sizes():
    assert parse_sizes("64x64, 128x96,64x64") == [(64, 64), (128, 96)]
    assert parse_sizes([(64, 64), "32x32"]) == [(64, 64), (32, 32)]
    for bad in ("64", "64x", "ax64", "", [(64, 64.0)]):
        with pytest.raises(InputError, match="size"):
            parse_sizes(bad)


def test_torch_sizes_restrict_requests_at_submit(rt):
    r = ServingRuntime(load(), warmup=False, sizes="64x64,32x32", limits=Limits(max_size=256))
    try:
        with pytest.raises(
            InputError, match=r"size 48x64 \(height x width\) is not served here; sizes served: 64x64, 32x32"
        ):
            r.submit(GenerateRequest(prompt="a red circle", height=48, width=64, steps=STEPS))
        assert (
            r.submit(GenerateRequest(prompt="a red circle", height=32, width=32, steps=STEPS, seed=1)).result(60).seed
            == 1
        )
    finally:
        r.shutdown()
    # Without sizes the torch backend (one runner for every size) serves any size within the limits.
    assert rt.sizes is None
    rt.check(GenerateRequest(prompt="a red circle", height=48, width=64, steps=STEPS))
    with pytest.raises(InputError, match="served size 60x64"):
        ServingRuntime(load(), warmup=False, start=False, sizes="60x64")


@pytest.mark.slow
def test_graph_backend_prepares_sizes_at_start_and_never_builds_in_the_worker(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(
        tiny_sd, backend="onnxruntime", device="cpu", progress=False, max_cached_runners=1
    )
    f = pipe.vae_scale_factor
    a, b = (8 * f, 8 * f), (8 * f, 16 * f)
    rt = ServingRuntime(pipe, warmup=False, max_batch=2, sizes=[a, b], limits=Limits(max_size=16 * f, size_multiple=f))
    try:
        assert sorted(pipe.prepared_sizes()) == sorted([a, b])  # both built before serving
        assert pipe.build_on_demand is False and pipe.max_cached_runners >= 2
        built = sorted(p.name for p in (tmp_path / "cache").iterdir())
        with pytest.raises(InputError, match=f"sizes served: {a[0]}x{a[1]}, {b[0]}x{b[1]}"):
            rt.submit(GenerateRequest(prompt="x", height=16 * f, width=16 * f, steps=3))
        for h, w in (a, b, a):
            res = rt.submit(GenerateRequest(prompt="x", height=h, width=w, steps=3, seed=1)).result(120)
            assert res.image.size == (w, h)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == built  # nothing built while serving
        assert sorted(pipe.prepared_sizes()) == sorted([a, b])  # nothing evicted
    finally:
        rt.shutdown()


def test_graph_backend_default_serves_only_the_model_size(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="onnxruntime", device="cpu", progress=False)
    rt = ServingRuntime(pipe, warmup=False, start=False)
    try:
        n = rt.native_size
        assert rt.sizes == ((n, n),)
        with pytest.raises(InputError, match=f"sizes served: {n}x{n}"):
            rt.check(GenerateRequest(prompt="x", height=2 * n, width=n, steps=3))
    finally:
        rt.shutdown()


def test_engines_without_the_size_fail_at_start_up_and_other_sizes_get_422(tmp_path):
    from fd_trt.cli import main

    eng = tmp_path / "eng"
    assert main(["build", "--out", str(eng), "--quiet"]) == 0  # the default model at 64x64 only
    with pytest.raises(EngineMismatchError, match="cannot serve size 128x128"):
        ServingRuntime.from_pretrained(
            "default", backend="onnxruntime", engines=str(eng), sizes="64x64,128x128", warmup=False, start=False
        )
    rt = ServingRuntime.from_pretrained("default", backend="onnxruntime", engines=str(eng), warmup=False, max_batch=2)
    try:
        with ThreadedServer(create_app(runtime=rt)) as s:
            r = httpx.post(
                s.url + "/v1/generate",
                json={"prompt": "a red circle", "steps": 3, "height": 128, "width": 128},
                timeout=60,
            )
            assert r.status_code == 422 and "sizes served: 64x64" in r.text, r.text
            ok = httpx.post(s.url + "/v1/generate", json={"prompt": "a red circle", "steps": 3, "seed": 1}, timeout=120)
            assert ok.status_code == 200, ok.text
    finally:
        rt.shutdown()


def test_feature_bytes_match_the_encoder_output():
    pipe = load()
    f = pipe.vae_scale_factor
    for hw in ((16, 16), (12, 20), (9, 7)):
        with torch.inference_mode():
            feats = pipe.runner.encode(
                torch.zeros(1, 4, *hw), torch.tensor([500.0]), torch.zeros(1, *pipe.text_shape())
            )
        want = sum(t.numel() * t.element_size() for t in feats.tensors())
        assert feature_bytes_per_row(pipe.sd.unet.config, hw, 4) == want, hw
    rt = ServingRuntime(pipe, warmup=False, start=False, decoder_memory_mb=1)
    assert rt.decoder_row_bytes(16 * f, 16 * f) == int(DECODER_ACTIVATION_FACTOR * 110_592)
    assert rt.decoder_rows_cap(16 * f, 16 * f) == 2**20 // int(DECODER_ACTIVATION_FACTOR * 110_592)
    rt.shutdown()


def run_8_on_paper(decoder_memory_mb: float | None) -> tuple[list[int], list[Any], int | None]:
    """8 requests of 50 steps on ``paper`` through a runtime; the rows of every decoder call (spied)."""
    pipe = load()
    calls: list[int] = []
    decode = pipe.runner.decode

    def spy(features: Any, timesteps: Any, text: Any, added: Any = None) -> Any:
        calls.append(features.rows * int(timesteps.shape[0]))
        return decode(features, timesteps, text, added)

    pipe.runner.decode = spy  # type: ignore[method-assign]
    rt = ServingRuntime(pipe, warmup=False, max_batch=8, max_wait_ms=2000, decoder_memory_mb=decoder_memory_mb)
    cap = rt.decoder_rows_cap(64, 64)
    try:
        futures = [
            rt.submit(GenerateRequest(prompt="a red circle", seed=i, steps=50, schedule="paper")) for i in range(8)
        ]
        results = [f.result(300) for f in futures]
    finally:
        rt.shutdown()
    return calls, results, cap


def test_batch_of_8_on_paper_never_decodes_more_rows_than_the_cap():
    # 8 MiB at ~0.84 MiB per 64x64 row: 9 rows -> one step of 4 images (CFG: 2 rows each) per call.
    calls, results, cap = run_8_on_paper(8)
    assert cap is not None and 8 <= cap < 16
    assert calls and max(calls) <= cap, (cap, max(calls))
    assert {r.batch_size for r in results} == {4}  # the budget split 8 requests into 2 batches of 4
    # Without the budget, the same 8 requests decode paper's 15-step segment as 8*2*15 = 240 rows at once.
    calls, results, cap = run_8_on_paper(None)
    assert cap is None and max(calls) == 240 and {r.batch_size for r in results} == {8}


def test_a_size_over_the_decoder_budget_is_refused_at_submit():
    rt = ServingRuntime(load(), warmup=False, start=False, decoder_memory_mb=1, limits=Limits(max_size=512))
    try:
        with pytest.raises(InputError, match="raise --decoder-memory-mb"):
            rt.check(GenerateRequest(prompt="x", height=256, width=256, steps=STEPS))
    finally:
        rt.shutdown()
