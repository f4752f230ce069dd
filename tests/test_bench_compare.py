"""scripts/bench/compare.py: its page-cache control and the page it renders from the committed runs.

The measuring itself takes ~30 min at its smallest size, so it is not run here; what is checked
is what turns samples into the published numbers, on the committed JSON.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "bench" / "results"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    try:
        yield importlib.import_module("compare")
    finally:
        sys.path.remove(str(ROOT / "scripts" / "bench"))


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["compare", "compare_cold"])
def test_summary_is_recomputed_from_the_samples(compare, name: str) -> None:
    result = _load(name)
    assert compare.summarize(result["samples"]) == result["summary"]


def test_render_keeps_the_hand_written_text_and_shows_both_runs(compare, tmp_path: Path) -> None:
    (tmp_path / "benchmarks.md").write_text(f"# Intro kept\n\n{compare.BEGIN}\nold\n{compare.END}\nTail kept\n")
    page = compare.render(_load("compare"), tmp_path, _load("compare_cold")).read_text()
    assert page.startswith("# Intro kept") and page.rstrip().endswith("Tail kept") and "\nold\n" not in page
    assert page.index("## Measured\n") < page.index("## Measured from a cold page cache")
    assert "Page cache: inputs read into the page cache just before each contender." in page
    assert "Page cache: inputs evicted from the page cache before each contender." in page
    assert page.count("![merge time per contender](benchmarks.png)") == 1
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000
    ta_bf16 = _load("compare")["summary"]["bfloat16"]["ratios"]["sd_ta/floor"]
    assert f"| sd_ta/floor | {ta_bf16:.2f} |" in page


def _resident_pages(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _filesystem(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_set_page_cache_warms_and_evicts_the_inputs(compare, tmp_path: Path) -> None:
    if _filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the temp folder lives in memory: its pages cannot be evicted")
    model = tmp_path / "base" / "model.safetensors"
    model.parent.mkdir()
    data = bytes(range(256)) * (1 << 14)  # 4 MiB
    model.write_bytes(data)
    compare.set_page_cache(tmp_path, "warm")
    assert _resident_pages(model) == len(data)
    compare.set_page_cache(tmp_path, "cold")
    assert _resident_pages(model) < len(data) // 4  # a hint: the kernel may keep a few pages
    assert model.read_bytes() == data
