"""The shard loop's I/O: read-ahead and background writes change no byte, the fused streaming
path names a bad input as the plain one does, and inputs are mapped read-only, so a checkpoint
file larger than memory is read (and merged) with memory bounded by the tensors, not the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import star_dist
from star_dist.errors import DataError
from star_dist.safetensors_format import TensorReader, build_header, read_header
from star_dist.shard import merge_shard

from .conftest import folder_bytes


def _config(folder: Path, method: str, **params: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(folder / "base"),
        "models": [{"model": str(folder / f"ft{i}")} for i in range(3)],
        "parameters": params,
    }


@pytest.mark.parametrize("output_format", ["model", "adapter"])
def test_every_shard_merges_under_the_exact_float32_guard_of_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_format: str
) -> None:
    """Both shard loops (model and adapter) run their tensors inside `exact_float32_matmuls`
    for the device they compute on, so a GPU merge never runs float32 products in TF32."""
    import contextlib

    from star_dist import shard
    from star_dist.tiny_models import make_tiny_merge

    make_tiny_merge(tmp_path, n_models=2, dtype="float32", shards=1, lora=2)
    config = star_dist.load_config(tmp_path / "merge_lora.yaml").to_dict()
    plan = star_dist.plan({**config, "output_format": output_format}, tmp_path / "out")
    guarded: list[str] = []

    @contextlib.contextmanager
    def recording(device: torch.device):  # type: ignore[no-untyped-def]
        guarded.append(device.type)
        yield

    monkeypatch.setattr(shard, "exact_float32_matmuls", recording)
    (tmp_path / "out").mkdir()
    for job in plan.shards:
        merge_shard(plan.run, job)
    assert guarded == ["cpu"] * len(plan.shards)


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("star", {})])
def test_overlapped_shard_loop_writes_the_same_bytes_as_the_plain_one(
    tiny_bf16: Path, tmp_path: Path, method: str, params: dict
) -> None:
    outputs = {}
    for overlap in (True, False):
        out = tmp_path / f"overlap_{overlap}"
        plan = star_dist.plan(_config(tiny_bf16, method, **params), out, max_shard_size="40kB")
        assert len(plan.shards) > 2  # several shards, several tensors each
        out.mkdir()
        for shard in plan.shards:
            manifest = merge_shard(plan.run, shard, overlap=overlap)
            assert manifest["size"] == (out / shard.file_name).stat().st_size
        outputs[overlap] = folder_bytes(out)
    assert outputs[True] == outputs[False]


def _single_file_models(folder: Path, poison: tuple[str, str] | None = None) -> dict:
    """base + 2 fp32 fine-tunes of two tensors each; `poison` = (model, value) puts a bad value in one."""
    gen = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(70, 33, generator=gen), "b.weight": torch.randn(5000, generator=gen)}
    for name in ("base", "ft0", "ft1"):
        tensors = base
        if name != "base":
            tensors = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        if poison is not None and poison[0] == name:
            tensors = {k: v.clone() for k, v in tensors.items()}
            tensors["b.weight"][4321] = float(poison[1])
        (folder / name).mkdir(parents=True)
        save_file(tensors, str(folder / name / "model.safetensors"))
    return {"merge_method": "task_arithmetic", "base_model": str(folder / "base"),
            "models": [{"model": str(folder / "ft0"), "parameters": {"weight": 0.5}}, {"model": str(folder / "ft1")}]}


@pytest.mark.parametrize(("model", "value"), [("ft1", "nan"), ("base", "inf"), ("ft0", "-inf")])
def test_fused_path_names_the_input_that_holds_a_nan_or_inf(tmp_path: Path, model: str, value: str) -> None:
    config = _single_file_models(tmp_path / "models", poison=(model, value))
    expected = f"{tmp_path / 'models' / model / 'model.safetensors'}: tensor 'b.weight' contains NaN or Inf"
    with pytest.raises(DataError, match="^" + expected.replace(".", r"\.") + "; the input is corrupt$"):
        star_dist.merge(config, tmp_path / "out", quiet=True)


def test_fused_path_reports_an_overflow_of_the_output_dtype(tmp_path: Path) -> None:
    config = _single_file_models(tmp_path / "models")
    config["parameters"] = {"lambda": 1e7}  # |τ| ~ 0.1: far past F16's 65504
    config["dtype"] = "float16"
    with pytest.raises(DataError, match=r"^tensor 'a\.weight': the merged values overflow F16; use a wider out_dtype$"):
        star_dist.merge(config, tmp_path / "out", quiet=True)
    config["parameters"] = {"lambda": 3e38}  # float32 itself overflows: that message comes first
    config["models"][1]["parameters"] = {"weight": 100.0}
    with pytest.raises(DataError, match=r"^tensor 'a\.weight': the merged result has NaN or Inf"):
        star_dist.merge(config, tmp_path / "out2", quiet=True)


def test_a_tensor_read_outlives_its_reader(tmp_path: Path) -> None:
    """Closing a reader must not unmap what a tensor still views (a traceback can hold one)."""
    _single_file_models(tmp_path / "models")
    entry = read_header(tmp_path / "models" / "base" / "model.safetensors")[0]["b.weight"]
    with TensorReader() as reader:
        view = reader.read(entry)
    assert view.shape == (5000,) and bool(torch.isfinite(view).all())


def test_fused_task_arithmetic_equals_the_formula(tmp_path: Path) -> None:
    config = _single_file_models(tmp_path / "models")
    star_dist.merge(config, tmp_path / "out", quiet=True)
    base, ft0, ft1 = (load_file(str(tmp_path / "models" / n / "model.safetensors")) for n in ("base", "ft0", "ft1"))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, value in base.items():
        expected = value + (0.5 * (ft0[name] - value) + (ft1[name] - value))
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6)


def _sparse_checkpoint(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """A real safetensors header followed by a hole for the data: no disk used. Returns its size."""
    header, sizes = build_header(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + sum(sizes))
    return len(header) + sum(sizes)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_file_larger_than_ram_reads_a_row_block_with_bounded_memory(tmp_path: Path) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cols = 1 << 16
    rows = (ram * 5 // 4) // (2 * cols) + 1  # a BF16 matrix of 1.25× this machine's memory
    path = tmp_path / "huge" / "model.safetensors"
    size = _sparse_checkpoint(path, [("embed.weight", "BF16", (rows, cols))])
    assert size > ram and os.stat(path).st_blocks * 512 < 1 << 20  # sparse: nothing on disk
    entry = read_header(path)[0]["embed.weight"]
    before = _rss_anon()
    with TensorReader() as reader:
        block = reader.read(entry, rows=(rows - 2, rows))  # the last 2 rows, past the end of RAM
        assert block.shape == (2, cols) and not bool(block.any())
        copy = block.float()  # what the merge does with a block: a private copy
    assert copy.shape == (2, cols)
    assert _rss_anon() - before < 64 << 20


CHILD = """
import json, mmap, resource, sys
import torch, star_dist
config, out, file, headroom = json.loads(sys.argv[1])
used = int(next(l for l in open("/proc/self/status") if l.startswith("VmData:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (used + headroom, resource.RLIM_INFINITY))
try:  # a private writable map of the input counts against the limit: the old reader failed here
    with open(file, "rb") as fh:
        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    print("copy-on-write map allowed")
except OSError:
    print("copy-on-write map refused")
star_dist.merge(config, out, quiet=True, max_shard_size="64MB")
print("merged")
"""


def test_a_checkpoint_file_larger_than_the_memory_limit_merges(tmp_path: Path) -> None:
    headroom = 160 << 20  # what the merging process may allocate beyond its imports
    names = [(f"layer{i}.weight", "F32", (2048, 1024)) for i in range(24)]  # 24 × 8 MiB = 192 MiB
    for model in ("base", "ft0"):
        size = _sparse_checkpoint(tmp_path / model / "model.safetensors", names)
    assert size > headroom
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "ft0")}]}
    args = json.dumps([config, str(tmp_path / "out"), str(tmp_path / "base" / "model.safetensors"), headroom])
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["copy-on-write", "map", "refused", "merged"], result.stdout
    merged = read_header(next((tmp_path / "out").glob("*.safetensors")))[0]
    assert set(merged) <= {name for name, _, _ in names}


PEAK_CHILD = """
import json, sys, threading, time
from pathlib import Path
import star_dist, star_dist.run, star_dist.runtime.local

def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

config, out = json.loads(sys.argv[1])
star_dist.plan(config, out)  # imports and first allocations out of the baseline
baseline, peak, done = anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

thread = threading.Thread(target=sample)
thread.start()
star_dist.merge(config, out, runtime="local", quiet=True, threads_per_worker=1)
done.set()
thread.join()
print(peak[0] - baseline)
"""


def test_task_arithmetic_never_holds_a_whole_output_tensor(tmp_path: Path) -> None:
    """The fused sum goes to the writer in 4 MiB pieces: a 128 MiB output tensor costs the
    merging process a few MiB, not the tensor (the whole-tensor path held 128-256 MiB)."""
    names = [("embed.weight", "F32", (4096, 8192))]  # 128 MiB per file, sparse (reads as zeros)
    for model in ("base", "ft0", "ft1"):
        _sparse_checkpoint(tmp_path / model / "model.safetensors", names)
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "ft0")}, {"model": str(tmp_path / "ft1")}]}
    args = json.dumps([config, str(tmp_path / "out")])
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run([sys.executable, "-c", PEAK_CHILD, args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 48 << 20, result.stdout
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 128 << 20
