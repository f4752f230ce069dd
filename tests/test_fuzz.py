"""Property-based fuzzing of the three parsers users feed files to.

Every input to the config loader, the safetensors header reader and the sharded-index reader
either parses or raises star_dist's own error (a `StarDistError`) whose message is one line
that names the file: never another exception type, never a hang, never a multi-line message.
Inputs are mutations of valid ones (wrong types, missing and unknown keys, NaN, inf, huge
numbers, huge lists, nested junk) and plain junk (random text and bytes, invalid UTF-8).

Deterministic (`derandomize=True`, no example database), so CI sees the same cases each run;
the explicit `@example`s are the minimized inputs of bugs this file found.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import itertools
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import star_dist
from star_dist.checkpoint import INDEX_FILE, index_folder
from star_dist.config import MergeConfig
from star_dist.errors import StarDistError
from star_dist.safetensors_format import DTYPES, SAFETENSORS_DTYPES, read_header

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CALL_LIMIT_S = 20  # one parse of a small input takes milliseconds; this long is a hang


class Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the test when the body runs past `seconds` (SIGALRM; main thread only).
    A hang inside one C call (a repr of 10**9 shared items) never returns to Python to see
    the signal: for that, faulthandler ends the process with every thread's traceback."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parses_or_one_line_error(call: Callable[[], Any], names: str) -> Any:
    """call()'s result, or None after a StarDistError whose message is one line containing
    `names` (the file). Any other exception, or a hang, fails the test."""
    try:
        with _time_limit(CALL_LIMIT_S):
            return call()
    except StarDistError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1 and message.strip() == message.splitlines()[0].strip(), (
            f"multi-line message: {message!r}")
        assert names in message, f"message does not name {names!r}: {message!r}"
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_counter = itertools.count()


def _fresh_dir(root: Path) -> Path:
    path = root / f"case{next(_counter)}"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------
# Shared junk
# ---------------------------------------------------------------------------------------------

SPECIAL_NUMBERS = [0, -1, 1, 0.0, -0.0, 1e-320, 1e308, -1e308, 2**53 + 1, 2**63, 2**64, -(2**63),
                   10**400, -(10**400), 2**1024, float("nan"), float("inf"), float("-inf")]
SPECIAL_STRINGS = ["", " ", "star", "ties", "linear", "average", "task_arithmetic", "slerp", "dare_ties",
                   "bfloat16", "float64", "F32", "base", "*", "mlp", "self_attn", "1e999", "nan", "-0.5", "0.5",
                   "true", "../x", "/abs", "a\nb", "\r", "\u2028", "\x85", "\0", "\ud800", "é", "x" * 300]
CONFIG_KEYS = ["merge_method", "base_model", "models", "model", "parameters", "weight", "density", "eta",
               "lambda", "normalize", "int8_mask", "dtype", "out_dtype", "output_format", "tokenizer_source",
               "slices", "sources", "layer_range", "filter", "value", "tokenizer", "random_seed", "__class__"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(CONFIG_KEYS), st.sampled_from(SPECIAL_STRINGS), st.text(max_size=8),
                 st.integers(-3, 3), st.none(), st.booleans(), st.floats(allow_nan=False))
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int, leaf: Any = 1, as_dict: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"value": value} if as_dict else [value]
    return value


def alias_bomb(levels: int = 9, fan_out: int = 10) -> list:
    """A billion-laughs structure: tiny in memory (shared lists), 10**levels leaves when walked."""
    value: list = ["lol"] * fan_out
    for _ in range(levels):
        value = [value] * fan_out
    return value


@st.composite
def mutated_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` with a few byte-level edits: truncation, insertion, deletion, overwrite, appending."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "insert", "delete", "flip", "append"]))
        pos = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# 1. The config loader
# ---------------------------------------------------------------------------------------------

VALID_CONFIGS: list[dict[str, Any]] = [
    {"merge_method": "star", "base_model": "base",
     "models": [{"model": "ft1"}, {"model": "ft2", "parameters": {"weight": 0.5}}],
     "parameters": {"eta": 40, "lambda": 1.0}, "dtype": "bfloat16"},
    {"merge_method": "ties", "base_model": "base",
     "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": "b", "parameters": {"weight": [0, 0.5, 1], "density": 0.3}}],
     "parameters": {"normalize": True, "int8_mask": False}, "dtype": "float16", "out_dtype": "float32"},
    {"merge_method": "task_arithmetic", "base_model": "base",
     "models": ["a", {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}],
     "parameters": {"lambda": [1, 0.5], "normalize": False}},
    {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 2}}, {"model": "b"}],
     "parameters": {"normalize": True}, "tokenizer_source": "base"},
    {"merge_method": "average", "base_model": "base", "models": [{"model": "a"}], "output_format": "adapter"},
    {"merge_method": "ties", "base_model": "base",
     "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}],
                 "parameters": {"density": 0.5}}],
     "parameters": {"weight": 1.0}},
    {"merge_method": "star", "base_model": "base", "models": [{"model": "a"}],
     "parameters": {"eta": [{"filter": "self_attn", "value": [20, 60]}, {"filter": "*", "value": 40}]}},
]


def _containers(node: Any, seen: set[int] | None = None) -> list[Any]:
    """Every dict and list in a config, the root first, each once (a "huge" edit shares one
    object thousands of times: walking each use would make the next edit slow)."""
    seen = set() if seen is None else seen
    seen.add(id(node))
    found = [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        if isinstance(child, (dict, list)) and id(child) not in seen:
            found += _containers(child, seen)
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with 1-3 edits anywhere in it: a value replaced by junk, a key deleted,
    an unknown key added, a value wrapped in a list or a conditional, a value repeated
    thousands of times."""
    config = copy.deepcopy(draw(st.sampled_from(VALID_CONFIGS)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(_containers(config)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap", "huge"]))
        slots = list(where) if isinstance(where, dict) else list(range(len(where)))
        if action == "add" or not slots:
            if isinstance(where, dict):
                where[draw(keys)] = draw(junk)
            else:
                where.append(draw(junk))
            continue
        slot = draw(st.sampled_from(slots))
        if action == "delete":
            del where[slot]
        elif action == "replace":
            where[slot] = draw(junk)
        elif action == "wrap":
            old = where[slot]
            where[slot] = draw(st.sampled_from([[old], {"value": old}, [{"filter": old, "value": 1}],
                                                [{"filter": "mlp", "value": old}], [old, old]]))
        else:
            where[slot] = [where[slot]] * draw(st.sampled_from([100, 5000, 20000]))
    return config


def _dict_configs() -> st.SearchStrategy[Any]:
    return st.one_of(mutated_configs(), st.dictionaries(keys, junk, max_size=6), junk)


def test_valid_configs_load() -> None:
    """The seeds of the mutations are valid, so the mutations are near-valid."""
    for config in VALID_CONFIGS:
        assert isinstance(star_dist.load_config(config), MergeConfig)


@FUZZ
@given(_dict_configs())
@example({"merge_method": "star", "base_model": "b", "models": ["a"], "parameters": {"eta": 10**400}})
@example({"base_model": "b", "models": [{"model": "a", "parameters": {"weight": 10**400}}]})
@example({"base_model": "b", "models": ["a"], "parameters": {"lambda": 2**1024}})
@example({"base_model": "b", "models": ["a"], "parameters": {0: 1, "a": 1}})
@example({"base_model": "b", "models": ["a"], "parameters": {"eta": [{0: 1, "a": 1, "value": 40}]}})
@example({"base_model": "b", "models": [{"model": "a", "parameters": {None: 1, "x": 2}}]})
@example({"base_model": "b", "models": ["a"], "parameters": {"a\nb": {}}})
@example({"base_model": "b", "slices": [{"sources": [{"model": "a", "layer_range": {}}]}]})
@example({"base_model": "b", "slices": [{"sources": [{"model": "a", "layer_range": [[0], 1]}]}]})
@example({"base_model": "b", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], 0: 1, "x": 1}]})
@example({"base_model": "b", "parameters": [1],
          "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], "parameters": {"eta": 40}}]})
def test_config_from_dict(config: Any) -> None:
    # load_config takes a mapping or a path; other top-level values (what a YAML file may
    # hold) go to from_dict, which the YAML route calls with them.
    load = star_dist.load_config if isinstance(config, dict) else MergeConfig.from_dict
    parses_or_one_line_error(lambda: load(config), "config")


# Inputs too big for an @example (hypothesis pretty-prints each one: a 10**9-item repr),
# built inside the test instead.
PATHOLOGICAL_CONFIGS: dict[str, Callable[[], Any]] = {
    "deep_list": lambda: {"base_model": "b", "models": ["a"], "dtype": nested(5000)},
    "deep_filter": lambda: {"base_model": "b", "models": ["a"],
                            "parameters": {"eta": [{"value": 1, "filter": nested(5000)}]}},
    "deep_dict": lambda: {"base_model": "b", "models": ["a"], "parameters": nested(5000, as_dict=True)},
    "alias_bomb_dtype": lambda: {"base_model": "b", "models": ["a"], "dtype": alias_bomb()},
    "alias_bomb_model": lambda: {"base_model": "b", "models": [{"model": alias_bomb()}]},
    "alias_bomb_models": lambda: {"base_model": "b", "models": alias_bomb()},
    "long_gradient": lambda: {"base_model": "b", "models": ["a"], "parameters": {"eta": list(range(101, 20101))}},
    "gradient_under_limit": lambda: {"base_model": "b", "models": ["a"],
                                     "parameters": {"eta": list(range(101, 9000))}},
    "int_past_str_limit": lambda: {"base_model": "b", "models": ["a"], "dtype": 10**5000},
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_CONFIGS))
def test_config_pathological_dict(name: str) -> None:
    config = PATHOLOGICAL_CONFIGS[name]()
    parses_or_one_line_error(lambda: star_dist.load_config(config), "config")


YAML_PIECES = [
    "merge_method: star", "merge_method: [", "base_model: base", "base_model: " + "x" * 300,
    "base_model: \"a\\0b\"", "models:", "  - model: ft1", "  - model: ft2\n    parameters: {weight: 0.5}",
    "  - {model: a, parameters: {density: 1e999}}", "parameters: {eta: 40, lambda: .nan}",
    "parameters:\n  weight: [{filter: mlp, value: 0.5}, {value: .inf}]", "dtype: bfloat16", "dtype: 2001-13-45",
    "dtype: !!float abc", "dtype: !!int 0x", "dtype: !!binary AAAA", "dtype: !!set {a, b}",
    "x: !!python/name:os.system",
    "weight: 1" + "0" * 400, "weight: 1" + "0" * 5000, "a: &a [1, 2]", "b: *a", "c: *undefined", "? [1, 2]\n: x",
    "1: 2", "null: 3", "? {a: 1}\n: 2", "%YAML 9.9\n---", "--- 1\n--- 2", "\t- x", "- 1", "'unterminated",
    "\"\\ud800\"", "{", "[" * 3000, "!!timestamp 2001-02-30", "a: !!int 99999999999999999999999999999999",
]


def _yaml_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join([*lines, f"merge_method: *a{levels}", "base_model: b", "models: [a]"])


def _dump(config: Any) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


yaml_texts = st.one_of(
    mutated_configs().map(_dump),
    st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=10), max_size=8).map("\n".join),
    st.text(max_size=200),
)
yaml_bytes = st.one_of(
    yaml_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from(VALID_CONFIGS).map(_dump).map(str.encode).flatmap(mutated_bytes),
    st.binary(max_size=200),
)


