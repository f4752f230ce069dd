"""The merge config: one schema holding every default, loaded from YAML, a dict or CLI flags.

Keys follow mergekit where they mean the same thing, so an existing mergekit YAML for
`task_arithmetic` or `ties` runs unchanged:

    merge_method: star            # star (default) | task_arithmetic | ties | average | tsv | iso_c | iso_cts
    base_model: path/or/hub-id
    models:
      - model: path/or/hub-id
        parameters: {weight: 1.0}  # optional; STAR and average default to 1/N; TIES also density
    parameters: {eta: 40, lambda: 1.0, density: 0.2}   # a `weight` here is every model's default
    dtype: bfloat16                # optional: mergekit's working dtype, also the default output dtype
    out_dtype: bfloat16            # optional; default: `dtype`, else each tensor keeps the base's
    output_format: model           # model (default) | adapter (LoRA inputs only: one PEFT adapter)

`dtype` means what it means in mergekit (the dtype tensors are merged in, and the output
dtype unless `out_dtype` is set), except that star_dist never computes below float32:
bfloat16 and float16 requests are computed in float32 and rounded once at the end, which is
at least as exact. `dtype: float64` computes in float64.

Execution settings (runtime, workers, shard size...) are not part of the merge's meaning,
so they live in `RunOptions`, filled from CLI flags or keyword arguments.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .mergekit_params import evaluate, is_per_tensor, leaves, setting_problems

DTYPE_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}
OUTPUT_FORMATS = ("model", "adapter")
ENGINE_PARAMS = ("lambda", "weight")
# mergekit keys accepted for compatibility: the tokenizer can only come from the base.
TOKENIZER_SOURCES = (None, "base")
DEFAULT_METHOD = "star"
DEFAULT_LAMBDA = 1.0
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # "5GB", as transformers' save_pretrained
# TIES without a density: star_dist trims to the TIES paper's 0.2; mergekit keeps everything
# (density 1). We keep the paper's default and say so in the plan and once at run time.
TIES_DEFAULT_DENSITY = 0.2
MERGEKIT_TIES_DEFAULT_DENSITY = 1.0

# mergekit keys star_dist does not implement: refused by name, one problem each, never ignored.
UNSUPPORTED_MERGEKIT_KEYS = {
    "tokenizer": "star_dist copies the base's tokenizer files; mergekit's `tokenizer:` block is not supported",
    "chat_template": "star_dist copies the base's chat template; `chat_template` is not supported",
    "layer_range": "merging a layer range is not supported; merge whole models",
    "modules": "per-module merges are not supported",
    "base_model_layers": "not supported",
    "random_seed": "no method here is random; `random_seed` is not supported",
}
# mergekit methods star_dist does not implement (`linear` is accepted as an alias of average).
UNSUPPORTED_MERGEKIT_METHODS = (
    "slerp", "nuslerp", "multislerp", "passthrough", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce", "karcher", "nearswap",
    "arcee_fusion", "model_breadcrumbs", "model_breadcrumbs_ties",
)
METHOD_ALIASES = {"linear": "average"}
# A merge config holds dozens of values. Past these bounds it is junk or a YAML alias bomb (an
# anchor used 10 times in each of 9 levels is 10**9 values), refused before anything walks it.
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 32


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned input: a model folder, a PEFT adapter folder, or a hub id.

    `parameters` holds its own method parameters besides the weight (TIES: `density`).
    """

    model: str
    weight: Any = None  # a number, or mergekit's per-tensor setting (a gradient, conditionals)
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """Everything that determines the merged bytes (and nothing that does not)."""

    merge_method: str
    base_model: str
    models: tuple[ModelSpec, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    output_format: str = "model"
    # Things the plan must say about how the file was read (not part of the merge's meaning).
    notes: tuple[str, ...] = field(default=(), compare=False)
    # From a mergekit `slices:` config: the one layer range every source uses. The plan
    # checks it is the whole model ([0, L]), the only slice star_dist merges.
    layer_range: tuple[int, int] | None = None
    # The config as the user gave it (file keys with flags applied, their paths, before any
    # rewriting): what the model card shows. Not part of the merge's meaning.
    as_written: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def lambda_(self) -> float:
        return self.tensor_values("", 0.0)[3]

    @property
    def per_tensor(self) -> bool:
        """Whether some parameter is a gradient or a list of conditionals (mergekit's per-tensor values)."""
        return any(is_per_tensor(v) for v in self.parameters.values()) or any(
            is_per_tensor(m.weight) or any(is_per_tensor(v) for v in m.parameters.values()) for m in self.models)

    def tensor_values(
        self, tensor_name: str, t: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[float | None], float]:
        """One tensor's method parameters, per-model parameters, weights and λ, as mergekit
        reads them: a model's own setting, else the top-level one, else the method's default."""
        glob = {k: v for k, v in ((k, evaluate(v, tensor_name, t)) for k, v in self.parameters.items())
                if v is not None}
        own = [{k: v for k, v in ((k, evaluate(v, tensor_name, t)) for k, v in m.parameters.items())
                if v is not None} for m in self.models]
        default = glob.get("weight")
        weights = []
        for m in self.models:
            w = evaluate(m.weight, tensor_name, t)
            w = default if w is None else w
            weights.append(None if w is None or number_problem(w) else float(w))
        method_params = {k: v for k, v in glob.items() if k not in ENGINE_PARAMS}
        lambda_ = glob.get("lambda", DEFAULT_LAMBDA)  # a bad value is reported by problems()
        return method_params, own, weights, DEFAULT_LAMBDA if number_problem(lambda_) else float(lambda_)

    @property
    def compute_dtype(self) -> str:
        """float64 when asked for; otherwise float32, the floor (half dtypes are upcast)."""
        return "float64" if self.dtype is not None and DTYPE_NAMES[self.dtype] == "F64" else "float32"

    @property
    def output_dtype(self) -> str | None:
        """The output dtype's name: out_dtype, else dtype (as mergekit), else None (the base's)."""
        return self.out_dtype or self.dtype

    def model_weights(self) -> list[float | None]:
        """Each model's weight: its own, else the top-level `weight` (mergekit's default), else None.
        Per-tensor settings read as for a tensor outside the layers (t = 0, no name)."""
        return self.tensor_values("", 0.0)[2]

    def method_params(self) -> dict[str, Any]:
        """Method-specific parameters (η, density): the global ones minus engine-owned keys."""
        return self.tensor_values("", 0.0)[0]

    def model_method_params(self) -> list[dict[str, Any]]:
        """Each model's own method parameters (TIES: density), empty where it gives none."""
        return self.tensor_values("", 0.0)[1]

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, in mergekit's layout (for the model card and the plan)."""
        out: dict[str, Any] = {"merge_method": self.merge_method, "base_model": self.base_model}
        models = []
        for m in self.models:
            params = {**({"weight": m.weight} if m.weight is not None else {}), **m.parameters}
            models.append({"model": m.model, **({"parameters": params} if params else {})})
        out["models"] = models
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        if self.output_format != "model":
            out["output_format"] = self.output_format
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> MergeConfig:
        """Build and validate a config, reporting every problem at once.

        Args:
            data: the config as plain data: star_dist's keys or a mergekit YAML's (incl. `slices:`).
            source: where it came from (a file path), the prefix of the error message.
        Returns:
            The config; `notes` say how mergekit spellings were read.
        Raises:
            ConfigError: every problem found, in one message.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        shape_problem = _structure_problem(data)
        if shape_problem:
            raise ConfigError(f"{source}: {shape_problem}")
        as_written = json.loads(json.dumps(dict(data), default=str))  # plain data, before any rewriting
        problems: list[str] = []
        notes: list[str] = []
        data, layer_range = _from_slices(data, problems) if "slices" in data else (data, None)
        problems += _key_problems(data)
        method, spelled = _method_name(data, notes, problems)
        base, raw_models = _base_and_model_entries(data, method, spelled, notes, problems)
        models = _model_specs(raw_models, base, method, notes, problems)
        params = _parameters(data, problems)
        dtype, out_dtype, output_format = _output_settings(data, problems)
        if method == "ties" and "density" not in params and models and not all(
                "density" in m.parameters for m in models):
            notes.append(f"ties: no density given, so star_dist trims each task vector to "
                         f"{TIES_DEFAULT_DENSITY} (mergekit's default is {MERGEKIT_TIES_DEFAULT_DENSITY}: "
                         "set `density: 1` for mergekit's result)")
        config = cls(merge_method=method, base_model=str(base or ""), models=tuple(models), parameters=params,
                     dtype=dtype, out_dtype=out_dtype, output_format=output_format, notes=tuple(notes),
                     layer_range=layer_range, as_written=as_written)
        # The method's own checks join the file's problems: one message, never two rounds.
        problems += [p for p in config.problems() if not (p.startswith("models:") and not models)]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return config

    def validate(self, source: str = "config") -> None:
        """Check the method and its parameters (η range, density range, λ) all together."""
        problems = self.problems()
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of the method and its parameters, each with its key path."""
        from .methods import get_method  # the registry knows each method's params

        problems: list[str] = []
        seen: set[str] = set()
        for path, glob, own in self._leaf_variants():
            try:
                get_method(self.merge_method, glob, own)
            except ConfigError as exc:
                problem = f"{path}: {exc}" if path else str(exc)
                if problem not in seen:
                    seen.add(problem)
                    problems.append(problem)
        for key in ENGINE_PARAMS:
            for leaf in leaves(self.parameters.get(key)) if key in self.parameters else []:
                problem = number_problem(leaf)
                if problem:
                    problems.append(f"parameters.{key} {leaf!r} {problem}")
        if not self.models:
            problems.append("models: no models to merge")
        return problems

    def _leaf_variants(self) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
        """Scalar parameter sets that together try every value a per-tensor setting can
        take, each with the key path it came from, so validation checks all of them."""
        glob, own, _, _ = self.tensor_values("", 0.0)
        variants: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [("", glob, own)]
        for key, setting in self.parameters.items():
            if is_per_tensor(setting) and key not in ENGINE_PARAMS:
                variants += [(f"parameters.{key}", {**glob, key: leaf}, own) for leaf in leaves(setting)]
        for i, m in enumerate(self.models):
            for key, setting in m.parameters.items():
                if is_per_tensor(setting):
                    for leaf in leaves(setting):
                        changed = [dict(p) for p in own]
                        changed[i][key] = leaf
                        variants.append((f"models[{i}].parameters.{key}", glob, changed))
        return variants

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        data = _load_yaml(path)
        config = cls.from_dict(data or {}, source=str(path))
        return config.resolve_paths(path.parent)

    @staticmethod
    def read_yaml(path: str | Path) -> dict[str, Any]:
        """The file's raw mapping, unvalidated: the CLI applies its flags before validating."""
        path = Path(path)
        data = _load_yaml(path)
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return dict(data or {})

    def resolve_paths(self, relative_to: Path) -> MergeConfig:
        """Make relative local paths relative to the config file's folder, not the cwd."""

        def fix(p: str) -> str:
            candidate = relative_to / p
            # os.path.exists: False for a name too long or holding a NUL, where Path.exists raises
            return str(candidate) if not Path(p).is_absolute() and os.path.exists(candidate) else p

        return MergeConfig(
            merge_method=self.merge_method,
            base_model=fix(self.base_model),
            models=tuple(ModelSpec(fix(m.model), m.weight, m.parameters) for m in self.models),
            parameters=self.parameters,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            output_format=self.output_format,
            notes=self.notes,
            layer_range=self.layer_range,
            as_written=self.as_written,
        )


def _load_yaml(path: Path) -> Any:
    """The YAML file's data; ConfigError, on one line, when it cannot be read or parsed."""
    try:
        text = path.read_text()
    except OSError as exc:
        # A relative path is read from the current directory, which under `ray job submit` is
        # the head's, not the submitter's: say which directory that was.
        where = "" if path.is_absolute() else f"; looked in {Path.cwd()}"
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror}{where})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not {exc.encoding}: {exc.reason})") from None
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a tagged value PyYAML fails to build (!!int x)
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None


