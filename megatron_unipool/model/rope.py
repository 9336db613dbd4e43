"""Rotary position embeddings in the rotate-half convention (as Hugging Face LLaMA), so
attention weights export without permutation."""
from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x_BHSK: torch.Tensor) -> torch.Tensor:
        seq = x_BHSK.shape[-2]
        cos, sin = self.cos[:seq].to(x_BHSK.dtype), self.sin[:seq].to(x_BHSK.dtype)
        first, second = x_BHSK.chunk(2, dim=-1)
        return x_BHSK * cos + torch.cat([-second, first], dim=-1) * sin
