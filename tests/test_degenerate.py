"""Degenerate but valid inputs: tensors with a zero-length dimension, and weights whose sum is ~0.

An empty tensor ((0, n), (m, 0), (0,)) is a legal safetensors entry that every method must
pass through with its shape and dtype (TIES used to index row 0 of it). Weights such as
0.1, 0.2, −0.3 sum to 5.6e-17, not 0: a method dividing by that sum would scale the merge
by ~1e16, so it is refused at plan time, and TIES's per-entry divisor treats it as the zero
it is (mergekit's rule for an exactly-zero divisor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import star_dist
from star_dist.errors import ConfigError
from star_dist.methods import METHODS, FoldMethod, JointMethod, LowRank, StreamingMethod, dense, get_method
from star_dist.tiny_models import DTYPES, TinyShape, llama_config, save_model

from . import reference
from .conftest import run_cli
from .methods.test_linear_ties import ties_reference
from .reference import average, load_folder, star, task_arithmetic, ties

EMPTY = {
    "model.layers.0.self_attn.empty_rows.weight": (0, 4),
    "model.layers.0.self_attn.empty_cols.weight": (3, 0),
    "model.layers.1.empty_vector": (0,),
    "model.layers.1.empty_both.weight": (0, 0),
}
FULL = {
    "model.layers.0.mlp.down_proj.weight": (6, 5),
    "model.layers.1.mlp.up_proj.weight": (5, 6),
    "model.norm.weight": (5,),
}
EVERY_METHOD = [*sorted(METHODS), "linear"]


def _models_with_empties(folder: Path, dtype: str, n: int = 2) -> None:
    """base/ and ft0/…: real safetensors checkpoints (2 shards) holding empty and full tensors."""
    g = torch.Generator().manual_seed(3)
    base = {name: torch.randn(shape, generator=g) for name, shape in {**FULL, **EMPTY}.items()}
    # Not a llama's tensors: a config.json that names no transformers architecture, so the
    # architecture check (verify.py) has nothing to compare them with and skips, as for any custom model.
    config = {**llama_config(TinyShape(), dtype), "architectures": ["EmptyTensorsTestModel"]}
    save_model(folder / "base", base, config, dtype, shards=2)
    for i in range(n):
        ft = {name: w + 0.1 * torch.randn(w.shape, generator=g) for name, w in base.items()}
        save_model(folder / f"ft{i}", ft, config, dtype, shards=2)


def _expected(method: str, base: torch.Tensor, fts: list[torch.Tensor]) -> torch.Tensor:
    """The plain definition of each method at its defaults (tests/reference.py)."""
    if method == "star":
        return star(base, fts)
    if method == "task_arithmetic":
        return task_arithmetic(base, fts, [1.0] * len(fts), 1.0)
    if method == "ties":
        return ties(base, fts, density=0.2)
    if method == "average":
        return average(fts)
    if method in ("tsv", "iso_c", "iso_cts"):
        return getattr(reference, method)(base, fts)
    assert method == "linear"  # mergekit's linear averages in a base_model not under models:
    return average([*fts, base])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_keeps_empty_tensors(tmp_path: Path, method: str, dtype: str) -> None:
    """Every method: each empty tensor comes out with its shape and dtype; full ones are right."""
    _models_with_empties(tmp_path, dtype)
    config = {"merge_method": method, "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)]}
    star_dist.merge(config, tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base, fts = load_folder(tmp_path / "base"), [load_folder(tmp_path / f"ft{i}") for i in range(2)]
    assert set(merged) == set(base)
    for name, shape in EMPTY.items():
        assert merged[name].shape == shape and merged[name].dtype == DTYPES[dtype], name
    for name in FULL:
        expected = _expected(method, base[name], [ft[name] for ft in fts])
        assert merged[name].dtype == DTYPES[dtype], name
        if dtype == "float32":
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        else:  # the float32 result cast once to bf16: within a bf16 rounding of the definition
            torch.testing.assert_close(merged[name].float(), expected, rtol=1e-2, atol=1e-2, msg=name)


def _lora_adapter(folder: Path, modules: dict[str, tuple[int, int]], seed: int) -> None:
    """A PEFT LoRA adapter (rank 2) for the given modules, empty ones included."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, in_features, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, 2, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets, "bias": "none",
         "fan_in_fan_out": False}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lora_adapters_on_empty_modules(tmp_path: Path, method: str) -> None:
    """An adapter may adapt an empty module (lora_B (0, r)): a full-model output keeps the empty
    shape, and an adapter output (streaming methods) has factors whose product is that shape."""
    _models_with_empties(tmp_path, "float32", n=1)
    modules = {"model.layers.0.self_attn.empty_rows": (0, 4), "model.layers.0.self_attn.empty_cols": (3, 0),
               "model.layers.0.mlp.down_proj": (6, 5)}
    for j in range(2):
        _lora_adapter(tmp_path / f"lora{j}", modules, seed=j)
    runs = [("model", ["ft0", "lora0"])]
    if issubclass(METHODS[method], StreamingMethod):
        runs.append(("adapter", ["lora0", "lora1"]))
    for output_format, models in runs:
        out = tmp_path / f"out_{output_format}"
        star_dist.merge({"merge_method": method, "base_model": str(tmp_path / "base"), "output_format": output_format,
                         "models": [{"model": str(tmp_path / m)} for m in models]}, out, quiet=True)
        if output_format == "model":
            merged = load_folder(out)
            for name, shape in EMPTY.items():
                assert merged[name].shape == shape and merged[name].dtype == torch.float32, name
            assert torch.isfinite(merged["model.layers.0.mlp.down_proj.weight"]).all()
            continue
        factors = load_file(str(out / "adapter_model.safetensors"))
        for module, shape in modules.items():
            b = factors[f"base_model.model.{module}.lora_B.weight"]
            a = factors[f"base_model.model.{module}.lora_A.weight"]
            assert (b @ a).shape == shape, module


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,), (0, 0)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_math_on_empty_task_vectors(method: str, shape: tuple[int, ...]) -> None:
    """The methods alone, as the engine calls them (transform, or prepare + merge_block), dense
    and low-rank: an empty update of the same shape and dtype, no LAPACK call on an empty matrix."""
    m = get_method(method)
    for dtype in (torch.float32, torch.float64):
        tau = torch.zeros(shape, dtype=dtype)
        if isinstance(m, StreamingMethod):
            update, _ = m.transform(tau)
            assert dense(update).shape == shape and dense(update).dtype == dtype
            if len(shape) == 2:  # a LoRA task vector s·B @ A of an empty module, rank 2
                low = LowRank(torch.zeros(shape[0], 2, dtype=dtype), torch.zeros(2, shape[1], dtype=dtype))
                update, _ = m.transform(low)
                assert dense(update).shape == shape and dense(update).dtype == dtype
        elif isinstance(m, FoldMethod):  # every pass, every model, dense then low-rank
            lows = [tau] if len(shape) != 2 else [tau, LowRank(torch.zeros(shape[0], 2, dtype=dtype),
                                                                torch.zeros(2, shape[1], dtype=dtype))]
            for value in lows:
                fold = m.fold(shape, 2)
                for step in range(fold.passes):
                    for i in range(2):
                        fold.add(value, 1.0, i, step)
                update, _ = fold.finish()
                assert dense(update).shape == shape and dense(update).dtype == dtype
        else:
            assert isinstance(m, JointMethod)
            rules = [m.prepare(tau, i) for i in range(3)]
            update = m.merge_block([tau, tau, tau], [0.1, 0.2, -0.3], rules, 0)
            assert update.shape == shape and update.dtype == dtype