def _structure_problem(data: Any) -> str | None:
    """Why `data` cannot be a merge config's plain data (None if it can): a key that is not a
    one-line string, an integer too large for a float, too deep, or too many values. Walked
    without recursion and within MAX_CONFIG_VALUES steps, whatever the input (shared lists,
    as YAML aliases make, count once per use)."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    counted = 1  # values pushed so far: the stack itself stays within the bound
    while stack:
        node, depth, where = stack.pop()
        children = len(node) if isinstance(node, (Mapping, list, tuple, set, frozenset)) else 0
        counted += children
        if counted > MAX_CONFIG_VALUES:
            return (f"more than {MAX_CONFIG_VALUES} values (a merge config holds dozens; "
                    "each use of a YAML alias counts)")
        if depth > MAX_CONFIG_DEPTH:
            return f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep"
        if isinstance(node, int) and not isinstance(node, bool):
            try:
                float(node)
            except OverflowError:
                return f"{where or 'the config'}: an integer of {node.bit_length()} bits is too large to be a number"
        elif isinstance(node, Mapping):
            for key, value in node.items():
                if not isinstance(key, str):
                    return f"{where + ': ' if where else ''}key of type {type(key).__name__}: keys must be names"
                if "".join(key.splitlines()) != key:
                    return f"{where + ': ' if where else ''}key {key!r} has a line break"
                stack.append((value, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(node))
    return None


_CONFIG_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "output_format",
                "tokenizer_source", "slices")


def _key_problems(data: Mapping[str, Any]) -> list[str]:
    """Top-level keys star_dist does not read: mergekit features it lacks, or typos."""
    problems = []
    for key in data:
        if key in UNSUPPORTED_MERGEKIT_KEYS:
            problems.append(f"{key}: {UNSUPPORTED_MERGEKIT_KEYS[key]}")
        elif key not in _CONFIG_KEYS:
            problems.append(f"unknown key {key!r} (valid: {', '.join(sorted(_CONFIG_KEYS))})")
    return problems


def _method_name(data: Mapping[str, Any], notes: list[str], problems: list[str]) -> tuple[str, str]:
    """(the method star_dist runs, the name as spelled): mergekit's `linear` is `average`."""
    spelled = str(data.get("merge_method") or DEFAULT_METHOD)
    method = METHOD_ALIASES.get(spelled, spelled)
    if method != spelled:
        notes.append(f"merge_method {spelled!r} read as {method!r} (the same weighted mean)")
    if method in UNSUPPORTED_MERGEKIT_METHODS:
        problems.append(f"merge_method {method!r}: a mergekit method star_dist does not implement "
                        "(use star, task_arithmetic, ties, average, linear, tsv, iso_c or iso_cts)")
    return method, spelled


