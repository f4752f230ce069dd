"""star-dist verify: tiny real outputs checked against the architecture their config.json builds
(transformers on the meta device), broken on purpose, through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import star_dist
from star_dist.tiny_models import TinyShape, make_tiny_merge
from tests.conftest import run_cli, run_cli_all

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def merged(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real STAR merge of the fp32 tiny models (one model.safetensors), made once."""
    out = tmp_path_factory.mktemp("verify") / "merged"
    result = star_dist.merge(tiny_fp32 / "merge.yaml", out, quiet=True)
    assert result.verification.startswith(f"verified {out}: 21 tensors match LlamaForCausalLM")
    return out


def _broken(merged: Path, tmp_path: Path, edit) -> Path:
    """A copy of the merge with its weights edited (the shard rewritten as a real safetensors file)."""
    out = tmp_path / "broken"
    shutil.copytree(merged, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-dist: error: "), proc.stderr
    return lines[0]


def test_verify_passes_a_real_merge(merged: Path) -> None:
    proc = run_cli("verify", str(merged))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"verified {merged}: 21 tensors match LlamaForCausalLM from config.json"


def test_missing_tensor(merged: Path, tmp_path: Path) -> None:
    out = _broken(merged, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = _one_error_line(run_cli("verify", str(out)))
    assert f"{out}: does not match the LlamaForCausalLM its config.json describes" in line
    assert "tensor 'model.layers.1.mlp.up_proj.weight' is missing (LlamaForCausalLM needs shape [128, 64])" in line


def test_wrong_shape_names_the_file(merged: Path, tmp_path: Path) -> None:
    def transpose(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].T.contiguous()

    line = _one_error_line(run_cli("verify", str(_broken(merged, tmp_path, transpose))))
    assert ("model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape [128, 64], "
            "LlamaForCausalLM expects [64, 128]") in line


def test_extra_tensor_fails_verify_and_warns_in_plan_and_lenient(merged: Path, tmp_path: Path) -> None:
    """transformers drops an extra tensor at load: `verify` fails on it, `--lenient` and the plan
    (whose base may carry old buffers such as rotary inv_freq) only warn."""
    out = _broken(merged, tmp_path, lambda t: t.update({"model.layers.0.mlp.gate.bias": torch.zeros(4)}))
    line = _one_error_line(run_cli("verify", str(out)))
    assert ("tensor 'model.layers.0.mlp.gate.bias' is stored but LlamaForCausalLM has no such tensor "
            "(transformers drops it at load)") in line
    proc = run_cli("verify", str(out), "--lenient")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("warning: 1 stored tensor(s) that transformers drops at load "
                                        "('model.layers.0.mlp.gate.bias')")
    plan = star_dist.plan({"merge_method": "average", "base_model": str(out), "models": [{"model": str(out)}]})
    assert f"base model {out}: 1 stored tensor(s) that transformers drops at load" in plan.warnings[0]


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models whose config ties lm_head to the embedding (stored once, as save_pretrained does)."""
    folder = tmp_path_factory.mktemp("tied")
    make_tiny_merge(folder, n_models=2, dtype="float32", shards=1, shape=TinyShape(tie_embeddings=True))
    return folder


def test_tied_group_stored_once_passes_and_twice_fails(tied: Path, tmp_path: Path) -> None:
    proc = run_cli("verify", str(tied / "base"))
    assert proc.returncode == 0, proc.stderr
    assert "20 tensors match LlamaForCausalLM from config.json; tied lm_head.weight = model.embed_tokens.weight" \
        in proc.stdout
    twice = _broken(tied / "base", tmp_path,
                    lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    line = _one_error_line(run_cli("verify", str(twice)))
    assert "tensor 'model.embed_tokens.weight' is tied to 'lm_head.weight' by config.json but both are stored" in line


def test_plan_checks_the_base_against_its_own_config(tiny_copy: Path, tmp_path: Path) -> None:
    """A base whose config.json disagrees with its weights fails in plan, before any write."""
    config_path = tiny_copy / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 96}))
    out = tmp_path / "out"
    line = _one_error_line(run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local"))
    assert f"base model {tiny_copy / 'base'}: does not match the LlamaForCausalLM its config.json describes" in line
    assert "has shape [64, 128], LlamaForCausalLM expects [64, 96]" in line and "and 1 more" in line
    assert not out.exists()


def test_skips_with_a_note_without_transformers_or_config(merged: Path, tmp_path: Path) -> None:
    """transformers is an optional extra: without it (import blocked) the check is skipped, not failed."""
    code = ("import sys; sys.modules['transformers'] = None; from star_dist.cli import main; "
            f"sys.exit(main(['verify', {str(merged)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "pip install 'star-dist[verify]'" in proc.stdout
    bare = tmp_path / "bare"
    shutil.copytree(merged, bare)
    (bare / "config.json").unlink()
    proc = run_cli("verify", str(bare))
    assert proc.returncode == 0 and "skipped" in proc.stdout and "no config.json" in proc.stdout


def test_merge_runs_the_check_unless_no_verify(tiny_fp32: Path, tmp_path: Path) -> None:
    proc = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "a"), "--runtime", "local", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verification"].startswith(f"verified {tmp_path / 'a'}: 21 tensors")
    proc = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "b"), "--runtime", "local", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "verify: skipped (--no-verify)" in proc.stdout


def test_smoke_passes_a_real_merge_and_catches_a_scrambled_one(merged: Path, tmp_path: Path) -> None:
    """Finite, right shapes, values in the wrong places: only --smoke can tell."""

    def scramble(t: dict[str, torch.Tensor]) -> None:
        g = torch.Generator().manual_seed(0)
        for name, w in t.items():
            if w.dim() == 2:  # same values, same norms, wrong places
                t[name] = w.flatten()[torch.randperm(w.numel(), generator=g)].reshape(w.shape)

    scrambled = _broken(merged, tmp_path, scramble)
    sound, broken = run_cli_all(("verify", str(merged), "--smoke"), ("verify", str(scrambled), "--smoke"))
    assert sound.returncode == 0, sound.stderr
    assert "smoke: next-token loss" in sound.stdout and sound.stdout.strip().endswith(": ok")
    line = _one_error_line(broken)
    assert broken.stdout.startswith(f"verified {scrambled}")  # the architecture check cannot see it
    assert f"{scrambled}: the smoke test failed: next-token loss" in line and "FAILED" in line


def test_smoke_losses_are_ordered_as_the_threshold_assumes(merged: Path, tiny_fp32: Path) -> None:
    """The base's greedy text: base < merge < limit < chance (the limit is halfway base -> chance)."""
    from star_dist.smoke import smoke_test

    result = smoke_test(merged, tiny_fp32 / "base")
    assert result.base_loss < result.merged_loss < result.limit < result.chance_loss
    assert result.limit == pytest.approx((result.base_loss + result.chance_loss) / 2)


def test_adapter_output_is_checked_against_its_base(tmp_path: Path) -> None:
    """A merged PEFT adapter: the base it names, then every factor against the base's weights."""
    make_tiny_merge(tmp_path, n_models=1, dtype="float32", shards=1, lora=2)
    out = tmp_path / "adapter"
    config = star_dist.load_config(tmp_path / "merge_lora.yaml").to_dict()
    result = star_dist.merge({**config, "output_format": "adapter"}, out, quiet=True)
    assert result.verification == (f"verified {out}: 4 tensors match its base {tmp_path / 'base'} "
                                   "(LlamaForCausalLM)")
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 32)  # (r, in) with in = 32, where q_proj takes 64
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    line = _one_error_line(run_cli("verify", str(out)))
    assert f"{out}: the adapter does not fit its base {tmp_path / 'base'}:" in line
    assert "module 'model.layers.0.self_attn.q_proj'" in line


def test_architecture_cache_round_trip_and_bad_entries(merged: Path, architecture_cache: Path) -> None:
    """A built architecture is kept under its config.json's key; a corrupt entry is rebuilt."""
    from star_dist import arch_cache
    from star_dist.verify import _build_on_meta, build_architecture

    key = arch_cache.cache_key(merged / "config.json")
    fresh = _build_on_meta(merged)
    assert build_architecture(merged) == fresh  # the merge's own check stored it
    entry = architecture_cache / "architectures" / f"{key}.json"
    assert entry.is_file()
    entry.write_text("{not json")
    assert build_architecture(merged) == fresh and json.loads(entry.read_text())["name"] == "LlamaForCausalLM"
