"""Inputs that are ambiguous or not what they seem: refused with one line naming the file and
the tensor, or read exactly as `transformers` reads them (and said so in the plan).

Every case is a real folder made by `make_tiny_merge` (fp32, 3 shards per model) and then
altered on disk; the CLI ones run the real command in a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import star_dist
from star_dist.errors import InputError

from .conftest import folder_bytes, run_cli

INDEX = "model.safetensors.index.json"


def shard_files(model: Path) -> list[Path]:
    return sorted(model.glob("model-*.safetensors"))


def weight_map(model: Path) -> dict[str, str]:
    return json.loads((model / INDEX).read_text())["weight_map"]


def test_a_fifo_where_a_shard_should_be_is_refused_not_waited_on(tiny_copy: Path, tmp_path: Path) -> None:
    shard = shard_files(tiny_copy / "ft1")[0]
    shard.unlink()
    os.mkfifo(shard)  # opening it for reading would block until a writer comes: forever
    proc = run_cli("merge", str(tiny_copy / "merge.yaml"), str(tmp_path / "out"), "--runtime", "local",
                   timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{shard}: is a FIFO (named pipe), not a regular file" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_a_folder_or_a_device_where_a_shard_should_be_is_refused(tiny_copy: Path, kind: str) -> None:
    shard = shard_files(tiny_copy / "ft0")[1]
    shard.unlink()
    if kind == "folder":
        shard.mkdir()
    else:
        shard.symlink_to("/dev/zero")  # a character device behind a link (links are followed)
    expected = "a folder" if kind == "folder" else "a character device"
    with pytest.raises(InputError, match=f"{shard}: is {expected}, not a regular file"):
        star_dist.plan(tiny_copy / "merge.yaml")


def test_a_fifo_index_is_refused(tiny_copy: Path) -> None:
    index = tiny_copy / "ft2" / INDEX
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(InputError, match="is a FIFO"):
        star_dist.plan(tiny_copy / "merge.yaml")


def test_a_tensor_missing_from_the_index_is_refused_not_dropped(tiny_copy: Path) -> None:
    index_path = tiny_copy / "ft0" / INDEX
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[3]
    shard = index["weight_map"].pop(dropped)
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError) as info:
        star_dist.plan(tiny_copy / "merge.yaml")
    message = str(info.value)
    assert message.startswith(str(tiny_copy / "ft0" / shard)), message
    assert f"tensor {dropped!r} is in the file but missing from {INDEX}" in message


def test_a_tensor_stored_in_two_shards_is_refused(tiny_copy: Path) -> None:
    model = tiny_copy / "ft1"
    mapping = weight_map(model)
    first, second = shard_files(model)[:2]
    moved = sorted(name for name, file in mapping.items() if file == second.name)[0]
    tensors = load_file(str(first))
    tensors[moved] = load_file(str(second))[moved] + 1  # a second, different copy
    save_file(tensors, str(first))
    with pytest.raises(InputError) as info:
        star_dist.plan(tiny_copy / "merge.yaml")
    message = str(info.value)
    assert message.startswith(f"{first}: tensor {moved!r} is stored in two shards"), message
    assert second.name in message


def test_a_folder_with_both_layouts_is_read_as_transformers_reads_it(tiny_copy: Path, tmp_path: Path) -> None:
    """transformers loads model.safetensors when a folder also has an index: so do we, and
    the plan says so. The merge equals the one over a folder holding only that file."""
    model = tiny_copy / "ft0"
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_files(model):
        tensors.update(load_file(str(shard)))
    single = {name: t + 0.01 for name, t in tensors.items()}  # differs from the shards
    save_file(single, str(model / "model.safetensors"))

    plan = star_dist.plan(tiny_copy / "merge.yaml")
    assert any("holds both model.safetensors and" in w for w in plan.warnings), plan.warnings
    assert plan.inputs[0].checkpoint.tensors[next(iter(single))].file == str(model / "model.safetensors")
    proc = run_cli("plan", str(tiny_copy / "merge.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "holds both model.safetensors" in proc.stdout + proc.stderr

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text((model / "config.json").read_text())
    save_file(single, str(alone / "model.safetensors"))
    config = yaml_config(tiny_copy, [model, tiny_copy / "ft1"])
    config_alone = yaml_config(tiny_copy, [alone, tiny_copy / "ft1"])
    star_dist.merge(config, tmp_path / "both")
    star_dist.merge(config_alone, tmp_path / "single")
    assert folder_bytes(tmp_path / "both") == folder_bytes(tmp_path / "single")


def yaml_config(tiny: Path, models: list[Path]) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(tiny / "base"),
            "models": [{"model": str(m)} for m in models]}