def _base_and_model_entries(data: Mapping[str, Any], method: str, spelled: str, notes: list[str],
                            problems: list[str]) -> tuple[Any, list[Any]]:
    """The base model and the raw `models:` entries, with mergekit's two base rules for
    average/linear: no base takes the first model as the reference, and a base that is not
    under `models:` is averaged in as one more model."""
    base = data.get("base_model")
    raw_models = data.get("models") or []
    if not isinstance(raw_models, list) or not raw_models:
        problems.append("models: no models to merge (give at least one under `models:`)")
        raw_models = []
    first = _first_model_path(raw_models)
    if not base and method == "average" and first is not None:
        # mergekit's linear needs no base: Σ w_i W_i / Σ w_i. The engine computes
        # W_ref + Σ w_i (W_i − W_ref) / Σ w_i, the same mean for any reference, so the
        # first model serves as one (its own τ is zero); its files are the ones copied.
        base = first
        notes.append(f"no base_model: models[0] {first!r} is the reference for shapes and copied files; "
                     "the result is the weighted mean of all models, as mergekit's linear")
        if not _normalizes(data):
            problems.append("parameters.normalize: false needs a base_model for average/linear "
                            "(Σ w_i W_i without normalizing has no reference to add to)")
    elif not base:
        problems.append("base_model is missing")
    elif spelled == "linear" and first is not None and str(base) not in _model_paths(raw_models):
        # mergekit adds a base_model that is not under models: as one more input to average.
        raw_models = [*raw_models, {"model": str(base)}]
        notes.append(f"linear: base_model {str(base)!r} is not under models:, so it is averaged in as one "
                     "more model (as mergekit does); list it under models: to set its weight")
    return base, raw_models


