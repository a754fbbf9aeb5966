"""The Ray Serve deployment: 2 CPU replicas of the default model behind Ray's HTTP proxy."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fd_trt[serve]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402
from test_http import free_port  # noqa: E402

from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402

# Starting Ray and two replicas takes about a minute: the default run leaves these out.
pytestmark = pytest.mark.slow

STEPS = 10


@pytest.fixture(scope="module")
def ray_app():
    from fd_trt.serving.ray import deployment

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
    import socket

    assert not any(socket.gethostname() in x or ":" in x for x in replicas), replicas  # no host, no pid

    ref = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    for body, r in zip(bodies[:4], responses[:4]):
        img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
        want = ref(
            body["prompt"],
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(body["seed"]),
            output_type="np",
        ).images[0]
        assert np.abs(img - np.round(want * 255).astype(np.int16)).max() <= 1

    bad = httpx.post(url + "/v1/generate", json={"prompt": "a red circle", "steps": -1}, timeout=30)
    assert bad.status_code == 422
    metrics = httpx.get(url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "fd_trt_requests_total" in metrics.text


def replica_names() -> list[str]:
    """The replica ids (X-Replica) of the live fd_trt replicas."""
    from ray._private.state import actors

    return [
        a["Name"].rsplit("#", 1)[1]
        for a in actors().values()
        if a["State"] == "ALIVE" and "FdTrtReplica#" in (a["Name"] or "")
    ]


def test_a_replica_killed_under_load_loses_no_request_silently(ray_app, capsys):
    import signal
    import time
    from collections import Counter

    url = ray_app

    def pid_of(replica: str) -> int:
        """The process of a replica: X-Replica is Ray's replica id, the end of its actor's name
        (Ray runs the replicas on this machine here)."""
        from ray._private.state import actors

        found = [a["Pid"] for a in actors().values() if a["State"] == "ALIVE" and a["Name"].endswith("#" + replica)]
        return found[0] if found else -1

    # Learn the replicas' processes.
    pids: set[int] = set()
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        while len(pids) < 2 and time.monotonic() - t0 < 120:
            rs = list(
                ex.map(
                    lambda s: httpx.post(
                        url + "/v1/generate", json={"prompt": "a red circle", "seed": s, "steps": 2}, timeout=120
                    ),
                    range(4),
                )
            )
            pids |= {pid_of(r.headers["x-replica"]) for r in rs if r.status_code == 200}
    assert len(pids) == 2, pids
    victim = sorted(pids)[0]

    n = 12
    body = {"prompt": "a blue square", "steps": 60, "schedule": "all"}  # long enough to be in flight at the kill
    with ThreadPoolExecutor(n) as ex:

        def send(seed: int) -> Any:
            try:
                return httpx.post(url + "/v1/generate", json=body | {"seed": seed}, timeout=150)
            except httpx.TimeoutException as e:  # a hang: the test fails on it below
                return e
            except httpx.TransportError as e:  # a dropped connection is an answer, but not a clear one
                return e

        replicas = {pid_of(name): name for name in replica_names()}
        futures = [ex.submit(send, s) for s in range(n)]
        time.sleep(3.0)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        results = [f.result(timeout=200) for f in futures]
    outcomes: Counter[str] = Counter()
    for r in results:
        assert not isinstance(r, httpx.TimeoutException), f"a request hung after the kill: {r!r}"
        assert not isinstance(r, Exception), f"a request got no HTTP answer: {r!r}"
        if r.status_code == 200:
            assert r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
            outcomes["200 " + ("survivor" if r.headers["x-replica"] != replicas.get(victim) else "victim")] += 1
        else:
            assert r.status_code >= 500 and r.text.strip(), (r.status_code, r.text)  # a clear error, not silence
            outcomes[f"{r.status_code}"] += 1
            outcomes[f"  message: {r.text.strip()[:120]}"] = 0
    assert sum(outcomes.values()) == n  # every request answered, each exactly once
    assert outcomes["200 survivor"] >= 1
    # Ray replaces the dead replica; the service keeps answering.
    ok = httpx.post(url + "/v1/generate", json={"prompt": "a red circle", "seed": 1, "steps": 2}, timeout=120)
    assert ok.status_code == 200
    with capsys.disabled():
        print(
            f"\nreplica {victim} killed with {n} requests in flight: {dict(outcomes)}; "
            f"answers done {time.monotonic() - t_kill:.1f} s after the kill"
        )
