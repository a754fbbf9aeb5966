"""schemathesis against the server's own OpenAPI schema: at least 1,000 generated cases, no 5xx, no hang.

Every operation of ``/openapi.json`` (``/v1/generate``, ``/v1/images/generations``,
``/v1/images/edits``, ``/healthz``, ``/metrics``) gets positive and negative cases from the schema,
sent with the API key to a live server on loopback whose limits keep each image cheap.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402
from fd_trt.serving.runtime import Limits, ServingRuntime  # noqa: E402

KEY = "schema-key-0123456789"
TOTAL = 1000
#: Cases per operation: the model routes get most of them.
SHARE = {"POST /v1/generate": 600, "POST /v1/images/generations": 400, "POST /v1/images/edits": 200}
HANG_S = 30.0


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_hang(capsys):
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    rt = ServingRuntime(
        pipe,
        max_batch=4,
        max_wait_ms=0,
        warmup=False,
        limits=Limits(max_steps=3, max_size=64, max_prompt_chars=200),
        default_timeout_s=20,
    )
    statuses: Counter[int] = Counter()
    per_op: Counter[str] = Counter()
    failures: list[str] = []
    slowest = [0.0]
    t_start = time.perf_counter()
    with ThreadedServer(create_app(runtime=rt, api_keys=[KEY], docs=True)) as s:
        raw = httpx.get(s.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        schema = schemathesis.openapi.from_dict(raw)
        operations = [r.ok() for r in schema.get_all_operations()]
        labels = sorted(op.label for op in operations)
        assert "POST /v1/generate" in labels and "POST /v1/images/generations" in labels, labels
        current = {"label": ""}
        for op in operations:
            n = SHARE.get(op.label, 50)
            current["label"] = op.label

            @settings(
                max_examples=n,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=op.as_strategy())
            def one(case: Any) -> None:
                label = current["label"]
                t0 = time.perf_counter()
                try:
                    r = case.call(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=HANG_S)
                except requests.exceptions.Timeout:
                    failures.append(f"hang (> {HANG_S:.0f} s): {label} {case.body!r}"[:400])
                    raise
                slowest[0] = max(slowest[0], time.perf_counter() - t0)
                statuses[r.status_code] += 1
                per_op[label] += 1
                if r.status_code >= 500:
                    failures.append(f"{r.status_code} {r.text[:200]} for {label} {case.body!r}"[:500])
                assert r.status_code < 500, failures[-1]

            one()
    rt.shutdown()
    total = sum(statuses.values())
    with capsys.disabled():
        print(
            f"\nschemathesis: {total} cases in {time.perf_counter() - t_start:.0f} s over {dict(per_op)}; "
            f"statuses {dict(sorted(statuses.items()))}; slowest {slowest[0]:.2f} s"
        )
    assert not failures, failures[:3]
    assert total >= TOTAL
    assert statuses[200] > 0 and any(400 <= c < 500 for c in statuses)
