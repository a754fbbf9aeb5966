"""Files that readers never see half-written, and folders that one writer at a time changes.

[`write_atomic()`][fd_trt.utils.files.write_atomic] is how fd_trt writes every file other processes may read while it is being
written (engine directory manifests, plans and timing caches, tuning decisions, calibrations):
a unique temporary name in the same folder, ``fsync``, then a rename. [`dir_lock()`][fd_trt.utils.files.dir_lock] is the
inter-process lock of a folder (an engine directory) whose files are read, changed and
rewritten together.

Temporaries are named ``.fdtmp-<pid>-<name>.<random>``: the process id lets a later writer tell
a dead process's leftovers ([`remove_stale_temporaries()`][fd_trt.utils.files.remove_stale_temporaries] deletes them) from a live one's work
in progress (left alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Every temporary file or folder fd_trt writes starts with this, then the writer's process id.
TEMP_PREFIX = ".fdtmp-"
#: After this many seconds waiting for a folder's lock, say who is waiting for what (then keep waiting).
LOCK_NOTICE_SECONDS = 2.0
_HASH_CHUNK = 16 << 20
_LOCKS: dict[str, Any] = {}
_LOCKS_GUARD = threading.Lock()


def temp_prefix(name: str = "") -> str:
    """The prefix of this process's temporaries: ``.fdtmp-<pid>-<name>.``.

    Args:
        name: the final file's name, for people reading a folder listing.

    Returns:
        The prefix, for `tempfile`'s ``prefix``.
    """
    return f"{TEMP_PREFIX}{os.getpid()}-{name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Deletes the temporaries that dead processes left in a folder (a writer killed mid-write).

    Only entries named ``.fdtmp-<pid>-...`` whose process no longer exists are removed; a live
    process's temporaries (its write in progress), this process's own and anything else are kept.

    Args:
        folder: the folder.

    Returns:
        The removed paths.
    """
    removed = []
    for p in Path(folder).glob(f"{TEMP_PREFIX}*"):
        pid = p.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        logger.info("removed %d temporaries of dead processes in %s", len(removed), folder)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Writes a file under a unique temporary name in the same folder, then renames it into place.

    A reader (another process included) sees the old file or the whole new one, never a partial
    one; two writers never share a temporary, and the last rename wins. The temporary is removed
    when the write fails. The file gets the permissions ``open(path, "w")`` would give it (the
    umask's), not `tempfile.mkstemp()`'s owner-only ones.

    Args:
        path: the final file; its folder must exist.
        data: text (written as UTF-8), bytes, or any buffer (``memoryview``, TensorRT's ``IHostMemory``).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in chunks.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _lock_of(lock_path: Path) -> Any:
    """One ``FileLock`` object per lock file and process.

    Two ``FileLock`` objects on one file in one process would each take an OS lock on their own
    descriptor and block each other; one shared object is reentrant within a thread (a build
    nested inside a runner's activation) and still excludes other threads.
    """
    from filelock import FileLock

    key = os.path.join(os.path.realpath(lock_path.parent), lock_path.name)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = FileLock(str(lock_path))
        return lock


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike[str], what: str = "write", lock_file: str = ".lock") -> Iterator[None]:
    """Holds a folder's lock (the file ``<folder>/<lock_file>``), across processes and threads.

    The lock is an OS file lock (``flock``), which the kernel drops when its holder dies, so a
    killed writer never leaves a lock that blocks the next one; the lock file itself stays,
    harmlessly. Reentrant within a thread. After `LOCK_NOTICE_SECONDS` of waiting it logs
    who waits for what, then keeps waiting.

    Args:
        folder: the folder; created when missing.
        what: what the caller is about to do, for the waiting message.
        lock_file: the lock file's name inside ``folder``.

    Yields:
        Nothing; the lock is held inside the ``with`` block.
    """
    from filelock import Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _lock_of(folder / lock_file)
    try:
        lock.acquire(timeout=LOCK_NOTICE_SECONDS)
    except Timeout:
        logger.warning(
            "waiting for another process (or thread) that holds %s to finish before the %s of %s",
            folder / lock_file,
            what,
            folder,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


__all__ = [
    "LOCK_NOTICE_SECONDS",
    "TEMP_PREFIX",
    "dir_lock",
    "file_sha256",
    "remove_stale_temporaries",
    "temp_prefix",
    "write_atomic",
]