@FUZZ
@given(yaml_bytes)
@example(b"\xff\xfe\x00")
@example(b"models: [a]\nbase_model: \xc3")
@example(b"merge_method: [")
@example(b"[" * 3000)
@example(b"dtype: 2001-13-45")
@example(b"dtype: !!float abc")
@example(("base_model: " + "x" * 300 + "\nmodels: [a]").encode())
@example(b"base_model: \"a\\0b\"\nmodels: [a]")
def test_config_yaml_file(workdir: Path, raw: bytes) -> None:
    _check_yaml(workdir / "merge.yaml", raw)


def _check_yaml(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    parses_or_one_line_error(lambda: star_dist.load_config(path), str(path))
    parses_or_one_line_error(lambda: MergeConfig.read_yaml(path), str(path))  # the CLI's reader


@pytest.mark.parametrize("raw", [_yaml_bomb().encode(), b"[" * 100_000, b"{a: " * 100_000],
                         ids=["alias_bomb", "deep_flow_list", "deep_flow_map"])
def test_config_pathological_yaml(workdir: Path, raw: bytes) -> None:
    _check_yaml(workdir / "merge.yaml", raw)


# ---------------------------------------------------------------------------------------------
# 2. The safetensors header reader
# ---------------------------------------------------------------------------------------------

tensor_names = st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["w", "model.layers.0.mlp.weight",
                                                                            "__metadata__", "a\nb", "\ud800"]))
