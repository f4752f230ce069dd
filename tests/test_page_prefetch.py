"""The page prefetcher maps the next tensor's pages on its helper thread, falls back to a
readahead hint on kernels without MADV_POPULATE_READ, and a file cut short under it is
never a crash (the kernel answers EFAULT where a touch would be SIGBUS)."""

from __future__ import annotations

import errno
import mmap
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from star_dist.page_prefetch import MADV_POPULATE_READ, PagePrefetcher
from star_dist.safetensors_format import TensorReader, read_header

linux_only = pytest.mark.skipif(MADV_POPULATE_READ is None, reason="MADV_POPULATE_READ is Linux's")


def _mapped_kib(address: int) -> int:
    """Rss of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError("mapping not found")


@linux_only
def test_prefetched_pages_are_mapped_before_the_merge_touches_them(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096 * 16)  # 16 MiB, in the page cache after writing
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # "buffer is not writable" (torch warns once per process)
        warnings.simplefilter("ignore", UserWarning)
        address = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    before = _mapped_kib(address)
    prefetcher = PagePrefetcher()
    prefetcher.prefetch(mm, 0, len(mm))
    prefetcher.close()  # waits for the range in flight
    assert before < 1024 and _mapped_kib(address) >= 16 * 1024 - 4


def test_a_kernel_without_populate_gets_readahead_hints() -> None:
    class OldKernelMap:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def madvise(self, option: int, start: int, length: int) -> None:
            self.calls.append(option)
            if option == MADV_POPULATE_READ:
                raise OSError(errno.EINVAL, "Invalid argument")

    fake = OldKernelMap()
    prefetcher = PagePrefetcher()
    prefetcher.prefetch(fake, 0, 4096)  # type: ignore[arg-type]
    prefetcher.close()
    prefetcher2 = PagePrefetcher()
    prefetcher2._populate = False
    prefetcher2.prefetch(fake, 0, 4096)  # type: ignore[arg-type]
    prefetcher2.close()
    if MADV_POPULATE_READ is None:
        assert fake.calls == [mmap.MADV_WILLNEED, mmap.MADV_WILLNEED]
    else:
        assert fake.calls == [MADV_POPULATE_READ, mmap.MADV_WILLNEED, mmap.MADV_WILLNEED]
        assert not prefetcher._populate  # EINVAL once: hints from then on


@linux_only
def test_prefetching_a_file_cut_short_is_not_a_crash(tmp_path: Path) -> None:
    """In a child process, so a SIGBUS would fail the test instead of ending the run."""
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1 << 20), "b": torch.ones(1 << 20)}, str(path))
    script = textwrap.dedent(f"""
        import os, torch
        from star_dist.safetensors_format import TensorReader, read_header
        entries = read_header({str(path)!r})[0]
        reader = TensorReader(prefetch_pages=True)
        reader.read(entries["a"])  # mapped at full size
        os.truncate({str(path)!r}, 4096)  # a download rewriting it in place
        reader.advise(entries["b"])  # the helper thread populates pages that are gone
        reader.close()
        print("alive")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr[-2000:]


def test_a_reader_with_prefetch_reads_the_same_values(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.randn(300, 7) for i in range(5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    entries = read_header(path)[0]
    with TensorReader(prefetch_pages=True) as reader:
        for name in tensors:
            reader.advise(entries[name])
        for name, value in tensors.items():
            assert torch.equal(reader.read(entries[name]), value)
