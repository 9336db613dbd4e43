"""Documents packed into one sample. A sample of model.seq_len tokens is a stretch of the token stream, so it
spans several documents, each ended by the end-of-document id. With model.document_masking a token attends only to
earlier tokens of its own document, so the model computes on each document as it would on that document alone
(Megatron's --reset-attention-mask). Megatron's --reset-position-ids is not needed with it: RoPE makes an
attention score depend on the distance between two positions only, so a document scores alike at any offset
within its sample (up to rounding).

Shapes: B batch, S sequence.
"""
from __future__ import annotations

import torch


def document_index(tokens_BS: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Each token's document within its sample: the number of end-of-document ids before it (an EOD ends the
    document it closes, so it belongs to that one)."""
    ends = (tokens_BS == eod_id).to(torch.int32)
    return ends.cumsum(dim=1, dtype=torch.int32) - ends


def document_attention_mask(documents_BS: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, S] added to the attention scores, one for every head: 0 where query s may attend key t (t <= s
    within one document), -inf elsewhere (`documents_BS`: document_index). Additive and in the dtype attention
    runs in (`dtype`), as SDPA would otherwise make this float copy of a boolean mask in every layer and keep
    each for backward: one mask per micro-batch, not one per layer."""
    seq = documents_BS.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents_BS.device).tril()
    allowed = (causal & (documents_BS[:, :, None] == documents_BS[:, None, :]))[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
