"""LoRA adapters made by PEFT itself: merged through their factors, checked against PEFT's
own merge_and_unload (an independent computation of every τ_i = s·B·A), as full models and
as one merged PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import star_dist
from star_dist.errors import ConfigError, InputError
from star_dist.tiny_models import make_tiny_merge

from .conftest import folder_bytes, run_cli
from .reference import load_folder, star

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# (rank, targets, extra LoraConfig settings): different ranks, targets, rsLoRA, patterns.
ADAPTERS = [
    (4, ["q_proj", "v_proj"], {}),
    (8, ["q_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    (6, ["q_proj", "k_proj", "o_proj", "gate_proj"],
     {"rank_pattern": {"o_proj": 3}, "alpha_pattern": {"k_proj": 5.0}}),
]


def _make_adapter(base: Path, out: Path, rank: int, targets: list[str], extra: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **extra)
    peft.get_peft_model(model, config).save_pretrained(out)


def _peft_merged(base: Path, adapter: Path, out: Path) -> None:
    """PEFT's own merge of one adapter into the base: an independent τ = W − W_base."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    make_tiny_merge(root, n_models=0, dtype="float32", shards=2)
    for i, (rank, targets, extra) in enumerate(ADAPTERS):
        _make_adapter(root / "base", root / f"lora{i}", rank, targets, extra, seed=i)
        _peft_merged(root / "base", root / f"lora{i}", root / f"full{i}")
    return root


def _config(root: Path, prefix: str, **extra) -> dict:
    return {
        "merge_method": "star",
        "base_model": str(root / "base"),
        "models": [str(root / f"{prefix}{i}") for i in range(len(ADAPTERS))],
        "parameters": {"eta": 40},
        **extra,
    }


def test_adapter_keys_and_scales_match_peft(lora_models: Path) -> None:
    plan = star_dist.plan(_config(lora_models, "lora"))
    rs, patterned = plan.inputs[1], plan.inputs[2]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert rs.sources[q].scale == pytest.approx(16 / 8**0.5)  # rsLoRA: alpha / sqrt(r)
    assert patterned.sources["model.layers.1.self_attn.o_proj.weight"].rank == 3
    assert patterned.sources["model.layers.1.self_attn.k_proj.weight"].scale == pytest.approx(5.0 / 6)
    assert plan.inputs[0].source_for("model.layers.0.mlp.up_proj.weight", None) is None  # untouched
    assert plan.n_svds == sum(len(a.sources) for a in plan.inputs)


