"""End-to-end merges in-process: numbers against the plain definitions, and the folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import star_dist
from star_dist.safetensors_format import read_header
from star_dist.tiny_models import TinyShape, make_tiny_merge

from .conftest import folder_bytes
from .reference import average, load_folder, star, task_arithmetic, ties


def _config(folder: Path, method: str, n: int = 3, **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(folder / "base"),
        "models": [{"model": str(folder / f"ft{i}")} for i in range(n)],
        "parameters": params,
    }


def _inputs(folder: Path, n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return load_folder(folder / "base"), [load_folder(folder / f"ft{i}") for i in range(n)]


@pytest.mark.parametrize("eta", [40, 75])
def test_star_equals_the_definition_fp32(tiny_fp32: Path, tmp_path: Path, eta: float) -> None:
    star_dist.merge(_config(tiny_fp32, "star", eta=eta), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base, fts = _inputs(tiny_fp32)
    assert set(merged) == set(base)
    for name, value in merged.items():
        expected = star(base[name], [ft[name] for ft in fts], eta=eta)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_star_bf16_inputs_upcast_and_cast_back(tiny_bf16: Path, tmp_path: Path) -> None:
    """bf16 inputs are merged in float32; out_dtype float32 shows the exact float32 result."""
    star_dist.merge({**_config(tiny_bf16, "star"), "out_dtype": "float32"}, tmp_path / "f32", quiet=True)
    star_dist.merge(_config(tiny_bf16, "star"), tmp_path / "bf16", quiet=True)
    f32, bf16 = load_folder(tmp_path / "f32"), load_folder(tmp_path / "bf16")
    base, fts = _inputs(tiny_bf16)
    for name in base:
        expected = star(base[name], [ft[name] for ft in fts])
        assert f32[name].dtype == torch.float32 and bf16[name].dtype == torch.bfloat16
        torch.testing.assert_close(f32[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(bf16[name], f32[name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_task_arithmetic_with_weights_and_lambda(tiny_fp32: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_fp32, "task_arithmetic", **{"lambda": 0.6})
    weights = [0.5, 1.0, 0.25]
    for model, w in zip(cfg["models"], weights, strict=True):
        model["parameters"] = {"weight": w}
    star_dist.merge(cfg, tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base, fts = _inputs(tiny_fp32)
    for name in base:
        expected = task_arithmetic(base[name], [ft[name] for ft in fts], weights, 0.6)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_average_is_the_mean_of_the_models(tiny_fp32: Path, tmp_path: Path) -> None:
    star_dist.merge(_config(tiny_fp32, "average"), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    _, fts = _inputs(tiny_fp32)
    for name in merged:
        torch.testing.assert_close(merged[name], average([ft[name] for ft in fts]), rtol=1e-5, atol=1e-6)


def test_ties_equals_the_paper_definition(tiny_fp32: Path, tmp_path: Path) -> None:
    star_dist.merge(_config(tiny_fp32, "ties", density=0.3, **{"lambda": 0.9}), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base, fts = _inputs(tiny_fp32)
    for name in base:
        expected = ties(base[name], [ft[name] for ft in fts], density=0.3, lam=0.9)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_output_folder_is_a_complete_sharded_hf_model(tiny_bf16: Path, tmp_path: Path) -> None:
    base_copy = tmp_path / "models"
    shutil.copytree(tiny_bf16, base_copy)
    (base_copy / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    (base_copy / "base" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    out = tmp_path / "out"
    result = star_dist.merge(_config(base_copy, "star"), out, max_shard_size="40kB", quiet=True)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == result.shards_total > 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_tensors = load_folder(base_copy / "base")
    assert set(index["weight_map"]) == set(base_tensors)  # nothing dropped, nothing added
    data_bytes = 0
    for shard in shards:
        entries, meta = read_header(shard)
        assert meta == {"format": "pt"}
        shard_bytes = sum(e.nbytes for e in entries.values())
        assert shard_bytes <= 40_000 or len(entries) == 1
        data_bytes += shard_bytes
        assert all(index["weight_map"][name] == shard.name for name in entries)
    assert index["metadata"]["total_size"] == data_bytes
    for copied in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / copied).read_bytes() == (base_copy / "base" / copied).read_bytes()
    card = (out / "README.md").read_text()
    for part in ("star", "eta", "2025.naacl-short.42", "merge_method: star", "ft2", "kept rank"):
        assert part in card, part
    report = json.loads((out / "merge_report.json").read_text())
    q = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["method"] == "star" and len(q["kept_rank"]) == 3 and all(r >= 1 for r in q["kept_rank"])
    assert q["nuclear_norm_after"] == pytest.approx(q["nuclear_norm_before"], rel=1e-4)
    assert "kept_rank" not in report["tensors"]["model.norm.weight"]
    assert not list(out.glob("*.tmp"))


def test_merged_folder_loads_in_transformers(tiny_bf16: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    star_dist.merge(_config(tiny_bf16, "star"), tmp_path / "out", max_shard_size="100kB", quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
    merged = load_folder(tmp_path / "out")
    state = model.state_dict()
    torch.testing.assert_close(state["model.layers.1.mlp.up_proj.weight"],
                               merged["model.layers.1.mlp.up_proj.weight"].float())


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    make_tiny_merge(tmp_path / "m", n_models=2, dtype="float32", shape=TinyShape(tie_embeddings=True), shards=1)
    star_dist.merge(_config(tmp_path / "m", "star", n=2), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    assert "lm_head.weight" not in merged
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, merged["model.embed_tokens.weight"])


def test_non_float_tensors_are_copied(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    make_tiny_merge(tmp_path / "m", n_models=2, dtype="float32", shards=1)
    for sub in ("base", "ft0", "ft1"):
        path = tmp_path / "m" / sub / "model.safetensors"
        tensors = load_file(str(path))
        tensors["position_ids"] = torch.arange(16, dtype=torch.int64)
        save_file(tensors, str(path), metadata={"format": "pt"})
    star_dist.merge(_config(tmp_path / "m", "star", n=2), tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    assert torch.equal(merged["position_ids"], torch.arange(16))


def test_rerun_resumes_and_gives_identical_bytes(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(tiny_fp32, "star")
    first = star_dist.merge(cfg, out, max_shard_size="60kB", quiet=True)
    reference = folder_bytes(out)
    assert first.shards_total >= 3 and first.shards_resumed == 0
    # Simulate a run killed mid-way: one shard lost, a partial file left, no index yet.
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.rename(victim.with_name(victim.name + ".tmp"))
    (out / "model.safetensors.index.json").unlink()
    second = star_dist.merge(cfg, out, max_shard_size="60kB", quiet=True)
    assert second.shards_resumed == first.shards_total - 1
    assert folder_bytes(out) == reference
    assert not list(out.glob("*.tmp"))
    # A shard whose bytes changed is redone, not trusted.
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    third = star_dist.merge(cfg, out, max_shard_size="60kB", quiet=True)
    assert third.shards_resumed == first.shards_total - 1
    assert folder_bytes(out) == reference


def test_ties_bytes_do_not_depend_on_the_row_block_size(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIES merges row blocks sized for the device (cache-sized on the CPU, 64 Mi elements on a
    GPU): blocks of a few rows and whole tensors give the same bytes."""
    from star_dist import estimate

    cfg = _config(tiny_fp32, "ties", density=0.4)
    outputs = []
    for elements in (1 << 10, 1 << 24):  # several blocks per tensor; one block per tensor
        monkeypatch.setitem(estimate.JOINT_BLOCK_ELEMENTS, "cpu", elements)
        star_dist.merge(cfg, tmp_path / str(elements), runtime="local", quiet=True)
        outputs.append(folder_bytes(tmp_path / str(elements)))
    assert outputs[0] == outputs[1]


