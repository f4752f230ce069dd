"""One run per output folder: an exclusive lock file, held by the driver for the whole run.

Two merges into one folder would delete and rename each other's `*.tmp` shards. The lock is
`<out>/.star_dist.lock`, created atomically (O_EXCL), holding who took it (host, pid, start
time) so a refusal can name the holder, and `flock`ed where the file system supports it, so
the kernel releases it the moment its process dies. A lock whose holder is gone (no flock
held; or, where flock is unsupported, a dead pid on this host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .errors import OutputError
from .files import output_os_error

LOCK_FILE = ".star_dist.lock"
_FRESH_S = 5.0  # a lock file younger than this with no content yet is being written, not stale


class OutputLock:
    """`with OutputLock(out_dir):` the caller is the only star_dist run writing `out_dir`.

    Creates `out_dir` (and its parents) when missing; `created_folder` says whether it did.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / LOCK_FILE
        self.created_folder = False
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise OutputError(f"{self.out_dir}: exists and is not a folder; choose another output path")
            self.created_folder = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # a stale lock is removed, then taken: at most a few rounds
                if self._try_create():
                    return self
                self._remove_if_stale()
        except OSError as exc:
            self._release()
            raise output_os_error(exc, "lock the output folder", self.path) from None
        raise OutputError(f"{self.path}: could not take the output folder's lock; rerun the command")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        self._fd = fd
        _flock_own(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        return True

    def _remove_if_stale(self) -> None:
        """Take over a dead run's lock; refuse, naming the holder, while it lives."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = _read_holder(fd)
            if not self._holder_is_gone(fd, holder):
                raise OutputError(_busy_message(self.out_dir, self.path, holder))
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:  # still the file we judged
                    os.unlink(self.path)
        finally:
            os.close(fd)

    def _holder_is_gone(self, fd: int, holder: dict[str, object]) -> bool:
        locked = _flock(fd)
        if locked is True:  # nobody holds the flock: its process is gone
            return bool(holder) or time.time() - os.fstat(fd).st_mtime > _FRESH_S
        if locked is False:
            return False
        # No flock on this file system: trust a pid only on this host.
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        return not _pid_alive(int(holder["pid"]))

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if this run left it empty


def _flock(fd: int) -> bool | None:
    """Try an exclusive, non-blocking flock: True taken, False held by another, None unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _flock_own(fd: int, wait_s: float = 2.0) -> None:
    """Flock our new lock file. Another run judging it may hold the flock for a moment (it
    then refuses, seeing no holder yet); wait that out, or a third run could later take the
    file's free flock for a dead holder's."""
    deadline = time.monotonic() + wait_s
    while _flock(fd) is False and time.monotonic() < deadline:
        time.sleep(0.01)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy_message(out_dir: Path, path: Path, holder: dict[str, object]) -> str:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        if holder else "a run that is starting now"
    )
    return (
        f"{out_dir}: another star-dist run is writing this output folder ({who}); wait for it to finish, "
        f"or stop it; if it is gone for good, remove {path}"
    )
