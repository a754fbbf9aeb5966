"""fd_trt.utils.files: atomic writes under failure and under concurrent writers, and the folder lock."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fd_trt.utils.files import TEMP_PREFIX, dir_lock, file_sha256, temp_prefix, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SIZE = 1 << 20  # large enough that a torn write would show as a mix of two payloads


def _payload(tag: int) -> bytes:
    return bytes([tag]) * SIZE


def _assert_whole(data: bytes, tags) -> None:
    assert len(data) == SIZE, f"torn file: {len(data)} bytes"
    assert data[0] in tags and data == _payload(data[0]), "torn file: a mix of two writers' bytes"


def test_write_atomic_writes_text_bytes_and_buffers(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, '{"a": "é"}')
    assert path.read_text(encoding="utf-8") == '{"a": "é"}'
    write_atomic(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    write_atomic(path, memoryview(b"view"))
    assert path.read_bytes() == b"view"
    assert os.listdir(tmp_path) == ["f.json"]
    assert file_sha256(path) == hashlib.sha256(b"view").hexdigest()


def test_write_atomic_gives_the_umask_permissions_not_owner_only(tmp_path):
    path = tmp_path / "f"
    old = os.umask(0o022)
    try:
        write_atomic(path, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


class _Boom(Exception):
    pass


def test_write_atomic_leaves_no_temporary_and_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):  # not a buffer: the write itself fails
        write_atomic(path, object())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]

    def failing_replace(src, dst):
        raise _Boom("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(_Boom):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):  # BaseException too: Ctrl-C mid-write leaves nothing behind
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_two_threads_writing_one_file_never_leave_it_torn(tmp_path):
    path = tmp_path / "decision.json"
    write_atomic(path, _payload(0))
    errors: list[BaseException] = []

    def writer(tag: int) -> None:
        try:
            for _ in range(40):
                write_atomic(path, _payload(tag))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in (1, 2)]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        _assert_whole(path.read_bytes(), (0, 1, 2))
        reads += 1
    for t in threads:
        t.join()
    assert not errors, errors
    _assert_whole(path.read_bytes(), (1, 2))
    assert reads > 0
    assert os.listdir(tmp_path) == ["decision.json"]


def test_two_processes_writing_one_file_never_leave_it_torn(tmp_path):
    path = tmp_path / "calibration.json"
    write_atomic(path, _payload(0))
    code = (
        "import sys; from fd_trt.utils.files import write_atomic\n"
        f"data = bytes([int(sys.argv[1])]) * {SIZE}\n"
        "for _ in range(40):\n"
        "    write_atomic(sys.argv[2], data)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tag), str(path)], env=env, stderr=subprocess.PIPE, text=True)
        for tag in (1, 2)
    ]
    while any(p.poll() is None for p in procs):
        _assert_whole(path.read_bytes(), (0, 1, 2))
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    _assert_whole(path.read_bytes(), (1, 2))
    assert os.listdir(tmp_path) == ["calibration.json"]


def test_temporaries_carry_the_process_id(tmp_path):
    assert temp_prefix("x.plan") == f"{TEMP_PREFIX}{os.getpid()}-x.plan."


def test_dir_lock_excludes_other_threads_per_lock_file(tmp_path):
    order: list[str] = []
    with dir_lock(tmp_path / "d", "test", ".a.lock"):
        with dir_lock(tmp_path / "d", "test", ".b.lock"):  # another lock file in the same folder is another lock
            order.append("both")

        def other() -> None:
            with dir_lock(tmp_path / "d", "test", ".a.lock"):
                order.append("other")

        th = threading.Thread(target=other)
        th.start()
        th.join(0.3)
        assert th.is_alive() and order == ["both"]
        order.append("released")
    th.join(10)
    assert order == ["both", "released", "other"]
    assert {p.name for p in (tmp_path / "d").iterdir()} == {".a.lock", ".b.lock"}