# -- weights that sum to ~0 -------------------------------------------------------------------


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _weighted(folder: Path, weights: list) -> list[dict]:
    return [{"model": str(folder / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(weights)]


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"merge_method": "average", "weights": [0.1, 0.2, -0.3]}, ["average:", "0.1 + 0.2 + -0.3", "sum to 0"]),
        ({"merge_method": "linear", "weights": [0.1, 0.2, -0.3], "no_base": True}, ["0.1 + 0.2 + -0.3"]),
        ({"merge_method": "task_arithmetic", "weights": [1000.0, -999.99999], "parameters": {"normalize": True}},
         ["task_arithmetic:", "1000.0 + -999.99999", "normalize: false"]),
        # A gradient that is fine at t = 0 but sums to ~0 on layer 1: refused per tensor, at plan time.
        ({"merge_method": "average", "weights": [[1.0, 0.1], [0.0, 0.2], [0.0, -0.3]]},
         ["tensor 'model.layers.1.", "sum to 0"]),
    ],
    ids=["average", "linear-no-base", "task_arithmetic-normalize", "average-gradient"],
)
def test_zero_sum_refused_by_the_cli(tiny_fp32: Path, tmp_path: Path, config: dict, fragments: list[str]) -> None:
    """One stderr line naming the weights and the fix, exit 2, no output folder created."""
    spec = {"merge_method": config["merge_method"], "models": _weighted(tiny_fp32, config["weights"]),
            "parameters": config.get("parameters", {})}
    if not config.get("no_base"):
        spec["base_model"] = str(tiny_fp32 / "base")
    path = _write_config(tmp_path / "merge.yaml", spec)
    out = tmp_path / "out"
    for command in ("merge", "plan"):
        args = [command, str(path), *([str(out), "--runtime", "local", "--quiet"] if command == "merge" else [])]
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()  # notes (linear read as average) may come first
        errors = [line for line in lines if not line.startswith("star-dist: note: ")]
        assert len(errors) == 1 and errors[0].startswith("star-dist: error: "), result.stderr
        for part in fragments:
            assert part in errors[0], (part, errors[0])
        assert not out.exists()


