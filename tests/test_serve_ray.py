"""The Ray Serve deployment: 2 CPU replicas of the default model behind Ray's HTTP proxy."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fd_trt[serve]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from fd_trt.pipeline import FasterDiffusionPipeline  # noqa: E402

from test_http import free_port  # noqa: E402

STEPS = 10


@pytest.fixture(scope="module")
def ray_app():
    from fd_trt.serve_ray import deployment

    port = free_port()
    # On a busy 2-core machine Ray's HTTP proxy can take more than its default 5 s to come up.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(num_replicas=2, num_cpus=1).bind(
            model="default", backend="torch", threads=1, max_batch=4, max_wait_ms=20
        )
        serve.run(app, name="fd_trt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_same_api(ray_app):
    url = ray_app
    assert httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    bodies = [{"prompt": p, "seed": i, "steps": STEPS} for i, p in enumerate(["a red circle", "a blue square"] * 6)]
    with ThreadPoolExecutor(12) as ex:
        responses = list(ex.map(lambda b: httpx.post(url + "/v1/generate", json=b, timeout=300), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    replicas = {r.headers["x-replica"] for r in responses}
    assert len(replicas) == 2, replicas  # Ray spread the load over both

    ref = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    for body, r in zip(bodies[:4], responses[:4]):
        img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
        want = ref(body["prompt"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(body["seed"]),
                   output_type="np").images[0]
        assert np.abs(img - np.round(want * 255).astype(np.int16)).max() <= 1

    bad = httpx.post(url + "/v1/generate", json={"prompt": "a red circle", "steps": -1}, timeout=30)
    assert bad.status_code == 422
    metrics = httpx.get(url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "fd_trt_requests_total" in metrics.text
