"""Hub ids resolve through huggingface_hub's cache (no network here): a pre-filled local
cache folder, laid out exactly as huggingface_hub lays it out, stands in for the hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .conftest import run_cli
from .reference import load_folder, star, star_truncate

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: Path, repo_id: str, source: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_merge_hub_ids_from_a_local_cache(tiny_fp32: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    for name in ("base", "ft0", "ft1"):
        _cache_model(cache, f"tiny-org/{name}", tiny_fp32 / name)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli("merge", str(out), "--base-model", "tiny-org/base", "--model", "tiny-org/ft0",
                     "--model", "tiny-org/ft1", "--runtime", "local", "-q", env=env)
    assert result.returncode == 0, result.stderr
    merged = load_folder(out)
    base, ft0, ft1 = (load_folder(tiny_fp32 / n) for n in ("base", "ft0", "ft1"))
    for name in base:
        torch.testing.assert_close(merged[name], star(base[name], [ft0[name], ft1[name]]), rtol=1e-5, atol=1e-6)
    assert "base_model: tiny-org/base" in (out / "README.md").read_text()  # hub front matter


def test_uncached_hub_id_is_one_clear_error(tiny_fp32: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("merge", str(tmp_path / "out"), "--base-model", str(tiny_fp32 / "base"),
                     "--model", "nobody/not-cached", "--runtime", "local", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/not-cached" in lines[0] and "hub" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def _write_adapter(folder: Path, base: dict[str, torch.Tensor], module: str, rank: int, alpha: float) -> None:
    """A minimal PEFT LoRA adapter folder, as `save_pretrained` lays it out."""
    from safetensors.torch import save_file

    out_features, in_features = base[f"{module}.weight"].shape
    gen = torch.Generator().manual_seed(3)
    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": torch.randn(rank, in_features, generator=gen),
            f"base_model.model.{module}.lora_B.weight": torch.randn(out_features, rank, generator=gen) * 0.1,
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [module.split(".")[-1]]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_and_revision_hub_ids(tiny_fp32: Path, tmp_path: Path) -> None:
    """A PEFT adapter by hub id, and `org/name@revision` pinned to a cached commit."""
    cache = tmp_path / "hub"
    base = load_folder(tiny_fp32 / "base")
    module = "model.layers.1.self_attn.v_proj"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    _write_adapter(adapter, base, module, rank=4, alpha=8.0)
    _cache_model(cache, "tiny-org/base", tiny_fp32 / "base")
    _cache_model(cache, "tiny-org/lora", adapter)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli("merge", str(out), "--base-model", f"tiny-org/base@{COMMIT}", "--model", "tiny-org/lora",
                     "--runtime", "local", "-q", env=env)
    assert result.returncode == 0, result.stderr

    merged = load_folder(out)
    factors = load_folder_file(adapter / "adapter_model.safetensors")
    a = factors[f"base_model.model.{module}.lora_A.weight"]
    b = factors[f"base_model.model.{module}.lora_B.weight"]
    name = f"{module}.weight"
    tau = (8.0 / 4) * b.double() @ a.double()  # τ = (alpha / r)·B·A, exact in float64
    expected = base[name].double() + star_truncate(tau, 40)  # one model: the mean is itself
    torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6 * float(tau.abs().max()))
    for other in base.keys() - {name}:  # modules the adapter leaves alone keep the base
        assert torch.equal(merged[other], base[other]), other


def load_folder_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