def test_same_bytes_whatever_the_shard_order(tiny_fp32: Path, tmp_path: Path) -> None:
    """The in-process runtime works most-expensive-first; a different order, same bytes."""
    from star_dist.config import RunOptions
    from star_dist.output import claim_output_dir
    from star_dist.planner import build_plan
    from star_dist.shard import merge_shard

    cfg = star_dist.load_config(_config(tiny_fp32, "star"))
    star_dist.merge(cfg, tmp_path / "a", max_shard_size="60kB", quiet=True)
    plan = build_plan(cfg, tmp_path / "b", RunOptions(max_shard_size=60_000))
    claim_output_dir(plan.out_dir, plan.identity, overwrite=False)
    for job in reversed(plan.shards):
        merge_shard(plan.run, job)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_top_level_weight_and_dtype_as_mergekit(tiny_bf16: Path, tmp_path: Path) -> None:
    """parameters.weight is each model's default weight; dtype sets the output dtype."""
    cfg = {**_config(tiny_bf16, "task_arithmetic", weight=0.3), "dtype": "float32"}
    cfg["models"][0]["parameters"] = {"weight": 1.0}
    star_dist.merge(cfg, tmp_path / "out", quiet=True)
    merged = load_folder(tmp_path / "out")
    base, fts = _inputs(tiny_bf16)
    for name in base:
        assert merged[name].dtype == torch.float32, name
        expected = task_arithmetic(base[name], [ft[name] for ft in fts], [1.0, 0.3, 0.3], 1.0)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_float64_merges_stay_float64(tmp_path: Path) -> None:
    """dtype float64: STAR and TIES compute in float64 end to end (no float32 step)."""
    make_tiny_merge(tmp_path / "m", n_models=2, dtype="float32", seed=3)
    for folder in ("base", "ft0", "ft1"):  # re-save as float64 checkpoints
        path = tmp_path / "m" / folder / "model.safetensors"
        tensors = {k: v.double() if v.is_floating_point() else v for k, v in load_folder(path.parent).items()}
        save_file(tensors, str(path))
    base, fts = _inputs(tmp_path / "m", n=2)
    for method, reference in (("star", lambda b, f: star(b.double(), [x.double() for x in f])),
                              ("ties", lambda b, f: ties(b.double(), [x.double() for x in f], 0.2))):
        out = tmp_path / method
        star_dist.merge({**_config(tmp_path / "m", method, n=2), "dtype": "float64"}, out, quiet=True)
        merged = load_folder(out)
        for name in base:
            expected = reference(base[name], [ft[name] for ft in fts])
            assert merged[name].dtype == torch.float64, name
            torch.testing.assert_close(merged[name], expected.double(), rtol=1e-12, atol=1e-12, msg=(method, name))


