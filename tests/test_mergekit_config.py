"""mergekit's config language with mergekit's meaning: `linear` without a base, a base also
listed under `models:`, unsupported keys refused by name, flags applied before validation,
TIES' density default shown. Numbers are checked against plain torch, not against our engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import star_dist
from star_dist.config import MergeConfig
from star_dist.errors import ConfigError

from .conftest import run_cli


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_linear_without_base_is_the_weighted_mean(tiny_fp32: Path, tmp_path: Path) -> None:
    """mergekit's examples/linear.yml shape: no base_model, per-model weights, normalize on."""
    weights = [1.0, 0.3, 0.5]
    config = _write(tmp_path / "linear.yml", {
        "models": [{"model": str(tiny_fp32 / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "merge_method": "linear",
        "dtype": "float32",
    })
    star_dist.merge(config, tmp_path / "out", quiet=True)
    merged = _load(tmp_path / "out")
    models = [_load(tiny_fp32 / f"ft{i}") for i in range(3)]
    total = sum(weights)
    checked = 0
    for name, got in merged.items():
        if not got.is_floating_point():
            continue
        want = sum(w * m[name].double() for w, m in zip(weights, models, strict=True)) / total
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, msg=name)
        checked += 1
    assert checked > 5


def test_linear_normalize_false_without_base_is_refused() -> None:
    with pytest.raises(ConfigError, match="normalize: false needs a base_model"):
        MergeConfig.from_dict({"merge_method": "linear", "models": ["a", "b"], "parameters": {"normalize": False}})


def test_linear_with_base_not_listed_averages_the_base_in() -> None:
    config = MergeConfig.from_dict({"merge_method": "linear", "base_model": "b", "models": ["x", "y"]})
    assert [m.model for m in config.models] == ["x", "y", "b"]
    assert any("averaged in" in n for n in config.notes)
    # star_dist's own name keeps its meaning: the mean of the fine-tunes only.
    assert [m.model for m in MergeConfig.from_dict(
        {"merge_method": "average", "base_model": "b", "models": ["x", "y"]}).models] == ["x", "y"]


def test_base_listed_under_models_is_not_a_finetune(tiny_fp32: Path, tmp_path: Path) -> None:
    """As mergekit: the base's (zero) task vector is skipped, so STAR's mean is 1/2, not 1/3."""
    base, ft = str(tiny_fp32 / "base"), [str(tiny_fp32 / f"ft{i}") for i in range(2)]
    with_base = {"merge_method": "star", "base_model": base, "models": [base, *ft]}
    config = MergeConfig.from_dict(with_base)
    assert [m.model for m in config.models] == ft
    assert any("also the base_model" in n for n in config.notes)
    a = star_dist.merge(with_base, tmp_path / "a", quiet=True)
    b = star_dist.merge({"merge_method": "star", "base_model": base, "models": ft}, tmp_path / "b", quiet=True)
    assert _load(a.out_dir).keys() == _load(b.out_dir).keys()
    for name, t in _load(a.out_dir).items():
        assert torch.equal(t, _load(b.out_dir)[name]), name


def test_unsupported_mergekit_keys_each_refused_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        MergeConfig.from_dict({
            "merge_method": "ties", "base_model": "b", "models": ["x"],
            "tokenizer": {"source": "union"}, "chat_template": "chatml", "tokenizer_source": "union",
            "bogus": 1,
        })
    message = str(err.value)
    for key in ("tokenizer:", "chat_template:", "tokenizer_source 'union'", "unknown key 'bogus'"):
        assert key in message, (key, message)


@pytest.mark.parametrize("method", ["slerp", "passthrough", "dare_ties", "dare_linear"])
def test_unsupported_mergekit_methods_refused_by_name(method: str) -> None:
    with pytest.raises(ConfigError, match=f"merge_method '{method}': a mergekit method star_dist does not implement"):
        MergeConfig.from_dict({"merge_method": method, "base_model": "b", "models": ["x"]})


def test_ties_density_default_is_noted() -> None:
    noted = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["x", "y"]}).notes
    assert any("mergekit's default is 1.0" in n for n in noted)
    given = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["x"],
                                   "parameters": {"density": 1}}).notes
    assert not any("density" in n for n in given)


