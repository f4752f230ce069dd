"""Operating-system faults on the output side, met for real: a read-only mount, a full disk
(small tmpfs), a path that is a file, a name too long, no permission, and an unexpected
failure inside a shard. Each ends in one line and exit 2, with no partial file under a final
name; after a full disk is freed, the same command resumes to the same bytes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

import star_dist
from star_dist.errors import InputError, MergeError, OutputError

from .conftest import BIN, folder_bytes, run_cli, snapshot


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root and mount(8)")


class Tmpfs:
    """A small tmpfs mounted for one test: the real ENOSPC and EROFS of a real file system."""

    def __init__(self, path: Path, size: str, read_only: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        command = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")

    def remount(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def mounts() -> Iterator[list[Tmpfs]]:
    made: list[Tmpfs] = []
    yield made
    for fs in reversed(made):
        fs.unmount()


def _merge(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("merge", str(config), str(out), "--runtime", "local", "--max-shard-size", "60kB", "-q", *extra)


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _no_partial_file(out: Path) -> None:
    """Nothing half-written under a final name: no *.tmp left, every shard opens whole."""
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                fh.get_tensor(name)
    for small in [*out.glob("*.json"), *(out / ".star_dist").rglob("*.json")]:
        json.loads(small.read_text())


@pytest.fixture(scope="module")
def reference(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="local", quiet=True, max_shard_size="60kB")
    return _weights_and_index(out)


def _weights_and_index(out: Path) -> dict[str, bytes]:
    """What must be byte-identical (merge_report.json holds timings)."""
    small = {**folder_bytes(out, "model.safetensors.index.json"), **folder_bytes(out, "config.json")}
    return {**folder_bytes(out), **small}


@needs_mount
def test_full_disk_mid_merge_is_one_line_and_the_rerun_resumes_to_the_same_bytes(
    tiny_fp32: Path, tmp_path: Path, mounts: list[Tmpfs], reference: dict[str, bytes]
) -> None:
    disk = Tmpfs(tmp_path / "disk", "200k")  # the merge writes ~450 kB
    mounts.append(disk)
    out = disk.path / "out"
    line = _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", out), "no space left on the device", "rerun")
    assert str(out) in line
    done = list((out / ".star_dist" / "shards").glob("*.json"))
    assert done, "the disk filled before any shard: this test wants it mid-merge"
    assert not (out / "model.safetensors.index.json").exists()
    _no_partial_file(out)

    disk.remount("4m")
    result = _merge(tiny_fp32 / "merge.yaml", out)
    assert result.returncode == 0, result.stderr
    assert _weights_and_index(out) == reference
    assert not (out / ".star_dist.lock").exists()


@needs_mount
def test_full_disk_before_anything_leaves_no_folder_behind(
    tiny_fp32: Path, tmp_path: Path, mounts: list[Tmpfs]
) -> None:
    disk = Tmpfs(tmp_path / "disk", "64k")
    mounts.append(disk)
    filler = disk.path / "filler"
    with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError):
        while True:
            fh.write(b"\0" * 4096)
    out = disk.path / "out"
    _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", out), "no space left on the device")
    assert not out.exists()
    filler.unlink()
    disk.remount("4m")
    assert _merge(tiny_fp32 / "merge.yaml", out).returncode == 0


@needs_mount
def test_read_only_output_and_output_under_a_read_only_mount(
    tiny_fp32: Path, tmp_path: Path, mounts: list[Tmpfs]
) -> None:
    ro = Tmpfs(tmp_path / "ro", "1m", read_only=True)
    mounts.append(ro)
    for out in (ro.path, ro.path / "nested" / "out"):
        line = _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", out), "read-only file system", "writable")
        assert str(ro.path) in line
    assert list(ro.path.iterdir()) == []


def test_output_path_that_is_a_file_or_under_a_file(tiny_fp32: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", a_file), str(a_file), "not a folder")
    _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", a_file / "out"), str(a_file))
    assert a_file.read_text() == "not a folder"


def test_output_name_too_long(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / ("x" * 300)
    _one_line_exit_2(_merge(tiny_fp32 / "merge.yaml", out), "file name too long", "shorter path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_no_permission_on_the_output_folder(tiny_fp32: Path) -> None:
    """Run as `nobody` into a folder only root may write: one line, nothing written."""
    shared = Path(tempfile.mkdtemp(prefix="star_dist_perm_"))
    try:
        os.chmod(shared, 0o755)
        models = shared / "models"
        shutil.copytree(tiny_fp32, models)
        for path in [models, *models.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        out = shared / "out"
        out.mkdir(mode=0o755)
        setpriv = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
        probe = subprocess.run([*setpriv, str(BIN / "python"), "-c", "import star_dist"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("user nobody cannot run this venv's python")
        cmd = [*setpriv, str(BIN / "star-dist"), "merge", str(models / "merge.yaml"), str(out), "--runtime", "local",
               "-q"]
        env = {**os.environ, "HOME": str(shared)}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=shared)
        _one_line_exit_2(result, str(out), "permission denied")
        assert list(out.iterdir()) == []
        hidden = sorted((models / "ft1").glob("*.safetensors"))[0]
        os.chmod(hidden, 0o600)  # an input nobody may read: named, one line
        cmd[-4] = str(shared / "out2")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=shared)
        _one_line_exit_2(result, str(hidden), "cannot read", "ermission denied")
        assert not (shared / "out2").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_unexpected_failure_in_a_local_shard_names_the_shard(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a StarDistError (a bug, a library failure): still one error naming the shard."""
    from star_dist import merge_tensor

    def broken(*args, **kwargs):
        raise RuntimeError("simulated library failure")

    monkeypatch.setattr(merge_tensor.TensorMerger, "merge_into", broken)
    with pytest.raises(MergeError, match=r"shard model-00001-of-\d{5}\.safetensors: merge failed: RuntimeError"):
        star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "out", runtime="local", quiet=True,
                        max_shard_size="60kB")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("code", "words"), [
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EIO, "input/output error from the device"),  # a failing disk
    (errno.ESTALE, "stale network file handle); remount the shared file system"),  # an NFS server restarted
])
def test_an_os_error_in_a_local_shard_is_an_output_error_naming_the_shard(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """An OSError without a path (a write on an open file) is put on the shard being written.
    No loopback file system returns EIO or ESTALE, so the write itself is made to fail."""
    from star_dist import safetensors_format

    def failing(self, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors_format.StreamingShardWriter, "_put", failing)
    expected = r"out/model\.safetensors: cannot write shard model\.safetensors \(" + re.escape(words)
    with pytest.raises(OutputError, match=expected) as info:
        star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "out", runtime="local", quiet=True)
    assert "\n" not in str(info.value)
    _no_partial_file(tmp_path / "out")