def test_an_input_edited_in_place_is_never_resumed_over(tiny_fp32: Path, tmp_path: Path) -> None:
    """Same size, mtime set back by hand: the ctime still changes, so the plan does too."""
    models = tmp_path / "m"
    shutil.copytree(tiny_fp32, models)
    before = star_dist.plan(models / "merge.yaml").fingerprint
    shard = sorted((models / "ft1").glob("*.safetensors"))[0]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of tensor data, the header untouched
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    assert star_dist.plan(models / "merge.yaml").fingerprint != before


def test_a_crash_after_some_shards_keeps_them_for_the_resume(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker failure that is not bad data (here: the second shard's worker dies) leaves the
    finished shards and their manifests; the rerun resumes them and gives the same bytes."""
    from star_dist.errors import MergeError
    from star_dist.runtime import local
    from star_dist.shard import merge_shard

    cfg = _config(tiny_fp32, "star")
    out = tmp_path / "out"
    calls = []

    def dies_on_the_second(run, job, **kwargs):
        calls.append(job.file_name)
        if len(calls) == 2:
            raise MergeError(f"shard {job.file_name}: worker died")
        return merge_shard(run, job, **kwargs)

    monkeypatch.setattr(local, "merge_shard", dies_on_the_second)
    with pytest.raises(MergeError, match="worker died"):
        star_dist.merge(cfg, out, quiet=True, max_shard_size="200kB")
    kept = sorted((out / ".star_dist" / "shards").glob("*.json"))
    assert [p.name for p in kept] == [f"{calls[0]}.json"] and (out / calls[0]).exists()
    assert not (out / "model.safetensors.index.json").exists()

    monkeypatch.undo()
    result = star_dist.merge(cfg, out, quiet=True, max_shard_size="200kB")
    assert result.shards_resumed == 1
    star_dist.merge(cfg, tmp_path / "fresh", quiet=True, max_shard_size="200kB")
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")
