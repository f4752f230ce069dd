"""Planning at 70B from headers alone: sparse checkpoints with real headers, the cost model
(memory per device, SVD FLOPs, bytes, time) and the memory budget check."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import star_dist
from star_dist.errors import ConfigError
from star_dist.estimate import (
    CPU_SETUP_SECONDS,
    ELEMENT_SECONDS,
    GPU_RATES,
    JOINT_BLOCK_COPIES,
    JOINT_BLOCK_ELEMENTS,
    Rates,
    TensorWork,
    estimate,
    io_only_cpu_rates,
    measured_cpu_rates,
    place_tensors,
    spectral_flops,
    working_set,
)
from star_dist.merge_tensor import TensorMerger
from star_dist.methods import get_method
from star_dist.planner import tensor_works
from star_dist.safetensors_format import TensorReader
from star_dist.tiny_models import LLAMA_70B, llama_shapes, save_sparse_model

from .conftest import run_cli


def plan_works(plan: star_dist.MergePlan) -> list[TensorWork]:
    return tensor_works([t for s in plan.shards for t in s.tensors])


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
    assert gemm == 3 * 1.0 * 300 * 100**2 and eig == pytest.approx(3 * 4 / 3 * 100**3)
    assert spectral_flops(_work((300, 100))) == spectral_flops(_work((100, 300)))  # the small side either way
    low_gemm, _ = spectral_flops(_work((4096, 4096), ranks=(16,)))
    dense_gemm, _ = spectral_flops(_work((4096, 4096), ranks=(None,)))
    assert low_gemm * 1000 < dense_gemm
    assert spectral_flops(_work((4096,))) == (0.0, 0.0)


def test_working_sets_follow_the_method() -> None:
    embed = _work(EMBED, ranks=(None,) * 12)
    f32 = 4 * math.prod(EMBED)
    star, ties, ta = get_method("star"), get_method("ties"), get_method("task_arithmetic")
    assert working_set(embed, star, 12) > 4 * f32 + 8 * 8192**2  # τ and its copies, plus the float64 Gram matrix
    assert working_set(embed, ta, 12, "cuda") == 0 < working_set(embed, ta, 12, "cpu") < working_set(embed, star, 12)
    gpu_ta = estimate([embed], ta, 1, "cuda", budget=2**30, cpu_budget=2**40, cpu_rates=FIXED_RATES).gpu
    assert gpu_ta.peak_device_bytes == 0 and gpu_ta.peak_host_bytes == working_set(embed, ta, 12, "cpu")
    assert working_set(embed, ties, 2) == working_set(embed, ties, 12)  # cache-sized row blocks: flat in N
    lora = working_set(_work((4096, 4096), ranks=(16,) * 12), star, 12)
    assert lora < working_set(_work((4096, 4096), ranks=(None,) * 12), star, 12)
    tsv = get_method("tsv")  # a method that states its own working set is asked
    assert working_set(embed, tsv, 12, "cpu") == tsv.working_bytes(EMBED, 12)
    for method in (star, tsv, ties):  # on a GPU the next input's copy is in flight: one more bf16 input
        eigh = 2 * 8 * min(EMBED) ** 2 if method is star else 0  # a GPU's eigh: its vectors and workspace
        blocks = JOINT_BLOCK_COPIES * 4 * JOINT_BLOCK_ELEMENTS["cuda"] if method is ties else 0  # GPU-sized blocks
        extra = working_set(embed, method, 12, "cuda") - working_set(embed, method, 12, "cpu")
        assert extra == 2 * math.prod(EMBED) + eigh + blocks
    assert working_set(lora_only := _work((4096, 4096), ranks=(16,) * 12), star, 12, "cuda") == working_set(
        lora_only, star, 12, "cpu")  # LoRA factors are not streamed


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
    est = estimate(works, get_method("star"), workers=8, device="cuda", budget=16 * 2**30,
                   cpu_budget=64 * 2**30, cpu_rates=FIXED_RATES)
    assert set(est.routed_to_cpu) == {"model.embed_tokens.weight", "lm_head.weight"}  # 128256 × 8192
    assert est.gpu.peak_device_bytes <= 16 * 2**30 < est.cpu.peak_device_bytes
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


def test_plan_routes_tensors_over_the_gpu_budget_to_the_cpu(tiny_fp32: Path) -> None:
    """On a GPU run, a budget below the largest tensors' working set marks those tensors to
    merge on the CPU (named in the plan's warnings); the rest stay on the device."""
    full = star_dist.plan(tiny_fp32 / "merge.yaml", device="cuda", max_memory_per_worker=2**40)
    needs = {w.name: working_set(w, get_method("star"), 3) for w in plan_works(full)}
    budget = sorted(needs.values())[-3]  # the two largest working sets are over it
    plan = star_dist.plan(tiny_fp32 / "merge.yaml", device="cuda", max_memory_per_worker=budget)
    routed = {t.name for s in plan.shards for t in s.tensors if t.device == "cpu"}
    assert routed == {n for n, need in needs.items() if need > budget} and len(routed) == 2
    assert all(any(name in w for w in plan.warnings) for name in routed)
    assert plan.estimate is not None and plan.estimate.gpu.peak_device_bytes <= budget
    assert plan.fingerprint == full.fingerprint  # where a tensor runs is recorded per shard, not identity
    with pytest.raises(ConfigError, match="per worker on the CPU"):
        star_dist.plan(tiny_fp32 / "merge.yaml", device="cpu", max_memory_per_worker=budget)


def test_a_routed_tensor_merges_on_the_cpu_whatever_the_shards_device(tiny_fp32: Path) -> None:
    """TensorMerger honours a job's own device: on a merger whose device could compute
    nothing (meta), the routed job still gives the CPU's bytes."""
    plan = star_dist.plan(tiny_fp32 / "merge.yaml")
    run, job = plan.run, plan.shards[0].tensors[0]
    method = get_method(run.method, dict(run.method_params))
    with TensorReader() as reader:
        on_cpu, _ = TensorMerger(method, run.weights, run.lambda_, reader, torch.device("cpu")).merge(job)
        meta = TensorMerger(method, run.weights, run.lambda_, reader, torch.device("meta"))
        routed, _ = meta.merge(dataclasses.replace(job, device="cpu"))
        assert meta.device.type == "meta"  # restored after the tensor
    assert torch.equal(routed, on_cpu)


def test_plan_of_twelve_70b_fine_tunes_from_headers(tmp_path: Path) -> None:
    """`star-dist plan --json` on 12 sparse 70B fine-tunes: headers only, every number stated."""
    for name in ["base", *(f"ft{i}" for i in range(12))]:
        save_sparse_model(tmp_path / name, LLAMA_70B, shards=30)
    config = {"merge_method": "star", "base_model": "base", "models": [{"model": f"ft{i}"} for i in range(12)]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("plan", str(tmp_path / "merge.yaml"), "--json", "--device", "cuda",
                     "--max-memory-per-worker", "40GiB", "--workers", "8")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    est = summary["estimate"]
    params = sum(math.prod(s) for s in llama_shapes(LLAMA_70B).values())
    busiest = summary["per_worker"]  # 8 workers share the shards: the busiest reads at least its 1/8
    assert busiest["workers"] == 8
    assert est["bytes_read"] / 8 <= busiest["bytes_read"] < est["bytes_read"] / 4
    assert est["bytes_written"] / 8 <= busiest["bytes_written"] < est["bytes_written"] / 4
    assert est["bytes_read"] == 13 * 2 * params and est["bytes_written"] == 2 * params
    assert est["budget_bytes"] == 40 * 2**30 and est["routed_to_cpu"] == []
    embed = _work(EMBED, ranks=(None,) * 12)  # the 128256 × 8192 one is the largest on either device
    assert est["gpu"]["peak_device_bytes"] == working_set(embed, get_method("star"), 12, "cuda")
    assert est["cpu"]["peak_device_bytes"] == working_set(embed, get_method("star"), 12, "cpu")
    assert est["svd_flops"] > 1e16 and est["workers"] == 8
    assert 0 < est["gpu"]["seconds"] < est["cpu"]["seconds"]
    assert "assumed" in est["gpu"]["rates"]["label"] and "measured" in est["cpu"]["rates"]["label"]


def test_shards_are_costed_by_the_cost_model_the_same_in_every_process(tiny_fp32: Path) -> None:
    """A shard's cost is the cost model's time at fixed rates: spectral FLOPs count, so of two
    shards with the same bytes the one holding matrices costs more, and two plans agree."""
    plans = [star_dist.plan(tiny_fp32 / "merge.yaml", max_shard_size="60kB") for _ in range(2)]
    assert [s.cost for s in plans[0].shards] == [s.cost for s in plans[1].shards]
    star = plans[0]
    flops_free = [dataclasses.replace(s, tensors=tuple(dataclasses.replace(t, shape=(t.base.numel,))
                                                       for t in s.tensors)) for s in star.shards]
    for shard, flat in zip(star.shards, flops_free, strict=True):
        flat_cost = star_dist.estimate.work_seconds(tensor_works(list(flat.tensors)), get_method("star"),
                                                    star_dist.estimate.ordering_rates("auto"))
        has_matrix = any(t.merge and len(t.shape) == 2 for t in shard.tensors)
        assert (shard.cost > flat_cost) == has_matrix
    matrices = sum(1 for s in star.shards for t in s.tensors if t.merge and len(t.shape) == 2)
    assert star.n_svds == 3 * matrices  # one per fine-tune per matrix


def test_ties_time_counts_its_calibrated_per_element_kernel_on_the_cpu_only() -> None:
    works = [_work((4096, 1024), ranks=(None,) * 4), _work((1024,), ranks=(None,) * 4)]
    ta, ties = get_method("task_arithmetic"), get_method("ties")
    elements = 4 * (4096 * 1024 + 1024)
    cpu_gap = (estimate(works, ties, 1, "cpu", cpu_rates=FIXED_RATES).cpu.seconds
               - estimate(works, ta, 1, "cpu", cpu_rates=FIXED_RATES).cpu.seconds)
    assert cpu_gap == pytest.approx(ELEMENT_SECONDS["ties"] * elements)
    gpu = [estimate(works, m, 1, "cuda", budget=2**34, cpu_budget=2**34, cpu_rates=FIXED_RATES).gpu.seconds
           for m in (ta, ties)]
    assert gpu[0] == gpu[1]  # not counted on a GPU (unmeasured there)


def test_the_cpu_set_up_cost_is_counted_once_per_merge_whatever_its_size() -> None:
    ta = get_method("task_arithmetic")
    with_setup = dataclasses.replace(FIXED_RATES, setup_s=0.5)
    for works, workers in (([_work((1024,), ranks=(None,) * 4)], 1),
                           ([_work((4096, 1024), ranks=(None,) * 4)] * 3, 2)):
        plain = estimate(works, ta, workers, "cpu", cpu_rates=FIXED_RATES).cpu.seconds
        assert estimate(works, ta, workers, "cpu", cpu_rates=with_setup).cpu.seconds == pytest.approx(plain + 0.5)
    assert io_only_cpu_rates().setup_s == CPU_SETUP_SECONDS > 0
