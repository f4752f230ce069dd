"""Bad inputs through the public paths (`star_dist.plan` and the CLI): one InputError line
naming the file and the tensor, before anything is written.

Every bad file is built on disk from real bytes: an 8-byte little-endian header length, the
JSON header, then the data buffer. Headers star_dist refuses are checked to be refused by
the `safetensors` library too, so the two agree on what a valid file is.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import star_dist
from star_dist.checkpoint import is_adapter_folder
from star_dist.errors import InputError
from star_dist.safetensors_format import read_header

from .conftest import run_cli

W = torch.arange(16, dtype=torch.float32).view(4, 4)
B = torch.arange(4, dtype=torch.float32) / 8
W_BYTES, B_BYTES = W.numpy().tobytes(), B.numpy().tobytes()


def entry(dtype: Any = "F32", shape: Any = None, offsets: Any = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


GOOD = {"w": entry("F32", [4, 4], [0, 64]), "b": entry("F32", [4], [64, 80])}


def write_raw(path: Path, header: Any, data: bytes, pad: bool = True) -> None:
    """A safetensors file from its parts: u64 header length, JSON header, data buffer."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def model_folder(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def config(base: Path, *models: Path) -> dict[str, Any]:
    return {"merge_method": "star", "base_model": str(base), "models": [str(m) for m in models],
            "parameters": {"eta": 40}}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """base/ (written by safetensors) and ft/ (a config only: the test writes its weights)."""
    return model_folder(tmp_path / "base", {"w": W, "b": B}), model_folder(tmp_path / "ft")


