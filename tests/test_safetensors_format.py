"""Our header reader and streaming writer against the safetensors library, and bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from star_dist.errors import InputError
from star_dist.safetensors_format import StreamingShardWriter, TensorReader, read_header, sha256_file


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(5, 7),
        "b": torch.randn(3).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.tensor(True),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    entries, meta = read_header(path)
    assert set(entries) == set(tensors)
    assert entries["a"].shape == (5, 7) and entries["b"].dtype == "BF16" and not entries["c"].is_float
    with TensorReader() as reader:
        for name, value in tensors.items():
            assert torch.equal(reader.read(entries[name]), value), name
        assert torch.equal(reader.read(entries["a"], rows=(1, 4)), tensors["a"][1:4])


def test_streaming_writer_output_loads_with_safetensors(tmp_path: Path) -> None:
    values = {"w": torch.randn(4, 3).to(torch.bfloat16), "n": torch.randn(4), "ids": torch.arange(4)}
    layout = [("w", "BF16", (4, 3)), ("n", "F32", (4,)), ("ids", "I64", (4,))]
    writer = StreamingShardWriter(tmp_path / "s.safetensors", layout)
    assert writer.tmp_path.exists() and not (tmp_path / "s.safetensors").exists()
    for name, _, _ in layout:
        writer.write(name, values[name])
    size, digest = writer.commit()
    final = tmp_path / "s.safetensors"
    assert not writer.tmp_path.exists() and final.stat().st_size == size
    assert digest == sha256_file(final)
    with safe_open(str(final), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        for name in values:
            assert torch.equal(fh.get_tensor(name), values[name])


def test_writer_refuses_a_tensor_that_does_not_match_the_header(tmp_path: Path) -> None:
    writer = StreamingShardWriter(tmp_path / "s.safetensors", [("w", "F32", (2, 2))])
    with pytest.raises(AssertionError, match="expected w F32"):
        writer.write("w", torch.zeros(3, 2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def _raw_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "only 2 bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "header claims 1000000 bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not JSON"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
         "tensor 'w' ends at byte"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12),
         "tensor 'w': header says shape \\[4\\] F32 \\(16 bytes\\) but gives 12"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
         "tensor 'w' has dtype F8_E4M3, which star_dist does not support"),
    ],
)
def test_corrupt_files_name_the_file_and_the_fault(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_header(tmp_path / "nope.safetensors")