def test_an_input_cut_short_mid_merge_is_one_line_not_sigbus(
    tiny_fp32: Path, tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tune rewritten in place while the merge has it mapped (a download resuming over
    it): reading its lost pages would kill the process with SIGBUS. One line naming the file
    and the tensor instead; once the file is whole again the same command resumes. One shard,
    so the file is cut while the shard's reader has it mapped."""
    from star_dist import merge_tensor

    victim = sorted(p for p in tiny_copy.rglob("*.safetensors") if "base" not in str(p))[0]
    whole = victim.read_bytes()
    real_merge = merge_tensor.TensorMerger.merge_into
    calls = []

    def cut_after_first(self, job, writer):
        calls.append(job.name)
        if len(calls) == 2:
            with open(victim, "r+b") as fh:
                fh.truncate(16)  # the length prefix and a little: every tensor's bytes are gone
        return real_merge(self, job, writer)

    monkeypatch.setattr(merge_tensor.TensorMerger, "merge_into", cut_after_first)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        star_dist.merge(tiny_copy / "merge.yaml", out, runtime="local", quiet=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{victim}: tensor '") and "cut short" in message, message
    assert "now has 16" in message
    _no_partial_file(out)
    monkeypatch.undo()
    victim.write_bytes(whole)
    star_dist.merge(tiny_copy / "merge.yaml", out, runtime="local", quiet=True)
    star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "reference", runtime="local", quiet=True)
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")


@needs_mount
@pytest.mark.ray
def test_a_full_disk_in_a_ray_worker_is_the_same_one_line(
    ray_cluster, tiny_fp32: Path, tmp_path: Path, mounts: list[Tmpfs], reference: dict[str, bytes]
) -> None:
    """The worker's OSError comes back through Ray as the line the local runtime gives."""
    disk = Tmpfs(tmp_path / "disk", "200k")
    mounts.append(disk)
    out = disk.path / "out"
    with pytest.raises(OutputError) as info:
        star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="ray", workers=1, quiet=True, max_shard_size="60kB")
    message = str(info.value)
    assert "\n" not in message and "cannot write shard model-" in message and "no space left" in message
    _no_partial_file(out)
    disk.remount("4m")
    star_dist.merge(tiny_fp32 / "merge.yaml", out, runtime="ray", workers=1, quiet=True, max_shard_size="60kB")
    assert _weights_and_index(out) == reference


def test_inputs_changed_since_an_interrupted_run_are_named(tiny_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    star_dist.merge(tiny_copy / "merge.yaml", out, runtime="local", quiet=True, max_shard_size="60kB")
    (out / "model.safetensors.index.json").unlink()  # as a run killed before its index
    before = snapshot(out)
    edited = sorted((tiny_copy / "ft1").glob("*.safetensors"))[0]
    os.utime(edited)  # touched: the plan changes
    line = _one_line_exit_2(_merge(tiny_copy / "merge.yaml", out), "cannot resume", f"input {edited}", "changed")
    assert "--overwrite" in line
    assert snapshot(out) == before
