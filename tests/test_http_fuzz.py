"""Fuzzing POST /v1/generate on a real server (#13): every body gets a 2xx or a 4xx, never a 5xx or a hang.

Valid bodies run for real (the default model, at most 4 steps, at most 64x64, so they finish fast);
invalid ones mix wrong types, huge and negative numbers, NaN, huge lists and strings, unknown
fields, nested junk, non-object JSON and non-JSON bytes. /healthz is polled the whole time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve_limits import healthz_latencies  # noqa: E402

from fd_trt.families.models import SCHEDULERS  # noqa: E402
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402
from fd_trt.serving.runtime import Limits, ServingRuntime  # noqa: E402

# 500 fuzzed requests against a live server: the default run leaves this out.
pytestmark = pytest.mark.slow

CASES = 500
MAX_BODY = 64 * 1024

VALID = {
    "prompt": st.text(min_size=1, max_size=60),
    "negative_prompt": st.text(max_size=30),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "steps": st.integers(1, 4),
    "guidance": st.floats(0, 12),
    "height": st.sampled_from([None, 32, 64]),
    "width": st.sampled_from([None, 32, 64]),
    "scheduler": st.sampled_from(list(SCHEDULERS)),
    "schedule": st.sampled_from(["paper", "all", "uniform:2", [0], [0, 1], "0,2"]),
    "noise_injection": st.one_of(st.none(), st.booleans()),
    "timeout_s": st.floats(30, 120),
    "format": st.sampled_from(["png", "base64"]),
}

SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["50", "paper", "uniform:0", "uniform:-3", "0,0,0", "heun", "png", "", " ", "64x64"]),
)
JUNK = st.one_of(
    SCALAR,
    st.recursive(
        SCALAR,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=12,
    ),
    # huge lists and strings, built cheaply (hypothesis would take long to generate them item by item)
    st.builds(lambda n, v: [v] * n, st.integers(0, 40_000), st.integers(-5, 300)),
    st.builds(lambda n, c: c * n, st.integers(0, 80_000), st.sampled_from(["x", "é", "0,", "\u2603", "\x00"])),
)


@st.composite
def json_bodies(draw: Any) -> Any:
    body = {k: draw(s) for k, s in VALID.items() if draw(st.booleans()) or k == "prompt"}
    for k in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True)):
        body[k] = draw(JUNK)  # a wrong type or value for a real field
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(min_size=1, max_size=12))] = draw(JUNK)  # an unknown field
    if draw(st.integers(0, 9)) == 0:
        body.pop("prompt", None)
    if draw(st.integers(0, 14)) == 0:
        return draw(JUNK)  # not an object at all
    return body


BODIES = st.one_of(
    json_bodies().map(lambda b: ("json", b, json.dumps(b).encode())),
    json_bodies().map(lambda b: ("json", b, json.dumps(b).encode())),
    json_bodies().map(lambda b: ("json", b, json.dumps(b).encode())),
    st.binary(max_size=300).map(lambda raw: ("bytes", None, raw)),
    st.sampled_from(
        [
            b"{",
            b"[" * 30_000 + b"]" * 30_000,
            b'{"prompt": "a' + b"\xff\xfe" + b'"}',
            b"null",
            b'{"prompt": "x", "steps": 1e999}',
            b'{"prompt": "x", "steps": 01}',
        ]
    ).map(lambda r: ("bytes", None, r)),
)


def allowed(status: int, body: Any) -> bool:
    """2xx/4xx always; 504 only when the client itself asked for a deadline it could not meet."""
    if 200 <= status < 500:
        return True
    t = body.get("timeout_s") if isinstance(body, dict) else None
    return status == 504 and isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 5


def test_fuzzed_bodies_never_get_a_5xx_or_hang(capsys):
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    rt = ServingRuntime(
        pipe, max_batch=4, max_wait_ms=0, warmup=False, limits=Limits(max_steps=4, max_size=64, max_prompt_chars=200)
    )
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    slowest = [0.0]
    failures: list[str] = []
    stop, lat = threading.Event(), []
    t_start = time.perf_counter()
    with ThreadedServer(create_app(runtime=rt, max_body_bytes=MAX_BODY)) as s, httpx.Client(timeout=20) as client:
        poller = threading.Thread(target=healthz_latencies, args=(s.url, stop, lat))
        poller.start()

        @settings(
            max_examples=CASES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(BODIES)
        def one(case: tuple[str, Any, bytes]) -> None:
            kind, body, raw = case
            t0 = time.perf_counter()
            try:
                r = client.post(s.url + "/v1/generate", content=raw, headers={"content-type": "application/json"})
            except httpx.TimeoutException:
                failures.append(f"hang (>20 s) on {raw[:200]!r}")
                raise
            took = time.perf_counter() - t0
            slowest[0] = max(slowest[0], took)
            statuses[r.status_code] += 1
            kinds[kind] += 1
            if not allowed(r.status_code, body):
                failures.append(f"{r.status_code} {r.text[:300]} for {raw[:300]!r}")
            assert allowed(r.status_code, body), failures[-1]
            if r.status_code >= 400:  # a clear error: a JSON detail, not an empty answer
                assert r.headers.get("content-type", "").startswith("application/json"), r.headers
                assert r.json().get("detail"), r.text
            if len(raw) > MAX_BODY:
                assert r.status_code == 413

        try:
            one()
        finally:
            stop.set()
            poller.join(10)
    rt.shutdown()
    total = sum(statuses.values())
    elapsed = time.perf_counter() - t_start
    with capsys.disabled():
        print(
            f"\nfuzz: {total} cases in {elapsed:.1f} s ({dict(kinds)}); status counts {dict(sorted(statuses.items()))}; "
            f"slowest request {slowest[0]:.2f} s; healthz max {max(lat) * 1000:.1f} ms over {len(lat)} polls"
        )
    assert not failures, failures[:5]
    assert total >= CASES
    assert statuses[200] > 0 and statuses[422] > 0 and statuses[413] > 0  # the fuzzer reached each outcome
    assert lat and max(lat) < 1.0