def _model_specs(raw_models: list[Any], base: Any, method: str, notes: list[str],
                 problems: list[str]) -> list[ModelSpec]:
    """Each `models:` entry parsed; the base listed among them is not a fine-tune (but for average)."""
    models = []
    for i, entry in enumerate(raw_models):
        spec, errs = _parse_model_entry(entry, i)
        problems.extend(errs)
        if spec is None:
            continue
        if base and spec.model == str(base) and method != "average":
            # mergekit skips the base when it builds task vectors (its τ is zero anyway);
            # counting it would turn STAR's 1/N mean into 1/(N+1).
            notes.append(f"models[{i}] {spec.model!r} is also the base_model: not counted as a "
                         "fine-tune (as mergekit does)")
            continue
        models.append(spec)
    return models


def _parameters(data: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The top-level `parameters:`, those whose value is malformed reported and left out."""
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        problems.append("parameters must be a mapping")
        return {}
    malformed = {key for key, setting in params.items() if setting_problems(setting, f"parameters.{key}")}
    for key in malformed:
        problems.extend(setting_problems(params[key], f"parameters.{key}"))
    return {k: v for k, v in params.items() if k not in malformed}


def _output_settings(data: Mapping[str, Any], problems: list[str]) -> tuple[str | None, str | None, str]:
    """(dtype, out_dtype, output_format) as given, checked; tokenizer_source must be the base."""
    dtype = data.get("dtype")
    if dtype is not None and str(dtype) not in DTYPE_NAMES:
        problems.append(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    out_dtype = data.get("out_dtype")
    if out_dtype is not None and str(out_dtype) not in DTYPE_NAMES:
        problems.append(f"out_dtype {out_dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    if data.get("tokenizer_source") not in TOKENIZER_SOURCES:
        problems.append(
            f"tokenizer_source {data.get('tokenizer_source')!r}: star_dist copies the base's tokenizer "
            "files; use `tokenizer_source: base` or leave it out"
        )
    output_format = str(data.get("output_format", "model"))
    if output_format not in OUTPUT_FORMATS:
        problems.append(f"output_format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    return (None if dtype is None else str(dtype)), (None if out_dtype is None else str(out_dtype)), output_format


def _from_slices(data: Mapping[str, Any], problems: list[str]) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """mergekit's `slices:` as `models:` when it means a whole-model merge: one slice whose
    sources all use the same layer_range (the plan checks it spans every layer). Slice-level
    parameters and base_model come before the top-level ones, as in mergekit."""
    out = {k: v for k, v in data.items() if k != "slices"}
    slices = data.get("slices")
    if data.get("models"):
        problems.append("slices: give `models:` or `slices:`, not both (as mergekit)")
        return out, None
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        problems.append("slices: star_dist merges whole models: give one slice whose sources all use the same "
                        "full layer_range (stacking layer ranges is not supported)")
        return out, None
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources or not all(
            isinstance(s, Mapping) and "model" in s and "layer_range" in s for s in sources):
        problems.append("slices[0].sources: expected a list of {model: ..., layer_range: [start, end]}")
        return out, None
    ranges: list[Any] = []  # distinct by ==: a junk layer_range need not be hashable
    for s in sources:
        r = tuple(s["layer_range"]) if isinstance(s["layer_range"], list) else s["layer_range"]
        if r not in ranges:
            ranges.append(r)
    first = ranges[0]
    if len(ranges) != 1 or not (isinstance(first, tuple) and len(first) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in first)):
        problems.append(f"slices[0].sources: every source must use the same layer_range [start, end] (got "
                        f"{sorted(map(str, ranges))}); star_dist merges whole models only")
        return out, None
    unknown = sorted(set(slices[0]) - {"sources", "parameters", "base_model"})
    problems.extend(f"slices[0].{key}: not supported" for key in unknown)
    out["models"] = [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sources]
    top = data.get("parameters") or {}
    if isinstance(slices[0].get("parameters"), Mapping) and isinstance(top, Mapping):  # else refused later
        out["parameters"] = {**top, **slices[0]["parameters"]}
    if slices[0].get("base_model"):
        out["base_model"] = slices[0]["base_model"]
    return out, (int(first[0]), int(first[1]))


def _model_paths(raw_models: list[Any]) -> list[str]:
    """The `model:` of each well-formed raw entry (strings count), for base/models matching."""
    return [str(e) if isinstance(e, str) else str(e["model"])
            for e in raw_models if isinstance(e, str) or (isinstance(e, Mapping) and "model" in e)]


def _first_model_path(raw_models: list[Any]) -> str | None:
    paths = _model_paths(raw_models)
    return paths[0] if paths else None


def _normalizes(data: Mapping[str, Any]) -> bool:
    """Whether a linear/average config normalizes its weights (mergekit's default: yes)."""
    params = data.get("parameters")
    if not isinstance(params, Mapping) or "normalize" not in params:
        return True
    value = params["normalize"]
    return value is True or str(value).lower() in ("true", "1", "yes")


def number_problem(value: Any) -> str | None:
    """Why `value` is not a finite number (None if it is one); numeric strings count."""
    if isinstance(value, bool):
        return "is a boolean, not a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "is not a number"
    except OverflowError:
        return "is not a finite number"
    return None if math.isfinite(number) else "is not a finite number"


def _parse_model_entry(entry: Any, index: int) -> tuple[ModelSpec | None, list[str]]:
    """One `models:` item; per-model method parameters are checked later, against the method."""
    if isinstance(entry, str):
        return ModelSpec(entry), []
    if not isinstance(entry, Mapping) or "model" not in entry:
        return None, [f"models[{index}]: expected `model: <path or hub id>`"]
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        return None, [f"models[{index}].parameters: expected a mapping such as {{weight: 0.5}}, got {params!r}"]
    problems = []
    malformed = set()  # left out of the spec, so the method's checks see only well-formed values
    for key, setting in params.items():
        errs = setting_problems(setting, f"models[{index}].parameters.{key}")
        problems.extend(errs)
        if errs:
            malformed.add(key)
    params = {k: v for k, v in params.items() if k not in malformed}
    weight = params.get("weight")
    if isinstance(weight, list):  # per-tensor: every value it can take must be a number
        bad = [(leaf, number_problem(leaf)) for leaf in leaves(weight) if number_problem(leaf)]
        problems += [f"models[{index}].parameters.weight {leaf!r} {why}" for leaf, why in bad]
        weight = None if bad else weight
    elif weight is not None:
        problem = number_problem(weight)
        if problem:
            problems.append(f"models[{index}].parameters.weight {weight!r} {problem}")
            weight = None
        else:
            weight = float(weight)
    own = {str(k): v for k, v in params.items() if k != "weight"}
    return ModelSpec(str(entry["model"]), weight, own), problems


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str | int, what: str = "max shard size") -> int:
    """A size in bytes from text as transformers reads it: '5GB' -> 5_000_000_000, '500MB',
    '2GiB', or a plain byte count.

    Args:
        text: the size as text, or already an int of bytes (returned as is).
        what: the option's name, for the error message.
    Returns:
        The size in bytes.
    Raises:
        ConfigError: text that is not a positive number with a known unit.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{what} {text!r}: use a number with a unit, e.g. 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{what} {text!r} must be positive")
    return size


RUNTIMES = ("auto", "ray", "local")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunOptions:
    """How to run a merge, with the one default of each option (the CLI and the API take
    theirs from here). None of this changes the output bytes except `threads_per_worker` and
    the device each shard actually ran on (floating-point reductions differ), which the plan
    and the shard manifests record. Checked on creation: every problem in one ConfigError."""

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    quiet: bool = False
    runtime: str = "auto"  # "auto": join --address/RAY_ADDRESS, else Ray only when it pays | "ray" | "local"
    address: str | None = None  # None: no cluster to join (RAY_ADDRESS still counts under "auto")
    workers: int | None = None  # None: one per GPU, or one per `threads_per_worker` CPUs
    device: str = "auto"  # "cpu" | "cuda" | "auto" (a GPU when the worker has one)
    threads_per_worker: int = 1
    connect_timeout_s: float = 30.0
    start_timeout_s: float = 300.0  # fail when no worker has started for this long
    verify_resume: bool = False  # re-hash finished shards before trusting them (in the workers)
    verify: bool = True  # check the output against its config.json's architecture when done
    max_memory_per_worker: int | None = None  # bytes on the compute device; None: what the device has

    def __post_init__(self) -> None:
        problems = run_option_problems(self)
        if problems:
            raise ConfigError("run options: " + "; ".join(problems))


def run_option_problems(options: RunOptions) -> list[str]:
    """Every invalid option, in words naming the option and what it takes."""
    problems = []
    for name in ("overwrite", "quiet", "verify_resume", "verify"):
        if not isinstance(getattr(options, name), bool):
            problems.append(f"{name} must be true or false, got {getattr(options, name)!r}")
    for name, allowed in (("runtime", RUNTIMES), ("device", DEVICES)):
        if getattr(options, name) not in allowed:
            problems.append(f"{name} {getattr(options, name)!r} is not one of {', '.join(allowed)}")
    if not _positive_int(options.max_shard_size):
        problems.append(f"max_shard_size must be a positive number of bytes, got {options.max_shard_size!r}")
    if options.max_memory_per_worker is not None and not _positive_int(options.max_memory_per_worker):
        problems.append("max_memory_per_worker must be a positive number of bytes, got "
                        f"{options.max_memory_per_worker!r}")
    if options.workers is not None and not _positive_int(options.workers):
        problems.append(f"workers must be at least 1 (or None: one per GPU or CPU group), got {options.workers!r}")
    if not _positive_int(options.threads_per_worker):
        problems.append(f"threads_per_worker must be at least 1, got {options.threads_per_worker!r}")
    for name in ("connect_timeout_s", "start_timeout_s"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            problems.append(f"{name} must be a positive number of seconds, got {value!r}")
    if options.address is not None and (not isinstance(options.address, str) or not options.address.strip()):
        problems.append(f"address must be auto, host:port or ray://host:port, got {options.address!r}")
    elif options.address is not None and options.runtime == "local":
        problems.append(f"address {options.address!r} joins a Ray cluster, but runtime is 'local'")
    return problems


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
