"""Continuations of a prompt by a trained model, one sampled token at a time.

There is no KV cache: each new token runs the model over its context window again, which is what reading a
run's samples needs (a few hundred tokens), not serving. Every row of a batch is one sample; with dropless
routing they are independent of each other, under a capacity factor their tokens share the experts' slots
as a training batch's do.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .transformer import LanguageModel


def next_tokens(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One id per row: the most likely at temperature 0, else a draw from softmax(logits / temperature)
    restricted to the `top_k` most likely (ties with the k-th kept)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LanguageModel, prompt: list[int], max_new_tokens: int, context: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: Optional[int] = None, vocab_size: Optional[int] = None,
             stop_id: Optional[int] = None, eod_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """`num_samples` continuations of the ids `prompt`, each at most `max_new_tokens` ids and ending before
    its first `stop_id`. The model reads the last `context` ids (its seq_len: RoPE's table ends there).
    Ids from `vocab_size` up (a model's vocabulary padded past its tokenizer's) are never drawn. `eod_id`, the
    end-of-document id, keeps a model.document_masking model's attention within the prompt's last document.
    `progress(n)` is called after the n-th token."""
    if not prompt:
        raise ValueError("the prompt holds no token: start it with the end-of-document id to begin a document")
    model.eval()
    device = model.embedding.weight.device
    tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    stopped = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        window = tokens[:, -context:]
        logits, _ = model(window, model.documents_of(window, eod_id))
        logits = logits[:, -1].float()
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        chosen = next_tokens(logits, temperature, top_k, generator)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if progress is not None:
            progress(step + 1)
        if stop_id is not None:
            stopped |= chosen == stop_id
            if bool(stopped.all()):
                break
    continuations = tokens[:, len(prompt):].tolist()
    return [row[:row.index(stop_id)] if stop_id in row else row for row in continuations]
