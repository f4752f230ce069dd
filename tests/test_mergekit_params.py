"""mergekit's per-tensor parameters: gradients over the layer index, `filter:` conditionals,
defaults, checked against hand-computed values and plain torch (not against our engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import star_dist
from star_dist.config import MergeConfig
from star_dist.errors import ConfigError
from star_dist.mergekit_params import count_layers, evaluate, layer_position


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_gradient_interpolates_over_layer_position() -> None:
    assert evaluate([0, 0.3, 0.7, 1], "x", 0.0) == 0
    assert evaluate([0, 0.3, 0.7, 1], "x", 1.0) == 1
    assert evaluate([0, 0.3, 0.7, 1], "x", 0.5) == pytest.approx(0.5)  # halfway between 0.3 and 0.7
    assert evaluate([1, 0.7, 0.1], "x", 0.25) == pytest.approx(0.85)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight"]
    assert count_layers(names) == 5
    assert [layer_position(n, 5) for n in names] == [0, 0.25, 0.5, 0.75, 1, 0]  # outside layers: t = 0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1  # one layer: t = 1


def test_conditionals_first_match_then_default_then_none() -> None:
    setting = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0, 1]}, {"value": 0}]
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.5
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate(setting, "model.norm.weight", 0.0) == 0
    assert evaluate([{"filter": "mlp", "value": 2}], "model.norm.weight", 0.0) is None  # falls through


def _models(tiny: Path, n: int) -> list[dict[str, torch.Tensor]]:
    return [_load(tiny / f"ft{i}") for i in range(n)]


def test_task_arithmetic_per_tensor_weights_match_plain_torch(tiny_fp32: Path, tmp_path: Path) -> None:
    """A weight gradient on one model, filter-keyed weights on another, a top-level default."""
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_fp32 / "base"),
        "models": [
            {"model": str(tiny_fp32 / "ft0"), "parameters": {"weight": [0.2, 1.0]}},
            {"model": str(tiny_fp32 / "ft1"), "parameters": {"weight": [{"filter": "mlp", "value": 0.5},
                                                                         {"filter": "norm", "value": 2.0}]}},
        ],
        "parameters": {"weight": 0.25},  # ft1's weight outside mlp and norm tensors
        "dtype": "float32",
    }
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    star_dist.merge(tmp_path / "c.yml", tmp_path / "out", quiet=True)
    got = _load(tmp_path / "out")
    base = _load(tiny_fp32 / "base")
    ft0, ft1 = _models(tiny_fp32, 2)
    n_layers = 2
    for name, tensor in got.items():
        if not tensor.is_floating_point():
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if layer is None else layer / (n_layers - 1)
        w0 = 0.2 + (1.0 - 0.2) * t
        w1 = 0.5 if "mlp" in name else 2.0 if "norm" in name else 0.25
        want = base[name].double() + w0 * (ft0[name].double() - base[name].double()) \
            + w1 * (ft1[name].double() - base[name].double())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-6, msg=name)


def test_ties_density_gradient_equals_scalar_merges_layer_by_layer(tiny_fp32: Path, tmp_path: Path) -> None:
    """mergekit's examples/ties.yml shape: density [1, 0.7, 0.1] is 1 at layer 0 and outside the
    layers, 0.1 at the last layer (2 layers); each tensor equals the scalar merge at its value."""
    def cfg(density: object) -> dict:
        return {
            "merge_method": "ties", "base_model": str(tiny_fp32 / "base"),
            "models": [{"model": str(tiny_fp32 / "ft0"), "parameters": {"density": density, "weight": 1.0}},
                       {"model": str(tiny_fp32 / "ft1"), "parameters": {"density": 0.5, "weight": 0.7}}],
            "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32",
        }
    graded = _load(star_dist.merge(cfg([1, 0.7, 0.1]), tmp_path / "g", quiet=True).out_dir)
    at_one = _load(star_dist.merge(cfg(1.0), tmp_path / "one", quiet=True).out_dir)
    at_tenth = _load(star_dist.merge(cfg(0.1), tmp_path / "tenth", quiet=True).out_dir)
    differs = 0
    for name, tensor in graded.items():
        want = at_tenth[name] if name.startswith("model.layers.1.") else at_one[name]
        assert torch.equal(tensor, want), name
        differs += not torch.equal(at_one[name], at_tenth[name])
    assert differs > 3  # the two densities do give different tensors


def test_every_gradient_value_is_validated_with_its_key_path() -> None:
    with pytest.raises(ConfigError) as err:
        MergeConfig.from_dict({
            "merge_method": "ties", "base_model": "b",
            "models": [{"model": "x", "parameters": {"density": [1, 1.5], "weight": [0, "w"]}},
                       {"model": "y", "parameters": {"weight": {"filter": "mlp", "value": 1}}}],
        })
    message = str(err.value)
    assert "models[0].parameters.density: ties: density must be in (0, 1]" in message
    assert "models[0].parameters.weight 'w' is not a number" in message
    assert "models[1].parameters.weight: a conditional must be in a list" in message


def test_plan_is_per_tensor_only_when_asked() -> None:
    plain = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["x"]})
    graded = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b",
                                    "models": [{"model": "x", "parameters": {"density": [1, 0.5]}}]})
    assert not plain.per_tensor and graded.per_tensor
    assert graded.tensor_values("model.layers.3.mlp.up_proj.weight", 1.0)[1] == [{"density": 0.5}]
