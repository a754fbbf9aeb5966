"""The serving runtime: dynamic batching keeps every image equal to its solo run, limits, metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from fd_trt.errors import InputError, ScheduleError
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.serving.runtime import (
    GenerateRequest,
    Limits,
    Metrics,
    QueueFullError,
    RequestTimeoutError,
    RuntimeClosedError,
    ServingRuntime,
    prometheus_text,
)

from conftest import rel_l2

STEPS = 10
PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a green star at the top",
    "a yellow triangle",
    "a cyan diamond on the left and a magenta circle on the right",
    "an orange star",
    "a purple square",
]


@pytest.fixture(scope="module")
def reference() -> FasterDiffusionPipeline:
    """The shipped model in a pipeline of its own: solo runs to compare with."""
    return FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)


def solo(pipe: FasterDiffusionPipeline, req: GenerateRequest) -> torch.Tensor:
    """The request run alone through the pipeline with its own seeded generator: the reference."""
    pipe.set_scheduler(req.scheduler)
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        generator=torch.Generator().manual_seed(req.seed),
        schedule=req.schedule,
        output_type="latent",
    )
    pipe.set_scheduler("ddim")
    return out.latents[0]


def make_runtime(**kw: Any) -> ServingRuntime:
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    kw.setdefault("warmup", False)
    return ServingRuntime(pipe, **kw)


class Gate:
    """Wraps a pipeline so that each call waits for ``open()``: the test decides when batches run."""

    def __init__(self, pipe: FasterDiffusionPipeline) -> None:
        self.pipe, self.event, self.entered = pipe, threading.Event(), threading.Event()
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(len(kw["prompt"]))
        self.entered.set()
        assert self.event.wait(60), "the test never opened the gate"
        return self.pipe(**kw)


def gated_runtime(**kw: Any) -> tuple[ServingRuntime, Gate]:
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    gate = Gate(pipe)
    return ServingRuntime(gate, warmup=False, **kw), gate  # type: ignore[arg-type]


def wait_for(cond: Any, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.005)


@pytest.mark.slow
def test_32_concurrent_requests_equal_their_solo_runs(reference):
    # Mixed settings: the runtime must group compatible requests and keep the others apart.
    reqs = []
    for i in range(32):
        reqs.append(
            GenerateRequest(
                prompt=PROMPTS[i % len(PROMPTS)],
                negative_prompt="a black square" if i % 5 == 0 else "",
                seed=1000 + i,
                steps=STEPS,
                guidance=7.5 if i % 4 else 3.0,
                height=64,
                width=64 if i % 8 else 48,
                scheduler="ddim" if i % 3 else "dpmpp",
            )
        )
    rt = make_runtime(max_batch=8, max_wait_ms=200, max_queue=64)
    try:
        with ThreadPoolExecutor(32) as ex:
            futures = list(ex.map(rt.submit, reqs))
            results = [f.result(timeout=300) for f in futures]
    finally:
        rt.shutdown()
    assert len(results) == 32
    assert max(r.batch_size for r in results) > 1, "nothing was batched"
    stats = rt.stats()
    assert stats["requests"] == {"ok": 32}
    assert sum(k * v for k, v in stats["batch_sizes"].items()) == 32
    for req, res in zip(reqs, results):
        assert res.seed == req.seed
        ref = solo(reference, req)
        assert rel_l2(res.latents, ref) < 1e-4, (req, rel_l2(res.latents, ref))
        img = np.asarray(res.image, dtype=np.int16)
        assert img.shape == (req.height, req.width, 3)
        assert img.std() > 1.0  # not a constant picture


def test_stochastic_scheduler_rows_use_their_own_generators(reference):
    # DDPM draws fresh noise at every step: with one generator per request, batching changes nothing.
    reqs = [GenerateRequest(prompt=p, seed=7 + i, steps=STEPS, scheduler="ddpm") for i, p in enumerate(PROMPTS[:3])]
    rt = make_runtime(max_batch=3, max_wait_ms=500)
    try:
        results = [f.result(timeout=120) for f in [rt.submit(r) for r in reqs]]
    finally:
        rt.shutdown()
    assert [r.batch_size for r in results] == [3, 3, 3]
    for req, res in zip(reqs, results):
        assert rel_l2(res.latents, solo(reference, req)) < 1e-4
    # ... and different seeds give different images.
    assert rel_l2(results[0].latents, results[1].latents) > 0.1


def test_decoder_schedules_are_served_as_asked_and_never_batched_with_key_steps_alone(reference):
    # "deepcache:3" has the key steps of "uniform:3" plus shallow depths: the server must run the
    # depths (not drop them) and keep the two requests in separate sampler calls.
    reqs = [
        GenerateRequest(prompt="a red circle", seed=5, steps=STEPS, schedule=s)
        for s in ("deepcache:3", "uniform:3", "combined:power:4|none|1|fresh")
    ]
    rt = make_runtime(max_batch=3, max_wait_ms=500)
    try:
        results = [f.result(timeout=120) for f in [rt.submit(r) for r in reqs]]
    finally:
        rt.shutdown()
    assert [r.batch_size for r in results] == [1, 1, 1]
    refs = [solo(reference, r) for r in reqs]
    for res, ref in zip(results, refs):
        assert rel_l2(res.latents, ref) < 1e-5
    assert rel_l2(refs[0], refs[1]) > 1e-3  # the depths change the result: dropping them would show


def test_async_generate_and_random_seed_is_reported(reference):
    rt = make_runtime(max_batch=2)
    try:
        res = asyncio.run(rt.generate(GenerateRequest(prompt="a red circle", seed=None, steps=STEPS)))
    finally:
        rt.shutdown()
    assert 0 <= res.seed < 2**63
    again = solo(reference, GenerateRequest(prompt="a red circle", seed=res.seed, steps=STEPS))
    assert rel_l2(res.latents, again) < 1e-4
    assert res.png_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_requests_are_refused_with_the_reason():
    rt = make_runtime(limits=Limits(max_steps=100, max_size=256, max_prompt_chars=50))
    try:
        cases = [
            (dict(steps=0), "steps must be an integer in [1, 100], got 0"),
            (dict(steps=101), "got 101"),
            (dict(steps=12.5), "got 12.5"),
            (dict(height=60), "height=60 is not a multiple of 8"),
            (dict(width=512), "width must be an integer in [8, 256], got 512"),
            (dict(scheduler="heun"), "unknown scheduler 'heun'"),
            (dict(prompt="x" * 51), "prompt has 51 characters; the limit is 50"),
            (dict(guidance=float("nan")), "guidance must be a number"),
            (dict(seed=-1), "seed must be an integer"),
            (dict(timeout_s=0), "timeout_s must be a positive number"),
        ]
        for fields, message in cases:
            kw = dict(prompt="a red circle", steps=STEPS) | fields
            with pytest.raises(InputError) as e:
                rt.submit(GenerateRequest(**kw))
            assert message in str(e.value), (fields, str(e.value))
        with pytest.raises(ScheduleError):
            rt.submit(GenerateRequest(prompt="a red circle", steps=STEPS, schedule=[1, 2]))
        assert rt.queue_depth == 0
    finally:
        rt.shutdown()


def test_full_queue_rejects_and_loses_nothing():
    rt, gate = gated_runtime(max_batch=1, max_queue=2)
    try:
        running = rt.submit(GenerateRequest(prompt="a red circle", seed=1, steps=STEPS))
        assert gate.entered.wait(30)  # the worker holds the first request
        queued = [rt.submit(GenerateRequest(prompt="a red circle", seed=s, steps=STEPS)) for s in (2, 3)]
        with pytest.raises(QueueFullError) as e:
            rt.submit(GenerateRequest(prompt="a red circle", seed=4, steps=STEPS))
        assert "queue is full (2 requests waiting)" in str(e.value)
        assert e.value.retry_after_s >= 1
        gate.event.set()
        assert [f.result(timeout=60).seed for f in [running, *queued]] == [1, 2, 3]
    finally:
        gate.event.set()
        rt.shutdown()
    assert rt.stats()["requests"] == {"ok": 3, "rejected": 1}


def test_timeout_and_cancellation_while_queued():
    rt, gate = gated_runtime(max_batch=1, max_queue=8)
    try:
        first = rt.submit(GenerateRequest(prompt="a red circle", seed=1, steps=STEPS))
        assert gate.entered.wait(30)
        late = rt.submit(GenerateRequest(prompt="a red circle", seed=2, steps=STEPS, timeout_s=0.2))
        cancelled = rt.submit(GenerateRequest(prompt="a red circle", seed=3, steps=STEPS))
        assert cancelled.cancel()
        assert rt.queue_depth == 1 and rt.stats()["requests"] == {"cancelled": 1}  # it left the queue at once
        time.sleep(0.3)
        gate.event.set()
        assert first.result(timeout=60).seed == 1
        with pytest.raises(RequestTimeoutError, match="passed its 0.2 s deadline in the queue"):
            late.result(timeout=60)
        with pytest.raises(CancelledError):
            cancelled.result(timeout=1)
        wait_for(lambda: rt.queue_depth == 0 and rt.stats()["in_flight"] == 0)
    finally:
        gate.event.set()
        rt.shutdown()
    assert rt.stats()["requests"] == {"ok": 1, "timeout": 1, "cancelled": 1}
    assert gate.calls == [1]  # neither the late nor the cancelled request ran


class StepCounter(Gate):
    """Passes calls through, counting the scheduler steps each call really ran and how it ended."""

    def __init__(self, pipe: FasterDiffusionPipeline) -> None:
        super().__init__(pipe)
        self.event.set()
        self.steps: list[int] = []
        self.ended: list[str] = []

    def __call__(self, **kw: Any) -> Any:
        inner, n = kw["callback_on_step_end"], [0]

        def counting(p: Any, i: int, t: Any, k: dict[str, Any]) -> Any:
            n[0] += 1
            return inner(p, i, t, k)

        kw["callback_on_step_end"] = counting
        try:
            out = self.pipe(**kw)
            self.ended.append("finished")
            return out
        except BaseException as e:
            self.ended.append(type(e).__name__)
            raise
        finally:
            self.steps.append(n[0])


def test_timeout_while_running_aborts_a_batch_nobody_waits_for():
    # Schedule "all": one encoder and one decoder call per step, so an abort shows in the step count
    # (with "paper", the last 165 of 200 steps are decoded in one call before any step callback).
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    counter = StepCounter(pipe)
    rt = ServingRuntime(counter, max_batch=2, warmup=False)  # type: ignore[arg-type]
    launches0 = pipe.runner.launches["decoder"]
    try:
        t0 = time.perf_counter()
        fut = rt.submit(GenerateRequest(prompt="a red circle", seed=1, steps=200, schedule="all", timeout_s=0.3))
        with pytest.raises(RequestTimeoutError, match="deadline while running"):
            fut.result(timeout=120)
        wait_for(lambda: counter.ended)
        took = time.perf_counter() - t0
    finally:
        rt.shutdown()
    assert rt.stats()["requests"] == {"timeout": 1}
    # The abort itself: the sampler call stopped early instead of finishing its 200 steps late.
    assert counter.ended == ["_BatchAborted"]
    assert 1 <= counter.steps[0] < 100, counter.steps
    assert pipe.runner.launches["decoder"] - launches0 == counter.steps[0]
    assert took < 5.0


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_drains_or_fails_every_accepted_request(drain):
    rt, gate = gated_runtime(max_batch=2, max_wait_ms=0, max_queue=16)
    futures = [rt.submit(GenerateRequest(prompt="a red circle", seed=s, steps=STEPS)) for s in range(6)]
    assert gate.entered.wait(30)
    stopper = threading.Thread(target=rt.shutdown, kwargs={"drain": drain})
    stopper.start()
    wait_for(lambda: rt.closed)
    with pytest.raises(RuntimeClosedError, match="shutting down"):
        rt.submit(GenerateRequest(prompt="a red circle", seed=9, steps=STEPS))
    gate.event.set()
    stopper.join(120)
    assert not stopper.is_alive()
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=1).seed)
        except RuntimeClosedError:
            outcomes.append("closed")
    if drain:
        assert outcomes == list(range(6))
    else:  # the running batch finishes; the waiting ones are told, not dropped
        n = gate.calls[0]
        assert outcomes == [*range(n), *["closed"] * (6 - n)]
        assert rt.stats()["requests"] == {"ok": n, "closed": 6 - n, "rejected": 1}  # + the refused late submit


def test_nonfinite_latents_are_flagged_and_logged(caplog):
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)

    class Poisoned(Gate):
        def __call__(self, **kw: Any) -> Any:
            out = self.pipe(**kw)
            out.latents = out.latents.clone()  # an inference tensor cannot be edited in place
            out.latents[1] = float("nan")
            return out

    gate = Poisoned(pipe)
    rt = ServingRuntime(gate, warmup=False, max_batch=2, max_wait_ms=500)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="fd_trt.serving.runtime"):
            a, b = [rt.submit(GenerateRequest(prompt="a red circle", seed=s, steps=STEPS)) for s in (1, 2)]
            ra, rb = a.result(timeout=60), b.result(timeout=60)
    finally:
        rt.shutdown()
    assert (ra.nonfinite, rb.nonfinite) == (False, True)
    assert "seed 2 has NaN/Inf latents" in caplog.text
    assert rt.stats()["nonfinite_images"] == 1


def test_warmup_runs_batch_one_and_max_batch():
    pipe = FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)
    gate = Gate(pipe)
    gate.event.set()
    rt = ServingRuntime(gate, max_batch=3, warmup=True, warmup_sizes=[(32, 32)])  # type: ignore[arg-type]
    rt.shutdown()
    assert gate.calls == [1, 3, 1, 3]
    assert rt.stats()["requests"] == {}  # warm-up is not traffic


def test_metrics_percentiles_and_prometheus_text():
    m = Metrics()
    for v in range(1, 101):  # latencies 0.01 .. 1.00 s
        m.done(v / 100, queue_s=0.0, nonfinite=False)
    m.batch(4, 0.5)
    m.batch(4, 0.5)
    m.batch(1, 0.1)
    m.count("rejected")
    snap = m.snapshot(queue_depth=3, in_flight=2)
    # nearest rank: p50 of 1..100 is the 50th value, p95 the 95th, p99 the 99th
    assert snap["latency_s"]["p50"] == 0.50 and snap["latency_s"]["p95"] == 0.95 and snap["latency_s"]["p99"] == 0.99
    assert snap["batch_sizes"] == {1: 1, 4: 2} and snap["mean_batch_size"] == 3.0
    assert math.isclose(m.mean_batch_seconds(), 1.1 / 3)

    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(prometheus_text(snap).decode())
        for s in fam.samples
    }
    assert samples[("fd_trt_queue_depth", ())] == 3
    assert samples[("fd_trt_in_flight", ())] == 2
    assert samples[("fd_trt_requests_total", (("outcome", "ok"),))] == 100
    assert samples[("fd_trt_requests_total", (("outcome", "rejected"),))] == 1
    assert samples[("fd_trt_batches_total", (("size", "4"),))] == 2
    assert samples[("fd_trt_request_latency_quantile_seconds", (("quantile", "0.99"),))] == 0.99
    # histogram buckets are cumulative: 0.01..0.05 -> 5 requests, 0.06..0.10 -> 5 more
    assert samples[("fd_trt_request_latency_seconds_bucket", (("le", "0.05"),))] == 5
    assert samples[("fd_trt_request_latency_seconds_bucket", (("le", "0.1"),))] == 10
    assert samples[("fd_trt_request_latency_seconds_bucket", (("le", "+Inf"),))] == 100
    assert samples[("fd_trt_request_latency_seconds_count", ())] == 100


def test_worker_on_the_callers_thread(reference):
    # start=False: the caller's thread (here the main thread) runs the worker loop until shutdown.
    rt = make_runtime(max_batch=4, max_wait_ms=100, start=False)
    reqs = [GenerateRequest(prompt=p, seed=50 + i, steps=STEPS) for i, p in enumerate(PROMPTS[:4])]
    results: list[Any] = []

    def client() -> None:
        try:
            results.extend(f.result(timeout=120) for f in [rt.submit(r) for r in reqs])
        finally:
            rt.shutdown()

    t = threading.Thread(target=client)
    t.start()
    rt.run()  # returns once the client has shut the runtime down
    t.join()
    assert [r.seed for r in results] == [50, 51, 52, 53]
    for req, res in zip(reqs, results):
        assert rel_l2(res.latents, solo(reference, req)) < 1e-4
    with pytest.raises(Exception, match="already running"):
        rt.run()


def test_shutdown_before_the_worker_started_fails_queued_requests():
    rt = make_runtime(start=False)
    fut = rt.submit(GenerateRequest(prompt="a red circle", seed=1, steps=STEPS))
    rt.shutdown()
    with pytest.raises(RuntimeClosedError, match="before its worker started"):
        fut.result(timeout=1)
