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


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor(2.5),
        torch.tensor(True),
        torch.zeros(0),
        torch.zeros(3, 0, 2, dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.arange(5, dtype=torch.uint8),
        torch.arange(5, dtype=torch.int8) - 2,
        torch.arange(5, dtype=torch.int16) - 2,
        torch.arange(5, dtype=torch.int32) - 2,
        torch.arange(6, dtype=torch.int64).view(3, 2) - 2,
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.randn(2, 3).to(torch.float16),
    ],
    ids=lambda v: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}",
)
def test_every_supported_dtype_and_shape_reads_back(tmp_path: Path, value: torch.Tensor) -> None:
    """What save_file writes passes every header check (with a second tensor after it)."""
    path = tmp_path / "x.safetensors"
    tensors = {"t": value, "after": torch.ones(2)}
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    entries, meta = read_header(path)
    assert meta == {"format": "pt", "note": "x"}
    assert entries["t"].shape == tuple(value.shape) and entries["t"].nbytes == value.numel() * value.element_size()
    with TensorReader() as reader:
        for name, expected in tensors.items():
            got = reader.read(entries[name])
            assert got.dtype == expected.dtype and torch.equal(got, expected), name


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


@pytest.mark.parametrize("background", [False, True])
def test_a_tensor_written_in_pieces_is_the_tensor_written_whole(tmp_path: Path, background: bool) -> None:
    """`tensor(name)` takes flat pieces in order; the file and its hash are what `write` gives."""
    value = torch.randn(10, 7).to(torch.bfloat16)
    layout = [("w", "BF16", (10, 7)), ("n", "F32", (3,))]
    digests = []
    for pieces in ([70], [1, 30, 39], [0, 70, 0]):
        path = tmp_path / f"{len(pieces)}{pieces[0]}.safetensors"
        writer = StreamingShardWriter(path, layout, background=background)
        with writer.tensor("w") as put:
            start = 0
            for count in pieces:
                put(value.view(-1)[start : start + count].clone())  # each piece its own buffer
                start += count
        writer.write("n", torch.ones(3))
        digests.append(writer.commit())
        with safe_open(str(path), framework="pt") as fh:
            assert torch.equal(fh.get_tensor("w"), value)
    assert digests[0][1] == digests[1][1] == digests[2][1]


def test_a_tensor_in_pieces_must_fill_it_exactly(tmp_path: Path) -> None:
    writer = StreamingShardWriter(tmp_path / "s.safetensors", [("w", "F32", (2, 2))])
    with pytest.raises(AssertionError, match="8 of 16 bytes of w"), writer.tensor("w") as put:
        put(torch.zeros(2))
    writer.abort()
    writer = StreamingShardWriter(tmp_path / "s.safetensors", [("w", "F32", (2, 2))])
    with pytest.raises(AssertionError, match="piece of 5 past 0 B of w"), writer.tensor("w") as put:
        put(torch.zeros(5))
    with pytest.raises(AssertionError, match="torch.float16 piece"), writer.tensor("w") as put:
        put(torch.zeros(2, dtype=torch.float16))
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
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [4]}}, b"\0" * 16),
         "tensor 'w': corrupt header entry: data_offsets \\[4\\] is not a list of two"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                 "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
         "tensor 'v' \\(data_offsets \\[8, 16\\]\\) overlaps tensor 'w', which ends at 16"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}}, b"\0" * 20),
         "tensor 'w' begins at data offset 4, .* bytes 0..4 belong to no tensor"),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 17),
         "has 1 byte after the last tensor \\('w'"),
        (lambda p: _raw_file(p, {}, b"\0" * 8), "8 bytes but the header lists no tensor"),
        (lambda p: _raw_file(p, {"__metadata__": {"a": {"b": "c"}}}, b""), "__metadata__ key 'a' is"),
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
