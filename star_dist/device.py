"""Where a worker computes, and getting tensors there without stalling the computation.

`resolve_device` turns the config's device ("auto", "cpu", "cuda", "cuda:1") into a torch
device this process can use. `Uploader` feeds a sequence of host tensors to that device: on
CUDA each tensor is staged in a reused pinned (page-locked) host buffer and copied on a side
stream, so the next tensor's host→device copy runs while the current one is being merged,
and the compute stream waits on an event, never the host. On the CPU it hands tensors
through unchanged. The merge loop (`TensorMerger._task_vectors`) calls
`Uploader.stream_of(loads)` over a tensor's fine-tunes: a generator that yields each input on
the device after starting the next one's copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from .errors import MergeError

log = logging.getLogger(__name__)
TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"  # forces TF32 on, whatever the process asks


def resolve_device(requested: str, cuda: ModuleType | Any = torch.cuda) -> torch.device:
    """The torch device for a requested name; 'auto' picks the GPU when this process has one.

    A Ray actor sees only the GPUs Ray assigned it (CUDA_VISIBLE_DEVICES), as cuda:0 onwards.

    Args:
        requested: "auto", "cpu", "cuda" or "cuda:N".
        cuda: the torch.cuda module (tests pass a stand-in for a machine with GPUs).

    Returns:
        The device. MergeError (one line) when CUDA is requested and absent, or the index is
        not one of this process's GPUs.
    """
    if requested == "auto":
        return torch.device("cuda" if cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not cuda.is_available():
        raise MergeError(f"device {requested!r} requested but this worker has no CUDA device")
    count = cuda.device_count()
    if device.index is not None and device.index >= count:
        visible = f"cuda:0 to cuda:{count - 1}" if count else "none"
        raise MergeError(f"device {requested!r} requested but this worker sees {count} GPU(s): {visible}")
    return device


@contextlib.contextmanager
def exact_float32_matmuls(device: torch.device) -> Iterator[None]:
    """A block whose float32 matrix products on `device` run in full float32, not TF32.

    TF32 keeps 10 bits of mantissa: a merged weight would differ from the CPU's far beyond
    rounding. torch's default is off, but a pipeline may have turned it on for training; this
    turns it off for the block and restores it. `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1` cannot be
    undone from inside the process: then a warning says so.

    Args:
        device: where the block computes; nothing changes off CUDA.
    """
    if device.type != "cuda":
        yield
        return
    if os.environ.get(TF32_OVERRIDE) == "1":
        _warn_tf32_override()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@functools.lru_cache(maxsize=1)
def _warn_tf32_override() -> None:
    log.warning("%s=1 forces TF32 float32 matmuls on this GPU worker: merged weights lose precision "
                "(unset it for exact results)", TF32_OVERRIDE)


class CudaOps:
    """The few CUDA operations `Uploader` needs, on one device; a test passes a stand-in."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def use(self, stream: Any) -> Any:
        """A context manager making `stream` current."""
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator `tensor` is in use on `stream` (made on another one)."""
        tensor.record_stream(stream)

    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked host buffer: the DMA engine reads it while the host works on."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)


@dataclass
class _Staged:
    """One copy in flight: the device tensor and the event that marks its end (None: no copy)."""

    tensor: torch.Tensor
    event: Any


class Uploader:
    """Host → device copies that overlap compute: pinned staging buffers and a side CUDA stream.

    Two pinned buffers, used in turn (double buffering), grown to the largest tensor seen. A
    buffer is refilled only after the copy that last read it has finished (its event), which by
    then it has: that copy was started one tensor earlier. On the CPU nothing is copied.
    """

    def __init__(self, device: torch.device, ops: CudaOps | None = None, buffers: int = 2) -> None:
        """Args: device: where tensors go; ops: the CUDA operations (default: the real ones);
        buffers: pinned buffers to rotate (2: one being copied, one being filled)."""
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.ops = ops if ops is not None else CudaOps(device)
        self.stream = self.ops.stream() if self.on_gpu else None
        self.buffers: list[torch.Tensor | None] = [None] * buffers  # flat pinned uint8 buffers
        self.events: list[Any] = [None] * buffers  # the copy that last read each buffer
        self.turn = 0

    def submit(self, host: torch.Tensor) -> _Staged:
        """Start copying `host` to the device; returns at once (CUDA) or hands it through (CPU)."""
        if not self.on_gpu:
            return _Staged(host, None)
        index = self.turn
        self.turn = (self.turn + 1) % len(self.buffers)
        staging = self._staging(index, host)  # pinned, host's shape and dtype
        staging.copy_(host)  # host memcpy (from the memory map) into page-locked memory
        with self.ops.use(self.stream):
            tensor = self.ops.empty(host.shape, host.dtype)
            tensor.copy_(staging, non_blocking=True)  # DMA on the side stream
            event = self.ops.event()
            event.record(self.stream)
        self.events[index] = event
        return _Staged(tensor, event)

    def take(self, staged: _Staged) -> torch.Tensor:
        """The device tensor, usable on the current stream: it waits on the copy, the host does not."""
        if staged.event is None:
            return staged.tensor
        current = self.ops.current_stream()
        current.wait_event(staged.event)
        self.ops.keep(staged.tensor, current)  # the allocator must not reuse it before compute ends
        return staged.tensor

    def stream_of(self, loads: Iterable[Callable[[], torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Each loaded tensor on the device, the next one's copy started before this one is yielded.

        Args:
            loads: callables that read one host tensor each (called in order, one ahead).

        Returns:
            A generator of device tensors, in the order of `loads`.
        """
        pending: _Staged | None = None
        for load in loads:
            staged = self.submit(load())
            if pending is not None:
                yield self.take(pending)
            pending = staged
        if pending is not None:
            yield self.take(pending)

    def _staging(self, index: int, host: torch.Tensor) -> torch.Tensor:
        """Pinned buffer `index` viewed as host's shape and dtype, grown if too small."""
        nbytes = host.numel() * host.element_size()
        if self.events[index] is not None:
            self.events[index].synchronize()  # the copy that last read it (long done, in practice)
        buffer = self.buffers[index]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.ops.pinned(max(nbytes, 1))
            self.buffers[index] = buffer
        return buffer[:nbytes].view(host.dtype).view(host.shape)
