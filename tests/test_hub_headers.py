"""Hub inputs planned from headers alone, against a hub on 127.0.0.1 (tests/fake_hub.py) that
the real huggingface_hub download code talks to: `plan` reads each weight file's header by
range requests and downloads no weight data; `merge` fetches each weight file once, when a
shard first reads it, and gives the bytes of the same merge from local folders; the plan's
identity is the same from header stubs as from a full cache. Ray workers get the same pinned
HubFiles as from a full cache (a stub path is only the driver's key), so test_hub_nodes.py's
nodes with their own caches cover them; the driver's stubs are never in a worker's storage check."""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import star_dist

from .conftest import folder_bytes, run_cli
from .fake_hub import FakeHub

REPOS = ("base", "ft0", "ft1", "ft2")


@pytest.fixture
def hub(tiny_fp32: Path) -> Iterator[FakeHub]:
    with FakeHub({f"org/{name}": tiny_fp32 / name for name in REPOS}) as served:
        yield served


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
            "STAR_DIST_CACHE": str(tmp_path / "star_dist_cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def _hub_config(tiny_fp32: Path, tmp_path: Path) -> Path:
    config = yaml.safe_load((tiny_fp32 / "merge.yaml").read_text())
    config["base_model"] = "org/base"
    config["models"] = [{**m, "model": f"org/{m['model']}"} for m in config["models"]]
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _header_bytes(folder: Path) -> int:
    return sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in folder.glob("*.safetensors"))


def _weight_files_in(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*.safetensors") if p.exists()] if cache.exists() else []


def _local_reference(tiny_fp32: Path, out: Path, **options: object) -> dict[str, bytes]:
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="local", quiet=True, **options)
    return folder_bytes(out)


def test_plan_reads_headers_only_merge_fetches_each_file_once_same_bytes_same_identity(
    hub: FakeHub, tiny_fp32: Path, tmp_path: Path
) -> None:
    env = _env(hub, tmp_path)
    config = _hub_config(tiny_fp32, tmp_path)
    result = run_cli("plan", str(config), "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    headers = sum(_header_bytes(tiny_fp32 / name) for name in REPOS)
    weights = sum(p.stat().st_size for name in REPOS for p in (tiny_fp32 / name).glob("*.safetensors"))
    assert hub.served_bytes() == headers < weights / 10, (hub.served_bytes(), headers, weights)
    assert _weight_files_in(tmp_path / "hf") == []  # the driver's HF cache holds no weight file
    assert plan["bytes_to_read"] == weights - headers  # planned from the stubs: every tensor, real sizes

    merged = run_cli("merge", str(config), str(tmp_path / "out"), "--runtime", "local", "-q", env=env)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert folder_bytes(tmp_path / "out") == _local_reference(tiny_fp32, tmp_path / "local")
    whole = Counter((s.repo, s.path) for s in hub.log
                    if s.method == "GET" and s.range is None and s.path.endswith(".safetensors"))
    expected = {(f"org/{name}", p.name) for name in REPOS for p in (tiny_fp32 / name).glob("*.safetensors")}
    assert set(whole) == expected and set(whole.values()) == {1}, whole  # each once, when a shard read it

    again = run_cli("plan", str(config), "--json", env=env)  # now every weight file is in the HF cache
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["fingerprint"] == plan["fingerprint"]


def test_a_hub_that_ignores_range_requests_is_one_line(tiny_fp32: Path, tmp_path: Path) -> None:
    """A proxy that answers a range request with the whole file: refused, not misread."""
    with FakeHub({f"org/{name}": tiny_fp32 / name for name in REPOS}) as served:
        served.ignore_ranges = True
        result = run_cli("plan", str(_hub_config(tiny_fp32, tmp_path)), env=_env(served, tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "hf://org/base@" in lines[0] and "range requests" in lines[0], lines[0]
