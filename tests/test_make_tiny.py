"""`make-tiny --lora N`: PEFT adapters that star_dist reads as adapters and that change the merge."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import run_cli


def test_make_tiny_lora_adapters_merge_offline(tmp_path: Path) -> None:
    made = run_cli("make-tiny", str(tmp_path / "demo"), "--models", "2", "--lora", "2", "--dtype", "float32")
    assert made.returncode == 0, made.stderr
    demo = tmp_path / "demo"
    for i in range(2):
        assert (demo / f"lora{i}" / "adapter_config.json").exists()
    assert "merge_lora.yaml" in made.stdout
    full = run_cli("merge", str(demo / "merge_lora.yaml"), str(tmp_path / "full"), "--runtime", "local", "-q")
    assert full.returncode == 0, full.stderr
    adapter = run_cli("merge", str(demo / "merge_lora.yaml"), str(tmp_path / "adapter"), "--runtime", "local", "-q",
                      "--output-format", "adapter")
    assert adapter.returncode == 0, adapter.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = {}
    for f in sorted((demo / "base").glob("*.safetensors")):
        base.update(load_file(f))
    merged = {}
    for f in sorted((tmp_path / "full").glob("*.safetensors")):
        merged.update(load_file(f))
    changed = sorted(n for n in base if not torch.equal(base[n], merged[n]))
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed


def test_model_card_front_matter(tiny_fp32: Path, tmp_path: Path) -> None:
    """Hub metadata: base_model (the folder's name for a local base), relation merge, tags."""
    import yaml

    import star_dist

    result = star_dist.merge(tiny_fp32 / "merge.yaml", tmp_path / "out", quiet=True)
    text = (result.out_dir / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "base" and front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "star_dist", "star"]
    assert "pypi.org" not in text  # no link to a package page that does not exist
