"""The safetensors file format, read from headers alone and written as a stream.

Why our own reader and writer rather than `safetensors.safe_open` / `save_file`:
* planning must index 70B checkpoints without touching tensor data, and must tell a corrupt
  file apart from a valid one with a precise message;
* a worker must write a shard tensor by tensor, hashing as it goes, so memory stays bounded
  by one tensor rather than one shard (the header is known up front from the plan).
The files are standard safetensors; tests read them back with the `safetensors` library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import InputError
from .files import fsync_dir, require_regular_file
from .hub_headers import real_file
from .page_prefetch import PagePrefetcher

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}
# Every dtype the safetensors format defines; those outside DTYPES are valid but not merged.
SAFETENSORS_DTYPES = frozenset(DTYPES) | {
    "F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "U16", "U32", "U64", "C64",
}
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype code, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Index a safetensors file from its header: {name: TensorEntry}, metadata.

    Raises InputError naming the file (and the tensor, where one is at fault) for anything
    that is not a well-formed safetensors file.
    """
    path = Path(path)
    size = require_regular_file(path, "safetensors file").st_size  # a FIFO would block open()
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: corrupt safetensors file (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(
                    f"{path}: corrupt safetensors file (header claims {header_len} bytes, "
                    f"file has {size}); re-download or re-save it"
                )
            raw = fh.read(header_len)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except _StrictJSONError as exc:
        raise InputError(f"{path}: corrupt safetensors header ({exc}); re-download or re-save it") from None
    except (ValueError, RecursionError):  # not JSON or not UTF-8, an integer past 4300 digits, too deep
        raise InputError(f"{path}: corrupt safetensors header (not JSON); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(path, name, info, data_start, size)
    _check_layout(path, entries, data_start, size)
    return entries, metadata


class _StrictJSONError(ValueError):
    """JSON that Python's parser reads but the safetensors library (serde_json) refuses."""


def _strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as safetensors reads one: no key twice, no string with a lone surrogate."""
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise _StrictJSONError(f"key {_json(key)} appears twice")
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _StrictJSONError(f"string {_json(text)} is not valid Unicode") from None
        obj[key] = value
    return obj


def _no_constant(name: str) -> object:
    raise _StrictJSONError(f"{name} is not a JSON value")


def _json(value: object, limit: int = 80) -> str:
    """A header value as it reads in the file, on one line and cut short."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value: object) -> bool:
    """A non-negative JSON integer below 2**64 (the spec's usize; true/false and 4.0 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    """`__metadata__`: absent, null, or a mapping of strings to strings (as safetensors requires)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(
            f"{path}: corrupt safetensors header: __metadata__ is {_json(metadata)}, not an object of strings"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InputError(
                f"{path}: corrupt safetensors header: __metadata__ key {key!r} is {_json(value)}, not a string"
            )
    return metadata


def _parse_entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    """One tensor's header entry, checked as the safetensors format requires."""
    where = f"{path}: tensor {name!r}: corrupt header entry"
    if not isinstance(info, dict):
        raise InputError(f"{where} {_json(info)} (expected an object with dtype, shape and data_offsets)")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise InputError(f"{where} {_json(info)} (no {key!r})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype {_json(dtype)} is not a string")
    if dtype not in DTYPES:
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{where}: dtype {_json(dtype)} is not a safetensors dtype")
        raise InputError(
            f"{path}: tensor {name!r} has dtype {dtype}, which star_dist does not support "
            f"(supported: {', '.join(DTYPES)}); convert the checkpoint first"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {_json(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InputError(
            f"{where}: data_offsets {_json(offsets)} is not a list of two non-negative integers [begin, end]"
        )
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where}: data_offsets {_json(offsets)} begins after it ends")
    entry = TensorEntry(str(path), dtype, tuple(shape), data_start + begin, end - begin)
    expected = _shape_bytes(shape, DTYPES[dtype][1], end - begin)
    if expected != end - begin:
        size_text = f"{expected} bytes" if expected is not None else f"more than {end - begin} bytes"
        raise InputError(
            f"{path}: tensor {name!r}: header says shape {_json(shape)} {dtype} "
            f"({size_text}) but gives {end - begin} bytes"
        )
    if data_start + end > size:
        raise InputError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}: "
            "the file is truncated; re-download or re-save it"
        )
    return entry


def _shape_bytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """The bytes a shape takes, or None when far past `limit` (above 2**64 and `limit`): never
    the product of a long list of huge dimensions, which a corrupt header can ask for (slow,
    and too long to print); a plain mismatch keeps its exact byte count for the message."""
    if 0 in shape:
        return 0
    cap = max(limit, 2**64)
    nbytes = itemsize
    for d in shape:
        nbytes *= d
        if nbytes > cap:
            return None
    return nbytes


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """The tensors tile the data buffer exactly: no overlap, no gap, nothing after the last.

    This is the safetensors library's own rule (sorted by offsets, each tensor begins where
    the previous one ends, the last ends at the end of the file), so a file passing here is
    one `safetensors.safe_open` and transformers accept. Empty tensors take no bytes and may
    share an offset.
    """
    spans = sorted((e.start - data_start, e.start - data_start + e.nbytes, name) for name, e in entries.items())
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise InputError(
                f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) overlaps tensor {prev!r}, "
                f"which ends at {pos}: the file is corrupt; re-download or re-save it"
            )
        if begin > pos:
            raise InputError(
                f"{path}: tensor {name!r} begins at data offset {begin}, but the tensors before it end at {pos}: "
                f"bytes {pos}..{begin} belong to no tensor, which safetensors refuses; re-save the file"
            )
        pos, prev = end, name
    extra = size - data_start - pos
    if extra:
        count = f"{extra} byte{'s' if extra != 1 else ''}"
        if prev is None:
            what = f"the data buffer has {count} but the header lists no tensor"
        else:
            what = f"the data buffer has {count} after the last tensor ({prev!r}, ending at data offset {pos})"
        raise InputError(f"{path}: {what}, which safetensors refuses; re-download or re-save the file")


class FileShrank(InputError):
    """An input file cut shorter while the merge had it mapped (rewritten in place by a download
    or a save): reading its lost pages would kill the process with SIGBUS, so refuse first."""

    def __init__(self, file: str, needed: int, size: int) -> None:
        self.file, self.needed, self.size = file, needed, size
        super().__init__(self.describe())

    def describe(self, tensor: str | None = None) -> str:
        """The one-line message, naming the tensor being read when the caller knows it."""
        what = f"tensor {tensor!r}" if tensor else "a read"
        return (
            f"{self.file}: {what} needs bytes up to {self.needed} but the file now has {self.size}: "
            "it was cut short while the merge read it; "
            "let whatever rewrites it finish, then rerun the same command to resume"
        )


class TensorReader:
    """Lazy reads of tensors from safetensors files via one read-only memory map per file.

    Only the pages a tensor (or a row block of it) covers are read from disk, and they stay
    page cache: a shared read-only map costs no memory of the process's own, so a checkpoint
    file larger than RAM reads a 2-row block as cheaply as a small one (a private copy-on-write
    map is refused with ENOMEM there, as the kernel must be able to back every page).
    The tensors returned are views of the map and must never be written to (a write would
    crash the process); every caller copies (`.to(..., copy=True)`) or only reads.

    With `prefetch_pages`, `advise` also has a helper thread map the advised bytes in
    (page_prefetch.py), so the next tensor's page faults are not taken by the merge thread.
    """

    def __init__(self, prefetch_pages: bool = False) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()  # the helper thread maps files too
        self._prefetcher = PagePrefetcher() if prefetch_pages else None

    def _map(self, file: str, needed: int) -> mmap.mmap:
        """The file's map, made on first use; `needed` is the end of the bytes about to be read."""
        mm = self._maps.get(file)
        if mm is None:
            with self._lock:
                mm = self._maps.get(file) or self._open_map(file, needed)
                self._maps[file] = mm
        if needed > mm.size():  # mm.size() is the file's size now: touching pages past it is SIGBUS
            raise FileShrank(file, needed, mm.size())
        return mm

    @staticmethod
    def _open_map(file: str, needed: int) -> mmap.mmap:
        with open(real_file(file), "rb") as fh:  # a hub header stub: the real file, fetched
            if os.fstat(fh.fileno()).st_size == 0:  # emptied since planning: nothing to map
                raise FileShrank(file, needed, 0)
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def advise(self, entry: TensorEntry) -> None:
        """Ask the kernel to start reading `entry`'s bytes now, in the background (readahead),
        so that a later `read` finds them in the page cache. A hint: errors are ignored."""
        if entry.nbytes == 0:
            return
        start = entry.start - entry.start % mmap.PAGESIZE
        end = entry.start + entry.nbytes
        with contextlib.suppress(OSError, ValueError, FileShrank):
            mm = self._map(entry.file, end)
            if self._prefetcher is not None:
                self._prefetcher.prefetch(mm, start, end - start)
            else:
                mm.madvise(mmap.MADV_WILLNEED, start, end - start)

    def read(self, entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [a, b) of its first dimension), in its stored dtype."""
        torch_dtype, itemsize = DTYPES[entry.dtype]
        shape = entry.shape
        start, count = entry.start, entry.numel
        if rows is not None:
            row_numel = entry.numel // shape[0] if shape[0] else 0
            a, b = rows
            start += a * row_numel * itemsize
            count = (b - a) * row_numel
            shape = (b - a, *shape[1:])
        if count == 0:
            return torch.empty(shape, dtype=torch_dtype)
        mm = self._map(entry.file, start + count * itemsize)
        with warnings.catch_warnings():  # "buffer is not writable": by design, see the class docstring
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mm, dtype=torch_dtype, count=count, offset=start)
        return flat.view(shape)

    def close(self) -> None:
        """Drop the maps. Never `mmap.close()` them: `torch.frombuffer` keeps a reference to the
        map but no buffer export, so closing would unmap pages that a tensor still views (a
        segfault on its next read, e.g. from a traceback's frames). Each map is unmapped when
        the last tensor viewing it is freed."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._maps.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors written in the given order.

    Padded with spaces to a multiple of 8, as the safetensors library does, so data stays aligned.

    Args:
        tensors: (name, safetensors dtype code such as "BF16", shape) per tensor, in file order.
        metadata: the `__metadata__` strings; None: {"format": "pt"}, as transformers expects.
    Returns:
        (the header bytes, each tensor's data size in bytes, in the given order).
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset, sizes = 0, []
    for name, dtype, shape in tensors:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class StreamingShardWriter:
    """Writes one safetensors file tensor by tensor to `<final>.tmp`, hashing as it goes;
    `commit()` fsyncs and renames it to its final name, so no half-written file ever has it.

    With `background=True` each tensor is written by a helper thread (and hashed by another,
    at the same time) while the caller computes the next (file writes and sha256 release the
    GIL): at most one tensor is in flight, and an error it met (a full disk) is raised by the
    next `write` or by `commit`.
    """

    def __init__(
        self, final_path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], background: bool = False
    ) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        self._expected = [(name, dtype, shape) for name, dtype, shape in tensors]
        header, self._sizes = build_header(tensors)
        self._hash = hashlib.sha256()
        self._fh: BinaryIO = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._written = 0
        self._bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer") if background else None
        # In the background, sha256 runs on its own thread beside the write (both release the
        # GIL): a tensor then costs max(write, hash), not their sum.
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-hasher") if background else None
        self._pending: Future[None] | None = None
        self._put(header)

    def _put(self, data: bytes | memoryview) -> None:
        if self._hasher is None:
            self._fh.write(data)
            self._hash.update(data)
        else:
            hashed = self._hasher.submit(self._hash.update, data)  # in order: one update in flight
            try:
                self._fh.write(data)
            finally:
                hashed.result()
        self._bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the header's name, dtype and shape."""
        exp_name, exp_dtype, exp_shape = self._expected[self._written]
        got_dtype = TORCH_TO_CODE.get(tensor.dtype)
        if name != exp_name or got_dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise AssertionError(
                f"writer got {name} {got_dtype} {tuple(tensor.shape)}, "
                f"expected {exp_name} {exp_dtype} {exp_shape}"
            )
        with self.tensor(name) as put:
            put(tensor.detach().cpu().reshape(-1))

    @contextlib.contextmanager
    def tensor(self, name: str) -> Iterator[Callable[[torch.Tensor], None]]:
        """Append the next tensor piece by piece: yields `put(piece)`, which takes its flat
        pieces in order (the header's dtype); on leaving, they must have filled it exactly.

        In the background a piece is written while the caller computes the next one, so
        the caller must not change a piece until it has put the one after it (two staging
        buffers used in turn are enough; see FusedSum.stream).
        """
        exp_name, exp_dtype, _ = self._expected[self._written]
        if name != exp_name:
            raise AssertionError(f"writer got {name}, expected {exp_name}")
        expected, filled = self._sizes[self._written], 0

        def put(piece: torch.Tensor) -> None:
            nonlocal filled
            if TORCH_TO_CODE.get(piece.dtype) != exp_dtype or filled + piece.numel() * piece.element_size() > expected:
                raise AssertionError(f"writer got a {piece.dtype} piece of {piece.numel()} past {filled} B of {name}")
            data = memoryview(piece.contiguous().view(torch.uint8).numpy())
            filled += len(data)
            self._submit(data)

        yield put
        if filled != expected:
            raise AssertionError(f"writer got {filled} of {expected} bytes of {name}")
        self._written += 1

    def _submit(self, data: memoryview) -> None:
        if self._pool is None:
            self._put(data)
            return
        self._drain()  # the previous piece is on disk (or its error raised) before this one goes
        self._pending = self._pool.submit(self._put, data)

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def commit(self) -> tuple[int, str]:
        """fsync, rename to the final name; returns (size in bytes, sha256 hex)."""
        self._drain()
        if self._written != len(self._expected):
            raise AssertionError(f"{self.final_path}: {self._written}/{len(self._expected)} tensors written")
        self._stop()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return self._bytes, self._hash.hexdigest()

    def _stop(self) -> None:
        """Wait for the helper thread (if any) to finish and end it."""
        for pool in (self._pool, self._hasher):
            if pool is not None:
                pool.shutdown(wait=True)

    def abort(self) -> None:
        """Close and remove the temporary file (after an error). Closing flushes the buffer,
        which fails again on a full disk: that must not keep the partial file behind."""
        self._stop()  # a write in flight ends first (its error, if any, is the one being raised)
        if not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """The file's SHA-256, read in chunks so a shard of many GB never sits in memory.

    Args:
        path: the file to hash.
        chunk: bytes read at a time (default 16 MiB).
    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
