"""Does a model folder hold exactly the tensors its config.json describes?

The architecture is built from config.json on the meta device (`accelerate.init_empty_weights`
and `transformers`' `from_config`: no memory, no weights), and every parameter name and
shape is compared with the folder's safetensors headers (through its index when sharded).
Tied parameters (`accelerate.utils.find_tied_parameters`: e.g. `lm_head.weight` and
`model.embed_tokens.weight` under `tie_word_embeddings`) must be stored once per group:
transformers loads one copy and ties the rest to it, so a second stored copy would be
silently dropped. Headers only: a 70B folder is checked in seconds.

Runs on the base during `plan` (a checkpoint that does not match its own config fails before
any heavy work) and on the output at the end of every merge (`--no-verify` skips it).
`transformers` and `accelerate` are optional (the `verify` extra): without them, or without
a config.json, the check is skipped with a note, never failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import arch_cache
from .checkpoint import ADAPTER_CONFIG, Checkpoint, index_folder
from .errors import InputError, StarDistError, VerifyError

CONFIG_FILE = "config.json"
MAX_NAMED = 5  # problems spelled out in the one-line error; the rest are counted


@dataclass(frozen=True)
class Architecture:
    """What `from_config` builds: the tensors a checkpoint must store, and their shapes."""

    name: str  # the model class, e.g. LlamaForCausalLM
    params: dict[str, tuple[int, ...]]  # every parameter (tied copies included)
    buffers: dict[str, tuple[int, ...]]  # persistent buffers: may be stored, then shape-checked
    tied: list[list[str]]  # groups of parameter names that share one tensor
    ignore_missing: tuple[str, ...] = ()  # the model's own patterns (transformers ignores these)
    ignore_unexpected: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Architecture:
        """Back from `dataclasses.asdict` through JSON (shapes and patterns as tuples again)."""
        return cls(data["name"], {k: tuple(v) for k, v in data["params"].items()},
                   {k: tuple(v) for k, v in data["buffers"].items()}, [list(g) for g in data["tied"]],
                   tuple(data["ignore_missing"]), tuple(data["ignore_unexpected"]))


@dataclass(frozen=True)
class Verification:
    """The outcome of a check that passed, or why it was skipped (`skipped` set)."""

    folder: Path
    architecture: str = ""
    tensors: int = 0
    tied: list[list[str]] = field(default_factory=list)
    skipped: str = ""
    warning: str = ""  # tensors transformers would drop at load, when not strict
    against: str = ""  # what the tensors were compared with, when not the folder's own config.json

    def summary(self) -> str:
        """One line for the terminal."""
        if self.skipped:
            return f"verify: skipped for {self.folder} ({self.skipped})"
        tied = "".join(f"; tied {' = '.join(g)} (stored once)" for g in self.tied)
        warning = f"; warning: {self.warning}" if self.warning else ""
        against = self.against or f"{self.architecture} from {CONFIG_FILE}"
        return f"verified {self.folder}: {self.tensors} tensors match {against}{tied}{warning}"


class Problem(NamedTuple):
    """One tensor that does not fit. `dropped`: transformers still loads the folder but discards
    this tensor's values (an extra tensor, a second copy of a tied group); otherwise the folder
    does not load as its config says (missing: random init; mis-shaped: a load error)."""

    name: str
    text: str
    dropped: bool = False


def verify_folder(folder: str | Path, strict: bool = True) -> Verification:
    """Check a full-model folder's tensors against the architecture its config.json builds.

    Args:
        folder: a Hugging Face model folder (config.json + safetensors).
        strict: extra tensors and second tied copies (which transformers drops at load) fail
            too; False makes them a warning (a merge's output inherits them from its base).

    Returns:
        What was checked, or why it was skipped (no config.json, transformers missing,
        a PEFT adapter folder, an architecture transformers converts at load).

    Raises:
        VerifyError: a missing or mis-shaped tensor; with `strict`, also an extra tensor or a
            tied group stored twice.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file():
        return verify_adapter(folder, strict)
    if not (folder / CONFIG_FILE).is_file():
        return Verification(folder, skipped=f"no {CONFIG_FILE}: nothing to check the tensors against")
    stored = index_folder(folder)
    arch = build_architecture(folder)
    if isinstance(arch, str):
        return Verification(folder, skipped=arch)
    problems = tensor_problems(arch, {name: entry.shape for name, entry in stored.items()})
    fatal = [p for p in problems if strict or not p.dropped]
    if fatal:
        raise VerifyError(_message(str(folder), arch, fatal, {n: e.file for n, e in stored.items()}))
    return Verification(folder, arch.name, len(stored), [sorted(g) for g in arch.tied], warning=_dropped(problems))


def verify_adapter(folder: Path, strict: bool = True) -> Verification:
    """A PEFT adapter folder: its base (adapter_config.json's base_model_name_or_path) checked
    against the base's own config.json, then every factor against the base's tensors by the
    reader the merge uses for adapter inputs (module present, B·A the weight's shape, ranks).

    Args:
        folder: the adapter folder.
        strict: as for `verify_folder`, applied to the base.

    Returns:
        What was checked, or why it was skipped (the base is not reachable from here).

    Raises:
        VerifyError: a factor that does not fit the base, or a base that does not fit its config.
    """
    from .lora import LoraAdapter

    source = _adapter_base(folder)
    try:
        base = Checkpoint.open(source)
    except StarDistError as exc:
        return Verification(folder, skipped=f"its base {source!r} cannot be opened here: {exc}")
    base_check = verify_folder(base.folder, strict)
    try:
        adapter = LoraAdapter.open(str(folder), folder, base)
    except InputError as exc:
        raise VerifyError(f"{folder}: the adapter does not fit its base {source}: {exc}") from None
    against = f"its base {source}" + (f" ({base_check.architecture})" if base_check.architecture else "")
    return Verification(folder, against, len(adapter.sources), warning=base_check.warning, against=against)


def _adapter_base(folder: Path) -> str:
    """The adapter's base as PEFT names it; a relative path is taken from the current folder,
    else from the adapter's own folder (make-tiny's adapters say `../base`)."""
    try:
        source = str(json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError) as exc:
        raise VerifyError(f"{folder / ADAPTER_CONFIG}: cannot read it ({exc})") from None
    beside = folder / source
    return str(beside) if source and not Path(source).exists() and beside.is_dir() else source


def checked_base(base: Checkpoint) -> Checkpoint:
    """The plan's hook: the base's headers must match the model its own config.json builds.

    Args:
        base: the base checkpoint, indexed from its headers.

    Returns:
        The same checkpoint; with a note for the plan's warnings when it stores tensors that
        transformers drops at load (they are merged or copied as stored).

    Raises:
        InputError: a missing or mis-shaped tensor (skipped silently when it cannot check).
    """
    if not (base.folder / CONFIG_FILE).is_file():
        return base
    arch = build_architecture(base.folder)
    if isinstance(arch, str):
        return base
    problems = tensor_problems(arch, {name: entry.shape for name, entry in base.tensors.items()})
    label = f"base model {base.source}" + ("" if base.source == str(base.folder) else f" ({base.folder})")
    fatal = [p for p in problems if not p.dropped]
    if fatal:
        raise InputError(_message(label, arch, fatal, {name: entry.file for name, entry in base.tensors.items()}))
    dropped = _dropped(problems)
    return dataclasses.replace(base, notes=(*base.notes, f"{label}: {dropped}")) if dropped else base


def _dropped(problems: list[Problem]) -> str:
    dropped = [p.name for p in problems if p.dropped]
    if not dropped:
        return ""
    named = ", ".join(repr(n) for n in dropped[:MAX_NAMED]) + (f" and {len(dropped) - MAX_NAMED} more"
                                                               if len(dropped) > MAX_NAMED else "")
    return f"{len(dropped)} stored tensor(s) that transformers drops at load ({named})"


def build_architecture(folder: Path) -> Architecture | str:
    """The architecture config.json describes, built on the meta device (or remembered from an
    earlier build of the same config: arch_cache.py); a string saying why not when it cannot be
    built here (the check is then skipped, not failed).

    Args:
        folder: a folder with a config.json.

    Returns:
        The architecture, or the reason it could not be built.
    """
    key = arch_cache.cache_key(folder / CONFIG_FILE)
    cached = arch_cache.load(key)
    if cached is not None:
        return Architecture.from_json(cached)
    arch = _build_on_meta(folder)
    if isinstance(arch, Architecture):
        arch_cache.store(key, dataclasses.asdict(arch))
    return arch


def _build_on_meta(folder: Path) -> Architecture | str:
    try:
        from accelerate import init_empty_weights
        from accelerate.utils import find_tied_parameters
        from transformers import AutoConfig
    except ImportError:
        return "transformers and accelerate are not installed: pip install 'star-dist[verify]'"
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            with init_empty_weights():
                model = build_model(config)
            model.tie_weights()
    except Exception as exc:  # an architecture this transformers cannot build (custom code, newer model)
        return f"transformers cannot build {_architectures(folder)} here: {type(exc).__name__}: {_first_line(exc)}"
    if conversion := _load_conversions(model):
        return f"transformers converts {type(model).__name__} checkpoints at load ({conversion}); use --smoke"
    return Architecture(
        name=type(model).__name__,
        params={n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
        buffers=_persistent_buffers(model),
        tied=[sorted(g) for g in find_tied_parameters(model)],
        ignore_missing=tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
        ignore_unexpected=tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own warnings (a config key it renames, a missing generation config) are
    not the user's problem here: errors only, for the length of the build."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def build_model(config: Any) -> Any:
    """The model config.architectures names (what from_pretrained builds), else the causal-LM
    auto class's; on whatever device the caller set up (meta, under init_empty_weights).

    Args:
        config: a transformers PretrainedConfig.

    Returns:
        The model, with untied weights not yet tied.

    Raises:
        ValueError: config.architectures names only classes transformers does not have.
    """
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        found = getattr(transformers, name, None)
        if found is not None:
            return found(config)
    if names:  # custom code (trust_remote_code): its layout is not the built-in model_type's
        raise ValueError(f"{', '.join(names)} is not a transformers class (custom code is not run here)")
    return transformers.AutoModelForCausalLM.from_config(config)


def _persistent_buffers(model: Any) -> dict[str, tuple[int, ...]]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items() if n not in params}


def _load_conversions(model: Any) -> str:
    """Renames or fusions transformers applies while loading this model (MoE experts fused
    into one tensor, renamed blocks), in words; "" when names are compared as stored."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # an older transformers: no conversions at load
        return ""
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    patterns = [p for c in conversions for p in getattr(c, "source_patterns", [])]
    return ", ".join(patterns[:3]) if conversions else ""


def tensor_problems(arch: Architecture, stored: dict[str, tuple[int, ...]]) -> list[Problem]:
    """Every tensor that is missing, extra, mis-shaped, or a tied copy stored twice, in name order.

    Args:
        arch: what the config builds.
        stored: the folder's tensors, name -> shape.

    Returns:
        The problems; empty when the folder matches.
    """
    stored = _align_prefix(arch, stored)
    problems: list[Problem] = []
    copies = {name for group in arch.tied for name in group}
    for group in arch.tied:
        present = [n for n in group if n in stored]
        if len(present) > 1:
            problems.append(Problem(present[1], f"is tied to {present[0]!r} by {CONFIG_FILE} but both are stored; "
                                    "transformers keeps one copy and drops the other: store one (as "
                                    "save_pretrained does)", dropped=True))
        elif not present and not _ignored(group[0], arch.ignore_missing):
            problems.append(Problem(group[0], f"is missing (tied group {group}: one of them must be stored)"))
    expected = {**arch.buffers, **arch.params}
    for name in sorted(set(expected) | set(stored)):
        problem = _one_problem(name, expected.get(name), stored.get(name), arch, name in copies)
        if problem:
            problems.append(problem)
    return sorted(problems)


def _one_problem(
    name: str, want: tuple[int, ...] | None, got: tuple[int, ...] | None, arch: Architecture, tied: bool
) -> Problem | None:
    if want is None:
        if _ignored(name, arch.ignore_unexpected):
            return None
        return Problem(name, f"is stored but {arch.name} has no such tensor (transformers drops it at load)", True)
    if got is None:
        optional = tied or name in arch.buffers or _ignored(name, arch.ignore_missing)
        return None if optional else Problem(name, f"is missing ({arch.name} needs shape {list(want)})")
    return None if got == want else Problem(name, f"has shape {list(got)}, {arch.name} expects {list(want)}")


def _align_prefix(arch: Architecture, stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Checkpoints saved from the bare base model (`h.0...` for GPT2LMHeadModel's
    `transformer.h.0...`) lack the head's prefix; transformers adds it at load, and so do we."""
    if not stored or any(n in arch.params for n in stored):
        return stored
    prefixes = {n.split(".", 1)[0] for n in arch.params if "." in n}
    for prefix in sorted(prefixes):
        moved = {f"{prefix}.{n}": s for n, s in stored.items()}
        if any(n in arch.params for n in moved):
            return moved
    return stored


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _message(label: str, arch: Architecture, problems: list[Problem], files: dict[str, str]) -> str:
    """One line: the first problems spelled out with their file, the rest counted."""
    shown = [f"{_where(files.get(p.name))}tensor {p.name!r} {p.text}" for p in problems[:MAX_NAMED]]
    more = f"; and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""
    return f"{label}: does not match the {arch.name} its {CONFIG_FILE} describes: " + "; ".join(shown) + more


def _where(file: str | None) -> str:
    return f"{Path(file).name}: " if file else ""


def _architectures(folder: Path) -> str:
    try:
        names = json.loads((folder / CONFIG_FILE).read_text()).get("architectures") or ["its model"]
    except (OSError, ValueError, AttributeError):
        names = ["its model"]
    return ", ".join(map(str, names))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"
