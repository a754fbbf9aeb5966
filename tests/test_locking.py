"""Engine directories under concurrent and interrupted builds (issue #13).

Several processes building one directory at once (Ray replicas warming one cache), a build
killed mid-export, truncated or corrupt files, and a lock left by a killed process. Workers
are separate processes (``tests/lock_worker.py``) with ``PYTHONPATH`` set to this checkout, so
the test runs the same in a clean clone. Results are checked against the torch split UNet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fd_trt.backends.onnxruntime import OrtRunner
from fd_trt.errors import EngineMismatchError
from fd_trt.graphs.build import build_engines
from fd_trt.graphs.export import CorruptGraphError
from fd_trt.graphs.manifest import LOCK_FILE, MANIFEST_FILE, check_engine_dir, engine_dir_lock, load_manifest
from fd_trt.graphs.split import split_unet
from fd_trt.utils.files import TEMP_PREFIX

from conftest import rel_l2

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "lock_worker.py"
LATENT = (8, 8)
TEXT = (16, 32)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_files(paths, procs, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(Path(p).exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, "workers did not get ready"
        time.sleep(0.05)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _assert_matches_torch_split(folder: Path, unet) -> None:
    """The directory's graphs, run by ONNX Runtime, against the torch split UNet (rel L2 < 1e-5)."""
    g = torch.Generator().manual_seed(5)
    sample, text = torch.randn(2, 4, *LATENT, generator=g), torch.randn(2, *TEXT, generator=g)
    t, steps = torch.tensor([900.0, 850.0]), torch.tensor([700.0, 300.0])
    split = split_unet(unet)
    with OrtRunner(folder) as runner, torch.no_grad():
        feats = runner.encode(sample, t, text)
        ref = split.run_encoder(sample, t, text)
        for a, b in zip(feats.tensors(), ref.tensors()):
            assert rel_l2(a, b) < 1e-5
        out = runner.decode(feats, steps, text)
        want = split.run_decoder(ref.repeat(2), steps.repeat_interleave(2), text.repeat(2, 1, 1))
        assert rel_l2(out, want) < 1e-5


@pytest.mark.slow
def test_two_processes_building_one_directory_export_once(tiny_sd, tmp_path):
    folder = tmp_path / "shared"
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [_start("export", str(folder), str(r), str(go)) for r in ready]
    _wait_files(ready, procs)
    t0 = time.perf_counter()
    go.write_text("go")
    results = [_result(p) for p in procs]
    wall = time.perf_counter() - t0
    built = [r for r in results if r["built"]]
    assert len(built) == 1, results  # without the lock both see no manifest and both export
    assert [r["reason"] for r in results if not r["built"]] == ["up to date"]
    print(
        f"concurrent build: {wall:.1f} s wall; exporter {built[0]['seconds']:.1f} s; "
        f"waiter {[r['seconds'] for r in results if not r['built']][0]:.1f} s"
    )
    assert not list(folder.glob(f"{TEMP_PREFIX}*"))  # no temporaries left behind
    check_engine_dir(folder, tiny_sd.unet, latent_size=LATENT, text_shape=TEXT, full_hash=True)
    _assert_matches_torch_split(folder, tiny_sd.unet)


@pytest.mark.slow
def test_a_build_killed_mid_export_is_never_loaded_and_is_rebuilt(tiny_sd, tmp_path):
    folder = tmp_path / "killed"
    build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False)
    go, ready = tmp_path / "go", tmp_path / "ready"
    proc = _start("export", str(folder), str(ready), str(go), "--force")
    _wait_files([ready], [proc])
    go.write_text("go")
    # Kill it once the new encoder graph is in place and the decoder is being written.
    deadline = time.monotonic() + 120
    while not (
        (folder / "encoder.onnx").exists()
        and list(folder.glob(f"{TEMP_PREFIX}{proc.pid}-*"))
        and not (folder / MANIFEST_FILE).exists()
    ):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(folder.glob(f"{TEMP_PREFIX}{proc.pid}-*")), "the killed build left its temporaries"
    # No manifest while the graphs were half-written: loading refuses with the rebuild command.
    with pytest.raises(EngineMismatchError, match=r"has no manifest\.json.*fd-trt build"):
        check_engine_dir(folder, tiny_sd.unet)
    with pytest.raises(EngineMismatchError, match=r"(manifest\.json|does not exist).*rebuild"):
        OrtRunner(folder).activate()
    # The next build is not blocked by the dead process's lock, rebuilds and removes its temporaries.
    t0 = time.perf_counter()
    res = build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False)
    assert res.built and res.reason == "no manifest" and time.perf_counter() - t0 < 120
    assert not list(folder.glob(f"{TEMP_PREFIX}*"))
    _assert_matches_torch_split(folder, tiny_sd.unet)


