"""A fine-tuned input as the planner sees it: for each base tensor, where its value comes from.

Two kinds exist: a full checkpoint (`FullInput`: the tensor itself) and a PEFT LoRA adapter
(`LoraAdapter`, in lora.py: two factors and a scale, or nothing for modules it leaves alone).
Both check their fit against the base and report errors naming the file and the tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import Checkpoint, is_adapter_folder, resolve_model_folder
from .errors import InputError
from .hub import is_hub_id
from .lora import LoraAdapter, LoraSource
from .safetensors_format import TensorEntry

__all__ = ["FullInput", "LoraAdapter", "LoraSource", "open_input", "absolute_source"]


@dataclass(frozen=True)
class FullInput:
    """A full fine-tuned checkpoint with the same tensor names and shapes as the base."""

    checkpoint: Checkpoint

    def source_for(self, name: str, base_entry: TensorEntry) -> TensorEntry:
        entry = self.checkpoint.tensors.get(name)
        if entry is None:
            raise InputError(
                f"{self.checkpoint.folder}: tensor {name!r} is missing (the base has it in "
                f"{base_entry.file}); every input must have every tensor of the base"
            )
        if entry.shape != base_entry.shape:
            raise InputError(
                f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, the base has "
                f"{list(base_entry.shape)} ({base_entry.file}); inputs must share the base's architecture"
            )
        if entry.is_float != base_entry.is_float:
            raise InputError(
                f"{entry.file}: tensor {name!r} is {entry.dtype}, the base's is {base_entry.dtype} "
                f"({base_entry.file}); a float tensor cannot be merged with a non-float one"
            )
        return entry

    def check_no_extra(self, base_names: set[str]) -> None:
        extra = sorted(set(self.checkpoint.tensors) - base_names)
        if extra:
            file = self.checkpoint.tensors[extra[0]].file
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise InputError(
                f"{file}: tensor {extra[0]!r}{more} is not in the base model "
                f"({self.checkpoint.folder} and the base must have the same tensors)"
            )

    def entries(self) -> list[TensorEntry]:
        return list(self.checkpoint.tensors.values())


def absolute_source(source: str) -> str:
    """A hub id as it is; a local path made absolute and normalized, not resolved (symlinks,
    such as a hub cache's, stay), so workers with another current directory read the same
    files and the plan's identity does not depend on how the path was spelled.

    Args:
        source: what the config says: a folder (relative to the current directory) or a hub id.

    Returns:
        The hub id, or the absolute path.
    """
    if is_hub_id(source):
        return source
    return os.path.abspath(os.path.expanduser(source))  # lexical: `a/../b` is `b`, links are not followed


def open_input(source: str, base: Checkpoint) -> FullInput | LoraAdapter:
    """Open a fine-tuned input from its headers: a PEFT adapter folder if it has adapter_config.json
    (and no model weights), else a full checkpoint.

    Args:
        source: what the config says: a folder or a hub id (hub weights are not downloaded).
        base: the opened base checkpoint, which an adapter's modules must fit.
    Returns:
        A LoraAdapter, or a FullInput wrapping the checkpoint.
    Raises:
        InputError: a missing or corrupt input, an adapter that does not fit the base, or a failed hub fetch.
    """
    folder = resolve_model_folder(absolute_source(source), weights=False)
    if is_adapter_folder(folder):
        return LoraAdapter.open(source, folder, base)
    return FullInput(Checkpoint.from_folder(source, folder))

