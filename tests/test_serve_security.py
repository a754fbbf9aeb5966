"""A server that can face a network: API keys, TLS, bounded work, hardened edges, engine dirs as untrusted input.

Each test answers one finding of a review of the server as a new user and an attacker would use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from test_serve import Gate, wait_for  # noqa: E402

from fd_trt.errors import FdTrtError, InputError  # noqa: E402
from fd_trt.graphs.export import CorruptGraphError  # noqa: E402
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving import http as serve_http  # noqa: E402
from fd_trt.serving import options as serve_options  # noqa: E402
from fd_trt.serving import ray as serve_ray  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402
from fd_trt.serving.runtime import GenerateRequest, Limits, QueueFullError, ServingRuntime  # noqa: E402

STEPS = 2
KEYS = ["k-first-0123456789", "k-second-abcdefghij"]


def load() -> FasterDiffusionPipeline:
    return FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)


@pytest.fixture
def pipe() -> FasterDiffusionPipeline:
    """A fresh pipeline: a runtime's shutdown closes the pipeline it served."""
    return load()


def runtime(pipe: Any = None, **kw: Any) -> ServingRuntime:
    kw.setdefault("limits", Limits(max_steps=20, max_size=128, max_prompt_chars=200))
    return ServingRuntime(load(), max_batch=2, max_wait_ms=0, warmup=False, **kw)


@pytest.fixture(scope="module")
def keyed() -> Iterator[ThreadedServer]:
    rt = runtime()
    with ThreadedServer(create_app(runtime=rt, api_keys=KEYS, docs=True)) as s:
        yield s
    rt.shutdown()


@pytest.fixture(scope="module")
def plain() -> Iterator[ThreadedServer]:
    rt = runtime()
    with ThreadedServer(create_app(runtime=rt)) as s:
        yield s
    rt.shutdown()


