"""Getting onto a Ray cluster: an embedded loopback one, or joining one by address.

Joining fails fast with one clear line when nothing answers (Ray itself would retry for
minutes); the embedded cluster keeps every port on 127.0.0.1 (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from ..config import RunOptions
from ..errors import ClusterError

# Keeps a local cluster's every port on 127.0.0.1 (DESIGN §5); must be set before Ray starts.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def ray_session(options: RunOptions) -> Iterator[bool]:
    """Connect to `options.address`, or start an embedded loopback cluster; yields whether
    the cluster is embedded (so its resources are all there will ever be, and it is
    stopped on exit)."""
    import ray

    if ray.is_initialized():  # a caller (a notebook, a test session) already connected
        yield False
        return
    for key, value in LOOPBACK_ENV.items():
        os.environ[key] = value
    embedded = options.address is None
    try:
        if embedded:
            os.environ.pop("RAY_ADDRESS", None)
            ray.init(
                address="local",  # a new cluster, never one a `ray start` left running here
                include_dashboard=False,  # Ray sizes it: cores, or the container's CPU quota
                log_to_driver=not options.quiet,
                logging_level="ERROR",
                configure_logging=True,
            )
        else:
            address = resolve_address(options.address, options.connect_timeout_s)
            ray.init(address=address, log_to_driver=not options.quiet, logging_level="ERROR")
    except ClusterError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        where = "start a local Ray cluster" if embedded else f"connect to the Ray cluster at {options.address}"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ClusterError(f"could not {where}: {type(exc).__name__}: {detail}") from None
    try:
        yield embedded
    finally:
        ray.shutdown()


def resolve_address(address: str, timeout_s: float) -> str:
    """The address to join, checked to answer within `timeout_s`.

    'auto' means RAY_ADDRESS, else Ray's record of the last `ray start` here (under
    $RAY_TMPDIR or /tmp) when that cluster answers, else the one running GCS process (which
    also finds a head started with `--temp-dir`), as `ray.init("auto")` looks. Several running
    clusters and no live record is refused, as Ray refuses it: joining an arbitrary one would
    run the merge on a cluster the user did not mean.

    Args:
        address: "auto", "host:port" or "ray://host:port".
        timeout_s: seconds to wait for the chosen cluster's port to accept a connection.
    Returns:
        The address to pass to `ray.init`, as found (RAY_ADDRESS's or the record's spelling).
    Raises:
        ClusterError: no cluster found, several and none recorded, or a malformed or unreachable address.
    """
    if address != "auto":
        check_reachable(address, timeout_s)
        return address
    if os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"], timeout_s)
        return os.environ["RAY_ADDRESS"]
    recorded, running = _recorded_clusters(), _running_gcs_addresses()
    for candidate in recorded:
        with contextlib.suppress(ClusterError):
            check_reachable(candidate, min(timeout_s, 2.0))
            return candidate
    running = [a for a in dict.fromkeys(running) if a not in recorded]  # the records did not answer
    if len(running) > 1:
        raise ClusterError(
            f"--address auto: {len(running)} Ray clusters run here ({', '.join(running)}) and none is "
            "recorded as the current one; pass --address HOST:PORT (or set RAY_ADDRESS) to choose"
        )
    candidates = running or list(dict.fromkeys(recorded))
    if not candidates:
        raise ClusterError(
            "--address auto: no running Ray cluster found (RAY_ADDRESS is unset, no `ray start` "
            "record exists and no Ray GCS process runs here); start one with `ray start --head` "
            "or drop --address"
        )
    check_reachable(candidates[0], timeout_s)  # the full timeout for a head still starting; else raises
    return candidates[0]


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise ClusterError unless the cluster's port accepts a connection within `timeout_s`: fail
    in seconds with one line, where `ray.init` would retry for minutes.

    Args:
        address: "host:port" or "ray://host:port"; without a port, 6379 (GCS) or 10001 (Ray client).
        timeout_s: seconds to keep retrying (every 0.5 s) before giving up.
    Raises:
        ClusterError: an address without a host or with a bad port, or no answer within `timeout_s`.
    """
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    except ValueError:  # a port that is not a number
        host, port = None, 0
    if not host:
        raise ClusterError(f"--address {address!r}: expected auto, host:port or ray://host:port")
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, timeout_s))):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ClusterError(
        f"Ray cluster at {host}:{port} is not reachable after {timeout_s:g}s ({last_error}); "
        "check the address, or that `ray start --head` is running"
    )


def _recorded_clusters() -> list[str]:
    """Ray's record of the last `ray start` here: `<temp dir>/ray/ray_current_cluster`."""
    found = []
    for root in dict.fromkeys([os.environ.get("RAY_TMPDIR"), "/tmp"]):
        if not root:
            continue
        with contextlib.suppress(OSError):
            text = (Path(root) / "ray" / "ray_current_cluster").read_text().strip()
            if text:
                found.append(text)
    return found


def _running_gcs_addresses() -> list[str]:
    """Addresses of the Ray GCS servers running on this machine (Ray's own process scan)."""
    try:
        from ray._private.services import find_gcs_addresses  # private: guard against its removal
    except ImportError:
        return []
    try:
        return sorted(find_gcs_addresses())
    except Exception:  # a process scan that fails is no reason to fail the run
        return []
