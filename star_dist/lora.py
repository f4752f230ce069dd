"""PEFT LoRA adapters as merge inputs: each adapted weight's task vector is `s · B @ A`.

The adapter is indexed from headers, like a full checkpoint; its factors are read lazily
by the worker and handed to the methods as a `LowRank`, so no m×n update is ever formed
(STAR takes its SVD through QR of the factors).

Key mapping (PEFT's saved layout): `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) adapt the base tensor `<module>.weight` (out, in). The scale is
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
`alpha_pattern` override r and alpha per module, matched as PEFT matches them (the pattern
must match the end of the module name at a dot boundary).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import InputError
from .safetensors_format import TensorEntry, read_header

ADAPTER_FILE = "adapter_model.safetensors"
_UNSUPPORTED_KINDS = (
    ("magnitude", "DoRA magnitude"),
    ("embedding", "embedding LoRA"),
    ("trainable_tokens", "trainable tokens"),
)
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "trainable_tokens")


@dataclass(frozen=True)
class LoraSource:
    """One adapted tensor: τ = scale · B @ A (transposed when `fan_in_fan_out`)."""

    a: TensorEntry  # lora_A.weight: (r, in)
    b: TensorEntry  # lora_B.weight: (out, r)
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter over the base: for each base tensor, a LoraSource, a full
    replacement tensor (modules_to_save, trained biases), or nothing."""

    source: str
    folder: Path
    config: dict[str, Any]
    sources: dict[str, LoraSource | TensorEntry]

    @classmethod
    def open(cls, source: str, folder: Path, base: Checkpoint) -> LoraAdapter:
        config = _read_adapter_config(folder)
        weights = folder / ADAPTER_FILE
        if not weights.exists():
            hint = " (adapter_model.bin is not read: re-save with safe_serialization=True)"
            raise InputError(f"{weights}: missing{hint if (folder / 'adapter_model.bin').exists() else ''}")
        entries, _ = read_header(weights)
        return cls(source, folder, config, _map_entries(weights, entries, config, base))

    def source_for(self, name: str, base_entry: TensorEntry) -> LoraSource | TensorEntry | None:
        return self.sources.get(name)

    def check_no_extra(self, base_names: set[str]) -> None:
        """Every adapter key was matched to a base tensor when the adapter was opened."""

    def entries(self) -> list[TensorEntry]:
        out: list[TensorEntry] = []
        for src in self.sources.values():
            out.extend([src.a, src.b] if isinstance(src, LoraSource) else [src])
        return out

    def scales(self) -> dict[str, float]:
        return {n: s.scale for n, s in sorted(self.sources.items()) if isinstance(s, LoraSource)}


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the adapter config ({exc})") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type} is not supported (only LoRA adapters merge)")
    if config.get("use_dora"):
        raise InputError(
            f"{path}: DoRA adapters (use_dora: true) are not supported: their update is not "
            "s·B·A; merge them into full checkpoints with peft's merge_and_unload first"
        )
    if config.get("lora_bias"):
        raise InputError(f"{path}: lora_bias adapters are not supported (their update is not s·B·A alone)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise InputError(f"{path}: `{key}` is missing or not a number")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when it matches the end of the module name at a dot.

    Args:
        patterns: adapter_config.json's rank_pattern or alpha_pattern (regex -> value).
        module: the module's full name, e.g. "model.layers.0.self_attn.q_proj".
        default: the value when no pattern matches (the config's `r` or `lora_alpha`).
    Returns:
        The first matching pattern's value, else `default`.
    """
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT applies to B·A: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, with
    per-module alpha overrides.

    Args:
        config: the adapter's adapter_config.json, checked (lora_alpha a number).
        module: the module's full name, matched against alpha_pattern.
        rank: the module's rank r (lora_A's rows).
    Returns:
        The scale s, so the module's update is s·B·A.
    """
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _map_entries(
    file: Path, entries: dict[str, TensorEntry], config: dict[str, Any], base: Checkpoint
) -> dict[str, LoraSource | TensorEntry]:
    """Base tensor name -> what the adapter gives for it: LoRA factors, or a full value."""
    factors, full = _split_keys(file, entries)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    sources: dict[str, LoraSource | TensorEntry] = {
        f"{module}.weight": _lora_source(file, module, pair, config, base, fan_in_fan_out)
        for module, pair in factors.items()
    }
    for name, entry in full.items():
        base_entry = base.tensors.get(name)
        if base_entry is None or base_entry.shape != entry.shape:
            got = "is not in the base" if base_entry is None else f"has shape {list(base_entry.shape)} in the base"
            raise InputError(f"{file}: tensor {name!r} (shape {list(entry.shape)}) {got}")
        sources[name] = entry
    return sources


def _split_keys(
    file: Path, entries: dict[str, TensorEntry]
) -> tuple[dict[str, dict[str, TensorEntry]], dict[str, TensorEntry]]:
    """({module: {"A": entry, "B": entry}}, {base name: full value}) from the adapter's keys;
    kinds of adapter weights star_dist cannot merge fail here, naming the tensor."""
    factors: dict[str, dict[str, TensorEntry]] = {}
    full: dict[str, TensorEntry] = {}
    for key, entry in sorted(entries.items()):
        if any(part in key for part in _UNSUPPORTED_KEYS):
            kind = next(k for part, k in _UNSUPPORTED_KINDS if part in key)
            raise InputError(f"{file}: tensor {key!r}: {kind} is not supported; merge it into the weights first")
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = entry
        else:  # modules_to_save or a trained bias (saved under the wrapped `base_layer`): a full value
            full[re.sub(r"\.base_layer(?=\.)", "", re.sub(r"\.modules_to_save(\.[^.]+)?", "", name))] = entry
    return factors, full


def _lora_source(file: Path, module: str, pair: dict[str, TensorEntry], config: dict[str, Any], base: Checkpoint,
                 fan_in_fan_out: bool) -> LoraSource:
    """One module's factors, checked against each other, the base tensor and adapter_config.json."""
    target = f"{module}.weight"
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise InputError(f"{file}: module {module!r} has no {missing} factor")
    a, b = pair["A"], pair["B"]
    base_entry = base.tensors.get(target)
    if base_entry is None:
        raise InputError(f"{file}: LoRA module {module!r} adapts {target!r}, which the base does not have")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InputError(
            f"{file}: tensor {module + '.lora_A.weight'!r} has shape {list(a.shape)}: "
            "convolution LoRA is not supported (only 2-D linear layers)"
        )
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise InputError(f"{file}: module {module!r}: lora_A has rank {rank}, lora_B {b.shape[1]}")
    update_shape = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])
    if update_shape != base_entry.shape:
        raise InputError(
            f"{file}: module {module!r}: B·A is {list(update_shape)} but the base tensor {target!r} "
            f"is {list(base_entry.shape)}; the adapter was trained on another architecture"
        )
    expected_rank = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    if expected_rank != rank:
        raise InputError(f"{file}: module {module!r} has rank {rank} but adapter_config.json says {expected_rank}")
    return LoraSource(a, b, lora_scale(config, module, rank), fan_in_fan_out)


def merged_adapter_config(template: dict[str, Any], ranks: dict[str, int], base_model: str) -> dict[str, Any]:
    """adapter_config.json for a merged adapter whose module `m` has rank `ranks[m]`.

    Every module gets lora_alpha equal to its rank, so PEFT's scale alpha/r is exactly 1
    and B @ A is the merged update itself. The most common rank is the default `r`; the
    others go in rank_pattern/alpha_pattern under their escaped full module names (PEFT
    reads pattern keys as regular expressions).

    Args:
        template: the first input adapter's config (task_type, peft_version, revision, fan_in_fan_out kept).
        ranks: each merged module's full name (no `.weight`) -> its rank in the output.
        base_model: the base as the merge config names it (`base_model_name_or_path`).
    Returns:
        The adapter config, as JSON-serializable data.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    default = max(sorted(counts), key=lambda r: counts[r]) if counts else 1
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != default}
    config = {k: v for k, v in template.items() if k in _KEPT_CONFIG_KEYS}
    config.update({
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "fan_in_fan_out": bool(template.get("fan_in_fan_out", False)),
    })
    return config


# Settings of the input adapters that still describe the merged one.
_KEPT_CONFIG_KEYS = ("task_type", "peft_version", "revision")
