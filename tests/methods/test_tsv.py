"""TSV-M: against the authors' algorithm (tests/reference.py), LoRA factors vs dense, the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import star_dist
from star_dist.errors import ConfigError
from star_dist.methods import LowRank, Tsv, TsvParams, get_method

from .. import reference
from ..reference import load_folder
from .family import decaying, lora_folders, low_rank, run_fold


def _zero_base(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape)


def test_no_own_parameters_and_alpha_is_lambda() -> None:
    assert TsvParams() == TsvParams() and Tsv().params_dict() == {}
    with pytest.raises(ConfigError, match=r"^tsv: unknown parameter\(s\) 'alpha'; valid parameters: none "
                                          r"\(plus the engine's lambda and weight\)$"):
        get_method("tsv", {"alpha": 1.0})
    assert Tsv().resolve_weights([None, 2.0]) == [1.0, 2.0]  # the authors' unweighted task vectors


@pytest.mark.parametrize(("m", "n", "n_models"), [(48, 40, 3), (40, 48, 3), (32, 32, 4), (30, 36, 7)])
def test_matrices_equal_the_authors_code(m: int, n: int, n_models: int) -> None:
    """Full-rank task vectors: exactly the published algorithm (no σ near the rounding floor)."""
    taus = [decaying(m, n, seed=i + m) for i in range(n_models)]
    got, stats = run_fold(Tsv(), taus)
    expected = reference.tsv(_zero_base((m, n)), taus, floor=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    r = min(m, n) // n_models
    assert stats == {"tsv_kept": [r] * n_models, "rank": r * n_models}


def test_orthogonalized_factors_and_kept_spectrum() -> None:
    """Δ = U⊥ Σ V⊥ᵀ with orthonormal U⊥, V⊥: its singular values are exactly the kept σ."""
    taus = [decaying(40, 36, seed=s) for s in range(3)]
    got, _ = run_fold(Tsv(), taus)
    kept = torch.cat([torch.linalg.svdvals(t.double())[:12] for t in taus])
    torch.testing.assert_close(torch.linalg.svdvals(got.double())[:36], kept.sort(descending=True).values,
                               rtol=1e-5, atol=1e-7)


def test_weights_scale_and_flip_each_task() -> None:
    taus = [decaying(24, 20, seed=s) for s in range(3)]
    weights = [0.5, -1.5, 2.0]
    got, _ = run_fold(Tsv(), taus, weights)
    expected = reference.tsv(_zero_base((24, 20)), taus, weights=weights, floor=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_vectors_are_averaged_and_more_models_than_directions_keep_nothing() -> None:
    vectors = [torch.full((5,), float(i)) for i in range(4)]
    got, _ = run_fold(Tsv(), vectors, [1.0, 1.0, 1.0, 2.0])
    torch.testing.assert_close(got, torch.full((5,), (0 + 1 + 2 + 6) / 4))  # (1/N) Σ w_i τ_i
    matrices = [decaying(3, 4, seed=s) for s in range(4)]  # k = 3 < N = 4: ⌊k/N⌋ = 0
    got, stats = run_fold(Tsv(), matrices)
    assert torch.equal(got, torch.zeros(3, 4)) and stats == {"tsv_kept": [0] * 4, "rank": 0}


def test_a_zero_or_missing_task_vector_adds_nothing() -> None:
    """A zero τ (a pooler no task used) has no directions: the authors' code would orthogonalize
    LAPACK's arbitrary basis for it against the others; here it is dropped, like a model
    that lacks the tensor, and ⌊k/N⌋ still counts it."""
    a, b = decaying(20, 16, seed=1), decaying(20, 16, seed=2)
    zero, _ = run_fold(Tsv(), [a, torch.zeros(20, 16), b])
    missing, stats = run_fold(Tsv(), [a, None, b])
    expected = reference.tsv(_zero_base((20, 16)), [a, torch.zeros(20, 16), b])
    torch.testing.assert_close(zero, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(missing, zero, rtol=0, atol=1e-12)
    assert stats["tsv_kept"] == [5, None, 5]


def test_lora_factors_equal_the_dense_route() -> None:
    """B·A never formed: the exact SVD of the factors gives the dense route's result, whose
    SVD has k − r directions at float rounding that the floor drops."""
    lows = [low_rank(48, 40, r, seed=r) for r in (4, 6, 3)]
    got, stats = run_fold(Tsv(), lows)
    dense_taus = [lo.dense() for lo in lows]
    expected, dense_stats = run_fold(Tsv(), dense_taus)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert stats == dense_stats == {"tsv_kept": [4, 6, 3], "rank": 13}
    torch.testing.assert_close(got, reference.tsv(_zero_base((48, 40)), dense_taus), rtol=0,
                               atol=1e-5 * float(expected.abs().max()))
    fold = Tsv().fold((48, 40), 3)
    for i, lo in enumerate(lows):
        fold.add(lo, 1.0, i, 0)
    assert isinstance(fold.finish()[0], LowRank)


def test_merge_equals_the_reference_on_real_checkpoints(tiny_fp32: Path, tmp_path: Path) -> None:
    config = {"merge_method": "tsv", "base_model": str(tiny_fp32 / "base"),
              "models": [{"model": str(tiny_fp32 / f"ft{i}"), "parameters": {"weight": w}}
                         for i, w in enumerate([1.0, 0.5, 1.0])],
              "parameters": {"lambda": 0.7}}
    star_dist.merge(config, tmp_path / "out", quiet=True)
    merged, base = load_folder(tmp_path / "out"), load_folder(tiny_fp32 / "base")
    fts = [load_folder(tiny_fp32 / f"ft{i}") for i in range(3)]
    for name, value in merged.items():
        expected = reference.tsv(base[name], [ft[name] for ft in fts], lam=0.7, weights=[1.0, 0.5, 1.0])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tensors"]
    assert report["model.layers.0.mlp.down_proj.weight"]["tsv_kept"] == [21, 21, 21]  # ⌊64/3⌋


def test_adapters_merge_by_factors_like_their_full_checkpoints(tmp_path: Path) -> None:
    root = lora_folders(tmp_path / "in")
    for prefix in ("lora", "full"):
        config = {"merge_method": "tsv", "base_model": str(root / "base"),
                  "models": [str(root / f"{prefix}{i}") for i in range(3)]}
        star_dist.merge(config, tmp_path / prefix, quiet=True)
    lora, full = load_folder(tmp_path / "lora"), load_folder(tmp_path / "full")
    for name in lora:
        torch.testing.assert_close(lora[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    config["models"] = [str(root / f"lora{i}") for i in range(3)]
    star_dist.merge({**config, "output_format": "adapter"}, tmp_path / "adapter", quiet=True)
    factors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    module = f"base_model.model.{name.removesuffix('.weight')}"
    b, a = factors[f"{module}.lora_B.weight"], factors[f"{module}.lora_A.weight"]
    base = load_folder(root / "base")
    torch.testing.assert_close(base[name] + b @ a, lora[name], rtol=1e-5, atol=1e-6)
    assert a.shape[0] == 12  # 3 adapters × rank 4, every direction kept (⌊64/3⌋ = 21 ≥ 4)


def test_plan_states_what_a_worker_holds(tiny_fp32: Path) -> None:
    config = {"merge_method": "tsv", "base_model": str(tiny_fp32 / "base"),
              "models": [str(tiny_fp32 / f"ft{i}") for i in range(3)]}
    summary = star_dist.plan(config).summary()
    assert "⌊k/N⌋ singular vector pairs" in summary["peak_memory_note"]
    m, n = 128, 64  # the largest matrix: mlp (intermediate 128 × hidden 64)
    assert summary["peak_memory_per_worker_bytes"] >= 8 * (m + n) * min(m, n)
