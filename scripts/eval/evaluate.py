"""Sentence embeddings, frozen heads and accuracy.

The encoder is scored the way it is used: mean pooling over real tokens, then L2 norm (the
sentence-transformers recipe for all-MiniLM-L6-v2). A task's head is fixed once from the
*base* model's embeddings of its class descriptions and never trained, so every fine-tuned
or merged encoder is judged against the same head and only the encoder can differ.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never touch the hub

import torch
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase

from tasks import Task

TEMPERATURE = 0.05  # cosine logits / T: sentence-transformers' usual scale of 20


def load_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(base_dir))


def load_encoder(folder: Path) -> BertModel:
    """A BertModel from an HF folder, in eval mode."""
    model = BertModel.from_pretrained(str(folder))
    model.eval()
    return model


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int
) -> list[list[int]]:
    """Token ids per text, truncated to ``max_len`` (CLS and SEP included), unpadded."""
    return tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]


def pad_batch(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in the batch: (input_ids, attention_mask), both [b, L]."""
    longest = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)  # [b, L]; pad id is 0
    mask = torch.zeros(len(ids), longest, dtype=torch.long)  # [b, L]
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def embed_batch(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings [b, d] (differentiable)."""
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [b, L, d]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [b, d]
    return torch.nn.functional.normalize(pooled, dim=-1)  # [b, d]


@torch.no_grad()
def embed(
    model: torch.nn.Module, ids: list[list[int]], batch_size: int = 128
) -> torch.Tensor:
    """Embeddings [n, d] of pre-tokenized texts, batched by length so padding stays small."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.hidden_size)  # [n, d]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in rows])
        out[rows] = embed_batch(model, input_ids, mask)
    return out


def make_head(
    base: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, max_len: int
) -> torch.Tensor:
    """Frozen head [C, d]: the base model's normalized embeddings of the class descriptions."""
    return embed(base, tokenize(tokenizer, task.descriptions, max_len))


def logits(embeddings: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over temperature: [n, d] x [C, d] -> [n, C]."""
    return embeddings @ head.T / TEMPERATURE


def accuracy(model: torch.nn.Module, ids: list[list[int]], labels: list[int],
             head: torch.Tensor) -> float:
    """Top-1 accuracy of the encoder with a frozen head on one pre-tokenized split."""
    pred = logits(embed(model, ids), head).argmax(-1)  # [n]
    return float((pred == torch.tensor(labels)).float().mean())
