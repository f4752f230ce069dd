"""The merge config: one schema holding every default, loaded from YAML, a dict or CLI flags.

Keys follow mergekit where they mean the same thing, so an existing mergekit YAML for
`task_arithmetic` or `ties` runs unchanged:

    merge_method: star            # star (default) | task_arithmetic | ties | average
    base_model: path/or/hub-id
    models:
      - model: path/or/hub-id
        parameters: {weight: 1.0}  # optional; STAR and average default to 1/N
    parameters: {eta: 40, lambda: 1.0, density: 0.2}
    dtype: float32                 # computation dtype (float32 or float64)
    out_dtype: bfloat16            # optional; default: each tensor keeps the base's dtype
    output_format: model           # model (default) | adapter (LoRA inputs only: one PEFT adapter)

Execution settings (runtime, workers, shard size...) are not part of the merge's meaning,
so they live in `RunOptions`, filled from CLI flags or keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DTYPE_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}
COMPUTE_DTYPES = ("float32", "float64")
OUTPUT_FORMATS = ("model", "adapter")
ENGINE_PARAMS = ("lambda", "weight")
DEFAULT_METHOD = "star"
DEFAULT_LAMBDA = 1.0
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # "5GB", as transformers' save_pretrained


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned input: a model folder, a PEFT adapter folder, or a hub id."""

    model: str
    weight: float | None = None


@dataclass(frozen=True)
class MergeConfig:
    """Everything that determines the merged bytes (and nothing that does not)."""

    merge_method: str
    base_model: str
    models: tuple[ModelSpec, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    output_format: str = "model"

    @property
    def lambda_(self) -> float:
        return float(self.parameters.get("lambda", DEFAULT_LAMBDA))

    def method_params(self) -> dict[str, Any]:
        """Method-specific parameters (η, density): the global ones minus engine-owned keys."""
        return {k: v for k, v in self.parameters.items() if k not in ENGINE_PARAMS}

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, in mergekit's layout (for the model card and the plan)."""
        out: dict[str, Any] = {"merge_method": self.merge_method, "base_model": self.base_model}
        out["models"] = [
            {"model": m.model, **({"parameters": {"weight": m.weight}} if m.weight is not None else {})}
            for m in self.models
        ]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
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
        """Build and validate a config, reporting every problem at once."""
        problems: list[str] = []
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "output_format"}
        for key in data:
            if key not in known:
                problems.append(f"unknown key {key!r} (valid: {', '.join(sorted(known))})")
        method = data.get("merge_method") or DEFAULT_METHOD
        base = data.get("base_model")
        if not base:
            problems.append("base_model is missing")
        models: list[ModelSpec] = []
        raw_models = data.get("models") or []
        if not isinstance(raw_models, list) or not raw_models:
            problems.append("models: no models to merge (give at least one under `models:`)")
            raw_models = []
        for i, entry in enumerate(raw_models):
            spec, errs = _parse_model_entry(entry, i)
            problems.extend(errs)
            if spec is not None:
                models.append(spec)
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            problems.append("parameters must be a mapping")
            params = {}
        dtype = str(data.get("dtype", "float32"))
        if dtype not in COMPUTE_DTYPES:
            problems.append(f"dtype {dtype!r}: computation runs in one of {', '.join(COMPUTE_DTYPES)}")
        out_dtype = data.get("out_dtype")
        if out_dtype is not None and str(out_dtype) not in DTYPE_NAMES:
            problems.append(f"out_dtype {out_dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        output_format = str(data.get("output_format", "model"))
        if output_format not in OUTPUT_FORMATS:
            problems.append(f"output_format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        config = cls(
            merge_method=str(method),
            base_model=str(base),
            models=tuple(models),
            parameters=dict(params),
            dtype=dtype,
            out_dtype=None if out_dtype is None else str(out_dtype),
            output_format=output_format,
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Check the method and its parameters (η range, density range, λ) all together."""
        from .methods import get_method  # the registry knows each method's params

        problems: list[str] = []
        try:
            get_method(self.merge_method, self.method_params())
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            float(self.parameters.get("lambda", DEFAULT_LAMBDA))
        except (TypeError, ValueError):
            problems.append(f"lambda {self.parameters.get('lambda')!r} is not a number")
        if not self.models:
            problems.append("models: no models to merge")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        config = cls.from_dict(data or {}, source=str(path))
        return config.resolve_paths(path.parent)

    def resolve_paths(self, relative_to: Path) -> MergeConfig:
        """Make relative local paths relative to the config file's folder, not the cwd."""

        def fix(p: str) -> str:
            candidate = relative_to / p
            return str(candidate) if not Path(p).is_absolute() and candidate.exists() else p

        return MergeConfig(
            merge_method=self.merge_method,
            base_model=fix(self.base_model),
            models=tuple(ModelSpec(fix(m.model), m.weight) for m in self.models),
            parameters=self.parameters,
            dtype=self.dtype,
            out_dtype=self.out_dtype,
            output_format=self.output_format,
        )


def _parse_model_entry(entry: Any, index: int) -> tuple[ModelSpec | None, list[str]]:
    if isinstance(entry, str):
        return ModelSpec(entry), []
    if not isinstance(entry, Mapping) or "model" not in entry:
        return None, [f"models[{index}]: expected `model: <path or hub id>`"]
    params = entry.get("parameters") or {}
    unknown = [k for k in params if k != "weight"]
    problems = [f"models[{index}].parameters.{k}: unknown (only `weight` is per model)" for k in unknown]
    weight = params.get("weight")
    if weight is not None:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            problems.append(f"models[{index}].parameters.weight {weight!r} is not a number")
            weight = None
    return ModelSpec(str(entry["model"]), weight), problems


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', or a plain byte count (as transformers reads it)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(
            f"max shard size {text!r}: use a number with a unit, e.g. 5GB, 500MB, 2GiB"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"max shard size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class RunOptions:
    """How to run a merge; none of this changes the output bytes except `threads_per_worker`
    and `device`, whose floating-point reductions differ (so they are part of the plan)."""

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    quiet: bool = False
    runtime: str = "ray"  # "ray" | "local"
    address: str | None = None  # None: start an embedded local cluster
    workers: int | None = None  # None: one per GPU, or one per `threads_per_worker` CPUs
    device: str = "auto"  # "cpu" | "cuda" | "auto"
    threads_per_worker: int = 1
    connect_timeout_s: float = 30.0