def test_zero_sum_refused_in_process_before_any_write(tiny_fp32: Path, tmp_path: Path) -> None:
    config = {"merge_method": "average", "base_model": str(tiny_fp32 / "base"),
              "models": _weighted(tiny_fp32, [0.1, 0.2, -0.3])}
    with pytest.raises(ConfigError, match=r"^average: the model weights sum to 0 \(\[0\.1, 0\.2, -0\.3\]\)"):
        star_dist.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_small_but_real_sums_are_divided_by() -> None:
    """Only ~0 next to the weights' size is refused: 1 − 0.5, 1 − 0.999 and 1e-9 + 1e-9 are real sums."""
    avg = get_method("average")
    assert avg.resolve_weights([1.0, -0.5]) == [2.0, -1.0]
    assert avg.resolve_weights([1e-9, 1e-9]) == [0.5, 0.5]
    assert avg.resolve_weights([1.0, -0.999]) == pytest.approx([1000.0, -999.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        avg.resolve_weights([1.0, -1.0 + 1e-12])
    with pytest.raises(ConfigError, match="sum to 0"):
        avg.resolve_weights([0.0, 0.0])
    assert get_method("average", {"normalize": False}).resolve_weights([0.1, 0.2, -0.3]) == [0.1, 0.2, -0.3]
    ta = get_method("task_arithmetic", {"normalize": True})
    assert ta.resolve_weights([1.0, -0.5]) == [2.0, -1.0]
    assert ta.resolve_weights([0.1, 0.2, -0.3]) == [0.1, 0.2, -0.3]  # |Σw| < 1e-8: ÷ 1, as mergekit


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_near_zero_legit_sum_accepted_by_the_cli(tiny_fp32: Path, tmp_path: Path, method: str) -> None:
    """Weights 1 and −0.5 with normalize: W = base + (τ_0 − 0.5 τ_1) / 0.5, i.e. 2 W_0 − W_1."""
    spec = {"merge_method": method, "base_model": str(tiny_fp32 / "base"), "models": _weighted(tiny_fp32, [1, -0.5]),
            "parameters": {"normalize": True}}
    result = run_cli("merge", str(_write_config(tmp_path / "merge.yaml", spec)), str(tmp_path / "out"),
                     "--runtime", "local", "--quiet")
    assert result.returncode == 0, result.stderr
    merged, base = load_folder(tmp_path / "out"), load_folder(tiny_fp32 / "base")
    ft0, ft1 = load_folder(tiny_fp32 / "ft0"), load_folder(tiny_fp32 / "ft1")
    for name, value in merged.items():
        expected = task_arithmetic(base[name], [ft0[name], ft1[name]], [2.0, -1.0], 1.0)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=name)


# -- TIES's per-entry divisor ------------------------------------------------------------------


def _ties_mergekit(taus: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """TIES at density 1 with mergekit's disjoint merge in float64, elementwise: Σ_A w_i τ_i over
    the agreeing models A, divided by Σ_A w_i unless that is 0, here 0 up to rounding
    (|Σ_A w_i| ≤ 1e-6 Σ_A |w_i|), when mergekit's rule for a zero divisor (÷ 1) applies."""
    flat = [t.reshape(-1) for t in taus]
    out = np.zeros_like(flat[0])
    for p in range(out.size):
        values = [w * t[p] for w, t in zip(weights, flat, strict=True)]
        gamma = 1.0 if sum(values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if np.sign(v) == gamma]
        divisor = sum(weights[i] for i in agree)
        size = sum(abs(weights[i]) for i in agree)
        out[p] = sum(values[i] for i in agree) / (1.0 if abs(divisor) <= 1e-6 * size else divisor)
    return out.reshape(taus[0].shape)


def test_ties_divisor_zero_up_to_rounding_is_one(tiny_fp32: Path, tmp_path: Path) -> None:
    """Weights 0.3, 0.6, −0.9: where all three agree the divisor is 5.96e-8 in float32 (−1.1e-16
    in float64), not 0; dividing by it scaled those entries by ~1e7. It is the zero it is."""
    weights = [0.3, 0.6, -0.9]
    spec = {"merge_method": "ties", "base_model": str(tiny_fp32 / "base"), "models": _weighted(tiny_fp32, weights),
            "parameters": {"density": 1.0}}
    star_dist.merge(spec, tmp_path / "out", quiet=True)
    merged, base = load_folder(tmp_path / "out"), load_folder(tiny_fp32 / "base")
    fts = [load_folder(tiny_fp32 / f"ft{i}") for i in range(3)]
    hit = 0
    for name, value in merged.items():
        taus = [(ft[name].double() - base[name].double()).numpy() for ft in fts]
        agree_all = (np.sign(taus[0]) == np.sign(taus[1])) & (np.sign(taus[1]) == -np.sign(taus[2]))
        hit += int(agree_all.sum())
        expected = base[name].double() + torch.from_numpy(_ties_mergekit(taus, weights))
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    assert hit > 100  # the degenerate divisor was met, many times


def test_ties_mixed_sign_weights_match_the_reference() -> None:
    """Mixed signs with no ~0 subset sum (1, −0.5, 0.25): the unchanged mergekit disjoint mean."""
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(7, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, -0.5, 0.25]
    m = get_method("ties", {"density": 0.6})
    got = m.merge_block(taus, weights, [m.prepare(t, i) for i, t in enumerate(taus)], 0)
    expected = ties_reference([t.numpy() for t in taus], weights, 0.6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