BODY = {"prompt": "a red circle", "seed": 3, "steps": STEPS}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# authentication ------------------------------------------------------------------------------------
def test_without_the_key_every_route_but_healthz_gets_401(keyed):
    for method, path in (("POST", "/v1/generate"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json")):
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}):
            r = httpx.request(method, keyed.url + path, json=BODY if method == "POST" else None, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer") and "Bearer <key>" in r.json()["detail"]
    assert httpx.get(keyed.url + "/healthz").json()["status"] == "ok"


def test_each_key_of_several_opens_every_route(keyed):
    for key in KEYS:
        r = httpx.post(keyed.url + "/v1/generate", json=BODY, headers=bearer(key), timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert "fd_trt_requests_total" in httpx.get(keyed.url + "/metrics", headers=bearer(KEYS[1])).text
    assert httpx.get(keyed.url + "/openapi.json", headers=bearer(KEYS[0])).json()["info"]["title"] == "fd_trt"
    assert httpx.get(keyed.url + "/docs", headers=bearer(KEYS[0])).status_code == 200


def test_keys_are_compared_in_constant_time_each_of_them(monkeypatch):
    calls = []
    real = serve_http.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve_http.hmac, "compare_digest", spy)
    digests = [serve_options.key_digest(k) for k in KEYS]
    assert serve_http.key_matches(KEYS[0], digests) and not serve_http.key_matches("nope", digests)
    assert len(calls) == 4  # every key is compared, also after a match


def test_docs_are_off_by_default(plain):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(plain.url + path).status_code == 404


def test_keys_come_from_the_flag_the_environment_and_a_file(tmp_path):
    parser = argparse.ArgumentParser()
    serve_options.add_serve_options(parser)
    f = tmp_path / "keys"
    f.write_text("# operators\nkey-a\n\n  key-b  \n")
    args = parser.parse_args(["--api-key", "key-c", "--api-key-file", str(f)])
    assert serve_options.api_keys(args, {serve_options.API_KEY_ENV: "key-d"}) == ["key-c", "key-d", "key-a", "key-b"]
    assert serve_options.api_keys(parser.parse_args([]), {}) == []
    f.write_text("# nothing here\n")
    with pytest.raises(InputError, match="holds no key"):
        serve_options.api_keys(args, {})
    with pytest.raises(InputError, match="cannot read"):
        serve_options.api_keys(parser.parse_args(["--api-key-file", str(tmp_path / "missing")]), {})


def test_binding_beyond_loopback_without_a_key_warns():
    parser = argparse.ArgumentParser()
    serve_options.add_serve_options(parser)
    exposed = parser.parse_args(["--host", "0.0.0.0"])
    assert "without an API key" in serve_options.exposure_warning(exposed, [])
    assert "without TLS" in serve_options.exposure_warning(exposed, ["k"])
    assert serve_options.exposure_warning(parser.parse_args([]), []) is None
    assert serve_options.exposure_warning(parser.parse_args(["--host", "::1"]), []) is None


def test_fd_trt_serve_prints_the_warning_before_loading(monkeypatch, capsys):
    from fd_trt.cli import main

    def stop(*a: Any, **k: Any) -> Any:
        raise FdTrtError("stopped before loading the model")

    monkeypatch.setattr(ServingRuntime, "from_pretrained", classmethod(lambda cls, **kw: stop()))
    monkeypatch.delenv(serve_options.API_KEY_ENV, raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) != 0
    assert "without an API key" in capsys.readouterr().err


# TLS -----------------------------------------------------------------------------------------------
def test_tls_with_a_certificate_made_here(pipe, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    key_pem, cert_pem = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    for pem in cert.cert_chain_pems[1:]:
        with open(cert_pem, "ab") as f:
            f.write(pem.bytes())
    parser = argparse.ArgumentParser()
    serve_options.add_serve_options(parser)
    args = parser.parse_args(["--ssl-keyfile", str(key_pem), "--ssl-certfile", str(cert_pem)])
    config = serve_options.uvicorn_kwargs(args)
    assert config["ssl_keyfile"] == str(key_pem) and config["ssl_certfile"] == str(cert_pem)
    rt = runtime(pipe)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with ThreadedServer(create_app(runtime=rt, api_keys=KEYS[:1]), **config) as s:
        assert s.url.startswith("https://")
        with httpx.Client(verify=client_ctx, timeout=120) as client:
            assert client.get(s.url + "/healthz").json()["status"] == "ok"
            r = client.post(s.url + "/v1/generate", json=BODY, headers=bearer(KEYS[0]))
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(s.url + "/healthz", verify=ssl.create_default_context())
        with pytest.raises(httpx.HTTPError):  # no clear-text HTTP on the TLS port
            httpx.get(s.url.replace("https://", "http://") + "/healthz", timeout=5)
    rt.shutdown()
    with pytest.raises(InputError, match="both"):
        serve_options.uvicorn_kwargs(parser.parse_args(["--ssl-keyfile", str(key_pem)]))


# bounded work ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
def test_non_finite_timeouts_get_422(plain, raw):
    body = b'{"prompt": "a red circle", "steps": 2, "timeout_s": ' + raw + b"}"
    r = httpx.post(plain.url + "/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "timeout_s" in r.text


def test_huge_timeouts_are_clamped_to_the_server_maximum(pipe):
    gate = Gate(pipe)
    rt = ServingRuntime(gate, max_batch=1, warmup=False, default_timeout_s=30, max_timeout_s=5)  # type: ignore[arg-type]
    try:
        busy = rt.submit(GenerateRequest(prompt="a", steps=STEPS))
        wait_for(lambda: gate.entered.is_set())
        rt.submit(GenerateRequest(prompt="b", steps=STEPS, timeout_s=1e300))
        job = rt._queue[0]
        assert job.deadline - job.submitted == pytest.approx(5)
        assert rt.timeout_for(GenerateRequest(prompt="c")) == 5  # the default is clamped too
        with pytest.raises(InputError, match="timeout_s"):
            rt.check(GenerateRequest(prompt="d", steps=STEPS, timeout_s=math.inf))
    finally:
        gate.event.set()
        busy.exception(60)  # it may pass its own 5 s deadline on a busy machine: that is not the point
        rt.shutdown()
    args = argparse.Namespace(**vars(serve_ray.build_parser().parse_args(["--timeout", "10", "--max-timeout", "60"])))
    assert serve_options.runtime_kwargs(args)["max_timeout_s"] == 60
    assert serve_ray.request_timeout_s(args) == 60 + serve_ray.REQUEST_TIMEOUT_MARGIN_S


def test_a_full_queue_is_refused_before_the_costly_validation(pipe, monkeypatch):
    gate = Gate(pipe)
    rt = ServingRuntime(gate, max_batch=1, max_queue=1, warmup=False)  # type: ignore[arg-type]
    try:
        busy = rt.submit(GenerateRequest(prompt="a", steps=STEPS))
        wait_for(lambda: gate.entered.is_set())
        queued = rt.submit(GenerateRequest(prompt="b", steps=STEPS))
        checks = []
        monkeypatch.setattr(rt, "check", lambda req: checks.append(req) or (64, 64, (0,)))
        with pytest.raises(QueueFullError):
            rt.submit(GenerateRequest(prompt="c", steps=STEPS, schedule="uniform:1"))
        assert checks == []  # no scheduler copy, no schedule parse for a request that cannot queue
    finally:
        gate.event.set()
        busy.result(60)
        queued.result(60)
        rt.shutdown()


def test_connections_beyond_limit_concurrency_get_503(pipe):
    gate = Gate(pipe)
    rt = ServingRuntime(gate, max_batch=1, warmup=False)  # type: ignore[arg-type]
    # uvicorn counts the open connection too: 2 lets one request in and turns the next away
    with ThreadedServer(create_app(runtime=rt), limit_concurrency=2) as s, ThreadPoolExecutor(1) as ex:
        first = ex.submit(httpx.post, s.url + "/v1/generate", json=BODY, timeout=60)
        wait_for(lambda: gate.entered.is_set())
        r = httpx.post(s.url + "/v1/generate", json=BODY, timeout=10)
        assert r.status_code == 503
        gate.event.set()
        assert first.result(60).status_code == 200
    rt.shutdown()
    parser = argparse.ArgumentParser()
    serve_options.add_serve_options(parser)
    assert serve_options.uvicorn_kwargs(parser.parse_args([]))["limit_concurrency"] == 256
    with pytest.raises(InputError, match="limit-concurrency"):
        serve_options.uvicorn_kwargs(parser.parse_args(["--limit-concurrency", "0"]))


def test_no_tuning_run_while_serving_for_new_schedules(tmp_path):
    from test_tune import COSTS, make_auto

    from fd_trt.core.schedule import parse_schedule

    auto, calls = make_auto(tmp_path, COSTS)
    served = auto.plan(parse_schedule("paper", 50), rows=2)
    files = sorted(tmp_path.glob("*.json"))
    auto.tune_on_demand = False  # what a serving runtime sets after its warm-up
    calls.clear()
    for spec in ("uniform:3", "uniform:7", "all", [0, 1, 2, 30]):
        d = auto.plan(parse_schedule(spec, 50), rows=2)
        assert d.label == served.label and d.steps_per_call == served.steps_per_call  # the nearest decision
    assert calls == [] and sorted(tmp_path.glob("*.json")) == files and len(auto._decisions) == 1
    # A fresh runner with no decision at all runs the first candidate that loads, measuring nothing.
    fresh, calls2 = make_auto(tmp_path / "other", COSTS)
    fresh.tune_on_demand = False
    assert fresh.plan(parse_schedule("all", 10), rows=2).label == "torch/fp32" and calls2 == []
    assert not (tmp_path / "other").exists()


def test_decision_caches_are_bounded(tmp_path):
    from test_tune import COSTS, make_auto

    from fd_trt.backends import auto as auto_mod
    from fd_trt.core.schedule import parse_schedule

    auto, _ = make_auto(tmp_path, COSTS)
    auto.max_decisions = 3
    for n in range(2, 8):
        auto.plan(parse_schedule(f"uniform:{n}", 50), rows=2)
        time.sleep(0.01)  # distinct modification times
    assert len(auto._decisions) == 3
    assert len(list(tmp_path.glob("*.json"))) == 6
    (tmp_path / "notes.json").write_text("{}")  # not a decision file: never pruned
    assert auto_mod.prune_decisions(tmp_path, keep=2) == 4
    assert len(list(tmp_path.glob("*.json"))) == 3 and (tmp_path / "notes.json").exists()
    assert auto_mod.MAX_DECISION_FILES >= 64 and auto_mod.MAX_DECISIONS_IN_MEMORY >= 8


@pytest.mark.slow
def test_an_auto_server_tunes_at_start_only(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path))
    pipe = FasterDiffusionPipeline.from_diffusers(tiny_sd, device="cpu", progress=False)
    assert pipe.backend == "auto"
    rt = ServingRuntime(pipe, max_batch=2, max_wait_ms=0, warmup=True)
    try:
        tuning = tmp_path / "tuning"
        before = sorted(p.name for p in tuning.glob("*.json"))
        assert before  # the served size was tuned at start-up
        for spec in ("uniform:2", "uniform:3", "all", [0, 1, 5]):
            rt(GenerateRequest(prompt="a red circle", seed=1, steps=10, schedule=spec), timeout=120)
        assert sorted(p.name for p in tuning.glob("*.json")) == before
    finally:
        rt.shutdown()


# hardened edges -------------------------------------------------------------------------------------
def test_a_foreign_host_header_gets_400(plain, pipe):
    for host in ("rebind.attacker.example", "127.0.0.1.attacker.example", "", "localhost.evil"):
        r = httpx.post(plain.url + "/v1/generate", json=BODY, headers={"Host": host})
        assert r.status_code == 400 and "--allowed-hosts" in r.json()["detail"], host
    for host in (f"127.0.0.1:{plain.port}", "localhost", f"[::1]:{plain.port}", "LOCALHOST."):
        assert httpx.get(plain.url + "/healthz", headers={"Host": host}).status_code == 200, host
    rt = runtime(pipe)
    with ThreadedServer(create_app(runtime=rt, allowed_hosts=["*.example.org"])) as s:
        assert httpx.get(s.url + "/healthz", headers={"Host": "fd.example.org"}).status_code == 200
        assert httpx.get(s.url + "/healthz", headers={"Host": "example.com"}).status_code == 400
    rt.shutdown()
    parser = argparse.ArgumentParser()
    serve_options.add_serve_options(parser)
    assert serve_options.allowed_hosts(parser.parse_args([])) == ["localhost", "127.0.0.1", "::1"]
    assert "10.1.2.3" in serve_options.allowed_hosts(parser.parse_args(["--host", "10.1.2.3"]))
    assert serve_options.allowed_hosts(parser.parse_args(["--host", "0.0.0.0"])) == ["localhost", "127.0.0.1", "::1"]


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_json_routes_require_the_json_content_type(plain, ctype):
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(plain.url + "/v1/generate", content=json.dumps(BODY).encode(), headers=headers)
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    ok = httpx.post(
        plain.url + "/v1/generate",
        content=json.dumps(BODY).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
        timeout=120,
    )
    assert ok.status_code == 200


def test_cors_is_off_unless_origins_are_allowed(plain, pipe):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(plain.url + "/v1/generate", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(plain.url + "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    rt = runtime(pipe)
    app = create_app(runtime=rt, api_keys=KEYS, allowed_origins=["https://ui.example"])
    with ThreadedServer(app) as s:
        ok = {
            "Origin": "https://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        r = httpx.options(s.url + "/v1/generate", headers=ok)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
        r = httpx.options(s.url + "/v1/generate", headers=pre)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    rt.shutdown()


def test_4xx_name_no_server_path(pipe, tmp_path):
    rt = runtime(pipe)
    with ThreadedServer(create_app(runtime=rt)) as s:
        for schedule in ("calibrated", "/etc/passwd.json", "../../x.json"):
            r = httpx.post(s.url + "/v1/generate", json=BODY | {"schedule": schedule}, timeout=60)
            assert r.status_code == 422, r.text
            text = r.text
            for secret in (str(Path.home()), "/tmp", "fd_trt/", str(Path.cwd()), "/etc"):
                assert secret not in text, (schedule, text)
    rt.shutdown()
    assert serve_http.redact_paths("no file /srv/models/x/cal.json: run it") == "no file <path>: run it"


class Broken:
    """A pipeline whose every call fails with an error whose message names server paths."""

    def __init__(self, pipe: FasterDiffusionPipeline) -> None:
        self.pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        raise FdTrtError("engine /srv/engines/secret/decoder.plan is corrupt: fd-trt build --out /srv/engines/secret")


def test_5xx_carry_a_request_id_and_the_details_go_to_the_log(pipe, caplog):
    rt = ServingRuntime(Broken(pipe), max_batch=1, warmup=False)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR), ThreadedServer(create_app(runtime=rt)) as s:
        r = httpx.post(s.url + "/v1/generate", json=BODY, timeout=60)
    rt.shutdown()
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert rid in r.json()["detail"] and "/srv" not in r.text and "fd-trt build" not in r.text
    assert any(rid in rec.getMessage() and "/srv/engines/secret" in rec.getMessage() for rec in caplog.records)


def test_the_replica_header_shows_neither_host_nor_pid():
    import inspect

    source = inspect.getsource(serve_ray.deployment)
    assert "gethostname" not in source and "getpid" not in source and "token_hex" in source


# Ray ------------------------------------------------------------------------------------------------
def test_ray_has_a_queue_limit_a_request_timeout_and_the_same_key():
    pytest.importorskip("ray")
    d = serve_ray.deployment(num_gpus=0, max_queued_requests=7)
    assert d.max_queued_requests == 7
    assert serve_ray.deployment(num_gpus=0).max_queued_requests == serve_options.DEFAULT_LIMIT_CONCURRENCY
    args = serve_ray.build_parser().parse_args(["--allowed-hosts", "fd.example.org", "--docs"])
    kw = serve_ray.app_kwargs(args, {serve_options.API_KEY_ENV: "ray-key-1"})
    assert kw["api_key_sha256"] == [serve_options.key_digest("ray-key-1")]
    assert "ray-key-1" not in json.dumps({k: v for k, v in kw.items() if k != "limits"}, default=str)
    assert kw["allowed_hosts"] == ["fd.example.org"] and kw["docs"] is True
    assert serve_ray.request_timeout_s(args) == 120 + serve_ray.REQUEST_TIMEOUT_MARGIN_S


def test_ray_refuses_tls_flags_with_a_clear_message(capsys):
    assert serve_ray.main(["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"]) == 2
    assert "TLS-terminating" in capsys.readouterr().err


# engine directories as untrusted input ----------------------------------------------------------------
def manifest_dict(tmp_path: Path) -> dict[str, Any]:
    from fd_trt.graphs.manifest import FORMAT_VERSION

    for name in ("encoder.onnx", "decoder.onnx"):
        (tmp_path / name).write_bytes(b"x")
    rec = {"file": "encoder.onnx", "sha256": "0" * 64, "bytes": 1}
    return {
        "format_version": FORMAT_VERSION,
        "model_source": "default",
        "unet_sha256": "0" * 64,
        "unet_config": {},
        "latent_shape": [4, 8, 8],
        "text_shape": [77, 32],
        "precision": "fp32",
        "opset": 17,
        "num_skips": 4,
        "encoder_rows": [1, 8],
        "decoder_rows": [1, 80],
        "versions": {},
        "graphs": {"encoder": rec, "decoder": rec | {"file": "decoder.onnx"}},
    }


def write_manifest(folder: Path, data: Any) -> None:
    (folder / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change",
    [
        {"graphs": []},
        {"graphs": {}},
        {"graphs": {"encoder": "encoder.onnx"}},
        {"plans": []},
        {"latent_shape": "4x8x8"},
        {"opset": "17"},
        {"versions": []},
        {"controlnets": {"x": 1}},
        {"graphs": {"encoder": {"file": "encoder.onnx"}}},
        "not an object",
    ],
)
def test_every_malformed_manifest_is_a_corrupt_directory_with_the_rebuild_command(tmp_path, change):
    from fd_trt.graphs.manifest import load_manifest

    data = manifest_dict(tmp_path)
    write_manifest(tmp_path, data | change if isinstance(change, dict) else change)
    with pytest.raises(CorruptGraphError, match=r"fd-trt build .*--out " + str(tmp_path)):
        load_manifest(tmp_path)


@pytest.mark.parametrize("name", ["/etc/x.plan", "../x.onnx", "a/../../x.onnx", "C:\\x.onnx", "..\\x.onnx", ""])
def test_manifest_names_stay_inside_the_directory(tmp_path, name):
    from fd_trt.graphs.manifest import load_manifest

    data = manifest_dict(tmp_path)
    data["graphs"]["decoder"]["file"] = name
    write_manifest(tmp_path, data)
    with pytest.raises(CorruptGraphError, match="fd-trt build"):
        load_manifest(tmp_path)


def test_a_symlink_out_of_the_directory_is_refused(tmp_path):
    from fd_trt.graphs.manifest import check_graph_files, load_manifest

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.onnx").write_bytes(b"x")
    engines = tmp_path / "engines"
    engines.mkdir()
    data = manifest_dict(engines)
    (engines / "link.onnx").symlink_to(outside / "secret.onnx")
    data["graphs"]["decoder"]["file"] = "link.onnx"
    write_manifest(engines, data)
    with pytest.raises(CorruptGraphError, match="outside the engine directory.*fd-trt build"):
        load_manifest(engines)
    data["graphs"]["decoder"]["file"] = "decoder.onnx"
    write_manifest(engines, data)
    assert check_graph_files(engines).graphs["decoder"].file == "decoder.onnx"  # a sound directory still loads


def test_plan_deletion_only_touches_plan_names_fd_trt_writes():
    from fd_trt.backends.tensorrt_build import RowProfile, is_plan_file_name, plan_file_name

    for role, graph in (("decoder", None), ("controlnet", "controlnet-0123456789abcdef.onnx")):
        written = plan_file_name(role, "10.13.0.35", (9, 0), RowProfile(1, 20, 30), graph_file=graph)
        assert is_plan_file_name(written), written
    for name in ("manifest.json", "../x.plan", "/etc/x.plan", "decoder.onnx", "sub/decoder.trt10.sm90.rows1-2-3.plan"):
        assert not is_plan_file_name(name), name


def test_tune_and_calibrate_write_through_the_atomic_helper(tmp_path, monkeypatch):
    from fd_trt.backends import auto as auto_mod
    from fd_trt.core import calibration as cal_mod
    from fd_trt.utils import files

    written = []

    def spy(path: Any, data: Any) -> None:
        written.append(Path(path).name)
        files.write_atomic(path, data)

    monkeypatch.setattr(auto_mod, "write_atomic", spy)
    monkeypatch.setattr(cal_mod, "write_atomic", spy)
    decision = auto_mod.Decision("torch", "fp32", {}, None, 0.1, [], {"k": 1})
    auto_mod.save_decision(decision, tmp_path)
    import dataclasses

    fields = {f.name: None for f in dataclasses.fields(cal_mod.Calibration) if f.default is dataclasses.MISSING}
    cal = cal_mod.Calibration(**fields)
    cal.save(tmp_path / "cal.json")
    assert len(written) == 2 and "cal.json" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temporary left behind
