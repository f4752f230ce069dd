"""Iso-C and Iso-CTS: against the authors' algorithm (tests/reference.py), LoRA factors vs dense,
the engine in-process and on Ray (with TSV-M)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import star_dist
from star_dist.errors import ConfigError
from star_dist.methods import IsoC, IsoCts, IsoCtsParams, get_method
from star_dist.methods.iso_cts import subspace_split

from .. import reference
from ..conftest import folder_bytes, run_cli
from ..reference import load_folder
from .family import decaying, lora_folders, low_rank, run_fold

METHODS = {"iso_c": (IsoC, reference.iso_c), "iso_cts": (IsoCts, reference.iso_cts)}


def _close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * float(expected.abs().max()))


# -- parameters and the subspace split ---------------------------------------------------------


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_common_space_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"^iso_cts: common_space_fraction must be"):
        IsoCtsParams(common_space_fraction=fraction)


def test_parameters() -> None:
    assert IsoCts().params_dict() == {"common_space_fraction": 0.8} and IsoC().params_dict() == {}
    assert get_method("iso_cts", {"common_space_fraction": "0.5", "lambda": 2}).params_dict() == {
        "common_space_fraction": 0.5}
    with pytest.raises(ConfigError, match=r"^iso_c: unknown parameter\(s\) 'common_space_fraction'"):
        get_method("iso_c", {"common_space_fraction": 0.5})


@pytest.mark.parametrize(("k", "n", "f", "expected"), [
    (64, 3, 0.8, (52, 4)),  # ⌊51.2⌋ = 51, round(13/3) = 4: the authors' 52 common, 4 per task
    (768, 8, 0.8, (616, 19)),  # ViT-B/16, 8 tasks: ⌊614.4⌋ = 614, round(154/8) = 19 → 616 common
    (10, 4, 0.8, (10, 0)),  # round(2/4) = 0 (banker's rounding, as Python's round)
    (3, 2, 0.0, (1, 1)),  # round(3/2) = 2 would need 4 > k directions: capped at ⌊k/N⌋
    (16, 2, 1.0, (16, 0)),  # f = 1: Iso-C
])
def test_subspace_split_rounds_as_the_authors(k: int, n: int, f: float, expected: tuple[int, int]) -> None:
    common = int(k * f)
    authors = (k - round((k - common) / n) * n, round((k - common) / n))
    c, d = subspace_split(k, n, f)
    assert (c, d) == expected and c + n * d == k
    if authors[0] >= 0:  # where the authors' rounding asks for at most k directions, the same
        assert (c, d) == authors


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize(("m", "n", "n_models"), [(48, 40, 3), (40, 48, 2), (30, 36, 7)])
def test_matrices_equal_the_authors_code(name: str, m: int, n: int, n_models: int) -> None:
    """Full-rank task vectors: exactly the published algorithm (no σ near the rounding floor)."""
    method, ref = METHODS[name]
    taus = [decaying(m, n, seed=i + n) for i in range(n_models)]
    got, stats = run_fold(method(), taus)
    _close(got, ref(torch.zeros(m, n), taus, floor=False))
    rank = stats["rank"] if name == "iso_c" else stats["common_rank"] + sum(stats["task_ranks"])
    assert rank == min(m, n)


def test_iso_c_spectrum_is_flat_and_keeps_the_nuclear_norm() -> None:
    taus = [decaying(40, 32, seed=s) for s in range(3)]
    got, stats = run_fold(IsoC(), taus, [1.0, 2.0, 0.5])
    s_sum = torch.linalg.svdvals((taus[0] + 2 * taus[1] + 0.5 * taus[2]).double())
    s_got = torch.linalg.svdvals(got.double())
    torch.testing.assert_close(s_got, torch.full_like(s_got, float(s_sum.mean())), rtol=1e-5, atol=0)
    assert stats["sigma_mean"] == pytest.approx(float(s_sum.mean()), rel=1e-12)


def test_iso_cts_directions_and_fraction_one_is_iso_c() -> None:
    taus = [decaying(40, 32, seed=s, decay=0.8) for s in range(3)]
    _, stats = run_fold(IsoCts(), taus)
    assert stats["common_rank"] == 26 and stats["task_ranks"] == [2, 2, 2]  # ⌊25.6⌋ = 25, round(7/3) = 2
    weights = [1.0, -0.5, 2.0]
    got, _ = run_fold(IsoCts(IsoCtsParams(0.5)), taus, weights)
    _close(got, reference.iso_cts(torch.zeros(40, 32), taus, fraction=0.5, weights=weights, floor=False))
    all_common, _ = run_fold(IsoCts(IsoCtsParams(1.0)), taus)
    _close(all_common, run_fold(IsoC(), taus)[0], rel=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_vectors_are_averaged_and_zero_sums_stay_zero(name: str) -> None:
    method = METHODS[name][0]()
    got, _ = run_fold(method, [torch.full((3, 2, 2), float(i)) for i in range(3)])
    torch.testing.assert_close(got, torch.full((3, 2, 2), 1.0))  # not a matrix: (1/N) Σ w_i τ_i
    a, b = decaying(12, 10, seed=3), decaying(12, 10, seed=4)
    taus = [a, b, -(a + b)]  # Σ τ = 0 exactly in float32, summed in this order
    got, stats = run_fold(method, taus)
    if name == "iso_c":
        assert torch.equal(got, torch.zeros(12, 10)) and stats["rank"] == 0
    else:  # nothing in common: each task keeps its own top direction, with the mean σ
        assert stats["common_rank"] == 0 and stats["task_ranks"] == [1, 1, 1]
        _close(got, reference.iso_cts(torch.zeros(12, 10), taus))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_lora_factors_equal_the_dense_route(name: str) -> None:
    """Σ B_i A_i has rank ≤ Σ r_i: its k − Σ r_i other σ are float rounding on the dense route
    (dropped by the floor) and absent on the factor route, which never forms the m×n matrix."""
    method, ref = METHODS[name]
    lows = [low_rank(48, 40, r, seed=r) for r in (4, 6, 3)]
    fold = method().fold((48, 40), 3)
    for step in range(fold.passes):
        for i, lo in enumerate(lows):
            fold.add(lo, 1.0, i, step)
    update, stats = fold.finish()
    assert update.rank == 13  # a LowRank: U⊥ (48, 13), V⊥ᵀ (13, 40)
    dense_taus = [lo.dense() for lo in lows]
    expected, dense_stats = run_fold(method(), dense_taus)
    _close(update.dense(), expected, rel=1e-5)
    _close(update.dense(), ref(torch.zeros(48, 40), dense_taus), rel=1e-5)
    assert {k: v for k, v in stats.items() if k != "sigma_mean"} == {
        k: v for k, v in dense_stats.items() if k != "sigma_mean"}
    # σ̄ is the mean of the 13 real singular values, not diluted by the 27 zeros of min(m, n) = 40
    s_out = torch.linalg.svdvals(update.dense().double())
    torch.testing.assert_close(s_out[:13], torch.full((13,), stats["sigma_mean"], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert float(s_out[13]) < 1e-6 * stats["sigma_mean"]
    if name == "iso_c":
        s_sum = torch.linalg.svdvals(sum(dense_taus).double())[:13]
        assert stats["sigma_mean"] == pytest.approx(float(s_sum.mean()), rel=1e-6)


# -- the engine --------------------------------------------------------------------------------


def _config(folder: Path, method: str, prefix: str = "ft", **params) -> dict:
    return {"merge_method": method, "base_model": str(folder / "base"),
            "models": [str(folder / f"{prefix}{i}") for i in range(3)], "parameters": params}


@pytest.mark.parametrize(("name", "params"), [("iso_c", {"lambda": 0.4}),
                                              ("iso_cts", {"lambda": 0.4, "common_space_fraction": 0.6})])
def test_merge_equals_the_reference_on_real_checkpoints(tiny_fp32: Path, tmp_path: Path, name: str,
                                                        params: dict) -> None:
    star_dist.merge(_config(tiny_fp32, name, **params), tmp_path / "out", quiet=True)
    merged, base = load_folder(tmp_path / "out"), load_folder(tiny_fp32 / "base")
    fts = [load_folder(tiny_fp32 / f"ft{i}") for i in range(3)]
    extra = {"fraction": 0.6} if name == "iso_cts" else {}
    for key, value in merged.items():
        expected = METHODS[name][1](base[key], [ft[key] for ft in fts], lam=0.4, **extra)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tensors"]
    assert report["model.layers.0.mlp.down_proj.weight"]["method"] == name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapters_merge_by_factors_like_their_full_checkpoints(tmp_path: Path, name: str) -> None:
    root = lora_folders(tmp_path / "in")
    star_dist.merge(_config(root, name, prefix="lora"), tmp_path / "lora", quiet=True)
    star_dist.merge(_config(root, name, prefix="full"), tmp_path / "full", quiet=True)
    lora, full = load_folder(tmp_path / "lora"), load_folder(tmp_path / "full")
    for key in lora:
        torch.testing.assert_close(lora[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.ray
def test_the_family_on_ray_gives_the_in_process_bytes(ray_cluster, tmp_path: Path) -> None:
    """TSV-M, Iso-C, Iso-CTS through the unchanged Ray runtime: 2 workers, the same bytes."""
    root = lora_folders(tmp_path / "in", n=2)
    for name in ("tsv", "iso_c", "iso_cts"):
        config = {"merge_method": name, "base_model": str(root / "base"),
                  "models": [str(root / "full0"), str(root / "lora1")]}  # dense and factor inputs mixed
        star_dist.merge(config, tmp_path / f"local_{name}", quiet=True, max_shard_size="100kB")
        star_dist.merge(config, tmp_path / f"ray_{name}", runtime="ray", workers=2, quiet=True,
                        max_shard_size="100kB")
        expected = folder_bytes(tmp_path / f"local_{name}")
        assert len(expected) > 1 and folder_bytes(tmp_path / f"ray_{name}") == expected, name


def test_the_cli_plans_the_family(tiny_fp32: Path) -> None:
    """`--method` switches a STAR config to Iso-CTS (η dropped); plan states what a worker holds."""
    plan = run_cli("plan", str(tiny_fp32 / "merge.yaml"), "--method", "iso_cts", "--lambda", "0.8")
    assert plan.returncode == 0, plan.stderr
    assert "method      iso_cts" in plan.stdout
    assert "iso_cts holds the running sum of one matrix" in plan.stdout
    assert "reads every input matrix twice" in plan.stdout
