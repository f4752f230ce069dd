"""Fine-tune the encoder on one task against its frozen head: full fine-tuning or LoRA.

Outputs are what star_dist takes as inputs:
- full: an HF folder (config.json + model.safetensors) whose tensor names are exactly the
  base's, written by `save_like_base` (a tensor training never touched, such as the unused
  pooler, is saved unchanged, so its task vector is exactly zero);
- lora: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) over the base.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertModel

from evaluate import embed_batch, load_encoder, logits, pad_batch

# LoRA on every linear layer of the encoder (attention q/k/v/out, both MLP layers); not on the
# pooler, which mean pooling never uses.
LORA_TARGETS = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run (the same for every task)."""

    regime: str  # "full" | "lora"
    steps: int
    batch_size: int
    lr: float
    max_len: int
    warmup_frac: float = 0.1
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def tag(self) -> str:
        """The cache key of the checkpoints; LoRA's says its initialization is seeded (cached
        adapters from before, drawn from an unseeded generator, are not reused)."""
        tag = f"{self.regime}_s{self.steps}_b{self.batch_size}_lr{self.lr:g}_L{self.max_len}"
        return tag + "_seededinit" if self.regime == "lora" else tag


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_trainable(base_dir: Path, cfg: FinetuneConfig, seed: int) -> torch.nn.Module:
    """The model to train: the base itself, or the base with fresh LoRA adapters whose random
    A matrices are drawn from `seed`, so a LoRA fine-tune is a function of its seed."""
    model = BertModel.from_pretrained(str(base_dir))
    if cfg.regime == "full":
        return model
    torch.manual_seed(seed)  # PEFT draws lora_A (Kaiming uniform) from torch's global generator
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=LORA_TARGETS, bias="none",
    )
    return get_peft_model(model, lora)


def train(
    model: torch.nn.Module,
    ids: list[list[int]],
    labels: list[int],
    head: torch.Tensor,
    cfg: FinetuneConfig,
    seed: int,
) -> float:
    """Train in place with AdamW; returns seconds per step. Batches: seeded epoch shuffles."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, math.ceil(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.steps, warmup))
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = list(range(len(ids)))
            rng.shuffle(order)
        rows, order = order[: cfg.batch_size], order[cfg.batch_size :]
        input_ids, mask = pad_batch([ids[i] for i in rows])  # [b, L]
        emb = embed_batch(model, input_ids, mask)  # [b, d]
        loss = torch.nn.functional.cross_entropy(logits(emb, head), torch.tensor([labels[i] for i in rows]))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return (time.perf_counter() - start) / cfg.steps


def save_like_base(state: dict[str, torch.Tensor], base_dir: Path, out_dir: Path) -> None:
    """Write ``model.safetensors`` with exactly the base file's tensor names, dtypes and order.

    Tensors missing from ``state`` (non-persistent buffers such as position_ids) are copied
    from the base; a name the base lacks is an error, since star_dist would reject it.
    """
    base_file = base_dir / "model.safetensors"
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(base_file), "pt") as base:
        names = list(base.keys())
        extra = sorted(set(state) - set(names))
        if extra:
            raise ValueError(f"tensors not in the base {base_file}: {extra[:5]}")
        for name in names:
            ref = base.get_tensor(name)
            tensor = state.get(name, ref)
            if tensor.shape != ref.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != base {tuple(ref.shape)}")
            out[name] = tensor.detach().to(ref.dtype).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", out_dir / "config.json")


def save(model: torch.nn.Module, cfg: FinetuneConfig, base_dir: Path, out_dir: Path) -> None:
    """Save a trained model as star_dist input: full folder or PEFT adapter folder."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.regime == "full":
        save_like_base(model.state_dict(), base_dir, tmp)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def materialize_lora(adapter_dir: Path, base_dir: Path, out_dir: Path) -> Path:
    """Base + adapter merged by PEFT into a full folder (for scoring a LoRA model on its own)."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    model = PeftModel.from_pretrained(load_encoder(base_dir), str(adapter_dir))
    merged = model.merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_like_base(merged.state_dict(), base_dir, tmp)
    tmp.rename(out_dir)
    return out_dir
