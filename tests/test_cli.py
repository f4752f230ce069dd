"""The real `star-dist` command in a subprocess: help, plan, merge, and every bad input.

Every bad input must give exactly one line `star-dist: error: ...` naming the file and the
tensor, exit status 2, and leave the output folder exactly as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import run_cli, run_cli_all, snapshot
from .reference import load_folder, star


def test_help_for_each_command() -> None:
    results = run_cli_all(("--help",), ("merge", "--help"), ("plan", "--help"), ("make-tiny", "--help"))
    for result in results:
        assert result.returncode == 0 and "usage: star-dist" in result.stdout
    merge_help = results[1].stdout
    for flag in ("--eta", "--max-shard-size", "--address", "--workers", "--device", "--threads-per-worker",
                 "--overwrite", "--runtime"):
        assert flag in merge_help


def test_plan_is_a_dry_run(tiny_fp32: Path) -> None:
    result = run_cli("plan", str(tiny_fp32 / "merge.yaml"), "--max-shard-size", "50kB", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    base = load_folder(tiny_fp32 / "base")
    assert summary["tensors"] == len(base)
    assert summary["svds"] == 3 * sum(t.dim() == 2 for t in base.values())
    assert summary["bytes_to_write"] == sum(t.numel() * 4 for t in base.values())
    assert summary["bytes_to_read"] == 4 * summary["bytes_to_write"]
    assert len(summary["shards"]) > 1 and summary["peak_memory_per_worker_bytes"] > 0
    text = run_cli("plan", str(tiny_fp32 / "merge.yaml")).stdout
    for part in ("SVDs", "peak memory", "shards", "read", "write"):
        assert part in text


def test_merge_with_flags_only_and_local_runtime(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "merge", str(out), "--base-model", str(tiny_fp32 / "base"), "--model", str(tiny_fp32 / "ft0"),
        "--model", str(tiny_fp32 / "ft1"), "--method", "star", "--eta", "60", "--runtime", "local", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    merged = load_folder(out)
    base, ft0, ft1 = (load_folder(tiny_fp32 / n) for n in ("base", "ft0", "ft1"))
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], star(base[name], [ft0[name], ft1[name]], eta=60), rtol=1e-5, atol=1e-6)


def _truncate(models: Path) -> str:
    path = models / "ft1" / "model-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return "model-00002-of-00003.safetensors"


def _remove_shard(models: Path) -> str:
    (models / "ft2" / "model-00003-of-00003.safetensors").unlink()
    return "model-00003-of-00003.safetensors"


def _edit(models: Path, sub: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    index = json.loads((models / sub / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(index.values())):
        path = models / sub / file
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return models / sub


def _reshape(models: Path) -> str:
    def edit(t: dict[str, torch.Tensor]) -> None:
        if "model.layers.1.mlp.up_proj.weight" in t:
            t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 63)

    _edit(models, "ft0", edit)
    return "model.layers.1.mlp.up_proj.weight"


def _drop(models: Path) -> str:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t.pop("model.layers.0.self_attn.k_proj.weight", None)

    folder = _edit(models, "ft1", edit)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    index_path.write_text(json.dumps(index))
    return "model.layers.0.self_attn.k_proj.weight"


def _fp8(models: Path) -> str:
    def edit(t: dict[str, torch.Tensor]) -> None:
        if "model.norm.weight" in t:
            t["model.norm.weight"] = t["model.norm.weight"].to(torch.float8_e4m3fn)

    _edit(models, "ft0", edit)
    return "model.norm.weight"


def _nan(models: Path) -> str:
    def edit(t: dict[str, torch.Tensor]) -> None:
        if "model.layers.1.self_attn.v_proj.weight" in t:
            t["model.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")

    _edit(models, "ft2", edit)
    return "model.layers.1.self_attn.v_proj.weight"


def _int_differs(models: Path) -> str:
    for sub, offset in (("base", 0), ("ft0", 0), ("ft1", 1), ("ft2", 0)):
        def edit(t: dict[str, torch.Tensor], offset: int = offset) -> None:
            if "model.norm.weight" in t:
                t["position_ids"] = torch.arange(8) + offset

        folder = _edit(models, sub, edit)
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"]["position_ids"] = index["weight_map"]["model.norm.weight"]
        index_path.write_text(json.dumps(index))
    return "position_ids"


def _missing_model(models: Path) -> str:
    config = (models / "merge.yaml").read_text().replace("model: ft2", "model: ft9")
    (models / "merge.yaml").write_text(config)
    return "ft9"


@pytest.mark.parametrize(
    ("break_input", "fragments"),
    [
        (_missing_model, ["no such folder"]),
        (_truncate, ["ft1", "truncated"]),
        (_remove_shard, ["ft2", "missing"]),
        (_reshape, ["ft0", "shape [128, 63]", "[128, 64]"]),
        (_drop, ["ft1", "is missing"]),
        (_fp8, ["ft0", "F8_E4M3", "not support"]),
        (_nan, ["ft2", "NaN"]),
        (_int_differs, ["ft1", "differs from the base"]),
    ],
)
def test_bad_input_one_line_exit_2_output_untouched(
    tiny_copy: Path, tmp_path: Path, break_input: Callable[[Path], str], fragments: list[str]
) -> None:
    tensor = break_input(tiny_copy)
    fresh = tmp_path / "fresh"  # does not exist: must still not exist
    kept = tmp_path / "kept"  # empty: must stay empty
    kept.mkdir()
    for out in (fresh, kept):
        result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "--quiet")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("star-dist: error: "), result.stderr
        for part in [tensor, *fragments]:
            assert part in lines[0], (part, lines[0])
    assert not fresh.exists()
    assert list(kept.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--eta", "0"], "eta"),
        (["--eta", "101"], "eta"),
        (["--method", "ties", "--density", "1.5"], "density"),
        (["--method", "ties", "--density", "0"], "density"),
        (["--method", "dare"], "star"),
    ],
)
def test_bad_parameters(tiny_fp32: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--runtime", "local", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_no_models(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("merge_method: star\nbase_model: base\nmodels: []\n")
    result = run_cli("merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"))
    assert result.returncode == 2 and "no models to merge" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_output_not_empty_is_refused_unless_overwrite(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = snapshot(out)
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--runtime", "local")
    assert result.returncode == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert snapshot(out) == before
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(out), "--runtime", "local", "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["base", "ft1/merged", "."])
def test_output_overlapping_an_input_is_refused(tiny_copy: Path, where: str) -> None:
    """Even with --overwrite: emptying the folder would delete an input."""
    out = tiny_copy / where
    before = snapshot(tiny_copy)
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "--overwrite")
    assert result.returncode == 2, result.stderr
    assert "output folder" in result.stderr and "input folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tiny_copy) == before


def test_overwrite_keeps_the_old_output_when_the_new_merge_fails(tiny_copy: Path, tmp_path: Path) -> None:
    """--overwrite sets the old contents aside; bad data met mid-merge puts them back."""
    out = tmp_path / "out"
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "-q")
    assert result.returncode == 0, result.stderr
    before = snapshot(out)
    _nan(tiny_copy)  # a NaN deep inside ft2: found only while merging
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "--overwrite", "-q")
    assert result.returncode == 2 and "NaN" in result.stderr, result.stderr
    assert snapshot(out) == before  # every byte of the earlier merge is back
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "--overwrite",
                     "-q", "--model", str(tiny_copy / "ft0"), "--model", str(tiny_copy / "ft1"))
    assert result.returncode == 0, result.stderr
    assert not (out / ".star_dist_replaced").exists()  # set-aside contents go once the merge is done


def test_method_flag_drops_the_files_parameters_for_another_method(tiny_fp32: Path, tmp_path: Path) -> None:
    result = run_cli("merge", str(tiny_fp32 / "merge.yaml"), str(tmp_path / "out"), "--runtime", "local", "-q",
                     "--method", "ties", "--density", "0.5")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["merge_method"] == "ties" and report["parameters"] == {"density": 0.5}


def test_corrupt_base_config_with_out_dtype_fails_in_plan(tiny_copy: Path, tmp_path: Path) -> None:
    (tiny_copy / "base" / "config.json").write_text("{not json")
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(tmp_path / "out"), "--runtime", "local",
                     "--out-dtype", "float16")
    assert result.returncode == 2 and "config.json" in result.stderr and "not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
