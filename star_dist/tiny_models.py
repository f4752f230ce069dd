"""Tiny llama-shaped checkpoints, made on the spot, for the demo, tests and benchmarks.

Real safetensors files in the Hugging Face layout (`LlamaForCausalLM` loads them), sharded
with an index like the real thing. Fine-tunes differ from the base by a low-rank update
plus noise on every matrix (or, for STAR benchmarks, by a power-law spectrum like real
fine-tunes') and a small shift of every norm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinyShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tie_embeddings: bool = False


def llama_config(shape: TinyShape, dtype: str) -> dict:
    """config.json for a LlamaForCausalLM of `shape`, so transformers builds and loads the tiny checkpoint.

    Args:
        shape: the model's sizes (hidden, intermediate, layers, heads, vocab, tied embeddings).
        dtype: the `torch_dtype` to record: "float32", "bfloat16" or "float16".
    Returns:
        The config, as JSON-serializable data.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tie_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_shapes(shape: TinyShape) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a LlamaForCausalLM and its shape."""
    h, i, hd = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    kv = shape.kv_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h), "model.norm.weight": (h,)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out.update({
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab, h)
    return out


def make_base(shape: TinyShape, seed: int) -> dict[str, torch.Tensor]:
    """A random base model: matrices with entries N(0, 1/n) for n columns, norm vectors near 1.

    Args:
        shape: the model's sizes.
        seed: the generator seed; the same seed gives the same tensors.
    Returns:
        Tensor name -> float32 tensor, every tensor of a LlamaForCausalLM of `shape`.
    """
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in llama_shapes(shape).items():
        if len(dims) == 1:
            tensors[name] = torch.ones(dims) + 0.01 * torch.randn(dims, generator=g)
        else:
            tensors[name] = torch.randn(dims, generator=g) / dims[-1] ** 0.5
    return tensors


# σ_i ∝ i^-α of real task vectors: α fitted on 912 matrices of 24 MiniLM fine-tunes has median
# 0.67 (p10 0.51, p90 0.82); kept rank at η = 40 median 9.4% of min(m, n) (scripts/bench/spectra.py).
POWER_LAW_ALPHA = 0.67


def make_finetune(
    base: dict[str, torch.Tensor], seed: int, rank: int = 4, scale: float = 0.05, spectrum: str = "lowrank"
) -> dict[str, torch.Tensor]:
    """base + τ on matrices, a small shift on vectors.

    `spectrum` "lowrank" (the default, cheap): τ = a rank-`rank` update + small noise, whose
    spectrum is flat past the rank. "power_law": τ with σ_i ∝ i^-α (POWER_LAW_ALPHA) and random
    singular vectors, the shape real fine-tunes' task vectors have; for STAR benchmarks. Both
    have ‖τ‖_F ≈ scale·√m.

    Args:
        base: the base's tensors (`make_base`), name -> float32 tensor.
        seed: the generator seed.
        rank: the low-rank update's rank ("lowrank" only).
        scale: the update's size relative to the weights (‖τ‖_F ≈ scale·√m for an (m, n) matrix).
        spectrum: "lowrank" or "power_law"; any other value reads as "lowrank".
    Returns:
        Tensor name -> float32 tensor, the same names and shapes as `base`.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        if w.dim() == 2 and spectrum == "power_law":
            out[name] = w + scale * power_law_update(*w.shape, g)
        elif w.dim() == 2:
            m, n = w.shape
            low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / (rank * n) ** 0.5
            noise = torch.randn(m, n, generator=g) / n**0.5
            out[name] = w + scale * (low + 0.1 * noise)  # (m, n)
        else:
            out[name] = w + scale * 0.1 * torch.randn(w.shape, generator=g)
    return out


def power_law_update(m: int, n: int, g: torch.Generator, alpha: float = POWER_LAW_ALPHA) -> torch.Tensor:
    """(m, n) float32 Q_1 diag(σ) Q_2ᵀ with σ_i = c·i^-α, Q random orthonormal, ‖·‖_F = √m.

    Args:
        m: rows.
        n: columns.
        g: the torch.Generator the random directions come from (advanced by this call).
        alpha: the power-law exponent α (default POWER_LAW_ALPHA, fitted on real fine-tunes).
    Returns:
        The (m, n) float32 update, of rank min(m, n).
    """
    k = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, k, generator=g))  # (m, k)
    right, _ = torch.linalg.qr(torch.randn(n, k, generator=g))  # (n, k)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha  # (k,)
    sigma *= m**0.5 / torch.linalg.vector_norm(sigma)
    return (left * sigma) @ right.T  # (m, n)


