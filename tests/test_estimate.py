"""Planning at 70B from headers alone: sparse checkpoints with real headers, the cost model
(memory per device, SVD FLOPs, bytes, time) and the memory budget check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from star_dist.errors import ConfigError
from star_dist.estimate import (
    GPU_RATES,
    Rates,
    TensorWork,
    estimate,
    measured_cpu_rates,
    place_tensors,
    spectral_flops,
    working_set,
)
from star_dist.methods import get_method
from star_dist.tiny_models import LLAMA_70B, llama_shapes, save_sparse_model

FIXED_RATES = Rates("fixed for the test", 1e11, 1e10, 1e9, 1e9)
EMBED = (128256, 8192)


def test_a_sparse_70b_checkpoint_has_real_headers_and_uses_no_disk(tmp_path: Path) -> None:
    apparent = save_sparse_model(tmp_path / "m", LLAMA_70B, shards=30)
    shapes = llama_shapes(LLAMA_70B)
    assert apparent == 2 * sum(math.prod(s) for s in shapes.values())
    assert 68e9 < apparent / 2 < 72e9  # a 70B model in bf16
    files = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(files) == 30
    assert sum(f.stat().st_blocks * 512 for f in files) < 10 * 2**20  # holes, not data
    seen = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:  # safetensors itself accepts the header
            names = fh.keys()
            for name in names:
                seen[name] = tuple(fh.get_slice(name).get_shape())
    assert seen == shapes


def _work(shape: tuple[int, ...], ranks: tuple[int | None, ...] = (None, None), name: str = "w") -> TensorWork:
    nbytes = 2 * math.prod(shape)
    return TensorWork(name, shape, True, ranks, nbytes * (len(ranks) + 1), nbytes)


def test_spectral_flops_count_the_gram_side_and_the_lora_factors() -> None:
    gemm, eig = spectral_flops(_work((300, 100), ranks=(None, None, None)))
    assert gemm == 3 * 2.0 * 300 * 100**2 and eig == pytest.approx(3 * 4 / 3 * 100**3)
    assert spectral_flops(_work((300, 100))) == spectral_flops(_work((100, 300)))  # the small side either way
    low_gemm, _ = spectral_flops(_work((4096, 4096), ranks=(16,)))
    dense_gemm, _ = spectral_flops(_work((4096, 4096), ranks=(None,)))
    assert low_gemm * 1000 < dense_gemm
    assert spectral_flops(_work((4096,))) == (0.0, 0.0)


def test_working_sets_follow_the_method() -> None:
    embed = _work(EMBED, ranks=(None,) * 12)
    f32 = 4 * math.prod(EMBED)
    star, ties = get_method("star"), get_method("ties")
    assert working_set(embed, star, 12) > 7 * f32  # τ and its copies, plus the 8192² float64 Gram matrix
    assert working_set(embed, get_method("task_arithmetic"), 12) < working_set(embed, star, 12)
    assert working_set(embed, ties, 2) > working_set(embed, ties, 12)
    lora = working_set(_work((4096, 4096), ranks=(16,) * 12), star, 12)
    assert lora < working_set(_work((4096, 4096), ranks=(None,) * 12), star, 12)
    tsv = get_method("tsv")  # a method that states its own working set is asked
    assert working_set(embed, tsv, 12) == tsv.working_bytes(EMBED, 12)


def test_a_tensor_too_big_for_the_gpu_goes_to_the_cpu_or_the_plan_fails() -> None:
    needs = {"model.embed_tokens.weight": 30 * 2**30, "model.norm.weight": 2**20}
    assert place_tensors(needs, "cuda", 24 * 2**30, 100 * 2**30) == ("model.embed_tokens.weight",)
    assert place_tensors(needs, "cuda", None, 100 * 2**30) == ()  # budget unknown: nothing to check
    too_big = (r"tensor model\.embed_tokens\.weight needs about 30\.00 GiB .* 24\.00 GiB per worker on cuda, "
               r"and the CPU has 16\.00")
    with pytest.raises(ConfigError, match=too_big):
        place_tensors(needs, "cuda", 24 * 2**30, 16 * 2**30)
    with pytest.raises(ConfigError, match="per worker on the CPU"):
        place_tensors(needs, "cpu", 16 * 2**30, 16 * 2**30)


def test_estimate_of_a_70b_star_merge_of_12() -> None:
    works = [TensorWork(n, s, True, (None,) * 12, 13 * 2 * math.prod(s), 2 * math.prod(s))
             for n, s in llama_shapes(LLAMA_70B).items()]
    est = estimate(works, get_method("star"), workers=8, device="cuda", budget=22 * 2**30,
                   cpu_budget=64 * 2**30, cpu_rates=FIXED_RATES)
    assert set(est.routed_to_cpu) == {"model.embed_tokens.weight", "lm_head.weight"}  # 128256 × 8192
    assert est.gpu.peak_device_bytes <= 22 * 2**30 < est.cpu.peak_device_bytes
    assert est.gpu.peak_host_bytes >= est.cpu.peak_device_bytes  # the routed embedding runs in host RAM
    assert est.bytes_read == 13 * 2 * sum(math.prod(s) for s in llama_shapes(LLAMA_70B).values())
    gemm = sum(spectral_flops(w)[0] for w in works)
    eig = sum(spectral_flops(w)[1] for w in works)
    assert est.svd_flops == pytest.approx(gemm + eig)
    assert est.gpu.seconds == pytest.approx((gemm / GPU_RATES.gemm_flops + eig / GPU_RATES.eig_flops
                                             + est.bytes_read / GPU_RATES.read_bps
                                             + est.bytes_written / GPU_RATES.write_bps) / 8)
    assert est.to_dict()["gpu"]["rates"]["label"].startswith("one H100-class GPU (assumed")


def test_the_cpu_probe_measures_finite_positive_rates() -> None:
    rates = measured_cpu_rates(1, size=128)
    assert 1e6 < rates.gemm_flops < 1e14 and 1e5 < rates.eig_flops < 1e14
    assert "measured" in rates.label