def test_flags_apply_before_the_file_is_validated(tiny_fp32: Path, tmp_path: Path) -> None:
    """A file without base_model, rescued by --method and --base-model, with a note in plan."""
    config = _write(tmp_path / "c.yml", {
        "merge_method": "ties", "models": [str(tiny_fp32 / "ft0"), str(tiny_fp32 / "ft1")],
    })
    result = run_cli("plan", str(config), "--method", "task_arithmetic", "--base-model", str(tiny_fp32 / "base"),
                     "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "task_arithmetic"
    # Without the flags, every problem comes in one message.
    bad = _write(tmp_path / "bad.yml", {"merge_method": "ties",
                                        "models": [{"model": "x", "parameters": {"weight": "w"}}],
                                        "dtype": "float8", "chat_template": "x"})
    result = run_cli("plan", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for part in ("base_model is missing", "models[0].parameters.weight", "dtype 'float8'", "chat_template"):
        assert part in lines[0], (part, lines[0])


def test_plan_shows_notes_and_exact_counts(tiny_fp32: Path) -> None:
    base = str(tiny_fp32 / "base")
    result = run_cli("plan", "--method", "ties", "--base-model", base, "--model", base,
                     "--model", str(tiny_fp32 / "ft0"), "--model", str(tiny_fp32 / "ft1"))
    assert result.returncode == 0, result.stderr
    assert "also the base_model" in result.stdout
    assert "mergekit's default is 1.0" in result.stdout
    # every resolved value, defaults included, in YAML
    assert "parameters  {density: 0.2, normalize: true, int8_mask: false, lambda: 1.0}" in result.stdout
    assert "{weight: 1.0, density: 0.2}" in result.stdout
    assert "True" not in result.stdout and "'" not in result.stdout.split("warning")[0]
    line = next(x for x in result.stdout.splitlines() if x.startswith("tensors"))
    total, merged = line.split()[1], line.split("(")[1].split()[0]
    assert line.endswith(f"{merged} merged, {int(total) - int(merged)} copied)"), line


def test_bad_flag_value_is_one_line() -> None:
    result = run_cli("plan", "--eta", "forty")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("star-dist: error: argument --eta: invalid float value: 'forty'")


def test_plan_into_a_closed_pipe_is_quiet(tiny_fp32: Path) -> None:
    """`star-dist plan | head`: a reader that left makes every write fail; no traceback."""
    import os
    import subprocess

    from .conftest import BIN

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE, deterministically
    try:
        proc = subprocess.run([str(BIN / "star-dist"), "plan", str(tiny_fp32 / "merge.yaml")],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


def test_merge_json_summary_is_the_only_stdout(tiny_fp32: Path, tmp_path: Path) -> None:
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--runtime", "local", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # nothing else on stdout
    assert summary["out_dir"] == str(tmp_path / "out") or Path(summary["out_dir"]).resolve() == (tmp_path / "out")
    assert summary["shards_total"] >= 1 and summary["shards_resumed"] == 0
    assert summary["tensors"] > 5 and summary["method"] == "star"
    assert all((tmp_path / "out" / f).exists() for f in summary["files"])


def _slices(tiny: Path, layer_range: list[int], second: list[int] | None = None) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(tiny / "base"),
            "slices": [{"sources": [{"model": str(tiny / "ft0"), "layer_range": layer_range,
                                     "parameters": {"weight": 0.7}},
                                    {"model": str(tiny / "ft1"), "layer_range": second or layer_range}]}]}


def test_slices_over_the_whole_model_are_a_models_merge(tiny_fp32: Path, tmp_path: Path) -> None:
    a = star_dist.merge(_slices(tiny_fp32, [0, 2]), tmp_path / "a", quiet=True)
    b = star_dist.merge({"merge_method": "task_arithmetic", "base_model": str(tiny_fp32 / "base"),
                         "models": [{"model": str(tiny_fp32 / "ft0"), "parameters": {"weight": 0.7}},
                                    str(tiny_fp32 / "ft1")]}, tmp_path / "b", quiet=True)
    got, want = _load(a.out_dir), _load(b.out_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_slices_other_than_the_whole_model_are_refused(tiny_fp32: Path) -> None:
    with pytest.raises(ConfigError, match=r"layer_range \[0, 1\] is not the whole model \(\[0, 2\]"):
        star_dist.plan(_slices(tiny_fp32, [0, 1]))
    with pytest.raises(ConfigError, match="every source must use the same layer_range"):
        MergeConfig.from_dict(_slices(tiny_fp32, [0, 2], [1, 3]))
    two = _slices(tiny_fp32, [0, 2])
    two["slices"] = two["slices"] * 2
    with pytest.raises(ConfigError, match="give one slice"):
        MergeConfig.from_dict(two)