def save_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict, dtype: str, shards: int = 1) -> None:
    """Write a Hugging Face folder: config.json, generation_config.json, safetensors (+ index).

    Args:
        folder: the model folder (created if missing).
        tensors: tensor name -> tensor, cast to `dtype` on write.
        config: the config.json content (`llama_config`).
        dtype: "float32", "bfloat16" or "float16".
        shards: how many safetensors files (names spread round-robin in sorted order); ≤ 1: one model.safetensors.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if shards <= 1:
        save_file(cast, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(cast)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: cast[k] for k in part}, str(folder / file), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = file
            total += cast[k].numel() * cast[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_merge(
    folder: Path,
    n_models: int = 3,
    dtype: str = "bfloat16",
    seed: int = 0,
    shape: TinyShape | None = None,
    shards: int = 2,
    method: str = "star",
    lora: int = 0,
    spectrum: str = "lowrank",
) -> Path:
    """Write base/, ft0/…ft{N-1}/ and merge.yaml (`method`; STAR with η = 40) under `folder`; with
    `lora` > 0 also lora0/… PEFT adapters and merge_lora.yaml, so adapter examples run offline.

    Args:
        folder: where everything goes (created if missing).
        n_models: how many full fine-tunes.
        dtype: the checkpoints' dtype: "float32", "bfloat16" or "float16".
        seed: the base's seed; each fine-tune and adapter derives its own from it.
        shape: the model's sizes; None: TinyShape() (hidden 64, 2 layers).
        shards: safetensors files per model.
        method: the merge_method written in the YAML files (η = 40 only for "star").
        lora: how many LoRA adapters to write as well; 0: none, and no merge_lora.yaml.
        spectrum: the fine-tunes' task vectors, as `make_finetune` takes it.
    Returns:
        The path of merge.yaml (its model paths are relative to `folder`).
    """
    shape = shape or TinyShape()
    base = make_base(shape, seed)
    config = llama_config(shape, dtype)
    save_model(folder / "base", base, config, dtype, shards=shards)
    for i in range(n_models):
        tuned = make_finetune(base, seed + 1000 * (i + 1), spectrum=spectrum)
        save_model(folder / f"ft{i}", tuned, config, dtype, shards=shards)
    merge = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": f"ft{i}"} for i in range(n_models)],
        "parameters": {"eta": 40} if method == "star" else {},
    }
    path = folder / "merge.yaml"
    header = f"# star-dist merge {path} OUT   (paths are relative to this file)\n"
    path.write_text(header + yaml.safe_dump(merge, sort_keys=False))
    if lora > 0:
        for i in range(lora):
            save_adapter(folder / f"lora{i}", base, dtype, seed + 5000 * (i + 1))
        lora_merge = {**merge, "models": [{"model": f"lora{i}"} for i in range(lora)]}
        lora_path = folder / "merge_lora.yaml"
        lora_path.write_text(f"# star-dist merge {lora_path} OUT   (LoRA adapters; add --output-format adapter "
                             "for one merged adapter)\n" + yaml.safe_dump(lora_merge, sort_keys=False))
    return path


LORA_TARGETS = ("q_proj", "v_proj")


def save_adapter(folder: Path, base: dict[str, torch.Tensor], dtype: str, seed: int, rank: int = 4) -> None:
    """A PEFT LoRA adapter as `save_pretrained` lays it out: adapter_config.json and
    adapter_model.safetensors with `base_model.model.<module>.lora_{A,B}.weight` for the
    attention q/v projections of every layer (B non-zero, so the adapter changes something).

    Args:
        folder: the adapter folder (created if missing).
        base: the base's tensors (`make_base`); only their names and shapes are read.
        dtype: the factors' dtype: "float32", "bfloat16" or "float16".
        seed: the generator seed.
        rank: the LoRA rank r (lora_alpha is 2r, so the scale is 2).
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in sorted(base.items()):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        out_features, in_features = w.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.1
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS),
              "base_model_name_or_path": "../base", "bias": "none", "fan_in_fan_out": False,
              "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


LLAMA_70B = TinyShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)


def save_sparse_model(folder: Path, shape: TinyShape, dtype: str = "bfloat16", shards: int = 30) -> int:
    """A checkpoint of any size with real safetensors headers and holes for the data.

    For planning at scale without the disk: every header, offset and index entry is what a
    real checkpoint holds, but the tensor bytes are a sparse hole (zeros, no blocks used), so
    a 70B model costs kilobytes. Returns the apparent size in bytes.

    Args:
        folder: where config.json, the shards and the index go (created).
        shape: the llama shape, e.g. `LLAMA_70B`.
        dtype: "bfloat16", "float16" or "float32".
        shards: how many files the tensors are spread over, in name order.
    Returns:
        The total apparent size of the shard files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2))
    itemsize = DTYPES[dtype].itemsize
    code = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    names = sorted(llama_shapes(shape))
    weight_map: dict[str, str] = {}
    total = 0
    per_file = -(-len(names) // shards)
    for s in range(shards):
        part = names[s * per_file:(s + 1) * per_file]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        total += _write_sparse_shard(folder / file, {n: llama_shapes(shape)[n] for n in part}, code, itemsize)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _write_sparse_shard(path: Path, shapes: dict[str, tuple[int, ...]], code: str, itemsize: int) -> int:
    """One safetensors file: its header, then a hole as long as the tensors' bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in shapes.items():
        size = itemsize * int(torch.Size(dims).numel())
        header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset
