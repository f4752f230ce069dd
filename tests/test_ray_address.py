"""Finding the cluster behind `--address auto`, and failing fast when there is none."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from star_dist.errors import ClusterError
from star_dist.runtime import ray_cluster
from star_dist.runtime.ray_cluster import check_reachable, resolve_address


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: nothing listens there


def test_auto_takes_the_first_recorded_cluster_that_answers(
    tmp_path: Path, listening_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}")  # a stale record
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray_cluster, "_running_gcs_addresses", lambda: [f"127.0.0.1:{listening_port}"])
    assert resolve_address("auto", 5) == f"127.0.0.1:{listening_port}"


def test_auto_refuses_to_pick_one_of_several_running_clusters(
    tmp_path: Path, listening_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `ray.init("auto")` refuses it: joining an arbitrary one of several would merge on a
    cluster the user did not mean. A live record of the last `ray start` decides."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    other = f"127.0.0.1:{_dead_port()}"
    monkeypatch.setattr(ray_cluster, "_recorded_clusters", lambda: [])
    monkeypatch.setattr(ray_cluster, "_running_gcs_addresses", lambda: [f"127.0.0.1:{listening_port}", other])
    with pytest.raises(ClusterError, match=rf"2 Ray clusters run here \(127\.0\.0\.1:{listening_port}, {other}\).*"
                                           r"pass --address HOST:PORT"):
        resolve_address("auto", 5)
    monkeypatch.setattr(ray_cluster, "_recorded_clusters", lambda: [f"127.0.0.1:{listening_port}"])
    assert resolve_address("auto", 5) == f"127.0.0.1:{listening_port}"


def test_auto_with_nothing_running_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray_cluster, "_recorded_clusters", lambda: [])
    monkeypatch.setattr(ray_cluster, "_running_gcs_addresses", lambda: [])
    with pytest.raises(ClusterError, match="no running Ray cluster found"):
        resolve_address("auto", 5)


def test_auto_prefers_ray_address(listening_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening_port}")
    assert resolve_address("auto", 5) == f"127.0.0.1:{listening_port}"


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "://", ""])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ClusterError, match="expected auto, host:port"):
        check_reachable(address, 1)


def test_a_dead_port_fails_within_the_timeout() -> None:
    with pytest.raises(ClusterError, match="not reachable after 1s"):
        check_reachable(f"127.0.0.1:{_dead_port()}", 1)
