"""`FusedSum` (the block-by-block streaming sum) gives the unfused engine's bytes exactly."""

from __future__ import annotations

import pytest
import torch

from star_dist.methods.linear import FusedSum, StagingBuffers


def unfused(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], lam: float,
            dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """What the engine computes without fusion: whole-tensor upcasts, subtractions and sums."""
    b = base.to(dtype, copy=True)
    acc = torch.zeros_like(b)
    for model, weight in zip(models, weights, strict=True):
        acc.add_(model.to(dtype, copy=True).sub_(b), alpha=weight)
    return b.add_(acc, alpha=lam).to(out_dtype)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 31, 1000, 4099])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 17])
def test_fused_sum_is_bit_identical_to_whole_tensor_passes(stored: torch.dtype, n: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(stored)
    models = [(base.double() + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)).to(stored) for _ in range(3)]
    models[1][::5] = -0.0  # signed zeros must come out as the unfused sum gives them
    weights, lam = [0.3, -1.7, 1 / 3], 0.9
    dtype = torch.float64 if stored == torch.float64 else torch.float32
    for out_dtype in (stored, torch.float32):
        out = torch.empty(n, dtype=out_dtype)
        fused = FusedSum(dtype, chunk=chunk)
        fused.run(out, base, models, weights, lam)
        assert fused.merged_ok and fused.out_ok
        expected = unfused(base, models, weights, lam, dtype, out_dtype)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_fused_sum_flags_non_finite_blocks() -> None:
    base = torch.zeros(100)
    bad = torch.zeros(100)
    bad[77] = float("nan")
    fused = FusedSum(torch.float32, chunk=16)
    fused.run(torch.empty(100), base, [bad], [1.0], 1.0)
    assert not fused.merged_ok
    big = torch.full((100,), 60000.0)
    fused = FusedSum(torch.float32, chunk=16)
    fused.run(torch.empty(100, dtype=torch.float16), base, [big], [2.0], 1.0)  # 120000 > F16's 65504
    assert fused.merged_ok and not fused.out_ok


@pytest.mark.parametrize(("n", "stage"), [(1, 8), (100, 16), (100, 33), (4099, 1 << 21)])
def test_streamed_pieces_are_the_whole_sum_in_order(n: int, stage: int) -> None:
    """`stream` hands over the bytes `run` gives, in pieces of whole chunks, at most two
    buffers reused in turn: a piece is only overwritten after the one after it was emitted."""
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16) for _ in range(2)]
    whole = FusedSum(torch.float32, chunk=8).run(torch.empty(n, dtype=torch.bfloat16), base, models, [0.5, 2.0], 0.7)
    pieces, buffers = [], set()

    def emit(piece: torch.Tensor) -> None:
        if pieces:  # the piece before this one must still hold what was emitted
            assert torch.equal(pieces[-1][1], pieces[-1][0])
        pieces.append((piece, piece.clone()))
        buffers.add(piece.untyped_storage().data_ptr())

    fused = FusedSum(torch.float32, chunk=8)
    fused.stream(base, models, [0.5, 2.0], 0.7, torch.bfloat16, emit, stage=stage)
    assert fused.merged_ok and fused.out_ok and len(buffers) <= 2
    assert all(p.numel() % 8 == 0 for p, _ in pieces[:-1]) and max(p.numel() for p, _ in pieces) <= max(stage, 8)
    assert torch.equal(torch.cat([copy for _, copy in pieces]).view(torch.int16), whole.view(torch.int16))


def test_streaming_stops_at_a_bad_block() -> None:
    """Nothing is emitted once a block fails; a later NaN is still found after an overflow."""
    base = torch.zeros(100)
    nan, big = torch.zeros(100), torch.full((100,), 60000.0)
    nan[77] = float("nan")
    emitted: list[int] = []
    fused = FusedSum(torch.float32, chunk=16)
    fused.stream(base, [nan], [1.0], 1.0, torch.float32, lambda p: emitted.append(p.numel()), stage=32)
    assert not fused.merged_ok and sum(emitted) == 64  # blocks 0-63 were fine, 64-95 holds the NaN
    emitted.clear()
    big[90] = float("nan")
    fused = FusedSum(torch.float32, chunk=16)
    fused.stream(base, [big], [2.0], 1.0, torch.float16, lambda p: emitted.append(p.numel()), stage=32)
    assert not fused.out_ok and not fused.merged_ok and emitted == []


def test_a_streamed_sum_holds_a_few_mib_whatever_the_size() -> None:
    assert FusedSum.working_bytes(10, 2) == 2 * 10 * 2 + 3 * 10 * 4
    huge = FusedSum.working_bytes(128256 * 8192, 2)  # a 70B embedding: 2.1 GB of bf16 output
    assert huge == FusedSum.working_bytes(10**12, 2) < 16 * 2**20


def test_tensors_sharing_staging_buffers_never_hold_three() -> None:
    """One pair of buffers serves a shard's tensors: the next tensor's first piece goes to the
    buffer the previous tensor's last piece (still being written) is not in, whatever the dtypes."""
    staging, seen, last = StagingBuffers(), set(), None

    def emit(piece: torch.Tensor) -> None:
        nonlocal last
        if last is not None:  # the piece before must be untouched by this one
            assert torch.equal(last[0], last[1])
        last = (piece, piece.clone())
        seen.add(piece.untyped_storage().data_ptr())

    for n, dtype in [(100, torch.bfloat16), (48, torch.float32), (7, torch.bfloat16), (100, torch.float16)]:
        base = torch.randn(n).to(dtype)
        models = [base + 0.5]
        expected = FusedSum(torch.float32, chunk=8).run(torch.empty(n, dtype=dtype), base, models, [1.0], 1.0)
        pieces: list[torch.Tensor] = []
        FusedSum(torch.float32, chunk=8).stream(
            base, models, [1.0], 1.0, dtype, lambda p, pieces=pieces: (pieces.append(p.clone()), emit(p)),
            stage=32, staging=staging)
        assert torch.equal(torch.cat(pieces), expected)
    # 64 B bf16 pieces in both buffers; one grown to the first float32 piece's 128 B.
    assert len(seen) == 3 and sorted(b.numel() for b in staging._buffers) == [64, 128]