def test_lora_star_equals_the_dense_definition(lora_models: Path, tmp_path: Path) -> None:
    star_dist.merge(_config(lora_models, "lora"), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base = load_folder(lora_models / "base")
    fulls = [load_folder(lora_models / f"full{i}") for i in range(len(ADAPTERS))]
    for name in base:
        expected = star(base[name], [f[name] for f in fulls])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_factorized_path_equals_dense_path(lora_models: Path, tmp_path: Path) -> None:
    """Adapters (factorized SVD) and PEFT-merged full checkpoints (dense SVD) agree: same
    kept ranks, same weights."""
    star_dist.merge(_config(lora_models, "lora"), tmp_path / "lora", quiet=True)
    star_dist.merge(_config(lora_models, "full"), tmp_path / "dense", quiet=True)
    lora, dense = load_folder(tmp_path / "lora"), load_folder(tmp_path / "dense")
    for name in lora:
        torch.testing.assert_close(lora[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)
    lora_report = json.loads((tmp_path / "lora" / "merge_report.json").read_text())["tensors"]
    dense_report = json.loads((tmp_path / "dense" / "merge_report.json").read_text())["tensors"]
    for name, entry in lora_report.items():
        if entry.get("kept_rank"):
            dense_ranks = dense_report[name]["kept_rank"]
            assert [r or 0 for r in entry["kept_rank"]] == [r for r in dense_ranks], name


def test_adapter_output_loads_in_peft_and_equals_the_full_merge(lora_models: Path, tmp_path: Path) -> None:
    star_dist.merge(_config(lora_models, "lora"), tmp_path / "full", quiet=True)
    result = star_dist.merge(_config(lora_models, "lora", output_format="adapter"), tmp_path / "adapter", quiet=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "merge_report.json"} <= set(result.files)
    assert "config.json" not in result.files
    report = json.loads((tmp_path / "adapter" / "merge_report.json").read_text())["tensors"]
    q = report["model.layers.0.self_attn.q_proj.weight"]
    assert q["adapter_rank"] == sum(r for r in q["kept_rank"] if r)  # rank = the sum of kept ranks
    model = transformers.AutoModelForCausalLM.from_pretrained(lora_models / "base")
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    state = merged.state_dict()
    full = load_folder(tmp_path / "full")
    for name, value in full.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_output_for_task_arithmetic_is_exact(lora_models: Path, tmp_path: Path) -> None:
    cfg = _config(lora_models, "lora", output_format="adapter", merge_method="task_arithmetic")
    cfg["parameters"] = {"lambda": 0.7}
    star_dist.merge(cfg, tmp_path / "adapter", quiet=True)
    base = load_folder(lora_models / "base")
    fulls = [load_folder(lora_models / f"full{i}") for i in range(len(ADAPTERS))]
    model = transformers.AutoModelForCausalLM.from_pretrained(lora_models / "base")
    state = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    for name in base:
        expected = base[name] + 0.7 * sum(f[name] - base[name] for f in fulls)
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.ray
def test_lora_on_ray_gives_the_same_bytes(ray_cluster, lora_models: Path, tmp_path: Path) -> None:
    for fmt in ("model", "adapter"):
        cfg = _config(lora_models, "lora", output_format=fmt)
        star_dist.merge(cfg, tmp_path / f"local_{fmt}", quiet=True, max_shard_size="100kB")
        star_dist.merge(cfg, tmp_path / f"ray_{fmt}", runtime="ray", quiet=True, max_shard_size="100kB")
        expected = folder_bytes(tmp_path / f"local_{fmt}")
        assert expected and folder_bytes(tmp_path / f"ray_{fmt}") == expected, fmt


def test_fan_in_fan_out_gpt2_adapters(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights as (in, out): PEFT's fan_in_fan_out adapters."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    for i in range(2):
        torch.manual_seed(10 + i)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                               init_lora_weights=False)
        peft.get_peft_model(model, lora).save_pretrained(tmp_path / f"lora{i}")
        _peft_merged_gpt2 = peft.PeftModel.from_pretrained(
            transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / f"lora{i}"
        ).merge_and_unload()
        _peft_merged_gpt2.save_pretrained(tmp_path / f"full{i}")
    cfg = {"merge_method": "star", "base_model": str(tmp_path / "base"),
           "models": [str(tmp_path / "lora0"), str(tmp_path / "lora1")]}
    star_dist.merge(cfg, tmp_path / "out", quiet=True)
    star_dist.merge({**cfg, "output_format": "adapter"}, tmp_path / "adapter", quiet=True)
    merged = load_folder(tmp_path / "out")
    base = load_folder(tmp_path / "base")
    fulls = [load_folder(tmp_path / f"full{i}") for i in range(2)]
    state = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).merge_and_unload().state_dict()
    for name in base:
        if not base[name].is_floating_point():
            continue
        expected = star(base[name], [f[name] for f in fulls])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(state[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)


def _edit_adapter_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_adapters_are_clear_errors(lora_models: Path, tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(lora_models / "lora0", dora)
    _edit_adapter_config(dora, use_dora=True)
    cfg = {"base_model": str(lora_models / "base"), "models": [str(dora)]}
    with pytest.raises(InputError, match="DoRA"):
        star_dist.plan(cfg)
    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(lora_models / "lora0", wrong_rank)
    _edit_adapter_config(wrong_rank, r=5)
    with pytest.raises(InputError, match="has rank 4 but adapter_config.json says 5"):
        star_dist.plan({**cfg, "models": [str(wrong_rank)]})
    with pytest.raises(ConfigError, match="ties cannot produce an adapter"):
        star_dist.plan({**_config(lora_models, "lora", output_format="adapter"), "merge_method": "ties",
                        "parameters": {"density": 0.5}})
    with pytest.raises(InputError, match="needs LoRA adapter inputs"):
        star_dist.plan(_config(lora_models, "full", output_format="adapter"))


def test_adapter_for_another_architecture_fails_in_plan(lora_models: Path, tmp_path: Path) -> None:
    from star_dist.tiny_models import TinyShape

    make_tiny_merge(tmp_path / "wide", n_models=0, dtype="float32", shape=TinyShape(hidden=96, heads=4), shards=1)
    out = tmp_path / "out"
    result = run_cli("merge", str(out), "--base-model", str(tmp_path / "wide" / "base"),
                     "--model", str(lora_models / "lora0"), "--runtime", "local")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter_model.safetensors" in lines[0] and "another architecture" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_adapters_with_trained_biases(tmp_path: Path, bias: str) -> None:
    """PEFT saves trained biases under the wrapped `base_layer`; they are full task vectors."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias,
                        init_lora_weights=False),
    )
    with torch.no_grad():  # make the trained biases differ from the base's
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "lora")
    peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "lora"
    ).merge_and_unload().save_pretrained(tmp_path / "full")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": [str(tmp_path / "lora")]}
    star_dist.merge(cfg, tmp_path / "out", quiet=True)
    merged, full = load_folder(tmp_path / "out"), load_folder(tmp_path / "full")
    assert any(not torch.equal(full[n], load_folder(tmp_path / "base")[n]) for n in full if n.endswith(".bias"))
    for name, value in full.items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
