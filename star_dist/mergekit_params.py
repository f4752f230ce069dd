"""Per-tensor parameters as mergekit's config language defines them.

A parameter (`weight`, `density`, `lambda`, ...) may be, besides a number:

- a gradient, a list of numbers: interpolated linearly over the layer position
  t = i / (L − 1) of layer i of L (t = 1 when L = 1); tensors outside the layers
  (embeddings, final norm, lm_head) read it at t = 0, as mergekit does;
- a list of conditionals `[{filter: mlp, value: 0.5}, {value: 0}]`: the first entry whose
  `filter` is a substring of the tensor's name (or that has no filter, or `*`) gives the
  value, itself a number or a gradient; when none matches, the next level decides
  (a model's own setting, then the top-level `parameters:`, then the method's default).

Pure functions, no I/O: the plan resolves every tensor's values once, up front, and the
engine only sees numbers (`TensorParams`), so workers never interpret the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import ConfigError

# Layer tensors in the architectures star_dist merges: llama/mistral/qwen `model.layers.i.`,
# gpt2 `h.i.`, bert `encoder.layer.i.`, and `blocks.i.` / `block.i.`.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def is_per_tensor(setting: Any) -> bool:
    """Whether a setting can differ between tensors (a gradient or a list of conditionals)."""
    return isinstance(setting, list)


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to (`model.layers.3.mlp...` -> 3), None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def count_layers(names: Iterable[str]) -> int:
    """Layers in a model, from its tensor names (the largest layer index + 1)."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, n_layers: int) -> float:
    """mergekit's t for a tensor: i / (L − 1) inside layer i, 1 for a one-layer model, 0 elsewhere.

    Args:
        name: the tensor's name, e.g. "model.layers.3.mlp.up_proj.weight".
        n_layers: the model's layer count L (`count_layers`).
    Returns:
        t in [0, 1], where a gradient is read.
    """
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for one tensor, as mergekit reads it, None when no conditional applies.

    Args:
        setting: a plain value, a gradient (list of numbers) or a list of conditionals.
        tensor_name: the tensor's name, matched against each conditional's `filter` substring.
        t: the tensor's layer position in [0, 1] (`layer_position`).
    Returns:
        The value (a gradient interpolated linearly at t), or None.
    """
    if not isinstance(setting, list):
        return setting
    if all(_is_number(v) for v in setting):
        scaled = t * (len(setting) - 1)
        lo = int(scaled)
        hi = min(len(setting) - 1, lo + 1)
        frac = scaled - lo
        return (1 - frac) * setting[lo] + frac * setting[hi]
    if all(not isinstance(v, (list, Mapping)) for v in setting):  # non-numeric: stepwise, no blend
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        if not isinstance(cond, Mapping):
            continue  # refused by `setting_problems`
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and str(pattern) in tensor_name):
            return evaluate(cond.get("value"), tensor_name, t)
    return None


def setting_problems(setting: Any, path: str) -> list[str]:
    """Why a setting is not one mergekit accepts (a single conditional must be in a list).

    Args:
        setting: the value as the config gives it.
        path: where it sits in the config, for the messages ("models[0].parameters.weight").
    Returns:
        One message per problem; empty when the setting is well formed (values are checked elsewhere).
    """
    if isinstance(setting, Mapping):
        return [f"{path}: a conditional must be in a list, e.g. [{{filter: mlp, value: 0.5}}, {{value: 0}}]"]
    if not isinstance(setting, list):
        return []
    if not setting:
        return [f"{path}: an empty list gives no value"]
    if all(not isinstance(v, (list, Mapping)) for v in setting):
        return []
    problems = []
    for j, cond in enumerate(setting):
        if not isinstance(cond, Mapping) or "value" not in cond:
            problems.append(f"{path}[{j}]: expected {{filter: <substring of a tensor name>, value: <number>}}")
            continue
        extra = sorted(set(cond) - {"filter", "value"})
        if extra:
            problems.append(f"{path}[{j}]: unknown key(s) {', '.join(map(repr, extra))} (use filter and value)")
        value = cond["value"]
        if isinstance(value, Mapping) or (isinstance(value, list) and not all(_is_number(v) for v in value)):
            problems.append(f"{path}[{j}].value: a number or a list of numbers")
        elif value == []:
            problems.append(f"{path}[{j}].value: an empty list gives no value")
    return problems


def leaves(setting: Any) -> list[Any]:
    """Every plain value a setting can produce (gradient points and conditional values), to validate."""
    if isinstance(setting, Mapping):
        return leaves(setting.get("value"))
    if isinstance(setting, list):
        return [leaf for v in setting for leaf in leaves(v)]
    return [setting]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


@dataclass(frozen=True)
class TensorParams:
    """One tensor's resolved values: what the engine uses instead of the shard's defaults."""

    method_params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[tuple[str, Any], ...], ...]
    weights: tuple[float, ...]  # resolved by the method (defaults, normalization)
    lambda_: float


@lru_cache(maxsize=256)
def _method(name: str, method_params: tuple[tuple[str, Any], ...],
            model_params: tuple[tuple[tuple[str, Any], ...], ...]) -> Any:
    from .methods import get_method

    return get_method(name, dict(method_params), [dict(p) for p in model_params])


def method_for(name: str, params: TensorParams) -> Any:
    """The method instance for one tensor's values (cached: gradients repeat across tensors).

    Args:
        name: the merge method's name.
        params: the tensor's resolved values (`resolve_tensor_params`).
    Returns:
        The MergeMethod built with the tensor's method and per-model parameters.
    Raises:
        ConfigError: a value the method refuses (e.g. a density outside (0, 1] at this tensor).
    """
    return _method(name, params.method_params, params.model_params)


def resolve_tensor_params(config: Any, method_name: str, tensor_name: str, n_layers: int) -> TensorParams:
    """One tensor's values from a `MergeConfig` with per-tensor settings, weights resolved by
    the method (its defaults and normalization) exactly as the shard-wide weights are.

    Args:
        config: the MergeConfig (its `tensor_values` reads the settings).
        method_name: the merge method's name.
        tensor_name: the tensor's name, for filters and its layer index.
        n_layers: the base model's layer count, for the gradients' t.
    Returns:
        The TensorParams the engine uses for this tensor instead of the shard's defaults.
    Raises:
        ConfigError: a value the method refuses at this tensor, the tensor named.
    """
    glob, own, weights, lambda_ = config.tensor_values(tensor_name, layer_position(tensor_name, n_layers))
    params = TensorParams(
        method_params=tuple(sorted(glob.items())),
        model_params=tuple(tuple(sorted(p.items())) for p in own),
        weights=(),
        lambda_=lambda_,
    )
    try:
        resolved = tuple(method_for(method_name, params).resolve_weights(weights))
    except ConfigError as exc:  # a gradient's weights for this tensor only: say which
        raise ConfigError(f"tensor {tensor_name!r}: {exc}") from None
    return TensorParams(params.method_params, params.model_params, resolved, lambda_)