tensor_specs = st.lists(
    st.tuples(tensor_names, st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4, unique_by=lambda t: t[0],
)
json_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(SPECIAL_NUMBERS[:14]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
              st.sampled_from(sorted(SAFETENSORS_DTYPES))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _header_and_data(spec: list[tuple[str, str, list[int]]], metadata: bool) -> tuple[dict[str, Any], int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}} if metadata else {}
    offset = 0
    for name, dtype, shape in spec:
        nbytes = DTYPES[dtype][1]
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


def _mutate_entry(draw: st.DrawFn, header: dict[str, Any], spans: list[list[int]]) -> None:
    names = [n for n, e in header.items() if n != "__metadata__" and isinstance(e, dict) and e]
    if not names:
        header[draw(st.text(max_size=6))] = draw(json_junk)
        return
    name = draw(st.sampled_from(names))
    entry = header[name]
    offsets = entry.get("data_offsets")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    begin, end = offsets if ok else (0, 0)
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "extra", "entry"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)) | st.sampled_from(["f32", "", "F 32"])
                              | json_junk)
    elif field == "shape":
        entry["shape"] = draw(st.one_of(
            json_junk, st.lists(st.integers(-2, 2**65), max_size=4),
            st.just([2**63, 2**63, 0]), st.just([2**64 - 1] * 64), st.just([1] * 2000)))
    elif field == "data_offsets":
        other = draw(st.sampled_from(spans)) if spans else [0, 0]
        entry["data_offsets"] = draw(st.one_of(
            json_junk,
            st.just([end, begin]), st.just([begin]), st.just([begin, end, end]), st.just([-1, end]),
            st.just([begin + 1, end + 1]), st.just([begin - 1, end - 1]), st.just(list(other)),
            st.just([float(begin), float(end)] if end < 2**1000 else [0.5, 1.5]), st.just([begin, 2**64]),
            st.just([begin, 10**4299]),
            st.just([int("9" * 4300), int("9" * 4300)]),
            st.tuples(st.integers(-5, 2**70), st.integers(-5, 2**70)).map(list)))
    elif field == "delete":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif field == "extra":
        entry[draw(st.text(max_size=6))] = draw(json_junk)
    else:
        header[name] = draw(json_junk)


