"""`verify --smoke`: load the merged model and check that it still predicts like its base.

A merge can be finite, correctly shaped and still broken (values written to the wrong
places, a wrong sign, a transposed update). The architecture check cannot see that; a
forward pass can. Both models are loaded with accelerate's
`load_checkpoint_and_dispatch(..., device_map="auto")`, spread over the GPUs, CPU and disk
that are there, one after the other, so the check fits wherever the model fits.

The test text needs no tokenizer and no data set: the base itself writes it. From a few
fixed prompts of random token ids (seeded), the base continues greedily; then the mean
next-token loss on those continuations is measured for the base (`L_base`) and for the
merge (`L_merged`). A uniform guess scores `L_chance = ln(vocab)`, and greedy targets give
`L_base < L_chance`. The merge fails when it is not finite or when

    L_merged > L_base + 0.5 · (L_chance − L_base)

that is, when it has lost more than half of the base's edge over chance on text the base
finds most likely. Why half: merging averages task vectors that each move the weights by a
few percent of their norm, so a sound merge of fine-tunes of this base stays close to the
base's predictions, while values in the wrong place give a model unrelated to the base, at
or above chance. Measured on make-tiny's models (bf16, vocab 256; L_base 3.056, L_chance
5.545): a fine-tune loses 0.008 of the gap, their STAR merge 0.037, the merge with every
matrix's entries shuffled 1.14. Half sits far from both, so neither noise nor a real fine-tune's drift
trips it, and no scrambled merge passes it.
"""

from __future__ import annotations

import gc
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VerifyError

TOLERANCE = 0.5  # the fraction of the base's edge over chance a merge may lose
PROMPTS = 4  # fixed prompts, batched
PROMPT_TOKENS = 8
NEW_TOKENS = 24  # greedy continuation written by the base; the loss is taken on these
SEED = 0


@dataclass(frozen=True)
class SmokeResult:
    """Mean next-token losses (nats) on the base's greedy continuations, and the verdict."""

    merged_loss: float
    base_loss: float
    chance_loss: float
    limit: float
    device_map: str

    @property
    def passed(self) -> bool:
        return math.isfinite(self.merged_loss) and self.merged_loss <= self.limit

    def summary(self) -> str:
        return (f"next-token loss {self.merged_loss:.4f} (base {self.base_loss:.4f}, chance "
                f"{self.chance_loss:.4f}, limit {self.limit:.4f}) on {PROMPTS}x{NEW_TOKENS} tokens the base "
                f"wrote; {self.device_map}: {'ok' if self.passed else 'FAILED'}")


def smoke_test(merged: Path, base: Path) -> SmokeResult:
    """Compare the merged model's next-token loss with the base's, on text the base wrote.

    Args:
        merged: the merged model folder.
        base: the base model folder.

    Returns:
        The losses and the limit.

    Raises:
        VerifyError: the merged model's loss is not finite or above the limit.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="star_dist_smoke_") as offload:
        model, where = load_dispatched(base, Path(offload) / "base")
        vocab = model.config.get_text_config().vocab_size
        prompts = torch.randint(0, vocab, (PROMPTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(SEED))
        text = greedy_continue(model, prompts, NEW_TOKENS)  # (PROMPTS, PROMPT_TOKENS + NEW_TOKENS)
        base_loss = continuation_loss(model, text, PROMPT_TOKENS)
        del model
        _free_memory()  # the base leaves before the merge arrives: one model in memory at a time
        model, _ = load_dispatched(merged, Path(offload) / "merged")
        merged_loss = continuation_loss(model, text, PROMPT_TOKENS)
        del model
        _free_memory()
    chance = math.log(vocab)
    result = SmokeResult(merged_loss, base_loss, chance, base_loss + TOLERANCE * (chance - base_loss), where)
    if not result.passed:
        raise VerifyError(f"{merged}: the smoke test failed: {result.summary()}; the merged model predicts unlike "
                          f"its base {base} (values in the wrong place, a wrong sign or scale?)")
    return result


def load_dispatched(folder: Path, offload_folder: Path) -> tuple[Any, str]:
    """A model folder loaded by accelerate across the devices there are (GPUs, CPU, disk).

    Args:
        folder: a Hugging Face model folder (config.json + safetensors, sharded or not).
        offload_folder: where layers that fit nowhere else are kept.

    Returns:
        The model in eval mode, and where its layers went, in words.
    """
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig

    from .verify import build_model

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights():
        model = build_model(config)
    model.tie_weights()  # before loading: accelerate keeps tied groups on one device
    model = load_checkpoint_and_dispatch(
        model, str(folder), device_map="auto", offload_folder=str(offload_folder),
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
    )
    return model.eval(), _placement(getattr(model, "hf_device_map", None))


def _placement(device_map: dict[str, Any] | None) -> str:
    devices = sorted({str(d) for d in (device_map or {"": "cpu"}).values()})
    return "device_map=auto on " + ", ".join(devices)


def greedy_continue(model: Any, prompts: Any, new_tokens: int) -> Any:
    """Append the model's most likely next token `new_tokens` times (no sampling, no cache:
    a handful of short sequences, so recomputing is cheap and free of cache quirks).

    Args:
        model: a loaded causal language model (transformers, possibly dispatched by accelerate).
        prompts: token ids, (B, P) int64.
        new_tokens: how many tokens to append.
    Returns:
        The prompts and their continuations, (B, P + new_tokens) int64, on the CPU.
    """
    import torch

    ids = prompts.to(_input_device(model))  # (B, P)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]  # (B, V)
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True).to(ids.device)], dim=1)
    return ids.cpu()  # (B, P + new_tokens)


def continuation_loss(model: Any, ids: Any, prompt_tokens: int) -> float:
    """Mean cross-entropy (nats) of the tokens after the prompt, each predicted from its past.

    Args:
        model: a loaded causal language model (transformers, possibly dispatched by accelerate).
        ids: token ids, (B, T) int64: prompts followed by their continuations.
        prompt_tokens: P, the prompt length; the T − P tokens after it are scored (P ≥ 1).
    Returns:
        The mean loss in nats per token, as a float.
    """
    import torch

    ids = ids.to(_input_device(model))  # (B, T)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
    predicted = logits[:, prompt_tokens - 1 : -1, :]  # (B, T - P, V): position t predicts t + 1
    targets = ids[:, prompt_tokens:].to(predicted.device)  # (B, T - P)
    return float(torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1)))


def _input_device(model: Any) -> Any:
    """Where token ids go: the embedding's device (accelerate's hooks move the rest); the CPU
    when the embedding itself was offloaded."""
    import torch

    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
