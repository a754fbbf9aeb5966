"""The HTTP API on a real uvicorn server bound to a free loopback port."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402
from test_serve import Gate, wait_for  # noqa: E402

from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app, free_port  # noqa: E402
from fd_trt.serving.runtime import Limits, ServingRuntime  # noqa: E402

STEPS = 10


Server = ThreadedServer


def load() -> FasterDiffusionPipeline:
    return FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    rt = ServingRuntime(
        load(),
        max_batch=4,
        max_wait_ms=20,
        warmup=False,
        limits=Limits(max_steps=100, max_size=256, max_prompt_chars=200),
    )
    with Server(create_app(runtime=rt)) as s:
        yield s


def post(url: str, body: dict[str, Any], timeout: float = 120) -> Any:
    return httpx.post(url + "/v1/generate", json=body, timeout=timeout)


def test_valid_request_returns_the_png_of_a_solo_run(server):
    body = {"prompt": "a red circle on the left", "seed": 42, "steps": STEPS, "guidance": 7}
    r = post(server.url, body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "42" and r.headers["x-batch-size"] == "1"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
    ref = load()(
        body["prompt"],
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(42),
        output_type="np",
    ).images[0]
    ref_u8 = np.round(ref * 255).astype(np.int16)
    assert img.shape == ref_u8.shape == (64, 64, 3)
    assert np.abs(img - ref_u8).max() <= 1

    r2 = post(server.url, body | {"format": "base64"})
    assert r2.status_code == 200 and r2.headers["content-type"] == "application/json"
    data = r2.json()
    assert data["seed"] == 42 and data["nonfinite"] is False
    assert base64.b64decode(data["image"]) == r.content  # same seed, same picture


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"steps": -1}, "steps"),
        ({"steps": 0}, "steps"),
        ({"steps": 101}, "steps must be an integer in [1, 100]"),
        ({"height": 60}, "height=60 is not a multiple of 8"),
        ({"width": 100000}, "width must be an integer in [8, 256]"),
        ({"height": 64.0}, "height"),
        ({"steps": "50"}, "steps"),
        ({"seed": "1"}, "seed"),
        ({"prompt": 123}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 201}, "prompt has 201 characters; the limit is 200"),
        ({"scheduler": "heun"}, "scheduler"),
        ({"format": "jpeg"}, "format"),
        ({"schedule": [1, 2]}, "step 0"),
        ({"guidance": -1}, "guidance"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_fields_get_422_with_the_reason(server, fields, where):
    r = post(server.url, {"prompt": "a red circle", "steps": STEPS} | fields)
    assert r.status_code == 422, (fields, r.status_code, r.text)
    assert where in r.text, r.text


def test_malformed_json_gets_422(server):
    r = httpx.post(server.url + "/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_healthz_and_metrics(server):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert post(server.url, {"prompt": "a blue star", "seed": 1, "steps": STEPS}).status_code == 200
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("fd_trt_requests_total", (("outcome", "ok"),))] >= 1
    assert samples[("fd_trt_queue_depth", ())] == 0
    assert samples[("fd_trt_request_latency_seconds_count", ())] >= 1


def test_full_queue_gets_503_with_retry_after():
    gate = Gate(load())
    rt = ServingRuntime(gate, max_batch=1, max_queue=1, warmup=False)  # type: ignore[arg-type]
    with Server(create_app(runtime=rt)) as s, ThreadPoolExecutor(2) as ex:
        body = {"prompt": "a red circle", "steps": STEPS}
        first = ex.submit(post, s.url, body | {"seed": 1})
        assert gate.entered.wait(60)
        second = ex.submit(post, s.url, body | {"seed": 2})
        wait_for(lambda: rt.queue_depth == 1)
        r = post(s.url, body | {"seed": 3})
        assert r.status_code == 503
        assert "queue is full" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        gate.event.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert rt.stats()["requests"] == {"ok": 2, "rejected": 1}


def test_client_disconnect_cancels_its_queued_request():
    gate = Gate(load())
    rt = ServingRuntime(gate, max_batch=1, max_queue=4, warmup=False)  # type: ignore[arg-type]
    with Server(create_app(runtime=rt)) as s, ThreadPoolExecutor(1) as ex:
        first = ex.submit(post, s.url, {"prompt": "a red circle", "steps": STEPS, "seed": 1})
        assert gate.entered.wait(60)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            post(s.url, {"prompt": "a red circle", "steps": STEPS, "seed": 2}, timeout=0.5)
        wait_for(lambda: rt.stats()["requests"].get("cancelled", 0) == 1 and rt.queue_depth == 0)
        gate.event.set()
        assert first.result().status_code == 200
    assert gate.calls == [1]  # the abandoned request never ran


@pytest.mark.slow
def test_sigterm_with_requests_in_flight_loses_none(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fd_trt.cli",
            "serve",
            "--backend",
            "torch",
            "--port",
            str(port),
            "--max-batch",
            "4",
            "--sizes",
            "64x64",
            "--max-body-kb",
            "32",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=180)
        n = 6
        with ThreadPoolExecutor(n) as ex:
            futures = [ex.submit(post, url, {"prompt": "a green square", "seed": s, "steps": 60}) for s in range(n)]

            def accepted() -> int:
                from prometheus_client.parser import text_string_to_metric_families

                text = httpx.get(url + "/metrics", timeout=5).text
                v = {s.name + str(s.labels): s.value for f in text_string_to_metric_families(text) for s in f.samples}
                return int(
                    v["fd_trt_queue_depth{}"] + v["fd_trt_in_flight{}"] + v["fd_trt_requests_total{'outcome': 'ok'}"]
                )

            wait_for(lambda: accepted() == n, timeout=120)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * n
        assert sorted(int(r.headers["x-seed"]) for r in responses) == list(range(n))
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the process ends as signalled.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