def test_a_lock_held_by_a_killed_process_does_not_deadlock(tmp_path):
    folder = tmp_path / "locked"
    ready = tmp_path / "ready"
    proc = _start("hold", str(folder), str(ready))
    _wait_files([ready], [proc])
    from filelock import FileLock, Timeout

    with pytest.raises(Timeout):  # the worker holds it
        FileLock(str(folder / LOCK_FILE)).acquire(timeout=0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (folder / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock with the process
    t0 = time.perf_counter()
    with engine_dir_lock(folder):
        pass
    assert time.perf_counter() - t0 < 5


def test_the_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path):
    import threading

    order = []
    with engine_dir_lock(tmp_path / "d"):
        with engine_dir_lock(tmp_path / "d"):  # nested, as build_plans inside a runner's activation
            order.append("nested")

        def other() -> None:
            with engine_dir_lock(tmp_path / "d"):
                order.append("other")

        th = threading.Thread(target=other)
        th.start()
        th.join(0.5)
        assert th.is_alive() and order == ["nested"]  # waits for this thread's release
        order.append("released")
    th.join(10)
    assert order == ["nested", "released", "other"]


@pytest.mark.slow
def test_a_corrupt_manifest_is_refused_then_rebuilt(tiny_sd, tmp_path):
    folder = tmp_path / "corrupt"
    build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False)
    manifest = folder / MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:100])  # a manifest cut short
    with pytest.raises(CorruptGraphError, match=r"manifest\.json is not valid JSON .*rebuild"):
        check_engine_dir(folder)
    res = build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False)
    assert res.built and res.reason.startswith("unusable")
    # A graph replaced by a truncated copy of the same name: refused by size, then rebuilt.
    graph = folder / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(CorruptGraphError, match=r"decoder graph file .* truncated or was replaced"):
        check_engine_dir(folder)
    res = build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False)
    assert res.built and "unusable" in res.reason
    assert load_manifest(folder).graphs["decoder"].bytes == graph.stat().st_size
    _assert_matches_torch_split(folder, tiny_sd.unet)


@pytest.mark.slow
def test_two_processes_building_plans_keep_both_records(tiny_sd, tmp_path):
    """build_plans reads, changes and rewrites the manifest under the lock: no lost update, one build per plan."""
    folder = tmp_path / "plans"
    build_engines(tiny_sd.unet, folder, latent_size=LATENT, text_shape=TEXT, progress=False, max_segment_steps=4)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [_start("plans", str(folder), str(r), str(go)) for r in ready]
    _wait_files(ready, procs)
    go.write_text("go")
    results = [_result(p)["built"] for p in procs]
    for role in ("encoder", "decoder"):
        assert sorted(r[role] for r in results) == [False, True], results
    plans = load_manifest(folder).plans
    assert sorted(p.role for p in plans.values()) == ["decoder", "encoder"]
    assert not list(folder.glob(f"{TEMP_PREFIX}*"))


def test_remove_graphs_leaves_a_live_process_temporaries(tmp_path):
    from fd_trt.graphs.export import remove_graphs

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / f"{TEMP_PREFIX}{sleeper.pid}-decoder.onnx.abc"
        dead_tmp = tmp_path / f"{TEMP_PREFIX}{dead.pid}-decoder.onnx.def"
        live_tmp.mkdir()
        dead_tmp.mkdir()
        (tmp_path / "encoder.onnx").write_bytes(b"x")
        remove_graphs(tmp_path)
        assert live_tmp.is_dir() and not dead_tmp.exists() and not (tmp_path / "encoder.onnx").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
