"""Device selection and the overlapped host → device uploader: CPU fallback, and its CUDA logic
with a stand-in for the few CUDA calls (no GPU exists here)."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from star_dist.device import TF32_OVERRIDE, Uploader, exact_float32_matmuls, resolve_device
from star_dist.errors import MergeError


def cuda_module(gpus: int) -> SimpleNamespace:
    return SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)


def test_resolve_device_with_gpus() -> None:
    cuda = cuda_module(2)
    assert resolve_device("auto", cuda) == torch.device("cuda")
    assert resolve_device("cuda", cuda) == torch.device("cuda")
    assert resolve_device("cuda:1", cuda) == torch.device("cuda", 1)
    assert resolve_device("cpu", cuda) == torch.device("cpu")
    message = r"^device 'cuda:2' requested but this worker sees 2 GPU\(s\): cuda:0 to cuda:1$"
    with pytest.raises(MergeError, match=message):
        resolve_device("cuda:2", cuda)


def test_resolve_device_without_gpus() -> None:
    cuda = cuda_module(0)
    assert resolve_device("auto", cuda) == torch.device("cpu")
    with pytest.raises(MergeError, match="^device 'cuda' requested but this worker has no CUDA device$"):
        resolve_device("cuda", cuda)
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the real one


def test_gpu_merges_run_float32_products_in_full_float32_and_restore_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline that turned TF32 on gets exact float32 GEMMs inside a GPU merge and its own
    setting back after; the environment override, which cannot be undone, is warned about."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 on, as a training script may leave it
        with exact_float32_matmuls(torch.device("cpu")):
            assert torch.get_float32_matmul_precision() == "high"  # the CPU has no TF32: untouched
        with exact_float32_matmuls(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        monkeypatch.setenv(TF32_OVERRIDE, "1")
        with caplog.at_level("WARNING", logger="star_dist.device"), exact_float32_matmuls(torch.device("cuda")):
            pass
        assert any(TF32_OVERRIDE in r.getMessage() and "precision" in r.getMessage() for r in caplog.records)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_uploader_cpu_hands_tensors_through_one_ahead() -> None:
    calls: list[str] = []
    tensors = [torch.full((3,), float(i)) for i in range(3)]

    def load(i: int):
        def read() -> torch.Tensor:
            calls.append(f"load{i}")
            return tensors[i]
        return read

    uploader = Uploader(torch.device("cpu"))
    for i, got in enumerate(uploader.stream_of(load(i) for i in range(3))):
        calls.append(f"use{i}")
        assert got is tensors[i]  # no copy on the CPU
    assert calls == ["load0", "load1", "use0", "load2", "use1", "use2"]
    assert uploader.stream is None and uploader.buffers == [None, None]


class RecordingOps:
    """Stands in for CudaOps on a CPU box: "device" tensors are CPU tensors, every call is logged."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.events = 0

    def stream(self) -> str:
        return "side"

    @contextmanager
    def use(self, stream: str):
        self.log.append(f"enter {stream}")
        yield
        self.log.append(f"exit {stream}")

    def event(self) -> SimpleNamespace:
        name = f"e{self.events}"
        self.events += 1
        return SimpleNamespace(
            name=name,
            record=lambda stream: self.log.append(f"record {name} on {stream}"),
            synchronize=lambda: self.log.append(f"host waits {name}"),
        )

    def current_stream(self) -> SimpleNamespace:
        return SimpleNamespace(wait_event=lambda e: self.log.append(f"compute waits {e.name}"))

    def keep(self, tensor: torch.Tensor, stream: object) -> None:
        self.log.append("keep")

    def pinned(self, nbytes: int) -> torch.Tensor:
        self.log.append(f"pin {nbytes}")
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)


def test_uploader_cuda_logic_double_buffers_and_never_blocks_on_the_current_copy() -> None:
    log: list[str] = []
    uploader = Uploader(torch.device("cuda"), ops=RecordingOps(log))
    sizes = [(4, 3), (2, 2), (5, 3), (1,)]
    hosts = [torch.arange(float(torch.Size(s).numel())).reshape(s).to(torch.bfloat16) for s in sizes]
    got = []
    for i, tensor in enumerate(uploader.stream_of((lambda h=h: h) for h in hosts)):
        log.append(f"use{i}")
        got.append(tensor.clone())
    for host, tensor in zip(hosts, got, strict=True):
        assert torch.equal(tensor, host) and tensor.dtype == torch.bfloat16  # the bytes arrive intact
    copy = ["enter side", "record {} on side", "exit side"]
    expected = [
        "pin 24", *[c.format("e0") for c in copy],  # tensor 0 → buffer 0 (4·3 bf16)
        "pin 8", *[c.format("e1") for c in copy],  # tensor 1 → buffer 1, started before tensor 0 is used
        "compute waits e0", "keep", "use0",
        "host waits e0", "pin 30", *[c.format("e2") for c in copy],  # buffer 0 again: grown, after its copy
        "compute waits e1", "keep", "use1",
        "host waits e1", *[c.format("e3") for c in copy],  # buffer 1 is big enough: reused
        "compute waits e2", "keep", "use2",
        "compute waits e3", "keep", "use3",
    ]
    assert log == expected


@pytest.mark.parametrize("method", ["star", "task_arithmetic", "ties", "tsv", "iso_cts"])
def test_the_merge_loop_streams_inputs_through_the_uploader_with_the_same_result(
    tiny_bf16, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard loop's GPU path (each model's input copied by the uploader, the next one in
    flight while the current one merges), run on the CPU with the stand-in CUDA calls: every
    tensor comes out bit-identical to the plain path, and every dense input went through it.
    The CPU-only fused sum is off, as on a GPU."""
    import star_dist
    from star_dist.merge_tensor import TensorMerger
    from star_dist.safetensors_format import TensorReader
    from star_dist.shard import method_of

    plan = star_dist.plan({"merge_method": method, "base_model": str(tiny_bf16 / "base"),
                           "models": [{"model": str(tiny_bf16 / f"ft{i}")} for i in range(3)],
                           "parameters": {"density": 0.5} if method == "ties" else {}})
    monkeypatch.setattr(TensorMerger, "_fusable", lambda self, job: False)
    log: list[str] = []
    streamed_inputs = 0
    with TensorReader() as reader:
        for shard in plan.shards:
            args = (method_of(plan.run), plan.run.weights, plan.run.lambda_, reader, torch.device("cpu"))
            plain = TensorMerger(*args)
            streamed = TensorMerger(*args, uploader=Uploader(torch.device("cuda"), ops=RecordingOps(log)))
            for job in shard.tensors:
                expected, _ = plain.merge(job)
                got, _ = streamed.merge(job)
                assert torch.equal(got, expected), job.name
                streamed_inputs += len(job.models) if job.merge else 0
    assert log.count("keep") >= streamed_inputs > 0  # once per dense input and pass (Iso-CTS: two)
