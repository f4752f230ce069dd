"""Operating-system facts turned into star_dist's one-line errors.

Two jobs, shared by every reader and writer: refuse a path that is not a regular file before
opening it (opening a FIFO blocks forever; a folder or a device is never a checkpoint), and
word an `OSError` as what went wrong, on which path, and what to do about it.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError, OutputError, StarDistError

F = TypeVar("F", bound=Callable[..., Any])

# errno -> (what happened, the fix), for the failures a user can act on.
_OS_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space, then rerun the same command to resume"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, then rerun the same command to resume"),
    errno.EFBIG: ("file too large for this file system or limit", "choose an output folder on another file system"),
    errno.EROFS: ("read-only file system", "choose an output folder on a writable file system"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("is a folder where a file is needed", "remove or rename that folder"),
    errno.EEXIST: ("already exists and is in the way", "remove or rename it"),
    errno.EIO: ("input/output error from the device", "check the disk or mount, then rerun to resume"),
    errno.ENOENT: ("no such file or folder", "check the path; was it removed while the merge ran?"),
    errno.ESTALE: ("stale network file handle", "remount the shared file system, then rerun to resume"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the symbolic links on the path"),
}


def os_fault(exc: OSError, action: str, fallback_path: str | Path | None = None) -> tuple[str, str]:
    """(`path: cannot <action> (<what>)`, the fix) for an OSError, naming the path it hit.

    Args:
        exc: the OSError met.
        action: what was being done, in words ("write", "read an input of shard X").
        fallback_path: the path to name when the OSError names none; None: name no path.
    Returns:
        (the message, the fix), both one line.
    """
    path = exc.filename if exc.filename is not None else fallback_path
    what, fix = _OS_FAULTS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, "check the path and rerun"))
    where = f"{path}: " if path is not None else ""
    return f"{where}cannot {action} ({what})", fix


def output_os_error(exc: OSError, action: str, fallback_path: str | Path | None = None) -> OutputError:
    """An OSError met writing the output, as one line with the fix.

    Args:
        exc: the OSError met.
        action: what was being done, in words ("claim the output folder").
        fallback_path: the path to name when the OSError names none; None: name no path.
    Returns:
        The OutputError, for the caller to raise.
    """
    message, fix = os_fault(exc, action, fallback_path)
    return OutputError(f"{message}; {fix}")


def converts_os_errors(action: str) -> Callable[[F], F]:
    """Decorate a function that writes the output: an OSError it meets leaves as one
    OutputError line (`<path>: cannot <action> (<what>); <fix>`). The path is the one the
    OS named, else the function's first Path argument.

    Args:
        action: what the function does, in words ("claim the output folder").

    Returns:
        The decorator.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                fallback = next((a for a in [*args, *kwargs.values()] if isinstance(a, Path)), None)
                raise output_os_error(exc, action, fallback) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def input_os_error(exc: OSError, action: str = "read", fallback_path: str | Path | None = None) -> InputError:
    """An OSError met reading an input, as one line with the fix.

    Args:
        exc: the OSError met.
        action: what was being done, in words (default "read").
        fallback_path: the path to name when the OSError names none; None: name no path.
    Returns:
        The InputError, for the caller to raise.
    """
    message, fix = os_fault(exc, action, fallback_path)
    return InputError(f"{message}; {fix}")


def shard_os_error(exc: OSError, shard: str, out_dir: str | Path) -> StarDistError:
    """An OSError inside a shard's work: an output fault when it hit the output folder (or
    hit no named path: a write or fsync on an open file), else an input fault.

    Args:
        exc: the OSError met.
        shard: the shard's file name.
        out_dir: the output folder.
    Returns:
        An OutputError or an InputError, for the caller to raise.
    """
    path = exc.filename
    if path is None or _inside(Path(str(path)), Path(out_dir)):
        message, fix = os_fault(exc, f"write shard {shard}", Path(out_dir) / shard)
        return OutputError(f"{message}; {fix}")
    message, fix = os_fault(exc, f"read an input of shard {shard}")
    return InputError(f"{message}; {fix}")


def _inside(path: Path, folder: Path) -> bool:
    return os.path.abspath(path) == os.path.abspath(folder) or os.path.abspath(path).startswith(
        os.path.abspath(folder) + os.sep
    )


def require_regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """The path's stat, if it is a regular file (symlinks followed); InputError otherwise.

    Checked before any open(): a FIFO would block the reader forever, and a folder or a
    device where a checkpoint file should be is a mistake to name, not to read.

    Args:
        path: the file to check.
        what: what the file is, for the message ("adapter config", default "file").
    Returns:
        Its os.stat result.
    Raises:
        InputError: the path is missing, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise input_os_error(exc, "read", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; the {what} must be a plain file")
    return st


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder that holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