def _with_duplicate(text: str, name: str, value: Any) -> str:
    """The JSON object `text` with `name` given a first time before its real entries."""
    first = json.dumps(name) + ": " + json.dumps(value)
    return "{" + first + ("}" if text.strip() == "{}" else ", " + text.lstrip()[1:])


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A valid safetensors file with a few edits to its header JSON, its length field or its bytes."""
    spec = draw(tensor_specs)
    header, data_size = _header_and_data(spec, draw(st.booleans()))
    spans = [e["data_offsets"] for n, e in header.items() if n != "__metadata__"]
    kind = draw(st.sampled_from(["entry", "entry", "metadata", "top", "duplicate", "none"]))
    text: str | None = None
    if kind == "entry":
        for _ in range(draw(st.integers(1, 2))):
            _mutate_entry(draw, header, spans)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_junk | st.dictionaries(st.text(max_size=4), json_junk, max_size=3))
    elif kind == "top":
        text = draw(json_junk.map(json.dumps) | st.just("[" * 3000 + "]" * 3000))
    elif kind == "duplicate" and spans:
        name = draw(st.sampled_from([n for n in header if n != "__metadata__"]))
        dup = draw(st.sampled_from([copy.deepcopy(header[name]), {"dtype": "F32", "shape": [1],
                                                                   "data_offsets": [0, 4]}]))
        text = _with_duplicate(json.dumps(header), name, dup)
    if text is None:
        text = json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text.encode("ascii", "backslashreplace")
    raw += draw(st.sampled_from([b"", b" " * (-len(raw) % 8), b"\0", b"  \n"]))
    length = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), st.sampled_from(
        [0, 1, len(raw) - 1, len(raw) + 1, 100 * 1000 * 1000 + 1, 2**63, 2**64 - 1])))
    data = draw(st.sampled_from([b"\0" * data_size, b"\x7f" * data_size, b"\0" * max(0, data_size - 1),
                                 b"\0" * (data_size + 1)]))
    content = struct.pack("<Q", max(0, length)) + raw + data
    if draw(st.integers(0, 9)) == 0:
        content = draw(mutated_bytes(content))
    return content


def _raw(header: Any, data: bytes = b"") -> bytes:
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


safetensors_inputs = st.one_of(safetensors_files(), st.binary(max_size=64),
                               st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b))


@FUZZ
@given(safetensors_inputs)
@example(b"")
@example(b"\x01\x02")
@example(_raw(b"[" * 3000))
@example(_raw(b'{"a":' * 3000))
@example(_raw(b"1" * 5000))
@example(_raw(b"\xff\xfe"))
@example(_raw({"w": {"dtype": "F32", "shape": [10**4000, 10**4000], "data_offsets": [0, 0]}}))
@example(_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [int("9" * 4300), int("9" * 4300)]}}))
@example(_raw({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
def test_safetensors_header(workdir: Path, content: bytes) -> None:
    path = workdir / "model.safetensors"
    path.write_bytes(content)
    parses_or_one_line_error(lambda: read_header(path), str(path))


@pytest.mark.parametrize("shape", [[2**64 - 1] * 100_000, [2**63] * 2 + [0], [1] * 1_000_000],
                         ids=["many_huge_dims", "huge_times_zero", "million_dims"])
def test_safetensors_header_long_shape(workdir: Path, shape: list[int]) -> None:
    """A shape whose product is astronomically large (or is 0 only at its end) is answered fast."""
    path = workdir / "shape.safetensors"
    path.write_bytes(_raw({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, b"\0" * 4))
    parses_or_one_line_error(lambda: read_header(path), str(path))


_W = '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'


@FUZZ
@given(safetensors_files())
@example(_raw("{" + _W + "}, " + _W + "}}", b"\0" * 4))  # a tensor named twice
@example(_raw("{" + _W + ', "dtype": "F32"}}', b"\0" * 4))  # a field given twice
@example(_raw("{" + _W + ', "x": NaN}}', b"\0" * 4))  # NaN is not JSON
@example(_raw('{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4))  # lone surrogate
def test_safetensors_header_accepts_only_what_safetensors_accepts(workdir: Path, content: bytes) -> None:
    """A file read_header accepts loads with the safetensors library, with the same tensors."""
    from safetensors import safe_open

    path = workdir / "diff.safetensors"
    path.write_bytes(content)
    parsed = parses_or_one_line_error(lambda: read_header(path), str(path))
    if parsed is None:
        return
    entries, _ = parsed
    with safe_open(str(path), framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(entries)
        for name, entry in entries.items():
            sliced = fh.get_slice(name)
            assert sliced.get_dtype() == entry.dtype and tuple(sliced.get_shape()) == entry.shape


# ---------------------------------------------------------------------------------------------
# 3. The sharded index reader (model.safetensors.index.json)
# ---------------------------------------------------------------------------------------------

SHARDS = {"model-00001-of-00002.safetensors": ["a.weight", "b.weight"],
          "model-00002-of-00002.safetensors": ["c.weight"]}
OUTSIDE = "outside.safetensors"  # a valid file beside the model folder: an escaping path finds it
ESCAPES = ["../" + OUTSIDE, "sub/../../" + OUTSIDE, "/etc/passwd", "//x", "\\x", "..", ".", "./", "", "sub/",
           "a\nb", "a\rb", "a\u2028b", "a\0b", "\ud800", "x" * 300, ("d" * 200 + "/") * 30 + "x", INDEX_FILE,
           "missing.safetensors", "./model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors/"]


def _shard_bytes(names: list[str]) -> bytes:
    header, size = _header_and_data([(n, "F32", [2]) for n in names], metadata=True)
    return _raw(header, b"\0" * size)


def _valid_weight_map() -> dict[str, Any]:
    return {name: file for file, names in SHARDS.items() for name in names}


@st.composite
def index_documents(draw: st.DrawFn) -> Any:
    """A valid index with edits: weight_map values of other types or escaping the folder,
    tensors added or removed, the document or its weight_map replaced by junk."""
    doc: dict[str, Any] = {"metadata": {"total_size": 24}, "weight_map": _valid_weight_map()}
    weight_map = doc["weight_map"]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["value", "value", "add", "delete", "weight_map", "doc", "metadata"]))
        if action == "value":
            weight_map[draw(st.sampled_from(sorted(weight_map)) | tensor_names)] = draw(
                st.sampled_from(ESCAPES) | json_junk | st.text(max_size=12))
        elif action == "add":
            weight_map[draw(tensor_names)] = draw(st.sampled_from(sorted(SHARDS)))
        elif action == "delete" and weight_map:
            del weight_map[draw(st.sampled_from(sorted(weight_map)))]
        elif action == "weight_map":
            doc["weight_map"] = draw(json_junk)
            return doc
        elif action == "doc":
            return draw(json_junk)
        elif action == "metadata":
            doc["metadata"] = draw(json_junk)
    return doc


index_texts = st.one_of(
    index_documents().map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[" * 3000, b"1" * 5000, b"\xff\xfe{}", b"NaN", b'{"weight_map": {}}']),
)


def _model_folder(root: Path, index: bytes, shards: bool) -> Path:
    case = _fresh_dir(root)
    (case / OUTSIDE).write_bytes(_shard_bytes(["a.weight"]))
    folder = case / "model"
    folder.mkdir()
    (folder / "sub").mkdir()
    if shards:
        for file, names in SHARDS.items():
            (folder / file).write_bytes(_shard_bytes(names))
    (folder / INDEX_FILE).write_bytes(index)
    return folder


def _index(weight_map: Any) -> bytes:
    return json.dumps({"weight_map": weight_map}).encode("utf-8", "surrogatepass")


@FUZZ
@given(index_texts, st.booleans())
@example(b"[" * 3000, True)
@example(_index({"a.weight": "x" * 300}), True)
@example(_index({"a.weight": ("d" * 200 + "/") * 30 + "x"}), True)
@example(_index({"a.weight": "a\nb"}), True)
@example(_index({"a.weight": "../" + OUTSIDE}), True)
@example(_index({"a.weight": "sub/../../" + OUTSIDE}), True)
@example(_index({"a.weight": "/etc/passwd"}), True)
@example(_index({**_valid_weight_map(), "a.weight": "model-00002-of-00002.safetensors"}), True)
def test_index(workdir: Path, index: bytes, shards: bool) -> None:
    folder = _model_folder(workdir, index, shards)
    try:
        tensors = parses_or_one_line_error(lambda: index_folder(folder), str(folder))
        if tensors is not None:  # read: every tensor comes from a file inside the folder
            inside = os.path.realpath(folder) + os.sep
            assert all(os.path.realpath(e.file).startswith(inside) for e in tensors.values()), tensors
    finally:
        shutil.rmtree(folder.parent)


@pytest.mark.parametrize("where", ["model", "top"])
def test_empty_conditional_value(where: str) -> None:
    """A conditional whose value is an empty gradient is refused by key path (the fuzzer found
    it reaching evaluate() and an IndexError)."""
    setting = [{"filter": "mlp", "value": 0.5}, {"value": []}]
    config = ({"base_model": "b", "models": [{"model": "a", "parameters": {"weight": setting}}]} if where == "model"
              else {"base_model": "b", "models": ["a"], "parameters": {"eta": setting}})
    with pytest.raises(StarDistError, match=r"\[1\]\.value: an empty list gives no value"):
        star_dist.load_config(config)


def test_date_and_bytes_values_are_config_errors() -> None:
    """YAML also yields dates, bytes and sets; as values they are refused, not crashed on."""
    for value in (datetime.date(2001, 2, 3), b"\xff", {"a", "b"}):
        config = {"base_model": "b", "models": [{"model": "a", "parameters": {"weight": value}}], "dtype": value}
        parses_or_one_line_error(lambda c=config: star_dist.load_config(c), "config")
