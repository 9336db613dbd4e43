"""Causal grouped-query self-attention with RoPE.

Shapes: B batch, S sequence, D hidden, H query heads, G key/value heads, K head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..kernels import causal_attention
from .rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, output_std: float):
        super().__init__()
        self.config = config
        d, k = config.hidden_size, config.head_dim
        self.wq = nn.Linear(d, config.num_heads * k, bias=False)
        self.wk = nn.Linear(d, config.num_kv_heads * k, bias=False)
        self.wv = nn.Linear(d, config.num_kv_heads * k, bias=False)
        self.wo = nn.Linear(config.num_heads * k, d, bias=False)
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w.weight, 0.0, config.init_std)
        nn.init.normal_(self.wo.weight, 0.0, output_std)
        object.__setattr__(self, "rope", rope)  # one table shared by all layers, owned by the model
        # the input of wq, wk and wv; tensor parallelism reduces its gradient here, once (model.sharding)
        self.projection_input = nn.Identity()

    def forward(self, x_BSD: torch.Tensor, mask_B1SS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal attention over the sequence, or within each packed document (`mask_B1SS`: model.documents)."""
        b, s, _ = x_BSD.shape
        cfg = self.config
        x_BSD = self.projection_input(x_BSD)
        # q, k and v by one GEMM, and RoPE by one pass over the query and key heads: a third of the
        # projections' launches and weight casts, half of RoPE's. The weights stay three (checkpoints,
        # HF names and tensor-parallel shards are per projection); under tensor parallelism each holds
        # this rank's share of the heads.
        weights = (self.wq.weight, self.wk.weight, self.wv.weight)
        query_heads, kv_heads = (w.shape[0] // cfg.head_dim for w in weights[:2])
        qkv_BSHK = F.linear(x_BSD, torch.cat(weights)).view(b, s, -1, cfg.head_dim)
        q, k = self.rope(qkv_BSHK[:, :, :query_heads + kv_heads]).split([query_heads, kv_heads], dim=2)
        v = qkv_BSHK[:, :, query_heads + kv_heads:].contiguous()  # a view would keep q and k before RoPE for backward
        # the [B, H, S, K] views attention takes
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cfg.activation_checkpointing == "attention" and torch.is_grad_enabled():
            # selective recomputation (Megatron's): keep q, k, v, recompute the attention core in backward
            out = checkpoint(causal_attention, q, k, v, cfg.attention, mask_B1SS, use_reentrant=False)
        else:
            out = causal_attention(q, k, v, cfg.attention, mask_B1SS)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))