# (id, header, data, fragments of the one error line besides the file name, safetensors refuses too)
HEADER_CASES = [
    ("offsets-one-number", {**GOOD, "b": entry("F32", [4], [64])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "data_offsets [64] is not a list of two non-negative integers"], True),
    ("offsets-three-numbers", {**GOOD, "b": entry("F32", [4], [64, 80, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "data_offsets [64, 80, 80]"], True),
    ("offsets-not-a-list", {**GOOD, "b": entry("F32", [4], "64-80")}, W_BYTES + B_BYTES,
     ["tensor 'b'", 'data_offsets "64-80"'], True),
    ("offsets-negative-begin", {**GOOD, "b": entry("F32", [4], [-16, 0])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "data_offsets [-16, 0]"], True),
    ("offsets-floats", {**GOOD, "b": entry("F32", [4], [64.0, 80.0])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "data_offsets [64.0, 80.0]"], True),
    ("offsets-bools", {"b": entry("BOOL", [1], [False, True])}, b"\x01",
     ["tensor 'b'", "data_offsets [false, true]"], True),
    ("offsets-begin-after-end", {**GOOD, "b": entry("F32", [4], [80, 64])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "data_offsets [80, 64] begins after it ends"], True),
    ("shape-an-int", {**GOOD, "b": entry("F32", 4, [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "shape 4 is not a list of non-negative integers"], True),
    ("shape-has-a-string", {**GOOD, "b": entry("F32", [4, "x"], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", 'shape [4, "x"]'], True),
    ("shape-negative-dims", {**GOOD, "w": entry("F32", [-4, -4], [0, 64])}, W_BYTES + B_BYTES,
     ["tensor 'w'", "shape [-4, -4] is not a list of non-negative integers"], True),
    ("shape-floats", {**GOOD, "b": entry("F32", [4.0], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "shape [4.0]"], True),
    ("shape-a-bool", {**GOOD, "b": entry("F32", [True], [64, 68])}, W_BYTES + B_BYTES[:4],
     ["tensor 'b'", "shape [true]"], True),
    ("dtype-a-list", {**GOOD, "b": entry(["F32"], [4], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", 'dtype ["F32"] is not a string'], True),
    ("dtype-null", {**GOOD, "b": entry(None, [4], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "dtype null is not a string"], True),
    ("dtype-unknown", {**GOOD, "b": entry("F33", [4], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", 'dtype "F33" is not a safetensors dtype'], True),
    ("dtype-valid-but-unsupported", {**GOOD, "b": entry("F8_E4M3", [4], [64, 68])}, W_BYTES + B_BYTES[:4],
     ["tensor 'b'", "F8_E4M3, which star_dist does not support"], False),
    ("entry-not-an-object", {**GOOD, "b": 5}, W_BYTES + B_BYTES,
     ["tensor 'b'", "corrupt header entry 5"], True),
    ("entry-without-shape", {**GOOD, "b": {"dtype": "F32", "data_offsets": [64, 80]}}, W_BYTES + B_BYTES,
     ["tensor 'b'", "(no 'shape')"], True),
    ("size-disagrees-with-shape", {**GOOD, "b": entry("F32", [5], [64, 80])}, W_BYTES + B_BYTES,
     ["tensor 'b'", "shape [5] F32 (20 bytes) but gives 16 bytes"], True),
    ("ends-past-the-file", GOOD, W_BYTES + B_BYTES[:8],
     ["tensor 'b' ends at byte", "truncated"], True),
    ("tensors-overlap", {**GOOD, "b": entry("F32", [4], [0, 16])}, W_BYTES + B_BYTES,
     ["tensor 'w' (data_offsets [0, 64]) overlaps tensor 'b'"], True),
    ("empty-tensor-inside-another", {**GOOD, "e": entry("F32", [0], [8, 8])}, W_BYTES + B_BYTES,
     ["tensor 'e' (data_offsets [8, 8]) overlaps tensor 'w'"], True),
    ("gap-between-tensors", {**GOOD, "b": entry("F32", [4], [68, 84])}, W_BYTES + b"\0" * 4 + B_BYTES,
     ["tensor 'b' begins at data offset 68", "bytes 64..68 belong to no tensor"], True),
    ("gap-before-the-first-tensor", {"b": entry("F32", [4], [8, 24])}, b"\0" * 8 + B_BYTES,
     ["tensor 'b' begins at data offset 8", "bytes 0..8 belong to no tensor"], True),
    ("bytes-after-the-last-tensor", GOOD, W_BYTES + B_BYTES + b"\0" * 8,
     ["8 bytes after the last tensor ('b', ending at data offset 80)"], True),
    ("metadata-not-an-object", {"__metadata__": ["pt"], **GOOD}, W_BYTES + B_BYTES,
     ['__metadata__ is ["pt"], not an object of strings'], True),
    ("metadata-value-not-a-string", {"__metadata__": {"format": "pt", "step": 3}, **GOOD}, W_BYTES + B_BYTES,
     ["__metadata__ key 'step' is 3, not a string"], True),
    ("header-not-an-object", [GOOD], W_BYTES + B_BYTES,
     ["corrupt safetensors header (not a JSON object)"], True),
]


@pytest.mark.parametrize(("header", "data", "fragments", "library_refuses"),
                         [case[1:] for case in HEADER_CASES], ids=[case[0] for case in HEADER_CASES])
def test_bad_header_is_one_input_error_naming_file_and_tensor(
    pair: tuple[Path, Path], header: Any, data: bytes, fragments: list[str], library_refuses: bool
) -> None:
    base, ft = pair
    bad = ft / "model.safetensors"
    write_raw(bad, header, data)
    with pytest.raises(InputError) as info:
        star_dist.plan(config(base, ft))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad}: "), message
    for part in fragments:
        assert part in message, (part, message)
    if library_refuses:  # the safetensors library agrees the file is not valid
        with pytest.raises(SafetensorError), safe_open(str(bad), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                fh.get_tensor(name)


def test_a_bad_base_header_is_refused_the_same_way(pair: tuple[Path, Path]) -> None:
    base, ft = pair
    save_file({"w": W, "b": B}, str(ft / "model.safetensors"))
    write_raw(base / "model.safetensors", {**GOOD, "w": entry("F32", [-4, -4], [0, 64])}, W_BYTES + B_BYTES)
    with pytest.raises(InputError, match=r"base/model.safetensors: tensor 'w': corrupt header entry: shape \[-4, -4\]"):
        star_dist.plan(config(base, ft))


VALID_ODDITIES = [
    # (id, header, pad the header to 8 bytes): unusual but valid files, which safetensors reads too
    ("offsets-out-of-header-order", {"b": entry("F32", [4], [64, 80]), "w": entry("F32", [4, 4], [0, 64])}, True),
    ("unpadded-header", {**GOOD, "__metadata__": {"format": "pt"}}, False),
    ("metadata-null-and-extra-entry-keys", {"__metadata__": None, "w": {**GOOD["w"], "note": 1}, "b": GOOD["b"]},
     True),
    ("empty-tensors-sharing-offsets", {**GOOD, "e0": entry("F32", [0], [0, 0]), "e1": entry("F32", [2, 0], [64, 64]),
                                       "e2": entry("BOOL", [0, 3], [80, 80])}, True),
]


@pytest.mark.parametrize(("header", "pad"), [c[1:] for c in VALID_ODDITIES], ids=[c[0] for c in VALID_ODDITIES])
def test_unusual_but_valid_headers_pass(tmp_path: Path, header: dict[str, Any], pad: bool) -> None:
    names = [n for n in header if n != "__metadata__"]
    path = tmp_path / "x.safetensors"
    write_raw(path, header, W_BYTES + B_BYTES, pad=pad)
    assert pad or len(json.dumps(header)) % 8, "the unpadded case must leave the data unaligned"
    expected = load_file(str(path))  # the library reads it
    base = model_folder(tmp_path / "base")
    shutil.copy(path, base / "model.safetensors")
    ft = model_folder(tmp_path / "ft")
    shutil.copy(path, ft / "model.safetensors")
    assert star_dist.plan(config(base, ft)).n_tensors == len(names)
    entries, _ = read_header(path)
    assert {n: (list(e.shape), e.dtype) for n, e in entries.items()} == {
        n: (header[n]["shape"], header[n]["dtype"]) for n in names
    }
    assert set(expected) == set(names)


def test_valid_files_of_every_dtype_plan_and_merge(tmp_path: Path) -> None:
    """0-d tensors, empty tensors, and BOOL/U8/I8/I16/I32/I64/F16/BF16/F32/F64, as save_file writes them."""

    def tensors(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "w": torch.randn(4, 4, generator=gen),
            "half": torch.randn(3, 2, generator=gen).half(),
            "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
            "f64": torch.randn(5, generator=gen).double(),
            "scalar": torch.tensor(1.5 + seed),
            "empty_rows": torch.zeros(0, 3),
            "empty_cols": torch.zeros(2, 0),
            "mask": torch.tensor([True, False]),
            "u8": torch.arange(3, dtype=torch.uint8),
            "i8": torch.arange(2, dtype=torch.int8),
            "i16": torch.arange(2, dtype=torch.int16),
            "i32": torch.arange(2, dtype=torch.int32),
            "ids": torch.arange(4),
            "int_scalar": torch.tensor(7),
        }

    folders = [model_folder(tmp_path / name, tensors(i)) for i, name in enumerate(("base", "ft0", "ft1"))]
    for folder in folders:
        entries, _ = read_header(folder / "model.safetensors")
        assert entries["scalar"].shape == () and entries["empty_rows"].shape == (0, 3)
    plan = star_dist.plan(config(*folders))
    assert plan.n_tensors == 14
    out = tmp_path / "out"
    star_dist.merge(config(*folders), out, quiet=True)
    merged = load_file(str(out / "model.safetensors"))
    base = tensors(0)
    assert {n: (t.dtype, t.shape) for n, t in merged.items()} == {n: (t.dtype, t.shape) for n, t in base.items()}
    for name in ("mask", "u8", "i8", "i16", "i32", "ids", "int_scalar"):  # equal in every input: copied
        assert torch.equal(merged[name], base[name]), name
    read_header(out / "model.safetensors")  # our own output passes our own checks


# ---------------------------------------------------------------- sharded index (weight_map)

SHARD = "model-00001-of-00003.safetensors"


def _edit_index(models: Path, edit: Callable[[dict[str, Any]], Any]) -> tuple[Path, str]:
    """Apply `edit` to ft0's parsed index (it may return a replacement); returns (index path, first tensor)."""
    path = models / "ft0" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    replaced = edit(index)
    path.write_text(json.dumps(index if replaced is None else replaced))
    return path, first


def _first_to(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        index["weight_map"][next(iter(index["weight_map"]))] = value

    return edit


INDEX_CASES = [
    ("value-null", _first_to(None), ["corrupt index", "{tensor} maps to null, not a shard file name"]),
    ("value-a-number", _first_to(3), ["{tensor} maps to 3, not a shard file name"]),
    ("value-a-list", _first_to([SHARD]), ["{tensor} maps to [\"" + SHARD]),
    ("value-empty", _first_to(""), ["{tensor} maps to \"\", not a shard file name"]),
    ("weight-map-a-list", lambda ix: ix.update(weight_map=list(ix["weight_map"])),
     ["weight_map is a JSON array, not an object mapping tensor names to shard files"]),
    ("weight-map-null", lambda ix: ix.update(weight_map=None), ["weight_map is a JSON null"]),
    ("weight-map-empty", lambda ix: ix.update(weight_map={}), ["weight_map lists no tensor"]),
    ("no-weight-map", lambda ix: {"metadata": {}}, ['not a JSON object with a "weight_map" key']),
    ("index-a-list", lambda ix: [ix], ['not a JSON object with a "weight_map" key']),
    ("escapes-with-dotdot", _first_to(f"../base/{SHARD}"), ["{tensor} maps to '../base/", "outside the model folder"]),
    ("escapes-after-normalising", _first_to(f"sub/../../base/{SHARD}"), ["outside the model folder"]),
    ("absolute-path", _first_to("/etc/hostname"), ["{tensor} maps to '/etc/hostname'", "outside the model folder"]),
]


@pytest.mark.parametrize(("edit", "fragments"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_bad_weight_map_is_one_input_error_naming_the_index(
    tiny_copy: Path, edit: Callable[[dict[str, Any]], Any], fragments: list[str]
) -> None:
    index_path, tensor = _edit_index(tiny_copy, edit)
    with pytest.raises(InputError) as info:
        star_dist.plan(tiny_copy / "merge.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{index_path}: "), message
    for part in fragments:
        assert part.format(tensor=repr(tensor)) in message, (part, message)


def test_index_that_is_not_json(tiny_copy: Path) -> None:
    path = tiny_copy / "ft0" / "model.safetensors.index.json"
    path.write_text('{"weight_map": {')
    with pytest.raises(InputError, match="corrupt index \\(not JSON: ") as info:
        star_dist.plan(tiny_copy / "merge.yaml")
    assert str(info.value).startswith(f"{path}: ")


def test_weight_map_path_that_stays_inside_is_accepted(tiny_copy: Path) -> None:
    def edit(index: dict[str, Any]) -> None:
        for name, file in index["weight_map"].items():
            index["weight_map"][name] = f"./{file}"

    _edit_index(tiny_copy, edit)
    plan = star_dist.plan(tiny_copy / "merge.yaml")
    entry_file = plan.inputs[0].checkpoint.tensors["lm_head.weight"].file
    assert Path(entry_file).parent == tiny_copy / "ft0"


# ---------------------------------------------------------------- PEFT adapter folders

MODULE = "model.layers.1.self_attn.v_proj"


def _write_adapter(folder: Path, base_folder: Path, rank: int = 4) -> None:
    """A minimal PEFT LoRA adapter folder, as `save_pretrained` lays it out."""
    index = json.loads((base_folder / "model.safetensors.index.json").read_text())["weight_map"]
    out_features, in_features = read_header(base_folder / index[f"{MODULE}.weight"])[0][f"{MODULE}.weight"].shape
    gen = torch.Generator().manual_seed(5)
    folder.mkdir()
    save_file(
        {
            f"base_model.model.{MODULE}.lora_A.weight": torch.randn(rank, in_features, generator=gen),
            f"base_model.model.{MODULE}.lora_B.weight": torch.randn(out_features, rank, generator=gen) * 0.1,
        },
        str(folder / "adapter_model.safetensors"),
    )
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))


def test_adapter_with_the_base_config_json_is_still_an_adapter(tiny_copy: Path) -> None:
    adapter = tiny_copy / "lora"
    _write_adapter(adapter, tiny_copy / "base")
    shutil.copy(tiny_copy / "base" / "config.json", adapter / "config.json")  # as some hub repos ship it
    assert is_adapter_folder(adapter)
    plan = star_dist.plan(config(tiny_copy / "base", adapter, tiny_copy / "ft1"))
    assert type(plan.inputs[0]).__name__ == "LoraAdapter"
    assert set(plan.inputs[0].sources) == {f"{MODULE}.weight"}


def test_folder_with_adapter_config_and_model_weights_is_a_model(tiny_copy: Path) -> None:
    """A merged model that kept its adapter_config.json: its weights decide."""
    folder = tiny_copy / "ft0"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    assert not is_adapter_folder(folder)
    plan = star_dist.plan(tiny_copy / "merge.yaml")
    assert type(plan.inputs[0]).__name__ == "FullInput"


@pytest.mark.parametrize("with_config_json", [False, True])
def test_adapter_folder_as_base_model_is_refused(tiny_copy: Path, with_config_json: bool) -> None:
    adapter = tiny_copy / "lora"
    _write_adapter(adapter, tiny_copy / "base")
    if with_config_json:
        shutil.copy(tiny_copy / "base" / "config.json", adapter / "config.json")
    with pytest.raises(InputError, match="this is a PEFT adapter folder, which is not a base model") as info:
        star_dist.plan(config(adapter, tiny_copy / "ft0"))
    assert str(info.value).startswith(f"{adapter}: ")


# ---------------------------------------------------------------- the CLI: one line, exit 2, nothing written

def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's parsed JSON header and its data buffer."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _cli_bad_header(models: Path) -> tuple[Path, list[str]]:
    path = models / "ft1" / "model-00002-of-00003.safetensors"
    raw, data = _split(path)
    name = sorted(n for n in raw if n != "__metadata__")[0]
    raw[name]["data_offsets"] = raw[name]["data_offsets"][:1]
    write_raw(path, raw, data)
    return path, [repr(name), "data_offsets"]


def _cli_overlap(models: Path) -> tuple[Path, list[str]]:
    path = models / "ft2" / "model-00001-of-00003.safetensors"
    raw, data = _split(path)
    names = sorted((n for n in raw if n != "__metadata__"), key=lambda n: raw[n]["data_offsets"])
    first, second = names[0], names[1]
    raw[second]["data_offsets"] = [0, raw[second]["data_offsets"][1] - raw[second]["data_offsets"][0]]
    write_raw(path, raw, data)
    return path, [repr(first), repr(second), "overlaps"]


def _cli_null_weight_map(models: Path) -> tuple[Path, list[str]]:
    path, tensor = _edit_index(models, _first_to(None))
    return path, [repr(tensor), "null"]


def _cli_escape(models: Path) -> tuple[Path, list[str]]:
    path, tensor = _edit_index(models, _first_to(f"../base/{SHARD}"))
    return path, [repr(tensor), "outside the model folder"]


def _cli_adapter_as_base(models: Path) -> tuple[Path, list[str]]:
    adapter = models / "lora"
    _write_adapter(adapter, models / "base")
    shutil.copy(models / "base" / "config.json", adapter / "config.json")
    text = (models / "merge.yaml").read_text().replace("base_model: base", "base_model: lora")
    (models / "merge.yaml").write_text(text)
    return adapter, ["PEFT adapter folder, which is not a base model"]


@pytest.mark.parametrize("break_input", [_cli_bad_header, _cli_overlap, _cli_null_weight_map, _cli_escape,
                                         _cli_adapter_as_base])
def test_cli_one_line_exit_2_nothing_written(
    tiny_copy: Path, tmp_path: Path, break_input: Callable[[Path], tuple[Path, list[str]]]
) -> None:
    bad, fragments = break_input(tiny_copy)
    out = tmp_path / "out"
    result = run_cli("merge", str(tiny_copy / "merge.yaml"), str(out), "--runtime", "local", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"star-dist: error: {bad}: "), result.stderr
    for part in fragments:
        assert part in lines[0], (part, lines[0])
    assert not out.exists()
